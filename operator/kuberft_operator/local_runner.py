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
    with RewardPool.for_job(spec) as pool:
        if nproc == 1:
            done = _train_here(spec, job.metadata.name, output_dir, pool, progress, on_step)
        else:
            done = _train_in_processes(spec, job.metadata.name, output_dir, pool, progress, nproc)
    records = read_metrics(output_dir)
    evaluations = [(r["step"], r["eval_pass_at_1"]) for r in records if r["eval_pass_at_1"] is not None]
    final_eval = {"step": evaluations[-1][0], "pass_at_1": evaluations[-1][1]} if evaluations else None
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


def _train_here(spec: RFTJobSpec, name: str, output_dir: Path, pool, progress: bool, on_step) -> _Trained:
    from kuberft_trainer.progress import StepProgress
    from kuberft_trainer.train import Trainer

    bar = StepProgress(bar=progress and sys.stderr.isatty())

    def step_done(m) -> None:
        bar(m)
        if on_step is not None:
            on_step(m)

    trainer = Trainer(spec, output_dir, pool, name, on_step=step_done)
    try:
        with trainer:
            result = trainer.run()
    finally:
        bar.close()
    return _Trained(result.step, result.total_steps, result.interrupted, result.adapter_dir)


def _train_in_processes(spec: RFTJobSpec, name: str, output_dir: Path, pool, progress: bool, nproc: int) -> _Trained:
    """`kuberft train` under torchrun, as the trainer pod runs it, with this pool served on 127.0.0.1."""
    import json
    import os
    import subprocess

    config = output_dir / "job.json"
    config.write_text(json.dumps({"apiVersion": API_VERSION, "kind": "RFTJob", "metadata": {"name": name}, "spec": spec.to_wire()}))
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with _served_over_http(pool) as url, _ctrl_c_left_to_the_trainer():
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             "-m", "kuberft_operator.cli", "train", "--config", str(config), "--output", str(output_dir),
             "--reward-url", url, "--metrics-port", "0", *([] if progress else ["--no-progress"])],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0's last line
    except (IndexError, ValueError):
        raise RuntimeError(f"the trainer processes failed (exit {done.returncode}); their log is above") from None
    adapter = summary["adapter"]
    return _Trained(summary["step"], summary["total_steps"], summary["interrupted"], Path(adapter) if adapter else None)


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
