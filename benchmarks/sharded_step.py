"""The trainer on 1 process against 2 (torchrun, gloo, CPU), whole-model and sharded (FSDP2):
GRPO step time and memory per process, in one run.

The same model (a Llama built in code, 8 layers, hidden 512: ~26M parameters, big enough that
the weights show in the memory), the same prompts, lengths, LoRA and loss; every completion is
generated to the full length (EOS suppressed), so each configuration does the same work. Each
process reports the median step time after the first step, its peak resident set size, and the
bytes of model parameters it holds (its shards, with FSDP).

    python benchmarks/sharded_step.py            # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DigitsBackend

PROMPTS = [f"Write a number with {n} digits, then stop: " for n in range(1, 33)]


def worker(args) -> None:
    """One trainer process (alone, or one rank under torchrun): writes its figures to args.report."""
    import resource

    import torch

    from kuberft_core.api import RFTJobSpec
    from kuberft_trainer.train import Trainer

    spec = RFTJobSpec.model_validate({
        "model": {"name": args.model, "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
        "dataset": {"rows": [{"prompt": p} for p in PROMPTS], "useChatTemplate": False, "evalFraction": 0.0},
        "rewards": [{"kind": "regex", "name": "digits"}],
        "grpo": {"steps": args.steps, "promptsPerStep": 4, "numGenerations": 4, "maxCompletionLength": args.length,
                 "learningRate": 1e-4, "evalEvery": 0, "seed": 0},
        "trainer": {"sharding": args.sharding},
        "checkpoint": {"everySteps": 1_000_000},
    })
    with tempfile.TemporaryDirectory() as output:
        trainer = Trainer(spec, Path(output), DigitsBackend())
        trainer.eos_id = -1  # equal work: no completion ends before the length limit
        with trainer:
            times = [m.step_seconds for m in trainer.run().history]
            held = sum(_local(p).numel() * _local(p).element_size() for p in trainer.model.parameters())
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank, "step_seconds": statistics.median(times[1:]) if len(times) > 1 else times[0],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "parameters_mb": held / 2**20}
    Path(f"{args.report}.{rank}").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _local(parameter):
    from torch.distributed.tensor import DTensor

    return parameter.to_local() if isinstance(parameter, DTensor) else parameter


def run(name: str, processes: int, sharding: str, args, model: str, folder: Path) -> list[dict]:
    report = folder / name
    command = [sys.executable, __file__, "--worker", "--model", model, "--sharding", sharding, "--report", str(report),
               "--steps", str(args.steps), "--length", str(args.length)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *command[1:]]
    threads = max(1, (os.cpu_count() or 1) // processes)
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-4000:]}")
    return [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--sharding", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from kuberft_core.models import build_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model = str(build_tiny_model(folder / "model", hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                                     num_kv_heads=4, intermediate_size=4 * args.hidden))
        results = {
            "1 process": run("one", 1, "none", args, model, folder),
            "2 processes, whole model": run("replicated", 2, "none", args, model, folder),
            "2 processes, FSDP2": run("fsdp", 2, "fsdp", args, model, folder),
        }
    one = results["1 process"][0]
    print(f"{'configuration':<26} {'step s (median)':>15} {'peak RSS MB/process':>20} {'parameters MB/process':>22}")
    for name, ranks in results.items():
        step = max(r["step_seconds"] for r in ranks)
        rss = max(r["peak_rss_mb"] for r in ranks)
        held = max(r["parameters_mb"] for r in ranks)
        print(f"{name:<26} {step:>15.2f} {rss:>20.0f} {held:>22.1f}")
    fsdp = results["2 processes, FSDP2"]
    print(json.dumps({
        "fsdp_step_time_vs_one_process": max(r["step_seconds"] for r in fsdp) / one["step_seconds"],
        "fsdp_parameters_per_process_vs_one_process": max(r["parameters_mb"] for r in fsdp) / one["parameters_mb"],
        "fsdp_peak_rss_per_process_vs_one_process": max(r["peak_rss_mb"] for r in fsdp) / one["peak_rss_mb"],
    }))


if __name__ == "__main__":
    main()
