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
The formula is the last \\boxed{} or the first line after its last ':', so a completion that
first reads the cards' values ('2 10 5: 5+10/2') is scored on its formula alone.

Math answers (MATH, GSM8K): the final answer is the content of the last `\boxed{...}` (or
`\fbox{...}`), else the text after GSM8K's `#### `, else after "the answer is". Prediction and
ground truth go through the same normalizer (LaTeX fractions, thousands commas, units, $ and
%, `x = 5`), then compare as exact rationals when both are numbers and as strings otherwise.
There is deliberately no percent equivalence ("50" != "0.5"): an RL policy would learn to
exploit it. Input length, brace nesting and digit counts are capped, so any input is fast.
`--verifier math-verify` compares the same extracted answers with Hugging Face's math-verify
(symbolic equivalence through sympy), an optional extra, inside the same guarantees
(`math_verify_match`).

Run `python -m pytest test_tasks.py` for the tests of both.
"""
import ast
import gc
import logging
import re
import signal
import threading
import warnings
from collections import Counter
from fractions import Fraction

MAX_FORMULA_CHARS = 100  # a 4-card formula needs ~20; anything longer is not an answer
MAX_DEPTH = 12           # nesting of the parsed tree; deeper trees are rejected unevaluated
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


_LATEX_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/", "\\left": "", "\\right": "", "×": "*",
              "÷": "/", "x": "*"}


def extract_formula(completion: str) -> str:
    """The formula: the content of the last \\boxed{...} when there is one (a model that reasons
    first puts its answer there; an unclosed box is no answer), else the completion's first
    line after its last ':' (a reading of the cards' values comes first: '2 10 5: 5+10/2'); in
    both, up to an optional '= target'."""
    box = _last_box(completion[-MAX_TEXT_CHARS:])
    if box is None:
        return ""
    line = box if box is not False else (completion.strip().split("\n", 1)[0]
                                         if completion.strip() else "")
    line = line.rsplit(":", 1)[-1].split("=", 1)[0]
    for latex, op in _LATEX_OPS.items():
        line = line.replace(latex, op)
    return line.strip()


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
        # model output like "1e" draws a SyntaxWarning from the parser: not ours to print
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(formula, mode="eval")  # parse only: nothing is executed
        numbers = []
        value = _evaluate(tree.body, numbers)
    except Exception:  # SyntaxError, ZeroDivisionError, ValueError, RecursionError, ...
        return None
    return value, numbers


def general_points_reward(completion: str, values, target: int) -> float:
    """1.0 if the completion's formula uses each of `values` exactly once and equals target."""
    if not isinstance(completion, str):
        return 0.0
    parsed = parse_formula(extract_formula(completion))
    if parsed is None:
        return 0.0
    value, numbers = parsed
    if Counter(numbers) != Counter(values):
        return 0.0
    return 1.0 if value == target else 0.0


# ---- math answers
MAX_TEXT_CHARS = 10_000     # only the completion's tail is read: the final answer comes last
MAX_ANSWER_CHARS = 1_000    # a longer "answer" normalizes to "" and matches nothing
MAX_BRACE_DEPTH = 50        # deeper \boxed{...} nesting is rejected, not scanned
MAX_DIGITS = 1_000          # so Fraction arithmetic on a numeric answer stays cheap
MATH_VERIFY_SECONDS = 0.3   # a math-verify call that takes longer scores 0 (a power tower:
                            # 9^{9^{9}})
MAX_MATH_VERIFY_DEPTH = 5   # brace nesting handed to math-verify (a real answer needs 3 or 4;
                            # 6 took 0.6 s)
REL_TOL = Fraction(1, 10**6)  # only for a decimal that rounds a non-terminating fraction
_NUMBER = re.compile(r"(-?)(\d+(?:\.\d*)?|\.\d+)(?:/(\d+(?:\.\d*)?|\.\d+))?")  # a, -a, a/b
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|textnormal|mbox)\s*\{([^{}]*)\}"
                       r"(?:\^\{?\d\}?)?")  # cm^2
_UNITS_AT_END = re.compile(_TEXT_CMD.pattern + r"\s*$")
# math, not text: \mathrm{e} is e
_MATH_FONT = re.compile(r"\\(?:mathrm|mathit|operatorname)\s*\{([^{}]*)\}")
# the label before '=' (or \approx): x, ans, \theta, x_1, |AB|, f(x), P(A)
_SHORT_VAR = re.compile(r"[A-Za-z]{1,3}|\\[A-Za-z]+|[A-Za-z]_\{?\w{1,3}\}?|\|[A-Za-z]{1,3}\|"
                        r"|[A-Za-z]\([A-Za-z0-9,]{1,5}\)")
# words after a number that change its meaning ('5 or more', 'at least 3'): such an answer keeps
# them
_QUALIFIERS = {"or", "and", "more", "less", "than", "least", "most", "fewer", "greater", "not",
               "only", "except", "to", "between", "plus", "minus", "times", "over", "under",
               "about", "approximately"}


def _last_box(text: str) -> str | None | bool:
    """Content of the last \\boxed{...}/\\fbox{...}; None if unclosed; False if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return False
    opening = _BOX_OPEN.match(text, start)
    if not opening:  # `\boxed 5`: a single token, as some models write it
        rest = text[start:].split(None, 2)
        return rest[1].rstrip("$.") if len(rest) > 1 else None
    i = opening.end() - 1
    depth = 0
    for k in range(i, len(text)):  # linear scan; the box is inside the capped tail
        if text[k] == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:k]
    return None  # unclosed (e.g. truncated at max length): the final answer is not there


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion (last box, else `#### N`, else 'the answer is X'), or None.

    An unclosed last box gives None without falling back: a truncated answer earns nothing."""
    text = completion[-MAX_TEXT_CHARS:]
    box = _last_box(text)
    if box is not False:
        return box
    for marker in ("####", "answer is"):
        i = text.lower().rfind(marker)
        if i >= 0:
            line = text[i + len(marker):].lstrip(" \t:").split("\n", 1)[0]
            # up to the sentence's end
            answer = re.split(r"\.(?=\s|$)", line, maxsplit=1)[0].strip()
            if answer:
                return answer
    return None


def normalize_answer(s: str) -> str:
    """Canonical string form: '\\$1{,}000.50' -> '1000.5', '\\dfrac12' -> '1/2', 'x = 5' -> '5'."""
    if len(s) > MAX_ANSWER_CHARS:
        return ""
    s = s.strip().replace("\u2212", "-")                   # Unicode minus
    # no percent scaling: 50% -> 50
    s = re.sub(r"\\?[$%]|°|\\degree|\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = _MATH_FONT.sub(r"\1", s)                             # '\\mathrm{e}' -> 'e'
    while (m := _UNITS_AT_END.search(s)) and s[:m.start()].strip():
        # '5\\text{ cm}' -> '5': units end an answer
        s = s[:m.start()]
    # elsewhere the words stay: '6 \\text{ and } 8'
    s = _TEXT_CMD.sub(r"\1", s)
    m = re.fullmatch(r"([-+]?[\d.,/]+)\s+([A-Za-z][A-Za-z ]*)", s.strip())
    if m and not _QUALIFIERS & set(m[2].lower().split()):  # '5 apples' -> '5'; '5 or more' is kept
        s = m[1]
    spaced_commas = re.search(r",\s", s) is not None       # '32, 349' is a list, not 32349
    s = re.sub(r"(?<=\d)(?:\{,\}|\\,)(?=\d{3}(?!\d))", ",", s)  # '1{,}000', '1\\,000' -> '1,000'
    s = re.sub(r"\\(?:left|right|displaystyle)(?![A-Za-z])|\\[!,;:]|\s+", "", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\\frac(\d)", r"\\frac{\1}", s)             # '\\frac12' -> '\\frac{1}2'
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)  # '\\frac{1}2' -> '\\frac{1}{2}'
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)             # '\\sqrt2' -> '\\sqrt{2}'
    # a numeric \frac becomes a/b, unless a digit precedes it (mixed number 1\frac{1}{2} != 11/2)
    s = re.sub(r"(?<!\d)\\frac\{(-?[\d.]+)\}\{([\d.]+)\}", r"\1/\2", s)
    parts = s.replace("\\approx", "=").split("=")
    if len(parts) > 1 and _SHORT_VAR.fullmatch(parts[-2]):  # 'x=5', '|AB|=1', 'f(x)=1' -> the value
        s = parts[-1]
    s = s.rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    m = re.fullmatch(r"\(([-+]?[\d./]+|[A-Za-z])\)", s)      # '(1/3)' -> '1/3', '(C)' -> 'C'
    if m:
        s = m[1]
    # thousands only in proper groups: '1,2', '0,111', '(1,2)' stay lists
    if not spaced_commas and re.fullmatch(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)(\d*)(?:\.(\d*))?", s)
    if m and (m[2] or m[3]):                                # '072.50' -> '72.5', '.5' -> '0.5'
        frac = (m[3] or "").rstrip("0")
        s = m[1] + (m[2].lstrip("0") or "0") + ("." + frac if frac else "")
    return s


def _decimal(s: str) -> Fraction:
    whole, _, frac = s.partition(".")
    return Fraction(int(whole or "0") * 10**len(frac) + int(frac or "0"), 10**len(frac))


def parse_number(s: str) -> Fraction | None:
    """Exact value of a normalized number ('-3', '2.5', '3/4', '1.5/3'), else None (also for
    division by zero and for more than MAX_DIGITS digits)."""
    if len(s) > 2 * MAX_DIGITS + 3:
        return None
    m = _NUMBER.fullmatch(s.strip())
    if not m or sum(c.isdigit() for c in s) > MAX_DIGITS:
        return None
    value = _decimal(m[2])
    if m[3] is not None:
        denominator = _decimal(m[3])
        if denominator == 0:
            return None
        value /= denominator
    return -value if m[1] else value


def _terminates(x: Fraction) -> bool:
    """Whether x has a finite decimal expansion (its denominator is 2^i 5^j)."""
    d = x.denominator
    for prime in (2, 5):
        while d % prime == 0:
            d //= prime
    return d == 1


def answers_match(pred: str, truth: str) -> bool:
    """Exact rational equality for numbers (REL_TOL only if a side has decimals), else strings."""
    p, t = normalize_answer(pred), normalize_answer(truth)
    if not p or not t:
        return False
    a, b = parse_number(p), parse_number(t)
    if a is not None and b is not None:
        if a == b:
            return True
        # a rounded decimal of a fraction with no finite decimal ('0.3333333' for 1/3) is
        # accepted within REL_TOL; '1000000.5' for 1000000 is not (that would be exploitable)
        if ("." in p and not _terminates(b)) or ("." in t and not _terminates(a)):
            return abs(a - b) <= REL_TOL * max(abs(a), abs(b))
        return False
    if _NUMBER.fullmatch(p) or _NUMBER.fullmatch(t):  # '1/0' or a 5000-digit number: never right
        return False
    return p == t


class _OutOfTime(Exception):
    pass


# whether a math-verify call is being timed: the timer's signal is ignored otherwise
_timing = [False]


def _out_of_time(signum, frame):
    if _timing[0]:
        raise _OutOfTime


def math_verify_match(pred: str, truth: str) -> bool:
    """Hugging Face's math-verify (the field's reference: symbolic equivalence through sympy) on
    our extracted final answers, inside our guarantees: each side is one answer (the completion's
    last box: math-verify alone would search the whole text), capped in length and brace depth,
    percent signs dropped as ours drops them (math-verify alone takes 0.5 for 50%, which RL would
    exploit), and the whole call stopped after MATH_VERIFY_SECONDS by a timer of ours (its own
    timeouts count whole seconds; off the main thread, where no timer can interrupt, they are
    used)."""
    import math_verify
    if any(len(s) > MAX_ANSWER_CHARS or _brace_depth(s) > MAX_MATH_VERIFY_DEPTH
           for s in (pred, truth)):
        return False  # its parser slows down with nesting: 6 levels of braces took 0.6 s
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns when we time it ourselves
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    limit = None if timed else 1
    collecting = gc.isenabled()
    # a garbage collection of a large heap is not math-verify's time, and the timer must not fire
    # inside one
    gc.disable()
    if timed:  # math-verify catches exceptions and tries again: the timer repeats until we are out
        previous = signal.signal(signal.SIGALRM, _out_of_time)
        _timing[0] = True
        signal.setitimer(signal.ITIMER_REAL, MATH_VERIFY_SECONDS, 0.02)
    try:
        gold, ours = (math_verify.parse("\\boxed{" + re.sub(r"\\?%", "", s) + "}",
                                        parsing_timeout=limit)
                      for s in (truth, pred))
        return bool(gold and ours and math_verify.verify(gold, ours, timeout_seconds=limit))
    except _OutOfTime:
        return False
    finally:
        if timed:
            _timing[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if collecting:
            gc.enable()


def _brace_depth(s: str) -> int:
    depth = deepest = 0
    for c in s:
        depth += (c == "{") - (c == "}")
        deepest = max(deepest, depth)
    return deepest


def resolve_verifier(name: str) -> str:
    """'builtin' or 'math-verify' for --verifier builtin | math-verify | auto (math-verify when it
    is installed). ValueError for an unknown name or math-verify asked for but missing."""
    try:
        import math_verify  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    if name == "auto":
        return "math-verify" if installed else "builtin"
    if name not in ("builtin", "math-verify"):
        raise ValueError("--verifier must be builtin, math-verify or auto")
    if name == "math-verify" and not installed:
        raise ValueError("--verifier math-verify needs it installed: "
                         "pip install 'math-verify[antlr4_13_2]'")
    return name


def math_reward(completion: str, truth: str, verifier: str = "builtin") -> float:
    """1.0 if the completion's final answer equals the truth ('#### 72', '\\boxed{72}' or '72'),
    by our verifier or (verifier='math-verify') by math_verify_match."""
    try:
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        t = extract_answer(truth)
        match = math_verify_match if verifier == "math-verify" else answers_match
        return 1.0 if match(pred, truth if t is None else t) else 0.0
    # a verifier bug (or math-verify's timeout) must not crash training: 0
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return 0.0
