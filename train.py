"""
Train a causal LM with AMFT (or a baseline) and evaluate it. One linear loop, no Trainer.

    python train.py                          # tiny Qwen2 on General Points, CPU, minutes
    python train.py --method sft             # a baseline: sft | grpo | fixed-mix | amft
    python train.py --model Qwen2.5-0.5B --cards 4 --target 24 --lr 1e-6   # a real model
    python train.py --help                   # every flag, generated from Config below

Each step (after an SFT-only warm-up of --warmup steps):
    sample G completions per prompt -> reward -> group advantages -> g_RL = grad L_RL
    demonstrations -> g_SFT = grad L_SFT -> mu update (entropy term; meta-gradient every K)
    -> parameters step on (1 - mu) g_RL + mu g_SFT -> log
Outputs go to --out (default runs/<method>-<time>): metrics.jsonl (one line per step),
summary.json (ID/OOD accuracy before and after), model/ (save_pretrained).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import amft
import data
import model as policy
import rewards

METHODS = ("amft", "sft", "grpo", "fixed-mix")


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train
    model: str = arg("tiny", "'tiny' (a small Qwen2 built from a config), a hub id, an alias like Qwen2.5-0.5B, or a folder")
    method: str = arg("amft", f"one of {', '.join(METHODS)}")
    task: str = arg("general-points", "'general-points', or a .jsonl/.json file of hands: {\"cards\": [\"3\", \"J\", \"5\"]}")
    cards: int = arg(3, "General Points: cards per hand (the paper's variant: 4)")
    target: int = arg(10, "General Points: the value the formula must reach (the paper's: 24)")
    # budget
    steps: int = arg(800, "optimizer steps in all, warm-up included")
    warmup: int = arg(200, "SFT-only steps before mixing starts (W); H_target is measured at its end")
    batch_size: int = arg(16, "B: prompts per step (each has a demonstration)")
    group_size: int = arg(8, "G: completions sampled per prompt")
    max_new_tokens: int = arg(16, "longest completion, in tokens")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same one")
    # optimizer
    lr: float = arg(1e-3, "AdamW learning rate (the paper's 1e-6 is for a 7B model)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the mixed gradient to this norm")
    # GRPO
    eps_low: float = arg(0.2, "PPO clip, lower side")
    eps_high: float = arg(0.28, "PPO clip, upper side (DAPO's clip-higher)")
    beta: float = arg(0.0, "k3 KL penalty to a frozen reference (the policy at the end of warm-up); 0 = off")
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
    no_meta: bool = arg(False, "ablation: drop the meta-gradient term")
    no_entropy: bool = arg(False, "ablation: drop the entropy term")
    # run
    eval_every: int = arg(50, "steps between greedy accuracy checks on the validation split")
    max_bad_steps: int = arg(10, "stop after this many non-finite losses in a row")
    seed: int = arg(0, "random seed (model init, data order, sampling)")
    dtype: str = arg("float32", "float32 | bfloat16 | float64")
    device: str = arg("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    out: str = arg("", "output folder (default: runs/<method>-<time>); must be new or empty")


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
        (0 <= cfg.mu_min <= cfg.mu_max <= 1, "mu bounds must satisfy 0 <= --mu-min <= --mu-max <= 1"),
        (0 <= cfg.mu0 <= 1, "--mu0 must be in [0, 1]"),
        (cfg.group_size >= 2, "--group-size (G) must be at least 2: advantages compare samples of one prompt"),
        (cfg.steps >= 1 and cfg.batch_size >= 1 and cfg.max_new_tokens >= 1, "--steps, --batch-size and --max-new-tokens must be >= 1"),
        (cfg.warmup >= 0, "--warmup must be >= 0 (a warm-up as long as --steps is pure SFT)"),
        (cfg.meta_every >= 1 and cfg.eval_every >= 1 and cfg.val_prompts >= 1, "--meta-every, --eval-every, --val-prompts must be >= 1"),
        (cfg.temperature > 0 and cfg.lr > 0, "--temperature and --lr must be > 0"),
        (1 <= cfg.cards <= 5, "--cards must be between 1 and 5"),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    if cfg.out and os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and is not empty; choose a new folder")


def load_task(cfg: Config):
    if cfg.task == "general-points":
        return data.general_points(cfg.cards, cfg.target, seed=cfg.seed)
    if not os.path.isfile(cfg.task):
        raise UsageError(f"--task {cfg.task}: not 'general-points' and not a file")
    try:
        return data.hands_from_file(cfg.task, cfg.target, seed=cfg.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None


def score(texts, rows, G):
    """Rewards (B, G) of B*G completions, prompt-major."""
    r = [rewards.general_points_reward(t, rows[i // G]["values"], rows[i // G]["target"]) for i, t in enumerate(texts)]
    return torch.tensor(r).view(len(rows), G)


@torch.no_grad()
def evaluate(model, tok, rows, cfg, batch=64):
    """Greedy pass@1: the fraction of rows whose greedy completion earns reward 1."""
    model.eval()
    hits = 0.0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        texts = policy.sample(model, tok, [r["prompt"] for r in chunk], 1, 1.0, cfg.max_new_tokens, greedy=True)[4]
        hits += score(texts, chunk, 1).sum().item()
    model.train()
    return hits / max(len(rows), 1)


def rollout_logprobs(model, ids, attn, completions, cmask, temperature, with_entropy, params=None):
    """Log-probs (N, C) (and entropies) of sampled completions after their prompts."""
    full = torch.cat([ids, completions], 1)                      # (N, P+C)
    full_attn = torch.cat([attn, cmask.long()], 1)
    logp, ent = policy.token_logprobs(model, full, full_attn, temperature, with_entropy, params)
    P = ids.shape[1]
    return logp[:, P - 1:], (ent[:, P - 1:] if ent is not None else None)


def main(cfg: Config):
    check(cfg)
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = getattr(torch, cfg.dtype)
    splits = load_task(cfg)
    name = cfg.model
    if name == "tiny":
        name = policy.make_tiny_model(tempfile.mkdtemp(prefix="amft-tiny-"), seed=cfg.seed)
    try:
        model, tok = policy.load_policy(name, dtype=dtype, device=device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    # only now, with every input checked, do we create the output folder
    out = cfg.out or os.path.join("runs", f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alpha = cfg.meta_alpha or cfg.lr
    train_rows, val_rows = splits["train"], splits["val"] or splits["train"]
    before = {"id": evaluate(model, tok, splits["test"], cfg), "ood": evaluate(model, tok, splits["test_ood"], cfg)}
    print(f"{cfg.method}: {len(train_rows)} train / {len(splits['val'])} val / {len(splits['test'])} test prompts; "
          f"before training ID {before['id']:.3f} OOD {before['ood']:.3f}")

    mu = {"sft": 1.0, "grpo": 0.0}.get(cfg.method, cfg.mu0)
    H_target = None if math.isnan(cfg.H_target) else cfg.H_target
    meta_v, meta_n, ref_model, bad_in_row, n_skipped, samples_seen, order = 0.0, 0, None, 0, 0, 0, []
    log = open(os.path.join(out, "metrics.jsonl"), "w")
    pbar = tqdm(range(cfg.steps), desc=cfg.method, dynamic_ncols=True)
    for step in pbar:
        t0 = time.time()
        if len(order) < cfg.batch_size:  # epochs over the training hands, reshuffled
            order += random.sample(range(len(train_rows)), len(train_rows))
        rows = [data.reshuffle(train_rows[order.pop()], random) for _ in range(cfg.batch_size)]
        prompts = [r["prompt"] for r in rows]
        warm = cfg.method != "grpo" and step < cfg.warmup
        use_rl = cfg.method != "sft" and not warm
        use_sft = cfg.method != "grpo"
        m = {"step": step, "phase": "warmup" if warm else "mix", "mu": 1.0 if warm else mu, "entropy": None,
             "H_target": H_target, "reward_mean": None, "reward_std": None, "sft_loss": None, "rl_loss": None,
             "meta_grad": None, "frac_zero_std": None}
        # --------------------------------------------------------------- SFT gradient
        g_sft, g_rl, losses = {}, {}, []
        if use_sft:
            ids, attn, lmask = policy.sft_batch(tok, prompts, [r["demo"] for r in rows], device)
            loss_sft = amft.sft_loss(policy.token_logprobs(model, ids, attn)[0], lmask)
            opt.zero_grad(set_to_none=True)
            loss_sft.backward()
            g_sft = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            m["sft_loss"] = loss_sft.item()
            losses.append(loss_sft)
        # --------------------------------------------------------------- rollouts and RL gradient
        if use_rl:
            G = cfg.group_size
            model.eval()
            ids, attn, comp, cmask, texts = policy.sample(model, tok, prompts, G, cfg.temperature, cfg.max_new_tokens)
            model.train()
            r = score(texts, rows, G)                                           # (B, G)
            A, m["frac_zero_std"] = amft.group_advantages(r)
            logp, ent = rollout_logprobs(model, ids, attn, comp, cmask, cfg.temperature, True)
            ref_logp = None
            if cfg.beta > 0:
                if ref_model is None:  # frozen copy of the policy as RL begins
                    ref_model = _frozen(model)
                with torch.no_grad():
                    ref_logp = rollout_logprobs(ref_model, ids, attn, comp, cmask, cfg.temperature, False)[0]
            loss_rl, rl_metrics = amft.grpo_loss(logp, logp.detach(), A.flatten().to(logp), cmask, cfg.eps_low,
                                                 cfg.eps_high, cfg.beta, ref_logp)
            opt.zero_grad(set_to_none=True)
            loss_rl.backward()
            g_rl = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
            H = amft.masked_mean(ent.detach(), cmask).item()
            m.update(rl_metrics, rl_loss=loss_rl.item(), entropy=H, reward_mean=r.mean().item(),
                     reward_std=r.std().item(), completion_len=cmask.sum(1).mean().item())
            losses.append(loss_rl)
            if H_target is None:  # first mixing step: entropy of the warmed-up policy's own samples
                H_target = m["H_target"] = H
        # --------------------------------------------------------------- mu update (AMFT only)
        if use_rl and cfg.method == "amft":
            g_H = 0.0 if cfg.no_entropy else amft.entropy_signal(H_target, m["entropy"])
            g_meta = 0.0
            if not cfg.no_meta and (step - cfg.warmup) % cfg.meta_every == 0:
                raw = meta_gradient(model, tok, val_rows, params, g_rl, g_sft, mu, alpha, cfg)
                g_meta, meta_v, meta_n = amft.normalize_meta_grad(raw, meta_v, meta_n)
                m["meta_grad"], m["meta_grad_scaled"] = raw, g_meta
            mu = amft.update_mu(mu, g_meta, g_H, cfg.eta_meta, cfg.eta_H, cfg.mu_min, cfg.mu_max)
            m["mu"] = mu
        # --------------------------------------------------------------- parameter step
        weight = 1.0 if warm else mu
        if not all(torch.isfinite(l).item() for l in losses):
            bad_in_row, n_skipped = bad_in_row + 1, n_skipped + 1
            m["skipped"] = True
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingError(f"stopped at step {step}: {bad_in_row} non-finite losses in a row "
                                   f"(try a lower --lr or --dtype float32)")
        else:
            bad_in_row = 0
            mixed = amft.mix_grads(g_rl, g_sft, weight)
            for n, p in params.items():
                p.grad = mixed.get(n)
            m["grad_norm"] = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip).item()
            opt.step()
        # --------------------------------------------------------------- log
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            m["val_accuracy"] = evaluate(model, tok, splits["val"] or val_rows, cfg)
        n_samples = (cfg.batch_size if use_sft else 0) + (cfg.batch_size * cfg.group_size if use_rl else 0)
        samples_seen += n_samples
        m["samples_per_s"], m["samples_seen"] = n_samples / (time.time() - t0), samples_seen
        log.write(json.dumps(m) + "\n")
        log.flush()
        pbar.set_postfix({k: f"{v:.3f}" for k, v in [("mu", m["mu"]), ("reward", m["reward_mean"]),
                                                      ("H", m["entropy"]), ("sft", m["sft_loss"])] if v is not None})
    log.close()

    after = {"id": evaluate(model, tok, splits["test"], cfg), "ood": evaluate(model, tok, splits["test_ood"], cfg)}
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    summary = {"method": cfg.method, "model": cfg.model, "steps": cfg.steps, "id_accuracy": after["id"],
               "ood_accuracy": after["ood"], "id_accuracy_before": before["id"], "ood_accuracy_before": before["ood"],
               "final_mu": mu, "H_target": H_target, "skipped_steps": n_skipped, "test_prompts": len(splits["test"]),
               "wall_seconds": round(time.time() - t_start, 1), "device": device}
    with open(os.path.join(out, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    print(f"after training ID {after['id']:.3f} OOD {after['ood']:.3f} "
          f"({summary['wall_seconds']:.0f} s); results in {out}")
    return summary


def _frozen(model):
    import copy
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def meta_gradient(model, tok, val_rows, params, g_rl, g_sft, mu, alpha, cfg):
    """dU/dmu on fresh validation rollouts from pi_theta, by the estimator cfg.meta_grad."""
    G = cfg.group_size
    rows = random.sample(val_rows, min(cfg.val_prompts, len(val_rows)))
    model.eval()
    ids, attn, comp, cmask, texts = policy.sample(model, tok, [r["prompt"] for r in rows], G, cfg.temperature, cfg.max_new_tokens)
    A = amft.group_advantages(score(texts, rows, G))[0].flatten()          # (B_val * G,)

    def U(theta=None):  # the policy-gradient surrogate of validation reward, at weights theta
        logp = rollout_logprobs(model, ids, attn, comp, cmask, cfg.temperature, False, theta)[0]
        return amft.policy_gradient_surrogate(logp, A.to(logp), cmask)

    try:
        if cfg.meta_grad == "first-order":
            grads = torch.autograd.grad(U(), list(params.values()), allow_unused=True)
            grad_U = {n: g for n, g in zip(params, grads) if g is not None}
            return amft.meta_grad_first_order(grad_U, g_rl, g_sft, alpha)
        if cfg.meta_grad == "autograd":
            return amft.meta_grad_autograd(U, params, g_rl, g_sft, mu, alpha)
        return amft.meta_grad_fd(U, params, g_rl, g_sft, mu, alpha)
    finally:
        model.train()


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    cfg = parse_args()
    try:
        main(cfg)
    except (UsageError, TrainingError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
