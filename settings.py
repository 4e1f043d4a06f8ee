"""
The settings of a run: `Config` (every flag of train.py, with its help), the two recipes that
fill the settings a user leaves unset, the checks that refuse impossible settings before
anything is loaded or written, and the command line (`parse_args`), including what
`--resume` and `--eval-only` take from an earlier run's config.json.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import amft
import data
import math_tasks
import model as policy
import rewards


def arg(default, help):
    return field(default=default, metadata={"help": help})


# Settings left unset (None) come from the model's recipe. The tiny model trains from random
# weights (or from the tiny base) on General Points and needs a large lr, a long warm-up and a
# compact prompt. A pretrained model trains on GSM8K, the one task with published single-GPU
# runs of 0.5B models (docs/real-models.md gives each value's source): an SFT warm-up at its own
# lr (--warmup-lr), then the mixed phase at 5e-6 with 16 prompts x 8 samples, 512 new tokens,
# K = 20, no KL. A base model needs a longer warm-up to learn the answer format and when to stop
# than an instruction model does. --steps counts the warm-up (one budget, one progress bar):
# 100 + 600 and 20 + 600. Every flag given explicitly wins; config.json keeps the resolved values.
_PRETRAINED = dict(task="gsm8k", batch_size=16, group_size=8, gp_new_tokens=256,
                   max_demo_tokens=1024, lr=5e-6, micro_batch=16, grad_ckpt=True, amp="on CUDA",
                   meta_every=20, cards=4, target="24", prompt="plain", eval_batch=64)
RECIPES = {
    "tiny": dict(task="general-points", steps=700, warmup=450, batch_size=16, group_size=4,
                 gp_new_tokens=24, max_demo_tokens=128, lr=1e-3, micro_batch=0, grad_ckpt=False,
                 amp=False, meta_every=10, cards=3, target="6-15", prompt="compact",
                 eval_batch=64),
    "pretrained": dict(_PRETRAINED, steps=700, warmup=100, warmup_lr=2e-5),  # a base model
    "instruct": dict(_PRETRAINED, steps=620, warmup=20, warmup_lr=1e-5),
}
def is_instruct(name: str) -> bool:
    return any(w in name.lower() for w in policy.CHAT_WORDS)


def resolve(cfg, cuda: bool) -> str:
    """Fill every setting left unset from the recipe (--recipe, or by --model: 'tiny' and
    'tiny-base' get the tiny recipe, an instruction model by its name the instruct one, anything
    else the pretrained one). Returns the recipe's name."""
    name = cfg.recipe
    if name == "auto":
        name = ("tiny" if cfg.model in ("tiny", "tiny-base")
                else "instruct" if is_instruct(cfg.model) else "pretrained")
    if name not in RECIPES:
        raise UsageError(f"--recipe must be auto, {', '.join(RECIPES)}")
    on_cuda = {"on CUDA": cuda}
    for key, value in RECIPES[name].items():
        if key != "gp_new_tokens" and getattr(cfg, key) is None:
            setattr(cfg, key, on_cuda.get(value, value) if isinstance(value, str) else value)
    if cfg.warmup_lr is None:  # the tiny recipe: one lr throughout
        cfg.warmup_lr = cfg.lr
    if not cfg.max_new_tokens:
        cfg.max_new_tokens = RECIPES[name]["gp_new_tokens"] if is_general_points(cfg.task) else 512
    if cfg.sampler == "auto":
        # compiling pays on a GPU; on a CPU it costs more than it saves
        cfg.sampler = "compiled" if cuda and not cfg.fsdp else "generate"
    cfg.recipe = name
    return name


def is_general_points(task: str) -> bool:
    """The built-in task, or a file of hands (rows with `cards`)."""
    return task == "general-points" or (os.path.isfile(task) and task.endswith((".jsonl", ".json"))
                                        and data.has_cards_field(task))


@dataclass
class Config:
    # what to train
    model: str = arg("tiny-base",
                     "'tiny-base' (a small Qwen2 pretrained on a synthetic corpus of arithmetic "
                     "and card rules, built once and cached: pretrain.py), 'tiny' (the same model "
                     "with random weights), 'random-0.5b' (Qwen2.5-0.5B's shape, random), a hub "
                     "id, an alias like Qwen2.5-0.5B, or a folder")
    method: str = arg("amft", f"one of {', '.join(amft.METHODS)}")
    task: str = arg(None,
                    "training data: general-points | gsm8k | math (MATH's train split) | openr1 "
                    "| a .jsonl/.json/.parquet file (see data.py, math_tasks.py); test sets "
                    "(math500, aime24, ...) go to --eval-tasks")
    recipe: str = arg("auto",
                      "defaults for every setting left unset: tiny | pretrained (a base model) | "
                      "instruct | auto ('tiny' for tiny and tiny-base, 'instruct' for a name with "
                      "instruct, chat or -it, else 'pretrained')")
    cards: int = arg(None, "General Points: cards per hand (the paper's: 4)")
    target: str = arg(None,
                      "General Points: the value the formula must reach: 24 (the paper's), a "
                      "range 6-15 or a list 10,12,24 (one task with several targets; the prompt "
                      "states each row's)")
    demo: str = arg("reading",
                    "General Points demonstrations: reading (each card's value under the prompt's "
                    "rule, then the formula: '2 10 5: 5+10/2') | formula (the formula alone: "
                    "'5+10/2')")
    prompt: str = arg(None,
                      "General Points prompt: compact ('2 J 5; J,Q,K=10; 10=') | plain (in words, "
                      "answer in \\boxed{})")
    chat: str = arg("auto", "use the chat template: auto (instruct/chat models) | on | off")
    verifier: str = arg("auto",
                        "math answers: builtin (ours, standard library) | math-verify (Hugging "
                        "Face's, pip install 'math-verify[antlr4_13_2]') | auto (math-verify when "
                        "installed)")
    # budget
    steps: int = arg(None, "optimizer steps in all, warm-up included")
    warmup: int = arg(None,
                      "SFT-only steps before mixing starts (W; amft*, fixed-mix, and sft-grpo's "
                      "first stage)")
    batch_size: int = arg(None, "B: prompts per step (each has a demonstration)")
    group_size: int = arg(None, "G: completions sampled per prompt")
    max_new_tokens: int = arg(0,
                              "longest completion in tokens; 0 = general-points 24 (tiny) or 256 "
                              "(pretrained), math 512")
    max_demo_tokens: int = arg(None,
                               "longest demonstration in tokens, its end token included: a "
                               "training row with a longer one is dropped (the run says which), "
                               "so no data file can run the SFT batch out of memory; 0 = no limit")
    temperature: float = arg(1.0, "sampling temperature; log-probs use the same one")
    # optimizer and memory
    lr: float = arg(None, "AdamW learning rate (the mixed phase; every step of a method without a "
                    "warm-up)")
    warmup_lr: float = arg(None,
                           "AdamW learning rate of the SFT-only warm-up (default: the recipe's; "
                           "the tiny recipe: --lr)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the mixed gradient to this norm")
    micro_batch: int = arg(None,
                           "sequences per forward/backward pass (gradients accumulate; the "
                           "meta-gradient's too); 0 = all at once")
    grad_ckpt: bool = arg(None, "gradient checkpointing: less memory, ~30% more compute")
    amp: bool = arg(None,
                    "mixed precision: compute in bfloat16 (torch.autocast), keep float32 weights "
                    "and AdamW state")
    lora_r: int = arg(0, "LoRA rank through peft (pip install peft); 0 = full fine-tuning")
    fsdp: bool = arg(False,
                     "under torchrun: shard weights, gradients and AdamW state across the "
                     "processes (PyTorch's fully_shard), for models whose training state does not "
                     "fit one GPU; without it each process holds a replica")
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
    meta_every: int = arg(None, "K: steps between meta-gradients")
    meta_grad: str = arg("first-order", "first-order | autograd | fd (not in bfloat16)")
    meta_alpha: float = arg(0.0, "look-ahead step alpha; 0 = use --lr")
    val_prompts: int = arg(8, "validation prompts (x G samples) per meta-gradient")
    H_target: float = arg(None,
                          "target entropy in nats (default: measured on the first step after "
                          "warm-up)")
    H_target_ema: float = arg(0.0,
                              "an alternative to the spec's fixed target: after each step H* "
                              "moves this fraction of the way to the step's entropy (0 = the "
                              "spec: measured once, then fixed)")
    # run
    eval_every: int = arg(50, "steps between greedy accuracy checks on the validation split")
    eval_batch: int = arg(None, "prompts per generate call when evaluating")
    sampler: str = arg("auto",
                       "rollouts and evaluation: generate (transformers) | loop (our decode loop, "
                       "the same samples) | compiled (static cache + torch.compile + CUDA graphs, "
                       "the draw inside the graph: generate's distribution, other samples; see "
                       "bench.py) | auto (compiled on CUDA, else generate)")
    pass_k: int = arg(0,
                      "also report pass@k from k samples per test prompt at --temperature; 0 = off")
    save_every: int = arg(200,
                          "steps between checkpoints (one is always written at the end); 0 = end "
                          "only")
    max_bad_steps: int = arg(10, "stop after this many non-finite losses in a row")
    seed: int = arg(0,
                    "random seed: model init, and separate streams for data order, validation "
                    "prompts, sampling")
    dtype: str = arg("float32",
                     "weights and optimizer state: float32 | bfloat16 (half the memory, but an "
                     "update below a weight's resolution is lost: at lr 1e-6 most weights never "
                     "move; prefer --amp) | float64 (exact checks)")
    device: str = arg("auto", "auto (cuda if present) | cpu | cuda | cuda:N")
    out: str = arg("", "output folder (default: runs/<method>-<time>); must be new or empty")
    resume: str = arg("",
                      "a run folder to continue from its checkpoint; flags given now override its "
                      "config")
    eval_tasks: str = arg("",
                          "benchmarks scored whole before and after training, comma-separated: "
                          "gsm8k (its test split), math500, aime24, amc23, minerva, olympiadbench, "
                          "a .jsonl/.json/.parquet file (question and answer per row), or "
                          "NAME=FILE (a benchmark saved as a file); no training row may hold one "
                          "of their problems (such rows are dropped). Default: the training "
                          "task's test split")
    print_config: bool = arg(False,
                             "print the resolved settings as JSON and exit (loads no model and no "
                             "data)")
    eval_only: bool = arg(False,
                          "only evaluate --model (on --eval-tasks, else on --task's test "
                          "split(s)) and write summary.json")
    skip_test: bool = arg(False,
                          "skip the test-split evaluations before and after training, and the "
                          "last validation check (benchmarks)")


# --help's sections, each opened by its first flag (the comments in Config)
SECTIONS = {"model": "what to train", "steps": "budget", "lr": "optimizer and memory",
            "eps_low": "GRPO", "mu0": "the mu controller", "eval_every": "run"}


class UsageError(ValueError):
    """A problem with what the user asked for: reported in one line, non-zero exit."""


def check(cfg: Config):
    """Reject impossible settings before anything is loaded or written."""
    rules = [
        (cfg.method in amft.METHODS, f"--method must be one of {', '.join(amft.METHODS)}"),
        (cfg.meta_grad in amft.META_GRADS,
         f"--meta-grad must be one of {', '.join(amft.META_GRADS)}"),
        (cfg.dtype in ("float32", "bfloat16", "float64"),
         "--dtype must be float32, bfloat16 or float64"),
        (not (cfg.meta_grad == "fd" and (cfg.dtype == "bfloat16" or cfg.amp)),
         "--meta-grad fd is refused in bfloat16 (and with --amp): no finite-difference step is "
         "both above bfloat16's round-off and small enough to be accurate (20%+ error); use "
         "autograd or first-order"),
        (not (cfg.amp and cfg.dtype != "float32"),
         "--amp computes in bfloat16 over float32 weights: use it with --dtype float32"),
        (cfg.chat in ("auto", "on", "off"), "--chat must be auto, on or off"),
        (cfg.prompt in ("compact", "plain"), "--prompt must be compact or plain"),
        (cfg.demo in data.DEMOS, f"--demo must be one of {', '.join(data.DEMOS)}"),
        (cfg.sampler in ("generate", "loop", "compiled"),
         "--sampler must be auto, generate, loop or compiled"),
        (0 <= cfg.mu_min <= cfg.mu_max <= 1,
         "mu bounds must satisfy 0 <= --mu-min <= --mu-max <= 1"),
        (0 <= cfg.mu0 <= 1, "--mu0 must be in [0, 1]"),
        (all(math.isfinite(x) and x >= 0 for x in (cfg.eta_meta, cfg.eta_H, cfg.meta_alpha)),
         "--eta-meta, --eta-H and --meta-alpha must be finite and >= 0 (the signs are fixed by "
         "the algorithm)"),
        (cfg.H_target is None or (math.isfinite(cfg.H_target) and cfg.H_target >= 0),
         "--H-target must be finite and >= 0"),
        (0 <= cfg.H_target_ema <= 1, "--H-target-ema must be in [0, 1]"),
        (cfg.group_size >= 2,
         "--group-size (G) must be at least 2: advantages compare samples of one prompt"),
        *[(getattr(cfg, k) >= 1, f"{flag(k)} must be >= 1")
          for k in ("steps", "batch_size", "meta_every", "eval_every", "val_prompts", "eval_batch",
                    "max_bad_steps")],
        *[(getattr(cfg, k) >= 0, f"{flag(k)} must be >= 0")
          for k in ("max_new_tokens", "warmup", "micro_batch", "pass_k", "save_every", "lora_r",
                    "max_demo_tokens")],
        *[(0 < getattr(cfg, k) < math.inf, f"{flag(k)} must be finite and > 0")
          for k in ("temperature", "lr", "warmup_lr")],
        (cfg.task not in math_tasks.TEST_ONLY,
         data.test_only_error(cfg.task) if cfg.task in math_tasks.TEST_ONLY else ""),
        (1 <= cfg.cards <= 5, "--cards must be between 1 and 5"),
        (cfg.eval_only or cfg.batch_size % int(os.environ.get("WORLD_SIZE", "1")) == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of the "
         f"{os.environ.get('WORLD_SIZE')} processes (each takes a share)"),
        (not cfg.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1,
         "--fsdp shards across processes: start it with torchrun --nproc_per_node N train.py ... "
         "(N >= 2)"),
        (not cfg.fsdp or (cfg.meta_grad != "fd" and not cfg.lora_r and cfg.beta == 0
                          and cfg.sampler == "generate"),
         "--fsdp works with --meta-grad first-order or autograd, full fine-tuning, --beta 0 and "
         "--sampler generate (fd's step size, LoRA, the KL reference copy and the other samplers "
         "need whole weights on each process)"),
    ]
    for ok, message in rules:
        if not ok:
            raise UsageError(message)
    try:
        data.parse_targets(cfg.target)
        for spec in eval_task_list(cfg):
            math_tasks.check_benchmark(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg.out and os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.resume:
        raise UsageError(f"--out {cfg.out} exists and is not empty; choose a new folder "
                         "(or --resume it)")


def settle(cfg: Config) -> tuple:
    """The device (auto: cuda when present) and every setting resolved and checked, before
    anything is loaded: (device, the recipe's name). UsageError for what cannot run."""
    import torch
    device = (("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto"
              else cfg.device)
    recipe = resolve(cfg, cuda=device.startswith("cuda"))
    check(cfg)
    try:
        # config.json and summary.json say which
        cfg.verifier = rewards.resolve_verifier(cfg.verifier)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return device, recipe


def print_config(cfg: Config) -> dict:
    """--print-config: the settings as a run would resolve them, as JSON, from no model and no
    data (chat 'auto' is decided by the tokenizer, at load time)."""
    settle(cfg)
    resolved = dataclasses.asdict(cfg)
    print(json.dumps(resolved, indent=1))
    return resolved


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def eval_task_list(cfg) -> list:
    """--eval-tasks as a list of entries (empty: the training task's test split)."""
    return [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]


def parse_args(argv=None, description=None) -> Config:
    """Flags from Config's fields. With --resume, the run's saved config is the base and only
    the flags given on this command line override it."""
    def parser(defaults: bool):
        p = argparse.ArgumentParser(description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter,
                                    argument_default=None if defaults else argparse.SUPPRESS)
        group = p
        for f in dataclasses.fields(Config):
            if f.name in SECTIONS:
                group = p.add_argument_group(SECTIONS[f.name])
            flag, default = ("--" + f.name.replace("_", "-"),
                             (f.default if defaults else argparse.SUPPRESS))
            text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
            by_recipe = [f"{r} {v[f.name]}" for r, v in RECIPES.items() if f.name in v]
            shown = ", ".join(by_recipe) if by_recipe else f.default
            if "(default" in text:  # the help says it in words already
                shown = None
            # --grad-ckpt / --no-grad-ckpt: either may override the recipe
            if f.type in (bool, "bool"):
                action = argparse.BooleanOptionalAction if f.default is None else "store_true"
                group.add_argument(flag, action=action, default=default,
                                   help=text + ("" if shown is None else f" (default: {shown})"))
            else:
                kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                group.add_argument(flag, type=kind, default=default,
                                   help=text + ("" if shown is None else f" (default: {shown})"))
        return p
    cfg = Config(**vars(parser(True).parse_args(argv)))
    if cfg.resume:
        path = os.path.join(cfg.resume, "config.json")
        if (not os.path.isfile(os.path.join(cfg.resume, "checkpoint", "trainer_state.pt"))
                or not os.path.isfile(path)):
            sys.exit(f"error: --resume {cfg.resume}: no checkpoint there "
                     f"(expected {cfg.resume}/checkpoint/)")
        try:
            with open(path) as f:
                saved = json.load(f)
            # how the run is launched (like the number of processes): this command line's
            saved.pop("fsdp", None)
            if "demo" not in saved and saved.get("task") == "general-points":
                sys.exit(f"error: --resume {cfg.resume}: the run predates the split of General "
                         "Points by problem (its training order indexes other rows now); start a "
                         "new run")
            cfg = Config(**{**saved, **vars(parser(False).parse_args(argv))})
        except (ValueError, TypeError) as e:
            sys.exit(f"error: --resume {cfg.resume}: config.json is damaged ({e})")
    if cfg.eval_only:
        cfg = bind_to_run(cfg, explicit=vars(parser(False).parse_args(argv)))
    return cfg


RUN_DATA = ("task", "seed", "cards", "target", "demo", "prompt", "chat", "recipe", "max_new_tokens",
            "temperature")


def bind_to_run(cfg: Config, explicit: dict) -> Config:
    """--eval-only of a run (its folder or its model/ folder) scores the run's own test split: the
    task settings (RUN_DATA) come from the run's config.json unless given, and a flag that changes
    them gets a warning, since another seed's test split can hold the run's training rows."""
    model = os.path.normpath(cfg.model)
    run = next((d for d in (model, os.path.dirname(model))
                if os.path.isfile(os.path.join(d, "metrics.jsonl"))
                and os.path.isfile(os.path.join(d, "config.json"))), None)
    if run is None:
        return cfg
    try:
        with open(os.path.join(run, "config.json")) as f:
            saved = json.load(f)
    except ValueError as e:
        sys.exit(f"error: {run}/config.json is damaged ({e})")
    if run == model:
        cfg.model = os.path.join(run, "model")
    if "demo" not in saved and saved.get("task") == "general-points":
        print(f"warning: {run} predates the split of General Points by problem: today's test "
              "split may hold problems it trained on", file=sys.stderr)
    for key in RUN_DATA:
        if key not in explicit and saved.get(key) is not None:
            setattr(cfg, key, saved[key])
    print(f"eval-only: {run}'s task settings ("
          + ", ".join(f"{k}={getattr(cfg, k)}" for k in RUN_DATA) + ")")
    changed = [f"--{k.replace('_', '-')} {explicit[k]} (the run's: {saved.get(k)})"
               for k in RUN_DATA if k in explicit and explicit[k] != saved.get(k)]
    if changed:
        print(f"warning: {'; '.join(changed)}: not the run's test split, which may hold rows it "
              "trained on", file=sys.stderr)
    return cfg
