"""A generated family of kernel tasks: short compositions of elementwise ops and row-wise
reductions. An id describes its task completely, so any component (the trainer's dataset, the
reward pool's TaskSet) rebuilds the task source and its reference Triton solution from the id
alone, with no file. Imports nothing heavy.

Id grammar: a kind, then tokens joined by `.` in the order they apply.

    ew.<op>[.<op>[.<op>]]             x -> ops:          ew.relu.mul2.add1   = relu(x) * 2 + 1
    bin.<binary>[.<op>]               (x, y) -> op:      bin.sub.clamp-1_1   = clamp(x - y, -1, 1)
    row.[<op>.]<reduction>[.mul<c>]   over the last dim: row.relu.sum.mul0p5 = relu(x).sum(-1) * 0.5

    op         relu sigmoid exp abs neg square, addx subx (the residual: + x, - x; never first),
               mul<c> add<c> max<c> (the larger of the value and c), clamp<lo>_<hi>
    binary     sub mul add max
    reduction  sum max mean
    c          from a small set (UNARY lists every op token); `p` is the decimal point:
               mul0p5 is * 0.5, add-1 is - 1

The family (`catalogue()`) is every composition of the grammar, with no op kind twice in a
row, that does distinct work: evaluated in plain Python on fixed normal samples, its output is
finite and bounded, not constant, not the same function as an earlier composition (shorter ones
come first: `ew.mul2.subx`, the identity, is left out), and it changes when any one op is
dropped (`ew.abs.relu` is left out). Any grammatical id builds a task, in the family or not.

Split (`split_of`): a composition is held out when two of its steps are adjacent in an order
training never shows. `held_out_pair` picks a fifth of the ordered pairs of step kinds
(constants ignored: `relu>mul` covers relu.mul2 and relu.mul3; binaries and reductions are
kinds too: `bin.sub>relu`, `relu>row.sum`, `row.sum>mul`) by a hash of their names; a
composition with such a pair is held out, the rest train. Every op, binary and reduction of a
held-out task appears in training (a test checks it); only the adjacency is new.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

KINDS = ("ew", "bin", "row")
SPLITS = ("train", "heldout")
HELD_OUT_FRACTION = 0.2
MAX_CHAIN = 3
BOUND = 1e4
"""The largest magnitude a composition may reach on inputs in [-5, 5] (normal inputs stay
there): beyond it float32 rounding, not the kernel, would decide the comparison."""

ADD, MUL, NEG, ATOM = 1, 2, 3, 4
"""Precedence of a rendered PyTorch expression: an operand of lower precedence is parenthesised."""


@dataclass(frozen=True)
class Step:
    """One op of the grammar, rendered for PyTorch (the task) and Triton (the solution)."""

    torch: str
    """PyTorch expression of the operand `{v}` (x and y are the inputs)."""
    precedence: int
    operand: int
    """The least precedence `{v}` may have without parentheses."""
    triton: str
    """Triton expression of `{v}`, a name (x and y are the loaded inputs)."""
    value: Callable[..., float]
    """The op on Python floats: (v, x) for a unary op, (x, y) for a binary, (row) for a reduction."""


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def _id_number(c: float) -> str:
    return f"{c:g}".replace(".", "p")


def _unary_ops() -> dict[str, Step]:
    ops = {
        "relu": Step("torch.relu({v})", ATOM, 0, "tl.maximum({v}, 0.0)", lambda v, x: max(v, 0.0)),
        "sigmoid": Step("torch.sigmoid({v})", ATOM, 0, "tl.sigmoid({v})", lambda v, x: _sigmoid(v)),
        "exp": Step("torch.exp({v})", ATOM, 0, "tl.exp({v})", lambda v, x: math.exp(v)),
        "abs": Step("torch.abs({v})", ATOM, 0, "tl.abs({v})", lambda v, x: abs(v)),
        "neg": Step("-{v}", NEG, NEG, "-{v}", lambda v, x: -v),
        "square": Step("torch.square({v})", ATOM, 0, "{v} * {v}", lambda v, x: v * v),
        "addx": Step("{v} + x", ADD, ADD, "{v} + x", lambda v, x: v + x),
        "subx": Step("{v} - x", ADD, ADD, "{v} - x", lambda v, x: v - x),
    }
    for c in (0.5, 2, 3):
        ops[f"mul{_id_number(c)}"] = Step(f"{{v}} * {c:g}", MUL, MUL, f"{{v}} * {float(c)!r}", lambda v, x, c=c: v * c)
    for c in (1, -1, 0.5):
        sign = "+" if c > 0 else "-"
        ops[f"add{_id_number(c)}"] = Step(
            f"{{v}} {sign} {abs(c):g}", ADD, ADD, f"{{v}} {sign} {float(abs(c))!r}", lambda v, x, c=c: v + c
        )
    for c in (-1, 0.5):
        ops[f"max{_id_number(c)}"] = Step(
            f"torch.clamp({{v}}, min={c:g})", ATOM, 0, f"tl.maximum({{v}}, {float(c)!r})", lambda v, x, c=c: max(v, c)
        )
    for lo, hi in ((-1, 1), (0, 1), (-0.5, 0.5)):
        ops[f"clamp{_id_number(lo)}_{_id_number(hi)}"] = Step(
            f"torch.clamp({{v}}, {lo:g}, {hi:g})", ATOM, 0, f"tl.minimum(tl.maximum({{v}}, {float(lo)!r}), {float(hi)!r})",
            lambda v, x, lo=lo, hi=hi: min(max(v, lo), hi),
        )
    return ops


UNARY = _unary_ops()
BINARY = {
    "sub": Step("x - y", ADD, 0, "x - y", lambda x, y: x - y),
    "mul": Step("x * y", MUL, 0, "x * y", lambda x, y: x * y),
    "add": Step("x + y", ADD, 0, "x + y", lambda x, y: x + y),
    "max": Step("torch.maximum(x, y)", ATOM, 0, "tl.maximum(x, y)", max),
}
REDUCTIONS = {
    "sum": Step("{v}.sum(dim=-1)", ATOM, ATOM, "tl.sum({v}, axis=0)", sum),
    "max": Step("{v}.max(dim=-1).values", ATOM, ATOM, "tl.max({v}, axis=0)", max),
    "mean": Step("{v}.mean(dim=-1)", ATOM, ATOM, "tl.sum({v}, axis=0) / n_cols", lambda row: sum(row) / len(row)),
}
NEUTRAL = {"sum": "0.0", "max": "-float('inf')", "mean": "0.0"}
"""What a reduction's masked-off lanes hold (they must not change the result)."""
SCALES = tuple(token for token in UNARY if token.startswith("mul"))
RESIDUALS = ("addx", "subx")


@dataclass(frozen=True)
class Composition:
    """What a family task computes, in order: `binary` combines the inputs x and y (kind bin),
    `ops` apply element by element, `reduction` reduces each row and `scale` (a mul token)
    multiplies the result (kind row)."""

    kind: str
    ops: tuple[str, ...] = ()
    binary: str = ""
    reduction: str = ""
    scale: str = ""

    @property
    def id(self) -> str:
        return ".".join(filter(None, (self.kind, self.binary, *self.ops, self.reduction, self.scale)))

    def step_kinds(self) -> list[str]:
        """The kinds of its steps in order (constants dropped), the units of the split."""
        binary, reduction = f"bin.{self.binary}" * bool(self.binary), f"row.{self.reduction}" * bool(self.reduction)
        return list(filter(None, (binary, *map(op_kind, self.ops), reduction, self.scale and op_kind(self.scale))))


def op_kind(token: str) -> str:
    """`mul0p5` -> `mul`, `clamp-1_1` -> `clamp`, `addx` -> `addx`."""
    return re.match(r"[a-z]+", token).group()


def is_family_id(task_id: str) -> bool:
    """Whether an id is in the family's namespace (a kind, then a dot): TaskSet builds its
    task, or says what in it does not fit the grammar."""
    kind, dot, _ = task_id.partition(".")
    return kind in KINDS and bool(dot)


GRAMMAR = {
    "ew": f"1 to {MAX_CHAIN} ops",
    "bin": "a binary (sub mul add max), then at most one op",
    "row": "at most one op, a reduction (sum max mean), then at most one mul<c>",
}


def parse(task_id: str) -> Composition:
    """The composition an id names; ValueError saying which part does not fit the grammar."""
    kind, _, rest = task_id.partition(".")
    if kind not in KINDS or not rest:
        raise ValueError(f"{task_id!r} is not a family task id (ew.<op>..., bin.<binary>[.<op>] or row.[<op>.]<reduction>[.mul<c>])")
    tokens = rest.split(".")
    unknown = [t for t in tokens if t not in UNARY and t not in BINARY and t not in REDUCTIONS]
    if unknown:
        raise ValueError(f"{task_id!r}: unknown op {unknown[0]!r} (ops: {', '.join(UNARY)})")
    composition = _composition(kind, tokens)
    if composition is None:
        raise ValueError(f"{task_id!r}: {kind} ids are {GRAMMAR[kind]}")
    if not composition.binary and composition.ops and composition.ops[0] in RESIDUALS:
        raise ValueError(f"{task_id!r}: a residual ({', '.join(RESIDUALS)}) follows another op")
    return composition


def _composition(kind: str, tokens: list[str]) -> Composition | None:
    if kind == "ew" and len(tokens) <= MAX_CHAIN and all(t in UNARY for t in tokens):
        return Composition("ew", tuple(tokens))
    if kind == "bin" and tokens[0] in BINARY and len(tokens) <= 2 and all(t in UNARY for t in tokens[1:]):
        return Composition("bin", tuple(tokens[1:]), binary=tokens[0])
    at = next((i for i, t in enumerate(tokens) if t in REDUCTIONS), None)
    if kind == "row" and at is not None and at <= 1 and all(t in UNARY for t in tokens[:at]):
        after = tokens[at + 1:]
        if not after or (len(after) == 1 and after[0] in SCALES):
            return Composition("row", tuple(tokens[:at]), reduction=tokens[at], scale=after[0] if after else "")
    return None


# --------------------------------------------------------------------------- rendering


def apply_torch(step: Step, operand: tuple[str, int]) -> tuple[str, int]:
    """The PyTorch expression (text, precedence) of `step` applied to `operand`, parenthesised
    where precedence needs it."""
    text, precedence = operand
    if precedence < step.operand:
        text = f"({text})"
    return step.torch.format(v=text), step.precedence


def torch_expression(c: Composition) -> str:
    expression = (BINARY[c.binary].torch, BINARY[c.binary].precedence) if c.binary else ("x", ATOM)
    for op in c.ops:
        expression = apply_torch(UNARY[op], expression)
    if c.reduction:
        expression = apply_torch(REDUCTIONS[c.reduction], expression)
    if c.scale:
        expression = apply_torch(UNARY[c.scale], expression)
    return expression[0]


DESCRIPTIONS = {"ew": "an elementwise composition", "bin": "an elementwise function of two inputs", "row": "a row-wise reduction"}
SIZES = {"ew": (37, 129), "bin": (37, 129), "row": (64, 300)}
"""(batch_size, dim) of the inputs: not multiples of a block, so a kernel needs its masks."""


def task_source(c: Composition) -> str:
    """The KernelBench-style task: `Model`, `get_inputs`, `get_init_inputs`."""
    args = "x: torch.Tensor, y: torch.Tensor" if c.kind == "bin" else "x: torch.Tensor"
    inputs = "torch.randn(batch_size, dim), torch.randn(batch_size, dim)" if c.kind == "bin" else "torch.randn(batch_size, dim)"
    batch_size, dim = SIZES[c.kind]
    return f'''import torch
import torch.nn as nn


class Model(nn.Module):
    """Generated task {c.id}: {DESCRIPTIONS[c.kind]}."""

    def __init__(self):
        super().__init__()

    def forward(self, {args}) -> torch.Tensor:
        return {torch_expression(c)}


batch_size = {batch_size}
dim = {dim}


def get_inputs():
    return [{inputs}]


def get_init_inputs():
    return []
'''


SOLUTION_HEADER = "import torch\nimport torch.nn as nn\nimport triton\nimport triton.language as tl\n\n\n"


def solution(c: Composition) -> str:
    """The reference Triton program (one kernel, BLOCK_SIZE a constexpr, ModelNew with forward
    only), one line per op, in the idioms of the shipped solutions."""
    name = "_".join(c.step_kinds()).replace("bin.", "").replace("row.", "") + "_kernel"
    lines = [f"out = {BINARY[c.binary].triton}"] if c.binary else []
    for op in c.ops:
        lines.append(f"out = {UNARY[op].triton.format(v='out' if lines else 'x')}")
    if c.reduction:
        return SOLUTION_HEADER + _row_solution(c, name, lines)
    return elementwise_program(name, lines, binary=bool(c.binary))


def elementwise_program(name: str, lines: list[str], binary: bool = False) -> str:
    """A one-kernel elementwise program over x (and y when `binary`) whose kernel `name` runs
    `lines` (Triton statements on the loaded x and y, leaving the result in `out`)."""
    args, pointers = ("x, y", "x_ptr, y_ptr") if binary else ("x", "x_ptr")
    loads = "".join(f"    {v} = tl.load({v}_ptr + offsets, mask=mask, other=0.0)\n" for v in args.split(", "))
    body = "".join(f"    {line}\n" for line in lines)
    contiguous = "x, y = x.contiguous(), y.contiguous()" if binary else "x = x.contiguous()"
    signature = "x: torch.Tensor, y: torch.Tensor" if binary else "x: torch.Tensor"
    return SOLUTION_HEADER + f'''@triton.jit
def {name}({pointers}, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
{loads}{body}    tl.store(out_ptr + offsets, out, mask=mask)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, {signature}) -> torch.Tensor:
        {contiguous}
        out = torch.empty_like(x)
        n = x.numel()
        grid = (triton.cdiv(n, 1024),)
        {name}[grid]({args}, out, n, BLOCK_SIZE=1024)
        return out
'''


def _row_solution(c: Composition, name: str, lines: list[str]) -> str:
    neutral = NEUTRAL[c.reduction]
    if lines:
        lines.append(f"out = tl.where(mask, out, {neutral})")
    result = REDUCTIONS[c.reduction].triton.format(v="out" if lines else "x")
    if c.scale:
        result = UNARY[c.scale].triton.format(v=result)
    body = "".join(f"    {line}\n" for line in lines)
    return f'''@triton.jit
def {name}(x_ptr, out_ptr, n_rows, n_cols, stride_row, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_row + cols, mask=mask, other={"0.0" if lines else neutral})
{body}    tl.store(out_ptr + row, {result}, mask=row < n_rows)


class ModelNew(nn.Module):
    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        n_rows, n_cols = x.shape
        out = torch.empty(n_rows, dtype=x.dtype, device=x.device)
        {name}[(n_rows,)](x, out, n_rows, n_cols, x.stride(0), BLOCK_SIZE=triton.next_power_of_2(n_cols))
        return out
'''


# --------------------------------------------------------------------------- the family and its split

_SAMPLES = random.Random(0)
SAMPLE_X = tuple(_SAMPLES.gauss(0.0, 1.0) for _ in range(64))
SAMPLE_Y = tuple(_SAMPLES.gauss(0.0, 1.0) for _ in range(64))
SAMPLE_ROWS = tuple(tuple(_SAMPLES.gauss(0.0, 1.0) for _ in range(64)) for _ in range(8))
"""Normal inputs like get_inputs()'s: where a composition must differ from its variants."""
EXTREMES = (-5.0, -2.5, -0.5, 0.0, 0.5, 2.5, 5.0)
"""Where it must stay finite and within BOUND."""


INPUTS = {
    "samples": (SAMPLE_X, SAMPLE_Y),
    "extremes": tuple(zip(*itertools.product(EXTREMES, EXTREMES))),
    "rows": (tuple(x for row in SAMPLE_ROWS for x in row), (0.0,) * sum(map(len, SAMPLE_ROWS))),
}


class Evaluator:
    """Compositions evaluated in plain Python on INPUTS, each prefix once (a composition's
    values extend those of its prefix). None where a value leaves [-BOUND, BOUND]."""

    def __init__(self):
        self._memo: dict[tuple, tuple[float, ...] | None] = {}

    def elementwise(self, binary: str, ops: tuple[str, ...], inputs: str) -> tuple[float, ...] | None:
        key = (binary, ops, inputs)
        if key not in self._memo:
            xs, ys = INPUTS[inputs]
            if ops:
                before = self.elementwise(binary, ops[:-1], inputs)
                op = UNARY[ops[-1]].value
                values = None if before is None else _bounded(lambda: [op(v, x) for v, x in zip(before, xs)])
            else:
                values = _bounded(lambda: [BINARY[binary].value(x, y) for x, y in zip(xs, ys)]) if binary else xs
            self._memo[key] = values
        return self._memo[key]

    def of(self, c: Composition) -> tuple[float, ...] | None:
        """Its outputs on the samples (one per row for a reduction)."""
        if not c.reduction:
            return self.elementwise(c.binary, c.ops, "samples")
        values = self.elementwise("", c.ops, "rows")
        if values is None:
            return None
        width = len(SAMPLE_ROWS[0])
        reduce, scale = REDUCTIONS[c.reduction].value, UNARY[c.scale].value if c.scale else (lambda v, x: v)
        return _bounded(lambda: [scale(reduce(values[i:i + width]), 0.0) for i in range(0, len(values), width)])

    def bounded(self, c: Composition) -> bool:
        """Whether its elementwise part stays within BOUND on the extremes."""
        return self.elementwise(c.binary, c.ops, "extremes") is not None


def _bounded(compute: Callable[[], list[float]]) -> tuple[float, ...] | None:
    try:
        values = compute()
    except OverflowError:
        return None
    return tuple(values) if all(abs(v) <= BOUND for v in values) else None  # NaN fails too


def _same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(abs(u - v) <= 1e-3 * (1.0 + abs(u)) for u, v in zip(a, b))


def _fingerprint(values: tuple[float, ...]) -> tuple[str, ...]:
    return tuple(f"{v:.5g}" for v in values)


def candidates() -> list[Composition]:
    """Every composition of the grammar whose ops change kind at each step (mul2.mul3 folds
    into one constant, sigmoid.sigmoid says little new), shorter first, in table order."""
    chains = [
        ops for n in range(1, MAX_CHAIN + 1) for ops in itertools.product(UNARY, repeat=n)
        if ops[0] not in RESIDUALS and all(op_kind(a) != op_kind(b) for a, b in zip(ops, ops[1:]))
    ]
    pre_ops = [(), *((op,) for op in UNARY if op not in RESIDUALS)]
    return (
        [Composition("ew", ops) for ops in chains]
        + [Composition("bin", ops, binary=b) for b in BINARY for ops in [(), *((op,) for op in UNARY)]]
        + [Composition("row", pre, reduction=r, scale=s) for r in REDUCTIONS for pre in pre_ops for s in ("", *SCALES)]
    )


def _variants(c: Composition) -> list[Composition]:
    """The composition with one op (or the scale) dropped."""
    dropped = [Composition(c.kind, c.ops[:i] + c.ops[i + 1:], c.binary, c.reduction, c.scale) for i in range(len(c.ops))]
    return dropped + ([Composition(c.kind, c.ops, c.binary, c.reduction)] if c.scale else [])


@functools.lru_cache(maxsize=1)
def catalogue() -> tuple[Composition, ...]:
    """The family: the candidates that do distinct work (see the module docstring)."""
    values_of = Evaluator()
    seen = {
        "ew": {_fingerprint(SAMPLE_X)},  # the identity
        "bin": {_fingerprint(SAMPLE_X), _fingerprint(SAMPLE_Y)},  # x or y alone
        "row": set(),
    }
    family = []
    for c in candidates():
        values = values_of.of(c)
        if values is None or not values_of.bounded(c) or max(values) - min(values) < 1e-3:
            continue
        fingerprint = _fingerprint(values)
        if fingerprint in seen[c.kind]:
            continue
        seen[c.kind].add(fingerprint)
        if any((other := values_of.of(v)) is not None and _same(values, other) for v in _variants(c)):
            continue
        family.append(c)
    return tuple(family)


def held_out_pair(first: str, second: str) -> bool:
    """Whether the step kinds `first` then `second`, adjacent, are kept out of training."""
    digest = hashlib.sha256(f"{first}>{second}".encode()).digest()
    return digest[0] < 256 * HELD_OUT_FRACTION


def split_of(c: Composition) -> str:
    kinds = c.step_kinds()
    return "heldout" if any(held_out_pair(a, b) for a, b in zip(kinds, kinds[1:])) else "train"
