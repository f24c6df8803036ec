"""The rows of the built-in datasets (`RFTJob.spec.dataset.builtin`), imported by the trainer.
Imports nothing heavy: kernel tasks are read as text.

- `triton-kernels`: one row per shipped kernel task, `{"prompt", "task"}`; the reward pool
  finds the task by id.
- `triton-family`: generated kernel tasks (`kernel_families`: elementwise compositions and
  row-wise reductions), `{"prompt", "task", "solution", "completion", "expression"}`, from the
  training or the held-out split; the reward pool rebuilds each task from its id; `solution`
  is the reference program and `completion` the same as an answer (between <triton> tags):
  labels for supervised fine-tuning (`spec.sft`), which the reward pool ignores; `expression`
  is what Model.forward returns (`torch.relu(x) * 2 + 1`), for a short prompt
  (`dataset.promptTemplate: "... {expression}"`) where the whole task source is too long.
- `countdown`: generated puzzles `{"prompt": "Use 3 7 25 to make 46.\\n", "numbers": [3, 7, 25],
  "target": 46}`, answered by a plain arithmetic expression (`25+3*7`).
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from . import kernel_families
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


FAMILY_DEFAULTS = {"split": "train", "kinds": list(kernel_families.KINDS)}
"""triton-family options: `split`, `train` or `heldout` (compositions that put two ops next to
each other in an order the training split never shows); `kinds`, of `ew` (elementwise chains),
`bin` (two inputs) and `row` (row-wise reductions)."""


def builtin_rows(name: str, size: int, seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the built-in dataset `name`. `size` and `seed` apply to generated sets
    (countdown: `size` rows; triton-family: at most `size`); fixed sets (triton-kernels) return
    all their rows. Raises ValueError naming the bad field."""
    if name == "triton-kernels":
        if options:
            raise ValueError(f"dataset.builtin.options: triton-kernels takes no options, got {sorted(options)}")
        tasks = TaskSet()
        return [{"prompt": kernel_prompt(tasks.get(task_id).source), "task": task_id} for task_id in tasks.ids()]
    if name == "triton-family":
        return family_rows(size, seed, options)
    if name == "countdown":
        return countdown_rows(size, seed, options)
    raise ValueError(f"dataset.builtin.name: unknown built-in dataset {name!r} (known: triton-kernels, triton-family, countdown)")


def kernel_prompt(task_source: str) -> str:
    return KERNEL_INSTRUCTIONS.format(source=task_source.strip())


def family_rows(size: int, seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Up to `size` tasks of the chosen split and kinds, the kinds taking turns (each kind's
    tasks in a seeded order) so that a short prefix mixes them; fewer when the split has fewer."""
    unknown = sorted(set(options) - set(FAMILY_DEFAULTS))
    if unknown:
        raise ValueError(
            f"dataset.builtin.options.{unknown[0]}: unknown triton-family option (known: {', '.join(FAMILY_DEFAULTS)})"
        )
    opts = {**FAMILY_DEFAULTS, **options}
    split, kinds = opts["split"], opts["kinds"]
    if split not in kernel_families.SPLITS:
        raise ValueError(f"dataset.builtin.options.split: must be one of {', '.join(kernel_families.SPLITS)}, got {split!r}")
    if not isinstance(kinds, list) or not kinds or any(kind not in kernel_families.KINDS for kind in kinds):
        raise ValueError(f"dataset.builtin.options.kinds: must be a non-empty list of {', '.join(kernel_families.KINDS)}, got {kinds!r}")
    if type(size) is not int or size < 1:
        raise ValueError(f"dataset.builtin.size: must be a positive integer, got {size!r}")
    rng = random.Random(seed)
    by_kind = []
    for kind in dict.fromkeys(kinds):
        tasks = [c for c in kernel_families.catalogue() if c.kind == kind and kernel_families.split_of(c) == split]
        rng.shuffle(tasks)
        by_kind.append(tasks)
    taking_turns = [c for turn in itertools.zip_longest(*by_kind) for c in turn if c is not None]
    return [family_row(c) for c in taking_turns[:size]]


def family_row(c: kernel_families.Composition) -> dict[str, Any]:
    """The triton-family row of one composition."""
    solution = kernel_families.solution(c)
    return {"prompt": kernel_prompt(kernel_families.task_source(c)), "task": c.id, "solution": solution,
            "completion": kernel_completion(solution), "expression": kernel_families.torch_expression(c)}


def kernel_completion(program: str) -> str:
    """A program as the answer the triton.* rewards read: between <triton> and </triton>."""
    return f"<triton>\n{program}</triton>\n"


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
