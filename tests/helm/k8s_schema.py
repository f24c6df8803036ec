"""Check built-in Kubernetes objects against the API's types without a cluster.

The official Python client (`kubernetes`, the operator extra) generates one pydantic model per
API type from the Kubernetes OpenAPI document, with unknown fields forbidden and strict types:
validating a manifest against `V1Deployment` & co. catches misspelt fields, wrong types and
missing required fields in a second. The API server itself (tests/helm/test_chart_cluster.py)
remains the final word; this is the check the default test run can afford.
"""

from __future__ import annotations

from typing import Any, Optional

import kubernetes.client
from pydantic import BaseModel, ValidationError

# The API server accepts numbers for resource quantities (`nvidia.com/gpu: 1`); the client's
# models type them as strings.
_QUANTITY_MAPS = ("limits", "requests", "capacity", "hard", "overhead", "podFixed")


def model_for(manifest: dict[str, Any]) -> Optional[type[BaseModel]]:
    """The client's model of the object's kind (`apps/v1` Deployment -> V1Deployment), or None
    for kinds the client does not know (custom resources)."""
    version = manifest["apiVersion"].split("/")[-1]
    model = getattr(kubernetes.client, f"{version[:1].upper()}{version[1:]}{manifest['kind']}", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _is_number_quantity(error: dict[str, Any]) -> bool:
    loc = error["loc"]
    return (
        error["type"] == "string_type"
        and isinstance(error["input"], (int, float))
        and not isinstance(error["input"], bool)
        and len(loc) >= 2
        and loc[-2] in _QUANTITY_MAPS
    )


def problems(manifest: dict[str, Any]) -> list[str]:
    """Every problem of `manifest` as `Kind/name: field.path: message` (empty when it is valid)."""
    model = model_for(manifest)
    where = f"{manifest.get('kind')}/{(manifest.get('metadata') or {}).get('name')}"
    if model is None:
        return [f"{where}: the Kubernetes client has no type for {manifest.get('apiVersion')} {manifest.get('kind')}"]
    try:
        model.model_validate(manifest)
    except ValidationError as error:
        return [
            f"{where}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in error.errors()
            if not _is_number_quantity(e)
        ]
    return []
