"""Status conditions in the metav1.Condition shape, as plain dicts (what the API server stores).

`set_condition` keeps `lastTransitionTime` when a condition's status does not change, so
reconciling twice writes the same status, and reports whether anything changed so the
reconciler can emit an Event for every transition (and only then).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, at second precision, as Kubernetes writes times."""
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Optional[str]) -> Optional[datetime]:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class Transition:
    """A condition that changed status (or appeared): the reconciler turns it into an Event."""

    type: str
    status: str
    reason: str
    message: str


# Conditions whose True status is bad news (a Warning event); for the others False is.
_TRUE_IS_BAD = {"Failed"}
_FALSE_IS_BAD = {"SpecAccepted", "ProgressAccepted"}


def event_type(transition: Transition) -> str:
    if transition.type in _TRUE_IS_BAD and transition.status == "True":
        return "Warning"
    if transition.type in _FALSE_IS_BAD and transition.status == "False":
        return "Warning"
    return "Normal"


def find(conditions: list[dict[str, Any]], type_: str) -> Optional[dict[str, Any]]:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: list[dict[str, Any]], type_: str) -> bool:
    found = find(conditions, type_)
    return bool(found and found.get("status") == "True")


class Conditions:
    """A mutable copy of a status' conditions that records transitions."""

    def __init__(self, existing: Optional[list[dict[str, Any]]], now: datetime, generation: Optional[int]):
        self.items = [dict(c) for c in (existing or [])]
        self.now = now
        self.generation = generation
        self.transitions: list[Transition] = []

    def set(self, type_: str, status: bool | str, reason: str, message: str = "") -> None:
        status_text = status if isinstance(status, str) else ("True" if status else "False")
        current = find(self.items, type_)
        updated = {
            "type": type_,
            "status": status_text,
            "reason": reason,
            "message": message,
            "lastTransitionTime": timestamp(self.now),
        }
        if self.generation is not None:
            updated["observedGeneration"] = self.generation
        if current is None:
            self.items.append(updated)
            transition = Transition(type_, status_text, reason, message)
            # A condition that starts out False is not news (nothing happened yet), unless it is a
            # warning such as a refused spec; one that starts True is (e.g. Created).
            if status_text == "True" or event_type(transition) == "Warning":
                self.transitions.append(transition)
            return
        if current.get("status") == status_text:
            updated["lastTransitionTime"] = current.get("lastTransitionTime", updated["lastTransitionTime"])
        elif current.get("status") != status_text:
            self.transitions.append(Transition(type_, status_text, reason, message))
        current.clear()
        current.update(updated)

    def is_true(self, type_: str) -> bool:
        return is_true(self.items, type_)

    def get(self, type_: str) -> Optional[dict[str, Any]]:
        return find(self.items, type_)
