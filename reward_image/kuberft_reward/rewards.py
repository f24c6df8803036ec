"""How the pool runs each reward kind of the core's catalogue (`kuberft_core.reward_kinds`: the
kinds and their options, checked before anything runs), and the rewards computed without a
sandbox child (text rewards and `triton.format`).

Custom rewards are a Python function in a module importable in the reward image, named
`package.module:function`, with the signature

    def reward(completion: str, row: dict, args: dict) -> float | tuple[float, str]

returning a score in [0, 1] (optionally with a reason). It runs inside the sandbox (no
network, time and memory limits), once per completion, with the reward's `args`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from kuberft_core import reward_kinds
from kuberft_core.reward_protocol import Outcome, RewardRequest, RewardResult

from . import program, text_rewards

# How the pool evaluates each kind of the core's catalogue (kuberft_core.reward_kinds, where the
# options are defined): text rewards here, triton.format here, the other triton kinds in the
# sandbox (kernel_eval), custom in the sandbox (worker). A test checks these cover the catalogue.
TEXT_REWARDS: dict[str, Callable[..., RewardResult]] = {
    "countdown": text_rewards.countdown,
    "multiple_choice": text_rewards.multiple_choice,
    "exact_match": text_rewards.exact_match,
    "regex": text_rewards.regex,
}
TRITON_SANDBOX_KINDS = ("triton.compile", "triton.correctness", "triton.speed")
TRITON_KINDS = ("triton.format",) + TRITON_SANDBOX_KINDS
IMPLEMENTED_KINDS = TRITON_KINDS + tuple(TEXT_REWARDS) + ("custom",)
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
        if reward.kind not in reward_kinds.REWARD_KINDS:
            known = ", ".join(reward_kinds.REWARD_KINDS)
            raise RequestError(f"{where}.kind: unknown reward {reward.kind!r} (known: {known})")
        if reward.kind == "custom":
            if not reward.module or not _CUSTOM_MODULE.match(reward.module):
                raise RequestError(f"{where}.module: a custom reward needs module 'package.module:function', got {reward.module!r}")
            plans.append(RewardPlan(reward.effective_name, "custom", dict(reward.args), reward.module))
            continue
        if reward.module:
            raise RequestError(f"{where}.module: only custom rewards take a module")
        problems = reward_kinds.options_problems(reward.kind, reward.args)
        if problems:
            raise RequestError("; ".join(f"{where}.args.{path}: {message}" for path, message in problems))
        plans.append(RewardPlan(reward.effective_name, reward.kind, reward_kinds.wire_options(reward.kind, reward.args)))
    return plans


def text_reward(plan: RewardPlan, completion: str, row: dict[str, Any]) -> RewardResult:
    return TEXT_REWARDS[plan.kind](completion, row, plan.args)


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
