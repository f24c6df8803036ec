"""`RewardPool`: scores completions in-process, with the same semantics as the HTTP endpoint
(the server is a thin layer over it).

    with RewardPool(workers=2) as pool:
        response = pool.evaluate_sync(EvaluateRequest(items=[...], rewards=[...]))

Text rewards and `triton.format` are computed here, in the caller's process: they read the
completion and run none of it. Everything that executes model code (`triton.compile`,
`triton.correctness`, `triton.speed`, custom rewards) goes to a queue served by pre-started
worker processes (`worker.py`), each forking a sandboxed child per run. A worker that dies is
replaced; a completion can make its own evaluation fail, never the pool.

The pool runs its own event loop in a background thread, so `evaluate` can be awaited from
any event loop and `evaluate_sync` called from plain code.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kuberft_core import kernel_tasks
from kuberft_core.api import SandboxSpec
from kuberft_core.metrics import component_metrics
from kuberft_core.reward_protocol import EvaluateRequest, EvaluateResponse, ItemResult, Outcome, RewardResult

from . import rewards
from .schema import SandboxLimits, WorkerAnswer, WorkerJob, WorkerReward, WorkerTask

WORKER_START_TIMEOUT = 600.0
REDACTED = "[redacted]"


class PoolBusy(RuntimeError):
    """The queue is full: retry later (HTTP 429)."""


class PoolClosed(RuntimeError):
    """The pool is not running."""


@dataclass
class _ItemState:
    """One request item while its rewards are computed."""

    results: dict[str, RewardResult] = field(default_factory=dict)
    hacked: bool = False
    jobs: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Worker:
    process: asyncio.subprocess.Process
    hello: dict[str, Any]
    jobs_done: int = 0


def _worker_environment(device: str) -> dict[str, str]:
    """Workers start from a clean environment: nothing of the caller's (tokens, cloud
    credentials) is ever in a process that forks untrusted code."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
        "KUBERFT_DEVICE": device,
    }
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    for name in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "TRITON_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    # the package must be importable the same way in the worker as here
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _detect_device() -> str:
    """`cuda` when an NVIDIA GPU is visible (checked without importing torch), else `cpu`."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    return "cuda" if Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists() else "cpu"


class RewardPool:
    """A pool of sandbox workers plus the rewards that need none.

    workers: pre-started sandbox worker processes (about one per CPU core); 0 serves only the
      rewards that run no model code.
    sandbox: time and memory limits per evaluation (`RFTJob.spec.rewardPool.sandbox`).
    tasks_dir: extra kernel tasks, found by id before the shipped ones.
    max_queue: evaluations waiting for a worker before `evaluate` raises PoolBusy.
    device: `cpu` (Triton interpreter), `cuda`, or `auto`.
    """

    def __init__(
        self,
        workers: int,
        sandbox: SandboxSpec | None = None,
        tasks_dir: Path | None = None,
        *,
        max_queue: int = 1024,
        device: str = "auto",
    ):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
        self.num_workers = workers
        self.sandbox = sandbox or SandboxSpec()
        self.tasks = kernel_tasks.TaskSet([Path(tasks_dir)] if tasks_dir else None)
        self.max_queue = max_queue
        self.device = _detect_device() if device == "auto" else device
        self.metrics = component_metrics("reward")
        self._secrets = sorted({v for v in os.environ.values() if len(v) >= 8}, key=len, reverse=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._queue: asyncio.Queue | None = None
        self._workers: list[_Worker | None] = []
        self._servers: list[asyncio.Task] = []
        self._busy = 0
        self._waiting = 0
        self._next_id = 0
        self._closing = False
        self.replaced_workers = 0
        self.hello: dict[str, Any] = {}

    @classmethod
    def for_job(cls, spec) -> "RewardPool":
        """The in-process pool a local run of an `RFTJobSpec` needs: its sandbox settings, and
        sandbox workers only when one of its rewards runs model code."""
        kinds = [reward.kind for reward in spec.rewards]
        workers = spec.reward_pool.workers if rewards.needs_sandbox(kinds) else 0
        return cls(workers, spec.reward_pool.sandbox, max_queue=spec.reward_pool.max_queue)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "RewardPool":
        """Start the workers and wait until each has imported torch and triton."""
        if self._thread is not None:
            return self
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kuberft-reward-pool", daemon=True)
        self._thread.start()
        try:
            self._call(self._start_workers()).result()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the workers (and their children) and the pool's thread."""
        if self._thread is None:
            return
        self._closing = True
        try:
            self._call(self._stop_workers()).result(timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._thread = None
            self._loop = None

    def __enter__(self) -> "RewardPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "RewardPool":
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)

    def _call(self, coroutine) -> Future:
        if self._loop is None:
            coroutine.close()
            raise PoolClosed("the reward pool is not started (call start() or use it as a context manager)")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _start_workers(self) -> None:
        self._queue = asyncio.Queue()
        self._workers = [None] * self.num_workers
        started = await asyncio.gather(*(self._spawn(i) for i in range(self.num_workers)))
        if started:
            self.hello = started[0].hello
        self._servers = [asyncio.create_task(self._serve(i)) for i in range(self.num_workers)]
        self.metrics.workers.set(self.num_workers)

    async def _stop_workers(self) -> None:
        for task in self._servers:
            task.cancel()
        for task in self._servers:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        self._servers = []
        await asyncio.gather(*(self._terminate(w) for w in self._workers if w is not None))
        self._workers = []
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(PoolClosed("the reward pool was closed"))
        self.metrics.workers.set(0)

    async def _spawn(self, slot: int) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kuberft_reward.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_worker_environment(self.device),
            cwd="/",
            limit=64 << 20,
            start_new_session=True,
        )
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=WORKER_START_TIMEOUT)
        except asyncio.TimeoutError:
            line = b""
        hello = json.loads(line) if line.strip() else {"ready": False, "error": "the worker exited during start-up"}
        if not hello.get("ready"):
            await self._terminate(_Worker(process, hello))
            raise RuntimeError(f"reward worker {slot} failed to start: {hello.get('error')}")
        worker = _Worker(process, hello)
        self._workers[slot] = worker
        return worker

    @staticmethod
    async def _terminate(worker: _Worker) -> None:
        process = worker.process
        if process.returncode is None:
            try:
                process.stdin.close()
                await asyncio.wait_for(process.wait(), timeout=5)
            except (asyncio.TimeoutError, BrokenPipeError, ConnectionResetError):
                pass
        if process.returncode is None:
            try:
                os.killpg(process.pid, 9)
            except ProcessLookupError:
                pass
            await process.wait()

    # ------------------------------------------------------------------ workers

    async def _serve(self, slot: int) -> None:
        """Feed one worker from the queue, replacing it when it dies."""
        while True:
            job, future = await self._queue.get()
            self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
            if future.cancelled():
                continue
            self._busy += 1
            self.metrics.busy_workers.set(self._busy)
            try:
                answer = await self._run_on(slot, job)
            finally:
                self._busy -= 1
                self.metrics.busy_workers.set(self._busy)
            if not future.done():
                future.set_result(answer)

    async def _run_on(self, slot: int, job: WorkerJob) -> WorkerAnswer:
        worker = self._workers[slot]
        try:
            if worker is None or worker.process.returncode is not None:
                worker = await self._spawn(slot)
            worker.process.stdin.write((job.model_dump_json() + "\n").encode())
            await worker.process.stdin.drain()
            # the worker enforces every child's limits; this only guards against a stuck worker
            backstop = 4 * job.limits.wall_seconds + 60
            line = await asyncio.wait_for(worker.process.stdout.readline(), timeout=backstop)
            if not line:
                raise ConnectionError("the worker exited")
            answer = WorkerAnswer.model_validate_json(line)
            worker.jobs_done += 1
            if answer.retire:  # its sandbox set-up is damaged: a fresh worker takes its place
                self.replaced_workers += 1
                await self._terminate(worker)
                self._workers[slot] = None
                if not self._closing:
                    await self._spawn(slot)
            return answer
        except (ConnectionError, BrokenPipeError, asyncio.TimeoutError, ValidationError, RuntimeError) as e:
            self.metrics.crashes.inc()
            if worker is not None:
                await self._terminate(worker)
            self._workers[slot] = None
            if not self._closing:
                try:
                    await self._spawn(slot)
                except RuntimeError:
                    pass  # retried on the next job
            self.replaced_workers += 1
            # The worker runs no untrusted code, but a completion is the likeliest cause of its
            # death during that completion's evaluation: a verdict (crash, scored 0), not an
            # error the trainer would leave out.
            what = "stopped answering" if isinstance(e, asyncio.TimeoutError) else f"died ({type(e).__name__}: {e})"
            return WorkerAnswer.everyone(job, Outcome.CRASH, f"the sandbox worker {what} during this evaluation; it was replaced")

    def _submit(self, job: WorkerJob) -> asyncio.Future:
        future = self._loop.create_future()
        self._next_id += 1
        job.id = self._next_id
        self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._queue.put_nowait((job, future))
        return future

    # ------------------------------------------------------------------ evaluation

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        """Score every item of the request with every reward (from any event loop)."""
        return await asyncio.wrap_future(self._call(self._evaluate(request)))

    def evaluate_sync(self, request: EvaluateRequest) -> EvaluateResponse:
        return self._call(self._evaluate(request)).result()

    def health(self) -> dict[str, Any]:
        alive = sum(1 for w in self._workers if w is not None and w.process.returncode is None)
        return {
            "status": "ok" if self._loop is not None and alive == self.num_workers else "degraded",
            "workers": self.num_workers,
            "alive_workers": alive,
            "replaced_workers": self.replaced_workers,
            "busy_workers": self._busy,
            "queue_depth": self._waiting,
            "max_queue": self.max_queue,
            "device": self.device,
            "isolation": self.hello.get("isolation", {}),
            "versions": self.hello.get("versions", {}),
            "sandbox": self.sandbox.to_wire(),
        }

    def _limits(self) -> SandboxLimits:
        spec = self.sandbox
        return SandboxLimits(
            wall_seconds=float(spec.timeout_seconds),
            cpu_seconds=int(spec.timeout_seconds),
            memory_bytes=None if self.device == "cuda" else spec.memory_mi_b << 20,
            allow_processes=self.device == "cuda",
        )

    async def _evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        plans = rewards.plan_rewards(request.rewards)
        sandboxed_triton = [p for p in plans if p.kind in rewards.TRITON_SANDBOX_KINDS]
        customs = [p for p in plans if p.kind == "custom"]
        needs_task = any(p.kind in rewards.TRITON_KINDS for p in plans)
        if (sandboxed_triton or customs) and self.num_workers == 0:
            raise rewards.RequestError(
                "rewards: " + ", ".join(p.name for p in sandboxed_triton + customs) + " run model code, and this pool has no sandbox workers"
            )
        items: list[_ItemState] = []
        jobs: dict[str, WorkerJob] = {}
        for index, item in enumerate(request.items):
            state = _ItemState()
            items.append(state)
            task_source = None
            task_error = None
            if needs_task:
                try:
                    task_source = self._task_source(item, index)
                except kernel_tasks.TaskError as e:
                    task_error = str(e)
            local_start = time.monotonic()
            for plan in plans:
                if plan.kind in rewards.TEXT_REWARDS:
                    state.results[plan.name] = rewards.text_reward(plan, item.completion, item.row)
                elif plan.kind in rewards.TRITON_KINDS and task_error:
                    state.results[plan.name] = RewardResult.of(0.0, Outcome.ERROR, task_error)
                elif plan.kind == "triton.format":
                    verdict, _ = rewards.format_reward(item.completion, task_source, plan.args["tag"])
                    state.results[plan.name] = verdict
                    state.hacked = state.hacked or verdict.outcome is Outcome.HACKED
            state.seconds = time.monotonic() - local_start
            if sandboxed_triton and not task_error:
                job = WorkerJob(
                    type="kernel",
                    completion=item.completion,
                    task=WorkerTask(name=item.task.name if item.task else item.row.get("task"), source=task_source),
                    rewards=[WorkerReward(name=p.name, kind=p.kind, args=p.args) for p in sandboxed_triton],
                    limits=self._limits(),
                )
                state.jobs.append(self._dedup(jobs, job))
            if customs:
                job = WorkerJob(
                    type="custom",
                    completion=item.completion,
                    row=item.row,
                    rewards=[WorkerReward(name=p.name, kind=p.kind, module=p.module, args=p.args) for p in customs],
                    limits=self._limits(),
                )
                state.jobs.append(self._dedup(jobs, job))

        if jobs and self._waiting + len(jobs) > self.max_queue:
            raise PoolBusy(f"the queue is full ({self._waiting} evaluations waiting, at most {self.max_queue}); retry later")
        futures = {key: self._submit(job) for key, job in jobs.items()}
        if futures:
            await asyncio.gather(*futures.values())

        results = []
        for state in items:
            for key in state.jobs:
                answer: WorkerAnswer = futures[key].result()
                state.seconds += answer.seconds
                state.results.update(answer.rewards)
                state.hacked = state.hacked or answer.hacked
                if answer.timeouts:
                    self.metrics.timeouts.inc(answer.timeouts)
                if answer.crashes:
                    self.metrics.crashes.inc(answer.crashes)
            if state.hacked:  # a flagged completion gets nothing from any triton reward
                hack_reason = next((r.reason for r in state.results.values() if r.outcome is Outcome.HACKED), "flagged as reward hacking")
                for plan in plans:
                    if plan.kind in rewards.TRITON_KINDS and state.results[plan.name].outcome is not Outcome.HACKED:
                        state.results[plan.name] = RewardResult.of(0.0, Outcome.HACKED, hack_reason)
            reward_results = {}
            for plan in plans:
                result = state.results[plan.name]
                reward_results[plan.name] = result.model_copy(update={"reason": self._redact(result.reason)})
                self.metrics.evaluations.labels(reward=plan.name, outcome=result.outcome.value).inc()
                if result.outcome is Outcome.HACKED:
                    self.metrics.hacks_detected.labels(reward=plan.name).inc()
            self.metrics.evaluation_seconds.observe(state.seconds)
            results.append(ItemResult(rewards=reward_results, hacked=state.hacked, seconds=round(state.seconds, 4)))
        return EvaluateResponse(results=results)

    @staticmethod
    def _dedup(jobs: dict[str, WorkerJob], job: WorkerJob) -> str:
        """Identical completions in a batch (common in GRPO groups) are evaluated once."""
        key = hashlib.sha256(job.model_dump_json().encode()).hexdigest()
        jobs.setdefault(key, job)
        return key

    def _task_source(self, item, index: int) -> str:
        if item.task is not None:
            kernel_tasks.check_task_source(item.task.source, f"items[{index}].task.source")
            return item.task.source
        task_id = item.row.get("task")
        if task_id is None:
            raise kernel_tasks.TaskError(f"items[{index}].row.task: missing (a kernel reward needs a task id in the row or an inline task)")
        try:
            return self.tasks.get(task_id).source
        except kernel_tasks.TaskError as e:
            raise kernel_tasks.TaskError(f"items[{index}].row.task: {e}") from None

    def _redact(self, text: str) -> str:
        """Defence in depth: no value of this process's environment (tokens, keys) appears in
        a reason, whatever the untrusted code printed or raised."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text
