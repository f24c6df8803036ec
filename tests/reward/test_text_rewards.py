"""The rewards that read text: countdown, multiple_choice, exact_match, regex, and the
built-in datasets they score."""

import ast

import pytest

from kuberft_core import arithmetic, tasksets
from kuberft_reward import text_rewards


def _as_triple(function):
    """The reward as (score, outcome, reason), the three things a user reads."""

    def call(*args):
        result = function(*args)
        return (result.score, result.outcome.value, result.reason)

    return call


countdown, exact_match, multiple_choice, regex = map(
    _as_triple, (text_rewards.countdown, text_rewards.exact_match, text_rewards.multiple_choice, text_rewards.regex)
)

PUZZLE = {"numbers": [3, 7, 25], "target": 46}


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("25+3*7", (1.0, "ok", "25+3*7 = 46")),
        ("25+3*7\nbecause 3*7=21", (1.0, "ok", "25+3*7 = 46")),
        ("I think <answer>(25 + 21)</answer>", (0.0, "invalid", "uses 21, which is not among 3 7 25")),
        ("<answer>7*3+25</answer>", (1.0, "ok", "7*3+25 = 46")),
        ("25+3*7+3", (0.0, "invalid", "uses 3 more often than given (3 7 25)")),
        ("25+7*3-7", (0.0, "invalid", "uses 7 more often than given (3 7 25)")),
        ("25+9", (0.0, "invalid", "uses 9, which is not among 3 7 25")),
        ("25+3+7", (0.0, "wrong", "evaluates to 35, not 46")),
        ("25/3", (0.0, "wrong", "evaluates to 8.333, not 46")),
        ("__import__('os')", (0.0, "invalid", "'__import__('os')' contains call, not just numbers and + - * /")),
        ("25**3", (0.0, "invalid", "'25**3' contains binop, not just numbers and + - * /")),
        ("", (0.0, "invalid", "empty answer")),
        ("-3+25", (0.0, "invalid", "'-3+25' uses a unary sign; only the given numbers and binary operators are allowed")),
    ],
)
def test_countdown_scores_and_explains(completion, expected):
    assert countdown(completion, PUZZLE, {}) == expected


def test_countdown_format_score_rewards_a_well_formed_wrong_answer():
    assert countdown("25+3+7", PUZZLE, {"formatScore": 0.1}) == (0.1, "wrong", "evaluates to 35, not 46")
    assert countdown("25+9", PUZZLE, {"formatScore": 0.1})[0] == 0.0


def test_countdown_respects_the_allowed_operators():
    assert countdown("25+3*7", PUZZLE, {"operators": "+-"}) == (
        0.0, "invalid", "'25+3*7' uses '*', which is not among the allowed operators + -",
    )


def test_countdown_names_a_broken_row():
    assert countdown("1+2", {"numbers": "3 7", "target": 46}, {})[1:] == (
        "error", "row needs 'numbers' (a list of integers) and 'target' (an integer)",
    )


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is C.", (1.0, "ok", "answered C")),
        ("Reasoning... Answer: (c)", (1.0, "ok", "answered C")),
        ("<answer>B</answer>", (0.0, "wrong", "answered B, expected C")),
        ("C", (1.0, "ok", "answered C")),
        ("Answer: E", (0.0, "invalid", "answered E, which is not one of the choices A B C D")),
        ("I am not sure", (0.0, "invalid", "no answer letter found (write e.g. 'Answer: B' or <answer>B</answer>)")),
    ],
)
def test_multiple_choice_reads_the_answer_letter(completion, expected):
    assert multiple_choice(completion, {"answer": "C", "options": ["a", "b", "c", "d"]}, {}) == expected


def test_multiple_choice_accepts_an_option_index():
    assert multiple_choice("Answer: B", {"answer": 1}, {}) == (1.0, "ok", "answered B")


def test_exact_match_normalises_whitespace_and_case():
    assert exact_match("  Paris \n", {"answer": "paris"}, {}) == (1.0, "ok", "matches the expected answer")
    assert exact_match("<answer>Lyon</answer>", {"answer": ["Paris", "paris, france"]}, {}) == (
        0.0, "wrong", "answered 'lyon', expected 'Paris'",
    )
    assert exact_match("Paris", {"answer": "paris"}, {"caseSensitive": True})[0] == 0.0
    assert exact_match("x", {}, {})[1:] == ("error", "row has no field 'answer' to compare with")


def test_regex_searches_or_matches_fully():
    assert regex("the result is 42.", {}, {"pattern": r"\b42\b"}) == (1.0, "ok", r"matches /\b42\b/")
    assert regex("the result is 42.", {}, {"pattern": r"\d+", "mode": "fullmatch"})[0] == 0.0
    assert regex("ABC-123", {"id": r"[A-Z]+-\d+"}, {"patternField": "id", "mode": "fullmatch"})[0] == 1.0
    assert regex("x", {}, {"pattern": "("})[1] == "error"


def _value(expression: str) -> int:
    tree = ast.parse(expression, mode="eval")
    return eval(compile(tree, "<expr>", "eval"))  # noqa: S307 - test-side check of generated puzzles


def test_countdown_rows_are_reachable_deterministic_and_in_the_prompt_format():
    rows = tasksets.builtin_rows("countdown", 200, seed=3, options={})
    assert rows == tasksets.builtin_rows("countdown", 200, seed=3, options={})
    assert rows != tasksets.builtin_rows("countdown", 200, seed=4, options={})
    for row in rows:
        numbers, target = row["numbers"], row["target"]
        assert row["prompt"] == f"Use {' '.join(map(str, numbers))} to make {target}.\n"
        assert len(numbers) == 3 and all(1 <= n <= 20 for n in numbers) and target > 0
    # reachable: some expression over the numbers with + - * hits every target
    import itertools

    for row in rows[:50]:
        a, b, c = row["numbers"]
        found = any(
            _value(f"({x}{o1}{y}){o2}{z}") == row["target"] or _value(f"{x}{o1}({y}{o2}{z})") == row["target"]
            for x, y, z in itertools.permutations((a, b, c))
            for o1 in "+-*"
            for o2 in "+-*"
        )
        assert found, row


def test_countdown_options_are_checked_by_name():
    rows = tasksets.builtin_rows("countdown", 5, seed=0, options={"numbers": 4, "maxNumber": 9, "operators": "+*"})
    assert all(len(r["numbers"]) == 4 and max(r["numbers"]) <= 9 for r in rows)
    with pytest.raises(ValueError, match=r"dataset.builtin.options.numbers: must be an integer from 2 to 6, got 9"):
        tasksets.builtin_rows("countdown", 5, seed=0, options={"numbers": 9})
    with pytest.raises(ValueError, match=r"dataset.builtin.options.colour: unknown countdown option"):
        tasksets.builtin_rows("countdown", 5, seed=0, options={"colour": 1})
    with pytest.raises(ValueError, match=r"dataset.builtin.name: unknown built-in dataset 'chess'"):
        tasksets.builtin_rows("chess", 5, seed=0, options={})


def test_ordered_countdown_targets_come_from_the_numbers_in_order_and_may_be_negative():
    options = {"numbers": 2, "maxNumber": 9, "ordered": True, "positiveTargets": False}
    rows = tasksets.builtin_rows("countdown", 300, seed=1, options=options)
    for row in rows:
        a, b = row["numbers"]
        assert row["target"] in {a + b, a - b, a * b}, row
    assert any(r["target"] <= 0 for r in rows)
    answer = next(r for r in rows if r["target"] == r["numbers"][0] - r["numbers"][1])
    a, b = answer["numbers"]
    assert countdown(f"{a}-{b}\n", answer, {})[0] == 1.0
    positive = tasksets.builtin_rows("countdown", 300, seed=1, options={**options, "positiveTargets": True})
    assert all(r["target"] > 0 for r in positive)
    with pytest.raises(ValueError, match=r"dataset.builtin.options.ordered: must be true or false, got 'yes'"):
        tasksets.builtin_rows("countdown", 5, seed=0, options={"ordered": "yes"})


def test_triton_kernel_rows_carry_the_task_source_but_no_solution():
    rows = tasksets.builtin_rows("triton-kernels", 1, seed=0, options={})
    assert len(rows) >= 13
    relu = next(r for r in rows if r["task"] == "relu")
    assert "class Model(nn.Module)" in relu["prompt"] and "<triton> and </triton>" in relu["prompt"]
    assert "ModelNew" in relu["prompt"] and "@triton.jit" in relu["prompt"]
    assert all("tl.load(" not in r["prompt"] for r in rows)


def test_tasksets_import_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, kuberft_core.tasksets, kuberft_core.reward_protocol; print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
