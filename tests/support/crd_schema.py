"""Check a manifest against a generated CRD the way the API server does, without a cluster:
OpenAPI v3 schema (draft-4 style bounds), unknown fields rejected (strict field validation),
defaults applied, then the CEL `x-kubernetes-validations` evaluated."""

from __future__ import annotations

import copy
from typing import Any

import celpy
from jsonschema import Draft4Validator


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def _unknown_fields(schema: dict, value: Any, path: list) -> list[str]:
    errors = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, sub in value.items():
            if key not in schema["properties"]:
                errors.append(f"{_path(path + [key])}: unknown field")
            else:
                errors.extend(_unknown_fields(schema["properties"][key], sub, path + [key]))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, sub in value.items():
            errors.extend(_unknown_fields(schema["additionalProperties"], sub, path + [key]))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors.extend(_unknown_fields(schema["items"], item, path + [i]))
    return errors


def _apply_defaults(schema: dict, value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(schema["items"], item)


def _cel_errors(schema: dict, value: Any, path: list) -> list[str]:
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            errors.append(f"{(_path(path) + rule.get('fieldPath', '')).lstrip('.')}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors.extend(_cel_errors(sub, value[key], path + [key]))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors.extend(_cel_errors(schema["items"], item, path + [i]))
    return errors


def crd_errors(crd: dict, manifest: dict) -> list[str]:
    """Every problem the API server would report for `manifest`, as 'field.path: message'."""
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    errors = []
    for e in Draft4Validator(schema).iter_errors(manifest):
        if e.validator == "required":  # the API server names the missing field itself
            errors += [f"{_path([*e.absolute_path, name])}: Required value" for name in e.validator_value if name not in e.instance]
        else:
            errors.append(f"{_path(e.absolute_path)}: {e.message}")
    errors += _unknown_fields(schema, manifest, [])
    if errors:
        return errors
    defaulted = copy.deepcopy(manifest)
    _apply_defaults(schema, defaulted)
    return _cel_errors(schema, defaulted, [])
