"""Tiny models for runs without a model hub: `model.name: tiny:<recipe>` in an RFTJob.

Each recipe builds a small Llama with a character-level tokenizer in code and pretrains it
briefly (supervised) on a task's *answer format*, so that reinforcement fine-tuning starts
from a model that answers in the right shape but is mostly wrong, as a real base model would.
Built once per recipe version and cached under $KUBERFT_CACHE/models (default
~/.cache/kuberft/models); concurrent builders wait for each other.

Recipes:
- `tiny:random`    untrained (tests).
- `tiny:countdown` writes `a<op>b` expressions over the given numbers with a random operator,
                   right about a third of the time; GRPO learns which operator hits the target.
- `tiny:triton`    answers `Write the Triton kernel for <task>.` with one of four shipped
                   solutions it learned by heart (relu, silu, vector_add, row_sum), with
                   sampling noise: answers that are well formed, that run or crash, and that
                   are correct only on matching tasks, which exercises every reward of the
                   pipeline (it does not learn to write kernels).
- `tiny:triton-shape` answers `Triton kernel for <expression>` (a triton-family row's
                   `expression`) with a program in the family's reference style; pretrained on
                   single-op family tasks and generic op chains (`TritonShapeMaterial` says
                   exactly what it saw), never on two family ops next to each other: the
                   starting point of `benchmarks/rft_vs_sft.py`. A byte-pair tokenizer learnt
                   from the same texts keeps a program near 90 tokens.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PREFIX = "tiny:"

log = logging.getLogger("kuberft.tiny")


@dataclass(frozen=True)
class Recipe:
    version: int
    build: Callable[[Path], None]
    description: str


def cache_root() -> Path:
    return Path(os.environ.get("KUBERFT_CACHE", Path.home() / ".cache" / "kuberft")) / "models"


def is_tiny(name: str) -> bool:
    return name.startswith(PREFIX)


def resolve(name: str) -> Path:
    """The local directory of the tiny model `name` (`tiny:<recipe>`), built on first use."""
    recipe_name = name[len(PREFIX):]
    recipe = RECIPES.get(recipe_name)
    if recipe is None:
        known = ", ".join(PREFIX + r for r in RECIPES)
        raise ValueError(f"unknown tiny model {name!r}; known: {known}")
    target = cache_root() / f"tiny-{recipe_name}-v{recipe.version}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        log.info("building %s (%s) into %s, once", name, recipe.description, target)
        try:
            recipe.build(staging)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _supervised_pretrain(model_dir: Path, sample_texts: Callable[[random.Random, int], list[str]], *,
                         iterations: int, batch_size: int, learning_rate: float, seed: int) -> None:
    """Teach the model at `model_dir` to continue texts like `sample_texts` produces (next-token
    loss on whole sequences, each ended with EOS so generation stops after the answer), then
    save it in place."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import limit_cpu_threads_for_small_models

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    limit_cpu_threads_for_small_models(model, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for iteration in range(1, iterations + 1):
        texts = [text + tokenizer.eos_token for text in sample_texts(rng, batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if iteration % 100 == 0 or iteration == iterations:
            log.info("pretraining %s: %d/%d, loss %.3f", model_dir.name, iteration, iterations, loss.item())
    model.save_pretrained(model_dir)


def _build_random(out: Path) -> None:
    from .models import build_tiny_model

    build_tiny_model(out, seed=0)


# The puzzles of `examples/local-countdown.yaml` (its dataset.builtin.options): two numbers in
# 1-9, targets from the numbers in the listed order, negative targets allowed.
COUNTDOWN_OPTIONS = {"numbers": 2, "maxNumber": 9, "operators": "+-*", "ordered": True, "positiveTargets": False}


def _build_countdown(out: Path) -> None:
    from .models import build_tiny_model
    from .tasksets import builtin_rows

    build_tiny_model(out, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=256,
                     max_positions=128, seed=0, chat_template=False)
    puzzles = builtin_rows("countdown", 4096, 12345, COUNTDOWN_OPTIONS)
    operators = COUNTDOWN_OPTIONS["operators"]

    def well_formed_guesses(rng: random.Random, n: int) -> list[str]:
        texts = []
        for row in rng.sample(puzzles, n):
            expression = str(row["numbers"][0])
            for number in row["numbers"][1:]:
                expression += rng.choice(operators) + str(number)
            texts.append(row["prompt"] + expression + "\n")
        return texts

    _supervised_pretrain(out, well_formed_guesses, iterations=600, batch_size=64, learning_rate=3e-3, seed=0)


# The prompt `examples/local-triton.yaml` gives the tiny kernel model (its dataset.promptTemplate).
TRITON_PROMPT = "Write the Triton kernel for {task}.\n"
# The shipped solutions the tiny kernel model learns by heart (the shortest ones: a model this
# small cannot hold all of them); for the other tasks it answers with one of these.
TRITON_IMITATED_TASKS = ("relu", "silu", "vector_add", "row_sum")


def _build_triton(out: Path) -> None:
    from .kernel_tasks import shipped_solution
    from .models import build_tiny_model

    examples = [
        TRITON_PROMPT.format(task=task) + f"<triton>\n{shipped_solution(task)}</triton>\n"
        for task in TRITON_IMITATED_TASKS
    ]
    build_tiny_model(out, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256,
                     max_positions=2048, seed=0, chat_template=False)

    def solutions(rng: random.Random, n: int) -> list[str]:
        return rng.sample(examples, min(n, len(examples)))

    _supervised_pretrain(out, solutions, iterations=400, batch_size=4, learning_rate=3e-3, seed=0)


# `tiny:triton-shape` answers the prompt of `examples/local-rft-vs-sft.yaml` (its
# dataset.promptTemplate, over a triton-family row's `expression`).
TRITON_SHAPE_PROMPT = "Triton kernel for {expression}\n"
SHAPE_FAMILY_RATE = 0.6
"""How often an op of a generic chain is a family op (never next to another family op)."""
SHAPE_SINGLES = 0.3
"""The share of single-op family tasks among the pretraining texts."""


class TritonShapeMaterial:
    """The pretraining texts of `tiny:triton-shape`, prompt + answer in the experiment's format.
    What it sees:

    - every single-op elementwise family task (`ew.relu`, `ew.mul2`, ...: `singles`), each
      family op alone, applied to the input, with its reference answer;
    - chains of 1-3 ops (`chain`) of a generic vocabulary that is not the family's (sin, cos,
      log, sqrt, floor, ceil, `/ c`, `clamp(max=c)`), an op being a family op instead
      SHAPE_FAMILY_RATE of the time, never next to another family op, and never a chain of
      family ops alone, rendered like the family's reference programs.

    So it knows the program skeleton, each family op alone and inside generic chains, and how a
    nested expression becomes one `out = ...` line per op, innermost first; it never saw two
    family ops next to each other, which is what every multi-op family task is made of (in the
    training split and the held-out split alike)."""

    def __init__(self):
        from . import kernel_families as kf

        self.kf = kf
        generic = {f: kf.Step(f"torch.{f}({{v}})", kf.ATOM, 0, f"tl.{f}({{v}})", None)
                   for f in ("sin", "cos", "log", "sqrt", "floor", "ceil")}  # value: never evaluated
        generic |= {f"div{c}": kf.Step(f"{{v}} / {c}", kf.MUL, kf.MUL, f"{{v}} / {float(c)!r}", None) for c in (4, 8, 10)}
        generic |= {f"min{c}": kf.Step(f"torch.clamp({{v}}, max={c})", kf.ATOM, 0, f"tl.minimum({{v}}, {float(c)!r})", None)
                    for c in (0, 1, 2)}
        self.generic = list(generic)
        self.steps = {**generic, **kf.UNARY}
        self.singles = [self.text([c.ops[0]]) for c in kf.catalogue() if c.kind == "ew" and len(c.ops) == 1]

    def chain_ops(self, rng: random.Random) -> list[str]:
        kf, ops = self.kf, []
        length = rng.randint(1, 3)
        while len(ops) < length:
            op = rng.choice(list(kf.UNARY) if rng.random() < SHAPE_FAMILY_RATE else self.generic)
            if not ops and op in kf.RESIDUALS:
                continue
            if ops and (kf.op_kind(op) == kf.op_kind(ops[-1]) or (op in kf.UNARY and ops[-1] in kf.UNARY)):
                continue
            ops.append(op)
        return ops if any(op in self.generic for op in ops) else self.chain_ops(rng)

    def text(self, ops: list[str]) -> str:
        """The prompt and the reference-style answer of `x` through `ops` in order."""
        from .tasksets import kernel_completion

        kf, expression, lines = self.kf, ("x", self.kf.ATOM), []
        for op in ops:
            expression = kf.apply_torch(self.steps[op], expression)
            lines.append(f"out = {self.steps[op].triton.format(v='out' if lines else 'x')}")
        program = kf.elementwise_program("_".join(map(kf.op_kind, ops)) + "_kernel", lines)
        return TRITON_SHAPE_PROMPT.format(expression=expression[0]) + kernel_completion(program)

    def chain(self, rng: random.Random) -> str:
        return self.text(self.chain_ops(rng))


def _build_triton_shape(out: Path) -> None:
    from .models import build_line_bpe_tokenizer, build_tiny_model

    material = TritonShapeMaterial()
    corpus = material.singles * 10 + [material.chain(random.Random(i)) for i in range(600)]
    tokenizer = build_line_bpe_tokenizer(corpus, vocab_size=512, max_token_length=16)
    build_tiny_model(out, tokenizer=tokenizer, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                     intermediate_size=256, max_positions=512, seed=0)

    def texts(rng: random.Random, n: int) -> list[str]:
        return [rng.choice(material.singles) if rng.random() < SHAPE_SINGLES else material.chain(rng) for _ in range(n)]

    _supervised_pretrain(out, texts, iterations=600, batch_size=32, learning_rate=3e-3, seed=0)


RECIPES: dict[str, Recipe] = {
    "random": Recipe(1, _build_random, "untrained tiny Llama"),
    "countdown": Recipe(3, _build_countdown, "pretrained on the Countdown answer format"),
    "triton": Recipe(3, _build_triton, "pretrained to imitate the shipped Triton solutions"),
    "triton-shape": Recipe(1, _build_triton_shape, "pretrained on single-op family tasks and generic op chains"),
}
