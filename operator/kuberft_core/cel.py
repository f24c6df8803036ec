"""CEL validation rules, defined once: emitted into the CRD as `x-kubernetes-validations`
and evaluated in Python (cel-python) so `kuberft validate` and the API server agree."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy

# cel-python logs every step of every evaluation at DEBUG, drowning the operator's own debug log.
logging.getLogger("celpy").setLevel(logging.WARNING)


@dataclass(frozen=True)
class CelRule:
    """One Kubernetes CEL rule on a schema node. `field_path` (relative, e.g. `.epsilonHigh`)
    points the error at the field the user should change."""

    rule: str
    message: str
    field_path: str | None = None

    def to_schema(self) -> dict[str, str]:
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path:
            entry["fieldPath"] = self.field_path
        return entry


@lru_cache(maxsize=None)
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def failed_rules(rules: tuple[CelRule, ...], node: Any) -> list[CelRule]:
    """The rules that do not hold for `node` (a JSON-shaped value, as the API server sees it)."""
    activation = {"self": celpy.json_to_cel(node)}
    failed = []
    for rule in rules:
        result = _program(rule.rule).evaluate(activation)
        if isinstance(result, Exception) or not bool(result):
            failed.append(rule)
    return failed
