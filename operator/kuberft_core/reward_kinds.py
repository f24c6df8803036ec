"""The reward catalogue: every reward kind and the typed options (`args`) it accepts.

One registry, read by the API (`RewardSpec.kind` and its `args`, so `kuberft validate` and the
operator catch a typo before anything runs) and by the reward pool (which checks each request
against the same models before evaluating). The pool's implementation of each kind lives in
`kuberft_reward.rewards`; a test there checks both sides list the same kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError


class RewardOptions(BaseModel):
    """Options of a built-in reward: camelCase on the wire, unknown options rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, alias_generator=to_camel, use_attribute_docstrings=True)


class TritonOptions(RewardOptions):
    """Options shared by the triton.* rewards (the pool merges those of one job's triton rewards)."""

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


class CountdownOptions(RewardOptions):
    format_score: float = Field(0.0, ge=0.0, le=1.0)
    """Score of a well-formed expression over the allowed numbers with the wrong value."""
    operators: str = Field("+-*/", pattern=r"^[-+*/]+$")
    """Operators the answer may use."""


class MultipleChoiceOptions(RewardOptions):
    field: str = "answer"
    """Row field holding the correct letter (or a 0-based option index)."""
    choices: Optional[str] = Field(None, pattern=r"^[A-Z]+$")
    """Valid letters; default A.. for the row's `options`, else ABCD."""


class ExactMatchOptions(RewardOptions):
    field: str = "answer"
    """Row field holding the expected answer (or a list of accepted answers)."""
    case_sensitive: bool = False
    """Compare case-sensitively (whitespace is always normalised)."""


class RegexOptions(RewardOptions):
    pattern: Optional[str] = Field(None, max_length=4096)
    """The regular expression (Python syntax)."""
    pattern_field: Optional[str] = None
    """Or: the row field holding the pattern."""
    mode: Literal["search", "fullmatch"] = "search"
    """`search`: the pattern matches anywhere; `fullmatch`: it matches the whole completion."""
    dot_all: bool = False
    """`.` matches newlines too."""
    strip: bool = True
    """Strip surrounding whitespace from the completion before matching."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: Optional[str]) -> Optional[str]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise PydanticCustomError("regex", "not a valid regular expression: {error}", {"error": str(e)}) from None
        return pattern


class CustomOptions(BaseModel):
    """A custom reward's args are its own business: passed to the function as given."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class RewardKindInfo:
    options: type[BaseModel]
    """The typed options the kind accepts in `args`."""
    summary: str
    """What it scores, in a few words."""


REWARD_KINDS: dict[str, RewardKindInfo] = {
    "triton.format": RewardKindInfo(TritonOptions, "partial credit for a well-formed Triton program (nothing runs)"),
    "triton.compile": RewardKindInfo(TritonOptions, "the program compiles and runs (sandboxed)"),
    "triton.correctness": RewardKindInfo(TritonOptions, "share of test cases matching the PyTorch reference (sandboxed)"),
    "triton.speed": RewardKindInfo(TritonOptions, "speedup over PyTorch, when correct (sandboxed)"),
    "countdown": RewardKindInfo(CountdownOptions, "an arithmetic expression over the given numbers reaching the target"),
    "multiple_choice": RewardKindInfo(MultipleChoiceOptions, "the answer letter equals the row's"),
    "exact_match": RewardKindInfo(ExactMatchOptions, "the answer equals the row's (whitespace-normalised)"),
    "regex": RewardKindInfo(RegexOptions, "a regular expression matches the completion"),
    "custom": RewardKindInfo(CustomOptions, "a Python function from the reward image, run in the sandbox"),
}


def parse_options(kind: str, args: dict[str, Any]) -> BaseModel:
    """The kind's typed options; KeyError for an unknown kind, ValidationError for bad args."""
    return REWARD_KINDS[kind].options.model_validate(args)


def options_problems(kind: str, args: dict[str, Any]) -> list[tuple[str, str]]:
    """(path under args, message) for each problem in a reward's args, e.g. ("numTestCases", ...)."""
    options = REWARD_KINDS[kind].options
    try:
        options.model_validate(args)
    except ValidationError as error:
        known = ", ".join(f.alias or name for name, f in options.model_fields.items())
        return [
            (".".join(str(p) for p in e["loc"]),
             f"unknown option of {kind} (known: {known})" if e["type"] == "extra_forbidden" and len(e["loc"]) == 1 else e["msg"])
            for e in error.errors()
        ]
    return []


def wire_options(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    """The args with defaults filled, in wire form (camelCase); ValidationError for bad args."""
    return parse_options(kind, args).model_dump(by_alias=True, exclude_none=True)
