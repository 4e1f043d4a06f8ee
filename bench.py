"""
Speed and memory, each figure beside its baseline measured in the same process, on whatever
device is present: a Qwen2.5-0.5B-shaped model (random weights from its config, no hub) on
a GPU, the tiny model on a CPU.

    python bench.py            # full settings on a GPU; CPU-sized settings on a CPU
    python bench.py --quick    # seconds: what the test suite runs

Rows of the table:
  decode      ms per decode step and tokens/s at B sequences: transformers generate() (the
              default dynamic cache), our decode loop, our loop with a static cache and
              torch.compile (CUDA graphs), and the floor: reading the weights and the KV
              cache once per step at the device's measured copy bandwidth.
  train       forward+backward tokens/s and TFLOP/s (6 * params * tokens) over N x T tokens,
              with gradient checkpointing, and the peak memory.
  amft step   whole training steps (rollouts, rewards, both losses, mu update, optimizer) of
              fixed-mix and of amft with the meta-gradient every step and every 20 steps,
              median seconds per step and the ratio to fixed-mix.
  memory      peak memory of a 3-step run of the whole loop on the Qwen2.5-0.5B shape, with the
              first-order and the autograd meta-gradient, in bytes per parameter: max allocated
              on a GPU, peak RSS on a CPU (--memory; about 8 minutes on 2 cores).
"""
import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import model as policy
import train


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat=3):
    """Median wall seconds of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device, mb=256):
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(mb * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x), device)


def bench_decode(model, tok, device, B, P, C, compile_too):
    prompts = ["x" * (P - 1)] * B  # char tokenizer: P - 1 characters
    rows = []
    for sampler in ["generate", "loop"] + (["compiled"] if compile_too else []):
        never = [model.config.vocab_size]  # an EOS id outside the vocabulary: every row runs C steps
        run = lambda: policy.sample(model, tok, prompts, G=1, max_new_tokens=C, eos=never, sampler=sampler)
        seconds = timed(run, device, repeat=2)
        rows.append((f"decode {sampler}", seconds / C * 1e3, B * C / seconds))
    n_params = sum(p.numel() for p in model.parameters())
    kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads)
    step_bytes = (n_params + B * (P + C / 2) * kv_per_token) * next(model.parameters()).element_size()
    floor = step_bytes / copy_bandwidth(device)
    rows.append(("decode floor (weights + KV once per step)", floor * 1e3, B / floor))
    return rows


def bench_train(model, device, N, T):
    model.train()
    policy.set_checkpointing(model, True)
    ids = torch.randint(0, model.config.vocab_size, (N, T), device=device)
    attn = torch.ones_like(ids)

    def step():
        logp = policy.token_logprobs(model, ids, attn, n_last=T // 2)
        (-logp.mean()).backward()
        model.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, repeat=2)
    policy.set_checkpointing(model, False)
    n_params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return N * T / seconds, 6 * n_params * N * T / seconds / 1e12, peak


def bench_steps(model_name, device, steps, B, G, C, sampler):
    """Median seconds per main-phase step of whole train.py runs, one per setting."""
    out = {}
    for label, method, every in [("fixed-mix", "fixed-mix", 1), ("amft, meta every step", "amft", 1),
                                 ("amft, meta every 20", "amft", 20)]:
        with tempfile.TemporaryDirectory(prefix="amft-bench-") as tmp:
            run_dir = os.path.join(tmp, "run")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # only the table
                train.main(train.Config(model=model_name, method=method, steps=steps, warmup=0, batch_size=B, group_size=G,
                                        max_new_tokens=C, meta_every=every, eval_every=10**6, eval_batch=B, save_every=0,
                                        device=device, sampler=sampler, skip_test=True, out=run_dir))  # the recipe's precision
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                m = [json.loads(line) for line in f][2:]  # the first steps compile and warm caches
        out[label] = statistics.median(B * (1 + G) / x["samples_per_s"] for x in m)
    return out


def bench_memory(model_name, device, estimators=("first-order", "autograd")):
    """Peak memory of a short whole-loop run (3 steps, the meta-gradient on the last 2), each
    estimator in its own process: peak RSS on a CPU, max allocated on a GPU, in bytes per
    parameter (summary.json's bytes_per_param)."""
    rows = []
    for meta_grad in estimators:
        with tempfile.TemporaryDirectory(prefix="amft-bench-") as tmp:
            cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"),
                   "--model", model_name, "--steps", "3", "--warmup", "1", "--batch-size", "2", "--group-size", "2",
                   "--max-new-tokens", "8", "--meta-every", "1", "--meta-grad", meta_grad, "--val-prompts", "1",
                   "--skip-test", "--device", device, "--out", os.path.join(tmp, "run")]  # the recipe's precision
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}")
            with open(os.path.join(tmp, "run", "summary.json")) as f:
                s = json.load(f)
            rows.append((meta_grad, s["peak_memory_gib"], s["bytes_per_param"], time.perf_counter() - t))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: seconds on a CPU")
    p.add_argument("--compile", action="store_true", help="also time the compiled sampler on a CPU (slow to build)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory of the random-0.5b loop on a CPU "
                   "(two runs of ~4 minutes and ~16 GiB each; always measured on a GPU)")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    big = cuda and not a.quick
    # settings: the GPU settings, or CPU-sized ones
    B, P, C = (64, 128, 256) if big else ((4, 16, 8) if a.quick else (16, 32, 32))
    N, T = (64, 384) if big else ((4, 32) if a.quick else (16, 64))
    sB, sG, sC, sSteps = (8, 8, 256, 8) if big else ((2, 2, 4, 4) if a.quick else (8, 8, 16, 8))
    model_name = "random-0.5b" if big else "tiny"
    model, tok = policy.load_policy(model_name, dtype=getattr(torch, dtype), device=device)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; model: {model_name} ({n_params / 1e6:.1f} M params, {dtype})")

    rows = bench_decode(model, tok, device, B, P, C, compile_too=cuda or a.compile)
    tokens_s, tflops, peak = bench_train(model, device, N, T)
    del model
    steps = bench_steps(model_name, device, sSteps, sB, sG, sC, "compiled" if cuda else "generate")
    mem_model = "random-0.5b" if big or a.memory else "tiny"
    peaks = bench_memory(mem_model, device, ("autograd",) if a.quick else ("first-order", "autograd")) \
        if big or a.memory or a.quick else []

    base = rows[0][1]
    lines = ["| what | value | vs baseline |", "|---|---|---|"]
    lines += [f"| {name}, B={B}, prompt {P}, {C} new | {ms:.2f} ms/step, {tps:,.0f} tok/s | {base / ms:.2f}x generate |"
              for name, ms, tps in rows]
    memory = f", peak {peak:.1f} GiB" if cuda else ""
    lines.append(f"| train fwd+bwd, {N} x {T} tokens, grad ckpt | {tokens_s:,.0f} tok/s, {tflops:.2f} TFLOP/s{memory} | |")
    ref = steps["fixed-mix"]
    lines += [f"| step: {k}, B={sB} x G={sG} x {sC} new | {v:.3f} s | {v / ref:.2f}x fixed-mix |" for k, v in steps.items()]
    where = "max allocated" if cuda else "peak RSS"
    lines += [f"| memory: {mem_model} loop, meta-grad {est}, B=2 x G=2 | {gib:.2f} GiB {where}, {bpp:.1f} bytes/param "
              f"({sec:.0f} s) | |" for est, gib, bpp, sec in peaks]
    try:
        import trl  # noqa: F401
        lines.append("| TRL GRPOTrainer | not measured by this script yet | |")
    except ImportError:
        lines.append("| TRL GRPOTrainer | trl not installed | |")
    table = "\n".join(lines)
    print(table)
    return {"decode": rows, "train_tokens_per_s": tokens_s, "tflops": tflops, "steps": steps, "memory": peaks, "table": table}


if __name__ == "__main__":
    main()
