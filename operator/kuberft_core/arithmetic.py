"""Exact arithmetic over whole numbers, as the Countdown task set builds targets and its reward
checks answers: an expression parses to a value, or a ValueError says what is wrong with it."""

from __future__ import annotations

import ast
from fractions import Fraction

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class BadExpression(ValueError):
    pass


def evaluate(node: ast.AST, allowed_ops: str, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return evaluate(node.body, allowed_ops, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        symbol = _OPERATORS[type(node.op)]
        if symbol not in allowed_ops:
            raise BadExpression(f"uses '{symbol}', which is not among the allowed operators {' '.join(allowed_ops)}")
        left = evaluate(node.left, allowed_ops, used)
        right = evaluate(node.right, allowed_ops, used)
        if symbol == "+":
            return left + right
        if symbol == "-":
            return left - right
        if symbol == "*":
            return left * right
        if right == 0:
            raise BadExpression("divides by zero")
        return left / right
    if isinstance(node, ast.Constant):
        raise BadExpression(f"contains {node.value!r}, which is not a whole number")
    if isinstance(node, ast.UnaryOp):
        raise BadExpression("uses a unary sign; only the given numbers and binary operators are allowed")
    raise BadExpression(f"contains {type(node).__name__.lower()}, not just numbers and + - * /")


def expression_value(expression: str, operators: str = "+-*/") -> Fraction:
    """The exact value of an arithmetic expression over whole numbers; ValueError says what is
    wrong with it (including division by zero)."""
    used: list[int] = []
    try:
        return evaluate(ast.parse(expression, mode="eval"), operators, used)
    except SyntaxError as error:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from error
