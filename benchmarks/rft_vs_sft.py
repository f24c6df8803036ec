"""RFT against SFT with the same 10 labelled examples of PyTorch -> Triton, in miniature.

From one manifest (`examples/local-rft-vs-sft.yaml`: `tiny:triton-shape`, 10 tasks of the
triton-family training split, a held-out split as `dataset.eval`), three arms, each run
through the product (`kuberft_operator.local_runner.run_job`: the sandboxed reward pool and
the trainer, as `kuberft run` runs them) with the same budget, `--steps` optimizer steps of
2 examples each:

- `sft`:          supervised steps on the 10 rows' labelled `completion` (`grpo.steps: 0`);
- `rft`:          GRPO steps on the same 10 prompts, no labels: the rewards (format, compile,
                  correctness with the evaluator's anti-hacking checks) from the real pool;
- `sft_then_rft`: half the steps supervised, then half GRPO.

Each seed draws its own 10 training tasks (the same in the three arms) and its own sampling
and LoRA initialisation; every arm is judged on the same held-out tasks by the trainer's own
final evaluation (greedy decoding; pass: format, compile and correctness all `ok`, i.e. every
test case matches and nothing was hacked). Before training, the base model is evaluated the
same way on the held-out tasks and on the single-op tasks it was pretrained on.

    python benchmarks/rft_vs_sft.py                   # 23 minutes on 2 busy cores
    python benchmarks/rft_vs_sft.py --seeds 1 --steps 10

Prints a table and, last, one JSON line: the mean held-out pass@1 of each arm, with spreads
(`_std`: sample standard deviation over seeds; `_per_seed`). Every run's outputs (report.png:
reward per function per step, hacks caught per step; samples/: the graded completions) stay
under `--output`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

import yaml

from kuberft_core.api import DatasetSource, RFTJob

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "examples" / "local-rft-vs-sft.yaml"
ARMS = ("sft", "rft", "sft_then_rft")


def arm_job(base: RFTJob, arm: str, seed: int, steps: int) -> RFTJob:
    """The base job as one arm with `steps` optimizer steps, its training tasks and random
    streams drawn from `seed`."""
    manifest = base.model_dump(mode="json", by_alias=True, exclude_none=True)
    spec = manifest["spec"]
    spec["dataset"]["builtin"]["seed"] = seed
    spec["grpo"]["seed"] = seed
    supervised = {"sft": steps, "rft": 0, "sft_then_rft": steps // 2}[arm]
    if supervised:
        spec["sft"]["steps"] = supervised
    else:
        del spec["sft"]
    spec["grpo"]["steps"] = steps - supervised
    manifest["metadata"] = {"name": f"{arm.replace('_', '-')}-seed-{seed}"}
    return RFTJob.model_validate(manifest)


def base_pass_at_1(job: RFTJob, output_dir: Path) -> dict[str, float]:
    """Greedy pass@1 of the untrained model (the LoRA adapter starts as a no-op) on the held-out
    tasks and on the single-op tasks it was pretrained on, by the trainer's own evaluation."""
    from kuberft_core import kernel_families
    from kuberft_core.tasksets import family_row
    from kuberft_reward.pool import RewardPool
    from kuberft_trainer.train import Trainer

    singles = [family_row(c) for c in kernel_families.catalogue() if c.kind == "ew" and len(c.ops) == 1]
    sources = {"heldout": job.spec.dataset.eval, "single_op": DatasetSource(rows=singles)}
    results = {}
    with RewardPool.for_job(job.spec) as pool:
        for name, source in sources.items():
            spec = job.spec.model_copy(update={"dataset": job.spec.dataset.model_copy(update={"eval": source})})
            shutil.rmtree(output_dir / name, ignore_errors=True)
            with Trainer(spec, output_dir / name, pool, job_name=f"base-{name}") as trainer:
                results[name], _ = trainer.evaluate(0)
    return results


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per arm (default: the manifest's sft.steps + grpo.steps)")
    parser.add_argument("--output", type=Path, default=REPO / "runs" / "rft-vs-sft", help="where the runs go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from kuberft_operator.local_runner import run_job

    base = RFTJob.model_validate(yaml.safe_load(MANIFEST.read_text()))
    steps = args.steps or base.spec.sft.steps + base.spec.grpo.steps
    n_examples = base.spec.dataset.builtin.size
    started = time.perf_counter()

    before = base_pass_at_1(base, args.output / "base")
    print(f"base model: held-out pass@1 {before['heldout']:.3f}, single-op (pretrained on) pass@1 {before['single_op']:.3f}"
          f"  ({time.perf_counter() - started:.0f}s)", flush=True)

    results: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            job = arm_job(base, arm, seed, steps)
            output = args.output / job.metadata.name
            shutil.rmtree(output, ignore_errors=True)
            run_started = time.perf_counter()
            result = run_job(job, output, progress=False)
            results[arm].append(result.eval_pass_at_1)
            print(f"seed {seed} {arm:<13} held-out pass@1 {result.eval_pass_at_1:.3f}  "
                  f"({time.perf_counter() - run_started:.0f}s, {output})", flush=True)

    heldout = base.spec.dataset.eval.builtin.size
    print(f"\nheld-out greedy pass@1 over {args.seeds} seed(s), {n_examples} training examples, {steps} optimizer steps per arm, "
          f"{heldout} held-out tasks:")
    print(f"  {'arm':<14}{'mean':>7}{'std':>7}   per seed")
    print(f"  {'base model':<14}{before['heldout']:>7.3f}{'':>7}")
    for arm in ARMS:
        print(f"  {arm:<14}{statistics.mean(results[arm]):>7.3f}{spread(results[arm]):>7.3f}   "
              + " ".join(f"{v:.3f}" for v in results[arm]))
    gain = max(statistics.mean(results["rft"]), statistics.mean(results["sft_then_rft"])) - statistics.mean(results["sft"])
    print(f"  best RFT arm - SFT only: {gain:+.3f} (goal: at least +0.10: {'met' if gain >= 0.10 else 'not met'})")
    summary = {"n_examples": n_examples, "seeds": args.seeds}
    summary |= {f"{arm}_pass_at_1": statistics.mean(results[arm]) for arm in ARMS}
    summary |= {f"{arm}_pass_at_1_std": spread(results[arm]) for arm in ARMS}
    summary |= {f"{arm}_pass_at_1_per_seed": results[arm] for arm in ARMS}
    summary |= {"base_pass_at_1": before["heldout"], "base_single_op_pass_at_1": before["single_op"],
                "heldout_tasks": heldout, "steps": steps, "seconds": round(time.perf_counter() - started)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
