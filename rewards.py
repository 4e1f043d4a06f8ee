"""
Verifiable rewards: pure functions `(completion, ...) -> float` that never raise and never
run model output as code.

General Points (Chu et al. 2025, "SFT Memorizes, RL Generalizes"): the completion must hold
one arithmetic formula with + - * / and parentheses that uses each card value exactly once
and equals the target. We parse the formula with Python's `ast` module (parsing builds a
tree; it executes nothing), accept only number literals, the four binary operators and
parentheses, and evaluate the tree ourselves with exact rationals (`fractions.Fraction`).
Length and depth are bounded, so no input can make the verifier slow.

    reward = 1  if  formula parses, uses exactly the card values, and == target
             0  otherwise

Run `python -m pytest test_amft.py -k verifier` for its tests.
"""
import ast
from collections import Counter
from fractions import Fraction

MAX_FORMULA_CHARS = 100  # a 4-card formula needs ~20; anything longer is not an answer
MAX_DEPTH = 12           # nesting of the parsed tree; deeper trees are rejected unevaluated
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def extract_formula(completion: str) -> str:
    """The formula is the completion's first line, up to an optional '= target'."""
    line = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    line = line.split("=", 1)[0]
    return line.replace("×", "*").replace("÷", "/").replace("x", "*").strip()


def _evaluate(node, numbers: list, depth: int = 0) -> Fraction:
    """Exact value of a whitelisted expression tree; appends every literal to `numbers`."""
    if depth > MAX_DEPTH:
        raise ValueError("too deep")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        numbers.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _evaluate(node.left, numbers, depth + 1)
        right = _evaluate(node.right, numbers, depth + 1)
        return _OPS[type(node.op)](left, right)  # Fraction division by 0 raises: caught above
    raise ValueError(f"not allowed: {type(node).__name__}")


def parse_formula(formula: str):
    """(value, numbers used) of a formula string, or None if it is not a valid formula."""
    if not formula or len(formula) > MAX_FORMULA_CHARS:
        return None
    try:
        tree = ast.parse(formula, mode="eval")  # parse only: nothing is executed
        numbers = []
        value = _evaluate(tree.body, numbers)
    except Exception:  # SyntaxError, ZeroDivisionError, ValueError, RecursionError, ...
        return None
    return value, numbers


def general_points_reward(completion: str, values, target: int) -> float:
    """1.0 if the completion's formula uses each of `values` exactly once and equals target."""
    parsed = parse_formula(extract_formula(completion))
    if parsed is None:
        return 0.0
    value, numbers = parsed
    if Counter(numbers) != Counter(values):
        return 0.0
    return 1.0 if value == target else 0.0
