"""Held-out evaluation: which greedy completions pass, and the samples files a user reads (the
held-out completions of each evaluation; the training completions an anti-hacking check caught).

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


def hacked_items(texts: list[str], rows: list[dict], matrix: ScoreMatrix) -> list[dict]:
    """The completions an anti-hacking check caught (outcome `hacked` in any reward), each with
    its row, outcomes and the evaluator's reasons (what the check saw)."""
    return [
        {"completion": text, "outcomes": outcomes, "reasons": reasons, "row": row}
        for text, row, outcomes, reasons in zip(texts, rows, matrix.outcomes, matrix.reasons)
        if "hacked" in outcomes.values()
    ]


def write_hacked(output_dir: Path, step: int, items: list[dict]) -> Path:
    """`samples/hacked-step-N.jsonl`: the training completions of step N caught hacking."""
    folder = Path(output_dir) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"hacked-step-{step:08d}.jsonl"
    write_atomically(path, "".join(json.dumps(item, default=str) + "\n" for item in items))
    return path
