"""
The evidence: every method of amft.py (METHODS) x several seeds on the built-in General Points
task, at equal budgets (same model, same steps x prompts per step, so every method sees the
same training hands the same number of times), then a Markdown table and plots.

    python compare.py                 # 9 methods x 3 seeds, 300 steps each, from the tiny base
    python compare.py --quick         # 9 methods x 2 seeds, 120 steps
    python compare.py --methods amft,sft --seeds 5 --steps 500
    python compare.py --jobs 2        # two runs at a time, one thread each (1.4x the runs per
                                      # hour on 2 cores)

Writes to --out (default runs/compare-<time>): one train.py run folder per method and seed
(a finished run is kept and reused, so an interrupted comparison picks up where it stopped),
results.md (ID/OOD accuracy mean +- std over seeds, each method's difference from amft paired
by seed with a 95% bootstrap interval, samples, wall time) and, when
matplotlib is installed, comparison.png: mu over steps for amft and its ablations, entropy
against its target, and validation accuracy against samples seen for every method. On a
2-core CPU with --jobs 2, a 300-step run takes 40-220 s on its one thread (sft least, the RL rows
most); one seed of amft, fixed-mix, sft, sft-grpo, grpo and two formula-only rows took about 9
minutes.
"""
import _thread
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time

import torch
from tqdm import tqdm

import amft
import plots
import train


def mean_std(xs):
    """'mean ± std' over seeds; one seed has no spread to show, so just its value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return (f"{xs[0]:.3f}" if len(xs) == 1
            else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}")


def paired_difference(base, other, reps=10_000, seed=0):
    """other - base paired by seed: (mean difference, 95% bootstrap interval or None). The
    interval resamples the seeds' differences with replacement (percentile bootstrap); with the
    same seed both methods see the same training hands in the same order, so the pairing
    removes the spread that comes from the hands."""
    import numpy as np
    d = np.array([y - x for x, y in zip(base, other) if x is not None and y is not None],
                 dtype=float)
    if len(d) == 0:
        return None, None
    if len(d) < 2:
        return float(d.mean()), None
    means = d[np.random.default_rng(seed).integers(0, len(d), (reps, len(d)))].mean(1)
    return float(d.mean()), (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def difference(base, other) -> str:
    """'+0.012 [-0.004, +0.030]'; 'both 0' when every run of both rows scored 0: no difference
    can be measured at the floor, and '+0.000 [+0.000, +0.000]' would read as a precise tie."""
    mean, ci = paired_difference(base, other)
    if mean is None:
        return "n/a"
    if not any(x for x in [*base, *other] if x is not None):
        return "both 0"
    return f"{mean:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def table(results, settings: str, reference="amft") -> str:
    """Markdown: one row per method, mean +- std over seeds, and the difference from the reference
    method paired by seed with its 95% bootstrap interval."""
    ref = results.get(reference)
    score = lambda runs, key: [r["summary"].get(key) for r in runs]
    lines = [f"Settings: {settings}", "",
             f"| method | ID accuracy | OOD accuracy | ID − {reference} [95% CI] "
             f"| OOD − {reference} [95% CI] "
             f"| OOD with J,Q,K − {reference} [95% CI] "
             "| hands without J,Q,K: ID / OOD | hands with J,Q,K: ID / OOD | final w_SFT "
             "| samples per run (demos + rollouts) | wall s per run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        s = [r["summary"] for r in runs]
        acc = lambda key: mean_std([x.get(key) for x in s])
        w_sft = [r["metrics"][-1]["w_sft"] for r in runs]
        paired = [difference(score(ref, k), score(runs, k)) if ref and method != reference else ""
                  for k in ("id_accuracy", "ood_accuracy", "ood_accuracy_faces")]
        lines.append(f"| {method} | {acc('id_accuracy')} | {acc('ood_accuracy')} "
                     f"| {paired[0]} | {paired[1]} | {paired[2]} "
                     f"| {acc('id_accuracy_no_faces')} / {acc('ood_accuracy_no_faces')} "
                     f"| {acc('id_accuracy_faces')} / {acc('ood_accuracy_faces')} "
                     f"| {statistics.mean(w_sft):.2f} | {runs[0]['metrics'][-1]['samples_seen']:,} "
                     f"| {statistics.mean(x['wall_seconds'] for x in s):.0f} |")
    return "\n".join(lines) + "\n"


def parse_entry(entry: str):
    """'amft', or a method with settings of its own, a row of its own: 'amft@H_target_ema=0.02'
    or 'amft@H_target=0.2,eta_H=0.02' (any train.Config field). Returns (method, settings)."""
    method, _, extra = entry.partition("@")
    # a class, or its name as text
    types = {f.name: f.type for f in dataclasses.fields(train.Config)}
    kinds = {int: int, float: float, str: str, "int": int, "float": float, "str": str}
    settings = {}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        kind = kinds.get(types.get(key))
        if kind is None or not value:
            raise SystemExit(f"error: {entry!r}: {item!r} is not NAME=VALUE for a number or text "
                             "setting of train.py")
        try:
            settings[key] = kind(value)
        except ValueError:
            raise SystemExit(f"error: {entry!r}: {value!r} is not a {kind.__name__}") from None
    return method, settings


def stop_with_parent(parent: int):
    """A worker whose compare.py has gone (killed, not Ctrl-C'd) stops its run as Ctrl-C would,
    rather than train on unseen into a folder a new comparison may be writing."""
    while os.getppid() == parent:
        time.sleep(1)
    _thread.interrupt_main()


def train_quietly(cfg, threads: int):
    """One run in a worker process of --jobs: `threads` torch threads, its printout in
    <run>/train.log (<run>.log beside the folder until the run has finished)."""
    torch.set_num_threads(threads)
    parent = os.getppid()
    threading.Thread(target=stop_with_parent, args=(parent,), daemon=True).start()
    with open(f"{cfg.out}.log", "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            train.main(cfg)
        except KeyboardInterrupt as e:
            print(f"\ninterrupted: {e}", flush=True)
            if os.getppid() != parent:
                # an orphan: nobody is left to take a result, and the pool's queue would hold it
                # forever
                os._exit(130)
            raise
    os.replace(f"{cfg.out}.log", os.path.join(cfg.out, "train.log"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(amft.METHODS),
                   help="comma-separated (default: all); a method may carry settings of its own, "
                   "a row of its own: 'amft@H_target_ema=0.02' (several: separate with ';' and "
                   "quote)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per method (default 3; --quick: 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (default 300; --quick: 120)")
    p.add_argument("--warmup", type=int, default=None,
                   help="SFT warm-up steps (default 100; --quick: 40)")
    p.add_argument("--batch-size", type=int, default=16, help="B: prompts per step")
    p.add_argument("--group-size", type=int, default=4,
                   help="G: samples per prompt (the default run's)")
    p.add_argument("--model", default="tiny-base",
                   help="the model every run starts from (default: the tiny base)")
    p.add_argument("--recipe", default="auto",
                   help="train.py's --recipe (auto: tiny for tiny and tiny-base, instruct for an "
                   "instruction model, else pretrained)")
    p.add_argument("--target", default=None,
                   help="General Points target(s), as train.py --target (default: the tiny "
                   "recipe's 6-15)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation checks (default steps/10)")
    p.add_argument("--quick", action="store_true", help="fewer seeds and steps: 2 x 120")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, each in its own process with its share of torch's "
                   "threads (a run's numbers then differ by rounding from a --jobs 1 run of the "
                   "same seed)")
    p.add_argument("--out", default="",
                   help="output folder (default runs/compare-<time>); reused if it exists")
    a = p.parse_args(argv)
    seeds = a.seeds or (2 if a.quick else 3)
    steps = a.steps or (120 if a.quick else 300)
    warmup = a.warmup if a.warmup is not None else (40 if a.quick else 100)
    eval_every = a.eval_every or max(1, steps // 10)
    methods = a.methods.split(";") if ";" in a.methods else a.methods.split(",")
    entries = {m: parse_entry(m) for m in methods}  # row -> (method, its own settings)
    unknown = [m for m, (name, _) in entries.items() if name not in amft.METHODS]
    if unknown or seeds < 1 or steps < 1 or a.jobs < 1:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from "
                         f"{', '.join(amft.METHODS)}" if unknown
                         else "error: --seeds, --steps and --jobs must be >= 1")
    out = a.out or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    # seed by seed: a comparison cut short has whole seeds
    runs = {(method, seed):
            os.path.join(out, f"{method.replace('@', '_').replace('=', '').replace(',', '_')}"
                              f"-seed{seed}")
            for seed in range(seeds) for method in methods}
    # a finished run is reused
    todo = [key for key, run in runs.items()
            if not os.path.isfile(os.path.join(run, "summary.json"))]
    wanted = train.Config(model=a.model, recipe=a.recipe, target=a.target)
    train.resolve(wanted, cuda=False)  # the target the runs get: train.py's own rule
    for key, run in runs.items():  # ... if it is a run of this task
        with (open(os.path.join(run, "config.json")) if key not in todo
              else contextlib.nullcontext()) as f:
            if f and str(json.load(f).get("target")) != str(wanted.target):
                raise SystemExit(f"error: {run} was trained with another --target than "
                                 f"{wanted.target}; use another --out")
    t0 = time.time()
    for key in todo:
        if os.path.isdir(runs[key]):
            os.rename(runs[key], f"{runs[key]}.incomplete-{time.strftime('%H%M%S')}")
    configs = {(m, seed): train.Config(method=entries[m][0], seed=seed, steps=steps, warmup=warmup,
                                       batch_size=a.batch_size, group_size=a.group_size,
                                       eval_every=eval_every, save_every=0, out=runs[m, seed],
                                       **{"model": a.model, "recipe": a.recipe, "target": a.target,
                                          **entries[m][1]})
               for m, seed in todo}
    if a.jobs == 1:
        for key in todo:
            train.main(configs[key])
    else:
        threads = max(1, torch.get_num_threads() // a.jobs)
        with concurrent.futures.ProcessPoolExecutor(
                a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_quietly, configs[key], threads): key for key in todo}
            bar = tqdm(concurrent.futures.as_completed(futures), total=len(todo),
                       desc=f"runs ({a.jobs} at a time)", dynamic_ncols=True)
            for future in bar:
                future.result()  # a failed run stops the comparison, with its error
                bar.write(f"done: {futures[future][0]} seed {futures[future][1]}  "
                          f"(log: {runs[futures[future]]}/train.log)")
    results = {}
    for (method, seed), run in runs.items():
        with open(os.path.join(run, "summary.json")) as f:
            results.setdefault(method, []).append({"summary": json.load(f),
                                                   "metrics": plots.load_metrics(run)})
    trained, reused = len(todo), len(runs) - len(todo)
    command = " ".join(["python compare.py", *(sys.argv[1:] if argv is None else argv)])
    settings = (f"`{command}`: {len(methods)} methods x {seeds} seeds, {steps} steps "
                f"({warmup} SFT warm-up for amft*, fixed-mix, sft-grpo), B={a.batch_size}, "
                f"G={a.group_size}; "
                f"{time.time() - t0:.0f} s in this call ({trained} runs trained, {reused} reused)")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table(results, settings))
    figure = plots.plot_comparison(results, os.path.join(out, "comparison.png"))
    print(table(results, settings))
    print(f"results in {out}/results.md"
          + (f" and {figure}" if figure else " (install matplotlib for plots)"))
    return results


if __name__ == "__main__":
    main()
