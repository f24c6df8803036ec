"""The generated kernel-task family (kuberft_core.kernel_families): ids that rebuild their task
and its reference Triton solution, a catalogue of compositions that each do distinct work, a
train/held-out split by op adjacency, the `triton-family` built-in dataset, and the reference
solutions scored by the real sandboxed evaluator (wrong and hacking variants are not paid)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from kuberft_core import kernel_families as kf
from kuberft_core import tasksets
from kuberft_core.kernel_tasks import TaskError, TaskSet, check_task_source
from kuberft_core.manifests import check_document
from kuberft_core.reward_protocol import EvaluateRequest
from kuberft_reward.program import extract_program

from .conftest import KERNEL_REWARDS, tagged

FAMILY = kf.catalogue()
TRAIN = [c for c in FAMILY if kf.split_of(c) == "train"]
HELD_OUT = [c for c in FAMILY if kf.split_of(c) == "heldout"]


def load(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "<task>", "exec"), namespace)  # noqa: S102 - our own generated task source
    return namespace


# --------------------------------------------------------------------------- ids and sources


@pytest.mark.parametrize(
    ("task_id", "expression"),
    [
        ("ew.relu.mul2.add1", "torch.relu(x) * 2 + 1"),
        ("ew.sigmoid.subx", "torch.sigmoid(x) - x"),
        ("ew.add1.mul2", "(x + 1) * 2"),
        ("ew.mul2.neg.exp", "torch.exp(-(x * 2))"),
        ("ew.add-1.square.mul0p5", "torch.square(x - 1) * 0.5"),
        ("ew.max0p5.clamp-1_1", "torch.clamp(torch.clamp(x, min=0.5), -1, 1)"),
        ("bin.sub.clamp-1_1", "torch.clamp(x - y, -1, 1)"),
        ("bin.mul.addx", "x * y + x"),
        ("row.sum.mul0p5", "x.sum(dim=-1) * 0.5"),
        ("row.relu.sum.mul0p5", "torch.relu(x).sum(dim=-1) * 0.5"),
        ("row.add1.max", "(x + 1).max(dim=-1).values"),
        ("row.neg.mean.mul3", "(-x).mean(dim=-1) * 3"),
    ],
)
def test_an_id_names_its_composition_and_round_trips(task_id, expression):
    composition = kf.parse(task_id)
    assert composition.id == task_id
    assert kf.torch_expression(composition) == expression
    task = TaskSet().get(task_id)
    assert (task.id, task.path) == (task_id, None)
    assert f"        return {expression}\n" in task.source
    assert f'"""Generated task {task_id}: ' in task.source


def test_every_id_of_the_family_round_trips():
    assert all(kf.parse(c.id) == c for c in FAMILY)
    assert len({c.id for c in FAMILY}) == len(FAMILY)


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("ew.relu.tanh", "'ew.relu.tanh': unknown op 'tanh' (ops: relu, sigmoid, exp, abs, neg, square, addx, subx, mul0p5, "),
        ("ew.relu.mul2.add1.abs", "'ew.relu.mul2.add1.abs': ew ids are 1 to 3 ops"),
        ("ew.subx.relu", "'ew.subx.relu': a residual (addx, subx) follows another op"),
        ("bin.relu", "'bin.relu': bin ids are a binary (sub mul add max), then at most one op"),
        ("row.relu", "'row.relu': row ids are at most one op, a reduction (sum max mean), then at most one mul<c>"),
        ("row.sum.relu", "'row.sum.relu': row ids are at most one op, a reduction"),
        ("ew.", "'ew.' is not a family task id (ew.<op>..., bin.<binary>[.<op>] or row.[<op>.]<reduction>[.mul<c>])"),
    ],
)
def test_a_bad_family_id_is_refused_saying_what_does_not_fit(task_id, message):
    with pytest.raises(TaskError) as refused:
        TaskSet().get(task_id)
    assert str(refused.value).startswith(message)


def test_extra_task_directories_still_come_first(tmp_path):
    (tmp_path / "ew.relu.py").write_text(TaskSet().get("relu").source)
    assert TaskSet([tmp_path]).get("ew.relu").path == tmp_path / "ew.relu.py"
    with pytest.raises(TaskError, match=r"unknown task 'ew.exp' \(known: ew.relu\)$"):
        TaskSet([tmp_path], include_shipped=False).get("ew.exp")


def test_every_task_is_a_kernelbench_task_whose_model_computes_its_composition():
    """Each task's Model, run by torch on get_inputs() (finite, the right shape) and in float64
    on the catalogue's samples, where it must equal the plain-Python evaluation the family was
    filtered with (this checks the rendering, parentheses included)."""
    evaluator = kf.Evaluator()
    samples = {
        "ew": [torch.tensor(kf.SAMPLE_X, dtype=torch.float64)],
        "bin": [torch.tensor(kf.SAMPLE_X, dtype=torch.float64), torch.tensor(kf.SAMPLE_Y, dtype=torch.float64)],
        "row": [torch.tensor(kf.SAMPLE_ROWS, dtype=torch.float64)],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops: threads only contend
    torch.manual_seed(0)
    try:
        for c in FAMILY:
            source = kf.task_source(c)
            check_task_source(source, c.id)
            task = load(source)
            model = task["Model"](*task["get_init_inputs"]())
            inputs = task["get_inputs"]()
            output = model(*inputs)
            assert output.dtype == torch.float32 and bool(torch.isfinite(output).all()), c.id
            assert tuple(output.shape) == (tuple(inputs[0].shape[:-1]) if c.reduction else tuple(inputs[0].shape)), c.id
            expected = torch.tensor(evaluator.of(c), dtype=torch.float64)
            assert float((model(*samples[c.kind]) - expected).abs().max()) < 1e-9, c.id
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the family and its split


def test_the_family_has_these_many_tasks_per_kind_and_split():
    counts = Counter((c.kind, kf.split_of(c)) for c in FAMILY)
    assert counts == {
        ("ew", "train"): 1430, ("ew", "heldout"): 825,
        ("bin", "train"): 62, ("bin", "heldout"): 14,
        ("row", "train"): 109, ("row", "heldout"): 62,
    }
    assert Counter(len(c.ops) for c in FAMILY if c.kind == "ew") == {1: 17, 2: 201, 3: 2037}


def test_every_op_of_a_task_does_work_and_no_two_tasks_compute_the_same_function():
    evaluator = kf.Evaluator()
    for c in FAMILY:
        values = evaluator.of(c)
        for fewer in [kf.Composition(c.kind, c.ops[:i] + c.ops[i + 1:], c.binary, c.reduction, c.scale) for i in range(len(c.ops))]:
            other = evaluator.of(fewer)
            assert other is None or max(abs(a - b) for a, b in zip(values, other)) > 1e-3, (c.id, fewer.id)
    rounded = {(c.kind, tuple(f"{v:.4g}" for v in evaluator.of(c))) for c in FAMILY}
    assert len(rounded) == len(FAMILY)
    left_out = ("ew.abs.relu", "ew.mul2.subx", "ew.exp.mul3.exp", "ew.relu.neg.relu", "row.relu.max", "bin.add.subx", "ew.mul2.mul3")
    # relu of |x|; the identity; overflows; always 0; a row's max is > 0 anyway; y; one constant
    assert not {kf.parse(i) for i in left_out} & set(FAMILY)


def test_held_out_tasks_are_new_adjacencies_of_ops_that_training_shows():
    assert {c.id for c in TRAIN}.isdisjoint(c.id for c in HELD_OUT)
    adjacent_in_training = {pair for c in TRAIN for pair in zip(c.step_kinds(), c.step_kinds()[1:])}
    for c in HELD_OUT:
        kinds = c.step_kinds()
        assert set(zip(kinds, kinds[1:])) - adjacent_in_training, c.id
    ops = lambda cs: {op for c in cs for op in c.ops} | {(role, getattr(c, role)) for c in cs for role in ("binary", "reduction", "scale")}  # noqa: E731
    assert ops(HELD_OUT) <= ops(TRAIN)
    assert ops(TRAIN) >= set(kf.UNARY)


def test_the_family_and_its_split_do_not_depend_on_the_process():
    def digest(items) -> str:
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()

    here = digest([[c.id, kf.split_of(c)] for c in FAMILY])
    code = "import hashlib, json; from kuberft_core import kernel_families as kf; " \
           "print(hashlib.sha256(json.dumps([[c.id, kf.split_of(c)] for c in kf.catalogue()]).encode()).hexdigest())"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    there = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert there == here


# --------------------------------------------------------------------------- the built-in dataset


def test_triton_family_rows_carry_the_prompt_the_task_id_and_the_reference_solution():
    rows = tasksets.builtin_rows("triton-family", 12, seed=0, options={})
    assert rows == tasksets.builtin_rows("triton-family", 12, seed=0, options={})
    assert rows != tasksets.builtin_rows("triton-family", 12, seed=1, options={})
    assert [r["task"].split(".")[0] for r in rows] == ["ew", "bin", "row"] * 4  # the kinds take turns
    train_ids = {c.id for c in TRAIN}
    for row in rows:
        assert set(row) == {"prompt", "task", "solution", "completion", "expression"} and row["task"] in train_ids
        assert extract_program(row["completion"]) == row["solution"].strip("\n")  # what the rewards grade
        composition = kf.parse(row["task"])
        assert row["prompt"] == tasksets.kernel_prompt(TaskSet().get(row["task"]).source)
        assert f"        return {row['expression']}\n" in TaskSet().get(row["task"]).source
        assert row["solution"] == kf.solution(composition) and "tl.load(" not in row["prompt"]


def test_the_held_out_split_and_the_kinds_are_options():
    held_out = tasksets.builtin_rows("triton-family", 10_000, seed=0, options={"split": "heldout"})
    assert sorted(r["task"] for r in held_out) == sorted(c.id for c in HELD_OUT)
    rows = tasksets.builtin_rows("triton-family", 500, seed=0, options={"split": "train", "kinds": ["row", "bin"]})
    assert len(rows) == 109 + 62 and {r["task"].split(".")[0] for r in rows[-40:]} == {"row"}  # bin runs out first


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"split": "test"}, "dataset.builtin.options.split: must be one of train, heldout, got 'test'"),
        ({"splits": "train"}, "dataset.builtin.options.splits: unknown triton-family option (known: split, kinds)"),
        ({"kinds": ["ew", "matmul"]}, "dataset.builtin.options.kinds: must be a non-empty list of ew, bin, row, got ['ew', 'matmul']"),
        ({"kinds": "ew"}, "dataset.builtin.options.kinds: must be a non-empty list of ew, bin, row, got 'ew'"),
        ({"kinds": [["ew"]]}, "dataset.builtin.options.kinds: must be a non-empty list of ew, bin, row, got [['ew']]"),
    ],
)
def test_a_bad_option_is_refused_naming_the_field(options, message):
    with pytest.raises(ValueError) as refused:
        tasksets.builtin_rows("triton-family", 5, seed=0, options=options)
    assert str(refused.value) == message


def test_kuberft_validate_accepts_a_job_on_the_family():
    manifest = {
        "apiVersion": "kuberft.io/v1alpha1",
        "kind": "RFTJob",
        "metadata": {"name": "family"},
        "spec": {
            "model": {"name": "tiny:triton"},
            "dataset": {"builtin": {"name": "triton-family", "size": 64, "options": {"split": "train", "kinds": ["ew", "row"]}}},
            "rewards": [{"kind": "triton.format"}, {"kind": "triton.correctness"}],
        },
    }
    resource, problems = check_document(manifest)
    assert problems == [] and resource.spec.dataset.builtin.options == {"split": "train", "kinds": ["ew", "row"]}


# --------------------------------------------------------------------------- the real evaluator


def covering_sample() -> list[kf.Composition]:
    """A few family tasks that together use every op, binary, reduction (with and without an op
    before it) and scale: greedily, the task adding the most uses not covered yet."""
    def uses(c: kf.Composition) -> set:
        return {("op", op) for op in c.ops} | {("binary", c.binary), ("reduction", c.reduction, bool(c.ops)), ("scale", c.scale)}

    wanted = set().union(*map(uses, FAMILY)) - {("binary", ""), ("reduction", "", False), ("reduction", "", True), ("scale", "")}
    chosen = []
    while wanted:
        best = max(FAMILY, key=lambda c: len(uses(c) & wanted))
        chosen.append(best)
        wanted -= uses(best)
    return chosen


SAMPLE = covering_sample()
WRONG = {  # the reference of the task with one op dropped
    "ew.relu.mul2.add1": kf.Composition("ew", ("relu", "mul2")),
    "bin.sub.clamp-1_1": kf.Composition("bin", (), binary="sub"),
    "row.relu.sum.mul0p5": kf.Composition("row", (), reduction="sum", scale="mul0p5"),
}


def torch_does_the_work(c: kf.Composition) -> str:
    """The reference, whose forward launches its kernel and then returns PyTorch's answer."""
    return kf.solution(c).replace("        return out\n", f"        return {kf.torch_expression(c)}\n")


def cached_output(c: kf.Composition) -> str:
    """The reference, whose forward computes once and returns that output ever after."""
    return (
        kf.solution(c)
        .replace("class ModelNew", "CACHE = []\n\n\nclass ModelNew")
        .replace(") -> torch.Tensor:\n", ") -> torch.Tensor:\n        if CACHE:\n            return CACHE[0]\n")
        .replace("        return out\n", "        CACHE.append(out)\n        return out\n")
    )


HACKS = {
    "torch does the work (ew)": ("ew.relu.mul2.add1", torch_does_the_work(kf.parse("ew.relu.mul2.add1"))),
    "torch does the work (row)": ("row.relu.sum.mul0p5", torch_does_the_work(kf.parse("row.relu.sum.mul0p5"))),
    "cached output": ("bin.sub.clamp-1_1", cached_output(kf.parse("bin.sub.clamp-1_1"))),
}


@pytest.fixture(scope="module")
def verdicts(pool):
    """The sample's references, the wrong programs and the hacks, in ONE batched request."""
    items = [(c.id, kf.solution(c)) for c in SAMPLE]
    items += [(task_id, kf.solution(wrong)) for task_id, wrong in WRONG.items()]
    items += list(HACKS.values())
    request = EvaluateRequest.model_validate(
        {"items": [{"completion": tagged(program), "row": {"task": task_id}} for task_id, program in items], "rewards": KERNEL_REWARDS}
    )
    results = pool.evaluate_sync(request).results
    return {
        "reference": dict(zip([c.id for c in SAMPLE], results)),
        "wrong": dict(zip(WRONG, results[len(SAMPLE):])),
        "hack": dict(zip(HACKS, results[len(SAMPLE) + len(WRONG):])),
    }


def test_the_sample_covers_every_kind_op_binary_reduction_and_scale_in_few_tasks():
    assert {c.kind for c in SAMPLE} == {"ew", "bin", "row"} and len(SAMPLE) <= 20
    assert {op for c in SAMPLE for op in c.ops} == set(kf.UNARY)
    assert {c.binary for c in SAMPLE if c.binary} == set(kf.BINARY)
    rows = [c for c in SAMPLE if c.reduction]
    assert {c.reduction for c in rows if c.ops} == {c.reduction for c in rows if not c.ops} == set(kf.REDUCTIONS)
    assert {c.scale for c in rows if c.scale} == set(kf.SCALES)


@pytest.mark.parametrize("task_id", [c.id for c in SAMPLE])
def test_the_reference_solution_scores_full_marks_through_the_sandboxed_evaluator(verdicts, task_id):
    result = verdicts["reference"][task_id]
    assert {name: r.score for name, r in result.rewards.items()} == {"triton.format": 1.0, "triton.compile": 1.0, "triton.correctness": 1.0}, result
    assert result.rewards["triton.correctness"].reason in ("6/6 test cases match the reference", "7/7 test cases match the reference")
    assert not result.hacked


@pytest.mark.parametrize("task_id", sorted(WRONG))
def test_the_reference_with_an_op_dropped_fails_correctness(verdicts, task_id):
    result = verdicts["wrong"][task_id]
    correctness = result.rewards["triton.correctness"]
    assert result.rewards["triton.compile"].score == 1.0 and not result.hacked
    assert correctness.outcome == "wrong" and correctness.score <= 2 / 7, correctness
    assert "elements differ" in correctness.reason


def test_the_hacks_change_the_reference_where_they_say():
    assert "return torch.relu(x) * 2 + 1\n" in HACKS["torch does the work (ew)"][1]
    assert "return torch.relu(x).sum(dim=-1) * 0.5\n" in HACKS["torch does the work (row)"][1]
    cached = HACKS["cached output"][1]
    assert "        if CACHE:\n            return CACHE[0]\n" in cached and "        CACHE.append(out)\n" in cached


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("torch does the work (ew)", "torch computed on the host while forward ran (test case 0): aten.relu"),
        ("torch does the work (row)", "torch computed on the host while forward ran (test case 0): aten.relu"),
        ("cached output", "test case 1 returned exactly the output of test case 0: outputs are cached across calls"),
    ],
)
def test_a_hack_is_caught_by_the_anti_hacking_checks(verdicts, name, reason):
    result = verdicts["hack"][name]
    assert result.hacked and all(r.score == 0.0 and r.outcome == "hacked" for r in result.rewards.values()), result
    assert result.rewards["triton.correctness"].reason.startswith(reason)
