"""`kuberft run`: an RFTJob manifest, the same one `kubectl apply` takes, run on this machine
with no cluster. The real reward pool (sandboxed worker processes) and the real trainer run
here; cluster-only fields are ignored with a note. Outputs under the output directory:
checkpoints/, metrics.jsonl, adapter/, config.json, samples/, report.json and report.png.
Running the same command again resumes from the latest checkpoint."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kuberft_core.api import RFTJob, RFTJobSpec

from .run_report import reward_summary, write_report

log = logging.getLogger("kuberft.run")

# Fields that only mean something in a cluster: (path in the wire spec, why it is ignored).
CLUSTER_ONLY_FIELDS = (
    ("trainer", "trainer pod placement (image, resources, node selector, tolerations, env)"),
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
) -> RunResult:
    """Run the job here: local reward pool + trainer; write the report. `steps` overrides
    spec.grpo.steps (a shorter or longer run of the same job)."""
    from kuberft_reward.pool import RewardPool
    from kuberft_trainer.progress import StepProgress
    from kuberft_trainer.train import Trainer, read_metrics

    spec = job.spec
    if steps is not None:
        spec = spec.model_copy(update={"grpo": spec.grpo.model_copy(update={"steps": steps})})
    output_dir.mkdir(parents=True, exist_ok=True)
    bar = StepProgress(bar=progress and sys.stderr.isatty())

    def step_done(m) -> None:
        bar(m)
        if on_step is not None:
            on_step(m)

    with RewardPool.for_job(spec) as pool:
        trainer = Trainer(spec, output_dir, pool, job.metadata.name, on_step=step_done)
        try:
            with trainer:
                result = trainer.run()
        finally:
            bar.close()
    records = read_metrics(output_dir)
    evaluations = [(r["step"], r["eval_pass_at_1"]) for r in records if r["eval_pass_at_1"] is not None]
    final_eval = {"step": evaluations[-1][0], "pass_at_1": evaluations[-1][1]} if evaluations else None
    config = {"name": job.metadata.name, "spec": spec.to_wire()}
    report_json, report_png = write_report(output_dir, config=config, steps=records, final_eval=final_eval)
    return RunResult(
        output_dir=output_dir,
        report_json=report_json,
        report_png=report_png,
        steps_done=result.step,
        total_steps=result.total_steps,
        interrupted=result.interrupted,
        summary=reward_summary(records),
        eval_pass_at_1=final_eval["pass_at_1"] if final_eval else None,
        adapter_dir=result.adapter_dir,
    )
