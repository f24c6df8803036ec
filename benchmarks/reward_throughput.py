"""Reward pool throughput vs a cold Python process per evaluation (what KernelBench-style
harnesses do: spawn a process that imports torch and triton, loads the task and the
candidate, runs and compares).

Both sides evaluate the known-good solutions of the shipped tasks on the Triton CPU
interpreter with 2 evaluations in flight (both cores busy). Printed: evaluations per second,
p50/p95 latency, and the per-evaluation overhead (latency minus the kernel work itself,
measured inside the cold processes) with its ratio. The pool runs every check (host-compute
guard, launch tracking, derived cases, the no-op re-run, each child forked from the zygote); the
cold process runs the same number of test cases and no checks. Goal: overhead at least 50x lower.

    .venv/bin/python benchmarks/reward_throughput.py [--rounds 3] [--cold-evals 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONCURRENCY = 2
CASES = 7
"""Test cases per evaluation on both sides: the pool's 4 seeds plus its derived cases (signed,
scaled, odd-sized), so the kernel work compared is the same."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- cold baseline


def cold_one(task_path: str, program_path: str) -> None:
    """Run in a fresh process: import everything, evaluate one candidate, print JSON."""
    started = time.perf_counter()
    os.environ["TRITON_INTERPRET"] = "1"
    import importlib.util

    import torch

    def load(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    imported = time.perf_counter()
    task, candidate = load("task", task_path), load("candidate", program_path)
    init = task.get_init_inputs()

    def evaluate() -> bool:
        torch.manual_seed(42)
        reference = task.Model(*init)
        torch.manual_seed(42)
        model = candidate.ModelNew(*init)
        ok = True
        for case in range(CASES):
            torch.manual_seed(1000 + case * 104729)
            inputs = task.get_inputs()
            if case >= 4:  # as many cases as the pool runs (4 seeds, then derived inputs)
                inputs = [torch.randn_like(t) if t.is_floating_point() else t for t in inputs]
            with torch.no_grad():
                expected = reference(*[t.clone() for t in inputs])
                got = model(*inputs)
            ok = ok and torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        return ok

    ok = evaluate()
    done = time.perf_counter()
    # The same evaluation again, now warm: the kernel work itself, without start-up costs.
    evaluate()
    work = time.perf_counter() - done
    print(json.dumps({"ok": bool(ok), "import_seconds": imported - started, "work_seconds": work}))


def run_cold(jobs: list[tuple[str, str]]) -> tuple[list[float], list[float], float]:
    """(latencies, work seconds, wall) for one fresh process per evaluation."""

    def one(job: tuple[str, str]) -> tuple[float, float]:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--cold-one", *job], capture_output=True, text=True, check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        report = json.loads(out.stdout.strip().splitlines()[-1])
        if not report["ok"]:
            raise SystemExit(f"cold baseline: {job[0]} did not match the reference")
        # the process also ran the warm repeat: not part of a cold evaluation
        return time.perf_counter() - start - report["work_seconds"], report["work_seconds"]

    start = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as executor:
        results = list(executor.map(one, jobs))
    return [r[0] for r in results], [r[1] for r in results], time.perf_counter() - start


# --------------------------------------------------------------------------- pool


def run_pool(task_ids: list[str], rounds: int) -> tuple[list[float], float, float]:
    """(per-evaluation latencies, wall, worker start-up) with CONCURRENCY workers."""
    from kuberft_core.kernel_tasks import shipped_solution
    from kuberft_core.reward_protocol import EvaluateRequest
    from kuberft_reward.pool import RewardPool

    rewards = [{"kind": "triton.compile"}, {"kind": "triton.correctness"}]

    def request(tag: str, task_id: str) -> EvaluateRequest:
        program = shipped_solution(task_id) + f"\n# {tag}\n"  # distinct text: no de-duplication
        return EvaluateRequest.model_validate({"items": [{"completion": f"<triton>\n{program}\n</triton>", "row": {"task": task_id}}], "rewards": rewards})

    start = time.perf_counter()
    with RewardPool(CONCURRENCY, device="cpu") as pool:
        startup = time.perf_counter() - start
        for task_id in task_ids:  # warm the reference cache, as a long-running pool is
            pool.evaluate_sync(request("warm-up", task_id))
        latencies: list[float] = []

        def one(args: tuple[int, str]) -> float:
            index, task_id = args
            begin = time.perf_counter()
            result = pool.evaluate_sync(request(f"round {index}", task_id)).results[0]
            if result.rewards["triton.correctness"].score != 1.0:
                raise SystemExit(f"pool: {task_id}: {result.rewards['triton.correctness'].reason}")
            return time.perf_counter() - begin

        jobs = [(r, t) for r in range(rounds) for t in task_ids]
        begin = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as executor:
            latencies = list(executor.map(one, jobs))
        wall = time.perf_counter() - begin
    return latencies, wall, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the shipped tasks for the pool (default 3)")
    parser.add_argument("--cold-evals", type=int, default=8, help="cold-process evaluations (default 8)")
    parser.add_argument("--cold-one", nargs=2, metavar=("TASK", "PROGRAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_one:
        cold_one(*args.cold_one)
        return

    from kuberft_core.kernel_tasks import TaskSet, shipped_solution

    tasks = TaskSet()
    task_ids = tasks.ids()
    print(f"{len(task_ids)} shipped tasks, {CONCURRENCY} evaluations in flight, {os.cpu_count()} CPUs", flush=True)

    latencies, wall, startup = run_pool(task_ids, args.rounds)
    pool_rate = len(latencies) / wall

    with tempfile.TemporaryDirectory() as scratch:
        jobs = []
        for i in range(args.cold_evals):
            task_id = task_ids[i % len(task_ids)]
            program = Path(scratch) / f"candidate_{i}.py"
            program.write_text(shipped_solution(task_id))
            jobs.append((str(tasks.get(task_id).path), str(program)))
        cold_latencies, work, cold_wall = run_cold(jobs)
    cold_rate = len(cold_latencies) / cold_wall

    work_p50 = statistics.median(work)
    pool_overhead = max(statistics.median(latencies) - work_p50, 1e-3)
    cold_overhead = statistics.median(cold_latencies) - work_p50
    rows = [
        ("reward pool (pre-started workers, fork per run)", pool_rate, latencies),
        ("cold process per evaluation", cold_rate, cold_latencies),
    ]
    print(f"pool worker start-up (once): {startup:.1f} s")
    print(f"{'':50} {'evals/s':>8} {'p50 s':>8} {'p95 s':>8} {'n':>4}")
    for name, rate, values in rows:
        print(f"{name:50} {rate:8.2f} {statistics.median(values):8.3f} {percentile(values, 0.95):8.3f} {len(values):4d}")
    print(f"kernel work per evaluation (p50, a warm repeat inside the cold processes): {work_p50:.3f} s")
    print(f"per-evaluation overhead: pool {pool_overhead:.3f} s, cold {cold_overhead:.3f} s")
    print(f"overhead ratio (cold / pool): {cold_overhead / pool_overhead:.1f}x (goal: >= 50x)")
    print(f"throughput ratio (pool / cold): {pool_rate / cold_rate:.1f}x")


if __name__ == "__main__":
    main()
