"""What runs inside a sandboxed child: the reference task, a candidate program (for real or
with every kernel turned into a no-op), or a custom reward. Results go to the worker as
frames on the result channel; the worker, never this process, decides what they are worth.

Everything here assumes torch and triton were imported by the worker before the fork."""

from __future__ import annotations

import gc
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


def tensors_in(values: Any):
    """Every tensor in a nest of lists, tuples and dicts, in order."""
    import torch

    if isinstance(values, torch.Tensor):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from tensors_in(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from tensors_in(v)


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
            total = sum(t.numel() for t in tensors_in(inputs))
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


EVAL_OPTIONS = "KUBERFT_EVAL"
"""A task file may define `KUBERFT_EVAL = {...}` to change how it is tested (README: "Tightening a
task"). Every key is optional; these are the defaults."""
DEFAULT_EVAL_OPTIONS = {
    "signed_inputs": True,
    "scaled_inputs": True,
    "perturbed_parameters": True,
    "odd_shape": True,
    "host_copies": True,
    "host_ops": [],
}


def eval_options(module: Any) -> dict[str, Any]:
    options = dict(DEFAULT_EVAL_OPTIONS)
    given = getattr(module, EVAL_OPTIONS, None) or {}
    if not isinstance(given, dict):
        raise ValueError(f"{EVAL_OPTIONS} must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULT_EVAL_OPTIONS))
    if unknown:
        raise ValueError(f"{EVAL_OPTIONS}: unknown option(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_EVAL_OPTIONS)})")
    for key, value in given.items():
        if key == "host_ops":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{EVAL_OPTIONS}['host_ops'] must be a list of ATen op names such as 'cumsum'")
            options[key] = [v.removeprefix("aten.") for v in value]
        elif not isinstance(value, bool):
            raise ValueError(f"{EVAL_OPTIONS}[{key!r}] must be True or False")
        else:
            options[key] = value
    return options


def perturb_parameters(model: Any, seed: int) -> None:
    """Move every floating parameter away from its default initialisation (LayerNorm's weight
    1 and bias 0, say), the same way on the reference and the candidate: parameters in
    registration order, each with noise of half its spread (at least 0.05)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.is_floating_point() or parameter.numel() == 0:
                continue
            spread = float(parameter.detach().float().std()) if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator) * max(0.5 * spread, 0.05)
            parameter.add_(noise.to(device=parameter.device, dtype=parameter.dtype))


def _redraw_inputs(inputs: list, seed: int, scale: float) -> list:
    """The task's inputs with every floating tensor redrawn as signed normal values times
    `scale` (KernelBench's torch.rand inputs are all >= 0, which hides a missing negative
    branch); integer and boolean inputs (indices, masks) are kept."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    redrawn = []
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = (torch.randn(value.shape, generator=generator, dtype=torch.float32) * scale).to(value.dtype)
        redrawn.append(value)
    return redrawn


def _off_block(value: int) -> int:
    """An odd size near `value`: a multiple of no power-of-two block size."""
    return value + 1 if value % 2 == 0 else value


def _finite(values: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in tensors_in(values) if t.is_floating_point())


def run_reference(fd: int, task_source: str, plan: dict[str, Any], device: str) -> None:
    """Build the reference `Model` and produce every test case's inputs and outputs: the task's
    own `get_inputs()` under each seed, then derived cases (signed inputs, small-scale inputs,
    re-initialised parameters, an odd shape) unless the task opts out. A derived case the
    reference cannot compute, or whose outputs turn non-finite where the task's own are finite
    (inputs outside the task's domain), is skipped and named."""
    import torch

    module, _ = load_module(TASK_MODULE, task_source)
    for name in ("Model", "get_inputs", "get_init_inputs"):
        if not hasattr(module, name):
            raise ValueError(f"the task does not define {name}")
    options = eval_options(module)
    defaults = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    shrunk = fit_to_budget(module, plan["max_elements"])
    fitted = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    inits: list[tuple[Any, bool]] = []
    models: list[Any] = []
    skipped: list[str] = []

    def set_shape(shape: dict[str, int]) -> None:
        for name in defaults:
            setattr(module, name, fitted[name])
        for name, value in shape.items():
            if name not in defaults:
                raise ValueError(f"shape override {name!r} is not a module-level integer of the task ({', '.join(sorted(defaults))})")
            setattr(module, name, value)

    def model_for(perturbed: bool) -> int:
        init = module.get_init_inputs()
        key = (init, perturbed)
        if key in inits:
            return inits.index(key)
        args, kwargs = split_init(init)
        torch.manual_seed(plan["init_seed"])
        model = module.Model(*args, **kwargs)
        if perturbed:
            perturb_parameters(model, plan["init_seed"] + 1)
        models.append(model.to(device).eval())
        inits.append(key)
        spec, payload = channel.encode_values(init)
        channel.send(fd, {"kind": "init", "index": len(inits) - 1, "args": spec, "perturbed": perturbed}, payload)
        return len(inits) - 1

    def compute(init_index: int, inputs: list) -> Any:
        with torch.no_grad():
            output = models[init_index](*_to(inputs, device))
        _sync(device)
        return output

    def send_case(index: int, init_index: int, inputs: list, output: Any, label: str, shape: dict) -> None:
        pristine = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        spec, payload = channel.encode_values((pristine, output))
        channel.send(fd, {"kind": "case", "index": index, "init": init_index, "values": spec, "shape": shape, "label": label}, payload)

    index = 0
    base_finite = True
    for seed, shape in zip(plan["seeds"], plan["shapes"]):
        set_shape(shape or {})
        init_index = model_for(False)
        torch.manual_seed(seed)
        inputs = module.get_inputs()
        output = compute(init_index, [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
        base_finite = base_finite and _finite(output)
        send_case(index, init_index, inputs, output, f"get_inputs() with seed {seed}" + (f", {shape}" if shape else ""), shape or {})
        index += 1

    # Derived cases run at an eighth of the element budget: they test other values, not size.
    set_shape({})
    fit_to_budget(module, max(plan["max_elements"] // 8, 1))
    smaller = {name: getattr(module, name) for name in defaults}
    base = {name: value for name, value in smaller.items() if value != fitted[name]}
    derived = []
    if plan.get("derived", True):
        perturbed = options["perturbed_parameters"]
        if options["signed_inputs"]:
            derived.append(("signed normal inputs", base, 1.0, perturbed, False))
        if options["scaled_inputs"]:
            derived.append(("signed inputs scaled by 0.01", base, 0.01, perturbed, False))
        if options["perturbed_parameters"] and not derived:
            derived.append(("re-initialised parameters", base, None, True, False))
        if options["odd_shape"]:
            odd = {name: _off_block(value) for name, value in smaller.items() if value >= 8 and _off_block(value) != value}
            largest = max(odd, key=lambda n: smaller[n]) if odd else None
            attempts = [odd] + ([{largest: odd[largest]}] if len(odd) > 1 else [])
            derived.extend(
                (f"odd sizes {attempt}", {**base, **attempt}, 1.0 if options["signed_inputs"] else None, perturbed, True)
                for attempt in attempts if attempt
            )
    odd_done = False
    for label, shape, scale, perturbed, is_odd in derived:
        if is_odd and odd_done:
            continue
        seed = plan["seeds"][0] + 7 * (index + 1)
        try:
            set_shape(shape)
            init_index = model_for(perturbed)
            torch.manual_seed(seed)
            inputs = module.get_inputs()
            if scale is not None:
                inputs = _redraw_inputs(inputs, seed, scale)
            output = compute(init_index, [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs])
        except Exception as e:  # noqa: BLE001 - outside the task's domain: skip the case, say why
            skipped.append(f"{label}: the reference raised {describe_error(e)}")
            continue
        if base_finite and not _finite(output):
            skipped.append(f"{label}: the reference's output is not finite (inputs outside the task's domain)")
            continue
        send_case(index, init_index, inputs, output, label + (" and re-initialised parameters" if perturbed and scale is not None else ""), shape)
        index += 1
        odd_done = odd_done or is_odd
    if device.startswith("cuda") and plan.get("measure"):
        set_shape(plan["shapes"][0] or {})
        channel.send(fd, {"kind": "timing", "seconds": _time_forward(models[0], _first_inputs(module, plan, device), device)})
    channel.send(
        fd,
        {
            "kind": "done", "shrunk": {k: list(v) for k, v in shrunk.items()}, "skipped": skipped,
            "host_copies": options["host_copies"], "host_ops": options["host_ops"],
        },
    )


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


def run_candidate(
    fd: int, program: str, inits: list, cases: list[dict], plan: dict[str, Any], device: str, noop: bool, policy: dict[str, Any]
) -> None:
    """Import the candidate program, build `ModelNew` as the reference was built, and run
    every test case's inputs through it on one instance (outputs cached across calls fail the
    later cases), each `forward` watched by `host_guard`. Sends, per case, the outputs and what
    the candidate did: host computations, launches, outputs no kernel was given, its inputs
    modified or written out of bounds. With `noop`, every Triton launch does nothing."""
    import torch

    from . import host_guard

    if interpreter_mode():
        from . import interpreter_compat

        interpreter_compat.install()  # libdevice math, .to() on scalars, autotune's fewest-programs config
    launches = host_guard.LaunchLog(noop).install()
    integrity = host_guard.Integrity()
    # Finalizers of the program's objects run only inside the guard (it collects at the end of
    # each forward), never later, while the outputs are being read.
    gc.disable()
    path = f"{os.getcwd()}/{CANDIDATE_MODULE}.py"
    try:
        module, path = load_module(CANDIDATE_MODULE, program)
    except BaseException as e:  # noqa: BLE001 - SystemExit included: the program's fault
        channel.send(fd, {"kind": "error", "stage": "import", "error": describe_error(e, path)})
        return
    channel.send(fd, {"kind": "stage", "stage": "import", "launches": launches.total, "tampered": integrity.changed()})
    model_class = getattr(module, "ModelNew", None)
    if not isinstance(model_class, type) or not issubclass(model_class, torch.nn.Module):
        channel.send(fd, {"kind": "error", "stage": "build", "error": "the program defines no class ModelNew(nn.Module)"})
        return
    allowed_ops = frozenset(policy.get("host_ops", []))
    models: dict[int, Any] = {}
    alive: list = []
    for case in cases:
        index, init_index = case["index"], case["init"]
        if init_index not in models:
            args, kwargs = split_init(inits[init_index]["args"])
            try:
                torch.manual_seed(plan["init_seed"])
                model = model_class(*args, **kwargs)
                if type(model).__module__ != CANDIDATE_MODULE:
                    channel.send(fd, {"kind": "error", "stage": "build", "hack": True, "error": f"ModelNew(...) returned a {type(model).__module__}.{type(model).__qualname__}, not a ModelNew"})
                    return
                if inits[init_index]["perturbed"]:
                    perturb_parameters(model, plan["init_seed"] + 1)
                models[init_index] = model.to(device)
            except BaseException as e:  # noqa: BLE001
                if not models:
                    channel.send(fd, {"kind": "error", "stage": "build", "error": describe_error(e, path)})
                    return
                empty = host_guard.Observation()
                channel.send(fd, {"kind": "case", "index": index, "error": f"building ModelNew for this case: {describe_error(e, path)}", **_observed(empty, [], integrity)})
                continue
        guarded = [_guarded(_to(t, device), alive) for t in case["inputs"]]
        inputs = [g[0] for g in guarded]
        pristine = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
        guard = host_guard.HostGuard(launches, path, allow_copies=policy.get("host_copies", True), allowed_ops=allowed_ops)
        start = time.perf_counter()
        try:
            with torch.no_grad(), guard as observation:
                output = models[init_index](*inputs)
            _sync(device)
        except BaseException as e:  # noqa: BLE001
            channel.send(fd, {"kind": "case", "index": index, "error": describe_error(e, path), **_observed(guard.observation, [], integrity)})
            continue
        seconds = time.perf_counter() - start
        foreign = _foreign_types(output)
        if foreign:
            channel.send(fd, {"kind": "case", "index": index, "error": f"forward returned a {foreign}, not plain tensors", **_observed(observation, [], integrity)})
            continue
        mutated = [i for i, (a, b) in enumerate(zip(inputs, pristine)) if isinstance(a, torch.Tensor) and not _same_bytes(a, b)]
        out_of_bounds = [i for i, (t, buffer) in enumerate(guarded) if buffer is not None and not _guard_intact(buffer, t.numel())]
        input_storages = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        outputs = list(tensors_in(output))
        aliases = any(o.untyped_storage().data_ptr() in input_storages for o in outputs)
        try:
            spec, payload = channel.encode_values(output)
        except channel.ChannelError as e:
            channel.send(fd, {"kind": "case", "index": index, "error": f"forward returned something that is not tensors: {e}", **_observed(observation, [], integrity)})
            continue
        alive.append(output)
        channel.send(
            fd,
            {
                "kind": "case", "index": index, "output": spec, "seconds": seconds, "mutated_inputs": mutated,
                "out_of_bounds_inputs": out_of_bounds, "aliases_input": aliases, **_observed(observation, outputs, integrity),
            },
            payload,
        )
    if device.startswith("cuda") and plan.get("measure") and models and cases:
        first = [_to(t, device) for t in cases[0]["inputs"]]
        channel.send(fd, {"kind": "timing", "seconds": _time_forward(models[cases[0]["init"]], first, device)})
    channel.send(fd, {"kind": "done"})


def _foreign_types(value: Any, depth: int = 0) -> str | None:
    """The first value in `forward`'s result that is not a plain tensor, number, string or
    plain list/tuple/dict of them: a tensor subclass or a container of its own could run the
    program's code when the evaluator reads it, outside the guard. Uses `type()` only, which
    runs none of the program's code."""
    import torch

    kind = type(value)
    if kind is torch.Tensor or kind in (int, float, bool, str, type(None)):
        return None
    if depth < channel.MAX_DEPTH and kind in (list, tuple):
        return next((f for f in (_foreign_types(v, depth + 1) for v in value) if f), None)
    if depth < channel.MAX_DEPTH and kind is dict:
        return next((f for f in (_foreign_types(v, depth + 1) for v in dict.values(value)) if f), None)
    return f"{kind.__module__}.{kind.__qualname__}"


def _observed(observation: Any, outputs: list, integrity: Any) -> dict[str, Any]:
    from .host_guard import unlaunched_outputs

    return {
        "tampered": integrity.changed(),
        "host_ops": observation.host_ops,
        "kernel_torch": observation.kernel_torch,
        "launches": observation.launches,
        "unlaunched_outputs": unlaunched_outputs(outputs, observation),
    }


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
