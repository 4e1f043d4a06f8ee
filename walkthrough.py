"""
One AMFT step, taken slowly, on the tiny base: what each part of the algorithm computes.

    python walkthrough.py    # under a minute on a CPU; or its # %% cells in Jupyter or VS Code

It calls the same functions as train.py's loop (amft.py for the algorithm, train.py for the
passes over the model), prints what they return, and takes one optimizer step. A short SFT
warm-up comes first, as in the loop, so that some rollouts earn a reward and the meta-gradient
has something to say.
"""
# %% The tiny base, the General Points task, the tiny recipe
import dataclasses
import random

import torch

import amft
import data
import model as policy
import pretrain
import train

torch.manual_seed(0)
cfg = train.Config(model="tiny-base", meta_grad="first-order")
train.resolve(cfg, cuda=False)
cfg.max_new_tokens = train.RECIPES["tiny"]["gp_new_tokens"]
model, tok = policy.load_policy(pretrain.base_path())
splits = data.load_task("general-points", seed=0, cards=cfg.cards, target=cfg.target,
                        style=cfg.prompt, demo=cfg.demo)
eos, end = policy.eos_ids(tok, model), policy.end_id(tok, False)
params = {n: p for n, p in model.named_parameters() if p.requires_grad}
opt = torch.optim.AdamW(params.values(), lr=cfg.lr)
rng = random.Random(0)
n_params = sum(p.numel() for p in params.values())
print(f"{n_params:,} parameters; {len(splits['train'])} training hands, e.g.")
print(f"  prompt: {splits['train'][0]['prompt']!r}")
print(f"  demonstration: {splits['train'][0]['demo']!r}")


def batch(split, n):
    """n rows of a split, each hand in a fresh card order, and their demonstrations."""
    rows = [data.reshuffle(r, rng) for r in rng.sample(splits[split], n)]
    prompts, demos = [r["prompt"] for r in rows], [r["demo"] for r in rows]
    return rows, policy.sft_batch(tok, prompts, demos, end, "cpu")


# %% Warm-up: SFT alone (the loop's first --warmup steps)
for step in range(200):
    _, demos = batch("train", cfg.batch_size)
    loss = train.sft_backward(model, demos, cfg.micro_batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
print(f"after 200 SFT steps: SFT loss {loss:.3f} nats per token")

# %% 1. Sample G completions per prompt -> rewards -> group advantages -> g_RL
rows, demos = batch("train", cfg.batch_size)
roll, r = train.rollouts(model, tok, rows, cfg, eos)              # r: (B, G) rewards
for i in range(4):
    print(f"  {rows[0]['prompt']!r} -> {roll.texts[i]!r}: reward {r[0, i]:.0f}")
A, _, frac_zero = amft.advantages(r)  # (B*G,): (r - group mean) / group std
# two groups, those whose rewards differ first
shown = ([b for b in range(len(rows)) if r[b].std() > 0] + list(range(len(rows))))[:2]
for b in shown:
    advantages = [round(a, 2) for a in A.view_as(r)[b].tolist()]
    print(f"  group {b}: rewards {r[b].tolist()} -> advantages {advantages}")
print(f"{frac_zero:.0%} of the groups have equal rewards (advantage 0: no RL signal)")
rl = train.rl_backward(model, None, roll, A, cfg)
g_rl, H = train.take_grads(params), rl["entropy"]
norm = lambda g: torch.sqrt(sum(t.double().pow(2).sum() for t in g.values())).item()
print(f"g_RL: norm {norm(g_rl):.4f}; the rollouts' mean token entropy H = {H:.3f} nats")

# %% 2. g_SFT on the same prompts' demonstrations
sft = train.sft_backward(model, demos, cfg.micro_batch)
g_sft = train.take_grads(params)
print(f"g_SFT: norm {norm(g_sft):.4f} (SFT loss {sft:.3f})")

# %% 3. mu: the entropy term, and dU/dmu by the three estimators on fresh validation rollouts
controller = amft.MuController(amft.METHODS["amft"], mu0=cfg.mu0, mu_min=cfg.mu_min,
                               mu_max=cfg.mu_max, eta_meta=cfg.eta_meta, eta_H=cfg.eta_H,
                               meta_every=1)
val = rng.sample(splits["val"], 16)
val_roll, val_r = train.rollouts(model, tok, val, cfg, eos)
A_val = amft.group_advantages(val_r)[0].flatten()
print(f"validation: {len(val)} prompts x G = {cfg.group_size}, mean reward {val_r.mean():.3f}")
alpha = cfg.meta_alpha or cfg.lr
for estimator in amft.META_GRADS:
    dU = train.dU_dmu(model, val_roll, A_val, len(A_val), params=params, g_rl=g_rl, g_sft=g_sft,
                      mu=controller.mu, alpha=alpha,
                      cfg=dataclasses.replace(cfg, meta_grad=estimator))
    print(f"  dU/dmu by {estimator:11}: {dU:+.3e}")
moved = controller.update(H, dU)  # the first step measures the target entropy H* = H
entropy_term = cfg.eta_H * (moved["H_target"] - H)
meta_term = cfg.eta_meta * (moved["meta_grad_scaled"] or 0)
print(f"H* = {moved['H_target']:.3f}; entropy term {cfg.eta_H} (H* - H) = {entropy_term:+.4f}; "
      f"meta term {cfg.eta_meta} x dU/dmu / RMS = {meta_term:+.4f}")
print(f"mu: {cfg.mu0} -> {controller.mu:.4f}")

# %% 4. AdamW on (1 - mu) g_RL + mu g_SFT
w_rl, w_sft = amft.loss_weights(amft.METHODS["amft"], controller.mu)
grad_norm = train.set_grads(params, amft.mix_grads_(g_rl, g_sft, w_rl, w_sft), cfg.grad_clip)
opt.step()
opt.zero_grad(set_to_none=True)
print(f"update: {w_rl:.4f} g_RL + {w_sft:.4f} g_SFT, norm {grad_norm:.4f} "
      f"(clipped to {cfg.grad_clip}); one step taken")
