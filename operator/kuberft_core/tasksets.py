"""The rows of the built-in datasets (`RFTJob.spec.dataset.builtin`), imported by the trainer.
Imports nothing heavy: kernel tasks are read as text.

- `triton-kernels`: one row per shipped kernel task, `{"prompt", "task"}`; the reward pool
  finds the task by id.
- `countdown`: generated puzzles `{"prompt": "Use 3 7 25 to make 46.\\n", "numbers": [3, 7, 25],
  "target": 46}`, answered by a plain arithmetic expression (`25+3*7`).
"""

from __future__ import annotations

import random
from typing import Any

from .arithmetic import expression_value
from .kernel_tasks import TaskSet

KERNEL_INSTRUCTIONS = """\
Convert this PyTorch module into Triton kernels.

Answer with a complete Python program between <triton> and </triton> that imports torch,
triton and triton.language as tl, defines @triton.jit kernels that do the computation (with a
mask on every tl.load and tl.store), and defines class ModelNew(nn.Module) with the same
constructor and forward signature as Model. ModelNew.forward allocates the outputs and
launches the kernels; it must not compute the result with PyTorch operations. Inputs come
from get_inputs() (float32).

<torch_code>
{source}
</torch_code>
"""

COUNTDOWN_DEFAULTS = {"numbers": 3, "maxNumber": 20, "operators": "+-*", "ordered": False, "positiveTargets": True}
"""Countdown generator options: how many numbers, their range, the operators; `ordered`: the
target comes from the numbers in the listed order, left to right (an easier puzzle: an answer
never needs to reorder them); `positiveTargets`: only targets above zero (classic Countdown)."""


def builtin_rows(name: str, size: int, seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the built-in dataset `name`. `size` and `seed` apply to generated sets
    (countdown); fixed sets (triton-kernels) return all their rows. Raises ValueError naming
    the bad field."""
    if name == "triton-kernels":
        if options:
            raise ValueError(f"dataset.builtin.options: triton-kernels takes no options, got {sorted(options)}")
        tasks = TaskSet()
        return [{"prompt": kernel_prompt(tasks.get(task_id).source), "task": task_id} for task_id in tasks.ids()]
    if name == "countdown":
        return countdown_rows(size, seed, options)
    raise ValueError(f"dataset.builtin.name: unknown built-in dataset {name!r} (known: triton-kernels, countdown)")


def kernel_prompt(task_source: str) -> str:
    return KERNEL_INSTRUCTIONS.format(source=task_source.strip())


def countdown_rows(size: int, seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = sorted(set(options) - set(COUNTDOWN_DEFAULTS))
    if unknown:
        raise ValueError(
            f"dataset.builtin.options.{unknown[0]}: unknown countdown option (known: {', '.join(COUNTDOWN_DEFAULTS)})"
        )
    opts = {**COUNTDOWN_DEFAULTS, **options}
    count, max_number, operators = opts["numbers"], opts["maxNumber"], opts["operators"]
    if type(count) is not int or not 2 <= count <= 6:
        raise ValueError(f"dataset.builtin.options.numbers: must be an integer from 2 to 6, got {count!r}")
    if type(max_number) is not int or not 2 <= max_number <= 10_000:
        raise ValueError(f"dataset.builtin.options.maxNumber: must be an integer from 2 to 10000, got {max_number!r}")
    if not isinstance(operators, str) or not operators or set(operators) - set("+-*/"):
        raise ValueError(f"dataset.builtin.options.operators: must be a non-empty string of + - * /, got {operators!r}")
    for flag in ("ordered", "positiveTargets"):
        if type(opts[flag]) is not bool:
            raise ValueError(f"dataset.builtin.options.{flag}: must be true or false, got {opts[flag]!r}")
    if type(size) is not int or size < 1:
        raise ValueError(f"dataset.builtin.size: must be a positive integer, got {size!r}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < size:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        target = (_ordered_target if opts["ordered"] else _random_target)(numbers, operators, rng)
        if target is None or (opts["positiveTargets"] and target <= 0):
            continue
        rows.append({"prompt": f"Use {' '.join(map(str, numbers))} to make {target}.\n", "numbers": numbers, "target": target})
    return rows


def _ordered_target(numbers: list[int], operators: str, rng: random.Random) -> int | None:
    """The value of `n1 op n2 op n3 ...` (usual precedence) with random operators, or None
    when it is not a whole number (or divides by zero)."""
    expression = str(numbers[0])
    for number in numbers[1:]:
        expression += rng.choice(operators) + str(number)
    try:
        value = expression_value(expression, operators)
    except ValueError:
        return None
    return int(value) if value.denominator == 1 else None


def _random_target(numbers: list[int], operators: str, rng: random.Random) -> int | None:
    """The value of a random expression using every number once (so the target is reachable),
    or None when a division does not come out whole."""
    pool = list(numbers)
    rng.shuffle(pool)
    while len(pool) > 1:
        a = pool.pop(rng.randrange(len(pool)))
        b = pool.pop(rng.randrange(len(pool)))
        choices = [op for op in operators if op != "/" or (b != 0 and a % b == 0)]
        op = rng.choice(choices) if choices else None
        if op is None:
            return None
        pool.append(a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b)
    return pool[0]
