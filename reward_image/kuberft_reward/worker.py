"""A pre-started sandbox worker: `python -m kuberft_reward.worker`, spawned by the pool with a
scrubbed environment. It imports torch and triton once, warms them up, probes which isolation
the machine allows, then answers jobs read as JSON lines on stdin with JSON lines on stdout.
Every sandboxed child is forked by the worker's zygote (`zygote.py`), started before any job:
the worker keeps the reference outputs and decides every verdict, and no child is ever forked
from it, so no child can find them. The worker itself runs no untrusted code. When its
zygote or the sandbox set-up is damaged, it answers the job and exits (`retire`), and the
pool starts a fresh worker."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from kuberft_core.reward_protocol import Outcome, RewardResult

from .schema import WorkerAnswer, WorkerJob


def _warm_up(device: str) -> dict[str, str]:
    """Import and exercise everything a child needs, so no child pays for it (and so nothing
    lazily reads /proc, which the children cannot see)."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    torch.set_num_threads(1)
    # Uninitialised memory (torch.empty) comes back filled with NaN / the largest integer in
    # every child: a kernel that does not write its output cannot pass by finding the
    # reference's result in recycled memory. (The public torch.use_deterministic_algorithms
    # also imports the inductor, about 900 modules, for nothing here.)
    torch._C._set_deterministic_algorithms(True, warn_only=True)

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(x_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)

    if device == "cpu":  # on a GPU the worker must not initialise CUDA: its forked children could not use it
        x = torch.zeros(100)
        _add_one[(1,)](x, 100, BLOCK=128)
        if float(x.sum()) != 100.0:
            raise RuntimeError("the Triton warm-up kernel computed a wrong result")
    (torch.randn(8, 8) @ torch.randn(8, 8)).softmax(-1)
    with torch.device("meta"):  # task sizes are measured on the meta device; its first use imports ~500 modules
        torch.nn.Linear(2, 2)(torch.randn(2, 2))
    torch.broadcast_shapes((2, 1), (1, 3))  # its first call imports sympy (5-8 s): not in a child's time limit
    import triton.runtime.autotuner  # noqa: F401 - used by the children

    # Everything a child runs is imported here, once: a child would pay for it on every run, and
    # its private root shows only what is already on sys.path.
    from . import channel, harness, host_guard, interpreter_compat, program  # noqa: F401

    program._triton_modules()  # the libdevice modules, for the children's kernels too
    if device == "cpu":
        interpreter_compat.install()  # once here, inherited by every child

    return {"torch": torch.__version__, "triton": triton.__version__, "numpy": numpy.__version__}


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (ours or a library's) must not corrupt the protocol
    sys.stdout = sys.stderr
    device = os.environ.get("KUBERFT_DEVICE", "cpu")
    started = time.monotonic()
    try:
        versions = _warm_up(device)
        from .kernel_eval import KernelEvaluator
        from .sandbox import probe_isolation

        isolation = probe_isolation()
    except Exception as e:  # noqa: BLE001 - reported to the pool, which marks the worker failed
        protocol.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    base_memory = _vm_size()
    from .kernel_eval import SandboxDamaged
    from .zygote import Zygote, ZygoteFailed

    zygote = Zygote(isolation, device)
    evaluator = KernelEvaluator(zygote, device)
    protocol.write(
        json.dumps(
            {
                "ready": True,
                "isolation": isolation.as_dict(),
                "device": device,
                "versions": versions,
                "base_memory_bytes": base_memory,
                "startup_seconds": round(time.monotonic() - started, 3),
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        job = WorkerJob.model_validate_json(line)
        start = time.monotonic()
        retire = False
        try:
            _fit_memory_limit(job, base_memory)
            answer = evaluator.evaluate(job) if job.type == "kernel" else _custom(job, zygote)
        except (ZygoteFailed, SandboxDamaged) as e:
            # Not the completion's fault (a child cannot reach the zygote or change its limits):
            # say so, and let the pool replace this worker with a fresh one.
            retire = True
            answer = WorkerAnswer.everyone(job, Outcome.ERROR, f"the sandbox worker's set-up is damaged ({e}); the worker is replaced")
        except Exception as e:  # noqa: BLE001 - a worker bug must not take the worker down
            traceback.print_exc()
            answer = WorkerAnswer.everyone(job, Outcome.ERROR, f"evaluator error: {type(e).__name__}: {e}")
        answer.id = job.id
        answer.retire = retire
        answer.seconds = time.monotonic() - start
        answer.max_rss_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        protocol.write(answer.model_dump_json() + "\n")
        if retire:
            break
    zygote.close()
    return 0


def _fit_memory_limit(job: WorkerJob, base_memory: int) -> None:
    """The children start with the worker's address space (torch and triton take ~3 GiB of
    it); a limit below that plus some room would fail every evaluation, so raise it."""
    if job.limits.memory_bytes is not None:
        job.limits.memory_bytes = max(job.limits.memory_bytes, base_memory + (512 << 20))


def _custom(job: WorkerJob, zygote) -> WorkerAnswer:
    from . import channel
    from .kernel_eval import _describe_child_end
    from .sandbox import Limits
    from .zygote import RunRefused

    limits = Limits(**job.limits.model_dump())
    results = {}
    for reward in job.rewards:
        path = reward.module
        header = {"kind": "custom", "module": path, "completion": job.completion, "row": job.row, "args": reward.args}
        try:
            run = zygote.run(header, b"", limits)
        except RunRefused as e:
            results[reward.name] = RewardResult.of(0.0, Outcome.ERROR, f"cannot load custom reward {path}: {e}")
            continue
        try:
            frames, _ = channel.read_frames(run.result)
        except channel.ChannelError:
            frames = []
        answer = next((h for h, _ in frames if h.get("kind") == "custom"), None)
        if answer is None:
            outcome, reason = _describe_child_end(run, limits)
            results[reward.name] = RewardResult.of(0.0, outcome, f"custom reward {path}: {reason}")
        elif "error" in answer:
            results[reward.name] = RewardResult.of(0.0, Outcome.ERROR, f"custom reward {path} raised {answer['error']}")
        else:
            score = float(answer["score"])
            if not 0.0 <= score <= 1.0:
                results[reward.name] = RewardResult.of(0.0, Outcome.ERROR, f"custom reward {path} returned {score}, outside [0, 1]")
            else:
                results[reward.name] = RewardResult.of(score, Outcome.OK, str(answer.get("reason", "")))
    return WorkerAnswer(rewards=results)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown (triton's bindings print leak reports at exit)
