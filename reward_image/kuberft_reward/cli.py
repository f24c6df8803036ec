"""`kuberft reward serve|eval|tasks`: run the reward pool, score one completion, list tasks.
Imports nothing heavy at module level."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KERNEL_DEFAULT_REWARDS = "triton.format,triton.compile,triton.correctness"


def register(subparsers: argparse._SubParsersAction) -> None:
    reward = subparsers.add_parser(
        "reward",
        help="the sandboxed reward pool: serve it, score a completion, list kernel tasks",
        description="The reward pool scores model completions. Kernel completions (a Triton program between "
        "<triton> and </triton>) run in a sandbox: a pre-started worker forks a child per evaluation with no "
        "network, a read-only filesystem, a private /tmp, time and memory limits and a seccomp filter.",
    )
    commands = reward.add_subparsers(dest="reward_command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the HTTP service (POST /v1/evaluate, GET /healthz, GET /metrics)",
        description="Start the sandbox workers and serve POST /v1/evaluate (the schema in kuberft_reward.schema), "
        "GET /healthz and GET /metrics. Answers 429 when more than --max-queue evaluations are waiting.",
    )
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    serve.add_argument("--tasks", type=Path, metavar="DIR", help="directory of extra kernel tasks (TASK_ID.py files), found before the shipped ones")
    serve.add_argument("--workers", type=int, default=2, help="sandbox worker processes, about one per CPU core (default 2)")
    _add_sandbox_options(serve)
    serve.add_argument("--max-queue", type=int, default=1024, help="evaluations waiting before requests get 429 (default 1024)")
    serve.set_defaults(handler=_serve)

    evaluate = commands.add_parser(
        "eval",
        help="score one completion from the command line",
        description="Score one completion file. For a kernel task the default rewards are triton.format, "
        "triton.compile and triton.correctness. With --json, print one object: {\"rewards\": {name: score}, "
        "\"hacked\": bool, \"reasons\": {name: reason}, \"outcomes\": {name: outcome}}.",
        epilog="examples:\n"
        "  kuberft reward eval --task relu --completion answer.txt\n"
        "  kuberft reward eval --task my_task.py --completion answer.txt --rewards triton.correctness --json\n"
        "  kuberft reward eval --rewards countdown --row '{\"numbers\": [3, 7, 25], \"target\": 46}' --completion -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--task", help="a kernel task: a KernelBench-style .py file, or the id of a shipped task (see `kuberft reward tasks`)")
    evaluate.add_argument("--completion", required=True, help="file with the model's completion ('-' reads stdin)")
    evaluate.add_argument("--rewards", help=f"comma-separated reward kinds (default with --task: {KERNEL_DEFAULT_REWARDS})")
    evaluate.add_argument("--row", help="the dataset row as JSON, for rewards that read it (countdown, multiple_choice, ...)")
    evaluate.add_argument("--num-test-cases", type=int, help="test cases for triton.correctness (default 4)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_sandbox_options(evaluate)
    evaluate.set_defaults(handler=_eval)

    tasks = commands.add_parser("tasks", help="list the kernel tasks the pool knows", description="List kernel task ids with their one-line description.")
    tasks.add_argument("--tasks", type=Path, metavar="DIR", help="also list the tasks in DIR")
    tasks.add_argument("--show", metavar="ID", help="print the source of one task")
    tasks.set_defaults(handler=_tasks)


def _add_sandbox_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=int, default=60, help="wall-clock seconds per sandboxed run (default 60)")
    parser.add_argument("--memory-mib", type=int, default=4096, help="address-space limit per sandboxed run in MiB (default 4096)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="run kernels on the GPU or in the CPU interpreter (default auto)")


def _sandbox(args: argparse.Namespace):
    from kuberft_operator.api import SandboxSpec
    from pydantic import ValidationError

    try:
        return SandboxSpec(timeout_seconds=args.timeout, memory_mi_b=args.memory_mib)
    except ValidationError as e:
        error = e.errors()[0]
        flag = {"timeout_seconds": "--timeout", "memoryMiB": "--memory-mib", "memory_mi_b": "--memory-mib"}.get(str(error["loc"][0]), str(error["loc"][0]))
        raise SystemExit(f"kuberft reward: {flag}: {error['msg']}") from None


def _serve(args: argparse.Namespace) -> int:
    from .pool import RewardPool
    from .server import serve

    if args.workers < 1:
        raise SystemExit("kuberft reward serve: --workers must be at least 1")
    if args.tasks is not None and not args.tasks.is_dir():
        raise SystemExit(f"kuberft reward serve: --tasks {args.tasks}: not a directory")
    pool = RewardPool(args.workers, _sandbox(args), args.tasks, max_queue=args.max_queue, device=args.device)
    serve(pool, args.host, args.port)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .kernel_tasks import TaskError, TaskSet, load_task_file
    from .pool import RewardPool
    from .rewards import TRITON_KINDS, RequestError, needs_sandbox
    from .schema import EvaluateRequest, InlineTask, Item, RewardRequest

    completion = sys.stdin.read() if args.completion == "-" else _read(args.completion, "--completion")
    row: dict = {}
    if args.row:
        try:
            row = json.loads(args.row)
        except json.JSONDecodeError as e:
            raise SystemExit(f"kuberft reward eval: --row: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise SystemExit("kuberft reward eval: --row: must be a JSON object")
    kinds = [k.strip() for k in (args.rewards or (KERNEL_DEFAULT_REWARDS if args.task else "")).split(",") if k.strip()]
    if not kinds:
        raise SystemExit("kuberft reward eval: give --rewards (or --task for the kernel rewards)")
    task = None
    if args.task:
        try:
            path = Path(args.task)
            task = load_task_file(path) if path.suffix == ".py" or path.exists() else TaskSet().get(args.task)
        except TaskError as e:
            raise SystemExit(f"kuberft reward eval: --task: {e}") from None
    elif any(k in TRITON_KINDS for k in kinds):
        raise SystemExit("kuberft reward eval: --task is needed for the triton rewards")
    reward_args = {"numTestCases": args.num_test_cases} if args.num_test_cases else {}
    rewards = [RewardRequest(kind=k, args=reward_args if k == "triton.correctness" else {}) for k in kinds]
    item = Item(completion=completion, row=row, task=InlineTask(source=task.source, name=task.id) if task else None)
    try:
        with RewardPool(1 if needs_sandbox(kinds) else 0, _sandbox(args), device=args.device) as pool:
            result = pool.evaluate_sync(EvaluateRequest(items=[item], rewards=rewards)).results[0]
    except RequestError as e:
        raise SystemExit(f"kuberft reward eval: {e}") from None
    if args.json:
        print(
            json.dumps(
                {
                    "rewards": {n: r.score for n, r in result.rewards.items()},
                    "hacked": result.hacked,
                    "reasons": {n: r.reason for n, r in result.rewards.items()},
                    "outcomes": {n: r.outcome for n, r in result.rewards.items()},
                }
            )
        )
    else:
        width = max(len(n) for n in result.rewards)
        for name, r in result.rewards.items():
            print(f"{name:<{width}}  {r.score:.2f}  {r.outcome:<12}  {r.reason}")
        if result.hacked:
            print("hacked: an anti-reward-hacking check fired; every triton reward scores 0")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    import ast

    from .kernel_tasks import TaskError, TaskSet

    try:
        tasks = TaskSet([args.tasks] if args.tasks else None)
        if args.show:
            print(tasks.get(args.show).source, end="")
            return 0
        for task_id in tasks.ids():
            task = tasks.get(task_id)
            model = next((n for n in ast.parse(task.source).body if isinstance(n, ast.ClassDef) and n.name == "Model"), None)
            doc = (ast.get_docstring(model) or "").splitlines()[0] if model and ast.get_docstring(model) else ""
            print(f"{task_id:<20} {doc}")
    except TaskError as e:
        raise SystemExit(f"kuberft reward tasks: {e}") from None
    return 0


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"kuberft reward eval: {flag} {path}: {e.strerror}") from None
