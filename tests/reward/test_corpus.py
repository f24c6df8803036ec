"""The kernel corpus (tests/reward/corpus/<program>/): correct Triton programs written in the
idioms of public kernel libraries and the Triton tutorials (autotune, libdevice math, `input`
as a name, host-side reshape glue, strides, 2-D tiles, loops over column blocks, tl.dot with
tails, heuristics, helper @triton.jit functions, static_range, integer and float16 inputs...),
each on a KernelBench-style task, with wrong mutations (realistic bugs).

Many mutations are only wrong on inputs KernelBench's defaults never produce: signed inputs
(torch.rand is >= 0), re-initialised parameters (LayerNorm starts at weight 1, bias 0) or
odd-sized shapes (defaults are multiples of the block sizes). Each wrong file says so in its
`# Caught by:` header.

The evaluator must give every correct program full correctness (no false negatives) and
every mutation less (no false positives). `corpus/direct_check.py` checks the corpus itself
outside the sandbox: correct programs match the reference on every variant, mutations are
wrong where their header says."""

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from kuberft_core.reward_protocol import EvaluateRequest

from .conftest import KERNEL_REWARDS, tagged

CORPUS = Path(__file__).parent / "corpus"
REWARD_IMAGE = Path(__file__).resolve().parents[2] / "reward_image"


def _direct_check_module():
    spec = importlib.util.spec_from_file_location("corpus_direct_check", CORPUS / "direct_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DIRECT = _direct_check_module()
ENTRIES = DIRECT.entries()


def test_the_corpus_is_large_and_mutations_say_what_catches_them():
    correct = [e for e in ENTRIES if e["kind"] == "correct"]
    wrong = [e for e in ENTRIES if e["kind"] == "wrong"]
    assert len(correct) >= 32
    programs = {e["program"] for e in correct}
    assert programs == {e["program"] for e in ENTRIES}, "every corpus folder has a correct.py"
    assert programs == {e["program"] for e in wrong}, "every program has at least one wrong mutation"
    kinds = Counter(e["caught_by"].split(" (")[0] for e in wrong)
    assert set(kinds) <= {"any inputs", "signed inputs", "re-initialised parameters", "odd-sized shapes"}, kinds
    assert kinds["signed inputs"] >= 5 and kinds["re-initialised parameters"] >= 2 and kinds["odd-sized shapes"] >= 5, kinds


@pytest.mark.slow  # checks the corpus itself (every file on five input variants), not the product
def test_the_corpus_is_sound_outside_the_sandbox():
    """Each program run directly (not through the evaluator) under TRITON_INTERPRET=1 against
    its task's Model on default, signed, re-initialised and odd-sized variants. Takes minutes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REWARD_IMAGE), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, str(CORPUS / "direct_check.py")], env=env, capture_output=True, text=True, timeout=3000,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(DIRECT.MARKER)]
    assert lines, f"direct_check.py failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(lines[-1][len(DIRECT.MARKER):])
    assert set(summary) == {e["name"] for e in ENTRIES}
    problems = {name: (s["problem"], s["results"]) for name, s in summary.items() if s["problem"]}
    assert not problems, "\n".join(f"{name}: {problem}\n    {results}" for name, (problem, results) in sorted(problems.items()))


@pytest.fixture(scope="module")
def evaluator_results(pool):
    """Every program of the corpus scored in ONE batched request."""
    items = [
        {"completion": tagged(Path(e["path"]).read_text()), "task": {"source": Path(e["task"]).read_text(), "name": e["program"]}}
        for e in ENTRIES
    ]
    response = pool.evaluate_sync(EvaluateRequest.model_validate({"items": items, "rewards": KERNEL_REWARDS}))
    return dict(zip((e["name"] for e in ENTRIES), response.results))


def _line(entry: dict, result) -> str:
    correctness = result.rewards["triton.correctness"]
    compile_ = result.rewards["triton.compile"]
    reason = correctness.reason if correctness.reason else compile_.reason
    hacked = " HACKED" if result.hacked else ""
    caught = f" [{entry['caught_by']}]" if entry["kind"] == "wrong" else ""
    seconds = f" [{result.seconds:.1f} s]" if getattr(result, "seconds", None) else ""
    return f"  {entry['name']}{caught}: correctness {correctness.score:g} ({correctness.outcome}){hacked}{seconds}: {reason[:300]}"


def test_the_evaluator_scores_the_corpus_right(evaluator_results):
    false_negatives, false_positives = [], []
    for entry in ENTRIES:
        result = evaluator_results[entry["name"]]
        score = result.rewards["triton.correctness"].score
        if entry["kind"] == "correct" and (score != 1.0 or result.hacked):
            false_negatives.append(_line(entry, result))
        elif entry["kind"] == "wrong" and score >= 1.0:
            false_positives.append(_line(entry, result))
    correct = sum(e["kind"] == "correct" for e in ENTRIES)
    wrong = len(ENTRIES) - correct
    print("\nevery program of the corpus, as the evaluator scored it:")
    print("\n".join(_line(entry, evaluator_results[entry["name"]]) for entry in ENTRIES))
    report = [
        f"corpus: {correct} correct programs, {wrong} wrong mutations",
        f"false negatives (correct programs not given full correctness, or flagged as hacks): {len(false_negatives)}/{correct}",
        *false_negatives,
        f"false positives (wrong mutations given full correctness): {len(false_positives)}/{wrong}",
        *false_positives,
    ]
    print("\n".join(report))
    assert not false_negatives and not false_positives, "\n".join(report)
