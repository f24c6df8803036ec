"""`kuberft train` as the trainer pod runs it: killed mid-run and restarted, it resumes from the
last checkpoint and ends with the same adapter as an uninterrupted run; SIGTERM stops it with a
checkpoint; a bad config is rejected naming the field."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kuberft_trainer.checkpoint import complete_checkpoints
from kuberft_trainer.train import Trainer

from .reward_server import RewardServer
from .toy import ToyRewardBackend, toy_spec

KUBERFT = [sys.executable, "-m", "kuberft_operator.cli"]


def write_spec(tiny_model, folder: Path, **grpo) -> tuple[Path, object]:
    spec = toy_spec(tiny_model, **grpo)
    spec.checkpoint.every_steps = 2
    path = folder / "job.json"
    path.write_text(json.dumps(spec.to_wire()))  # what the operator's ConfigMap holds
    return path, spec


def start_train(config: Path, output: Path, url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KUBERFT_JOB_NAME", None)
    return subprocess.Popen(
        [*KUBERFT, "train", "--config", str(config), "--output", str(output), "--reward-url", url,
         "--metrics-port", "0", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def wait_for_steps(output: Path, steps: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    metrics = output / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited early:\n{process.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"no step {steps} within {timeout}s")


@pytest.mark.slow
def test_killed_trainer_resumes_from_its_checkpoint_with_the_uninterrupted_result(tiny_model, tmp_path):
    config, spec = write_spec(tiny_model, tmp_path, steps=8, learningRate=1e-2)
    with Trainer(spec, tmp_path / "straight", ToyRewardBackend()) as trainer:
        trainer.run()

    output = tmp_path / "killed"
    with RewardServer() as server:
        process = start_train(config, output, server.url)
        wait_for_steps(output, 5, process)  # step 4 is checkpointed, step 5 is not
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        assert [step for step, _ in complete_checkpoints(output)][-1] in (4, 6)
        restarted = start_train(config, output, server.url)
        out, _ = restarted.communicate(timeout=300)
    assert restarted.returncode == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["resumed_from"] in (4, 6) and summary["interrupted"] is False
    assert "resumed from" in out
    straight = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(output / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_stops_after_the_step_with_a_checkpoint(tiny_model, tmp_path):
    config, _ = write_spec(tiny_model, tmp_path, steps=50)
    output = tmp_path / "out"
    with RewardServer() as server:
        process = start_train(config, output, server.url)
        wait_for_steps(output, 1, process)
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is True and summary["step"] < 50
    assert "SIGTERM: stopping after this step with a checkpoint" in out
    assert complete_checkpoints(output)[-1][0] == summary["step"]
    assert not (output / "adapter").exists()  # the final adapter only after the last step


def test_a_bad_config_is_rejected_naming_the_field(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(
        "apiVersion: kuberft.io/v1alpha1\nkind: RFTJob\nmetadata: {name: bad}\n"
        "spec:\n  model: {name: m}\n  dataset: {rows: [{prompt: hi}]}\n  rewards: [{kind: countdown}]\n"
        "  grpo: {numGenerations: 1, lossType: ppo}\n"
    )
    result = subprocess.run([*KUBERFT, "train", "--config", str(config), "--output", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "spec.grpo.numGenerations: Input should be greater than or equal to 2" in result.stderr
    assert "spec.grpo.lossType" in result.stderr


@pytest.mark.parametrize("name", ["tiny:nonexistent-recipe", "/nonexistent/model-dir"])
def test_a_missing_model_is_reported_with_its_name(tmp_path, name):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"name": name}, "dataset": {"rows": [{"prompt": "x"}]},
                                  "rewards": [{"kind": "countdown"}]}))
    result = subprocess.run([*KUBERFT, "train", "--config", str(config), "--output", str(tmp_path / "o"),
                             "--reward-url", "http://127.0.0.1:9", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"'{name}'" in result.stderr and "Traceback" not in result.stderr


def test_a_job_sampling_on_rollout_servers_needs_them(tmp_path):
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"name": "tiny:countdown"}, "dataset": {"rows": [{"prompt": "x"}]},
                                  "rewards": [{"kind": "countdown"}], "rollout": {"mode": "server"}}))
    result = subprocess.run([*KUBERFT, "train", "--config", str(config), "--output", str(tmp_path / "o"),
                             "--reward-url", "http://127.0.0.1:9", "--metrics-port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "spec.rollout.mode is server: pass --rollout-service or --rollout-url" in result.stderr


def test_the_rollout_server_says_when_vllm_is_missing(tmp_path):
    pytest.importorskip("torch")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")  # the real server runs in tests/trainer/vllm_rollouts.py
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": {"name": "tiny:countdown"}, "dataset": {"rows": [{"prompt": "x"}]},
                                  "rewards": [{"kind": "countdown"}]}))
    result = subprocess.run([*KUBERFT, "rollout-server", "--config", str(config), "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "vLLM is not installed" in result.stderr and "EXTRA_PIP=vllm" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_one_adapter(tiny_model, tmp_path):
    config, _ = write_spec(tiny_model, tmp_path, steps=3)
    output = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    with RewardServer() as server:
        result = subprocess.run(
            [str(torchrun), "--standalone", "--nproc-per-node=2", "--no-python", str(Path(sys.executable).with_name("kuberft")),
             "train", "--config", str(config), "--output", str(output), "--reward-url", server.url, "--metrics-port", "0", "--no-progress"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        scored = server.backend.items_scored
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["step"] == 3 and not summary["interrupted"]
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]  # one line per step, not one per process
    assert scored >= 3 * 32  # both ranks scored their half of the 4 x 8 completions per step
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
