""""The kernel did the work", checked while the candidate's `forward` runs (in the sandboxed child).

Three observations, none of them based on the names the program uses:

- `HostGuard` watches every torch operation (a dispatch mode sees each ATen op, a function mode
  sees reads of tensor values into Python) while `forward` runs. Outside a Triton launch, only
  allocation, views and metadata are allowed, plus same-value copies (`clone`, `contiguous`,
  dtype casts, `cat`) unless the task forbids them, plus the ops a task explicitly allows. Any
  other op — `x.relu()`, `a + b`, `torch.Tensor.softmax(x)`, an alias of `torch.matmul`, a
  submodule's `forward` — is host compute. Inside a launch, torch used by Triton's own
  interpreter is fine; torch called from the program's code (a kernel body under the CPU
  interpreter, which the real compiler would refuse) is host compute too.
- `LaunchLog` wraps the one function every Triton launch goes through (`JITFunction.run`, and
  the interpreter's `InterpretedFunction.run`), counting launches and recording the storages
  the kernels were given: an output no kernel was given cannot have been written by a kernel.
  The same wrapper turns every launch into a no-op for the evaluator's re-run, so nothing the
  program can look at (a name, a type) changes between the two runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATION_OPS = frozenset(
    {
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "new_zeros",
        "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "fill_", "zero_", "arange", "scalar_tensor",
        "lift_fresh", "lift_fresh_copy", "lift", "rand", "randn", "randint", "rand_like", "randn_like", "randint_like",
        "normal_", "uniform_", "resize_", "detach", "alias", "resolve_conj", "resolve_neg", "record_stream", "set_",
    }
)
"""Allocation and initialisation: never the task's math."""

VIEW_OPS = frozenset(
    {
        "view", "_unsafe_view", "reshape", "view_as", "expand", "expand_as", "permute", "transpose", "t", "squeeze",
        "unsqueeze", "flatten", "unflatten", "slice", "select", "narrow", "as_strided", "split", "split_with_sizes",
        "chunk", "unbind", "movedim", "swapaxes", "swapdims", "numpy_T", "mT", "mH", "adjoint", "diagonal",
        "view_as_real", "view_as_complex", "_reshape_alias", "unsafe_split", "unsafe_chunk", "tensor_split",
    }
)
"""Views and metadata: a different shape over the same memory."""

COPY_OPS = frozenset({"clone", "copy_", "_to_copy", "to", "_copy_from", "_copy_from_and_resize", "contiguous", "cat", "stack"})
"""Same-value copies (layout, dtype casts, concatenation): allowed unless the task is itself a
copy (`KUBERFT_HOST_COPIES = False` in the task file)."""

VALUE_READS = frozenset(
    {
        "tolist", "numpy", "__array__", "__dlpack__", "untyped_storage", "storage", "__float__", "__int__", "__bool__",
        "__index__", "item", "__complex__", "apply_", "map_", "map2_",
    }
)
"""Reading a tensor's values into Python (or running Python per element): the math could then
be done in plain Python, where no torch operation sees it."""

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep
_THIS_FILE = __file__


def _triton_dir() -> str:
    import triton

    return os.path.dirname(triton.__file__) + os.sep


@dataclass
class Observation:
    """What one `forward` did, as seen from inside the child."""

    host_ops: list[str] = field(default_factory=list)
    """First few host computations, e.g. `aten.relu (line 31)`."""
    kernel_torch: list[str] = field(default_factory=list)
    """torch called from a kernel body (runs only under the CPU interpreter)."""
    launches: int = 0
    launched_storages: set[int] = field(default_factory=set)


class HostGuard:
    """Context manager around one `forward`; fills an `Observation`."""

    MAX_RECORDED = 8

    def __init__(self, launches: "LaunchLog", program_file: str, allow_copies: bool = True, allowed_ops: frozenset[str] = frozenset()):
        self.launches = launches
        self.program_file = program_file
        self.allowed = ALLOCATION_OPS | VIEW_OPS | (COPY_OPS if allow_copies else frozenset()) | allowed_ops
        self.observation = Observation()
        self._triton_dir = _triton_dir()
        self._modes: list[Any] = []

    def __enter__(self) -> Observation:
        self.launches.observation = self.observation
        self._modes = [_Reads(self), _Ops(self)]
        for mode in self._modes:
            mode.__enter__()
        return self.observation

    def __exit__(self, *exc) -> None:
        import gc

        from torch.utils._python_dispatch import _get_current_dispatch_mode

        gc.collect()  # the program's finalizers run here, watched, or never (the harness disabled gc)
        intact = _get_current_dispatch_mode() is self._modes[1]
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self.launches.observation = None
        if not intact:
            self.observation.host_ops.append("the program removed the evaluator's watch on torch operations")

    def _program_line(self) -> int | None:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename == self.program_file:
                return frame.f_lineno
            frame = frame.f_back
        return None

    def _caller_is_triton(self) -> bool:
        """Whether the nearest caller outside torch, the standard library and this file is
        Triton's own code (its interpreter), not the program."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if not (name.startswith(_TORCH_DIR) or name.startswith(_STDLIB_DIR) or name == _THIS_FILE):
                return name.startswith(self._triton_dir)
            frame = frame.f_back
        return False

    def note(self, what: str, allowed: bool) -> None:
        if self.launches.internal:
            return
        if self.launches.depth:
            if self._caller_is_triton():
                return
            target = self.observation.kernel_torch
        elif allowed:
            return
        else:
            target = self.observation.host_ops
        if len(target) < self.MAX_RECORDED:
            line = self._program_line()
            target.append(f"{what} (line {line})" if line else what)


class _Ops(TorchDispatchMode):
    def __init__(self, guard: HostGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.guard.note(f"aten.{name}", name in self.guard.allowed)
        return func(*args, **(kwargs or {}))


class _Reads(TorchFunctionMode):
    def __init__(self, guard: HostGuard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in VALUE_READS:
            self.guard.note(f"reads tensor values into Python (.{name})", False)
        return func(*args, **(kwargs or {}))


class LaunchLog:
    """Installed once per child, before the program is imported: every Triton launch goes
    through `_launch`, which counts it, records the storages it was given, and runs the
    kernel unless `noop`."""

    def __init__(self, noop: bool):
        self.noop = noop
        self.depth = 0
        self.internal = False
        self.total = 0
        self.observation: Observation | None = None

    def install(self) -> "LaunchLog":
        from triton.runtime import jit as jit_module

        classes = [jit_module.JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:  # an older Triton without the interpreter class
            pass
        for cls in classes:
            cls.run = self._wrap(cls.run)
        return self

    def _wrap(self, original):
        log = self

        def run(kernel, *args, **kwargs):
            log.total += 1
            if log.observation is not None:
                log.internal = True
                try:
                    log.observation.launches += 1
                    for value in (*args, *kwargs.values()):
                        if isinstance(value, torch.Tensor):
                            log.observation.launched_storages.add(value.untyped_storage().data_ptr())
                finally:
                    log.internal = False
            if log.noop:
                return None
            log.depth += 1
            try:
                return original(kernel, *args, **kwargs)
            finally:
                log.depth -= 1

        run.__name__ = original.__name__
        run.__qualname__ = original.__qualname__
        run.__doc__ = original.__doc__
        return run


class Integrity:
    """Identities of everything the evaluator relies on in torch, triton and its own modules,
    taken before the program is imported: an attribute the program replaced or removed (a
    patched `torch.equal`, `Tensor.clone`, a launcher) is tampering, however it was reached."""

    def __init__(self) -> None:
        import triton
        import triton.language as tl
        from triton.runtime import jit as jit_module

        from . import channel, harness

        namespaces = [torch, torch.Tensor, *torch.Tensor.__mro__[1:-1], torch.nn.functional, torch.nn.Module, triton, tl,
                      jit_module.JITFunction, channel, harness, sys.modules[__name__], HostGuard, LaunchLog, _Ops, _Reads]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            namespaces.append(InterpretedFunction)
        except ImportError:
            pass
        self._snapshot = [(space, dict((k, id(v)) for k, v in vars(space).items())) for space in namespaces]

    def changed(self) -> list[str]:
        found = []
        for space, before in self._snapshot:
            now = vars(space)
            for key, identity in before.items():
                if key not in now or id(now[key]) != identity:
                    found.append(f"{getattr(space, '__name__', type(space).__name__)}.{key}")
        return found[:5]


def unlaunched_outputs(outputs: list[torch.Tensor], observation: Observation) -> list[int]:
    """Indexes of output tensors whose memory no kernel launched during `forward` was given."""
    return [
        i for i, t in enumerate(outputs)
        if t.numel() and t.untyped_storage().data_ptr() not in observation.launched_storages
    ]
