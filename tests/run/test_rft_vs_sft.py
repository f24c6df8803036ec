"""benchmarks/rft_vs_sft.py: three arms with the same budget and the same training tasks, judged
on the same held-out tasks; its last line is the JSON summary."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kuberft_core.api import RFTJob

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "rft_vs_sft.py"


def benchmark():
    spec = importlib.util.spec_from_file_location("rft_vs_sft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_arms_share_the_budget_the_training_tasks_and_the_held_out_tasks():
    bench = benchmark()
    base = RFTJob.model_validate(yaml.safe_load(bench.MANIFEST.read_text()))
    arms = {arm: bench.arm_job(base, arm, seed=2, steps=30).spec for arm in bench.ARMS}
    budgets = {arm: ((spec.sft.steps if spec.sft else 0), spec.grpo.steps) for arm, spec in arms.items()}
    assert budgets == {"sft": (30, 0), "rft": (0, 30), "sft_then_rft": (15, 15)}
    assert {spec.sft.batch_size for spec in arms.values() if spec.sft} == {arms["rft"].grpo.prompts_per_step} == {2}
    assert {spec.dataset.builtin.model_dump_json() for spec in arms.values()} == {arms["sft"].dataset.builtin.model_dump_json()}
    assert arms["sft"].dataset.builtin.seed == 2 and arms["sft"].dataset.builtin.size == 10
    assert {spec.dataset.eval.builtin.options["split"] for spec in arms.values()} == {"heldout"}
    assert {spec.grpo.seed for spec in arms.values()} == {2}


@pytest.mark.slow
def test_a_short_run_prints_the_summary_last(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "1", "--steps", "2", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["n_examples"] == 10 and summary["seeds"] == 1
    for arm in ("sft", "rft", "sft_then_rft"):
        assert 0.0 <= summary[f"{arm}_pass_at_1"] <= 1.0 and len(summary[f"{arm}_pass_at_1_per_seed"]) == 1
    assert summary["base_single_op_pass_at_1"] == 1.0
    assert (tmp_path / "rft-seed-0" / "report.png").is_file()
