"""Held-out evaluation: which greedy completions pass, and the samples file a user reads.

A row passes when every positively weighted reward answered outcome `ok` (the reward pool's
word for "passed its check": a correct countdown expression, a kernel matching the reference
and timed). Rows the pool failed to score are left out of pass@1."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import write_atomically
from .rewards import ScoreMatrix

SAMPLES_DIR = "samples"


@dataclass
class Evaluation:
    pass_at_1: Optional[float]
    mean_reward: Optional[float]
    passed: list[bool]


def judge(matrix: ScoreMatrix, totals: torch.Tensor, names: list[str], weights: list[float]) -> Evaluation:
    scorable = ~torch.isnan(totals)
    judged = [name for name, weight in zip(names, weights) if weight > 0] or names
    passed = [all(outcomes[name] == "ok" for name in judged) for outcomes in matrix.outcomes]
    if not bool(scorable.any()):
        return Evaluation(None, None, passed)
    rate = sum(p for p, ok in zip(passed, scorable.tolist()) if ok) / int(scorable.sum())
    return Evaluation(rate, totals[scorable].mean().item(), passed)


def write_samples(output_dir: Path, step: int, rows: list[dict], prompts: list[str], completions: list[str],
                  matrix: ScoreMatrix, totals: torch.Tensor, names: list[str], evaluation: Evaluation) -> Path:
    """`samples/step-N.jsonl`: each held-out prompt, its completion, rewards, outcomes and reasons."""
    folder = Path(output_dir) / SAMPLES_DIR
    folder.mkdir(exist_ok=True)
    lines = [
        json.dumps({
            "prompt": prompt, "completion": text, "total": None if math.isnan(total) else total, "passed": passed,
            "rewards": dict(zip(names, scores)), "outcomes": outcomes, "reasons": reasons, "row": row,
        }, default=str)
        for row, prompt, text, total, outcomes, reasons, scores, passed in zip(
            rows, prompts, completions, totals.tolist(), matrix.outcomes, matrix.reasons, matrix.scores, evaluation.passed
        )
    ]
    path = folder / f"step-{step:08d}.jsonl"
    write_atomically(path, "\n".join(lines) + "\n")
    return path
