"""`kuberft run`: the RFTJob manifest a cluster takes, run on this machine: the demo learns,
the report exists, Ctrl-C checkpoints and a rerun resumes."""

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
import yaml

from kuberft_core.api import RFTJob
from kuberft_core.manifests import load
from kuberft_operator.local_runner import ignored_fields, run_job

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "local-countdown.yaml"
KUBERFT = [sys.executable, "-m", "kuberft_operator.cli"]


def test_the_demo_manifest_sets_no_cluster_only_field():
    assert ignored_fields(load(DEMO, RFTJob).spec) == []


def test_cluster_only_fields_are_named_in_notes():
    document = yaml.safe_load(DEMO.read_text())
    document["spec"]["trainer"] = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    document["spec"]["checkpoint"]["storageSize"] = "10Gi"
    document["spec"]["queueName"] = "gpus"
    document["spec"]["trainer"]["sharding"] = "fsdp"  # honoured here (with --nproc)
    notes = ignored_fields(RFTJob.model_validate(document).spec)
    assert notes == [
        "spec.trainer.resources is ignored by `kuberft run` (trainer pod resources (processes here: --nproc))",
        "spec.checkpoint.storageSize is ignored by `kuberft run` (checkpoint volume (checkpoints go under --output))",
        "spec.queueName is ignored by `kuberft run` (Kueue admission)",
    ]


def test_run_rejects_a_bad_manifest_naming_the_field(tmp_path):
    document = yaml.safe_load(DEMO.read_text())
    document["spec"]["grpo"]["numGenerations"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(document))
    result = subprocess.run([*KUBERFT, "run", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{bad}: spec.grpo.numGenerations: Input should be greater than or equal to 2" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_trainer_runs_as_two_sharded_processes_with_nproc(tmp_path):
    document = yaml.safe_load(DEMO.read_text())
    document["spec"]["trainer"] = {"sharding": "fsdp"}
    document["spec"]["grpo"].update(promptsPerStep=4, numGenerations=4)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(document))
    output = tmp_path / "out"
    # An empty model cache, as on a fresh machine: both processes want tiny:countdown built.
    done = subprocess.run([*KUBERFT, "run", str(manifest), "--steps", "2", "--nproc", "2", "--output", str(output), "--no-progress"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "KUBERFT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model sharded over 2 processes" in done.stderr and "local-countdown: 2/2 steps" in done.stdout
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (output / "adapter" / "adapter_model.safetensors").is_file() and (output / "report.png").is_file()


def test_nproc_must_divide_the_prompts_of_a_step(tmp_path):
    done = subprocess.run([*KUBERFT, "run", str(DEMO), "--nproc", "3", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "--nproc 3: the trainer processes share each step's prompts, so grpo.promptsPerStep" in done.stderr


def test_rollout_servers_need_vllm_here(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")  # the local rollout servers run in tests/trainer/vllm_rollouts.py
    document = yaml.safe_load(DEMO.read_text())
    document["spec"]["rollout"] = {"mode": "server"}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(document))
    done = subprocess.run([*KUBERFT, "run", str(manifest), "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "spec.rollout.mode is server: the rollout servers run vLLM, which is not installed here" in done.stderr


@pytest.mark.slow
def test_shortened_demo_raises_the_countdown_reward_and_writes_the_report(tmp_path):
    job = load(DEMO, RFTJob)
    result = run_job(job, tmp_path / "out", steps=120, progress=False)
    assert result.steps_done == 120 and not result.interrupted
    first, last = result.summary["countdown"]["first"], result.summary["countdown"]["last"]
    assert last >= first + 0.15, (first, last)
    report = json.loads(result.report_json.read_text())
    assert [s["step"] for s in report["steps"]] == list(range(1, 121))
    assert report["config"]["spec"]["grpo"]["steps"] == 120
    assert result.report_png.stat().st_size > 10_000
    assert (result.adapter_dir / "adapter_config.json").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_the_same_command_resumes(tmp_path):
    output = tmp_path / "out"
    command = [*KUBERFT, "run", str(DEMO), "--steps", "6", "--output", str(output), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    metrics = output / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "run the same command again to resume" in stdout
    stopped_at = len(metrics.read_text().splitlines())
    assert 2 <= stopped_at < 6
    assert max(int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*")) == stopped_at

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert "local-countdown: 6/6 steps" in resumed.stdout
    assert (output / "report.png").exists() and (output / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_triton_variant_runs_generation_sandbox_rewards_and_update(tmp_path):
    job = load(REPO / "examples" / "local-triton.yaml", RFTJob)
    result = run_job(job, tmp_path / "out", steps=2, progress=False)
    assert result.steps_done == 2
    report = json.loads(result.report_json.read_text())
    rewards = [s["rewards"] for s in report["steps"]]
    assert set(rewards[0]) == {"triton.format", "triton.compile", "triton.correctness"}
    # The imitation model writes real kernels: some are well formed and run in the sandbox.
    assert max(r["triton.format"] for r in rewards) > 0.3
    assert max(r["triton.compile"] for r in rewards) > 0.3
    assert all(s["reward_failures"] == 0 for s in report["steps"])
