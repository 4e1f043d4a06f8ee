"""
The tiny base model: the tiny Qwen2 after a short pretraining on a synthetic corpus, so that
it starts fine-tuning knowing numbers and the card rules, as a pretrained LLM would, instead
of from random weights. `--model tiny-base` (the default) builds it on first use, caches it,
and loads it from the cache after that; `--model tiny` is still the random model.

The corpus (`corpus_line`), one short line per example, drawn afresh from a seeded stream:
- arithmetic over the values 1 to 13: a formula of 1 to 4 values with + - * / and
  parentheses and its value, written both ways ("(3+4)*2=14" and "14=(3+4)*2"); values that
  are not whole numbers are not written;
- card reading under both face-card rules, in the compact prompt's own words: a hand and the
  values its cards have ("2 J 5; J,Q,K=11,12,13; is 2 11 5"), and single cards
  ("Q; J,Q,K=10; Q is 10").
What it leaves out: the General Points task itself. No line holds a hand together with a
target ("...; 24=") or a formula over a hand's cards, so no prompt of either rule and no
demonstration of the task is in the corpus (test_tasks checks 20,000 lines against every
prompt of both rules). What the model sees in fine-tuning is still new: the prompt's form,
and that a formula must use each card's value exactly once.

Training is SFT on all tokens of each line (amft.sft_loss through model.sft_batch), AdamW.
"""
import json
import os
import random
import shutil
import time
from fractions import Fraction

import torch
from tqdm import tqdm

import amft
import data
import model as policy

VERSION = "v1"  # bump when the corpus or the training below changes: a new cache folder
STEPS, BATCH, LR = 600, 64, 2e-3  # about 1.5 minutes on 2 CPU cores


def cache_dir() -> str:
    return os.environ.get("AMFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "amft")


def formula(rng: random.Random, n: int) -> tuple:
    """(text, value) of a random formula over n values from 1 to 13, or (text, None) if its
    value is not a whole number (division by zero included)."""
    items = [(str(v), Fraction(v)) for v in (rng.randint(1, 13) for _ in range(n))]
    while len(items) > 1:
        i = rng.randrange(len(items) - 1)
        (a, x), (b, y) = items[i], items[i + 1]
        op = rng.choice("+-*/")
        if op == "/" and y == 0:
            return a, None
        value = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
        wrap = lambda s: f"({s})" if not s.isdigit() else s
        items[i:i + 2] = [(f"{wrap(a) if op in '*/' else a}{op}{wrap(b) if op != '+' else b}",
                           value)]
    text, value = items[0]
    return text, (int(value) if value.denominator == 1 else None)


def corpus_line(rng: random.Random) -> str:
    """One line of the corpus (see the module's docstring)."""
    kind = rng.random()
    if kind < 0.6:
        text, value = None, None
        while value is None:
            text, value = formula(rng, rng.choice([1, 2, 2, 3, 3, 4]))
        return f"{text}={value}" if rng.random() < 0.5 else f"{value}={text}"
    rule = rng.choice(["id", "ood"])
    if kind < 0.85:
        cards = [rng.choice(data.RANKS) for _ in range(rng.randint(1, 5))]
        return (f"{' '.join(cards)}; {data.RULE_TEXT[rule]}; "
                f"is {' '.join(str(data.card_value(c, rule)) for c in cards)}")
    card = rng.choice(data.RANKS)
    return f"{card}; {data.RULE_TEXT[rule]}; {card} is {data.card_value(card, rule)}"


def pretrain(path: str, steps: int = STEPS, batch: int = BATCH, lr: float = LR,
             seed: int = 0) -> str:
    """Build the tiny base at `path`: the tiny model (seed 0), `steps` AdamW steps of SFT on
    `batch` corpus lines each, saved with save_pretrained and a base.json that says how. The
    caller's torch random stream is left as it was, so a run that builds the base samples
    exactly what a run that finds it cached does."""
    with torch.random.fork_rng():
        return _pretrain(path, steps, batch, lr, seed)


def _pretrain(path, steps, batch, lr, seed):
    t0 = time.time()
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with policy.no_progress_bars():
        policy.make_tiny_model(tmp, seed=seed)
        model, tok = policy.load_policy(tmp)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(f"corpus-{seed}")
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="building the tiny base (once)", dynamic_ncols=True):
        demos = policy.sft_batch(tok, ["\n"] * batch, [corpus_line(rng) for _ in range(batch)],
                                 tok.eos_token_id, "cpu")  # a line after a newline
        logp = policy.token_logprobs(model, demos.ids, demos.attn, n_last=demos.mask.shape[1])
        loss = amft.sft_loss(logp, demos.mask, demos.mask.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with policy.no_progress_bars():
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "base.json"), "w") as f:
        json.dump(dict(version=VERSION, steps=steps, batch=batch, lr=lr, seed=seed,
                       final_loss=sum(losses[-20:]) / len(losses[-20:]),
                       seconds=round(time.time() - t0, 1)), f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # a half-built base is never found in the cache
    return path


def base_path() -> str:
    """The cached tiny base's folder, built on first use."""
    path = os.path.join(cache_dir(), f"tiny-base-{VERSION}")
    if not os.path.isfile(os.path.join(path, "base.json")):
        os.makedirs(cache_dir(), exist_ok=True)
        print(f"building the tiny base model in {path} (once; about 1.5 minutes on 2 CPU cores)")
        pretrain(path, STEPS, BATCH, LR)
    return path
