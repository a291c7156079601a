"""The ``calculate_output`` formula of a multi grader, evaluated safely over Python's ``ast``.

Only numbers, the sub-graders' names, ``+ - * / ^`` (``^`` and ``**`` are powers), unary ``-``/``+``,
parentheses and the functions OpenAI documents (min, max, abs, floor, ceil, exp, sqrt, log) are allowed.
Nothing is ever passed to ``eval``: the tree is walked node by node and anything else is refused.

Every value is a float, so no step can grow without bound: a step that overflows (``9 ** 999 ** 999``, ``exp(1000)``)
or is not a real number is an error at once, never a huge integer computed on the server's time. A part of the
formula that uses no grader's reward is computed when the formula is parsed, so its overflow is the grader's 400.
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
    _fold(tree.body)
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


def _fold(node: ast.AST) -> None:
    """Compute every part of the formula that reads no grader's reward; one that overflows or is not a real
    number is the formula's error."""
    if not any(isinstance(n, ast.Name) and n.id not in FUNCTIONS for n in ast.walk(node)):
        try:
            _eval(node, {})
        except (ArithmeticError, ValueError, TypeError, FormulaError) as exc:
            raise FormulaError(f"calculate_output: {ast.unparse(node)[:100]} cannot be computed "
                               f"({type(exc).__name__}: {exc})") from None
        return
    parts = node.args if isinstance(node, ast.Call) else [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.expr)]
    for part in parts:
        _fold(part)


def evaluate(tree: ast.Expression, values: dict[str, float]) -> float:
    """The formula's value for the sub-graders' rewards ``values``; ArithmeticError or ValueError when a step
    overflows or is not a real number."""
    return _eval(tree.body, values)


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return _real(float(node.value))
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise FormulaError(f"calculate_output: '{node.id}' is a function; call it")
        return _real(float(values[node.id]))
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_eval(node.operand, values))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, values), _eval(node.right, values)
        return _real(BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call):
        return _real(float(FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args))))
    raise FormulaError(f"calculate_output: {type(node).__name__} is not allowed")


def _real(value) -> float:
    """``value`` when it is a finite real number; OverflowError or ValueError otherwise (a float power of a
    negative base is complex, a product of two large floats is infinite)."""
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if not math.isfinite(value):
        raise OverflowError("the result is too large")
    return value
