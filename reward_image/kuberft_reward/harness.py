"""What runs inside a sandboxed child: the reference task, a candidate program (for real or
with every kernel turned into a no-op), or a custom reward. Results go to the worker as
frames on the result channel; the worker, never this process, decides what they are worth.

Everything here assumes torch and triton were imported by the worker before the fork."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
import traceback
from typing import Any

from . import channel

GUARD_ELEMENTS = 16384
"""Sentinel elements before and after every input: catches out-of-bounds stores into inputs
and turns unmasked out-of-bounds loads into NaN (the interpreter itself does not trap them)."""

TASK_MODULE = "kuberft_task"
CANDIDATE_MODULE = "kuberft_candidate"


# --------------------------------------------------------------------------- helpers


def describe_error(exc: BaseException, filename: str | None = None) -> str:
    """`Type: message (line N)`, the line being the deepest one in `filename`."""
    line = None
    if filename:
        for frame in traceback.extract_tb(exc.__traceback__):
            if frame.filename == filename:
                line = frame.lineno
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0][:300] if message else ''}".rstrip(": ")
    if len(message) > 1 and "interpreter" in str(exc):
        text += " " + " ".join(m.strip() for m in message[1:3])[:200]
    return f"{text} (line {line})" if line else text


def load_module(name: str, source: str) -> tuple[Any, str]:
    """Import `source` from a file in the private temporary directory (Triton's interpreter
    reads kernel source back from the file). Returns (module, path)."""
    path = os.path.join(os.getcwd(), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module, path


def split_init(init: Any) -> tuple[list, dict]:
    """`get_init_inputs()` as (args, kwargs): KernelBench returns a list of arguments; some
    datasets return an `[args, kwargs]` pair."""
    if isinstance(init, (list, tuple)) and len(init) == 2 and isinstance(init[0], (list, tuple)) and isinstance(init[1], dict):
        return list(init[0]), dict(init[1])
    if isinstance(init, dict):
        return [], dict(init)
    return list(init or []), {}


def _tensors(values: Any):
    import torch

    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _tensors(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from _tensors(v)


def _to(values: Any, device: str) -> Any:
    import torch

    if isinstance(values, torch.Tensor):
        return values.to(device)
    if isinstance(values, (list, tuple)):
        return type(values)(_to(v, device) for v in values)
    return values


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- reference


def _count_elements(module: Any) -> int | None:
    """Elements of the inputs plus parameters of one test case, measured on the meta device."""
    import torch

    try:
        with torch.device("meta"):
            inputs = module.get_inputs()
            args, kwargs = split_init(module.get_init_inputs())
            total = sum(t.numel() for t in _tensors(inputs))
            try:
                model = module.Model(*args, **kwargs)
                total += sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
            except Exception:  # noqa: BLE001 - some models cannot be built on meta; count inputs only
                pass
        return total
    except Exception:  # noqa: BLE001
        return None


def fit_to_budget(module: Any, max_elements: int) -> dict[str, tuple[int, int]]:
    """Shrink the task's module-level integer constants (halving the largest useful one at a
    time) until a test case has at most `max_elements` elements, so that unchanged
    KernelBench problems run on the CPU interpreter. Returns {name: (old, new)}."""
    changed: dict[str, tuple[int, int]] = {}
    total = _count_elements(module)
    if total is None or total <= max_elements:
        return changed
    for _ in range(200):
        constants = sorted(
            ((v, k) for k, v in vars(module).items() if type(v) is int and v >= 2 and not k.startswith("_") and k.isidentifier()),
            reverse=True,
        )
        for value, name in constants:
            setattr(module, name, value // 2)
            smaller = _count_elements(module)
            if smaller is not None and smaller < total:
                changed[name] = (changed.get(name, (value, value))[0], value // 2)
                total = smaller
                break
            setattr(module, name, value)
        else:
            break
        if total <= max_elements:
            break
    return changed


def run_reference(fd: int, task_source: str, plan: dict[str, Any], device: str) -> None:
    """Build the reference `Model` and produce every test case's inputs and outputs."""
    import torch

    module, _ = load_module(TASK_MODULE, task_source)
    for name in ("Model", "get_inputs", "get_init_inputs"):
        if not hasattr(module, name):
            raise ValueError(f"the task does not define {name}")
    defaults = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    shrunk = fit_to_budget(module, plan["max_elements"])
    fitted = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    inits: list[Any] = []
    models: list[Any] = []
    for index, (seed, shape) in enumerate(zip(plan["seeds"], plan["shapes"])):
        for name in defaults:
            setattr(module, name, fitted[name])
        for name, value in (shape or {}).items():
            if name not in defaults:
                raise ValueError(f"shape override {name!r} is not a module-level integer of the task ({', '.join(sorted(defaults))})")
            setattr(module, name, value)
        init = module.get_init_inputs()
        if init in inits:
            init_index = inits.index(init)
        else:
            inits.append(init)
            init_index = len(inits) - 1
            args, kwargs = split_init(init)
            torch.manual_seed(plan["init_seed"])
            models.append(module.Model(*args, **kwargs).to(device).eval())
            spec, payload = channel.encode_values(init)
            channel.send(fd, {"kind": "init", "index": init_index, "args": spec}, payload)
        torch.manual_seed(seed)
        inputs = module.get_inputs()
        pristine = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        with torch.no_grad():
            output = models[init_index](*_to(inputs, device))
        _sync(device)
        spec, payload = channel.encode_values((pristine, output))
        channel.send(fd, {"kind": "case", "index": index, "init": init_index, "values": spec, "shape": shape or {}}, payload)
    if device.startswith("cuda") and plan.get("measure"):
        channel.send(fd, {"kind": "timing", "seconds": _time_forward(models[0], _first_inputs(module, plan, device), device)})
    channel.send(fd, {"kind": "done", "shrunk": {k: list(v) for k, v in shrunk.items()}})


def _first_inputs(module: Any, plan: dict[str, Any], device: str) -> list:
    import torch

    torch.manual_seed(plan["seeds"][0])
    return _to(module.get_inputs(), device)


def _time_forward(model: Any, inputs: list, device: str, reps: int = 20) -> float:
    """Median seconds per forward, measured with CUDA events after warm-up."""
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(*inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(*inputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    times.sort()
    return times[len(times) // 2]


# --------------------------------------------------------------------------- candidate


def _make_noop() -> None:
    """Every Triton kernel launch does nothing from now on."""
    from triton.runtime import jit as jit_module

    def skip(self, *args, **kwargs):
        return None

    jit_module.JITFunction.run = skip
    if interpreter_mode():
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = skip


def _single_config_autotune() -> None:
    """Under the interpreter, `@triton.autotune` cannot benchmark: keep its first config."""
    from triton.runtime.autotuner import Autotuner

    original = Autotuner.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.configs = self.configs[:1]

    Autotuner.__init__ = init


def _guarded(t: Any, keep: list) -> tuple[Any, Any]:
    """A copy of `t` inside a buffer with sentinel zones; returns (tensor, buffer)."""
    import torch

    if not isinstance(t, torch.Tensor) or not t.is_contiguous() or t.numel() == 0:
        return (t.clone() if isinstance(t, torch.Tensor) else t), None
    n = t.numel()
    if t.is_floating_point():
        fill = float("nan")
    elif t.dtype == torch.bool:
        fill = True
    else:
        fill = torch.iinfo(t.dtype).max
    buffer = torch.full((GUARD_ELEMENTS + n + GUARD_ELEMENTS,), fill, dtype=t.dtype, device=t.device)
    view = buffer[GUARD_ELEMENTS : GUARD_ELEMENTS + n].view(t.shape)
    view.copy_(t)
    keep.append(buffer)
    return view, buffer


def _guard_intact(buffer: Any, n: int) -> bool:
    import torch

    zones = torch.cat([buffer[:GUARD_ELEMENTS], buffer[GUARD_ELEMENTS + n :]])
    if zones.is_floating_point():
        return bool(torch.isnan(zones).all())
    if zones.dtype == torch.bool:
        return bool(zones.all())
    return bool((zones == torch.iinfo(zones.dtype).max).all())


def _same_bytes(a: Any, b: Any) -> bool:
    import torch

    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def run_candidate(fd: int, program: str, inits: list, cases: list[dict], plan: dict[str, Any], device: str, noop: bool) -> None:
    """Import the candidate program, build `ModelNew` as the reference was built, and run
    every test case's inputs through it on one instance (outputs cached across calls fail the
    later cases). Sends the outputs and what the candidate did to its inputs."""
    import torch

    if interpreter_mode():
        _single_config_autotune()
    if noop:
        _make_noop()
    try:
        module, path = load_module(CANDIDATE_MODULE, program)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the program's fault
        channel.send(fd, {"kind": "error", "stage": "import", "error": describe_error(e, f"{os.getcwd()}/{CANDIDATE_MODULE}.py")})
        return
    channel.send(fd, {"kind": "stage", "stage": "import"})
    model_class = getattr(module, "ModelNew", None)
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        channel.send(fd, {"kind": "error", "stage": "build", "error": "the program defines no class ModelNew(nn.Module)"})
        return
    models: dict[int, Any] = {}
    alive: list = []
    for case in cases:
        index, init_index = case["index"], case["init"]
        if init_index not in models:
            args, kwargs = split_init(inits[init_index])
            try:
                torch.manual_seed(plan["init_seed"])
                models[init_index] = model_class(*args, **kwargs).to(device)
            except BaseException as e:  # noqa: BLE001
                channel.send(fd, {"kind": "error", "stage": "build", "error": describe_error(e, path)})
                return
        guarded = [_guarded(_to(t, device), alive) for t in case["inputs"]]
        inputs = [g[0] for g in guarded]
        pristine = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        start = time.perf_counter()
        try:
            with torch.no_grad():
                output = models[init_index](*inputs)
            _sync(device)
        except BaseException as e:  # noqa: BLE001
            channel.send(fd, {"kind": "case", "index": index, "error": describe_error(e, path)})
            continue
        seconds = time.perf_counter() - start
        mutated = [i for i, (a, b) in enumerate(zip(inputs, pristine)) if isinstance(a, torch.Tensor) and not _same_bytes(a, b)]
        out_of_bounds = [i for i, (t, buffer) in enumerate(guarded) if buffer is not None and not _guard_intact(buffer, t.numel())]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        aliases = any(o.untyped_storage().data_ptr() in input_storages for o in _tensors(output))
        try:
            spec, payload = channel.encode_values(output)
        except channel.ChannelError as e:
            channel.send(fd, {"kind": "case", "index": index, "error": f"forward returned something that is not tensors: {e}"})
            continue
        alive.append(output)
        channel.send(
            fd,
            {
                "kind": "case", "index": index, "output": spec, "seconds": seconds, "mutated_inputs": mutated,
                "out_of_bounds_inputs": out_of_bounds, "aliases_input": aliases,
            },
            payload,
        )
    if device.startswith("cuda") and plan.get("measure") and 0 in models and cases:
        first = [_to(t, device) for t in cases[0]["inputs"]]
        channel.send(fd, {"kind": "timing", "seconds": _time_forward(models[cases[0]["init"]], first, device)})
    channel.send(fd, {"kind": "done"})


# --------------------------------------------------------------------------- custom rewards


def run_custom(fd: int, function: Any, completion: str, row: dict, args: dict) -> None:
    """Call a custom reward `function(completion, row, args)`; it returns a score in [0, 1]
    or a (score, reason) pair."""
    try:
        value = function(completion, row, args)
    except BaseException as e:  # noqa: BLE001
        channel.send(fd, {"kind": "custom", "error": describe_error(e)})
        return
    reason = ""
    if isinstance(value, tuple) and len(value) == 2:
        value, reason = value
    try:
        score = float(value)
    except (TypeError, ValueError):
        channel.send(fd, {"kind": "custom", "error": f"returned {type(value).__name__}, not a number"})
        return
    if not math.isfinite(score):
        channel.send(fd, {"kind": "custom", "error": f"returned {score}"})
        return
    channel.send(fd, {"kind": "custom", "score": score, "reason": str(reason)[:500]})
