"""
Tasks and datasets. A task is splits ("train", "val", "test", and "test_ood" for General
Points) of rows {"prompt", "demo", ...}: `prompt` is what the policy sees, `demo` the SFT
demonstration y*, and the rest is what the task's verifier needs (`values`/`target` for
General Points, `answer` for math). `load_task` takes every task by name; `reward` scores.

General Points (Chu et al. 2025): n cards are drawn (ranks A, 2..10, J, Q, K); write one
formula with + - * / and parentheses that uses each card's value once and equals the target.
  ID rule:  J, Q, K count as 10.      OOD rule: J, Q, K count as 11, 12, 13.
The rule and the target are written in the prompt; one task may hold several targets
(`--target 6-15`, the tiny recipe's). Held out means held out in what the rule makes equal: a
problem is the multiset of card values under the ID rule together with the target, so {J, 5, 5}
and {10, 5, 5} with target 10 are one problem (same solutions, same demonstration). Problems,
not hands, are split 70/10/20 into train / val / test, so no val or test hand has a training
twin (test_tasks checks it over seeds and variants). test_ood is the test hands under the OOD
rule: the same problems where a hand has no J, Q or K (only the rule's text differs), new values
where it has one. Only solvable problems are kept; the formula is the first solution our
exhaustive solver finds (exact rationals, no eval). The demonstration first reads each card's
value under the prompt's rule, then gives the formula ('2 10 5: 5+10/2'), so that the skill of
reading a rule, which the tiny base learnt for both rules, is used in fine-tuning and can carry
to the OOD rule; `--demo formula` gives the formula alone.

A local file can stand in for the built-in hands: `--task hands.jsonl` with one row per hand,
{"cards": ["3", "J", "5"]}: it is read with `datasets`.

Math tasks and benchmarks (GSM8K, MATH, OpenR1; MATH-500, AIME, AMC, Minerva, OlympiadBench) are
in math_tasks.py; `load_task` takes them by name too.
"""
import itertools
import os
import random
import re
from fractions import Fraction

import math_tasks
import rewards

RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
FACE_VALUES = {"id": {"J": 10, "Q": 10, "K": 10}, "ood": {"J": 11, "Q": 12, "K": 13}}
RULE_TEXT = {"id": "J,Q,K=10", "ood": "J,Q,K=11,12,13"}


def card_value(rank: str, rule: str) -> int:
    if rank in FACE_VALUES[rule]:
        return FACE_VALUES[rule][rank]
    return 1 if rank == "A" else int(rank)


PLAIN_RULE = {"id": "J, Q and K count as 10", "ood": "J counts as 11, Q as 12 and K as 13"}
DEMOS = ("reading", "formula")


def make_prompt(cards, target: int, rule: str, style: str = "compact") -> str:
    """The question, in one of two styles.
    compact (the tiny model, one character per token): '2 J 5; J,Q,K=10; 10=' asks for a formula
      that completes the equation, e.g. '5+10/2'. Every prompt token is paid for G times per step
      in the RL passes, so it carries the cards, the rule and the target only.
    plain (pretrained models): the same in words, with the answer asked for in \boxed{}."""
    if style == "compact":
        return f"{' '.join(cards)}; {RULE_TEXT[rule]}; {target}="
    return (f"Cards: {', '.join(cards)}. A counts as 1, 2 to 10 count as their number, and "
            f"{PLAIN_RULE[rule]}. Write one arithmetic formula that uses the value of each card "
            f"exactly once, with +, -, *, / and parentheses, and equals {target}. Put the formula "
            f"in \\boxed{{}}, for example \\boxed{{(1+2)*3}}.")


def make_demo(formula: str, values, target: int, style: str = "compact",
              demo: str = "reading") -> str:
    """The demonstration y*. 'reading' first reads each card's value under the rule the prompt
    states, then gives the formula over those values: compact '2 10 5: 5+10/2' (the base's own
    words for a hand's values, `pretrain.corpus_line`), plain 'The cards are worth 2, 10 and 5.'
    then the formula and the box. 'formula' is the formula alone ('5+10/2'; plain: the formula,
    its value and the box). The reward reads the formula only (rewards.extract_formula): a
    reading earns nothing by itself, and a formula over misread values scores 0."""
    if style == "compact":
        return f"{' '.join(map(str, values))}: {formula}" if demo == "reading" else formula
    worth = (", ".join(map(str, values[:-1])) + f" and {values[-1]}" if len(values) > 1
             else str(values[0]))
    read = f"The cards are worth {worth}.\n" if demo == "reading" else ""
    return f"{read}{formula} = {target}\n\\boxed{{{formula}}}"


# ---------------------------------------------------------------------------- solver
def solve(values, target: int):
    """A formula over `values` (each used once) equal to target, or None. Exhaustive search:
    repeatedly combine two of the remaining terms with one operator. Deterministic order, so a
    hand always gets the same demonstration; + and * are tried before - and /."""
    def search(terms):  # terms: list of (Fraction value, formula string, is_atom)
        if len(terms) == 1:
            return terms[0][1] if terms[0][0] == target else None
        for i, j in itertools.permutations(range(len(terms)), 2):
            (a, fa, atom_a), (b, fb, atom_b) = terms[i], terms[j]
            rest = [t for k, t in enumerate(terms) if k not in (i, j)]
            wrap_a = fa if atom_a else f"({fa})"
            wrap_b = fb if atom_b else f"({fb})"
            candidates = []
            if i < j:  # + and * commute: try each unordered pair once
                candidates += [(a + b, f"{fa}+{fb}"), (a * b, f"{wrap_a}*{wrap_b}")]
            candidates.append((a - b, f"{fa}-{wrap_b}"))
            if b != 0:
                candidates.append((a / b, f"{wrap_a}/{wrap_b}"))
            for value, formula in candidates:
                found = search(rest + [(value, formula, False)])
                if found is not None:
                    return found
        return None
    # the last combination needs no parentheses: strip them from the answer's outer level
    return search([(Fraction(v), str(v), True) for v in values])


def reshuffle(row: dict, rng: random.Random) -> dict:
    """The same hand with its cards in a new order (and the demonstration for that order):
    training sees every hand in many orders, so the policy cannot lean on one."""
    if "cards" not in row:  # math problems have no order to shuffle
        return row
    cards = list(row["cards"])
    rng.shuffle(cards)
    # solvable in one order: in all
    return _row(cards, row["target"], row["rule"], row["style"], row["demo_kind"])[0]


# ---------------------------------------------------------------------------- splits
def all_hands(n_cards: int):
    """Every multiset of n ranks, as sorted tuples (ranks are drawn with replacement)."""
    return list(itertools.combinations_with_replacement(RANKS, n_cards))


MAX_TARGET, MAX_TARGETS = 999, 30  # 30 targets of 4 cards already take ~2 minutes to solve


def parse_targets(spec) -> list:
    """The targets of a task: 24, '24', '6-15' (a range, both ends in) or '10,12,24'."""
    text = str(spec).replace(" ", "")
    span = re.fullmatch(r"([0-9]+)-([0-9]+)", text)
    if span:
        targets = list(range(int(span[1]), int(span[2]) + 1))
    elif re.fullmatch(r"[0-9]+(,[0-9]+)*", text):
        targets = [int(x) for x in text.split(",")]
    else:
        targets = []
    if not targets or len(set(targets)) != len(targets) \
            or not all(1 <= t <= MAX_TARGET for t in targets) or len(targets) > MAX_TARGETS:
        raise ValueError(f"--target {spec}: expected a whole number from 1 to {MAX_TARGET} (24), "
                         f"a range (6-15) or a list (10,12,24), at most {MAX_TARGETS} targets")
    return targets


def problem_key(hand, target: int) -> tuple:
    """What the task makes equal: two hands with the same multiset of values under the ID rule
    and the same target are one problem (same solutions, same demonstration), whatever their
    ranks say ({J, 5, 5} and {10, 5, 5} are one problem: J counts as 10)."""
    return tuple(sorted(card_value(c, "id") for c in hand)), target


def general_points_rows(hands, target: int, rule: str, rng: random.Random, orders: int = 1,
                        style="compact", demo="reading"):
    """Rows for the solvable hands, each hand shown in up to `orders` distinct card orders
    (test splits use several, so accuracy is measured on more prompts without more hands)."""
    rows = []
    for hand in hands:
        perms = sorted(set(itertools.permutations(hand)))
        rng.shuffle(perms)
        for cards in perms[:orders]:
            rows += _row(list(cards), target, rule, style, demo)
    return rows


def _row(cards, target, rule, style="compact", demo="reading"):
    values = [card_value(c, rule) for c in cards]
    formula = solve(values, target)
    if formula is None:
        return []
    return [{"prompt": make_prompt(cards, target, rule, style),
             "demo": make_demo(formula, values, target, style, demo),
             "values": values, "target": target, "cards": cards, "rule": rule, "style": style,
             "demo_kind": demo}]


def split_hands(hands, target, seed: int = 0, test_frac=0.2, val_frac=0.1, eval_orders=2,
                style="compact", max_val=200, demo="reading", eval_hands=2):
    """{'train', 'val', 'test', 'test_ood'} lists of rows, split by problem (problem_key): the
    solvable (ID values, target) problems are shuffled with `seed` and split 70/10/20, and every
    hand goes where its problem went. So no val or test hand shares its values and target with a
    training hand: held out in what the rule makes equal, not only in the letters on the cards.
    Val and test take up to `eval_hands` hands of each problem, drawn at random ({10, 10, 5} has
    ten: 10, J, Q, K in two places), each in up to `eval_orders` card orders, so that no problem
    weighs more than eval_hands x eval_orders rows in an accuracy (val: at most `max_val` rows).
    test_ood is the test hands under the OOD rule (their face cards' values change)."""
    rng = random.Random(seed)
    by_problem = {}
    for t in parse_targets(target):
        for hand in sorted(set(tuple(sorted(h, key=RANKS.index)) for h in hands)):
            by_problem.setdefault(problem_key(hand, t), []).append(hand)
    # only solvable problems count
    problems = [p for p in by_problem if solve(list(p[0]), p[1]) is not None]
    rng.shuffle(problems)
    n_test, n_val = max(1, int(len(problems) * test_frac)), max(1, int(len(problems) * val_frac))
    parts = {"test": problems[:n_test], "val": problems[n_test:n_test + n_val],
             "train": problems[n_test + n_val:]}

    # every hand of a training problem; up to eval_hands of a held-out one's
    def drawn(name, problem):
        all_ = by_problem[problem]
        return all_ if name == "train" else rng.sample(all_, min(eval_hands, len(all_)))
    hands_of = {name: [(h, p[1]) for p in part for h in drawn(name, p)]
                for name, part in parts.items()}

    def rows(name, rule, orders):
        return [r for h, t in hands_of[name]
                for r in general_points_rows([h], t, rule, rng, orders, style, demo)]
    train_rows, val_rows = rows("train", "id", 1), rows("val", "id", eval_orders)
    # 4 cards: ~1,000 rows; checking them all every --eval-every steps is slow
    if len(val_rows) > max_val:
        val_rows = rng.sample(val_rows, max_val)
    return {"train": train_rows, "val": val_rows, "test": rows("test", "id", eval_orders),
            "test_ood": rows("test", "ood", eval_orders)}


def general_points(n_cards: int = 3, target=10, seed: int = 0, style: str = "compact",
                   demo: str = "reading", eval_orders: int = 2):
    """The built-in task: every multiset of n_cards ranks with each target, split 70/10/20 by
    problem."""
    return split_hands(all_hands(n_cards), target, seed, style=style, demo=demo,
                       eval_orders=eval_orders)


def has_face(row) -> bool:
    """Does a General Points row hold a J, Q or K (the cards whose values the OOD rule changes)?"""
    return bool(set(FACE_VALUES["ood"]) & set(row["cards"]))


def load_task(task: str, seed: int = 0, cards: int = 3, target=10, style: str = "compact",
              demo: str = "reading", need_demos: bool = True, exclude=frozenset()):
    """Every task by name: general-points, a math task (math_tasks.TRAIN), or a local file (a file
    whose rows have `cards` is a General Points hand list; any other is a math dataset). `style`
    is the General Points prompt (make_prompt); need_demos=False keeps math rows without a
    demonstration (a run that only scores); a math task takes out the rows whose problem is in
    `exclude` (math_tasks.math_task)."""
    if task == "general-points":
        return general_points(cards, target, seed, style, demo)
    if task in math_tasks.TEST_ONLY:
        raise ValueError(test_only_error(task))
    if task not in math_tasks.TRAIN and not os.path.isfile(task):
        raise ValueError(f"--task {task}: not general-points, {', '.join(math_tasks.TRAIN)}, "
                         "or an existing file")
    if os.path.isfile(task) and task.endswith((".jsonl", ".json")) and has_cards_field(task):
        return hands_from_file(task, target, seed, style, demo)
    return math_tasks.math_task(task, seed, need_demos=need_demos, exclude=exclude)


def test_only_error(task: str) -> str:
    return (f"--task {task}: {math_tasks.BENCHMARKS[task][0]} is a test set, never training data "
            "(a model trained on it is scored on problems it learnt); train on gsm8k, math "
            f"(MATH's train split) or openr1, and score it with --eval-tasks {task}")


def drop_long_demos(rows, n_tokens, limit: int):
    """(the rows whose demonstration is at most `limit` tokens, the indices of the others).
    n_tokens(texts) counts each text's tokens; limit 0 keeps every row."""
    lengths = n_tokens([r["demo"] for r in rows]) if limit and rows else [0] * len(rows)
    return ([r for r, n in zip(rows, lengths) if n <= limit or not limit],
            [i for i, n in enumerate(lengths) if limit and n > limit])


def has_cards_field(path: str) -> bool:
    with open(path) as f:
        head = f.read(4096)
    return '"cards"' in head


def reward(row: dict, completion: str, verifier: str = "builtin") -> float:
    """The task's verifier for one completion (`verifier`: the math one,
    rewards.resolve_verifier)."""
    if "values" in row:
        return rewards.general_points_reward(completion, row["values"], row["target"])
    return rewards.math_reward(completion, row["answer"], verifier)


def hands_from_file(path: str, target, seed: int = 0, style: str = "compact",
                    demo: str = "reading"):
    """Splits like general_points(), but of the hands in a local .jsonl/.json file."""
    import datasets  # imported here: only this loader needs it
    math_tasks.check_json_file(path)
    with math_tasks.local_file_quiet(datasets):
        ds = datasets.load_dataset("json", data_files=path, split="train")
    if "cards" not in ds.column_names:
        raise ValueError(f"--task {path}: rows need a 'cards' field (list of ranks), "
                         f"found {ds.column_names}")
    hands = []
    for i, row in enumerate(ds):
        cards = row["cards"]
        if not isinstance(cards, list) or not cards or any(str(c) not in RANKS for c in cards):
            raise ValueError(f"--task {path}: row {i} 'cards' must be a list of ranks from "
                             f"{' '.join(RANKS)}, got {cards!r}")
        hands.append(tuple(str(c) for c in cards))
    splits = split_hands(hands, target, seed, style=style, demo=demo)
    if not splits["train"]:
        raise ValueError(f"--task {path}: no hand in the training split is solvable for "
                         f"target {target}")
    return splits
