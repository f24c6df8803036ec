"""A small PromQL reader: which series (and which labels of them) an expression selects.

It tokenizes the expression the way Prometheus's lexer does (strings, numbers, durations,
identifiers, operators) and classifies every identifier by its place: a function or
aggregation name (followed by `(` or by `by`/`without`), a keyword, a label name (inside
`{...}` or in the list of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`), or
else a metric name. `{__name__="x"}` selects the metric `x`. Grafana variables (`$job`,
`${job}`, `$__rate_interval`) are accepted where Grafana lets them stand.

This is what a test needs to check a dashboard against the metric catalogue; the real
Prometheus parser (`promtool`) checks the syntax, and the end-to-end test runs the queries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
    "scalar", "sgn", "sin", "sinh", "sort", "sort_desc", "sqrt", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    "start", "end",
}
KEYWORDS = {"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[A-Za-z_][A-Za-z0-9_]*(?::[A-Za-z_]+)?\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![A-Za-z0-9_])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@:])
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    """The expression cannot be read: the message names the position and what was found."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    position: int


@dataclass
class Selector:
    """One vector selector: its metric name and the label names its matchers use."""

    metric: str
    labels: set[str] = field(default_factory=set)


def tokenize(expr: str) -> list[Token]:
    tokens = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLError(f"unexpected character {expr[position]!r} at position {position} of {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            tokens.append(Token(kind, match.group(), position))
        position = match.end()
    return tokens


def _unquote(text: str) -> str:
    return text[1:-1]


def _matching(tokens: list[Token], start: int, expr: str) -> int:
    """Index of the bracket closing the one at `start`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(tokens)):
        text = tokens[i].text if tokens[i].kind == "op" else ""
        if text in pairs:
            stack.append(pairs[text])
        elif text in pairs.values():
            if not stack or stack.pop() != text:
                raise PromQLError(f"unbalanced {text!r} at position {tokens[i].position} of {expr!r}")
            if not stack:
                return i
    raise PromQLError(f"unclosed {tokens[start].text!r} at position {tokens[start].position} of {expr!r}")


def _matchers(tokens: list[Token], open_index: int, close_index: int, expr: str) -> tuple[set[str], str | None]:
    """Label names in `{...}`, and the metric named by a `__name__="x"` matcher."""
    labels: set[str] = set()
    name = None
    i = open_index + 1
    while i < close_index:
        token = tokens[i]
        if token.kind == "ident":
            if i + 2 >= close_index + 1 or tokens[i + 1].text not in ("=", "!=", "=~", "!~"):
                raise PromQLError(f"expected a label matcher after {token.text!r} at position {token.position} of {expr!r}")
            value = tokens[i + 2]
            if value.kind != "string":
                raise PromQLError(f"label {token.text!r} must be matched against a string at position {value.position} of {expr!r}")
            if token.text == "__name__":
                if tokens[i + 1].text != "=":
                    raise PromQLError(f"only __name__=\"...\" names a metric a dashboard may query ({expr!r})")
                name = _unquote(value.text)
            else:
                labels.add(token.text)
            i += 3
        elif token.text == ",":
            i += 1
        else:
            raise PromQLError(f"unexpected {token.text!r} in label matchers at position {token.position} of {expr!r}")
    return labels, name


def _check_balanced(tokens: list[Token], expr: str) -> None:
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[Token] = []
    for token in tokens:
        if token.kind != "op":
            continue
        if token.text in pairs:
            stack.append(token)
        elif token.text in pairs.values():
            if not stack or pairs[stack.pop().text] != token.text:
                raise PromQLError(f"unbalanced {token.text!r} at position {token.position} of {expr!r}")
    if stack:
        raise PromQLError(f"unclosed {stack[-1].text!r} at position {stack[-1].position} of {expr!r}")


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in `expr`, in order; raises PromQLError on what it cannot read."""
    tokens = tokenize(expr)
    _check_balanced(tokens, expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        if token.kind == "op" and token.text == "{":
            # A selector with no metric name before its braces: `{__name__="x", ...}`.
            close = _matching(tokens, i, expr)
            labels, name = _matchers(tokens, i, close, expr)
            if name is None:
                raise PromQLError(f"selector without a metric name at position {token.position} of {expr!r}")
            found.append(Selector(name, labels))
            i = close + 1
            continue
        if token.kind == "op" and token.text == "[":
            i = _matching(tokens, i, expr) + 1  # a range or subquery: durations and variables only
            continue
        if token.kind != "ident":
            i += 1
            continue
        word = token.text.lower()
        if word in GROUPING:
            if following is None or following.text != "(":
                raise PromQLError(f"{token.text!r} must be followed by a label list at position {token.position} of {expr!r}")
            i = _matching(tokens, i + 1, expr) + 1  # label names, not metrics
            continue
        if token.text in AGGREGATIONS and following is not None and (following.text == "(" or following.text.lower() in ("by", "without")):
            i += 1
            continue
        if following is not None and following.text == "(":
            if token.text not in FUNCTIONS:
                raise PromQLError(f"unknown function {token.text!r} at position {token.position} of {expr!r}")
            i += 1
            continue
        if word in KEYWORDS:
            i += 1
            continue
        selector = Selector(token.text)
        i += 1
        if i < len(tokens) and tokens[i].text == "{":
            close = _matching(tokens, i, expr)
            labels, name = _matchers(tokens, i, close, expr)
            if name is not None:
                raise PromQLError(f"{token.text!r} names its metric twice (__name__ matcher) in {expr!r}")
            selector.labels = labels
            i = close + 1
        found.append(selector)
    return found


def metric_names(expr: str) -> set[str]:
    return {s.metric for s in selectors(expr)}


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<series>.+?)\s*,\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def label_values_query(query: str) -> tuple[str, str]:
    """(series expression, label) of a Grafana `label_values(series, label)` variable query."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise PromQLError(f"not a label_values(series, label) query: {query!r}")
    return match.group("series"), match.group("label")


def substitute_grafana_variables(expr: str, values: dict[str, str]) -> str:
    """The expression as Grafana sends it: `$name` / `${name}` replaced by `values[name]`."""

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise PromQLError(f"no value for the Grafana variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", replace, expr)
