"""
Plots, when matplotlib is installed (without it every function returns None and nothing else
changes): `plot_run` draws one run's mu, entropy and reward (train.py calls it at the end of a
run, curves.png); `plot_comparison` draws compare.py's methods x seeds (comparison.png).
"""
import json
import os
import statistics

import amft


def load_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _pyplot():
    """matplotlib.pyplot without a display, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(run_dir):
    """run_dir/curves.png: mu (and w_SFT), entropy against its target, and mean reward per step."""
    plt = _pyplot()
    if plt is None:
        return None
    m = load_metrics(run_dir)
    steps = [x["step"] for x in m]
    # one step axis (warm-up steps have no entropy)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    axes[0].plot(steps, [x["w_sft"] for x in m], label="w_SFT (weight on imitation)")
    if any(x["mu"] is not None for x in m):
        axes[0].plot(steps, [x["mu"] for x in m], "--", label="mu")
    axes[0].set(xlabel="step", ylabel="weight", ylim=(0, 1.05), title="imitation weight")
    axes[1].plot(steps, [x["entropy"] for x in m], label="entropy H_t")
    if any(x["H_target"] is not None for x in m):
        axes[1].plot(steps, [x["H_target"] for x in m], "--", label="target H*")
    axes[1].set(xlabel="step", ylabel="nats", title="rollout token entropy")
    axes[2].plot(steps, [x["reward_mean"] for x in m], label="train reward (rollouts)")
    val = [(x["step"], x["val_accuracy"]) for x in m if "val_accuracy" in x]
    if val:
        axes[2].plot(*zip(*val), "o-", label="val greedy accuracy")
    axes[2].set(xlabel="step", ylim=(0, 1.05), title="reward")
    warm = [x["step"] for x in m if x["phase"] == "warmup"]
    for ax in axes:
        if warm and len(warm) < len(m):
            ax.axvline(max(warm) + 0.5, color="gray", lw=0.8, ls=":", label="end of SFT warm-up")
        ax.set_xlim(steps[0], steps[-1] + 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(run_dir, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_comparison(results, path):
    """compare.py's figure: mu and entropy (with its target) over steps for each row whose method
    moves mu (mean over seeds, mu's band from the lowest to the highest seed), and validation
    accuracy against samples seen for every row. A row is a method or 'method@settings'."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    # a row: 'amft' or 'amft@H_target=0.2'
    method = {row: amft.METHODS[row.partition("@")[0]] for row in results}
    controlled = [row for row in results if method[row].entropy_term or method[row].meta_term]
    for color, row in enumerate(controlled):
        runs = [r["metrics"] for r in results[row]]
        n = min(len(m) for m in runs)
        steps = [x["step"] for x in runs[0][:n]]
        mean = lambda key, k: statistics.mean(m[k][key] for m in runs)
        mixed = [k for k in range(n)  # not warm-up
                 if all(m[k]["mu"] is not None and m[k]["entropy"] is not None for m in runs)]
        mus = [[m[k]["mu"] for m in runs] for k in mixed]
        axes[0].plot([steps[k] for k in mixed], [statistics.mean(v) for v in mus],
                     color=f"C{color}", label=row)
        axes[0].fill_between([steps[k] for k in mixed], [min(v) for v in mus],
                             [max(v) for v in mus], color=f"C{color}", alpha=0.15)
        axes[1].plot([steps[k] for k in mixed], [mean("entropy", k) for k in mixed],
                     color=f"C{color}", label=f"{row} H_t")
        if mixed and method[row].entropy_term:
            axes[1].plot([steps[k] for k in mixed], [mean("H_target", k) for k in mixed], "--",
                         color=f"C{color}", label=f"{row} H*")
    axes[0].set(xlabel="step", ylabel="mu", ylim=(0, 1),
                title="mu (weight on SFT): mean and range over seeds")
    axes[1].set(xlabel="step", ylabel="nats",
                title="rollout entropy and its target, mean over seeds")
    for j, (row, runs) in enumerate(results.items()):
        curves = [[(x["samples_seen"], x["val_accuracy"]) for x in r["metrics"]
                   if "val_accuracy" in x] for r in runs]
        n = min(len(c) for c in curves)
        if n:
            xs = [curves[0][k][0] for k in range(n)]
            # past 10 rows the colours come round again, dashed
            axes[2].plot(xs, [statistics.mean(c[k][1] for c in curves) for k in range(n)],
                         "o-" if j < 10 else "s--", ms=3, color=f"C{j % 10}", label=row)
    axes[2].set(xlabel="training samples seen (demos + rollouts)", ylabel="greedy accuracy",
                xscale="log", ylim=(0, 1), title="validation accuracy, mean over seeds")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
