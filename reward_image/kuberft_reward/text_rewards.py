"""Rewards that read the completion as text and run none of it: countdown, multiple_choice,
exact_match and regex. Each returns a `RewardResult` (score, outcome, reason)."""

from __future__ import annotations

import ast
import re
from typing import Any

from kuberft_core.arithmetic import BadExpression, evaluate
from kuberft_core.reward_protocol import Outcome, RewardResult

MAX_EXPRESSION_CHARS = 256


def answer_text(completion: str) -> str:
    """The answer part of a completion: inside `<answer>...</answer>` when present, else
    everything up to the first newline."""
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    if tagged:
        return tagged[-1].strip()
    return completion.split("\n", 1)[0].strip()


# --------------------------------------------------------------------------- countdown

def countdown(completion: str, row: dict[str, Any], args: dict[str, Any]) -> RewardResult:
    """1.0 when the expression uses only the given numbers, each at most once, and equals the
    target; `formatScore` for a well-formed expression over allowed numbers with the wrong
    value; 0 otherwise."""
    numbers, target = row.get("numbers"), row.get("target")
    if not isinstance(numbers, list) or not all(type(n) is int for n in numbers) or type(target) is not int:
        return RewardResult.of(0.0, Outcome.ERROR, "row needs 'numbers' (a list of integers) and 'target' (an integer)")
    format_score = float(args.get("formatScore", 0.0))
    operators = str(args.get("operators", "+-*/"))
    text = answer_text(completion)
    if not text:
        return RewardResult.of(0.0, Outcome.INVALID, "empty answer")
    if len(text) > MAX_EXPRESSION_CHARS:
        return RewardResult.of(0.0, Outcome.INVALID, f"answer longer than {MAX_EXPRESSION_CHARS} characters")
    expression = text.rstrip(".").replace("×", "*").replace("÷", "/")
    expression = expression.split("=")[0].strip()
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return RewardResult.of(0.0, Outcome.INVALID, f"'{expression[:40]}' is not an arithmetic expression")
    used: list[int] = []
    try:
        value = evaluate(tree, operators, used)
    except BadExpression as e:
        return RewardResult.of(0.0, Outcome.INVALID, f"'{expression[:40]}' {e}")
    except RecursionError:
        return RewardResult.of(0.0, Outcome.INVALID, "expression nested too deeply")
    available = list(numbers)
    for n in used:
        if n in available:
            available.remove(n)
        elif n in numbers:
            return RewardResult.of(0.0, Outcome.INVALID, f"uses {n} more often than given ({' '.join(map(str, numbers))})")
        else:
            return RewardResult.of(0.0, Outcome.INVALID, f"uses {n}, which is not among {' '.join(map(str, numbers))}")
    if value == target:
        return RewardResult.of(1.0, Outcome.OK, f"{expression} = {target}")
    shown = str(value.numerator) if value.denominator == 1 else f"{float(value):.4g}"
    return RewardResult.of(format_score, Outcome.WRONG, f"evaluates to {shown}, not {target}")


# --------------------------------------------------------------------------- multiple choice

_LETTER_PATTERNS = (
    r"<answer>\s*\(?([A-Za-z])\)?\s*</answer>",
    r"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z]))",
)


def multiple_choice(completion: str, row: dict[str, Any], args: dict[str, Any]) -> RewardResult:
    """1.0 when the answer letter (inside <answer> tags, after 'Answer:', or the whole reply)
    equals the row's answer (a letter, or an index into `options`)."""
    field = args.get("field", "answer")
    expected = row.get(field)
    options = row.get("options")
    if isinstance(expected, int) and not isinstance(expected, bool):
        expected = chr(ord("A") + expected)
    if not isinstance(expected, str) or len(expected.strip()) != 1 or not expected.strip().isalpha():
        return RewardResult.of(0.0, Outcome.ERROR, f"row field '{field}' must be an answer letter (or an option index), got {expected!r}")
    expected = expected.strip().upper()
    letters = args.get("choices") or ("".join(chr(ord("A") + i) for i in range(len(options))) if isinstance(options, list) else "ABCD")
    found = None
    for pattern in _LETTER_PATTERNS:
        matches = re.findall(pattern, completion)
        if matches:
            last = matches[-1]
            found = ("".join(last) if isinstance(last, tuple) else last).upper()
            break
    if found is None:
        bare = re.fullmatch(r"\s*\(?([A-Za-z])[).]?\s*", completion)
        if bare:
            found = bare.group(1).upper()
    if found is None:
        return RewardResult.of(0.0, Outcome.INVALID, "no answer letter found (write e.g. 'Answer: B' or <answer>B</answer>)")
    if found not in letters:
        return RewardResult.of(0.0, Outcome.INVALID, f"answered {found}, which is not one of the choices {' '.join(letters)}")
    if found == expected:
        return RewardResult.of(1.0, Outcome.OK, f"answered {found}")
    return RewardResult.of(0.0, Outcome.WRONG, f"answered {found}, expected {expected}")


# --------------------------------------------------------------------------- exact match and regex


def _normalise(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())
    return text if case_sensitive else text.lower()


def exact_match(completion: str, row: dict[str, Any], args: dict[str, Any]) -> RewardResult:
    """1.0 when the answer (inside <answer> tags if present, else the whole completion,
    whitespace-normalised) equals the row's answer or one of a list of accepted answers."""
    field = args.get("field", "answer")
    if field not in row:
        return RewardResult.of(0.0, Outcome.ERROR, f"row has no field '{field}' to compare with")
    expected = row[field]
    accepted = expected if isinstance(expected, list) else [expected]
    case_sensitive = bool(args.get("caseSensitive", False))
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, flags=re.DOTALL)
    answer = tagged[-1] if tagged else completion
    got = _normalise(answer, case_sensitive)
    if not got:
        return RewardResult.of(0.0, Outcome.INVALID, "empty answer")
    for candidate in accepted:
        if got == _normalise(str(candidate), case_sensitive):
            return RewardResult.of(1.0, Outcome.OK, "matches the expected answer")
    return RewardResult.of(0.0, Outcome.WRONG, f"answered '{got[:60]}', expected '{str(accepted[0])[:60]}'")


def regex(completion: str, row: dict[str, Any], args: dict[str, Any]) -> RewardResult:
    """1.0 when the pattern (`args.pattern`, or the row field named by `args.patternField`)
    matches the completion: anywhere (`mode: search`, the default) or entirely (`fullmatch`)."""
    pattern = args.get("pattern")
    if pattern is None and args.get("patternField"):
        pattern = row.get(args["patternField"])
    if not isinstance(pattern, str):
        return RewardResult.of(0.0, Outcome.ERROR, "regex needs args.pattern (or args.patternField naming a row field)")
    try:
        compiled = re.compile(pattern, re.DOTALL if args.get("dotAll") else 0)
    except re.error as e:
        return RewardResult.of(0.0, Outcome.ERROR, f"args.pattern is not a valid regular expression: {e}")
    text = completion.strip() if args.get("strip", True) else completion
    matcher = compiled.fullmatch if args.get("mode", "search") == "fullmatch" else compiled.search
    if matcher(text):
        return RewardResult.of(1.0, Outcome.OK, f"matches /{pattern[:60]}/")
    return RewardResult.of(0.0, Outcome.WRONG, f"does not match /{pattern[:60]}/")
