"""
Tests of the tasks and their verifiers (data.py, rewards.py), offline, in seconds:
    HF_HUB_OFFLINE=1 python -m pytest -q test_tasks.py
"""
import json
import random
import time
from fractions import Fraction

import pytest

import data
import rewards
from rewards import (answers_match, extract_answer, general_points_reward, math_reward,
                     normalize_answer, parse_formula, parse_number)


# ------------------------------------------------------------ verifier
@pytest.mark.parametrize("completion,values,target,expected", [
    ("3*(4-1)+1", [3, 4, 1, 1], 10, 1.0),
    ("(10-4)*(1+3)", [10, 4, 1, 3], 24, 1.0),
    ("8/(3-8/3)", [8, 3, 8, 3], 24, 1.0),      # needs exact fractions: 8/(1/3) = 24
    ("8/(3-8/3) = 24\nmore text", [8, 3, 8, 3], 24, 1.0),
    ("2×5", [2, 5], 10, 1.0),
    ("3*(4-1)", [3, 4, 1, 1], 10, 0.0),        # a card left out
    ("3*(4-1)+1+1", [3, 4, 1, 1], 10, 0.0),    # a card used twice
    ("3*4-1-1", [3, 4, 1, 1], 10, 1.0),
    ("3*4-1", [3, 4, 1, 1], 10, 0.0),
    ("2+3+4+1", [2, 3, 4, 1], 24, 0.0),        # right cards, wrong value
    ("10/(5-5)+2", [10, 5, 5, 2], 24, 0.0),    # division by zero
    ("", [1, 2], 3, 0.0),
    ("1+", [1, 2], 3, 0.0),
    ("((1+2)", [1, 2], 3, 0.0),
    ("one plus two", [1, 2], 3, 0.0),
    ("1.5+1.5", [1.5, 1.5], 3, 0.0),           # only integer literals are cards
    ("-1+4", [1, 4], 3, 0.0),                  # no unary minus
    ("((((1+2))))", [1, 2], 3, 1.0),           # redundant parentheses are fine
])
def test_verifier_cases(completion, values, target, expected):
    assert general_points_reward(completion, values, target) == expected


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('echo pwned')", "().__class__.__bases__[0]", "open('/etc/passwd')",
    "9**9**9**9", "2**10000000", "[1]*10**9", "lambda: 1", "(" * 5000 + "1" + ")" * 5000,
    "1+(" * 20 + "1" + ")" * 20, "1" + "+1" * 5000, "9" * 100000, "\x00\x01", "1 if 1 else 2",
])
def test_verifier_hostile_input_scores_zero_fast(hostile):
    t = time.time()
    assert general_points_reward(hostile, [1, 2], 3) == 0.0
    assert parse_formula(hostile) is None
    # bounded, not a speed target: unbounded, 9**9**9**9 would run for ever (5 s: a loaded CI)
    assert time.time() - t < 5.0


def test_solver_demonstrations_all_verify():
    splits = data.general_points(3, 10)
    assert all(len(s) > 0 for s in splits.values())
    for rows in splits.values():
        for r in rows:
            assert general_points_reward(r["demo"], r["values"], r["target"]) == 1.0, r
    assert data.solve([1, 1, 1], 24) is None
    assert general_points_reward(data.solve([8, 3, 8, 3], 24), [8, 3, 8, 3], 24) == 1.0


@pytest.mark.parametrize("cards,target", [(3, "6-15"), (3, "10"), (4, "24")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_problems_share_no_values_and_target_with_a_training_problem(cards, target, seed):
    # what the rule makes equal: under the ID rule {J, 5, 5} and {10, 5, 5} are one problem (same
    # values, same solutions, same demonstration); no val, test or test_ood row may have a
    # training twin
    splits = data.general_points(cards, target, seed=seed)
    key = lambda r: (tuple(sorted(r["values"])), r["target"])
    trained = {key(r) for r in splits["train"]}
    assert len(trained) > 50 and all(splits.values())
    for name in ("val", "test", "test_ood"):
        assert not {key(r) for r in splits[name]} & trained, name
    assert {key(r) for r in splits["val"]}.isdisjoint(key(r) for r in splits["test"])
    # face cards make several hands of one problem; a problem weighs at most 2 hands x 2 orders in
    # an accuracy
    faces = [r for r in splits["test"] if data.has_face(r)]
    per_problem = [sum(key(r) == k for r in splits["test"])
                   for k in {key(r) for r in splits["test"]}]
    assert faces and max(per_problem) <= 4 and len(faces) < len(splits["test"])
    if target == "6-15":  # the default task: enough distinct held-out problems to measure something
        assert (len({key(r) for r in splits["test"]}) >= 150
                and len({r["target"] for r in splits["test"]}) == 10)


def test_the_old_split_by_ranks_would_have_leaked():
    # the check above can fail: splitting the same hands by their ranks (the way they were split
    # before) leaves test hands whose values and target a training hand has
    rng = random.Random(0)
    hands = data.all_hands(3)
    rng.shuffle(hands)
    test, train = hands[:len(hands) // 5], hands[len(hands) // 5:]
    key = lambda hand: data.problem_key(hand, 10)
    assert {key(h) for h in test} & {key(h) for h in train}
    assert (data.problem_key(("5", "5", "J"), 10) == data.problem_key(("10", "5", "5"), 10)
            != data.problem_key(("5", "5", "J"), 11))


@pytest.mark.parametrize("spec,targets", [(24, [24]), ("24", [24]), ("6-15", list(range(6, 16))),
                                          ("10,12,24", [10, 12, 24])])
def test_targets_are_one_a_range_or_a_list(spec, targets):
    assert data.parse_targets(spec) == targets


@pytest.mark.parametrize("spec", ["", "a", "15-6", "6-", "1,1", "-3", "6 to 15"])
def test_bad_targets_are_refused(spec):
    with pytest.raises(ValueError, match="--target"):
        data.parse_targets(spec)


@pytest.mark.parametrize("style", ["compact", "plain"])
def test_reading_demonstrations_read_the_values_under_the_prompts_rule_and_verify(style):
    splits = data.general_points(3, "6-15", seed=0, style=style, eval_orders=1)
    row = next(r for r in splits["train"] if "J" in r["cards"])
    j = row["cards"].index("J")
    if style == "compact":  # '2 J 5; J,Q,K=10; 10=' answered '2 10 5: 5+10/2'
        read, formula = row["demo"].split(": ")
        assert read.split() == [str(v) for v in row["values"]] and read.split()[j] == "10"
        assert data.reward(row, formula) == 1.0
    else:
        assert row["demo"].startswith("The cards are worth ") and "\\boxed{" in row["demo"]
    assert all(data.reward(r, r["demo"]) == 1.0 for rows in splits.values() for r in rows)
    ood = next(r for r in splits["test_ood"] if "K" in r["cards"])
    assert (("13" in ood["demo"].split(":")[0]) if style == "compact"
            else ("13" in ood["demo"].split("\n")[0]))
    shuffled = data.reshuffle(row, random.Random(3))
    assert shuffled["demo_kind"] == "reading" and data.reward(shuffled, shuffled["demo"]) == 1.0
    formula_only = data.general_points(3, "6-15", seed=0, style=style, demo="formula",
                                       eval_orders=1)
    # the same problems
    assert [r["prompt"] for r in formula_only["test"]] == [r["prompt"] for r in splits["test"]]
    assert all(": " not in r["demo"] and "worth" not in r["demo"] for r in formula_only["train"])


@pytest.mark.parametrize("completion,expected", [
    ("2 10 5: 5+10/2", 1.0),     # a reading, then the formula
    ("5+10/2", 1.0),             # the formula alone scores as before
    ("\\boxed{5+10/2}", 1.0),    # and so does a box
    ("2 10 5", 0.0),             # a reading earns nothing by itself
    ("2 11 5: 5+11/2", 0.0),     # a formula over misread values scores 0
    ("2 10 5: 5+10/2=10", 1.0),
    ("2 10 5: ", 0.0),
])
def test_a_reading_earns_nothing_the_formula_is_scored(completion, expected):
    assert rewards.general_points_reward(completion, [2, 10, 5], 10) == expected


def test_task_needs_search_and_splits_are_disjoint():
    import re
    splits = data.general_points(3, "6-15", demo="formula")
    # a hand may come back with another target
    key = lambda r: (tuple(sorted(r["cards"])), r["target"])
    assert not {key(r) for r in splits["train"]} & {key(r) for r in splits["test"]}
    patterns = {re.sub(r"\d+", "n", r["demo"]) for r in splits["train"]}
    assert len(patterns) >= 5  # no single formula shape solves the task
    # OOD differs only by the face-card rule: same hands, J/Q/K valued 11/12/13
    ood = [r for r in splits["test_ood"] if "K" in r["cards"]]
    assert ood and all(13 in r["values"] for r in ood) and "J,Q,K=11,12,13" in ood[0]["prompt"]


def test_task_file_is_loaded_with_datasets_and_checked(tmp_path):
    good = tmp_path / "hands.jsonl"
    hands = data.all_hands(3)[:120]
    good.write_text("\n".join(json.dumps({"cards": list(h)}) for h in hands))
    splits = data.hands_from_file(str(good), target=10)
    assert len(splits["train"]) > 0 and all(r["target"] == 10 for r in splits["train"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"hand": ["3", "4"]}) + "\n")
    with pytest.raises(ValueError, match="'cards'"):
        data.hands_from_file(str(bad), target=10)


# ------------------------------------------------------------ math verifier
@pytest.mark.parametrize("completion,expected", [
    ("so \\boxed{72} dollars in total.", "72"),                   # text after the box
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                    # nested braces
    ("first \\boxed{3}, then I fix it: \\boxed{4}", "4"),         # last box wins
    ("\\fbox{7}", "7"),
    ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),
    ("\\boxed 5$.", "5"),                                         # box without braces
    ("\\boxed{12", None),                                         # unclosed: no answer
    ("\\boxed{1} ... \\boxed{2", None),                           # unclosed last box: no fallback
    ("He pays 3 * 4 = 12.\n#### 1,234", "1,234"),                 # GSM8K
    ("#### 72\n", "72"),
    ("The answer is 42.", "42"),
    ("so the answer is: 2.5. Done", "2.5"),                       # decimal point is not a full stop
    ("THE ANSWER IS $\\frac{1}{2}$\nnext line", "$\\frac{1}{2}$"),
    ("\\boxed{9}\n#### 8\nThe answer is 7", "9"),                 # box before ####, before prose
    ("I think 5", None),
    ("", None),
])
def test_math_verifier_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# ------------------------------------------------------------ normalization
@pytest.mark.parametrize("raw,canonical", [
    ("\\frac{1}{2}", "1/2"), ("\\dfrac{3}{4}", "3/4"), ("\\tfrac{3}{4}", "3/4"),
    ("\\frac12", "1/2"), ("\\dfrac1{2}", "1/2"), ("-\\frac{1}{2}", "-1/2"),
    ("1,000,000", "1000000"), ("-1,234.50", "-1234.5"), ("1{,}000", "1000"), ("1\\,000", "1000"),
    ("1, 2", "1,2"), ("(1,2)", "(1,2)"), ("1,23", "1,23"), ("12,34,567", "12,34,567"),
    ("\\$5", "5"), ("$5$", "5"), ("50\\%", "50"), ("50%", "50"),
    ("5\\text{ cm}", "5"), ("5 \\text{cm}^2", "5"), ("\\text{5 apples}", "5"), ("18 dollars", "18"),
    ("\\text{(A)}", "A"),
    ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("90°", "90"),
    ("\u22123", "-3"), ("+5", "5"), (".5", "0.5"), ("72.0", "72"), ("072.50", "72.5"),
    ("x = 5", "5"), ("\\theta=30", "30"), ("y_1 = 2", "2"), ("f(x) = 3x", "3x"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("\\!5", "5"), ("\\sqrt2", "\\sqrt{2}"),
    ("x^2 + 1", "x^2+1"), ("42.", "42"), ("1\\frac{1}{2}", "1\\frac{1}{2}"),  # mixed number kept
])
def test_math_verifier_normalize_answer(raw, canonical):
    assert normalize_answer(raw) == canonical


@pytest.mark.parametrize("s,value", [
    ("72", Fraction(72)), ("-3", Fraction(-3)), ("2.5", Fraction(5, 2)), ("0.5", Fraction(1, 2)),
    ("3/4", Fraction(3, 4)), ("-1/2", Fraction(-1, 2)), ("1.5/3", Fraction(1, 2)),
    ("1/0", None), ("\\sqrt{2}", None), ("1,2", None), ("1e5", None), ("", None),
    ("9" * 1001, None),                                           # over MAX_DIGITS
])
def test_math_verifier_parse_number(s, value):
    assert parse_number(s) == value


# ------------------------------------------------------------ matching
@pytest.mark.parametrize("pred,truth,expected", [
    ("2.50", "5/2", True), ("\\frac{5}{2}", "2.5", True), ("2/4", "\\frac12", True),
    (".5", "1/2", True), ("72.0", "72", True), ("1,000,000", "1000000", True),
    ("0.3333333", "1/3", True),                                  # rounded decimal: REL_TOL
    ("1000000.5", "1000000", False),                             # no tolerance when exact is finite
    ("0.5000001", "1/2", False),
    ("0.33", "1/3", False), ("3", "\\frac{10}{3}", False),       # no tolerance without decimals
    ("50", "0.5", False), ("50\\%", "0.5", False),               # no x100 percent equivalence
    ("1, 2", "12", False), ("(1,2)", "12", False),               # lists are not thousands
    ("\\sqrt{2}", "\\sqrt2", True), ("x^2 + 1", "x^2+1", True), ("(1, 2)", "(1,2)", True),
    ("\\sqrt{3}", "\\sqrt{2}", False), ("1/0", "1/0", False), ("", "", False),
])
def test_math_verifier_answers_match(pred, truth, expected):
    assert answers_match(pred, truth) is expected


@pytest.mark.parametrize("completion,truth,expected", [
    ("\\boxed{7}", "#### 7", 1.0), ("I think 5", "#### 7", 0.0),  # only the completion is scored
    ("I think 7", "#### 7", 0.0),                                # no final-answer marker
    ("so \\boxed{72} dollars.", "\\boxed{72}", 1.0), ("#### 1,234", "1234", 1.0),
    ("The answer is 42.", "42", 1.0), ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("x = \\boxed{-3}", "\u22123", 1.0), ("\\boxed{\\$5}", "5", 1.0), ("\\boxed{0.5}", "50", 0.0),
    ("\\boxed{3} no wait \\boxed{4}", "4", 1.0), ("\\boxed{4} no wait \\boxed{3}", "4", 0.0),
    ("\\boxed{1/0}", "#### 1", 0.0), ("\\boxed{\\frac{1}{0}}", "0", 0.0),
])
def test_math_verifier_math_reward(completion, truth, expected):
    assert math_reward(completion, truth) == expected


# one case per class of fault found against math-verify's labels (each failed before the fix)
@pytest.mark.parametrize("pred,truth,expected", [
    # not normalised
    ("\\boxed{\\cfrac{1}{2}}", "0.5", 1.0), ("\\boxed{5}", "5\\textnormal{ cm}", 1.0),
    # one number or letter in ()
    ("\\boxed{\\left(\\frac13\\right)}", "\\frac{1}{3}", 1.0), ("\\boxed{(C)}", "C", 1.0),
    # not thousands
    ("\\boxed{111}", "0,111", 0.0), ("\\boxed{32349}", "32, 349", 0.0),
    ("\\boxed{0,111}", "0,111", 1.0), ("\\boxed{32, 349}", "32, 349", 1.0),
    ("\\boxed{68}", "6 \\text{ and } 8", 0.0),
    ("\\boxed{6 \\text{ and } 8}", "6 \\text{ and } 8", 1.0),
    ("\\boxed{1-\\frac{1}{}}", "1-\\frac{1}{\\mathrm{e}}", 0.0),
    ("\\boxed{1-\\frac{1}{e}}", "1-\\frac{1}{\\mathrm{e}}", 1.0),
    ("\\boxed{5}", "5 or more", 0.0), ("\\boxed{3}", "at least 3", 0.0),
    ("\\boxed{18}", "18 dollars", 1.0),
    ("\\boxed{1}", "|AB|=1", 1.0), ("\\boxed{1}", "f(x)=1", 1.0),
    ("\\boxed{3.14}", "x \\approx 3.14", 1.0),
])
def test_math_verifier_fixed_classes(pred, truth, expected):
    assert math_reward(pred, truth) == expected


# ------------------------------------------------------------ hostile input
HOSTILE_MATH = [
    "{" * 10**6, "\\boxed{" * 100000, "9" * 100000, "\\boxed{" + "9" * 100000 + "}",
    "\\boxed{" + "9" * 5000 + "}", "\\boxed{" + "{" * 60 + "1" + "}" * 60 + "}",
    "#### " + "9" * 5000,
    "1/0", "\\boxed{1/0}", "\\frac{1}{0}", "\\boxed{\\frac{1}{0}}", "\\boxed{1e999999999}",
    "the answer is " * 50000, "#### " + "1," * 50000, "\\frac" * 50000, "\\text{" * 50000,
    "\\boxed{" + "1" * 900 + "." + "0" * 50000 + "}", "x=" * 100000, "\\boxed{__import__('os')}",
    "\x00\x01", None, 12,
]


@pytest.mark.parametrize("hostile", HOSTILE_MATH)
def test_math_verifier_hostile_input_scores_zero_fast(hostile):
    t = time.time()
    assert math_reward(hostile, "#### 1") == 0.0
    assert math_reward("\\boxed{1}", hostile) == 0.0
    if isinstance(hostile, str):
        # bounded, never raises, and no spurious match
        assert answers_match(hostile, hostile[:-1] + "1") is False
        parse_number(normalize_answer(hostile))
    assert time.time() - t < 5.0  # bounded: a hang would be minutes


def test_math_verifier_hostile_truth_does_not_match_hostile_prediction():
    huge = "9" * 100000
    assert math_reward("\\boxed{" + huge + "}", huge) == 0.0       # too long to be an answer
    assert math_reward("\\boxed{" + "9" * 1001 + "}", "9" * 1001) == 0.0  # over MAX_DIGITS


# ------------------------------------------------------------ math tasks from files
def test_math_tasks_load_from_local_files_in_each_schema(math_files):
    for name, path in math_files.items():
        splits = data.load_task(path, seed=0)
        assert set(splits) == {"train", "val", "test", "overlap"}, name
        assert all(splits[s] for s in ("train", "val", "test")) and not splits["overlap"], name
        assert splits == data.load_task(path, seed=0)  # deterministic
        train_q = {r["prompt"] for r in splits["train"]}
        assert not train_q & {r["prompt"] for r in splits["test"]}
        for r in splits["train"]:
            assert "\\boxed{}" in r["prompt"] and r["demo"]
            assert data.reward(r, r["demo"]) == 1.0, (name, r)  # every demonstration verifies
    gsm = data.load_task(math_files["gsm8k"])["train"][0]
    assert ("<<" not in gsm["demo"] and "####" not in gsm["demo"]
            and "Be brief" not in data.load_task(math_files["openr1"])["train"][0]["prompt"])


def test_hub_task_offline_says_how_to_use_a_local_file():
    with pytest.raises(ValueError, match=r"--task path/to/gsm8k.jsonl"):
        data.load_task("gsm8k")


# ------------------------------------------------------------ General Points for pretrained models
def test_plain_prompt_states_the_task_and_its_demonstration_verifies():
    # 91 of the 1820 hands: fast
    splits = data.split_hands(data.all_hands(4)[::20], 24, seed=0, style="plain")
    row = splits["train"][0]
    for words in ("Cards: ", "exactly once", "equals 24", "\\boxed{}", "J, Q and K count as 10"):
        assert words in row["prompt"]
    assert "J counts as 11, Q as 12 and K as 13" in splits["test_ood"][0]["prompt"]
    assert row["demo"].endswith("}") and "\\boxed{" in row["demo"]
    assert all(data.reward(r, r["demo"]) == 1.0 for r in splits["train"][:200])
    assert data.reshuffle(row, random.Random(1))["style"] == "plain"


@pytest.mark.parametrize("completion,expected", [
    ("(10-4)*(2+2)", 1.0),                             # the first line, as before
    # reasoning, then the box
    ("Let me try 10-4 = 6 and 2+2 = 4.\nSo \\boxed{(10-4)*(2+2)}", 1.0),
    ("\\boxed{(10-4)*(2+2) = 24}", 1.0),               # a trailing '= 24' is allowed
    ("\\boxed{(10 - 4) \\times (2 + 2)}", 1.0),        # LaTeX operators
    # only the last box counts
    ("\\boxed{(10-4)*(2+2)} or maybe \\boxed{10+4+2+2}", 0.0),
    ("\\boxed{(10-4)*(2+2)", 0.0),                     # an unclosed box is no answer
    ("I think\n(10-4)*(2+2)", 0.0),                    # no box: the first line only
    ("First: (10-4)*(2+2)", 1.0),                      # ... after its last ':' (a reading, a label)
    ("\\boxed{24}", 0.0),                              # the value is not a formula
])
def test_general_points_verifier_reads_the_last_box(completion, expected):
    assert rewards.general_points_reward(completion, [10, 4, 2, 2], 24) == expected


# ------------------------------------------------------------ the reference verifier
def _have_math_verify():
    try:
        import math_verify  # noqa: F401
        return True
    except ImportError:
        return False


needs_math_verify = pytest.mark.skipif(
    not _have_math_verify(),
    reason="math-verify not installed (pip install 'math-verify[antlr4_13_2]')")

# (prediction's final answer, gold answer, class), gold in the styles of GSM8K, MATH-500 and
# OpenR1: correct, reformatted and wrong predictions
PAIRS = [
    ("72", "72", "number"), ("72.0", "72", "number"), ("1,234", "1234", "number"),
    ("1234", "1,234", "number"), ("\\$18", "18", "number"), ("18 dollars", "18", "number"),
    ("-3", "\u22123", "number"), ("0.5", "1/2", "number"), ("73", "72", "number"),
    ("50", "0.5", "number"), ("50\\%", "0.5", "number"), ("111", "0,111", "number"),
    ("32349", "32, 349", "number"), ("0.3333333", "1/3", "number"), ("0.33", "1/3", "number"),
    ("1000000.5", "1000000", "number"), ("5", "5 or more", "number"),
    ("12", "12 \\text{ apples}", "number"),
    ("\\frac{1}{2}", "\\frac12", "latex"), ("\\dfrac{3}{4}", "0.75", "latex"),
    ("\\cfrac{1}{2}", "0.5", "latex"), ("\\left(\\frac13\\right)", "\\frac{1}{3}", "latex"),
    ("(C)", "C", "latex"), ("\\text{(B)}", "B", "latex"), ("90^\\circ", "90", "latex"),
    ("5\\text{ cm}", "5", "latex"), ("\\sqrt{2}", "\\sqrt2", "latex"), ("(1,2)", "(1, 2)", "latex"),
    ("x=5", "5", "latex"), ("1", "|AB|=1", "latex"), ("1", "f(x)=1", "latex"),
    ("\\sqrt{3}", "\\sqrt{2}", "latex"), ("\\frac{2}{3}", "\\frac{3}{2}", "latex"),
    ("68", "6 \\text{ and } 8", "latex"), ("3.14", "x \\approx 3.14", "latex"),
    ("1-\\frac{1}{e}", "1-\\frac{1}{\\mathrm{e}}", "latex"),
    ("2\\sqrt{2}", "\\sqrt{8}", "symbolic"), ("x+1", "1+x", "symbolic"),
    ("\\{2,1\\}", "\\{1,2\\}", "symbolic"), ("[1,2)", "[1,2)", "symbolic"),
    ("(2,1)", "(1,2)", "symbolic"), ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}", "symbolic"),
    ("\\pi/2", "\\frac{\\pi}{2}", "symbolic"), ("2x", "x \\cdot 2", "symbolic"),
    ("y=2x+1", "2x+1", "symbolic"), ("\\frac{1}{e}", "e^{-1}", "symbolic"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", "symbolic"), ("x^2-1", "(x-1)(x+1)", "symbolic"),
    ("3", "x=3", "symbolic"), ("4", "x=3", "symbolic"),
]
# every disagreement, and why it is a choice (the README lists them)
DELIBERATE = {
    ("18 dollars", "18"): "ours drops trailing unit words; math-verify reads only LaTeX units",
    ("1-\\frac{1}{e}", "1-\\frac{1}{\\mathrm{e}}"):
        "ours reads \\mathrm{e} as the letter e; math-verify as Euler's number",
    **{(p, g): "no symbolic algebra in ours (standard library only)" for p, g in [
        ("2\\sqrt{2}", "\\sqrt{8}"), ("x+1", "1+x"), ("\\{2,1\\}", "\\{1,2\\}"),
        ("\\pi/2", "\\frac{\\pi}{2}"), ("2x", "x \\cdot 2"), ("\\frac{1}{e}", "e^{-1}"),
        ("x^2-1", "(x-1)(x+1)")]},
}


@needs_math_verify
def test_builtin_and_math_verify_disagree_only_where_we_chose_to():
    by_class, disagree = {}, set()
    for pred, gold, kind in PAIRS:
        ours, ref = (math_reward("\\boxed{" + pred + "}", gold, v)
                     for v in ("builtin", "math-verify"))
        by_class.setdefault(kind, []).append(ours == ref)
        if ours != ref:
            disagree.add((pred, gold))
    # the README's figures (pytest -s)
    print({k: f"{sum(v)}/{len(v)} agree" for k, v in by_class.items()})
    assert disagree == set(DELIBERATE), disagree ^ set(DELIBERATE)
    # our guarantees hold through it: no percent,
    assert math_reward("\\boxed{0.5}", "50\\%", "math-verify") == 0.0
    # only the last box counts
    assert math_reward("\\boxed{1} or \\boxed{2}", "1", "math-verify") == 0.0


@needs_math_verify
@pytest.mark.parametrize("hostile", HOSTILE_MATH + [  # ours, and long or deeply nested LaTeX
    "\\boxed{" + "{" * 45 + "1" + "}" * 45 + "}",
    "\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}",
    "\\boxed{" + "\\sqrt{" * 40 + "2" + "}" * 40 + "}", "\\boxed{" + "x^" * 400 + "2}",
    "\\boxed{" + "+".join(["\\frac{1}{2}"] * 80) + "}",
    "\\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "\\left(" * 200 + "1" + "\\right)" * 200 + "}",
])
def test_math_verify_path_hostile_input_is_bounded_and_never_raises(hostile):
    t = time.time()
    assert math_reward(hostile, "#### 1", "math-verify") == 0.0
    assert math_reward("\\boxed{1}", hostile, "math-verify") == 0.0
    assert time.time() - t < 5.0  # bounded: a hang would be minutes
    import signal  # and the timer that bounded it is gone, the previous handler back
    assert (signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
            and signal.getsignal(signal.SIGALRM) is signal.SIG_DFL)


def test_verifier_choice_with_and_without_math_verify(monkeypatch):
    import sys
    from rewards import resolve_verifier
    assert resolve_verifier("builtin") == "builtin"
    assert resolve_verifier("auto") == ("math-verify" if _have_math_verify() else "builtin")
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    assert resolve_verifier("auto") == "builtin"
    with pytest.raises(ValueError, match="pip install"):
        resolve_verifier("math-verify")
    with pytest.raises(ValueError, match="must be builtin"):
        resolve_verifier("sympy")


# ------------------------------------------------------------ the tiny base's corpus
def test_the_base_corpus_teaches_arithmetic_and_card_rules_but_never_the_task():
    import re
    import pretrain
    rng = random.Random(0)
    lines = [pretrain.corpus_line(rng) for _ in range(20_000)]
    # never a General Points prompt ("cards; rule; N=") or a demonstration (a bare formula), under
    # either rule
    prompt_start = re.compile(r"^(?:[AJQK]|\d+)(?: (?:[AJQK]|\d+))*; J,Q,K=(?:10|11,12,13); \d+=")
    assert not any(prompt_start.match(line) for line in lines)
    assert all("=" in line or " is " in line for line in lines)
    tasks = [data.general_points(n, target, seed=0, demo=demo)
             for n, target in ((1, "1-13"), (2, "1-24"), (3, "6-15"))
             for demo in data.DEMOS]  # the small ones, whole, with both demonstrations
    rows = [r for splits in tasks for rows in splits.values() for r in rows]
    examples = {r["prompt"] + r["demo"] for r in rows} | {r["demo"] for r in rows}
    assert len(examples) > 5000 and not examples & set(lines)
    # never a reading followed by a formula ('2 11 5: 5+11/2')
    assert not any(":" in line for line in lines)
    # what it does teach: exact arithmetic with the values 1 to 13 (both ways round) and both
    # face-card rules
    sums = [line.split("=") for line in lines if re.fullmatch(r"[\d+\-*/()]+=[\d+\-*/()]+", line)]
    # (values may be negative)
    value = lambda s: Fraction(int(s)) if re.fullmatch(r"-?\d+", s) else parse_formula(s)[0]
    assert len(sums) > 10_000 and all(value(a) == value(b) for a, b in sums)
    assert {"11", "12", "13"} <= {x for a, b in sums for x in re.findall(r"\d+", a + b)}
    for rule, faces in (("J,Q,K=10", "10 10 10"), ("J,Q,K=11,12,13", "11 12 13")):
        assert any(line.startswith(f"J Q K; {rule}; is {faces}")
                   or f"; {rule}; K is {faces[-2:]}" in line for line in lines)


def test_the_tiny_base_is_built_once_cached_and_loaded_by_name(tmp_path, monkeypatch):
    import pretrain
    import train
    monkeypatch.setenv("AMFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "STEPS", 40)  # the real build takes 600 steps (README: its time)
    monkeypatch.setattr(pretrain, "BATCH", 16)
    path = pretrain.base_path()
    built = json.loads(open(f"{path}/base.json").read())
    # from log(99) = 4.6 at random weights
    assert built["steps"] == 40 and built["final_loss"] < 3.5
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("built twice"))
    assert (pretrain.base_path() == path
            and not (tmp_path / "cache" / f"tiny-base-{pretrain.VERSION}.tmp").exists())
    # the default model is the base
    summary = train.main(train.parse_args(["--steps", "1", "--warmup", "1", "--batch-size", "2",
                                           "--skip-test", "--out", str(tmp_path / "run")]))
    assert (summary["model"] == "tiny-base"
            and json.loads((tmp_path / "run" / "config.json").read_text())["recipe"] == "tiny")
