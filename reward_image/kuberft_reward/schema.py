"""The HTTP contract of the reward pool (`POST /v1/evaluate`), imported by the trainer's
reward client and by the pool itself. Pure pydantic: no torch, no triton."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Outcome = Literal["ok", "wrong", "invalid", "timeout", "crash", "hacked", "unverifiable", "error"]
"""How one evaluation of one reward ended:
ok (scored normally), wrong (ran but failed checks), invalid (no parsable answer), timeout,
crash (the sandboxed child died), hacked (anti-reward-hacking check fired), unverifiable
(cannot be checked on this hardware), error (the pool itself failed: not the model's fault)."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InlineTask(_Wire):
    """A KernelBench-style task given in the request: Python source defining `Model`,
    `get_inputs()` and `get_init_inputs()`."""

    source: str = Field(min_length=1, max_length=1_000_000)
    name: str = "inline"


class RewardRequest(_Wire):
    """One reward function to apply to every completion of the batch."""

    kind: str
    """Built-in kind (e.g. `triton.correctness`, `countdown`) or `custom`."""
    name: Optional[str] = None
    """Name in the response and in metrics; defaults to the kind."""
    module: Optional[str] = None
    """For custom rewards: `package.module:function`."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Options of the reward function."""

    @property
    def effective_name(self) -> str:
        return self.name or self.kind


class Item(_Wire):
    """One completion to score, with the dataset row it answers (task id, target, answer...)."""

    completion: str = Field(max_length=1_000_000)
    row: dict[str, Any] = Field(default_factory=dict)
    """The dataset row the prompt came from; e.g. {"task": "relu"} for a kernel task or
    {"numbers": [3, 7, 25], "target": 46} for countdown."""
    task: Optional[InlineTask] = None
    """A kernel task given inline instead of by id in the row."""


class EvaluateRequest(_Wire):
    """POST /v1/evaluate: score a batch of completions with a list of rewards."""

    items: list[Item] = Field(min_length=1, max_length=4096)
    rewards: list[RewardRequest] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.effective_name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        return self


class RewardResult(_Wire):
    """The score of one reward on one completion."""

    score: float = Field(ge=0.0, le=1.0)
    outcome: Outcome
    reason: str = ""
    """Why this score, in a few words a user can act on (never the sandbox's environment)."""


class ItemResult(_Wire):
    rewards: dict[str, RewardResult]
    """Reward name -> result."""
    hacked: bool = False
    """An anti-reward-hacking check fired for this completion."""
    seconds: float = 0.0
    """Wall time spent evaluating this completion."""


class EvaluateResponse(_Wire):
    results: list[ItemResult]
    """One per request item, in order."""


class ErrorResponse(_Wire):
    error: str
    """What was wrong with the request, naming the field."""
