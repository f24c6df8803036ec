"""Generate the CustomResourceDefinitions in `crds/` from the API models.

pydantic emits JSON Schema; a CRD needs an OpenAPI v3 *structural* schema: no `$ref`,
no `additionalProperties: false`, nullable unions collapsed, numeric exclusive bounds in
the boolean form, free-form objects marked `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kuberft_core.api import GROUP, RESOURCES, VERSION, Resource

_DROPPED_KEYS = {"title", "$defs", "discriminator"}


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    merged.update({k: v for k, v in overlay.items() if k not in ("$ref", "allOf", "anyOf")})
    return merged


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        node = _merge(target, node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = _merge(node["allOf"][0], node)
        return _structural(node, defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if sorted(b.get("type") for b in branches) == ["integer", "string"]:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**rest, "anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
        elif len(branches) == 1:
            return _structural(_merge(branches[0], node), defs)
        else:
            raise ValueError(f"a union of {branches} has no structural CRD form")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "default" and value is None:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
            continue
        if key == "additionalProperties":
            if value is False:
                continue
            if value is True or value == {}:
                out["x-kubernetes-preserve-unknown-fields"] = True
                continue
            out[key] = _structural(value, defs)
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
            continue
        if key in ("items", "anyOf"):
            out[key] = _structural(value, defs)
            continue
        out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" in out:
        del out["additionalProperties"]
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    """The structural schema of one API model."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def crd(resource: type[Resource]) -> dict[str, Any]:
    kind = resource.kind_name()
    spec_model = resource.model_fields["spec"].annotation
    status_model = resource.model_fields["status"].annotation.__args__[0]
    status_schema = openapi_schema(status_model)
    # The operator framework keeps its own bookkeeping under status; keep it from being pruned.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    subresources: dict[str, Any] = {"status": {}}
    if resource.scale:
        subresources["scale"] = dict(resource.scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": resource.plural,
                "singular": kind.lower(),
                "shortNames": list(resource.short_names),
                "categories": ["kuberft"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": [dict(c) for c in resource.printer_columns],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (resource.__doc__ or "").strip(),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # Declaring metadata.name lets CEL rules point their fieldPath at it.
                                "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
                                "spec": openapi_schema(spec_model),
                                "status": status_schema,
                            },
                            "x-kubernetes-validations": [rule.to_schema() for rule in resource.cel_rules],
                        }
                    },
                }
            ],
        },
    }


def render(crd_object: dict[str, Any]) -> str:
    return yaml.safe_dump(crd_object, sort_keys=False, width=120)


def crd_files() -> dict[str, str]:
    """File name -> YAML text of every generated CRD."""
    return {f"{r.plural}.{GROUP}.yaml": render(crd(r)) for r in RESOURCES}


def write_crds(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in crd_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
