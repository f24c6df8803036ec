"""Training over several processes (torchrun, gloo, CPU) is the single-process update: two
processes, each holding the whole model or a shard of it (FSDP2), give the same rewards, losses
and adapter as one, and a checkpoint written by two sharded processes resumes on one.

The model runs in float64, so that the only differences are the order of floating-point sums
(batches of 2 prompts instead of 4, gradients summed over processes): tolerance 1e-6, where a
sampled token that differed would change a reward by at least 1/8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kuberft_core.api import RFTJobSpec
from kuberft_trainer.train import Trainer, read_metrics

from .reward_server import RewardServer
from .toy import ToyRewardBackend, toy_spec

COMPARED = ("reward", "reward_std", "rewards", "loss", "kl", "clip_ratio", "grad_norm", "learning_rate",
            "completion_length_mean", "truncated_fraction", "generated_tokens", "reward_failures", "frac_reward_zero_std")


def spec_for(tiny_model, sharding: str) -> RFTJobSpec:
    spec = toy_spec(tiny_model, steps=4, beta=0.05, numIterations=2)
    spec.model.dtype = "float64"
    spec.trainer.sharding = sharding
    spec.checkpoint.every_steps = 2
    return spec


def torchrun_train(spec: RFTJobSpec, output: Path, tmp_path: Path, *extra: str) -> dict:
    config = tmp_path / f"job-{spec.trainer.sharding}.json"
    config.write_text(json.dumps(spec.to_wire()))
    torchrun = Path(sys.executable).with_name("torchrun")
    with RewardServer() as server:
        done = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node=2", "--no-python", str(Path(sys.executable).with_name("kuberft")),
             "train", "--config", str(config), "--output", str(output), "--reward-url", server.url,
             "--metrics-port", "0", "--no-progress", *extra],
            capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 0, done.stderr[-4000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "log": done.stderr}


def assert_same_steps(ours: list[dict], reference: list[dict]) -> None:
    assert [m["step"] for m in ours] == [m["step"] for m in reference]
    for mine, theirs in zip(ours, reference):
        for key in COMPARED:
            a, b = mine[key], theirs[key]
            if isinstance(b, dict):
                assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in b), (mine["step"], key)
            else:
                assert a == pytest.approx(b, rel=1e-6, abs=1e-9), (mine["step"], key, a, b)


def assert_same_adapter(folder: Path, reference: Path) -> None:
    ours, theirs = (load_file(str(f / "adapter_model.safetensors")) for f in (folder, reference))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-9), name


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The reference: one process, 4 steps (KL to the base and two updates per step, so the
    reference forward and the old log-probs are covered too)."""
    output = tmp_path_factory.mktemp("one-process")
    with Trainer(spec_for(tiny_model, "none"), output, ToyRewardBackend()) as trainer:
        result = trainer.run()
    assert result.step == 4
    return output


def test_two_sharded_processes_train_as_one_and_their_checkpoint_resumes_on_one(tiny_model, tmp_path, one_process):
    spec = spec_for(tiny_model, "fsdp")
    output = tmp_path / "fsdp"
    summary = torchrun_train(spec, output, tmp_path, "--max-steps", "2")  # stops at step 2 with a checkpoint
    assert summary["step"] == 2 and summary["interrupted"]
    assert "model sharded over 2 processes (FSDP2, 3 shard groups)" in summary["log"]  # 2 decoder layers + the root
    assert_same_steps(read_metrics(output), read_metrics(one_process)[:2])
    # The checkpoint holds the full adapter and optimizer state: one process resumes it.
    with Trainer(spec, output, ToyRewardBackend()) as trainer:
        result = trainer.run()
    assert result.resumed_from == 2 and result.step == 4
    assert_same_steps(read_metrics(output), read_metrics(one_process))
    assert_same_adapter(output / "adapter", one_process / "adapter")


@pytest.mark.slow
def test_two_processes_each_holding_the_whole_model_train_as_one(tiny_model, tmp_path, one_process):
    output = tmp_path / "replicated"
    summary = torchrun_train(spec_for(tiny_model, "none"), output, tmp_path)
    assert summary["step"] == 4 and not summary["interrupted"]
    assert_same_steps(read_metrics(output), read_metrics(one_process))
    assert_same_adapter(output / "adapter", one_process / "adapter")


@pytest.mark.slow
def test_a_bf16_base_is_sharded_with_fp32_lora_master_weights(tiny_model, tmp_path):
    spec = toy_spec(tiny_model, steps=2)
    spec.model.dtype = "bfloat16"
    spec.trainer.sharding = "fsdp"
    summary = torchrun_train(spec, tmp_path / "bf16", tmp_path)
    assert summary["step"] == 2 and "model sharded over 2 processes" in summary["log"]
    lines = read_metrics(tmp_path / "bf16")
    assert all(m["grad_norm"] > 0 for m in lines)  # the fp32 LoRA weights received gradients through the bf16 base
    adapter = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.float32}
