"""Rendering the chart with the real `helm` binary, for the tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kuberft"
ALL_ON = Path(__file__).resolve().parent / "values-all-on.yaml"
RELEASE = "kuberft"
NAMESPACE = "kuberft-system"


def helm_binary() -> str:
    found = shutil.which("helm") or str(REPO / ".tools" / "bin" / "helm")
    if not Path(found).exists():
        raise FileNotFoundError("helm not found: run `make tools` (scripts/install-tools.sh installs it into .tools/bin)")
    return found


def helm(*args: str, check: bool = True, extra_env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(extra_env or {}))
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def _value_args(values_files: Iterable[Path] = (), set_values: Optional[dict[str, str]] = None) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["--values", str(path)]
    for key, value in (set_values or {}).items():
        args += ["--set", f"{key}={value}"]
    return args


def template_text(values_files: Iterable[Path] = (), set_values: Optional[dict[str, str]] = None, check: bool = True) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_value_args(values_files, set_values), check=check)


def render(values_files: Iterable[Path] = (), set_values: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """Every object `helm template` renders, the CRDs included (templates/crds.yaml)."""
    text = template_text(values_files, set_values).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: Optional[str] = None, namespace: Optional[str] = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[dict[str, Any]], kind: str, name: Optional[str] = None, namespace: Optional[str] = None) -> dict[str, Any]:
    found = find(objects, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def normalized_rules(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """RBAC rules as a set of (apiGroup, resource, resourceName or '*', verb) grants."""
    grants = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    for name in rule.get("resourceNames") or ["*"]:
                        grants.add((group, resource, name, verb))
    return grants
