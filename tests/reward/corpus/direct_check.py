"""Check the kernel corpus directly, outside the sandbox and the evaluator: every correct
program must match its task's reference, and every wrong mutation must not, on inputs the
evaluator's default test cases may never produce.

Each program runs under the Triton CPU interpreter (TRITON_INTERPRET=1, with the shims of
kuberft_reward.interpreter_compat installed) on five variants of its task:

    default  the task as written (KernelBench inputs, default parameter init, default sizes)
    signed   floating-point inputs replaced by torch.randn (signed, some |x| > 1)
    params   every floating-point parameter and buffer re-drawn (randn * 0.5 + 0.25)
    odd      every even module-level integer constant of the task increased by 3
    all      signed + params + odd

Usage: TRITON_INTERPRET=1 python tests/reward/corpus/direct_check.py [program names...]
prints one line per program file and a JSON summary after MARKER."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import select
import sys
import time
import traceback
from pathlib import Path

CORPUS = Path(__file__).resolve().parent
MARKER = "DIRECT-CHECK "
VARIANTS = ("default", "signed", "params", "odd", "all")
TOLERANCE = {"float32": 1e-4, "float64": 1e-7, "float16": 1e-2, "bfloat16": 2e-2}
GUARD = 4096
INIT_SEED = 42
INPUT_SEED = 1234


def entries(names: list[str] | None = None) -> list[dict]:
    """[{program, kind, name, task, path, caught_by}] for every program file of the corpus."""
    found = []
    for folder in sorted(p for p in CORPUS.iterdir() if (p / "task.py").is_file()):
        if names and folder.name not in names:
            continue
        for path in sorted(folder.glob("*.py")):
            if path.name == "task.py":
                continue
            kind = "correct" if path.name == "correct.py" else "wrong"
            caught_by = ""
            if kind == "wrong":
                for line in path.read_text().splitlines()[:3]:
                    if line.startswith("# Caught by:"):
                        caught_by = line.split(":", 1)[1].strip()
            found.append({
                "program": folder.name, "kind": kind, "name": f"{folder.name}/{path.stem}",
                "task": str(folder / "task.py"), "path": str(path), "caught_by": caught_by,
            })
    return found


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _split_init(init):
    if isinstance(init, (list, tuple)) and len(init) == 2 and isinstance(init[0], (list, tuple)) and isinstance(init[1], dict):
        return list(init[0]), dict(init[1])
    return list(init or []), {}


def _guarded(t, keep):
    """A copy of `t` inside a buffer poisoned with NaN (or the largest integer) on both sides,
    as the evaluator does: unmasked out-of-bounds loads read the poison."""
    import torch

    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point():
        fill = float("nan")
    elif t.dtype == torch.bool:
        fill = True
    else:
        fill = torch.iinfo(t.dtype).max
    buffer = torch.full((GUARD + t.numel() + GUARD,), fill, dtype=t.dtype)
    view = buffer[GUARD:GUARD + t.numel()].view(t.shape)
    view.copy_(t.contiguous())
    keep.append(buffer)
    return view


def _compare(got, want) -> str:
    """'' when `got` matches `want` as the evaluator compares, else why not."""
    import torch

    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"returned {type(got).__name__}, expected {len(want)} outputs"
        for i, (g, w) in enumerate(zip(got, want)):
            why = _compare(g, w)
            if why:
                return f"output {i}: {why}"
        return ""
    if not isinstance(got, torch.Tensor):
        return f"returned {type(got).__name__}"
    if tuple(got.shape) != tuple(want.shape):
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if not want.is_floating_point():
        return "" if torch.equal(got, want) else f"{int((got != want).sum())} elements differ"
    tol = TOLERANCE.get(str(want.dtype).removeprefix("torch."), 0.0)
    g, w = got.double(), want.double()
    diff = (g - w).abs().nan_to_num(nan=math.inf)
    bad = (torch.isnan(g) != torch.isnan(w)) | ((diff > tol + tol * w.abs()) & ~(torch.isnan(g) & torch.isnan(w)))
    if not bool(bad.any()):
        return ""
    finite = diff[~torch.isnan(w)]
    worst = float(finite.max()) if finite.numel() else math.inf
    return f"{int(bad.sum())} of {bad.numel()} elements differ (max abs error {worst:.3g})"


def run_variant(entry: dict, variant: str, tag: str) -> str:
    """'ok', or what went wrong, for one program on one variant of its task."""
    import torch

    task = _load(f"corpus_task_{tag}", entry["task"])
    signed = variant in ("signed", "all")
    params = variant in ("params", "all")
    odd = variant in ("odd", "all")
    if odd:
        for key, value in list(vars(task).items()):
            if type(value) is int and value >= 2 and not key.startswith("_") and value % 2 == 0:
                setattr(task, key, value + 3)
    args, kwargs = _split_init(task.get_init_inputs())
    torch.manual_seed(INIT_SEED)
    model = task.Model(*args, **kwargs).eval()
    if params:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.5 + 0.25)
    torch.manual_seed(INPUT_SEED)
    inputs = task.get_inputs()
    if signed:
        generator = torch.Generator().manual_seed(11)
        inputs = [
            torch.randn(t.shape, generator=generator).to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in inputs
        ]
    with torch.no_grad():
        expected = model(*[t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
    # uninitialised memory is garbage, not a stale copy of the answer: recycle poisoned blocks
    for t in [*inputs, *(expected if isinstance(expected, (list, tuple)) else [expected])]:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            for _ in range(3):
                torch.full(t.shape, float("nan"), dtype=t.dtype)
    program = _load(f"corpus_program_{tag}", entry["path"])
    torch.manual_seed(INIT_SEED)
    candidate = program.ModelNew(*args, **kwargs)
    candidate.load_state_dict(model.state_dict())
    keep: list = []
    guarded = [_guarded(t, keep) for t in inputs]
    try:
        with torch.no_grad():
            got = candidate(*guarded)
    except Exception as e:  # noqa: BLE001
        return f"raised {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    why = _compare(got, expected)
    return "ok" if not why else why


def _child(entry: dict, fd: int) -> None:
    results = {}
    for i, variant in enumerate(VARIANTS):
        tag = f"{os.getpid()}_{i}"
        try:
            results[variant] = run_variant(entry, variant, tag)
        except Exception as e:  # noqa: BLE001 - a task or harness problem: report it
            results[variant] = f"check failed: {type(e).__name__}: {e} {traceback.format_exc(limit=2)[-300:]}"
    os.write(fd, json.dumps(results).encode())


def check(entry: dict, timeout: float = 120.0) -> dict:
    """Every variant of one program file, in a forked child (a crash or hang stays there)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_end)
        code = 0
        try:
            _child(entry, write_end)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, 9)
            break
        data = os.read(read_end, 1 << 16)
        if not data:
            break
        chunks.append(data)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    try:
        return json.loads(b"".join(chunks).decode())
    except ValueError:
        how = f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit status {os.WEXITSTATUS(status)}"
        return {variant: f"crashed ({how})" for variant in VARIANTS}


EXPECTED_CATCH = {
    # `Caught by:` header -> the variant that must catch the mutation, given `default` does not
    "signed inputs": "signed",
    "re-initialised parameters": "params",
    "odd-sized shapes": "odd",
}


def verdict(entry: dict, results: dict) -> str:
    """'' when the program behaves as the corpus says it does, else the problem."""
    if entry["kind"] == "correct":
        bad = {v: r for v, r in results.items() if r != "ok"}
        return "" if not bad else f"correct program fails: {bad}"
    if results.get("all") == "ok":
        return "mutation is not wrong even on signed inputs, new parameters and odd sizes"
    caught_by = entry["caught_by"]
    if caught_by == "any inputs":
        return "" if results.get("default") != "ok" else "declared 'any inputs' but the default task does not catch it"
    for header, variant in EXPECTED_CATCH.items():
        if caught_by.startswith(header):
            if results.get("default") != "ok":
                return f"declared '{caught_by}' but the default task already catches it: {results.get('default')}"
            if results.get(variant) == "ok":
                return f"declared '{caught_by}' but the {variant} variant does not catch it"
            return ""
    return f"unknown 'Caught by' header {caught_by!r}"


def main(names: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    sys.path.insert(0, str(CORPUS.parents[2] / "reward_image"))
    import torch  # noqa: F401 - loaded once, before the children fork
    import triton  # noqa: F401

    from kuberft_reward import interpreter_compat

    interpreter_compat.install()
    torch.set_num_threads(1)
    summary = {}
    for entry in entries(names or None):
        start = time.monotonic()
        results = check(entry)
        problem = verdict(entry, results)
        summary[entry["name"]] = {"results": results, "problem": problem, "caught_by": entry["caught_by"]}
        print(f"{entry['name']:45s} {time.monotonic() - start:5.1f}s {'OK ' if not problem else 'BAD'} {problem or ''}", flush=True)
        if problem:
            print("    " + json.dumps(results), flush=True)
    print(MARKER + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
