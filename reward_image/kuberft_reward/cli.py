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
        help="score one completion, or a JSONL file of them, from the command line",
        description="Score one completion file, or with --batch every line of a JSONL file through one pool\n"
        "(its sandbox workers start once). For a kernel task the default rewards are triton.format,\n"
        "triton.compile and triton.correctness. With --json, and on every --batch output line, the result\n"
        "is the pool's ItemResult: {\"rewards\": {name: {\"score\", \"outcome\", \"reason\"}}, \"hacked\": bool,\n"
        "\"seconds\": float}; a batch line adds \"id\" and \"line\" first, or has \"error\" instead of the result.",
        epilog="examples:\n"
        "  kuberft reward eval --task relu --completion answer.txt\n"
        "  kuberft reward eval --task my_task.py --completion answer.txt --rewards triton.correctness --json\n"
        "  kuberft reward eval --rewards countdown --row '{\"numbers\": [3, 7, 25], \"target\": 46}' --completion -\n"
        "  kuberft reward eval --batch completions.jsonl --output scores.jsonl --workers 4\n"
        "\n"
        "a --batch line (one JSON object; blank lines are skipped):\n"
        "  {\"id\": \"a1\", \"completion\": \"<triton>...</triton>\", \"task\": \"relu\"}\n"
        "  {\"completion\": \"...\", \"task\": \"my_task.py\", \"rewards\": [\"triton.format\", {\"kind\": \"triton.correctness\", \"args\": {\"numTestCases\": 8}}]}\n"
        "  {\"completion\": \"...\", \"task\": {\"source\": \"class Model...\", \"name\": \"mine\"}}\n"
        "  {\"completion\": \"25+7*3\", \"row\": {\"numbers\": [3, 7, 25], \"target\": 46}, \"rewards\": [\"countdown\"]}\n"
        "task: a shipped task id, a task file or an inline task (default: row.task, then --task); rewards: reward\n"
        "kinds or reward objects as in POST /v1/evaluate (default: --rewards, or the kernel rewards with a task);\n"
        "id: any JSON value (default: the line number). Output lines keep the input order; a bad line gets\n"
        "{\"id\", \"line\", \"error\"} naming its line and field, the others are still scored, and the exit status is 1.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("--task", help="a kernel task: a KernelBench-style .py file, or the id of a shipped task (see `kuberft reward tasks`); with --batch, the task of lines that name none")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--completion", help="file with the model's completion ('-' reads stdin)")
    source.add_argument("--batch", metavar="IN.jsonl", help="score every line of a JSONL file ('-' reads stdin) with one pool; results go to --output as JSON lines, in input order")
    evaluate.add_argument("--output", metavar="OUT.jsonl", help="with --batch: where the result lines go (default stdout)")
    evaluate.add_argument("--workers", type=int, default=2, help="with --batch: sandbox worker processes, about one per CPU core (default 2; one completion uses 1)")
    evaluate.add_argument("--rewards", help=f"comma-separated reward kinds (default with a task: {KERNEL_DEFAULT_REWARDS}); with --batch, for lines that give none")
    evaluate.add_argument("--row", help="the dataset row as JSON, for rewards that read it (countdown, multiple_choice, ...); with --batch each line has its own")
    evaluate.add_argument("--num-test-cases", type=int, help="test cases for triton.correctness (default 4)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table (--batch always writes JSON lines)")
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
    from pydantic import ValidationError

    from kuberft_core.api import SandboxSpec

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


class _Bad(ValueError):
    """Bad input for one completion; `field` names it as in a --batch line (`task`,
    `rewards[1].kind`, ...), "" for the line as a whole."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    @classmethod
    def split(cls, error: Exception) -> "_Bad":
        """From a message of the form 'field: what is wrong' (RequestError, TaskError)."""
        field, _, message = str(error).partition(": ")
        return cls(field, message)


class _Inputs:
    """Turns what is given for one completion (completion, task, row, rewards) into a checked
    `Item` and reward list. The single form and every --batch line go through it, with the
    --task / --rewards / --num-test-cases flags as defaults."""

    def __init__(self, args: argparse.Namespace):
        self.default_task = args.task
        self.default_rewards = [k.strip() for k in args.rewards.split(",") if k.strip()] if args.rewards else None
        self.num_test_cases = args.num_test_cases
        self._task_set = None
        self._tasks: dict[str, object] = {}
        self._rewards: dict[str, object] = {}

    def prepare(self, completion, task, row: dict, rewards, task_field: str = "task"):
        """Return (item, rewards key, reward requests, sandboxed); raise _Bad naming the field."""
        from pydantic import ValidationError

        from kuberft_core.reward_protocol import Item

        if not isinstance(completion, str):
            raise _Bad("completion", "must be a string")
        if task is None:
            task, task_field = self.default_task, "task"
        inline = self.task(task, task_field) if task is not None else None
        if rewards is None:
            rewards = self.default_rewards or (KERNEL_DEFAULT_REWARDS.split(",") if inline else None)
        if rewards is None:
            raise _Bad("rewards", f"none given (a task alone gets {KERNEL_DEFAULT_REWARDS})")
        key, requests, triton, sandboxed = self.rewards(rewards)
        if triton and inline is None:
            raise _Bad("task", "needed for the triton rewards")
        try:
            item = Item(completion=completion, row=row, task=inline)
        except ValidationError as e:
            error = e.errors()[0]
            raise _Bad(".".join(str(p) for p in error["loc"]), error["msg"]) from None
        return item, key, requests, sandboxed

    def task(self, spec, field: str = "task"):
        """A shipped task id, a task file path, or an inline {"source", "name"} -> InlineTask."""
        from pydantic import ValidationError

        from kuberft_core.kernel_tasks import TaskError, TaskSet, check_task_source, load_task_file
        from kuberft_core.reward_protocol import InlineTask

        if isinstance(spec, dict):
            try:
                inline = InlineTask.model_validate(spec)
                check_task_source(inline.source, f"{field}.source")
            except ValidationError as e:
                error = e.errors()[0]
                raise _Bad(".".join([field, *(str(p) for p in error["loc"])]), error["msg"]) from None
            except TaskError as e:
                raise _Bad.split(e) from None
            return inline
        if not isinstance(spec, str):
            raise _Bad(field, 'must be a task id, a task file or {"source": ..., "name": ...}')
        if spec not in self._tasks:
            try:
                path = Path(spec)
                if path.suffix == ".py" or path.exists():
                    task = load_task_file(path)
                else:
                    self._task_set = self._task_set or TaskSet()
                    task = self._task_set.get(spec)
                self._tasks[spec] = InlineTask(source=task.source, name=task.id)
            except TaskError as e:
                self._tasks[spec] = _Bad(field, str(e))
        found = self._tasks[spec]
        if isinstance(found, _Bad):
            raise _Bad(field, str(found))
        return found

    def rewards(self, spec):
        """Reward kinds or reward objects (as in POST /v1/evaluate) -> (key, [RewardRequest],
        any triton reward, any sandboxed reward); checked once per distinct list."""
        cache_key = json.dumps(spec, sort_keys=True)
        if cache_key not in self._rewards:
            try:
                self._rewards[cache_key] = self._check_rewards(spec)
            except _Bad as e:
                self._rewards[cache_key] = e
        found = self._rewards[cache_key]
        if isinstance(found, _Bad):
            raise _Bad(found.field, str(found))
        return found

    def _check_rewards(self, spec):
        from pydantic import ValidationError

        from kuberft_core.reward_protocol import EvaluateRequest, Item, RewardRequest

        from .rewards import TRITON_KINDS, RequestError, needs_sandbox, plan_rewards

        if not isinstance(spec, list) or not spec:
            raise _Bad("rewards", "must be a non-empty list of reward kinds or reward objects")
        requests = []
        for i, entry in enumerate(spec):
            if isinstance(entry, str):
                args = {"numTestCases": self.num_test_cases} if entry == "triton.correctness" and self.num_test_cases else {}
                requests.append(RewardRequest(kind=entry, args=args))
            elif isinstance(entry, dict):
                try:
                    requests.append(RewardRequest.model_validate(entry))
                except ValidationError as e:
                    error = e.errors()[0]
                    raise _Bad(".".join([f"rewards[{i}]", *(str(p) for p in error["loc"])]), error["msg"]) from None
            else:
                raise _Bad(f"rewards[{i}]", 'must be a reward kind or a reward object {"kind": ...}')
        try:
            plans = plan_rewards(requests)
        except RequestError as e:
            raise _Bad.split(e) from None
        try:  # the request's own limits: how many rewards, unique names
            EvaluateRequest(items=[Item(completion="")], rewards=requests)
        except ValidationError as e:
            raise _Bad("rewards", e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        key = json.dumps([r.model_dump(mode="json", exclude_defaults=True) for r in requests], sort_keys=True)
        kinds = [p.kind for p in plans]
        return key, requests, any(k in TRITON_KINDS for k in kinds), needs_sandbox(kinds)


def _result_json(result=None, *, error: str | None = None, **where) -> dict:
    """The JSON of one scored completion: the pool's `ItemResult` (`--json` prints it), after
    `id` and `line` on a --batch output line, or `error` instead of the result."""
    out = dict(where)
    if error is not None:
        out["error"] = error
    else:
        out.update(result.model_dump(mode="json"))
    return out


def _eval(args: argparse.Namespace) -> int:
    from kuberft_core.reward_protocol import EvaluateRequest

    from .pool import RewardPool
    from .rewards import RequestError

    if args.batch is not None:
        return _eval_batch(args)
    if args.output is not None:
        raise SystemExit("kuberft reward eval: --output: only with --batch (one completion prints its result)")
    completion = sys.stdin.read() if args.completion == "-" else _read(args.completion, "--completion")
    row: dict = {}
    if args.row:
        try:
            row = json.loads(args.row)
        except json.JSONDecodeError as e:
            raise SystemExit(f"kuberft reward eval: --row: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise SystemExit("kuberft reward eval: --row: must be a JSON object")
    try:
        task, task_field = (args.task, "task") if args.task else (row.get("task"), "row.task")
        item, _, rewards, sandboxed = _Inputs(args).prepare(completion, task, row, None, task_field)
    except _Bad as e:
        raise SystemExit(f"kuberft reward eval: {_flag(e.field)}: {e}") from None
    try:
        with RewardPool(1 if sandboxed else 0, _sandbox(args), device=args.device) as pool:
            result = pool.evaluate_sync(EvaluateRequest(items=[item], rewards=rewards)).results[0]
    except RequestError as e:
        raise SystemExit(f"kuberft reward eval: {e}") from None
    if args.json:
        print(json.dumps(_result_json(result)))
    else:
        width = max(len(n) for n in result.rewards)
        for name, r in result.rewards.items():
            print(f"{name:<{width}}  {r.score:.2f}  {r.outcome:<12}  {r.reason}")
        if result.hacked:
            print("hacked: an anti-reward-hacking check fired; every triton reward scores 0")
    return 0


def _flag(field: str) -> str:
    """The flag of the single form that gave a field of `_Inputs.prepare`."""
    if "numTestCases" in field:
        return "--num-test-cases"
    return "--" + field.split(".")[0].split("[")[0]


BATCH_CHUNK = 256
"""--batch lines read at a time; their completions go to the pool as one EvaluateRequest per
distinct reward list."""
BATCH_IN_FLIGHT = 2
"""Chunks queued in the pool at once: the workers start on the next chunk while the last
results of the previous one come in, and at most this many chunks are held in memory."""


class _Line:
    __slots__ = ("number", "id", "item", "key", "rewards", "sandboxed", "result", "error")

    def __init__(self, number: int, line_id, error: str | None = None):
        self.number, self.id, self.error = number, line_id, error
        self.item = self.key = self.rewards = self.result = None
        self.sandboxed = False


_LINE_FIELDS = ("id", "completion", "task", "row", "rewards")


def _batch_line(number: int, raw: bytes, inputs: _Inputs) -> _Line:
    line_id = number
    try:
        try:
            value = json.loads(raw)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise _Bad("", f"not JSON ({e})") from None
        if not isinstance(value, dict):
            raise _Bad("", "must be a JSON object")
        line_id = value.get("id", number)
        unknown = [k for k in value if k not in _LINE_FIELDS]
        if unknown:
            raise _Bad(unknown[0], f"unknown field (a line has {', '.join(_LINE_FIELDS)})")
        if "completion" not in value:
            raise _Bad("completion", "missing")
        row = value.get("row", {})
        if not isinstance(row, dict):
            raise _Bad("row", "must be a JSON object")
        task, task_field = (value.get("task"), "task") if value.get("task") is not None else (row.get("task"), "row.task")
        line = _Line(number, line_id)
        line.item, line.key, line.rewards, line.sandboxed = inputs.prepare(value["completion"], task, row, value.get("rewards"), task_field)
        return line
    except _Bad as e:
        return _Line(number, line_id, error=f"line {number}: {e.field}: {e}" if e.field else f"line {number}: {e}")


class _PoolStartFailed(RuntimeError):
    pass


def _eval_batch(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from .pool import RewardPool

    if args.row is not None:
        raise SystemExit("kuberft reward eval: --row: not with --batch (each line has its own row)")
    if args.workers < 1:
        raise SystemExit("kuberft reward eval: --workers must be at least 1")
    inputs = _Inputs(args)
    try:  # the defaults every line may fall back on
        if args.task:
            inputs.task(args.task)
        if inputs.default_rewards:
            inputs.rewards(inputs.default_rewards)
    except _Bad as e:
        raise SystemExit(f"kuberft reward eval: {_flag(e.field)}: {e}") from None
    if args.output not in (None, "-") and args.batch != "-" and Path(args.output).resolve() == Path(args.batch).resolve():
        raise SystemExit("kuberft reward eval: --output: the same file as --batch")
    sandbox = _sandbox(args)
    try:
        source = sys.stdin.buffer if args.batch == "-" else open(args.batch, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise SystemExit(f"kuberft reward eval: --batch {args.batch}: {e.strerror}") from None
    try:
        out = sys.stdout if args.output in (None, "-") else open(args.output, "w")  # noqa: SIM115 - closed below
    except OSError as e:
        raise SystemExit(f"kuberft reward eval: --output {args.output}: {e.strerror}") from None

    began = time.monotonic()
    pools: dict[bool, RewardPool] = {}
    counts = {"lines": 0, "errors": 0, "start_seconds": 0.0}

    def pool_for(sandboxed: bool) -> RewardPool:
        """A pool without workers for the rewards that run no model code; the sandbox workers
        start (once) when the first line that needs them comes."""
        if sandboxed not in pools:
            pool = RewardPool(args.workers if sandboxed else 0, sandbox, max_queue=2 * BATCH_CHUNK * BATCH_IN_FLIGHT, device=args.device)
            start = time.monotonic()
            try:
                pool.start()
            except RuntimeError as e:
                raise _PoolStartFailed(str(e)) from None
            counts["start_seconds"] += time.monotonic() - start
            pools[sandboxed] = pool
        return pools[sandboxed]

    def lines():
        for number, raw in enumerate(source, 1):
            if raw.strip():
                yield _batch_line(number, raw, inputs)

    def write(window: list[_Line]) -> None:
        for line in window:
            counts["lines"] += 1
            counts["errors"] += line.error is not None
            out.write(json.dumps(_result_json(line.result, error=line.error, id=line.id, line=line.number)) + "\n")
        out.flush()

    try:
        asyncio.run(_run_batch(lines(), pool_for, write))
    except _PoolStartFailed as e:
        raise SystemExit(f"kuberft reward eval: the sandbox workers did not start: {e}") from None
    finally:
        for pool in pools.values():
            pool.close()
        if source is not sys.stdin.buffer:
            source.close()
        if out is not sys.stdout:
            out.close()
    seconds = time.monotonic() - began
    evaluated = counts["lines"] - counts["errors"]
    started = f"; sandbox workers started in {counts['start_seconds']:.1f} s" if True in pools else ""
    print(
        f"kuberft reward eval: {counts['lines']} lines, {counts['errors']} errors, {seconds:.1f} s, "
        f"{evaluated / seconds if seconds > 0 else 0.0:.2f} evaluations/s ({evaluated} completions scored{started})",
        file=sys.stderr,
    )
    return 1 if counts["errors"] else 0


async def _run_batch(lines, pool_for, write) -> None:
    """Read BATCH_CHUNK lines, send their completions to the pool, and write each chunk's
    results in input order once they are all in, with BATCH_IN_FLIGHT chunks in the pool."""
    import asyncio
    import itertools
    from collections import deque

    from kuberft_core.reward_protocol import EvaluateRequest

    def submit(window: list[_Line]):
        groups: dict[str, list[_Line]] = {}
        for line in window:
            if line.error is None:
                groups.setdefault(line.key, []).append(line)
        requests = []
        for members in groups.values():
            request = EvaluateRequest(items=[m.item for m in members], rewards=members[0].rewards)
            requests.append((members, asyncio.ensure_future(pool_for(members[0].sandboxed).evaluate(request))))
        return window, requests

    async def finish(window: list[_Line], requests) -> list[_Line]:
        for members, future in requests:
            try:
                response = await future
            except Exception as e:  # noqa: BLE001 - the pool refused or failed this request: its lines say so
                for m in members:
                    m.error = f"line {m.number}: not scored ({type(e).__name__}: {e})"
                continue
            for m, result in zip(members, response.results):
                m.result = result
        return window

    in_flight: deque = deque()
    try:
        while window := list(itertools.islice(lines, BATCH_CHUNK)):
            in_flight.append(submit(window))
            await asyncio.sleep(0)  # the requests reach the pool before the next chunk is read
            if len(in_flight) >= BATCH_IN_FLIGHT:
                write(await finish(*in_flight.popleft()))
        while in_flight:
            write(await finish(*in_flight.popleft()))
    finally:
        for _, requests in in_flight:
            for _, future in requests:
                future.cancel()


def _tasks(args: argparse.Namespace) -> int:
    import ast

    from kuberft_core.kernel_tasks import TaskError, TaskSet

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
