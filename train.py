"""
Train a causal LM with AMFT (or a baseline) and evaluate it. One linear loop, no Trainer.

    python train.py                          # tiny Qwen2 on General Points, CPU, minutes
    python train.py --method sft             # a baseline (see --help for all nine methods)
    python train.py --model Qwen2.5-0.5B --task gsm8k --lr 1e-6 --dtype bfloat16   # real model
    python train.py --resume runs/amft-...   # continue a stopped run exactly
    python train.py --eval-only --model runs/amft-.../model --pass-k 8
    python train.py --help                   # every flag, generated from Config below

Each step (after an SFT-only warm-up of --warmup steps):
    sample G completions per prompt -> reward -> group advantages -> g_RL = grad L_RL
    demonstrations -> g_SFT = grad L_SFT -> mu update (entropy term; meta-gradient every K)
    -> parameters step on (1 - mu) g_RL + mu g_SFT -> log
Outputs go to --out (default runs/<method>-<time>): metrics.jsonl (one line per step),
summary.json (accuracy before and after), model/ (save_pretrained), checkpoint/ (resumable).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import amft
import data
import model as policy

METHODS = ("amft", "amft-no-meta", "amft-no-entropy", "fixed-mix", "sft", "grpo", "sft-grpo", "srft", "luffy")
AMFT = ("amft", "amft-no-meta", "amft-no-entropy")   # the methods with a mu controller
WARM = AMFT + ("fixed-mix", "sft-grpo")              # the methods that start with SFT-only steps
DEMO_IN_GROUP = ("srft", "luffy")                    # a demonstration joins each GRPO group


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = arg("tiny", "'tiny' (a small Qwen2 built from a config), 'random-0.5b' (Qwen2.5-0.5B's shape, random), a hub id, an alias like Qwen2.5-0.5B, or a folder")
    method: str = arg("amft", f"one of {', '.join(METHODS)}")
    task: str = arg("general-points", "general-points | gsm8k | math500 | openr1 | a .jsonl/.json/.parquet file (see data.py)")
    cards: int = arg(3, "General Points: cards per hand (the paper's variant: 4)")
    target: int = arg(10, "General Points: the value the formula must reach (the paper's: 24)")
    chat: str = arg("auto", "use the chat template: auto (instruct/chat models) | on | off")
    # budget
    steps: int = arg(800, "optimizer steps in all, warm-up included")
    warmup: int = arg(200, "SFT-only steps before mixing starts (W; amft*, fixed-mix, and sft-grpo's first stage)")
    batch_size: int = arg(16, "B: prompts per step (each has a demonstration)")
    group_size: int = arg(8, "G: completions sampled per prompt")
    max_new_tokens: int = arg(0, "longest completion in tokens; 0 = 16 for general-points, 512 for math")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same one")
    # optimizer and memory
    lr: float = arg(1e-3, "AdamW learning rate (the paper's 1e-6 is for a 7B model)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the mixed gradient to this norm")
    micro_batch: int = arg(0, "sequences per forward/backward pass (gradients accumulate); 0 = all at once")
    grad_ckpt: bool = arg(False, "gradient checkpointing: less memory, ~30% more compute")
    lora_r: int = arg(0, "LoRA rank through peft (pip install peft); 0 = full fine-tuning")
    # GRPO
    eps_low: float = arg(0.2, "PPO clip, lower side")
    eps_high: float = arg(0.28, "PPO clip, upper side (DAPO's clip-higher)")
    beta: float = arg(0.0, "k3 KL penalty to a frozen reference (the policy as RL begins); 0 = off")
    # the mu controller
    mu0: float = arg(0.8, "initial mu (weight on SFT); fixed-mix keeps it")
    mu_min: float = arg(0.05, "lower bound of mu")
    mu_max: float = arg(0.95, "upper bound of mu")
    eta_meta: float = arg(0.05, "meta step, in units of mu (dU/dmu is divided by its running RMS)")
    eta_H: float = arg(0.01, "entropy step: mu += eta_H * (H_target - H)")
    meta_every: int = arg(10, "K: steps between meta-gradients")
    meta_grad: str = arg("first-order", "first-order | autograd | fd")
    meta_alpha: float = arg(0.0, "look-ahead step alpha; 0 = use --lr")
    val_prompts: int = arg(8, "validation prompts (x G samples) per meta-gradient")
    H_target: float = arg(float("nan"), "target entropy in nats; nan = measure at the end of warm-up")
    # run
    eval_every: int = arg(50, "steps between greedy accuracy checks on the validation split")
    eval_batch: int = arg(64, "prompts per generate call when evaluating")
    sampler: str = arg("generate", "rollouts: generate (transformers) | loop (our decode loop, same samples) | compiled (static cache + torch.compile: the GPU fast path, see bench.py)")
    pass_k: int = arg(0, "also report pass@k from k samples per test prompt at --temperature; 0 = off")
    save_every: int = arg(200, "steps between checkpoints (one is always written at the end); 0 = end only")
    max_bad_steps: int = arg(10, "stop after this many non-finite losses in a row")
    seed: int = arg(0, "random seed (model init, data order, sampling)")
    dtype: str = arg("float32", "float32 | bfloat16 | float64")
    device: str = arg("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    out: str = arg("", "output folder (default: runs/<method>-<time>); must be new or empty")
    resume: str = arg("", "a run folder to continue from its checkpoint; flags given now override its config")
    eval_only: bool = arg(False, "only evaluate --model on --task's test split(s) and write summary.json")
    skip_test: bool = arg(False, "skip the test-split evaluations before and after training (benchmarks)")


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, non-zero exit."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. losses keep diverging): reported in one line."""


def check(cfg: Config):
    """Reject impossible settings before anything is loaded or written."""
    rules = [
        (cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}"),
        (cfg.meta_grad in ("first-order", "autograd", "fd"), "--meta-grad must be first-order, autograd or fd"),
        (cfg.dtype in ("float32", "bfloat16", "float64"), "--dtype must be float32, bfloat16 or float64"),
        (cfg.chat in ("auto", "on", "off"), "--chat must be auto, on or off"),
        (cfg.sampler in ("generate", "loop", "compiled"), "--sampler must be generate, loop or compiled"),
        (0 <= cfg.mu_min <= cfg.mu_max <= 1, "mu bounds must satisfy 0 <= --mu-min <= --mu-max <= 1"),
        (0 <= cfg.mu0 <= 1, "--mu0 must be in [0, 1]"),
        (cfg.group_size >= 2, "--group-size (G) must be at least 2: advantages compare samples of one prompt"),
        (cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.max_new_tokens >= 0, "--steps and --batch-size must be >= 1"),
        (min(cfg.warmup, cfg.micro_batch, cfg.pass_k, cfg.save_every, cfg.lora_r) >= 0, "counts must be >= 0"),
        (min(cfg.meta_every, cfg.eval_every, cfg.val_prompts, cfg.eval_batch) >= 1, "--meta-every, --eval-every, --val-prompts, --eval-batch must be >= 1"),
        (cfg.temperature > 0 and cfg.lr > 0, "--temperature and --lr must be > 0"),
        (1 <= cfg.cards <= 5, "--cards must be between 1 and 5"),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    if cfg.out and os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.resume:
        raise UsageError(f"--out {cfg.out} exists and is not empty; choose a new folder (or --resume it)")


# ---------------------------------------------------------------------------- building blocks
def slices(n: int, size: int):
    """Micro-batches of rows: [slice(0, size), slice(size, 2 size), ...]; size 0 = one slice."""
    size = size or n
    return [slice(i, i + size) for i in range(0, n, size)]


def score(texts, rows, G):
    """Rewards (B, G) of B*G completions, prompt-major."""
    return torch.tensor([data.reward(rows[i // G], t) for i, t in enumerate(texts)]).view(len(rows), G)


@torch.no_grad()
def evaluate(model, tok, rows, cfg, eos, k=0):
    """Greedy pass@1 (and pass@k from k samples at --temperature): the fraction of rows whose
    greedy completion (any of k samples) earns reward 1."""
    model.eval()
    hits, hits_k = 0.0, 0.0
    for i in range(0, len(rows), cfg.eval_batch):
        chunk = rows[i:i + cfg.eval_batch]
        prompts = [r["prompt"] for r in chunk]
        greedy = policy.sample(model, tok, prompts, 1, 1.0, cfg.max_new_tokens, True, eos, cfg.sampler)[4]
        hits += score(greedy, chunk, 1).sum().item()
        if k:
            texts = policy.sample(model, tok, prompts, k, cfg.temperature, cfg.max_new_tokens, False, eos, cfg.sampler)[4]
            hits_k += (score(texts, chunk, k).max(1).values == 1).sum().item()
    model.train()
    n = max(len(rows), 1)
    return hits / n, (hits_k / n if k else None)


def sft_backward(model, ids, attn, lmask, micro):
    """Accumulate grad L_SFT in micro-batches; returns the loss."""
    total, denom = 0.0, lmask.sum()
    for sl in slices(len(ids), micro):
        logp = policy.token_logprobs(model, ids[sl], attn[sl], n_last=lmask.shape[1])[0]
        loss = amft.sft_loss(logp, lmask[sl], denom)
        loss.backward()
        total += loss.item()
    return total


def rl_backward(model, ref_model, full, fattn, cmask, A, cfg, demos=None):
    """Accumulate grad L_RL in micro-batches; returns the loss, the rollouts' mean token
    entropy (free: from the same logits) and summed metrics. demos = (ids, attn, mask, A) adds
    the off-policy demonstrations of srft/luffy to the token-level mean."""
    C = cmask.shape[1]
    total, H_sum, metrics = 0.0, 0.0, {}
    denom = cmask.sum() + (demos[2].sum() if demos else 0)
    for sl in slices(len(full), cfg.micro_batch):
        logp, ent = policy.token_logprobs(model, full[sl], fattn[sl], cfg.temperature, True, n_last=C)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = policy.token_logprobs(ref_model, full[sl], fattn[sl], cfg.temperature, n_last=C)[0]
        loss, chunk_metrics = amft.grpo_loss(logp, logp.detach(), A[sl], cmask[sl], cfg.eps_low, cfg.eps_high,
                                             cfg.beta, ref_logp, denom)
        loss.backward()
        total += loss.item()
        H_sum += (ent.detach() * cmask[sl]).sum().item()
        for k, v in chunk_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    if demos:
        ids, attn, dmask, A_demo = demos
        for sl in slices(len(ids), cfg.micro_batch):
            logp = policy.token_logprobs(model, ids[sl], attn[sl], cfg.temperature, n_last=dmask.shape[1])[0]
            loss = amft.off_policy_loss(logp, A_demo[sl], dmask[sl], shaping=cfg.method == "luffy", denom=denom)
            loss.backward()
            total += loss.item()
    return total, H_sum / cmask.sum().item(), metrics


def rollouts(model, tok, rows, cfg, eos):
    """G samples per row -> (prompt+completion ids, attention, completion mask, rewards (B, G))."""
    model.eval()
    ids, attn, comp, cmask, texts = policy.sample(model, tok, [r["prompt"] for r in rows], cfg.group_size,
                                                  cfg.temperature, cfg.max_new_tokens, eos=eos, sampler=cfg.sampler)
    model.train()
    return torch.cat([ids, comp], 1), torch.cat([attn, cmask.long()], 1), cmask, score(texts, rows, cfg.group_size)


def meta_gradient(model, tok, val_rows, params, g_rl, g_sft, mu, alpha, cfg, eos):
    """dU/dmu on fresh validation rollouts from pi_theta, by the estimator cfg.meta_grad."""
    full, fattn, cmask, r = rollouts(model, tok, random.sample(val_rows, min(cfg.val_prompts, len(val_rows))), cfg, eos)
    A = amft.group_advantages(r)[0].flatten()                                   # (B_val * G,)

    def U(theta=None):  # the policy-gradient surrogate of validation reward, at weights theta
        logp = policy.token_logprobs(model, full, fattn, cfg.temperature, params=theta, n_last=cmask.shape[1])[0]
        return amft.policy_gradient_surrogate(logp, A.to(logp), cmask)

    if cfg.meta_grad == "first-order":
        grads = torch.autograd.grad(U(), list(params.values()), allow_unused=True)
        return amft.meta_grad_first_order({n: g for n, g in zip(params, grads) if g is not None}, g_rl, g_sft, alpha)
    if cfg.meta_grad == "autograd":
        return amft.meta_grad_autograd(U, params, g_rl, g_sft, mu, alpha)
    return amft.meta_grad_fd(U, params, g_rl, g_sft, mu, alpha)


def atomic_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------- the run
def main(cfg: Config):
    check(cfg)
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = getattr(torch, cfg.dtype)
    try:
        splits = data.load_task(cfg.task, cfg.seed, cfg.cards, cfg.target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not cfg.max_new_tokens:
        cfg.max_new_tokens = 16 if "test_ood" in splits else 512
    ckpt = os.path.join(cfg.resume, "checkpoint") if cfg.resume else None
    name = ckpt or cfg.model
    if name in ("tiny", "random-0.5b"):
        shape = policy.QWEN_0_5B if name == "random-0.5b" else {}
        name = policy.make_tiny_model(tempfile.mkdtemp(prefix="amft-tiny-"), seed=cfg.seed, **shape)
    try:
        model, tok = policy.load_policy(name, dtype, device, lora_r=cfg.lora_r, grad_ckpt=cfg.grad_ckpt)
    except ValueError as e:
        raise UsageError(str(e)) from None
    chat = policy.use_chat(tok, cfg.model, cfg.chat)
    eos, end = policy.eos_ids(tok, model, chat), policy.end_id(tok, chat)
    splits["val"] = splits["val"] or [dict(r) for r in splits["train"]]  # a small hand file may leave none
    for name, rows in splits.items():  # training rows are formatted as they are drawn (reshuffled)
        for r in rows if name != "train" else []:
            r["prompt"] = policy.format_prompt(tok, r["prompt"], chat)
    # only now, with every input checked, do we create the output folder
    out = cfg.resume or cfg.out or os.path.join("runs", f"{'eval' if cfg.eval_only else cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)

    def test_all(k=0):
        """Greedy accuracy on the test split(s), and pass@k on the ID test when k > 0."""
        result = {"id_accuracy": None, "ood_accuracy": None}
        if not cfg.skip_test:
            result["id_accuracy"], pass_k = evaluate(model, tok, splits["test"], cfg, eos, k)
            if "test_ood" in splits:
                result["ood_accuracy"] = evaluate(model, tok, splits["test_ood"], cfg, eos)[0]
            if k:
                result[f"pass@{k}"] = pass_k
        return result

    if cfg.eval_only:
        summary = dict(method="eval-only", model=cfg.model, task=cfg.task, steps=0, **test_all(cfg.pass_k),
                       test_prompts=len(splits["test"]), wall_seconds=round(time.time() - t_start, 1), device=device)
        atomic_json(summary, os.path.join(out, "summary.json"))
        print(json.dumps(summary))
        return summary
    atomic_json(dataclasses.asdict(cfg), os.path.join(out, "config.json"))

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alpha = cfg.meta_alpha or cfg.lr
    train_rows, val_rows = splits["train"], splits["val"]
    ref_model = None
    # everything the loop carries from step to step: what a checkpoint must hold
    state = {"step": 0, "mu": cfg.mu0 if cfg.method in AMFT + ("fixed-mix",) else None, "meta_v": 0.0, "meta_n": 0,
             "H_target": None if math.isnan(cfg.H_target) else cfg.H_target, "bad_in_row": 0, "skipped": 0,
             "samples_seen": 0, "order": [], "before": None}
    if ckpt:
        state, ref_model = policy.load_checkpoint(ckpt, model, opt)
        with open(os.path.join(out, "metrics.jsonl")) as f:  # drop lines logged after the checkpoint
            kept = [l for l in f if json.loads(l)["step"] < state["step"]]
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.writelines(kept)
    if state["before"] is None:
        state["before"] = test_all()
    print(f"{cfg.method}: {len(train_rows)} train / {len(splits['val'])} val / {len(splits['test'])} test prompts; "
          f"before training {state['before']}")

    stop = []  # Ctrl-C asks to stop; the loop stops between steps, so the checkpoint is consistent
    signal.signal(signal.SIGINT, lambda *_: (stop.append(1), signal.signal(signal.SIGINT, signal.default_int_handler)))
    log = open(os.path.join(out, "metrics.jsonl"), "a")
    pbar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps, desc=cfg.method, dynamic_ncols=True)
    for step in pbar:
        t0 = time.time()
        if len(state["order"]) < cfg.batch_size:  # epochs over the training rows, reshuffled
            state["order"] += random.sample(range(len(train_rows)), len(train_rows))
        rows = [data.reshuffle(train_rows[state["order"].pop()], random) for _ in range(cfg.batch_size)]
        rows = [dict(r, prompt=policy.format_prompt(tok, r["prompt"], chat)) for r in rows]
        warm = cfg.method in WARM and step < cfg.warmup
        use_rl = cfg.method != "sft" and not warm
        use_sft = cfg.method not in ("grpo", "luffy") and (warm or cfg.method != "sft-grpo")
        mu = state["mu"]
        m = {"step": step, "phase": "warmup" if warm else "main", "mu": mu, "entropy": None,
             "H_target": state["H_target"], "reward_mean": None, "reward_std": None, "sft_loss": None,
             "rl_loss": None, "meta_grad": None, "frac_zero_std": None}
        needs_demos = use_sft or (use_rl and cfg.method in DEMO_IN_GROUP)
        if needs_demos:
            demo_batch = policy.sft_batch(tok, [r["prompt"] for r in rows], [r["demo"] for r in rows], end, device)
        # --------------------------------------------------------------- SFT gradient
        g_sft, g_rl, losses = {}, {}, []
        if use_sft:
            opt.zero_grad(set_to_none=True)
            m["sft_loss"] = sft_backward(model, *demo_batch, cfg.micro_batch)
            g_sft = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            losses.append(m["sft_loss"])
        # --------------------------------------------------------------- rollouts and RL gradient
        if use_rl:
            full, fattn, cmask, r = rollouts(model, tok, rows, cfg, eos)        # r: (B, G)
            demos = None
            if cfg.method in DEMO_IN_GROUP:  # the demonstration is the group's (G+1)-th sample
                r_demo = torch.tensor([data.reward(row, row["demo"]) for row in rows])[:, None]
                A, m["frac_zero_std"] = amft.group_advantages(torch.cat([r, r_demo], 1))  # (B, G+1)
                demos, A = (*demo_batch, A[:, -1].to(device)), A[:, :-1]
            else:
                A, m["frac_zero_std"] = amft.group_advantages(r)
            if cfg.beta > 0 and ref_model is None:  # frozen copy of the policy as RL begins
                ref_model = policy.frozen_copy(model)
            opt.zero_grad(set_to_none=True)
            m["rl_loss"], H, rl_metrics = rl_backward(model, ref_model, full, fattn, cmask, A.flatten().to(device), cfg, demos)
            g_rl = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            m.update(rl_metrics, entropy=H, reward_mean=r.mean().item(), reward_std=r.std().item(),
                     completion_len=cmask.sum(1).mean().item())
            losses.append(m["rl_loss"])
            if state["H_target"] is None and cfg.method in AMFT:  # entropy of the warmed-up policy's own samples
                state["H_target"] = m["H_target"] = H
        # --------------------------------------------------------------- mu update (AMFT only)
        if use_rl and cfg.method in AMFT:
            g_H = 0.0 if cfg.method == "amft-no-entropy" else amft.entropy_signal(state["H_target"], m["entropy"])
            g_meta = 0.0
            if cfg.method != "amft-no-meta" and (step - cfg.warmup) % cfg.meta_every == 0:
                raw = meta_gradient(model, tok, val_rows, params, g_rl, g_sft, mu, alpha, cfg, eos)
                g_meta, state["meta_v"], state["meta_n"] = amft.normalize_meta_grad(raw, state["meta_v"], state["meta_n"])
                m["meta_grad"], m["meta_grad_scaled"] = raw, g_meta
            state["mu"] = m["mu"] = amft.update_mu(mu, g_meta, g_H, cfg.eta_meta, cfg.eta_H, cfg.mu_min, cfg.mu_max)
        # --------------------------------------------------------------- parameter step
        m["w_rl"], m["w_sft"] = amft.loss_weights(cfg.method, state["mu"], m["entropy"] or 0.0, warm)
        if not all(math.isfinite(l) for l in losses):
            state["bad_in_row"] += 1
            state["skipped"] += 1
            m["skipped"] = True
            if state["bad_in_row"] >= cfg.max_bad_steps:
                raise TrainingError(f"stopped at step {step}: {state['bad_in_row']} non-finite losses in a row "
                                    f"(try a lower --lr or --dtype float32)")
        else:
            state["bad_in_row"] = 0
            mixed = amft.mix_grads(g_rl, g_sft, m["w_rl"], m["w_sft"])
            for n, p in params.items():
                p.grad = mixed.get(n)
            m["grad_norm"] = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip).item()
            opt.step()
        # --------------------------------------------------------------- log and save
        n_samples = (cfg.batch_size if needs_demos else 0) + (cfg.batch_size * cfg.group_size if use_rl else 0)  # demonstrations + rollouts
        state["samples_seen"] += n_samples
        state["step"] = step + 1
        m["samples_per_s"], m["samples_seen"] = n_samples / (time.time() - t0), state["samples_seen"]
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:  # not counted in samples_per_s
            m["val_accuracy"] = evaluate(model, tok, val_rows, cfg, eos)[0]
        log.write(json.dumps(m) + "\n")
        log.flush()
        pbar.set_postfix({k: f"{v:.3f}" for k, v in [("mu", m["mu"]), ("reward", m["reward_mean"]),
                                                      ("H", m["entropy"]), ("sft", m["sft_loss"])] if v is not None})
        if stop or (cfg.save_every and state["step"] % cfg.save_every == 0):
            policy.save_checkpoint(os.path.join(out, "checkpoint"), model, tok, opt, state, ref_model)
        if stop:
            raise KeyboardInterrupt(f"stopped at step {state['step']}; checkpoint saved: python train.py --resume {out}")
    log.close()

    policy.save_checkpoint(os.path.join(out, "checkpoint"), model, tok, opt, state, ref_model)
    after = test_all(cfg.pass_k)
    final = model.merge_and_unload() if cfg.lora_r else model
    final.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    summary = dict(method=cfg.method, model=cfg.model, task=cfg.task, steps=cfg.steps, **after,
                   **{f"{k}_before": v for k, v in state["before"].items()}, final_mu=state["mu"],
                   H_target=state["H_target"], skipped_steps=state["skipped"], test_prompts=len(splits["test"]),
                   wall_seconds=round(time.time() - t_start, 1), device=device)
    atomic_json(summary, os.path.join(out, "summary.json"))
    import compare  # here, not at the top: compare.py imports this file
    figure = compare.plot_run(out)
    print(f"after training {after} ({summary['wall_seconds']:.0f} s); results in {out}" + (f", plot {figure}" if figure else ""))
    return summary


def parse_args(argv=None) -> Config:
    """Flags from Config's fields. With --resume, the run's saved config is the base and only
    the flags given on this command line override it."""
    def parser(defaults: bool):
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    argument_default=None if defaults else argparse.SUPPRESS)
        for f in dataclasses.fields(Config):
            flag, default = "--" + f.name.replace("_", "-"), (f.default if defaults else argparse.SUPPRESS)
            text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
            if f.type in (bool, "bool"):
                p.add_argument(flag, action="store_true", default=default, help=text)
            else:
                kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                p.add_argument(flag, type=kind, default=default, help=f"{text} (default: {f.default})")
        return p
    cfg = Config(**vars(parser(True).parse_args(argv)))
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.isfile(os.path.join(cfg.resume, "checkpoint", "trainer_state.pt")) or not os.path.isfile(path):
            sys.exit(f"error: --resume {cfg.resume}: no checkpoint there (expected {cfg.resume}/checkpoint/)")
        with open(path) as f:
            saved = json.load(f)
        cfg = Config(**{**saved, **vars(parser(False).parse_args(argv))})
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UsageError, TrainingError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        sys.exit(130)
