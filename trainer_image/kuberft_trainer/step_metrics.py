"""What each step did, where it is written: `StepMetrics` (one line of `metrics.jsonl`, the
argument of `on_step`), the statistics that fill it, and `publish` (Prometheus gauges, the
metrics file, the job's progress report)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from kuberft_core.metrics import ComponentMetrics

from .checkpoint import write_atomically
from .report import ProgressReporter

METRICS_FILE = "metrics.jsonl"
PHASES = ("generate", "reward", "train")


@dataclass
class StepMetrics:
    """What one step did; one line of metrics.jsonl, and the argument of `on_step`."""

    step: int
    total_steps: int
    reward: Optional[float]
    """Mean weighted total reward of the scorable completions (None if none was scorable)."""
    reward_std: Optional[float]
    rewards: dict[str, float]
    """Mean score per reward function."""
    rewards_std: dict[str, float]
    loss: float
    kl: float
    clip_ratio: float
    grad_norm: float
    learning_rate: float
    completion_length_mean: float
    completion_length_max: int
    truncated_fraction: float
    generated_tokens: int
    tokens_per_second: float
    phase_seconds: dict[str, float]
    step_seconds: float
    reward_failures: int
    """(completion, reward) evaluations the pool failed to score in this step."""
    frac_reward_zero_std: float
    """Fraction of groups whose rewards were all equal (no learning signal)."""
    eval_pass_at_1: Optional[float] = None
    eval_reward: Optional[float] = None
    rollout_is_weight_mean: Optional[float] = None
    """Mean truncated importance weight min(p_trainer / p_rollout, cap) over the step's tokens,
    when another engine (vLLM) sampled them; with rollout_is_capped (fraction at the cap) and
    rollout_logprob_diff_mean / _max (|log p_trainer - log p_rollout| per token)."""
    rollout_is_capped: Optional[float] = None
    rollout_logprob_diff_mean: Optional[float] = None
    rollout_logprob_diff_max: Optional[float] = None
    reward_outcomes: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per reward function, how many of the step's completions got each outcome (`ok`, `wrong`,
    `invalid`, `crash`, `timeout`, `hacked`, ...; `error`: the pool could not score it)."""
    hacked: int = 0
    """Completions an anti-hacking check of the evaluator caught (outcome `hacked` in any reward)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    """Last completed step."""
    total_steps: int
    interrupted: bool
    """Stopped by a signal or max_steps before the last step (a checkpoint holds the state)."""
    resumed_from: Optional[int]
    adapter_dir: Optional[Path]
    """The final adapter (when all steps ran)."""
    last_metrics: Optional[StepMetrics] = None
    eval_pass_at_1: Optional[float] = None
    history: list[StepMetrics] = field(default_factory=list)
    """Metrics of the steps run by this call."""


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def reward_statistics(scores: torch.Tensor, totals: torch.Tensor, names: list[str], group_size: int) -> dict[str, Any]:
    """The reward fields of `StepMetrics` from the whole step's (N, K) scores and (N,) totals
    (NaN: unscorable)."""
    reward, reward_std = mean_std(totals[~torch.isnan(totals)].tolist())
    rewards, rewards_std = {}, {}
    for k, name in enumerate(names):
        column = scores[:, k]
        mean, std = mean_std(column[~torch.isnan(column)].tolist())
        if mean is not None:
            rewards[name], rewards_std[name] = mean, std
    groups = totals.view(-1, group_size)
    zero_std = sum(1 for g in groups if len(set(g[~torch.isnan(g)].tolist())) <= 1) / groups.shape[0]
    return {
        "reward": reward, "reward_std": reward_std, "rewards": rewards, "rewards_std": rewards_std,
        "reward_failures": int(torch.isnan(scores).sum()), "frac_reward_zero_std": zero_std,
    }


def outcome_statistics(outcomes: list[dict[str, str]], names: list[str]) -> dict[str, Any]:
    """The outcome fields of `StepMetrics` from the whole step's outcomes (per completion:
    reward name -> outcome)."""
    return {
        "reward_outcomes": {name: dict(Counter(o[name] for o in outcomes)) for name in names},
        "hacked": sum(1 for o in outcomes if "hacked" in o.values()),
    }


def length_statistics(lengths: torch.Tensor, truncated: torch.Tensor, generate_seconds: float) -> dict[str, Any]:
    """The completion-length fields of `StepMetrics` from the whole step's completions."""
    tokens = int(lengths.sum())
    return {
        "completion_length_mean": float(lengths.float().mean()),
        "completion_length_max": int(lengths.max()),
        "truncated_fraction": float(truncated.float().mean()),
        "generated_tokens": tokens,
        "tokens_per_second": tokens / max(generate_seconds, 1e-9),
    }


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The `StepMetrics` lines of `output_dir/metrics.jsonl`, one per step in order (a resumed
    run first drops the lines past its checkpoint, so no step appears twice)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop metric lines past `step` (steps that will run again), so the curves continue."""
    if (Path(output_dir) / METRICS_FILE).exists():
        kept = [m for m in read_metrics(output_dir) if m["step"] <= step]
        write_atomically(Path(output_dir) / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))


def publish(m: StepMetrics, job: str, gauges: ComponentMetrics, output_dir: Path, status: Optional[ProgressReporter]) -> None:
    """One step's metrics to Prometheus, metrics.jsonl and the job's progress report."""
    gauges.step.labels(job).set(m.step)
    gauges.total_steps.labels(job).set(m.total_steps)
    for name, value in m.rewards.items():
        gauges.reward_mean.labels(job, name).set(value)
        gauges.reward_std.labels(job, name).set(m.rewards_std[name])
    if m.reward is not None:
        gauges.reward_total_mean.labels(job).set(m.reward)
    gauges.loss.labels(job).set(m.loss)
    gauges.kl.labels(job).set(m.kl)
    gauges.clip_ratio.labels(job).set(m.clip_ratio)
    # The trainer's own samples (no vLLM) have no mismatch: weight 1, gap 0.
    corrected = m.rollout_is_weight_mean is not None
    gauges.rollout_is_weight_mean.labels(job).set(m.rollout_is_weight_mean if corrected else 1.0)
    gauges.rollout_logprob_diff_max.labels(job).set(m.rollout_logprob_diff_max if corrected else 0.0)
    gauges.completion_length_mean.labels(job).set(m.completion_length_mean)
    gauges.completion_length_max.labels(job).set(m.completion_length_max)
    gauges.truncated_fraction.labels(job).set(m.truncated_fraction)
    gauges.generated_tokens_per_second.labels(job).set(m.tokens_per_second)
    gauges.generated_tokens.labels(job).inc(m.generated_tokens)
    for phase in PHASES:
        gauges.step_phase_seconds.labels(job, phase).set(m.phase_seconds[phase])
    gauges.learning_rate.labels(job).set(m.learning_rate)
    if m.reward_failures:
        gauges.reward_failures.labels(job).inc(m.reward_failures)
    with open(Path(output_dir) / METRICS_FILE, "a") as handle:
        handle.write(json.dumps(m.to_json()) + "\n")
    if status is not None:
        status.step(m.step, m.total_steps, m.rewards, m.reward)
