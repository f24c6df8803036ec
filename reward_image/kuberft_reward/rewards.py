"""The reward catalogue: which kinds exist, their options (checked before anything runs), and
the rewards computed without a sandbox child (text rewards and `triton.format`).

Custom rewards are a Python function in a module importable in the reward image, named
`package.module:function`, with the signature

    def reward(completion: str, row: dict, args: dict) -> float | tuple[float, str]

returning a score in [0, 1] (optionally with a reason). It runs inside the sandbox (no
network, time and memory limits), once per completion, with the reward's `args`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from . import program, text_rewards
from kuberft_core.reward_protocol import Outcome, RewardRequest, RewardResult


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel)


class TritonArgs(_Args):
    """Options shared by the triton.* rewards."""

    tag: str = Field("triton", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$", max_length=64)
    """The completion's program is between <tag> and </tag>."""
    num_test_cases: int = Field(4, ge=1, le=64)
    """Test cases: get_inputs() under this many seeds."""
    seed: int = 0
    """Base seed of the test cases (change it to draw other inputs)."""
    shapes: list[dict[str, int]] = Field(default_factory=list, max_length=16)
    """Extra test cases, each overriding module-level integer constants of the task (e.g. {"dim": 77})."""
    atol: Optional[float] = Field(None, ge=0)
    """Absolute tolerance (default per dtype: float32 1e-4 on the CPU, 1e-2 on a GPU; float16 1e-2)."""
    rtol: Optional[float] = Field(None, ge=0)
    """Relative tolerance (same defaults as atol)."""
    max_elements: int = Field(1 << 20, ge=1)
    """Larger tasks have their module-level size constants halved until a test case fits."""
    max_speedup: float = Field(4.0, gt=1.0)
    """triton.speed: the speedup over PyTorch that scores 1.0 (log scale; 1x scores 0)."""


class CountdownArgs(_Args):
    format_score: float = Field(0.0, ge=0.0, le=1.0)
    """Score of a well-formed expression over the allowed numbers with the wrong value."""
    operators: str = Field("+-*/", pattern=r"^[-+*/]+$")
    """Operators the answer may use."""


class MultipleChoiceArgs(_Args):
    field: str = "answer"
    """Row field holding the correct letter (or a 0-based option index)."""
    choices: Optional[str] = Field(None, pattern=r"^[A-Z]+$")
    """Valid letters; default A.. for the row's `options`, else ABCD."""


class ExactMatchArgs(_Args):
    field: str = "answer"
    """Row field holding the expected answer (or a list of accepted answers)."""
    case_sensitive: bool = False


class RegexArgs(_Args):
    pattern: Optional[str] = Field(None, max_length=4096)
    """The regular expression (Python syntax)."""
    pattern_field: Optional[str] = None
    """Or: the row field holding the pattern."""
    mode: Literal["search", "fullmatch"] = "search"
    dot_all: bool = False
    strip: bool = True


TEXT_REWARDS: dict[str, tuple[type[_Args], Callable[..., RewardResult]]] = {
    "countdown": (CountdownArgs, text_rewards.countdown),
    "multiple_choice": (MultipleChoiceArgs, text_rewards.multiple_choice),
    "exact_match": (ExactMatchArgs, text_rewards.exact_match),
    "regex": (RegexArgs, text_rewards.regex),
}
TRITON_SANDBOX_KINDS = ("triton.compile", "triton.correctness", "triton.speed")
TRITON_KINDS = ("triton.format",) + TRITON_SANDBOX_KINDS
KINDS = TRITON_KINDS + tuple(TEXT_REWARDS) + ("custom",)
_CUSTOM_MODULE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RequestError(ValueError):
    """A request the pool cannot run; the message names the field."""


@dataclass(frozen=True)
class RewardPlan:
    """One validated reward of a request."""

    name: str
    kind: str
    args: dict[str, Any]
    """Options in wire form (camelCase), defaults filled for triton rewards."""
    module: str | None = None

    @property
    def sandboxed(self) -> bool:
        return needs_sandbox([self.kind])


def needs_sandbox(kinds) -> bool:
    """Whether any of these reward kinds runs model code (so the pool needs sandbox workers)."""
    return any(kind in TRITON_SANDBOX_KINDS or kind == "custom" for kind in kinds)


def plan_rewards(rewards: list[RewardRequest]) -> list[RewardPlan]:
    """Check every reward's kind and options; raise RequestError naming the field."""
    plans = []
    for i, reward in enumerate(rewards):
        where = f"rewards[{i}]"
        if reward.kind not in KINDS:
            raise RequestError(f"{where}.kind: unknown reward {reward.kind!r} (known: {', '.join(KINDS)})")
        if reward.kind == "custom":
            if not reward.module or not _CUSTOM_MODULE.match(reward.module):
                raise RequestError(f"{where}.module: a custom reward needs module 'package.module:function', got {reward.module!r}")
            plans.append(RewardPlan(reward.effective_name, "custom", dict(reward.args), reward.module))
            continue
        if reward.module:
            raise RequestError(f"{where}.module: only custom rewards take a module")
        model = TritonArgs if reward.kind in TRITON_KINDS else TEXT_REWARDS[reward.kind][0]
        try:
            parsed = model.model_validate(reward.args)
        except ValidationError as e:
            error = e.errors()[0]
            loc = ".".join(str(p) for p in error["loc"])
            raise RequestError(f"{where}.args.{loc}: {error['msg']}") from None
        plans.append(RewardPlan(reward.effective_name, reward.kind, parsed.model_dump(by_alias=True, exclude_none=True)))
    return plans


def text_reward(plan: RewardPlan, completion: str, row: dict[str, Any]) -> RewardResult:
    return TEXT_REWARDS[plan.kind][1](completion, row, plan.args)


def format_reward(completion: str, task_source: str | None, tag: str) -> tuple[RewardResult, program.ProgramReport | None]:
    """`triton.format`: partial credit summed over the format checks, and the analysis (which
    may find forbidden constructs or tampering: those score 0 for every triton reward)."""
    source = program.extract_program(completion, tag)
    if source is None:
        return RewardResult.of(0.0, Outcome.INVALID, f"no <{tag}>...</{tag}> block with a program"), None
    report = program.analyze(source, task_source)
    if report.forbidden:
        return RewardResult.of(0.0, Outcome.HACKED, "refused to run: " + "; ".join(report.forbidden[:3])), report
    if report.hacks:
        return RewardResult.of(0.0, Outcome.HACKED, "; ".join(report.hacks[:3])), report
    score = report.format_score
    return RewardResult.of(score, Outcome.OK if score >= 1.0 else Outcome.WRONG, program.format_reason(report)), report
