"""
Tasks and datasets. A task is three splits of rows {"prompt", "demo", "values", "target"}:
`prompt` is what the policy sees, `demo` is the SFT demonstration y*, and `values`/`target`
are what the verifier in rewards.py needs.

General Points (Chu et al. 2025): n cards are drawn (ranks A, 2..10, J, Q, K); write one
formula with + - * / and parentheses that uses each card's value once and equals the target.
  ID rule:  J, Q, K count as 10.      OOD rule: J, Q, K count as 11, 12, 13.
The rule is written in the prompt. The OOD split is drawn exactly like the ID split; only
the face-card rule differs. Hands are split by their multiset of ranks, so no test hand is
ever seen in training. Only solvable hands are kept; the demonstration is the first
solution our exhaustive solver finds (exact rationals, no eval).

A local file can stand in for the built-in hands: `--task hands.jsonl` with one row per hand,
{"cards": ["3", "J", "5"], "target": 10} ("target" optional): it is read with `datasets`.
"""
import itertools
import random
from fractions import Fraction

RANKS = ["A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K"]
FACE_VALUES = {"id": {"J": 10, "Q": 10, "K": 10}, "ood": {"J": 11, "Q": 12, "K": 13}}
RULE_TEXT = {"id": "J,Q,K=10", "ood": "J,Q,K=11,12,13"}


def card_value(rank: str, rule: str) -> int:
    if rank in FACE_VALUES[rule]:
        return FACE_VALUES[rule][rank]
    return 1 if rank == "A" else int(rank)


def make_prompt(cards, target: int, rule: str) -> str:
    return f"cards {' '.join(cards)}; {RULE_TEXT[rule]}; make {target}: "


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
    cards = list(row["cards"])
    rng.shuffle(cards)
    values = [card_value(c, row["rule"]) for c in cards]
    return dict(row, cards=cards, values=values, prompt=make_prompt(cards, row["target"], row["rule"]),
                demo=solve(values, row["target"]))


# ---------------------------------------------------------------------------- splits
def all_hands(n_cards: int):
    """Every multiset of n ranks, as sorted tuples (ranks are drawn with replacement)."""
    return list(itertools.combinations_with_replacement(RANKS, n_cards))


def general_points_rows(hands, target: int, rule: str, rng: random.Random, orders: int = 1):
    """Rows for the solvable hands, each hand shown in up to `orders` distinct card orders
    (test splits use several, so accuracy is measured on more prompts without more hands)."""
    rows = []
    for hand in hands:
        perms = sorted(set(itertools.permutations(hand)))
        rng.shuffle(perms)
        for cards in perms[:orders]:
            rows += _row(list(cards), target, rule)
    return rows


def _row(cards, target, rule):
    values = [card_value(c, rule) for c in cards]
    demo = solve(values, target)
    if demo is None:
        return []
    return [{"prompt": make_prompt(cards, target, rule), "demo": demo, "values": values,
             "target": target, "cards": cards, "rule": rule}]


def split_hands(hands, target: int, seed: int = 0, test_frac=0.2, val_frac=0.1, eval_orders=6):
    """{'train', 'val', 'test', 'test_ood'} lists of rows. Hands are shuffled with `seed` and
    split by multiset, so val and test hands never appear in train; val and test show each
    hand in up to `eval_orders` card orders. test_ood is the test hands under the OOD rule."""
    rng = random.Random(seed)
    hands = list(hands)
    rng.shuffle(hands)
    n_test, n_val = max(1, int(len(hands) * test_frac)), max(1, int(len(hands) * val_frac))
    test, val, train = hands[:n_test], hands[n_test:n_test + n_val], hands[n_test + n_val:]
    return {"train": general_points_rows(train, target, "id", rng),
            "val": general_points_rows(val, target, "id", rng, eval_orders),
            "test": general_points_rows(test, target, "id", rng, eval_orders),
            "test_ood": general_points_rows(test, target, "ood", rng, eval_orders)}


def general_points(n_cards: int = 3, target: int = 10, seed: int = 0):
    """The built-in task: every multiset of n_cards ranks, split 70/10/20."""
    return split_hands(all_hands(n_cards), target, seed)


def hands_from_file(path: str, target: int, seed: int = 0):
    """Splits like general_points(), but of the hands in a local .jsonl/.json file."""
    import datasets  # imported here: only this loader needs it
    if not path.endswith((".jsonl", ".json")):
        raise ValueError(f"--task {path}: expected a .jsonl or .json file of hands")
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
    splits = split_hands(hands, target, seed)
    if not splits["train"]:
        raise ValueError(f"--task {path}: no hand in the training split is solvable for "
                         f"target {target}")
    return splits
