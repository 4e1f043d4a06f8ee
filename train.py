"""
Train a causal LM with AMFT (or a baseline) and evaluate it: one loop (`Trainer.train`), no
framework.

    python train.py                          # tiny Qwen2 on General Points, CPU, minutes
    python train.py --method sft             # a baseline (see --help for all nine methods)
    python train.py --model Qwen2.5-0.5B     # a pretrained model on GSM8K (docs/real-models.md)
    python train.py --model Qwen2.5-0.5B-Instruct   # the same, through the chat template
    python train.py --model Qwen2.5-0.5B --print-config     # the resolved settings, offline
    python train.py --model Qwen2.5-0.5B --eval-tasks gsm8k,math500,aime24 --pass-k 16
    python train.py --resume runs/amft-...   # continue a stopped run exactly
    python train.py --eval-only --model runs/amft-.../model --pass-k 8
    python train.py --help                   # every flag, generated from settings.Config
    # 4 processes share each step (parallel.py)
    torchrun --nproc_per_node 4 train.py --model Qwen2.5-1.5B

Each step, in the loop's order (after an SFT-only warm-up of --warmup steps):
    sample G completions per prompt -> reward -> group advantages -> g_RL = grad L_RL
    demonstrations -> g_SFT = grad L_SFT
    mu update (entropy term every step; meta-gradient dU/dmu every K steps)
    -> parameters step on (1 - mu) g_RL + mu g_SFT -> log, evaluate, checkpoint
A method (amft.METHODS) is a record of switches: which of these parts run, and how the two
gradients are weighed. The algorithm itself is in amft.py.

Outputs go to --out (default runs/<method>-<time>): config.json, metrics.jsonl (one line per
step), summary.json (accuracy before and after), model/ (save_pretrained), checkpoint/
(resumable), curves.png (with matplotlib).
"""
import contextlib
import dataclasses
import gc
import math
import os
import random
import sys
import time
import zlib

import torch
from tqdm import tqdm

import amft
import checkpoint
import data
import math_tasks
import model as policy
import parallel
import plots
import pretrain
import sampling
from scoring import accuracy_table, evaluate, held_out_accuracy, score  # noqa: F401 (train.*)
# (train.Config etc.)
from settings import (RECIPES, Config, UsageError, eval_task_list,  # noqa: F401
                      parse_args, print_config, resolve, settle)


# None where not computed
METRICS = ("entropy", "reward_mean", "reward_std", "sft_loss", "rl_loss", "frac_zero_std",
           "seconds_rollout", "seconds_rl", "seconds_sft", "seconds_meta",
           "seconds_meta_rollout")


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. losses keep diverging): reported in one line."""


# ---------------------------------------------------------------------------- building blocks
def slices(n: int, size: int):
    """Micro-batches of rows: [slice(0, size), slice(size, 2 size), ...]; size 0 = one slice."""
    size = size or n
    return [slice(i, i + size) for i in range(0, n, size)]


def rollouts(model, tok, rows, cfg, eos):
    """G samples per row from the policy, and their rewards (B, G)."""
    model.eval()
    roll = sampling.sample(model, tok, [r["prompt"] for r in rows], G=cfg.group_size,
                           temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, eos=eos,
                           sampler=cfg.sampler)
    model.train()
    return roll, score(roll.texts, rows, cfg.group_size, cfg.verifier)


def take_grads(params: dict) -> dict:
    """The gradients now in p.grad, handed over (not copied); p.grad is left empty. Called after
    each backward, so it is also where a CPU run hands the freed activations back to the OS."""
    grads = {}
    for n, p in params.items():
        if p.grad is not None:
            grads[n], p.grad = p.grad, None
    if next(iter(params.values())).device.type == "cpu":
        checkpoint.release_freed_memory()
    return grads


def sft_backward(model, demos, micro):
    """Accumulate grad L_SFT over micro-batches; returns the loss."""
    denom, D = parallel.total(demos.mask.sum()), demos.mask.shape[1]  # every process's tokens

    def loss_of(sl):
        logp = policy.token_logprobs(model, demos.ids[sl], demos.attn[sl], n_last=D)
        return amft.sft_loss(logp, demos.mask[sl], denom), {}
    return parallel.total(amft.accumulate(loss_of, slices(len(demos.ids), micro))["loss"])


def rl_backward(model, ref_model, roll, A, cfg, shaped=False, demos=None, A_demo=None):
    """Accumulate grad L_RL over micro-batches. Returns {loss, entropy (the rollouts' mean token
    entropy, free from the same logits), clip_frac, kl}. With demos (srft, luffy) the
    demonstrations (A_demo not None) are off-policy members of their groups, inside the same
    token-level mean. A and A_demo may come from the rewards on the CPU: they move to the
    model's device."""
    ids, attn, mask, C = roll.ids, roll.attn, roll.mask, roll.mask.shape[1]
    A, A_demo = A.to(ids.device), None if A_demo is None else A_demo.to(ids.device)
    # the token counts of every process: each loss is its share
    n_tokens = parallel.total(mask.sum())
    demos = demos if A_demo is not None else None
    denom = n_tokens + (parallel.total(demos.mask.sum()) if demos is not None else 0)

    def rollout_loss(sl):
        logp, entropy = policy.token_logprobs(model, ids[sl], attn[sl], cfg.temperature, n_last=C,
                                              with_entropy=True)
        ref_logp = None
        if ref_model is not None:
            with torch.no_grad():
                ref_logp = policy.token_logprobs(ref_model, ids[sl], attn[sl], cfg.temperature,
                                                 n_last=C)
        loss, metrics = amft.grpo_loss(logp, logp.detach(), A[sl], mask[sl], eps_low=cfg.eps_low,
                                       eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=ref_logp,
                                       denom=denom, n_tokens=n_tokens)
        return loss, dict(metrics, entropy=(entropy * mask[sl]).sum() / n_tokens)

    def demo_loss(sl):
        logp = policy.token_logprobs(model, demos.ids[sl], demos.attn[sl], cfg.temperature,
                                     n_last=demos.mask.shape[1])
        return amft.off_policy_loss(logp, A_demo[sl], demos.mask[sl], shaping=shaped,
                                    denom=denom), {}

    out = amft.accumulate(rollout_loss, slices(len(ids), cfg.micro_batch))
    if demos is not None:
        out["loss"] += amft.accumulate(demo_loss, slices(len(demos.ids), cfg.micro_batch))["loss"]
    return parallel.sum_scalars(out)  # the shares add up


def meta_gradient(model, roll, r, *, params, g_rl, g_sft, mu, alpha, cfg):
    """dU/dmu (dU_dmu) on fresh validation rollouts from pi_theta and their rewards r (B_val, G).
    Returns dU/dmu (None when it is silent: every validation group's rewards are equal) and the
    validation reward."""
    A = amft.group_advantages(r)[0].flatten()  # (B_val * G,)
    N = parallel.total(len(roll.texts))
    reward = parallel.total(r.sum().item()) / N
    # every group's rewards equal: dU/dmu = 0 exactly, no signal
    if parallel.total(float(A.abs().sum() > 0)) == 0:
        return None, reward
    return dU_dmu(model, roll, A, N, params=params, g_rl=g_rl, g_sft=g_sft, mu=mu, alpha=alpha,
                  cfg=cfg), reward


def dU_dmu(model, roll, A, N, *, params, g_rl, g_sft, mu, alpha, cfg):
    """dU/dmu from validation rollouts and their advantages A (B_val * G,), N rollouts over all
    processes, by the estimator --meta-grad, in micro-batches of --micro-batch sequences."""
    ids, attn, mask = roll.ids, roll.attn, roll.mask

    def U(sl):  # this micro-batch's share of the policy-gradient surrogate of validation reward
        logp = policy.token_logprobs(model, ids[sl], attn[sl], cfg.temperature,
                                     n_last=mask.shape[1])
        return amft.policy_gradient_surrogate(logp, A[sl].to(logp), mask[sl], n=N)
    estimator = amft.META_GRADS[cfg.meta_grad]
    dU = estimator(U, params=params, g_rl=g_rl, g_sft=g_sft, mu=mu, alpha=alpha,
                   chunks=slices(len(ids), cfg.micro_batch))
    # U's shares add up, and so do their derivatives
    return parallel.reduced_by_fsdp(parallel.total(dU))


def next_rows(train_rows, state, rng, B, tok, chat, cue=False):
    """B training rows: epochs over the rows in a random order, each hand with its cards in a
    fresh random order (data.reshuffle), prompts formatted for the model."""
    while len(state["order"]) < B:  # a small task's epoch can be shorter than a batch
        state["order"] += rng.sample(range(len(train_rows)), len(train_rows))
    rows = [data.reshuffle(train_rows[state["order"].pop()], rng) for _ in range(B)]
    return [dict(r, prompt=policy.format_prompt(tok, r["prompt"], chat, cue)) for r in rows]


def demo_rewards(rows, method, verifier):
    """srft and luffy put each demonstration in its GRPO group: its reward (B,), else None."""
    return (torch.tensor([data.reward(row, row["demo"], verifier) for row in rows])
            if method.demo_in_group else None)


def reference(model, ref_model, beta):
    """The frozen reference of the KL term: a copy of the policy as RL begins (None if beta = 0)."""
    return policy.frozen_copy(model) if beta > 0 and ref_model is None else ref_model


def set_grads(params: dict, grads: dict, clip: float) -> float:
    """p.grad = grads[name], clipped to norm `clip`; returns the norm before clipping (non-finite:
    the caller skips the step)."""
    for n, g in grads.items():
        params[n].grad = g
    return torch.nn.utils.clip_grad_norm_(params.values(), clip).item()


def count_bad_steps(state, skipped: bool, limit: int):
    """Skipped (non-finite) steps in a row; `limit` of them ends the run with a one-line error."""
    state["bad_in_row"] = state["bad_in_row"] + 1 if skipped else 0
    state["skipped"] += skipped
    if state["bad_in_row"] >= limit:
        raise TrainingError(f"stopped at step {state['step']}: {limit} non-finite steps in a row "
                            f"(try a lower --lr or --dtype float32)")


# function -> what the loop was doing, for out_of_memory
PHASES = {"rollouts": "sampling rollouts", "rl_backward": "the RL backward",
          "sft_backward": "the SFT backward", "meta_gradient": "the meta-gradient",
          "evaluate": "evaluation", "step": "the optimizer step",
          "load_policy": "loading the model"}


def out_of_memory(e: BaseException) -> str:
    """A CUDA out-of-memory error in one line: where it happened (the innermost loop function in
    its traceback), the peak and the device's memory, and the flags that need less."""
    tb, where = e.__traceback__, "training"
    while tb is not None:
        where = PHASES.get(tb.tb_frame.f_code.co_name, where)
        tb = tb.tb_next
    peak = total = float("nan")
    if torch.cuda.is_available():
        peak, total = (torch.cuda.max_memory_allocated() / 2**30,
                       torch.cuda.get_device_properties(0).total_memory / 2**30)
    return (f"out of GPU memory during {where} (peak {peak:.1f} of {total:.1f} GiB allocated); "
            "the last checkpoint is intact. Try a smaller --micro-batch or --max-new-tokens, "
            "--lora-r 16, or --grad-ckpt (python bench.py --memory shows what each model size "
            "needs)")


# ---------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Run:
    """What a run is set up with: its settings, model, data and streams, where it writes."""
    cfg: Config
    method: amft.Method
    model: torch.nn.Module
    tok: object
    splits: dict
    benchmarks: dict     # --eval-tasks: {name: rows}, each scored whole
    chat: bool
    cue: bool            # a prompt in words to a base model ends in an answer cue
    eos: list            # token ids that end a completion
    end: int             # the token a demonstration ends with
    device: str
    out: str
    scored: dict         # which test split the summary scores
    # (data_rng, val_rng, val_stream): training order, validation prompts, their rollouts
    streams: tuple
    t_start: float


def load_benchmarks(specs) -> dict:
    """{name: rows} of the --eval-tasks entries; two of one name are refused."""
    benchmarks = {}
    for spec in specs:
        name, rows = math_tasks.load_benchmark(spec)
        if name in benchmarks:
            raise ValueError(f"--eval-tasks: two entries are named {name}; name one NAME=FILE")
        benchmarks[name] = rows
    return benchmarks


def setup(cfg: Config) -> Run:
    """Check the settings, load the model and the task, create the output folder: a Run."""
    t_start = time.time()
    device, recipe = settle(cfg)
    device = parallel.device_of_rank(device)  # under torchrun: 'cuda' -> this process's GPU
    # an earlier run in this process (bench.py, compare.py) leaves its model in reference cycles
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # this run's peak, also when a process makes several
    method = amft.METHODS[cfg.method]
    torch.manual_seed(cfg.seed)                     # training rollouts: torch's generator
    data_rng = random.Random(f"data-{cfg.seed}")    # training order and card orders
    val_rng = random.Random(f"val-{cfg.seed}")      # validation prompts of the meta-gradient
    # ... and their rollouts (torch_stream)
    val_stream = {"seed": parallel.own_seed(cfg.seed + 1_000_003)}
    try:
        name = os.path.join(cfg.resume, "checkpoint") if cfg.resume else cfg.model
        ours = cfg.model == "tiny-base" or cfg.resume  # a model we wrote: no "Loading weights" bar
        if name == "tiny-base":  # built on first use, then loaded from the cache like any folder
            name = pretrain.base_path()
        with policy.no_progress_bars() if ours else contextlib.nullcontext():
            model, tok = policy.load_policy(name, dtype=getattr(torch, cfg.dtype), device=device,
                                            lora_r=cfg.lora_r, grad_ckpt=cfg.grad_ckpt,
                                            seed=cfg.seed, amp=cfg.amp)
        benchmarks = load_benchmarks(eval_task_list(cfg))
        # --eval-only --eval-tasks: nothing else
        splits = ({"train": [], "val": [], "test": []} if cfg.eval_only and benchmarks else
                  data.load_task(cfg.task, cfg.seed, cfg.cards, cfg.target, style=cfg.prompt,
                                 demo=cfg.demo, need_demos=not cfg.eval_only,
                                 exclude=(math_tasks.problems(*benchmarks.values())
                                          if not cfg.eval_only else frozenset())))
    except ValueError as e:
        raise UsageError(str(e)) from None
    parallel.join(device)  # under torchrun: the process group, from here on
    if parallel.world() > 1:
        # rank 0's weights everywhere (they are equal already), as DDP starts
        parallel.broadcast_(model.parameters())
        # each process samples completions of its own
        torch.manual_seed(parallel.own_seed(cfg.seed))
        if cfg.fsdp:
            parallel.shard(model)
    # held out means held out: no training or validation row holds a problem the run is scored on
    overlap = len(splits.pop("overlap", []))
    if overlap and not cfg.eval_only:
        print(f"--task {cfg.task}: dropped {overlap} rows whose problem is in an evaluation set of "
              "this run (train_rows_dropped_overlap in summary.json)")
    if not cfg.eval_only:  # SFT batches hold whole demonstrations: the long ones go at the door
        count = lambda texts: [len(ids) + 1  # + the end token
                               for ids in tok(texts, add_special_tokens=False).input_ids]
        splits["train"], dropped = data.drop_long_demos(splits["train"], count, cfg.max_demo_tokens)
        if dropped:
            print(f"--max-demo-tokens {cfg.max_demo_tokens}: dropped {len(dropped)} training rows "
                  f"whose demonstration is longer (rows {', '.join(map(str, dropped[:10]))}"
                  f"{' ...' if len(dropped) > 10 else ''} of the training split)")
    sizes = (f"{len(splits['train'])} train / {len(splits['val'])} val / "
             f"{len(splits['test'])} test rows")
    # FSDP: the same forwards on every process
    if cfg.fsdp and min(cfg.val_prompts, len(splits["val"]) or 1) % parallel.world():
        raise UsageError(f"--val-prompts must be a multiple of the {parallel.world()} processes "
                         "under --fsdp")
    if (not splits["test"] and not benchmarks) or (not cfg.eval_only
                                                   and len(splits["train"]) < cfg.batch_size):
        raise UsageError(f"--task {cfg.task}: {sizes}, too few for --batch-size {cfg.batch_size} "
                         "and a test split; use more rows or a smaller --batch-size")
    shown = [*RECIPES[recipe], *(["warmup_lr"] if "warmup_lr" not in RECIPES[recipe] else []),
             "max_new_tokens",
             *(["verifier"] if "test_ood" not in splits else [])]  # math: which verifier
    print(f"recipe: {recipe} (" + ", ".join(f"{k}={getattr(cfg, k)}" for k in shown
                                            if k != "gp_new_tokens") + ")")
    chat = policy.use_chat(tok, cfg.model, cfg.chat)
    # config.json keeps the decision: a run's model/ folder has not the model's name
    cfg.chat = "on" if chat else "off"
    eos, end = policy.eos_ids(tok, model, chat), policy.end_id(tok, chat)
    # a small hand file may leave none
    splits["val"] = splits["val"] or [dict(r) for r in splits["train"]]
    # a prompt in words, to a base model: answer it (the compact prompt ends in its own cue, '=')
    cue = not chat and not (cfg.prompt == "compact" and "test_ood" in splits)
    # training rows are formatted as they are drawn (reshuffled)
    for rows in [*(v for k, v in splits.items() if k != "train"), *benchmarks.values()]:
        for r in rows:
            r["prompt"] = policy.format_prompt(tok, r["prompt"], chat, cue)
    # which test split the summary scores
    scored = dict(seed=cfg.seed, verifier=cfg.verifier, test_prompts=len(splits["test"]),
                  test_prompts_crc32=zlib.crc32("\n".join(r["prompt"]
                                                          for r in splits["test"]).encode()),
                  **({} if cfg.eval_only else {"train_rows_dropped_overlap": overlap}))
    # only now, with every input checked (by every process), do we create the output folder
    out = cfg.resume or cfg.out or os.path.join(
        "runs", f"{'eval' if cfg.eval_only else cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = parallel.gather_objects(out)[0]  # rank 0's name; only rank 0 writes
    if parallel.is_main():
        os.makedirs(out, exist_ok=True)

    return Run(cfg, method, model, tok, splits, benchmarks, chat, cue, eos, end, device, out,
               scored, (data_rng, val_rng, val_stream), t_start)


def main(cfg: Config):
    """Set a run up, then train and score it (or only score it, --eval-only). Returns the
    summary (--print-config: the resolved settings, and nothing is run)."""
    if cfg.print_config:
        return print_config(cfg)
    run = setup(cfg)
    return evaluate_only(run) if cfg.eval_only else train_and_score(run)


def evaluate_only(run: Run) -> dict:
    cfg = run.cfg
    summary = dict(method="eval-only", model=cfg.model, task=cfg.task, steps=0,
                   **held_out_accuracy(run.model, run.tok, run.splits, cfg, run.eos, cfg.pass_k,
                                       run.benchmarks),
                   **run.scored, wall_seconds=round(time.time() - run.t_start, 1),
                   device=run.device)
    if parallel.is_main():
        checkpoint.atomic_json(summary, os.path.join(run.out, "summary.json"))
    print(checkpoint.to_json(summary))
    return summary


class Trainer:
    """A run being trained: the optimizer, the mu controller, the KL reference, and the state a
    checkpoint holds (state: the step, the data order, counters, the accuracy before)."""

    def __init__(self, run: Run):
        cfg, self.run = run.cfg, run
        self.params = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
        self.opt = torch.optim.AdamW(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=True)  # fused: no temporaries
        self.controller = amft.MuController(run.method, mu0=cfg.mu0, mu_min=cfg.mu_min,
                                            mu_max=cfg.mu_max, eta_meta=cfg.eta_meta,
                                            eta_H=cfg.eta_H, meta_every=cfg.meta_every,
                                            H_target=cfg.H_target, H_target_ema=cfg.H_target_ema)
        self.ref_model = None
        self.state = {"step": 0, "bad_in_row": 0, "skipped": 0, "samples_seen": 0, "order": [],
                      "before": None, "wall_seconds": 0.0}
        if cfg.resume:
            self.resume()
        self.earlier = self.state.get("wall_seconds", 0.0)  # the run's time before a resume

    def resume(self):
        run, out = self.run, self.run.out
        try:
            self.state, self.ref_model = checkpoint.load_checkpoint(
                os.path.join(out, "checkpoint"), run.model, self.opt)
        except ValueError as e:  # a damaged or unsafe file, in one line
            raise UsageError(str(e)) from None
        try:
            self.controller.load_state_dict(self.state["controller"])
            checkpoint.restore_streams(self.state, *run.streams, parallel.rank(), parallel.world(),
                                       run.cfg.seed)
        except Exception as e:  # it loaded, but is not a checkpoint of this trainer
            raise UsageError(f"{out}/checkpoint/trainer_state.pt is damaged "
                             f"({checkpoint.first_line(e)})") from None
        if os.path.isfile(os.path.join(out, "metrics.jsonl")) and parallel.is_main():
            checkpoint.keep_metrics_before(os.path.join(out, "metrics.jsonl"), self.state["step"])

    def save(self):
        run, state = self.run, self.state
        streams = checkpoint.streams(*run.streams)
        state.update(controller=self.controller.state_dict(), rng=streams,
                     wall_seconds=self.earlier + time.time() - run.t_start,
                     rng_ranks=parallel.gather_objects(streams) if parallel.world() > 1 else None)
        full = parallel.full_state(run.model, self.opt)  # under FSDP: gathered from every process
        if parallel.is_main():
            checkpoint.save_checkpoint(os.path.join(run.out, "checkpoint"), run.model, run.tok,
                                       self.opt, state, self.ref_model, full)

    # ------------------------------------------------------------------------ the parts of a step
    def next_batch(self, now):
        """The global batch of rows (the same on every process), and this process's share of its
        demonstrations when the step needs them."""
        run = self.run
        rows = next_rows(run.splits["train"], self.state, run.streams[0], run.cfg.batch_size,
                         run.tok, run.chat, run.cue)
        mine = parallel.share(rows)
        demos = policy.sft_batch(run.tok, [r["prompt"] for r in mine], [r["demo"] for r in mine],
                                 run.end, run.device) if now.demos else None
        return rows, demos

    def rl_gradient(self, rows, demos, m, lap):
        """Sample G completions per prompt -> rewards -> group advantages -> g_RL. Returns (g_RL,
        the rollouts' mean token entropy H)."""
        run, cfg = self.run, self.run.cfg
        roll, r = rollouts(run.model, run.tok, parallel.share(rows), cfg, run.eos)
        r = parallel.gather(r)                               # r: (B, G), every process's
        m["seconds_rollout"] = lap()
        A, A_demo, m["frac_zero_std"] = amft.advantages(r, demo_rewards(rows, run.method,
                                                                        cfg.verifier))
        A = parallel.share(A.view(len(rows), -1)).flatten()  # (B*G,) -> this process's
        A_demo = A_demo if A_demo is None else parallel.share(A_demo)  # (B,)
        self.ref_model = reference(run.model, self.ref_model, cfg.beta)
        rl = rl_backward(run.model, self.ref_model, roll, A=A, cfg=cfg, shaped=run.method.shaped,
                         demos=demos, A_demo=A_demo)
        g_rl, H = parallel.sum_grads_(take_grads(self.params)), rl.pop("entropy")
        m.update(rl_loss=rl.pop("loss"), entropy=H,
                 reward_mean=r.mean().item(), reward_std=r.std().item(),
                 completion_len=parallel.total(roll.mask.sum().item()) / r.numel(), **rl)
        m["seconds_rl"] = lap()
        return g_rl, H

    def sft_gradient(self, demos, m, lap):
        m["sft_loss"] = sft_backward(self.run.model, demos, self.run.cfg.micro_batch)
        g_sft = parallel.sum_grads_(take_grads(self.params))
        m["seconds_sft"] = lap()
        return g_sft

    def move_mu(self, step, H, g_rl, g_sft, finite, m, lap):
        """The entropy term every step, dU/dmu on fresh validation rollouts every K steps."""
        run, cfg, controller = self.run, self.run.cfg, self.controller
        dU, due = None, finite and controller.meta_due(step - cfg.warmup, H)
        if due:
            _, val_rng, val_stream = run.streams
            val = val_rng.sample(run.splits["val"], min(cfg.val_prompts, len(run.splits["val"])))
            with checkpoint.torch_stream(val_stream):
                # this process's validation prompts
                roll, r = rollouts(run.model, run.tok, parallel.strided(val), cfg, run.eos)
                m["seconds_meta_rollout"] = lap()
                dU, m["val_reward"] = meta_gradient(
                    run.model, roll, r, params=self.params, g_rl=g_rl, g_sft=g_sft,
                    mu=controller.mu, alpha=cfg.meta_alpha or cfg.lr, cfg=cfg)
            # the whole meta phase: validation rollouts and U's backward
            m["seconds_meta"] = round(m["seconds_meta_rollout"] + lap(), 4)
        m.update(controller.update(H, dU, finite, silent=due and dU is None))

    def optimizer_step(self, now, H, g_rl, g_sft, finite, m):
        """AdamW on w_RL g_RL + w_SFT g_SFT, mixed in place into p.grad. The gradient dicts are
        handed over and emptied, so the second buffer is freed before the step."""
        m["w_rl"], m["w_sft"] = amft.loss_weights(self.run.method, self.controller.mu, H or 0.0,
                                                  now.warm)
        m["grad_norm"] = set_grads(self.params, amft.mix_grads_(g_rl, g_sft, m["w_rl"], m["w_sft"]),
                                   self.run.cfg.grad_clip)
        g_rl.clear()
        g_sft.clear()
        m["skipped"] = not (finite and math.isfinite(m["grad_norm"]))
        m["lr"] = self.run.cfg.warmup_lr if now.warm else self.run.cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = m["lr"]
        if not m["skipped"]:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def end_of_step(self, step, now, m, lap, log, pbar, stop):
        """The processes still agree, count a skipped step, log, evaluate, checkpoint, Ctrl-C."""
        run, cfg, state = self.run, self.run.cfg, self.state
        # FSDP: own slices
        weights = [] if parallel.sharded() else [parallel.fingerprint(self.params.values())]
        check = [self.controller.mu, self.controller.H_target or 0.0, *weights]
        if parallel.world() > 1 and not parallel.in_sync(check):
            raise TrainingError(f"the processes' weights or mu differ after step {step}; "
                                "please report this")
        count_bad_steps(state, m["skipped"], cfg.max_bad_steps)
        # demonstrations + rollouts
        n_samples = cfg.batch_size * (now.demos + cfg.group_size * now.rl)
        state.update(step=step + 1, samples_seen=state["samples_seen"] + n_samples)
        seconds = lap.total()
        m.update(seconds_step=round(seconds, 4), samples_per_s=n_samples / seconds,
                 samples_seen=state["samples_seen"])
        if state["step"] % cfg.eval_every == 0 or (state["step"] == cfg.steps
                                                   and not cfg.skip_test):
            m["val_accuracy"] = evaluate(run.model, run.tok, run.splits["val"], cfg, run.eos,
                                         desc="validation")["accuracy"]
        if log:
            log.write(checkpoint.to_json(m) + "\n")
            log.flush()
        pbar.set_postfix({k: f"{m[k]:.3f}" for k in ("mu", "reward_mean", "entropy", "sft_loss")
                          if m[k] is not None})
        # one process's Ctrl-C stops them all at the same step
        stopping = parallel.any_rank(bool(stop))
        if stopping or (cfg.save_every and state["step"] % cfg.save_every == 0):
            self.save()
        if stopping:
            raise KeyboardInterrupt(f"stopped at step {state['step']}; checkpoint saved: "
                                    f"python train.py --resume {run.out}")

    # ------------------------------------------------------------------------ the loop
    def train(self):
        run, cfg, method, state = self.run, self.run.cfg, self.run.method, self.state
        pbar = tqdm(range(state["step"], cfg.steps), initial=state["step"], total=cfg.steps,
                    desc=cfg.method, dynamic_ncols=True, disable=not parallel.is_main())
        log = open(os.path.join(run.out, "metrics.jsonl"), "a") if parallel.is_main() else None
        with log or contextlib.nullcontext(), checkpoint.stop_on_ctrl_c() as stop:
            for step in pbar:
                lap = checkpoint.Laps(run.device)
                now = amft.phase(method, step, cfg.warmup)
                rows, demos = self.next_batch(now)
                m = dict(step=step, phase=now.name, **self.controller.metrics(),
                         **dict.fromkeys(METRICS),
                         prompts_crc32=zlib.crc32("\n".join(r["prompt"] for r in rows).encode()))
                # 1. sample G per prompt -> rewards -> group advantages -> g_RL
                g_rl, H = self.rl_gradient(rows, demos, m, lap) if now.rl else ({}, None)
                # 2. g_SFT on the demonstrations
                g_sft = self.sft_gradient(demos, m, lap) if now.sft else {}
                finite = all(math.isfinite(m[k]) for k in ("sft_loss", "rl_loss")
                             if m[k] is not None)
                # 3. mu: the entropy term every step, dU/dmu every K steps
                if now.rl and method.mixes:
                    self.move_mu(step, H, g_rl, g_sft, finite, m, lap)
                # 4. AdamW on w_RL g_RL + w_SFT g_SFT
                self.optimizer_step(now, H, g_rl, g_sft, finite, m)
                self.end_of_step(step, now, m, lap, log, pbar, stop)


def train_and_score(run: Run) -> dict:
    """Score the model before, train it, save it, score it after: the summary."""
    cfg, model, tok, splits = run.cfg, run.model, run.tok, run.splits
    trainer = Trainer(run)
    if parallel.is_main():
        # (after a resume works)
        checkpoint.atomic_json(dataclasses.asdict(cfg), os.path.join(run.out, "config.json"))
    state = trainer.state
    if state["before"] is None:
        # benchmarks: avg@k before and after alike
        state["before"] = held_out_accuracy(model, tok, splits, cfg, run.eos,
                                            cfg.pass_k if run.benchmarks else 0, run.benchmarks)
    print(f"{cfg.method}: {len(splits['train'])} train / {len(splits['val'])} val / "
          f"{len(splits['test'])} test prompts")
    trainer.train()
    # training's peak (the largest process's)
    peak = max(parallel.gather_objects(checkpoint.peak_memory(run.device)))
    trainer.save()
    after = held_out_accuracy(model, tok, splits, cfg, run.eos, cfg.pass_k, run.benchmarks)
    weights, _ = parallel.full_state(model)
    if not parallel.is_main():
        return None
    final = model.merge_and_unload() if cfg.lora_r else model
    with policy.no_progress_bars():
        final.save_pretrained(os.path.join(run.out, "model"), state_dict=weights)
    tok.save_pretrained(os.path.join(run.out, "model"))
    controller, t_start = trainer.controller, run.t_start
    summary = dict(method=cfg.method, model=cfg.model, task=cfg.task, steps=cfg.steps, **after,
                   **{f"{k}_before": v for k, v in state["before"].items()},
                   final_mu=controller.mu if run.method.mixes else None,
                   H_target=controller.H_target, mu_rejected=controller.rejected,
                   meta_silent=controller.silent, skipped_steps=state["skipped"],
                   **run.scored, wall_seconds=round(trainer.earlier + time.time() - t_start, 1),
                   wall_seconds_this_call=round(time.time() - t_start, 1), device=run.device,
                   peak_memory_gib=round(peak / 2**30, 3),
                   bytes_per_param=round(peak / sum(p.numel() for p in model.parameters()), 1))
    checkpoint.atomic_json(summary, os.path.join(run.out, "summary.json"))
    figure = plots.plot_run(run.out)
    print(accuracy_table(state["before"], after))
    print(f"after training ({summary['wall_seconds']:.0f} s): results in {run.out}"
          + (f", plot {figure}" if figure else " (pip install matplotlib for curves.png)"))
    return summary


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun one process speaks for all: rank 0
        sys.stdout = open(os.devnull, "w")
    try:
        main(parse_args(description=__doc__))
    except (UsageError, TrainingError, torch.cuda.OutOfMemoryError) as e:
        e = out_of_memory(e) if isinstance(e, torch.cuda.OutOfMemoryError) else e
        sys.exit(f"error: {e}" if parallel.rank() == 0 else f"error (rank {parallel.rank()}): {e}")
    except KeyboardInterrupt as e:
        if parallel.rank() == 0:
            print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        parallel.close()
