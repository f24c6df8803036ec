"""The trainer's progress report: the one channel from a trainer pod back to its RFTJob.

One writer per status field: the operator alone writes an RFTJob's status. The trainer writes
only its job's progress ConfigMap, `<job>-progress`, which the operator creates (owned by the
RFTJob, labelled, so the operator's watch sees every change) and the trainer's Role lets it
`get` and `patch` by that one name. The trainer merge-patches its `data` with these keys
(ConfigMap values are strings):

- `step`: the last completed optimizer step (an integer);
- `totalSteps`: the steps the trainer runs in total (an integer);
- `rewards`: a JSON object, the latest mean score per reward function (by reward name);
- `meanReward`: the latest mean total (weighted) reward (a number);
- `adapterWritten`: `"true"` once the final adapter is in the output directory.

The report is untrusted input (a trainer runs the job's code with the job's token):
`read_progress` turns it into values the operator may copy into the status, and says what it
ignored. Steps are integers within the job's `grpo.steps`, rewards are finite numbers keyed by
the job's reward names, every value is short, and unknown keys are ignored. Phase, times and
the adapter location are never read from it: the operator decides them (the adapter lies
where the operator told the trainer to write it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

PROGRESS_SUFFIX = "-progress"
FIELDS = ("step", "totalSteps", "rewards", "meanReward", "adapterWritten")
"""The keys of the ConfigMap's `data` the operator reads; any other key is ignored."""
MAX_VALUE_CHARS = 2048
"""Longest value the operator reads (16 rewards with long names fit in a few hundred)."""
DECIMALS = 6
"""Reward values are rounded to this many decimals in the report and the status."""

_INTEGER = re.compile(r"^[0-9]{1,9}$")


def progress_config_map_name(job_name: str) -> str:
    """`<job>-progress`: the ConfigMap the trainer of RFTJob `job_name` reports into."""
    return f"{job_name}{PROGRESS_SUFFIX}"


@dataclass(frozen=True)
class ProgressReport:
    """What a trainer reports; every field is optional (a report may carry some of them)."""

    step: Optional[int] = None
    total_steps: Optional[int] = None
    rewards: dict[str, float] = field(default_factory=dict)
    mean_reward: Optional[float] = None
    adapter_written: bool = False

    def to_data(self) -> dict[str, str]:
        """The ConfigMap `data` merge patch: the fields that are set, as strings. Non-finite
        rewards (a step whose every completion failed to score) are left out."""
        data: dict[str, str] = {}
        if self.step is not None:
            data["step"] = str(self.step)
        if self.total_steps is not None:
            data["totalSteps"] = str(self.total_steps)
        rewards = {name: round(value, DECIMALS) for name, value in self.rewards.items() if math.isfinite(value)}
        if rewards:
            data["rewards"] = json.dumps(rewards, sort_keys=True, separators=(",", ":"))
        if self.mean_reward is not None and math.isfinite(self.mean_reward):
            data["meanReward"] = repr(round(self.mean_reward, DECIMALS))
        if self.adapter_written:
            data["adapterWritten"] = "true"
        return data


def _shown(value: str, limit: int = 40) -> str:
    """A value quoted for a message, cut short: a message never repeats a long hostile value."""
    return json.dumps(value if len(value) <= limit else value[:limit] + "...")


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return round(number, DECIMALS) if math.isfinite(number) else None


def read_progress(data: Mapping[str, Any], reward_names: Iterable[str], total_steps: int) -> tuple[ProgressReport, list[str]]:
    """The valid part of a progress ConfigMap's `data`, and one problem per value ignored
    (`field: why`). `reward_names` are the job's reward names; `total_steps` its `grpo.steps`."""
    names = set(reward_names)
    problems: list[str] = []

    def present(key: str) -> Optional[str]:
        """The value of `key` if it is there and short enough to read."""
        value = data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            problems.append(f"{key}: not a string")
            return None
        if len(value) > MAX_VALUE_CHARS:
            problems.append(f"{key}: longer than {MAX_VALUE_CHARS} characters")
            return None
        return value

    def integer(key: str) -> Optional[int]:
        text = present(key)
        if text is None:
            return None
        if not _INTEGER.match(text):
            problems.append(f"{key}: {_shown(text)} is not a whole number")
            return None
        number = int(text)
        if number > total_steps:
            problems.append(f"{key}: {number} is more than the job's {total_steps} steps")
            return None
        return number

    step = integer("step")
    reported_total = integer("totalSteps")
    if reported_total is not None and reported_total != total_steps:
        problems.append(f"totalSteps: {reported_total} is not the job's {total_steps} steps")
        reported_total = None

    rewards: dict[str, float] = {}
    text = present("rewards")
    if text is not None:
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            problems.append(f"rewards: {_shown(text)} is not a JSON object")
        else:
            unknown = sorted(k for k in parsed if k not in names)
            if unknown:
                shown = ", ".join(_shown(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
                problems.append(f"rewards: {shown} not among the job's rewards ({', '.join(sorted(names))})")
            else:
                bad = sorted(k for k, v in parsed.items() if _finite(v) is None)
                if bad:
                    problems.append(f"rewards: {', '.join(bad)} not a finite number")
                else:
                    rewards = {k: _finite(v) for k, v in parsed.items()}  # type: ignore[misc]

    mean_reward: Optional[float] = None
    text = present("meanReward")
    if text is not None:
        try:
            mean_reward = _finite(float(text))
        except ValueError:
            mean_reward = None
        if mean_reward is None:
            problems.append(f"meanReward: {_shown(text)} is not a finite number")

    adapter_written = False
    text = present("adapterWritten")
    if text is not None:
        if text in ("true", "false"):
            adapter_written = text == "true"
        else:
            problems.append(f"adapterWritten: {_shown(text)} is neither true nor false")

    report = ProgressReport(step=step, total_steps=reported_total, rewards=rewards, mean_reward=mean_reward, adapter_written=adapter_written)
    return report, problems


__all__ = ["FIELDS", "MAX_VALUE_CHARS", "ProgressReport", "progress_config_map_name", "read_progress"]
