"""The interpreter shims (kuberft_reward.interpreter_compat) on real kernels: libdevice math,
`.to()` on Python scalars and single-config autotuning, under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before triton is imported, so the kernels run in one child
Python process (importing torch and triton takes seconds); each test checks one part of
what that process reported."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REWARD_IMAGE = Path(__file__).resolve().parents[2] / "reward_image"
MARKER = "KUBERFT-RESULTS "

# libdevice function -> (arguments in the kernel, torch reference on the same tensors).
# x is signed, a = |x| + 0.5 is positive, t = tanh(x) lies in (-1, 1).
FLOAT_FUNCTIONS = {
    "rsqrt": ("a", "torch.rsqrt(a)"),
    "tanh": ("x", "torch.tanh(x)"),
    "erf": ("x", "torch.erf(x)"),
    "erfc": ("x", "torch.erfc(x)"),
    "erfinv": ("t", "torch.erfinv(t)"),
    "exp": ("x", "torch.exp(x)"),
    "exp2": ("x", "torch.exp2(x)"),
    "exp10": ("x", "torch.pow(10.0, x)"),
    "expm1": ("x", "torch.expm1(x)"),
    "log": ("a", "torch.log(a)"),
    "log2": ("a", "torch.log2(a)"),
    "log10": ("a", "torch.log10(a)"),
    "log1p": ("a", "torch.log1p(a)"),
    "sqrt": ("a", "torch.sqrt(a)"),
    "cbrt": ("x", "torch.sign(x) * torch.abs(x) ** (1 / 3)"),
    "pow": ("a, x", "torch.pow(a, x)"),
    "sin": ("x", "torch.sin(x)"),
    "cos": ("x", "torch.cos(x)"),
    "tan": ("t", "torch.tan(t)"),
    "asin": ("t", "torch.asin(t)"),
    "acos": ("t", "torch.acos(t)"),
    "atan": ("x", "torch.atan(x)"),
    "atan2": ("x, a", "torch.atan2(x, a)"),
    "sinh": ("x", "torch.sinh(x)"),
    "cosh": ("x", "torch.cosh(x)"),
    "asinh": ("x", "torch.asinh(x)"),
    "acosh": ("a + 1.0", "torch.acosh(a + 1.0)"),
    "atanh": ("t * 0.9", "torch.atanh(t * 0.9)"),
    "floor": ("x", "torch.floor(x)"),
    "ceil": ("x", "torch.ceil(x)"),
    "trunc": ("x", "torch.trunc(x)"),
    "rint": ("x", "torch.round(x)"),
    "nearbyint": ("x", "torch.round(x)"),
    "round": ("x", "torch.sign(x) * torch.floor(torch.abs(x) + 0.5)"),
    "abs": ("x", "torch.abs(x)"),
    "fmod": ("x, a", "torch.fmod(x, a)"),
    "copysign": ("a, x", "torch.copysign(a, x)"),
    "hypot": ("x, a", "torch.hypot(x, a)"),
    "div_rn": ("x, a", "x / a"),
    "fast_expf": ("x", "torch.exp(x)"),
    "fast_logf": ("a", "torch.log(a)"),
    "fast_dividef": ("x, a", "x / a"),
    "fma": ("x, a, t", "x * a + t"),
    "lgamma": ("a", "torch.lgamma(a)"),
    "saturatef": ("x", "torch.clamp(x, 0.0, 1.0)"),
    "signbit": ("x", "torch.signbit(x).to(torch.int32)"),
    "isnan": ("x / x", "torch.isnan(x / x).to(torch.int32)"),
    "isinf": ("x / 0.0", "torch.isinf(x / 0.0).to(torch.int32)"),
    "float2int_rn": ("x * 3.0", "torch.round(x * 3.0).to(torch.int32)"),
}


def _libdevice_program() -> str:
    stores = []
    for row, (name, (args, _)) in enumerate(FLOAT_FUNCTIONS.items()):
        stores.append(f"tl.store(out_ptr + {row} * n + offs, (libdevice.{name}({args})).to(tl.float32), mask=mask)")
    references = ",\n".join(f"    {name!r}: {ref}" for name, (_, ref) in FLOAT_FUNCTIONS.items())
    kernel = "\n".join(" " * 4 + s for s in stores)
    return f'''
@triton.jit
def many_libdevice_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    a = tl.abs(x) + 0.5
    t = libdevice.tanh(x)
    tl.static_assert(t.dtype == tl.float32)
{kernel}


def check_libdevice_functions():
    torch.manual_seed(0)
    n = 301
    x = torch.randn(n) * 2
    x[:6] = torch.tensor([0.5, -0.5, 2.5, -2.5, 0.0, -0.0])
    a = torch.abs(x) + 0.5
    t = torch.tanh(x)
    out = torch.empty({len(FLOAT_FUNCTIONS)}, n)
    many_libdevice_kernel[(triton.cdiv(n, 128),)](x, out, n, BLOCK=128)
    first = out.clone()
    out.fill_(float("nan"))
    many_libdevice_kernel[(triton.cdiv(n, 128),)](x, out, n, BLOCK=128)  # the cached-dispatch path
    assert torch.equal(first.nan_to_num(7.0), out.nan_to_num(7.0)), "the second launch differs"
    expected = {{
{references}
    }}
    errors = {{}}
    for row, (name, ref) in enumerate(expected.items()):
        got, want = out[row].double(), ref.double()
        bad = ~torch.isclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        errors[name] = int(bad.sum())
    return errors
'''


SCRIPT_BODY = r'''
import json
import math
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.extra.cuda import libdevice as cuda_libdevice

from kuberft_reward import interpreter_compat

interpreter_compat.install()
interpreter_compat.install()  # idempotent


def run(check):
    try:
        return check()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------- other libdevice paths


@triton.jit
def paths_kernel(x_ptr, d_ptr, i_ptr, out_ptr, dout_ptr, iout_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, tl.extra.cuda.libdevice.tanh(x), mask=mask)
    tl.store(out_ptr + n + offs, tl.extra.libdevice.erf(x), mask=mask)
    tl.store(out_ptr + 2 * n + offs, cuda_libdevice.rsqrt(tl.abs(x) + 1.0), mask=mask)
    tl.store(out_ptr + 3 * n + offs, libdevice.pow(x, 2), mask=mask)  # integer exponent (powi)
    tl.store(out_ptr + 4 * n + offs, libdevice.exp(x) + libdevice.exp(1.0), mask=mask)  # a Python scalar
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    ed = libdevice.exp(d)
    tl.static_assert(ed.dtype == tl.float64)
    tl.store(dout_ptr + offs, ed, mask=mask)
    v = tl.load(i_ptr + offs, mask=mask, other=0)
    tl.store(iout_ptr + offs, libdevice.abs(v), mask=mask)
    tl.store(iout_ptr + n + offs, libdevice.popc(v), mask=mask)
    tl.store(iout_ptr + 2 * n + offs, libdevice.clz(v), mask=mask)


def check_paths():
    torch.manual_seed(1)
    n = 37
    x = torch.randn(n)
    d = torch.randn(n, dtype=torch.float64) * 3
    v = torch.randint(-1000, 1000, (n,), dtype=torch.int32)
    out = torch.empty(5 * n)
    dout = torch.empty(n, dtype=torch.float64)
    iout = torch.empty(3 * n, dtype=torch.int32)
    paths_kernel[(1,)](x, d, v, out, dout, iout, n, BLOCK=64)
    expected = torch.cat([torch.tanh(x), torch.erf(x), torch.rsqrt(x.abs() + 1), x * x, torch.exp(x) + math.e])
    popc = torch.tensor([bin(int(a) & 0xFFFFFFFF).count("1") for a in v], dtype=torch.int32)
    clz = torch.tensor([32 - (int(a) & 0xFFFFFFFF).bit_length() for a in v], dtype=torch.int32)
    return {
        "float32": float((out - expected).abs().max()),
        "float64": float((dout - torch.exp(d)).abs().max() / torch.exp(d).abs().max()),
        "int": bool(torch.equal(iout, torch.cat([v.abs(), popc, clz]))),
    }


@triton.jit
def unmapped_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, libdevice.rcp64h(x))


def check_unmapped():
    x = torch.randn(8, dtype=torch.float64)
    try:
        unmapped_kernel[(1,)](x, torch.empty_like(x), BLOCK=8)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "ran"


# ---------------------------------------------------------------- scalar .to()


@triton.jit
def scalar_to_kernel(x_ptr, out_ptr, n_cols, eps, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    start = row.to(tl.int64) * n_cols.to(tl.int64)
    e = eps.to(tl.float32)
    tl.static_assert(e.dtype == tl.float32)
    tl.static_assert(n_cols.to(tl.int64).dtype == tl.int64)
    x = tl.load(x_ptr + start + cols, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, 3):
        acc += i.to(tl.float32)
    y = x * scale.to(tl.float32) + e + acc
    tl.store(out_ptr + start + cols, y, mask=mask)


def check_scalar_to():
    x = torch.randn(5, 33)
    out = torch.empty_like(x)
    scalar_to_kernel[(5,)](x, out, 33, 0.25, 3.0, BLOCK=64)
    return float((out - (x * 3.0 + 0.25 + 3.0)).abs().max())


# ---------------------------------------------------------------- autotune

ran = []


def record(name):
    def hook(nargs):
        ran.append(name)

    return hook


def configs(*blocks):
    return [triton.Config({"BLOCK": b}, pre_hook=record(str(b))) for b in blocks]


@triton.autotune(configs=configs(32, 128, 64, 256), key=["n"])
@triton.jit
def double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)


@triton.autotune(configs=configs(32, 128, 64, 256), key=["n"], prune_configs_by={"early_config_prune": lambda cfgs, nargs, **kw: [c for c in cfgs if c.kwargs["BLOCK"] <= 64]})
@triton.heuristics({"EVEN": lambda args: args["n"] % args["BLOCK"] == 0})
@triton.jit
def pruned_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVEN:
        tl.store(out_ptr + offs, tl.load(x_ptr + offs) + 1)
    else:
        mask = offs < n
        tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


@triton.autotune(configs=[triton.Config({"SPLIT": s}, pre_hook=record(f"split{s}")) for s in (4, 1, 2)], key=["n"])
@triton.heuristics({"BLOCK": lambda args: triton.next_power_of_2(triton.cdiv(args["n"], args["SPLIT"]))})
@triton.jit
def split_kernel(x_ptr, out_ptr, n, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) - 1, mask=mask)


@triton.autotune(
    configs=[
        triton.Config({"BM": 16, "BN": 16}, pre_hook=record("16x16")),
        triton.Config({"BM": 64, "BN": 16}, pre_hook=record("64x16")),
        triton.Config({"BM": 16, "BN": 64}, pre_hook=record("16x64")),
    ],
    key=["M", "N"],
)
@triton.jit
def copy_2d_kernel(x_ptr, out_ptr, M, N, stride, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offsets = rows[:, None] * stride + cols[None, :]
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.autotune(configs=configs(64, 32), key=["n"], reset_to_zero=["out_ptr"])
@triton.jit
def accumulate_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(out_ptr + offs, mask=mask) + tl.load(x_ptr + offs, mask=mask), mask=mask)


def check_autotune():
    result = {}
    x = torch.randn(1000)
    out = torch.empty_like(x)
    # n=100: 32 -> 4 programs, 128 -> 1, 64 -> 2, 256 -> 1: 128 (first of the tie)
    double_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, out, 100)
    result["fewest"] = (list(ran), bool(torch.equal(out[:100], x[:100] * 2)))
    ran.clear()
    double_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, out, 100)  # same key: cached
    double_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, out, 1000)  # new key
    result["cached_then_retuned"] = (list(ran), bool(torch.equal(out, x * 2)))
    ran.clear()
    pruned_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, out, 100)
    result["pruned"] = (list(ran), bool(torch.equal(out[:100], x[:100] + 1)))
    ran.clear()
    # the grid needs BLOCK, which a heuristic derives from the config's SPLIT:
    # split4 -> BLOCK 32 -> 4 programs, split1 -> BLOCK 128 -> 1, split2 -> BLOCK 64 -> 2
    split_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, out, 100)
    result["heuristics"] = (list(ran), bool(torch.equal(out[:100], x[:100] - 1)))
    ran.clear()
    grid = (1,)
    double_kernel[grid](x, out, 7)  # the same number of programs for every config: the first
    result["static_grid"] = list(ran)
    ran.clear()
    m2 = torch.randn(40, 70)
    o2 = torch.empty_like(m2)
    # 16x16: 3*5=15, 64x16: 1*5=5, 16x64: 3*2=6 programs
    copy_2d_kernel[lambda meta: (triton.cdiv(40, meta["BM"]), triton.cdiv(70, meta["BN"]))](m2, o2, 40, 70, m2.stride(0))
    result["two_d"] = (list(ran), bool(torch.equal(o2, m2)))
    ran.clear()
    acc = torch.full((100,), 5.0)
    accumulate_kernel[lambda meta: (triton.cdiv(meta["n"], meta["BLOCK"]),)](x, acc, 100)
    result["reset_to_zero"] = (list(ran), bool(torch.equal(acc, x[:100])))
    return result


# ---------------------------------------------------------------- device calls patch once per launch


@triton.jit
def row_sums_kernel(x_ptr, out_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    for row in range(0, n_rows):
        cols = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * n_cols + cols, mask=cols < n_cols, other=0.0)
        tl.store(out_ptr + row, tl.sum(x, axis=0) + tl.max(x, axis=0))


def check_device_calls():
    from triton.runtime import interpreter

    calls = []
    original = interpreter._patch_lang

    def counting(fn):
        calls.append(fn.__name__)
        return original(fn)

    interpreter._patch_lang = counting
    try:
        x = torch.randn(40, 30)
        out = torch.empty(40)
        row_sums_kernel[(1,)](x, out, 40, 30, BLOCK=32)
        first = len(calls)
        row_sums_kernel[(1,)](x, out, 40, 30, BLOCK=32)
    finally:
        interpreter._patch_lang = original
    # 80 calls of the @triton.jit functions tl.sum and tl.max per launch
    return {"error": float((out - (x.sum(1) + x.max(1).values)).abs().max()), "per_launch": [first, len(calls) - first]}


results = {
    "device_calls": run(check_device_calls),
    "libdevice": run(check_libdevice_functions),
    "paths": run(check_paths),
    "unmapped": run(check_unmapped),
    "scalar_to": run(check_scalar_to),
    "autotune": run(check_autotune),
}
print("KUBERFT-RESULTS " + json.dumps(results))
'''


def run_interpreted(tmp_path: Path, body: str, interpret: bool = True) -> dict:
    """Run `body` as a script in a fresh Python with TRITON_INTERPRET=1 set before triton is
    imported; returns the JSON it prints after MARKER."""
    script = tmp_path / "interpreted_kernels.py"
    script.write_text(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REWARD_IMAGE), env.get("PYTHONPATH")) if p)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"the script failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len(MARKER) :])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    body = SCRIPT_BODY.replace("\nresults = {", textwrap.dedent(_libdevice_program()) + "\n\nresults = {", 1)
    return run_interpreted(tmp_path_factory.mktemp("interpreter_compat"), body)


def test_libdevice_functions_match_torch(results):
    errors = results["libdevice"]
    assert "error" not in errors, errors
    assert len(errors) >= 40
    wrong = {name: count for name, count in errors.items() if count}
    assert not wrong, f"elements that differ from torch: {wrong}"


def test_libdevice_import_paths_scalars_float64_and_integers(results):
    paths = results["paths"]
    assert "error" not in paths, paths
    assert paths["float32"] < 1e-5
    assert paths["float64"] < 1e-12
    assert paths["int"] is True


def test_an_unmapped_libdevice_function_is_not_supported_in_interpreter_mode(results):
    message = results["unmapped"]
    assert "libdevice.rcp64h is not supported in interpreter mode" in message, message


def test_to_works_on_python_scalars(results):
    error = results["scalar_to"]
    assert isinstance(error, float), error
    assert error < 1e-6


def test_autotune_runs_the_config_with_the_fewest_programs(results):
    tuned = results["autotune"]
    assert "error" not in tuned, tuned
    assert tuned["fewest"] == [["128"], True]
    assert tuned["cached_then_retuned"] == [["128", "256"], True]
    assert tuned["static_grid"] == ["32"]
    assert tuned["two_d"] == [["64x16"], True]


def test_autotune_respects_pruning_stacked_heuristics_and_reset_to_zero(results):
    tuned = results["autotune"]
    assert "error" not in tuned, tuned
    assert tuned["pruned"] == [["64"], True]
    assert tuned["heuristics"] == [["split1"], True]
    # a GPU zeroes reset_to_zero arguments after benchmarking, before the real launch
    assert tuned["reset_to_zero"] == [["64"], True]


def test_jit_helpers_patch_the_language_once_per_launch(results):
    calls = results["device_calls"]
    assert "per_launch" in calls, calls
    assert calls["error"] < 1e-5
    # the launch itself and the first calls of helpers from triton.language, not all 80
    assert 1 <= max(calls["per_launch"]) <= 4, calls


def test_install_does_nothing_outside_the_interpreter(tmp_path):
    body = textwrap.dedent(
        """
        import json
        import triton.language.extra.cuda.libdevice as cuda_libdevice
        from triton.runtime.autotuner import Autotuner
        from kuberft_reward import interpreter_compat

        before = (Autotuner.run, cuda_libdevice.tanh)
        interpreter_compat.install()
        print("KUBERFT-RESULTS " + json.dumps({"unchanged": (Autotuner.run, cuda_libdevice.tanh) == before}))
        """
    )
    assert run_interpreted(tmp_path, body, interpret=False) == {"unchanged": True}
