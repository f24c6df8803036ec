"""The HTTP contract of the reward pool (`POST /v1/evaluate`), imported by the trainer's
reward client and by the pool itself. Pure pydantic: no torch, no triton."""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Outcome(str, Enum):
    """How one evaluation of one reward ended. Every outcome but `error` is a verdict on the
    completion (scored as given, 0 included); `error` means the pool could not judge it, and the
    trainer leaves it out of the update."""

    OK = "ok"
    """Scored normally."""
    WRONG = "wrong"
    """Ran, but failed checks (fractional scores: the share of test cases passed)."""
    INVALID = "invalid"
    """No parsable answer."""
    TIMEOUT = "timeout"
    """Ran past the sandbox's time limit."""
    CRASH = "crash"
    """The sandboxed child (or the worker running it) died, or stopped without reporting every case."""
    HACKED = "hacked"
    """An anti-reward-hacking check fired: every triton reward scores 0."""
    UNVERIFIABLE = "unverifiable"
    """Cannot be checked on this hardware (e.g. a feature the CPU interpreter lacks)."""
    ERROR = "error"
    """The pool itself failed (a bad task, a damaged worker): not the model's fault."""

    def __str__(self) -> str:  # "wrong", not "Outcome.WRONG", in messages and tables
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InlineTask(Wire):
    """A KernelBench-style task given in the request: Python source defining `Model`,
    `get_inputs()` and `get_init_inputs()`."""

    source: str = Field(min_length=1, max_length=1_000_000)
    name: str = "inline"


class RewardRequest(Wire):
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


class Item(Wire):
    """One completion to score, with the dataset row it answers (task id, target, answer...)."""

    completion: str = Field(max_length=1_000_000)
    row: dict[str, Any] = Field(default_factory=dict)
    """The dataset row the prompt came from; e.g. {"task": "relu"} for a kernel task or
    {"numbers": [3, 7, 25], "target": 46} for countdown."""
    task: Optional[InlineTask] = None
    """A kernel task given inline instead of by id in the row."""


class EvaluateRequest(Wire):
    """POST /v1/evaluate: score a batch of completions with a list of rewards."""

    items: list[Item] = Field(min_length=1, max_length=4096)
    rewards: list[RewardRequest] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.effective_name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        return self


class RewardResult(Wire):
    """The verdict of one reward on one completion: the one shape every evaluator (text
    rewards, the format check, the sandboxed kernel evaluation, custom rewards) returns, the
    worker sends, the pool serves and the trainer reads."""

    score: float = Field(ge=0.0, le=1.0)
    outcome: Outcome
    reason: str = ""
    """Why this score, in a few words a user can act on (never the sandbox's environment)."""

    @classmethod
    def of(cls, score: float, outcome: Outcome | str, reason: str = "") -> "RewardResult":
        """A verdict with the score clamped to [0, 1]."""
        return cls(score=max(0.0, min(1.0, float(score))), outcome=Outcome(outcome), reason=reason)


class ItemResult(Wire):
    rewards: dict[str, RewardResult]
    """Reward name -> result."""
    hacked: bool = False
    """An anti-reward-hacking check fired for this completion."""
    seconds: float = 0.0
    """Wall time spent evaluating this completion."""


class EvaluateResponse(Wire):
    results: list[ItemResult]
    """One per request item, in order."""


class ErrorResponse(Wire):
    error: str
    """What was wrong with the request, naming the field."""
