"""
Shared test fixtures: a tiny Qwen2 saved with save_pretrained (loaded by path, through the
same function a hub id takes), math datasets in the GSM8K, MATH-500 and OpenR1 schemas written
as local files, and a helper that runs train.py as a user would. Everything is offline.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tiny base, for these tests only
os.environ.setdefault("AMFT_CACHE", tempfile.mkdtemp(prefix="amft-test-cache-"))

import pytest
import torch

import model as policy

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session", autouse=True)
def quick_tiny_base():
    """The cache holds a tiny base after 30 steps (the real one takes 600, about 1.5 minutes),
    so runs of the default model start at once; the tests of the base build their own."""
    import pretrain
    path = os.path.join(pretrain.cache_dir(), f"tiny-base-{pretrain.VERSION}")
    if not os.path.isfile(os.path.join(path, "base.json")):
        pretrain.pretrain(path, steps=30, batch=16)
    return path


def run(tmp_path, name="run", **kw):
    """train.main in this process (the loop the command line runs, without an interpreter's
    start-up), with the tiny recipe and the random tiny model unless told; returns its summary,
    metrics lines and output folder."""
    import train
    out = tmp_path / name
    summary = train.main(train.Config(out=str(out), **{**dict(model="tiny", recipe="tiny",
                                                               eval_every=1000, save_every=0,
                                                               skip_test=True), **kw}))
    return summary, [json.loads(line)
                     for line in (out / "metrics.jsonl").read_text().splitlines()], out


# a step in well under a second
SMALL = dict(batch_size=3, group_size=2, max_new_tokens=8, val_prompts=3)


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return policy.make_tiny_model(str(tmp_path_factory.mktemp("tiny")),
                                  n_layer=2, n_embd=32, n_head=2)


@pytest.fixture(scope="session")
def tiny64(tiny_path):
    return policy.load_policy(tiny_path, dtype=torch.float64)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def math_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    gsm = [{"question": f"Tom has {a} pens and buys {b}. How many?",
            "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b:,}"}
           for a in range(1, 9) for b in range(1, 6)]
    math500 = [{"problem": f"Compute ${a}/{b}$.",
                "solution": f"It is $\\boxed{{\\frac{{{a}}}{{{b}}}}}$.",
                "answer": f"\\frac{{{a}}}{{{b}}}",
                "subject": "Algebra", "level": 1, "unique_id": str(a)}
               for a in range(1, 6) for b in range(2, 6)]
    openr1 = [{"prompt": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {a} squared?"}],
               "target": [{"role": "assistant",
                           "content": f"{a}*{a}={a * a}. \\boxed{{{a * a}}}"}],
               "reward_model": {"ground_truth": str(a * a), "style": "rule"}}
              for a in range(1, 21)]
    return {"gsm8k": write_jsonl(d / "gsm8k.jsonl", gsm),
            "math500": write_jsonl(d / "math500.jsonl", math500),
            "openr1": write_jsonl(d / "openr1.jsonl", openr1)}


# the task the warm model has seen whole: runs on it pass these
WARM_TASK = dict(target="10", demo="formula")


@pytest.fixture(scope="session")
def warm_path(tmp_path_factory):
    """The default tiny model after 200 SFT steps on every problem of the 3-card, target-10 task
    (its train, val and test hands alike, formula demonstrations): it solves some hands of every
    split, so validation rewards differ within groups and the meta-gradient is not zero. A fixture
    for the plumbing, not an experiment: on held-out problems a model this small scores almost
    nothing, and a silent meta-gradient would leave these tests nothing to check."""
    import random
    import amft
    import data
    path = policy.make_tiny_model(str(tmp_path_factory.mktemp("warm")))
    model, tok = policy.load_policy(path)
    splits = data.general_points(3, WARM_TASK["target"], demo=WARM_TASK["demo"])
    rows = splits["train"] + splits["val"] + splits["test"]
    rng, opt = random.Random(0), torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for _ in range(200):
        batch = [data.reshuffle(r, rng) for r in rng.sample(rows, 16)]
        demos = policy.sft_batch(tok, [r["prompt"] for r in batch], [r["demo"] for r in batch],
                                 tok.eos_token_id, "cpu")
        logp = policy.token_logprobs(model, demos.ids, demos.attn, n_last=demos.mask.shape[1])
        amft.sft_loss(logp, demos.mask).backward()
        opt.step()
        opt.zero_grad()
    with policy.no_progress_bars():
        model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
