"""
Speed and memory, each figure beside its baseline measured in the same process, on whatever
device is present: a Qwen2.5-0.5B-shaped model (random weights from its config, no hub) on
a GPU, the tiny model on a CPU.

    python bench.py            # full settings on a GPU; CPU-sized settings on a CPU
    python bench.py --quick    # seconds: what the test suite runs
    python bench.py --trl      # also TRL's GRPOTrainer at the step settings (pip install trl)
    python bench.py --memory   # only memory: what a run needs, 0.5B to 7B, computed on a CPU

Rows of the table:
  decode      ms per decode step and tokens/s at B sequences: transformers generate() (the
              default dynamic cache), our decode loop, our loop with a static cache and
              torch.compile (CUDA graphs), and the floor: reading the weights and the KV
              cache once per step at the device's measured copy bandwidth. "same tokens" is
              the share of tokens equal to generate()'s for the same seed.
  samplers    the same check on the tiny model in float32 with prompts of different lengths
              (left padding): the exactness test, where rounding cannot explain a difference.
  train       forward+backward+AdamW tokens/s and TFLOP/s (6 * params * tokens) over N x T
              tokens, with and without gradient checkpointing, by micro-batch, and the peak.
  amft step   whole train.py steps (rollouts, rewards, both losses, mu, optimizer) at the
              model's recipe: fixed-mix, and amft with each meta-gradient estimator; amft
              runs take dU/dmu every other step, so one run gives the plain step and the
              meta step; "every K" is (K - 1 plain + 1 meta) / K. Per-phase seconds and peak.
  memory      (--quick) amft's step replayed on the tiny shape with live-tensor accounting;
              --memory prints only the memory tables: the same replay at the pretrained
              recipe's sizes, by phase and by kind for 0.5B, and the peak of each Qwen2.5 size
              from 0.5B to 7B, full fine-tuning and LoRA (memory.py; no GPU needed).
  TRL         GRPOTrainer (--trl): the same model, prompts, B x G and new tokens, bf16 autocast
              and gradient checkpointing, seconds per step after the first, in its own process.
"""
import argparse
import contextlib
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

import checkpoint
import model as policy
import sampling
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


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def copy_bandwidth(device, mb=256):
    """Bytes per second of a large device-to-device copy (read + write)."""
    x = torch.empty(mb * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x), device)


def bench_decode(model, tok, device, B, P, C, samplers):
    """Rows (name, ms/step, tok/s, share of tokens equal to generate's for the same seed, for the
    loop; the compiled sampler draws by another method, so its tokens differ). With the compiled
    sampler, also a row with dynamo's guards skipped (torch.compiler.set_stance's
    skip_guard_eval_unsafe, safe here: one compiled entry, the same shapes every call): what the
    guards cost per step."""
    prompts = ["x" * (P - 1)] * B  # char tokenizer: P - 1 characters
    never = [model.config.vocab_size]  # an EOS id outside the vocabulary: every row runs C steps
    rows, drawn = [], {}
    variants = [(s, contextlib.nullcontext) for s in samplers]
    if "compiled" in samplers and hasattr(torch.compiler, "set_stance"):
        variants.append(("compiled, guards skipped", lambda: torch.compiler.set_stance(
            "default", skip_guard_eval_unsafe=True)))
    for name, stance in variants:
        sampler = name.split(",")[0]

        def run():
            torch.manual_seed(0)
            with stance():
                drawn[name] = sampling.sample(model, tok, prompts, G=1, max_new_tokens=C, eos=never,
                                              sampler=sampler).completions
        seconds = timed(run, device, repeat=2)
        same = ((drawn[name] == drawn["generate"]).float().mean().item() if sampler == "loop"
                else None)
        rows.append((f"decode {name}", seconds / C * 1e3, B * C / seconds, same))
    n_params = sum(p.numel() for p in model.parameters())
    kv_per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads)
    step_bytes = ((n_params + B * (P + C / 2) * kv_per_token)
                  * next(model.parameters()).element_size())
    floor = step_bytes / copy_bandwidth(device)
    rows.append(("decode floor (weights + KV once per step)", floor * 1e3, B / floor, None))
    return rows


def profile_decode(model, tok, device, B, P, C):
    """torch.profiler over one rollout of the compiled sampler (B rows, prompts of P tokens, C new
    tokens; after two warm-up calls): wall, host and device milliseconds per decode step, the
    host's time by cause (dynamo's guards, the compiled regions, CUDA-graph launches, eager ops
    outside compiled code, by name; the prompts' prefill apart where sampling.py names it), and
    dynamo's graph and graph-break counts."""
    from torch.profiler import ProfilerActivity, profile
    prompts = ["x" * (P - 1)] * B
    never = [model.config.vocab_size]
    run = lambda: sampling.sample(model, tok, prompts, G=1, max_new_tokens=C, eos=never,
                                  sampler="compiled")
    run()
    run()
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prefill = getattr(sampling, "_prefill", None)  # named in the trace, where there is one

    def named_prefill(*args, **kwargs):
        with torch.profiler.record_function("prefill"):
            return prefill(*args, **kwargs)
    sync(device)
    t = time.perf_counter()
    with profile(activities=activities) as prof, (
            mock.patch.object(sampling, "_prefill", named_prefill) if prefill
            else contextlib.nullcontext()):
        run()
        sync(device)
    wall = time.perf_counter() - t
    ms = lambda us: us / 1e3 / C  # profiler microseconds -> ms per decode step
    events = prof.events()
    host = lambda match: ms(sum(e.cpu_time_total for e in events if match(e.name)))
    top_eager, syncs = {}, ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")
    for e in events:  # eager ops called from Python, not from inside compiled code
        if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in syncs:
            top_eager[e.name] = top_eager.get(e.name, 0.0) + ms(e.cpu_time_total)
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    counters = torch._dynamo.utils.counters
    r = dict(
        B=B, P=P, C=C, wall_ms=wall * 1e3 / C, device_ms=ms(device_us),
        guards_ms=host(lambda n: n == "TorchDynamo Cache Lookup"),
        compiled_regions_ms=host(lambda n: n.startswith("Torch-Compiled Region")),
        graph_launch_ms=host(lambda n: n == "cudaGraphLaunch"),
        prefill_ms=host(lambda n: n == "prefill") if prefill else None,
        # a tensor's value read on the host (has every row ended?): the host waits for the device
        sync_ms=host(lambda n: n in syncs),
        eager_ops_ms=sum(top_eager.values()),
        eager_ops=dict(sorted(top_eager.items(), key=lambda kv: -kv[1])[:10]),
        graphs=dict(counters["stats"]), graph_breaks=dict(counters["graph_break"]),
        cudagraphs={k: v for k, v in counters["inductor"].items() if "cudagraph" in k})
    # Python, and what the profiler's own bookkeeping adds (guard checks run before, not inside,
    # a compiled region)
    r["rest_ms"] = (r["wall_ms"] - r["guards_ms"] - r["compiled_regions_ms"] - r["sync_ms"]
                    - r["eager_ops_ms"] - (r["prefill_ms"] or 0))
    return r


def profile_table(r) -> str:
    lines = [f"decode step, compiled sampler, B={r['B']}, prompt {r['P']}, {r['C']} new "
             "(ms per step)", "| cause | ms/step |", "|---|---:|",
             f"| wall clock | {r['wall_ms']:.3f} |",
             f"| device busy (kernels) | {r['device_ms']:.3f} |",
             f"| host: dynamo guards (TorchDynamo Cache Lookup) | {r['guards_ms']:.3f} |",
             f"| host: compiled regions (Torch-Compiled Region, graph launches inside) "
             f"| {r['compiled_regions_ms']:.3f} |",
             f"| host: CUDA-graph launches (cudaGraphLaunch) | {r['graph_launch_ms']:.3f} |",
             "| host: the prompts' prefill, eager, once per rollout | "
             + (f"{r['prefill_ms']:.3f} |" if r["prefill_ms"] is not None
                else "in the ops below |"),
             f"| host: waiting on the device to read a value (the end check) "
             f"| {r['sync_ms']:.3f} |",
             f"| host: other eager ops outside compiled code | {r['eager_ops_ms']:.3f} |"]
    lines += [f"| &nbsp; {name} | {v:.3f} |" for name, v in r["eager_ops"].items()]
    lines.append("| host: the rest (Python, the profiler's own cost) | "
                 f"{r['rest_ms']:.3f} |")
    lines.append(f"dynamo: {r['graphs']}; graph breaks: {r['graph_breaks'] or 'none'}; "
                 f"CUDA graphs: {r['cudagraphs'] or 'none'}")
    return "\n".join(lines)


def sampler_agreement(device, samplers, G=4, C=24):
    """Share of tokens each sampler draws equal to generate()'s, same seed, on the tiny model in
    float32 with ragged prompts (left padding): the loop sampling and greedy, the compiled
    sampler greedy (it samples by another draw: test_model.py checks its frequencies)."""
    model, tok = policy.load_policy("tiny", device=device)
    model.eval()
    prompts = ["2 J 5; J,Q,K=10; 10=", "3 4;", "K Q 9 8 7 ; J,Q,K=11,12,13; 24=", "A"]
    agree = {}
    for greedy in (False, True):
        drawn = {}
        for sampler in samplers:
            if sampler == "compiled" and not greedy:
                continue
            torch.manual_seed(7)
            drawn[sampler] = sampling.sample(model, tok, prompts, G=G, max_new_tokens=C,
                                             greedy=greedy, eos=[len(tok) + 9],
                                             sampler=sampler).completions
            agree[sampler, greedy] = (drawn[sampler] == drawn["generate"]).float().mean().item()
    return agree


def bench_train(model, device, N, T, micro, ckpt):
    """tokens/s, TFLOP/s (6 N params), peak GiB of forward+backward over N x T tokens in
    micro-batches (log-probs of every position, as the peers score them) and one fused AdamW
    step."""
    model.train()
    policy.set_checkpointing(model, ckpt)
    ids = torch.randint(0, model.config.vocab_size, (N, T), device=device)
    attn = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.startswith("cuda"))

    def step():
        for s in train.slices(N, micro):
            logp = policy.token_logprobs(model, ids[s], attn[s])
            (-logp.sum() / logp.numel() / N * len(ids[s])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, device, repeat=2)
    policy.set_checkpointing(model, False)
    n_params = sum(p.numel() for p in model.parameters())
    return N * T / seconds, 6 * n_params * N * T / seconds / 1e12, peak_gib(device)


RUNS = [("fixed-mix", "fixed-mix", "first-order"), ("amft first-order", "amft", "first-order"),
        ("amft autograd", "amft", "autograd")]


def bench_steps(model_name, device, steps, B, G, C, sampler, runs=RUNS, meta_every=4):
    """Whole train.py runs at the model's recipe, dU/dmu every `meta_every` steps. Per run, after
    the first two steps (which compile and warm caches): the median seconds of a plain step and of
    a meta step and how many of each, the median seconds of each phase (the meta phase also split
    into its validation rollouts and U's backward, in micro-batches), and the peak memory. A
    model with random weights solves nothing: every reward would be 0, every meta-gradient silent
    and U's backward never run. So every other completion is scored 1 here: each group's rewards
    differ, and each step does the work of a real one."""
    import data
    counter = itertools.count()
    alternating = lambda row, text, verifier="builtin": float(next(counter) % 2)
    out = {}
    for label, method, meta_grad in runs:
        with tempfile.TemporaryDirectory(prefix="amft-bench-") as tmp:
            run_dir = os.path.join(tmp, "run")
            with contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()), \
                    mock.patch.object(data, "reward", alternating):  # only the table
                summary = train.main(train.Config(
                    model=model_name, method=method, steps=steps, warmup=0, batch_size=B,
                    group_size=G, max_new_tokens=C, meta_every=meta_every, meta_grad=meta_grad,
                    eval_every=10**6, eval_batch=B, save_every=0, device=device,
                    sampler=sampler, skip_test=True, out=run_dir))
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                m = [json.loads(line) for line in f][2:]
        plain = [x for x in m if x.get("val_reward") is None]
        meta = [x for x in m if x.get("val_reward") is not None]
        med = lambda rows, key: (statistics.median(x[key] for x in rows)
                                 if rows and rows[0].get(key) is not None else None)
        backward = [dict(x, u=x["seconds_meta"] - x["seconds_meta_rollout"]) for x in meta]
        out[label] = dict(plain=med(plain, "seconds_step"), meta=med(meta, "seconds_step"),
                          n_plain=len(plain), n_meta=len(meta),
                          phases={k: med(plain, f"seconds_{k}") for k in ("rollout", "rl", "sft")}
                                 | {"meta": med(meta, "seconds_meta"),
                                    "meta rollouts": med(meta, "seconds_meta_rollout"),
                                    "U backward": med(backward, "u")},
                          peak_gib=summary["peak_memory_gib"],
                          bytes_per_param=summary["bytes_per_param"])
    return out


def bench_memory_quick():
    """The memory replay (memory.py) on the tiny model's shape at small sizes: what --quick
    checks."""
    import memory
    cfg = memory.recipe_config(meta_grad="autograd", batch_size=2, group_size=2, max_new_tokens=8,
                               val_prompts=1, micro_batch=2)
    shape = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=len(policy.TINY_CHARS) + 3,
                 tie_word_embeddings=True)
    return memory.peak(memory.step_memory(shape, cfg, prompt_tokens=16, demo_tokens=8))


def trl_step(model_path, B, G, C, steps):
    """TRL's GRPOTrainer on our model, tokenizer and General Points prompts (the pretrained
    recipe's: 4 cards, target 24, in words) with our verifier as its reward: median seconds per
    step after the first, and the peak. Runs in this process (bench.py --trl-step)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import data
    splits = data.load_task("general-points", cards=4, target=24, style="plain")
    rows = splits["train"][:B * steps]
    answers = {r["prompt"]: r for r in rows}

    def reward(prompts, completions, **_):
        return [data.reward(answers[p], c) for p, c in zip(prompts, completions)]
    gpu = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(prefix="amft-bench-trl-"), use_cpu=not gpu,
                          bf16=gpu, gradient_checkpointing=True, per_device_train_batch_size=B * G,
                          num_generations=G, max_completion_length=C, max_steps=steps,
                          logging_steps=1, report_to="none", save_strategy="no",
                          learning_rate=1e-6, temperature=1.0, seed=0)
    trainer = trl.GRPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=args,
                              train_dataset=datasets.Dataset.from_list(
                                  [{"prompt": r["prompt"]} for r in rows]))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times, t = [], time.perf_counter()

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            nonlocal t
            sync("cuda" if gpu else "cpu")
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
    trainer.add_callback(Clock())
    trainer.train()
    return dict(trl=trl.__version__, seconds=statistics.median(times[1:]), first=times[0],
                steps=len(times), peak_gib=peak_gib("cuda" if gpu else "cpu"))


def tiny_folder(parent):
    with policy.no_progress_bars():
        return policy.make_tiny_model(os.path.join(parent, "tiny"))


def bench_trl(model_path, B, G, C, steps=3):
    """trl_step in its own process, so its memory and imports stay out of ours."""
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-step", model_path, str(B), str(G),
           str(C), str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


SECTIONS = ("decode", "train", "steps")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings: seconds on a CPU")
    p.add_argument("--compile", action="store_true",
                   help="also time the compiled sampler on a CPU (slow to build)")
    p.add_argument("--memory", action="store_true",
                   help="only the memory tables: amft's step replayed with live-tensor "
                        "accounting at the pretrained recipe's sizes for Qwen2.5 0.5B to 7B "
                        "(memory.py; no GPU needed, ~5 minutes)")
    p.add_argument("--profile", action="store_true",
                   help="only the profile of the compiled sampler's decode steps (torch.profiler): "
                        "host and device ms per step by cause")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--trl", action="store_true",
                   help="also time TRL's GRPOTrainer at the step settings (needs trl, datasets)")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--trl-step", nargs=5, help=argparse.SUPPRESS)  # bench_trl's child process
    a = p.parse_args(argv)
    only = set(a.only.split(","))
    if not only <= set(SECTIONS):
        p.error(f"--only takes sections of {', '.join(SECTIONS)}; got {a.only!r}")
    if a.memory:
        import memory
        result = memory.report()
        print(result["tables"])
        return result
    if a.trl_step:
        path, *sizes = a.trl_step
        print(json.dumps(trl_step(path, *map(int, sizes))))
        return
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    big = cuda and not a.quick
    # settings: the GPU ones (TRL's GRPO step: 8 prompts x 8 completions x 256 new tokens), or
    # CPU-sized ones
    B, P, C = (64, 128, 256) if big else ((4, 16, 8) if a.quick else (16, 32, 32))
    N, T = (64, 384) if big else ((4, 32) if a.quick else (16, 64))
    # whole steps: 2 warm-up steps, then (meta every 4) 10 plain and 3 meta steps
    sB, sG, sC, sSteps = (8, 8, 256, 15) if big else ((2, 2, 4, 4) if a.quick else (8, 8, 16, 15))
    result = {}

    def say(line):  # a section's figures; with --json, the file so far (kept if the run is cut)
        print(line, flush=True)
        if a.json:
            checkpoint.atomic_json(result, a.json)
    with tempfile.TemporaryDirectory(prefix="amft-bench-model-") as folder:
        if big:  # written once; every run below loads this folder (the pretrained recipe)
            with policy.no_progress_bars():
                policy.make_tiny_model(folder, **policy.QWEN_0_5B)
        model_name = folder if big else "tiny"
        dtype = torch.bfloat16 if cuda else torch.float32
        model, tok = policy.load_policy(model_name, dtype=dtype, device=device)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        import transformers
        result.update(
            device=torch.cuda.get_device_name() if cuda else "cpu",
            versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
            model=f"{'random-0.5b' if big else 'tiny'} ({n_params / 1e6:.1f} M params)")
        say(f"device: {result['device']}; {result['versions']}; model: {result['model']}")
        if a.profile:
            result["profile"] = profile_decode(model, tok, device, B, P, min(C, 64))
            result["table"] = profile_table(result["profile"])
            say(result["table"])
            return result
        samplers = ["generate", "loop"] + (["compiled"] if cuda or a.compile else [])
        if "decode" in only:
            result["decode"] = bench_decode(model, tok, device, B, P, C, samplers)
            say(f"decode: {result['decode']}")
            result["agreement"] = {f"{s}{' greedy' if g else ''}": v
                                   for (s, g), v in sampler_agreement(device, samplers).items()}
            say(f"samplers: {result['agreement']}")
        grid = [(8, True), (8, False), (16, False), (32, False)] if big else [(N // 2, True)]
        result["train"] = []
        for micro, ckpt in grid if "train" in only else []:
            tokens_s, tflops, peak = bench_train(model, device, N, T, micro, ckpt)
            result["train"].append((f"{dtype}".split(".")[1], micro, ckpt, tokens_s, tflops, peak))
            say(f"train: {result['train'][-1]}")
        del model
        if big and "train" in only:  # the recipe's precision: float32 weights and AdamW, autocast
            model, _ = policy.load_policy(folder, device=device, amp=True)
            for micro, ckpt in [(16, True), (16, False)]:
                result["train"].append(("float32 + amp", micro, ckpt,
                                        *bench_train(model, device, N, T, micro, ckpt)))
                say(f"train: {result['train'][-1]}")
            del model
        if cuda:
            torch.cuda.empty_cache()
        if "steps" in only:
            try:
                result["steps"] = bench_steps(model_name, device, sSteps, sB, sG, sC,
                                              "compiled" if cuda else "generate",
                                              RUNS if big or not a.quick else RUNS[:2],
                                              meta_every=2 if a.quick else 4)
            except Exception as e:  # the other rows still print
                result["steps"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"steps: {result['steps']}")
        if cuda:
            torch.cuda.empty_cache()  # what our runs cached, free for TRL's process
        result["memory"] = bench_memory_quick() if a.quick else None
        result["trl"] = bench_trl(model_name if big else tiny_folder(folder), sB, sG, sC) \
            if a.trl else None
        say(f"trl: {result['trl']}")
        if cuda or a.compile:
            counters = torch._dynamo.utils.counters
            say(f"torch.compile: {dict(counters['stats'])}; "
                f"{dict((k, v) for k, v in counters['inductor'].items() if 'cudagraph' in k)}")
    result["table"] = table(result, B, P, C, N, T, sB, sG, sC, cuda)
    say(result["table"])
    return result


def table(r, B, P, C, N, T, sB, sG, sC, cuda) -> str:
    lines = [f"| what ({r['device']}; {r['versions']}) | value | vs baseline |", "|---|---|---|"]
    if "decode" in r:
        base = r["decode"][0][1]
        lines += [f"| {name}, B={B}, prompt {P}, {C} new | {ms:.2f} ms/step, {tps:,.0f} tok/s"
                  + (f", same tokens {same:.0%}" if same is not None else "")
                  + f" | {base / ms:.2f}x generate |" for name, ms, tps, same in r["decode"]]
        lines.append("| tokens = generate's (tiny, float32, ragged prompts, same seed) | "
                     + ", ".join(f"{k} {v:.0%}" for k, v in r["agreement"].items()
                                 if not k.startswith("generate")) + " | |")
    for dtype, micro, ckpt, tokens_s, tflops, peak in r["train"]:
        memory = f", peak {peak:.1f} GiB" if cuda else ""
        lines.append(f"| train fwd+bwd+AdamW, {N} x {T} tokens, {dtype}, micro-batch {micro}, "
                     f"grad ckpt {'on' if ckpt else 'off'} "
                     f"| {tokens_s:,.0f} tok/s, {tflops:.2f} TFLOP/s{memory} | |")
    steps = r.get("steps", {})
    if "error" in steps:
        lines.append(f"| steps | failed: {steps['error']} | |")
        steps = {}
    fixed = steps.get("fixed-mix", {}).get("plain")
    where = "max allocated" if cuda else "peak RSS"
    for label, s in steps.items():
        phases = ", ".join(f"{k} {v:.2f}" for k, v in s["phases"].items() if v is not None)
        memory = f"; peak {s['peak_gib']:.1f} GiB {where} ({s['bytes_per_param']:.0f} B/param)"
        if label == "fixed-mix":
            lines.append(f"| step: fixed-mix, B={sB} x G={sG} x {sC} new, median of "
                         f"{s['n_plain']} | {fixed:.3f} s ({phases}){memory} | 1.00x fixed-mix |")
            continue
        for K in (1, 20):
            t = s["meta"] if K == 1 else (s["plain"] * (K - 1) + s["meta"]) / K
            what = ("meta step, median of {n_meta}" if K == 1 else
                    "meta every 20, from {n_plain} plain and {n_meta} meta steps").format(**s)
            lines.append(f"| step: {label}, {what} | {t:.3f} s"
                         + (f" ({phases}){memory}" if K == 1 else "")
                         + f" | {t / fixed:.2f}x fixed-mix |")
    if r["memory"] is not None:
        lines.append("| memory: tiny shape, amft step replayed (memory.py), B=2 x G=2 x 8 new | "
                     f"{r['memory'] / 2**20:.1f} MiB of live tensors at the peak | |")
    trl = r["trl"]
    if trl is None:
        lines.append("| TRL GRPOTrainer | not run (--trl) | |")
    elif "error" in trl:
        lines.append(f"| TRL GRPOTrainer | failed: {trl['error']} | |")
    else:
        amft = steps.get("amft first-order")
        ratio = ("amft (meta every 20) "
                 f"{trl['seconds'] / ((amft['plain'] * 19 + amft['meta']) / 20):.1f}x faster"
                 if amft else "")
        memory = f", peak {trl['peak_gib']:.1f} GiB" if cuda else ""
        lines.append(f"| TRL {trl['trl']} GRPOTrainer, B={sB} x G={sG} x {sC} new | "
                     f"{trl['seconds']:.3f} s/step (first {trl['first']:.1f} s){memory} "
                     f"| {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
