"""The ``calculate_output`` formula of a multi grader, evaluated safely over Python's ``ast``.

Only numbers, the sub-graders' names, ``+ - * / ^`` (``^`` and ``**`` are powers), unary ``-``/``+``,
parentheses and the functions OpenAI documents (min, max, abs, floor, ceil, exp, sqrt, log) are allowed.
Nothing is ever passed to ``eval``: the tree is walked node by node and anything else is refused.
"""

from __future__ import annotations

import ast
import math
import operator

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_POWER = 1000  # bounds x ** y so that a formula cannot spin on a huge integer power
MAX_CHARS = 2000


class FormulaError(ValueError):
    """The formula cannot be parsed or names something it may not use."""


def parse(formula: str, names: set[str]) -> ast.Expression:
    """The checked tree of ``formula``; ``names`` are the variables it may read."""
    if len(formula) > MAX_CHARS:
        raise FormulaError(f"calculate_output is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(formula.strip().replace("^", "**"), mode="eval")  # ^ binds as a power, above * and +
    except SyntaxError as exc:
        raise FormulaError(f"calculate_output is not a formula: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError) as exc:
        raise FormulaError(f"calculate_output is not a formula ({type(exc).__name__})") from None
    for node in ast.walk(tree):
        _check(node, names)
    return tree


def _check(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.Expression | ast.Load) or type(node) in BINARY or type(node) in UNARY:
        return
    if isinstance(node, ast.BinOp | ast.UnaryOp):
        if type(node.op) not in BINARY and type(node.op) not in UNARY:
            raise FormulaError(f"calculate_output: operator {type(node.op).__name__} is not allowed")
        return
    if isinstance(node, ast.Constant):
        if not isinstance(node.value, int | float) or isinstance(node.value, bool):
            raise FormulaError(f"calculate_output: {node.value!r} is not a number")
        return
    if isinstance(node, ast.Name):
        if node.id not in names and node.id not in FUNCTIONS:
            raise FormulaError(f"calculate_output: unknown name '{node.id}'; known: {', '.join(sorted(names))}")
        return
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
            raise FormulaError(f"calculate_output: only {', '.join(FUNCTIONS)} may be called")
        return
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed in a formula")


def evaluate(tree: ast.Expression, values: dict[str, float]) -> float:
    """The formula's value for the sub-graders' rewards ``values``."""
    return float(_eval(tree.body, values))


def _eval(node: ast.AST, values: dict[str, float]):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise FormulaError(f"calculate_output: '{node.id}' is a function; call it")
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise FormulaError(f"calculate_output: power {right} is too large")
        return BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call):
        return FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args))
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed")
