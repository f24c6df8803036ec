"""Make correct Triton programs run under Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter that ships with triton leaves out things the real compiler accepts, so a
correct kernel written the way public kernel libraries write it fails on the CPU although it
would run on a GPU. `install()`, called in the sandboxed child before the candidate program is
imported (interpreter mode only), patches four of them:

1. libdevice math. Under the interpreter `triton.language.extra.libdevice.f` is a stub that
   returns None and `tl.extra.cuda.libdevice.f` fails asking for `@triton.jit`. Each libdevice
   module's functions are replaced by wrappers that run the real Triton dispatch (argument
   type checks, broadcasting, result types: exactly what the compiler does) with the
   interpreter's semantic, and the interpreter's `create_extern_elementwise` computes the
   function with numpy (float32 stays float32). The stub module resolves to the CUDA
   libdevice, as the compiler does on NVIDIA GPUs. A libdevice function without a numpy
   equivalent raises an error that says it is "not supported in interpreter mode".
2. `.to(dtype)` on a Python scalar inside a kernel (a float kernel argument such as `eps`, a
   loop index from `range`): compiled, those are scalar tensors; interpreted, they are Python
   numbers. Calls `x.to(...)` in kernels are rewritten to convert a Python scalar first.
3. `@triton.autotune` cannot benchmark on the CPU: it runs ONE config, the one that launches
   the fewest programs for the call's arguments (ties: the first in config order), after
   `prune_configs_by` and with the configs' and the autotuner's hooks, as on a GPU.
4. Speed: every call of a @triton.jit function from a kernel (tl.sum, tl.max, tl.argmin and
   tl.cumsum are such functions) re-patches triton.language, which costs milliseconds, so a
   kernel that reduces in a loop could run out of time. Within one launch it is done once.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import os
from typing import Any, Callable

import numpy as np

UNSUPPORTED = "not supported in interpreter mode"

_CUDA = "triton.language.extra.cuda.libdevice"
_HIP = "triton.language.extra.hip.libdevice"
_STUB = "triton.language.extra.libdevice"

_installed: set[str] = set()
_current: list[str] = []
"""Names of the libdevice functions being evaluated, innermost last (read by the builder)."""


def interpreter_active() -> bool:
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def install() -> None:
    """Install every shim (idempotent). Does nothing unless Triton runs in interpreter mode."""
    if not interpreter_active():
        return
    install_libdevice()
    install_scalar_to()
    install_autotune()
    install_fast_device_calls()


# =========================================================================== libdevice
#
# Each implementation takes the arguments' numpy arrays (already broadcast to one shape and
# converted to the dtypes the libdevice table asks for) and the result's numpy dtype.


def _same(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A numpy ufunc computed in the arguments' own dtype (float32 stays float32)."""
    return lambda *a, out: fn(*a)


def _wide(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Computed in float64, then rounded to the result dtype (for accuracy)."""
    return lambda *a, out: fn(*(x.astype(np.float64) for x in a))


def _elementwise(fn: Callable[..., float]) -> Callable[..., Any]:
    """A scalar Python function applied to each element, in float64."""

    def apply(*a, out):
        return np.vectorize(fn, otypes=[np.float64])(*(x.astype(np.float64) for x in a))

    return apply


_SQRT_PI = math.sqrt(math.pi)


def _erfcinv(y: float) -> float:
    """x with erfc(x) = y: a rational first guess (Abramowitz and Stegun 26.2.23 for the
    normal tail), then Newton steps on erfc in float64."""
    if math.isnan(y) or y < 0.0 or y > 2.0:
        return math.nan
    if y == 0.0:
        return math.inf
    if y == 2.0:
        return -math.inf
    if y > 1.0:
        return -_erfcinv(2.0 - y)
    t = math.sqrt(-2.0 * math.log(y / 2.0))
    z = t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t * t * t)
    x = max(z / math.sqrt(2.0), 0.0)
    for _ in range(60):
        slope = -2.0 / _SQRT_PI * math.exp(-x * x)
        if slope == 0.0:
            break
        step = (math.erfc(x) - y) / slope
        x -= step
        if abs(step) <= 1e-15 * max(1.0, abs(x)):
            break
    return x


def _erfinv(y: float) -> float:
    if math.isnan(y) or abs(y) > 1.0:
        return math.nan
    if abs(y) >= 0.5:
        return math.copysign(_erfcinv(1.0 - abs(y)), y)
    x = y * _SQRT_PI / 2.0
    for _ in range(60):
        step = (math.erf(x) - y) / (2.0 / _SQRT_PI * math.exp(-x * x))
        x -= step
        if abs(step) <= 1e-16 * max(1e-300, abs(x)):
            break
    return x


def _erfcx(x: float) -> float:
    """exp(x^2) * erfc(x), with the asymptotic series where exp(x^2) would overflow."""
    if math.isnan(x):
        return math.nan
    if x < 26.0:
        try:
            return math.exp(x * x) * math.erfc(x)
        except OverflowError:
            return math.inf
    r = 1.0 / (x * x)
    return (1.0 - 0.5 * r + 0.75 * r * r - 1.875 * r * r * r) / (x * _SQRT_PI)


def _lgamma(x: float) -> float:
    try:
        return math.lgamma(x)
    except (ValueError, OverflowError):  # a pole: 0 or a negative integer
        return math.inf


def _gamma(x: float) -> float:
    try:
        return math.gamma(x)
    except ValueError:  # a pole: 0 or a negative integer
        return math.copysign(math.inf, x) if x == 0 else math.nan
    except OverflowError:
        return math.inf


def _remainder(x: float, y: float) -> float:
    try:
        return math.remainder(x, y)
    except ValueError:
        return math.nan


def _round_half_away(a, out=None):
    whole = np.trunc(a)
    frac = a - whole
    return whole + np.where(np.abs(frac) >= 0.5, np.sign(a), 0).astype(a.dtype)


def _round_float(values: np.ndarray, dtype: np.dtype, mode: str) -> np.ndarray:
    """float64 `values` rounded to the float `dtype` in rounding mode rn/rz/rd/ru."""
    result = values.astype(dtype)
    if mode == "rn" or np.dtype(dtype) == np.float64:
        return result
    back = result.astype(np.float64)
    if mode == "rz":
        adjust, toward = np.abs(back) > np.abs(values), 0.0
    elif mode == "rd":
        adjust, toward = back > values, -np.inf
    else:
        adjust, toward = back < values, np.inf
    return np.where(adjust, np.nextafter(result, np.asarray(toward, dtype=dtype)), result)


_INTEGER_ROUNDING = {"rn": np.rint, "rz": np.trunc, "rd": np.floor, "ru": np.ceil}


def _to_integer(values: np.ndarray, bits: int, signed: bool, mode: str, out: np.dtype) -> np.ndarray:
    """Float to integer as the GPU converts: rounded in `mode`, saturating, NaN to 0. The
    bits come back in the result dtype (libdevice types its unsigned results as signed)."""
    rounded = _INTEGER_ROUNDING[mode](values.astype(np.float64))
    rounded = np.where(np.isnan(rounded), 0.0, rounded)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    target = np.dtype(f"{'i' if signed else 'u'}{bits // 8}")
    result = np.zeros(rounded.shape, dtype=target)
    inside = (rounded > lo) & (rounded < hi)
    result[inside] = rounded[inside].astype(target)
    result[rounded >= hi] = hi
    result[rounded <= lo] = lo
    return result.view(out) if result.dtype.itemsize == np.dtype(out).itemsize else result.astype(out)


def _int_to_float(mode: str):
    """Integer to float in a rounding mode (exact where the integer fits float64's 53 bits)."""
    return lambda a, out: _round_float(a.astype(np.float64), out, mode)


def _directed(op: Callable[..., Any], mode: str):
    """An IEEE operation with a rounding mode: exact-ish in float64, rounded as asked."""

    def apply(*a, out):
        return _round_float(op(*(x.astype(np.float64) for x in a)), out, mode)

    return apply


def _unsigned(a: np.ndarray) -> np.ndarray:
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def _bit_length(u: np.ndarray) -> np.ndarray:
    """Number of significant bits of each unsigned integer."""
    u = u.astype(np.uint64)
    length = np.zeros(u.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        big = u >= (np.uint64(1) << np.uint64(shift))
        length += np.where(big, shift, 0)
        u = np.where(big, u >> np.uint64(shift), u)
    return length + (u > 0)


def _clz(a, out):
    return a.dtype.itemsize * 8 - _bit_length(_unsigned(a))


def _popc(a, out):
    u = _unsigned(a).astype(np.uint64)
    count = np.zeros(u.shape, dtype=np.int64)
    for _ in range(a.dtype.itemsize * 8):
        count += (u & np.uint64(1)).astype(np.int64)
        u = u >> np.uint64(1)
    return count


def _ffs(a, out):
    u = _unsigned(a).astype(np.uint64)
    lowest = u & (~u + np.uint64(1))
    return _bit_length(lowest)


def _brev(a, out):
    bits = a.dtype.itemsize * 8
    u = _unsigned(a).astype(np.uint64)
    r = np.zeros(u.shape, dtype=np.uint64)
    for i in range(bits):
        r |= ((u >> np.uint64(i)) & np.uint64(1)) << np.uint64(bits - 1 - i)
    return r.astype(_unsigned(a).dtype).view(a.dtype)


def _mulhi(a, b, out):
    bits = a.dtype.itemsize * 8
    if bits == 32:
        wide = np.int64 if a.dtype.kind == "i" else np.uint64
        return ((a.astype(wide) * b.astype(wide)) >> 32).astype(a.dtype)
    high = np.frompyfunc(lambda x, y: ((int(x) * int(y)) >> 64) & (2**64 - 1), 2, 1)
    return high(a, b).astype(np.uint64).view(a.dtype)


def _mul24(a, b, out):
    if a.dtype.kind == "i":  # the low 24 bits, sign-extended
        x, y = (a.astype(np.int64) << 40) >> 40, (b.astype(np.int64) << 40) >> 40
    else:
        x, y = a.astype(np.int64) & 0xFFFFFF, b.astype(np.int64) & 0xFFFFFF
    return ((x * y) & 0xFFFFFFFF).astype(np.uint32).view(out)


def _sad(a, b, c, out):
    total = np.abs(a.astype(np.int64) - b.astype(np.int64)) + c.astype(np.int64)
    return (total & 0xFFFFFFFF).astype(np.uint32).view(out)


def _halving_add(rounding: int):
    def apply(a, b, out):
        return ((a.astype(np.int64) + b.astype(np.int64) + rounding) >> 1).astype(out)

    return apply


def _byte_perm(x, y, s, out):
    source = (_unsigned(y).astype(np.uint64) << np.uint64(32)) | _unsigned(x).astype(np.uint64)
    selector = _unsigned(s).astype(np.uint64)
    result = np.zeros(x.shape, dtype=np.uint64)
    for i in range(4):
        which = (selector >> np.uint64(4 * i)) & np.uint64(7)
        byte = (source >> (which * np.uint64(8))) & np.uint64(0xFF)
        result |= byte << np.uint64(8 * i)
    return result.astype(np.uint32).view(np.int32)


def _saturate(a, out):
    return np.where(np.isnan(a), 0, np.clip(a, 0, 1)).astype(a.dtype)


def _fdim(a, b, out):
    nan = np.isnan(a) | np.isnan(b)
    return np.where(nan, np.nan, np.where(a > b, a - b, 0)).astype(a.dtype)


def _ilogb(a, out):
    _, exponent = np.frexp(a.astype(np.float64))
    result = (exponent - 1).astype(np.int64)
    result = np.where(a == 0, np.iinfo(np.int32).min, result)
    result = np.where(np.isnan(a), np.iinfo(np.int32).min, result)
    return np.where(np.isinf(a), np.iinfo(np.int32).max, result)


def _logb(a, out):
    _, exponent = np.frexp(a.astype(np.float64))
    result = (exponent - 1).astype(np.float64)
    result = np.where(a == 0, -np.inf, result)
    result = np.where(np.isinf(a), np.inf, result)
    return np.where(np.isnan(a), np.nan, result)


def _pow(a, b, out):
    if b.dtype.kind in "iu":
        b = b.astype(a.dtype)
    return np.power(a, b)


def _norm(*a, out):
    return np.sqrt(sum(x.astype(np.float64) ** 2 for x in a))


def _rnorm(*a, out):
    return 1.0 / np.sqrt(sum(x.astype(np.float64) ** 2 for x in a))


def _bitcast(a, out):
    return a.view(out)


def _hiloint2double(hi, lo, out):
    bits = (_unsigned(hi).astype(np.uint64) << np.uint64(32)) | _unsigned(lo).astype(np.uint64)
    return bits.view(np.float64)


def _double_half(high: bool):
    def apply(a, out):
        bits = a.astype(np.float64).view(np.uint64)
        part = (bits >> np.uint64(32)) if high else (bits & np.uint64(0xFFFFFFFF))
        return part.astype(np.uint32).view(np.int32)

    return apply


def _libdevice_table() -> dict[str, Callable[..., Any]]:
    t: dict[str, Callable[..., Any]] = {}
    # --- the usual math, in the argument dtype
    for name, fn in {
        "exp": np.exp, "exp2": np.exp2, "log": np.log, "log2": np.log2, "log10": np.log10, "log1p": np.log1p,
        "expm1": np.expm1, "sqrt": np.sqrt, "sin": np.sin, "cos": np.cos, "tan": np.tan, "asin": np.arcsin,
        "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "tanh": np.tanh,
        "asinh": np.arcsinh, "acosh": np.arccosh, "atanh": np.arctanh, "floor": np.floor, "ceil": np.ceil,
        "trunc": np.trunc, "rint": np.rint, "nearbyint": np.rint, "abs": np.abs, "fabs": np.abs, "cbrt": np.cbrt,
        "atan2": np.arctan2, "hypot": np.hypot, "fmod": np.fmod, "copysign": np.copysign,
        "nextafter": np.nextafter, "fmax": np.fmax, "fmin": np.fmin,
        "fast_expf": np.exp, "fast_logf": np.log, "fast_log2f": np.log2, "fast_log10f": np.log10,
        "fast_sinf": np.sin, "fast_cosf": np.cos, "fast_tanf": np.tan, "fast_tanhf": np.tanh,
    }.items():
        t[name] = _same(fn)
    t["rsqrt"] = t["rsqrt_rn"] = _same(lambda a: np.reciprocal(np.sqrt(a)))
    t["rcbrt"] = _same(lambda a: np.reciprocal(np.cbrt(a)))
    t["rhypot"] = _same(lambda a, b: np.reciprocal(np.hypot(a, b)))
    t["exp10"] = t["fast_exp10f"] = _same(lambda a: np.power(np.asarray(10, dtype=a.dtype), a))
    t["sinpi"] = _wide(lambda a: np.sin(np.pi * a))
    t["cospi"] = _wide(lambda a: np.cos(np.pi * a))
    t["pow"] = t["fast_powf"] = _pow
    t["fast_dividef"] = _same(np.divide)
    t["saturatef"] = _saturate
    t["fdim"] = _fdim
    t["round"] = _round_half_away
    t["llround"] = lambda a, out: _to_integer(_round_half_away(a.astype(np.float64)), 64, True, "rz", out)
    t["llrint"] = lambda a, out: _to_integer(a, 64, True, "rn", out)
    t["ldexp"] = t["scalbn"] = lambda a, b, out: np.ldexp(a, b.astype(np.int32))
    t["remainder"] = _elementwise(_remainder)
    t["ilogb"] = _ilogb
    t["logb"] = _logb
    t["norm3d"] = t["norm4d"] = _norm
    t["rnorm3d"] = t["rnorm4d"] = _rnorm
    t["fma"] = _directed(lambda a, b, c: a * b + c, "rn")
    # --- special functions (numpy and math only: a kernel may not call torch)
    t["erf"] = _elementwise(math.erf)
    t["erfc"] = _elementwise(math.erfc)
    t["erfinv"] = _elementwise(_erfinv)
    t["erfcinv"] = _elementwise(_erfcinv)
    t["erfcx"] = _elementwise(_erfcx)
    t["normcdf"] = _elementwise(lambda x: 0.5 * math.erfc(-x / math.sqrt(2.0)))
    t["normcdfinv"] = _elementwise(lambda p: -math.sqrt(2.0) * _erfcinv(2.0 * p))
    t["lgamma"] = _elementwise(_lgamma)
    t["tgamma"] = _elementwise(_gamma)
    t["cyl_bessel_i0"] = _wide(np.i0)
    # --- classification (int32 results)
    t["isnan"] = lambda a, out: np.isnan(a)
    t["isinf"] = lambda a, out: np.isinf(a)
    t["signbit"] = lambda a, out: np.signbit(a)
    t["finitef"] = t["isfinited"] = lambda a, out: np.isfinite(a)
    # --- arithmetic with a rounding mode
    for mode in ("rn", "rz", "rd", "ru"):
        t[f"add_{mode}"] = _directed(np.add, mode)
        t[f"sub_{mode}"] = _directed(np.subtract, mode)
        t[f"mul_{mode}"] = _directed(np.multiply, mode)
        t[f"div_{mode}"] = _directed(np.divide, mode)
        t[f"rcp_{mode}"] = _directed(np.reciprocal, mode)
        t[f"sqrt_{mode}"] = _directed(np.sqrt, mode)
        t[f"fma_{mode}"] = _directed(lambda a, b, c: a * b + c, mode)
        t[f"double2float_{mode}"] = _directed(lambda a: a, mode)
        t[f"int2float_{mode}"] = t[f"uint2float_{mode}"] = _int_to_float(mode)
        t[f"ll2float_{mode}"] = t[f"ull2float_{mode}"] = _int_to_float(mode)
        t[f"ll2double_{mode}"] = t[f"ull2double_{mode}"] = _int_to_float(mode)
        for prefix in ("float", "double"):
            t[f"{prefix}2int_{mode}"] = (lambda m: lambda a, out: _to_integer(a, 32, True, m, out))(mode)
            t[f"{prefix}2uint_{mode}"] = (lambda m: lambda a, out: _to_integer(a, 32, False, m, out))(mode)
            t[f"{prefix}2ll_{mode}"] = (lambda m: lambda a, out: _to_integer(a, 64, True, m, out))(mode)
            t[f"{prefix}2ull_{mode}"] = (lambda m: lambda a, out: _to_integer(a, 64, False, m, out))(mode)
    t["int2double_rn"] = t["uint2double_rn"] = _int_to_float("rn")
    # --- bits
    t["int_as_float"] = _bitcast
    t["uint_as_float"] = _bitcast
    t["float_as_int"] = _bitcast
    t["float_as_uint"] = _bitcast
    t["longlong_as_double"] = _bitcast
    t["double_as_longlong"] = _bitcast
    t["hiloint2double"] = _hiloint2double
    t["double2hiint"] = _double_half(True)
    t["double2loint"] = _double_half(False)
    t["clz"] = _clz
    t["popc"] = _popc
    t["ffs"] = _ffs
    t["brev"] = _brev
    t["mulhi"] = _mulhi
    t["mul24"] = _mul24
    t["sad"] = _sad
    t["hadd"] = _halving_add(0)
    t["rhadd"] = _halving_add(1)
    t["byte_perm"] = _byte_perm
    return t


LIBDEVICE = _libdevice_table()
"""libdevice function name -> numpy implementation (args..., out=result numpy dtype)."""


def _unsupported(name: str) -> Callable[..., Any]:
    def unsupported(*args, **kwargs):
        raise NotImplementedError(f"libdevice.{name} is {UNSUPPORTED}")

    unsupported.__name__ = name
    return unsupported


_result_types: dict[tuple, Any] = {}
"""(libdevice function, argument dtypes, block or scalar) -> result dtype, learnt from calls
that went through Triton's dispatch; later calls with the same types skip it (it costs more
than the numpy work on a block)."""


def _compute(name: str, arrays: list, scalar: Any) -> Any:
    from triton.runtime.interpreter import TensorHandle, _get_np_dtype

    out = np.dtype(_get_np_dtype(scalar))
    shape = np.broadcast_shapes(*(a.shape for a in arrays)) if arrays else (1,)
    arrays = [np.broadcast_to(a, shape) for a in arrays]
    with np.errstate(all="ignore"):
        result = np.asarray(LIBDEVICE[name](*arrays, out=out))
        if result.dtype != out:
            result = result.astype(out)
    return TensorHandle(np.ascontiguousarray(np.broadcast_to(result, shape)), scalar)


def _same_shape_tensors(args: tuple) -> bool:
    import triton.language as tl

    if not args or not all(isinstance(a, tl.tensor) for a in args):
        return False
    first = args[0].type
    return all(a.type.is_block() == first.is_block() and list(a.shape) == list(args[0].shape) for a in args)


def _wrap_libdevice(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """Call the real libdevice builtin (its type dispatch) with the interpreter's semantic."""
    if name not in LIBDEVICE:
        return _unsupported(name)

    def libdevice_function(*args, _semantic=None, **kwargs):
        import triton.language as tl
        from triton.runtime.interpreter import interpreter_semantic

        simple = not kwargs and _same_shape_tensors(args)
        key = (id(original), tuple(a.dtype for a in args), args[0].type.is_block()) if simple else None
        if key is not None and key in _result_types:
            scalar = _result_types[key]
            ret_type = args[0].type.with_element_ty(scalar) if args[0].type.is_block() else scalar
            return tl.tensor(_compute(name, [a.handle.data for a in args], scalar), ret_type)
        _current.append(name)
        try:
            result = original(*args, _semantic=interpreter_semantic, **kwargs)
        finally:
            _current.pop()
        if key is not None and isinstance(result, tl.tensor) and list(result.shape) == list(args[0].shape):
            _result_types[key] = result.dtype
        return result

    libdevice_function.__name__ = name
    libdevice_function.__qualname__ = name
    libdevice_function.__doc__ = getattr(original, "__doc__", None)
    libdevice_function.__kuberft_original__ = original
    libdevice_function.__triton_builtin__ = True  # not a Python helper to trace
    return libdevice_function


def _create_extern_elementwise(self, libName, libPath, symbol, argList, retType, isPure):  # noqa: N803 - triton's names
    from triton.runtime.interpreter import TensorHandle

    if not _current or _current[-1] not in LIBDEVICE:
        raise NotImplementedError(f"extern_elementwise ({symbol}) {UNSUPPORTED}")
    scalar = retType.scalar if hasattr(retType, "scalar") else retType
    arrays = [h.data if isinstance(h, TensorHandle) else np.asarray(h) for h in argList]
    return _compute(_current[-1], arrays, scalar)


def install_libdevice() -> None:
    """Route every libdevice module's functions to the numpy implementations."""
    if "libdevice" in _installed:
        return
    from triton.runtime import interpreter

    modules = {}
    for name in (_CUDA, _HIP, _STUB):
        try:
            modules[name] = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a backend this triton build lacks
            continue
    wrapped: dict[str, dict[str, Callable[..., Any]]] = {}
    for module_name in (_CUDA, _HIP):
        module = modules.get(module_name)
        if module is None:
            continue
        wrapped[module_name] = {}
        for attr, value in list(vars(module).items()):
            if attr.startswith("_") or not callable(value) or not getattr(value, "__triton_builtin__", False):
                continue
            if getattr(value, "__module__", None) != module_name:
                continue
            wrapped[module_name][attr] = _wrap_libdevice(attr, value)
            setattr(module, attr, wrapped[module_name][attr])
    stub = modules.get(_STUB)
    if stub is not None:
        for attr, value in list(vars(stub).items()):
            if attr.startswith("_") or not inspect.isfunction(value) or value.__module__ != _STUB:
                continue
            # the compiler resolves the stub module to the CUDA libdevice on NVIDIA GPUs
            replacement = wrapped.get(_CUDA, {}).get(attr) or wrapped.get(_HIP, {}).get(attr) or _unsupported(attr)
            setattr(stub, attr, replacement)
    interpreter.InterpreterBuilder.create_extern_elementwise = _create_extern_elementwise
    _installed.add("libdevice")


# =========================================================================== scalar .to()

_SCALAR_TO = "_kuberft_scalar_to_"


def _scalar_to(value, *args, **kwargs):
    """`value.to(...)` where a Python number stands for a scalar tensor, as compiled code has."""
    import triton.language as tl
    from triton.runtime.interpreter import interpreter_semantic

    raw = value.value if isinstance(value, tl.constexpr) else value
    if isinstance(raw, (bool, int, float)) and not isinstance(value, tl.tensor):
        value = interpreter_semantic.to_tensor(raw)
    elif isinstance(raw, np.generic):
        value = interpreter_semantic.to_tensor(raw.item())
    return value.to(*args, **kwargs)


class _ScalarToRewriter(ast.NodeTransformer):
    """`x.to(args)` -> `_kuberft_scalar_to_(x, args)`."""

    def visit_Call(self, node: ast.Call) -> ast.AST:  # noqa: N802 - ast API
        node = self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "to":
            return ast.copy_location(
                ast.Call(func=ast.Name(id=_SCALAR_TO, ctx=ast.Load()), args=[func.value, *node.args], keywords=node.keywords),
                node,
            )
        return node


def install_scalar_to() -> None:
    """Rewrite `.to(...)` calls in interpreted kernels so that Python scalars convert."""
    if "scalar_to" in _installed:
        return
    from triton.runtime import interpreter

    setattr(interpreter, _SCALAR_TO, _scalar_to)  # the rewriter copies these globals into kernels'
    rewriter = interpreter.FunctionRewriter
    original = rewriter._transform_ast

    def transform(self, src):
        tree = original(self, src)
        tree = _ScalarToRewriter().visit(tree)
        ast.fix_missing_locations(tree)
        return tree

    rewriter._transform_ast = transform
    _installed.add("scalar_to")


# =========================================================================== autotune


def _program_count(grid: Any, meta: dict[str, Any]) -> float:
    """How many programs a launch with this grid and these meta-parameters starts."""
    try:
        dims = grid(meta) if callable(grid) else grid
        if not isinstance(dims, (tuple, list)) or not 1 <= len(dims) <= 3:
            return math.inf
        total = 1
        for d in dims:
            total *= int(d)
        return float(total)
    except Exception:  # noqa: BLE001 - a grid that cannot use this config
        return math.inf


def _launch_meta(tuner: Any, args: tuple, kwargs: dict[str, Any], config: Any) -> dict[str, Any]:
    """The dict a grid lambda sees for this config: arguments (with defaults), the config's
    meta-parameters, and what stacked @triton.heuristics derive from them."""
    meta: dict[str, Any] = {}
    try:
        for p in inspect.signature(tuner.base_fn).parameters.values():
            if p.default is not inspect.Parameter.empty:
                meta[p.name] = p.default
    except (TypeError, ValueError):
        pass
    meta.update(dict(zip(tuner.arg_names, args)))
    meta.update({k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
    meta.update(config.all_kwargs())
    from triton.runtime.autotuner import Heuristics

    fn = tuner.fn
    while isinstance(fn, Heuristics):
        for name, heuristic in fn.values.items():
            try:
                meta[name] = heuristic(dict(meta))
            except Exception:  # noqa: BLE001 - the launch itself reports it
                pass
        fn = fn.fn
    return meta


def _candidates(tuner: Any, kwargs: dict[str, Any]) -> list:
    """Configs after `prune_configs_by` (early_config_prune, then the perf model's top_k where
    it can run without a GPU)."""
    configs = list(tuner.configs)
    if tuner.early_config_prune:
        configs = list(tuner.early_config_prune(tuner.configs, tuner.nargs, **kwargs))
        if not configs:
            from triton.runtime.errors import AutotunerError

            raise AutotunerError("No valid autotuner configs after pruning. `early_config_prune` should return at least one config.")
    if tuner.perf_model:
        top_k = tuner.configs_top_k
        if isinstance(top_k, float) and top_k <= 1.0:
            top_k = max(1, int(len(configs) * top_k))
        if isinstance(top_k, int) and len(configs) > top_k:
            try:
                timing = {i: tuner.perf_model(**tuner.nargs, **kwargs, **c.all_kwargs()) for i, c in enumerate(configs)}
                configs = [configs[i] for i in sorted(timing, key=lambda i: (timing[i], i))[:top_k]]
            except Exception:  # noqa: BLE001 - perf models usually query the GPU
                pass
    return configs


def _autotuner_run(self, *args, **kwargs):
    """Autotuner.run under the interpreter: no benchmarking; the config that launches the
    fewest programs (first in order on a tie) runs, chosen once per tuning key as on a GPU."""
    self.nargs = dict(zip(self.arg_names, args))
    grid = kwargs.get("grid")
    if len(self.configs) > 1:
        everything = {**self.nargs, **kwargs}
        named = {k: v for k, v in everything.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        key.extend(str(v.dtype) for v in named.values() if hasattr(v, "dtype"))
        key = tuple(key)
        if key not in self.cache:
            candidates = _candidates(self, kwargs)
            counts = [_program_count(grid, _launch_meta(self, args, kwargs, c)) for c in candidates]
            best = min(range(len(candidates)), key=lambda i: (counts[i], i))
            self.cache[key] = candidates[best]
            if len(candidates) > 1:
                # a GPU benchmarks here, then resets `reset_to_zero` arguments once more
                self.pre_hook({**self.nargs, **kwargs, **candidates[best].all_kwargs()}, reset_only=True)
        config = self.cache[key]
    else:
        config = self.configs[0]
    self.best_config = config
    if config.pre_hook is not None:
        config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
    try:
        return self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        self.nargs = None


def install_autotune() -> None:
    """Autotuned kernels run one config: the one with the fewest programs."""
    if "autotune" in _installed:
        return
    from triton.runtime.autotuner import Autotuner

    Autotuner.run = _autotuner_run
    _installed.add("autotune")


# =========================================================================== device calls


_launch: dict[str, Any] = {"depth": 0, "patched": set()}


def install_fast_device_calls() -> None:
    """Patch triton.language once per launch instead of at every call of a @triton.jit
    helper (the interpreter re-scans every language module at each call). Re-patching within
    a launch changes nothing: the builtins are already wrapped for the interpreter."""
    if "device_calls" in _installed:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    grid_call = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        _launch["depth"] += 1
        outer = _launch["patched"]
        _launch["patched"] = set()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _launch["depth"] -= 1
            _launch["patched"] = outer

    def device_call(self, *args, **kwargs):
        langs = frozenset(id(v) for v in self.fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))
        if _launch["depth"] == 0 or langs not in _launch["patched"]:
            interpreter._patch_lang(self.fn)
            if _launch["depth"]:
                _launch["patched"].add(langs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.GridExecutor.__call__ = launch
    interpreter.InterpretedFunction.__call__ = device_call
    _installed.add("device_calls")
