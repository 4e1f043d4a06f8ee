"""
Memory without a GPU: the peak bytes of live tensors in one train.py step, by phase and by kind.

`LiveBytes` is a dispatch mode that sees every tensor an operation creates, counts its storage's
bytes from creation until the storage is freed, and keeps each phase's peak with what made it up:
the figure torch.cuda.max_memory_allocated reports on a GPU, before the allocator's rounding.
`step_memory` replays one step of the loop after warm-up (rollouts, RL backward, SFT backward,
meta-gradient, optimizer step) through train.py's own functions, under FakeTensorMode: every
tensor has its real shape and dtype and no data, so a 7B model's step costs seconds on a CPU and
no memory. Rollouts run to the full --max-new-tokens (the worst case), and numbers the loop would
read from tensors (a loss for the log, a gradient norm) read as 0.

What it does not see: the CUDA context (about 0.5 GiB outside PyTorch), the caching allocator's
rounding and fragmentation (reserved minus allocated), cuBLAS workspaces, the memory pool of the
compiled sampler's CUDA graphs, NCCL buffers under torchrun, and memory an operation allocates
and frees inside itself (logsumexp's buffer the size of its input: one chunk of logits here). It
runs CPU kernels' shapes: attention is the flash kernel's (no T x T matrix), as on a GPU.

    python bench.py --memory     # the table at the pretrained recipe's sizes, 0.5B to 7B
"""
import contextlib
import weakref
from collections import Counter
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import amft
import model as policy
import sampling
import train

KINDS = ("weights", "AdamW", "g_RL", "g_SFT", "grad U", "bf16 copy", "KL reference", "KV cache",
         "logits", "activations")

# Qwen2.5's shapes (config.json of each hub model), for models built without weights
QWEN = {
    "0.5B": dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                 tie_word_embeddings=True),
    "1.5B": dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                 tie_word_embeddings=True),
    "3B": dict(num_hidden_layers=36, hidden_size=2048, num_attention_heads=16,
               num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
               tie_word_embeddings=True),
    "7B": dict(num_hidden_layers=28, hidden_size=3584, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
               tie_word_embeddings=False),
}


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages, each counted once (views share their base's), with the
    peak of each phase and its make-up by kind. A new storage is 'logits' when its last dimension
    is the vocabulary, else 'activations'; `tag` gives known tensors their kind (weights, AdamW
    state, the KV cache), also in the peaks already recorded while they were live, and a
    gradient accumulated into p.grad is tagged `grad_kind` (g_RL in the RL backward, and so on).
    placeholders=True answers every read of a number from a tensor (.item(), bool()) with 0, or
    with `answer` when set, for tensors without data (FakeTensorMode)."""

    def __init__(self, vocab: int = 0, placeholders: bool = False):
        super().__init__()
        self.vocab, self.placeholders, self.answer = vocab, placeholders, 0
        self.live = {}              # id(storage) -> [bytes, kind,
                                    #   serial number of its creation, weakref]
        self.by_kind = Counter()    # live bytes of each kind
        self.total = self.serial = 0
        self.phase, self.grad_kind = "setup", "activations"
        self.peaks = {}             # phase -> [peak bytes, {kind: bytes at that peak},
                                    #   serial at that peak]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # asked for every gradient by autograd: the common case, first
        if func is torch.ops.prim.device.default:
            return func(*args)
        if self.placeholders and func in (torch.ops.aten._local_scalar_dense.default,
                                          torch.ops.aten.is_nonzero.default):
            return bool(self.answer) if args[0].dtype == torch.bool else self.answer
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t, "logits" if self.vocab and t.dim() and t.shape[-1] == self.vocab
                            else "activations")
        return out

    def _count(self, t, kind):
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        n, self.serial = storage.nbytes(), self.serial + 1
        self.live[key] = [n, kind, self.serial,
                          weakref.ref(storage, lambda _, key=key: self._free(key))]
        self.by_kind[kind] += n
        self.total += n
        if self.total > self.peaks.get(self.phase, (-1,))[0]:
            self._snapshot()

    def _snapshot(self):
        self.peaks[self.phase] = [self.total, {k: v for k, v in self.by_kind.items() if v},
                                  self.serial]

    def _free(self, key):
        n, kind, _, _ = self.live.pop(key)
        self.by_kind[kind] -= n
        self.total -= n

    def tag(self, tensors, kind: str):
        """These tensors' storages are of `kind`, from now on and in every peak recorded while
        they were live (a storage live now and created before a peak was live at that peak)."""
        for t in tensors:
            entry = self.live.get(id(t.untyped_storage())) if t is not None else None
            if entry is None or entry[1] == kind:
                continue
            n, old, born, _ = entry
            for parts in [self.by_kind] + [parts for _, parts, at in self.peaks.values()
                                           if at >= born]:
                parts[old] -= n
                parts[kind] = parts.get(kind, 0) + n
            entry[1] = kind

    @contextlib.contextmanager
    def during(self, phase: str, grads: str = "activations"):
        """Count the peak of `phase` (from the bytes live as it starts; the highest of all its
        occurrences); gradients accumulated in it are of kind `grads`."""
        self.phase, self.grad_kind = phase, grads
        # a phase seen again keeps its highest peak
        if self.total > self.peaks.get(phase, (-1,))[0]:
            self._snapshot()
        try:
            yield self
        finally:
            self.phase, self.grad_kind = "between phases", "activations"

    def watch_grads(self, params):
        """Tag each gradient as it is accumulated into p.grad (hooks, to remove when done)."""
        return [p.register_post_accumulate_grad_hook(lambda p: self.tag([p.grad], self.grad_kind))
                for p in params]


def recipe_config(**overrides) -> train.Config:
    """The pretrained recipe as a CUDA run resolves it (amp, checkpointing, compiled sampler,
    GSM8K's 16 prompts x 8 samples of 512 new tokens), amft with the meta-gradient every step."""
    cfg = train.Config(model="Qwen2.5-0.5B", meta_every=1, **overrides)
    train.resolve(cfg, cuda=True)
    return cfg


def _rollout(model, rows, P, C, cfg, tracker):
    """rows prompts of P tokens sampled to C new tokens by cfg.sampler, as a Rollout. 'compiled'
    (the recipe's on CUDA) allocates its KV cache whole and, under amp, the bfloat16 copy of the
    weights; its decode steps are then alike in memory, so the replay stops it after 8 (the
    loop's first check of whether every row has ended) and runs it without torch.compile. The
    other samplers grow their cache a token at a time and are replayed to the last token."""
    V = model.config.vocab_size
    ids = torch.randint(0, V, (rows, P))
    attn = torch.ones_like(ids)
    compiled = cfg.sampler == "compiled"
    decoder = sampling.bf16_copy(model) if compiled and getattr(model, "amp", False) else model
    tracker.tag(decoder.parameters() if decoder is not model else [], "bf16 copy")
    tracker.answer = compiled  # "has every row ended?" yes, at the first time of asking
    decode = sampling.decode_compiled if compiled else sampling.decode_loop
    with mock.patch.object(sampling, "compiled_step", lambda: sampling._decode_step), \
            torch.no_grad():
        decode(decoder, ids, attn, C, cfg.temperature, eos=[0], pad=0)
    tracker.answer = 0
    if compiled:
        cache = list(sampling._static_caches[decoder].values())[-1]  # this call's
        tracker.tag([t for layer in cache.layers for t in (layer.keys, layer.values)], "KV cache")
    completions = torch.randint(0, V, (rows, C))
    return sampling.Rollout(ids, attn, completions, torch.ones(rows, C), [""] * rows)


def step_memory(shape: dict, cfg: train.Config, prompt_tokens: int = 160,
                demo_tokens: int = 64) -> LiveBytes:
    """Replay one step of cfg.method after warm-up on a Qwen2 of `shape` (config kwargs) under
    FakeTensorMode: B x G rollouts of prompt_tokens + cfg.max_new_tokens, the RL and SFT
    backwards, the meta-gradient on val_prompts x G fresh rollouts, and the optimizer step,
    holding what the loop holds. Returns the tracker (peaks by phase, by kind)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen2Config, Qwen2ForCausalLM
    method = amft.METHODS[cfg.method]
    B, G, P = cfg.batch_size, cfg.group_size, prompt_tokens
    tracker = LiveBytes(vocab=shape["vocab_size"], placeholders=True)
    with FakeTensorMode(allow_non_fake_inputs=True), tracker:
        with tracker.during("weights and AdamW"):
            model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=32768))
            # all on the CPU in float32 already; (.to fails on fakes)
            with mock.patch.object(torch.nn.Module, "to", lambda module, *_, **__: module):
                model = policy.prepare(model, lora_r=cfg.lora_r, grad_ckpt=cfg.grad_ckpt,
                                       amp=cfg.amp)
            tracker.tag(model.parameters(), "weights")
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            opt = torch.optim.AdamW(params.values(), lr=cfg.lr, fused=True)
            for p in params.values():  # AdamW's state as its first step leaves it
                opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                "exp_avg_sq": torch.zeros_like(p)}
            tracker.tag([t for s in opt.state.values() for t in s.values()], "AdamW")
        hooks = tracker.watch_grads(params.values())
        # the first step after warm-up: every part runs
        now = amft.phase(method, cfg.warmup, cfg.warmup)
        demos = policy.DemoBatch(torch.randint(0, 9, (B, P + demo_tokens)),
                                 torch.ones(B, P + demo_tokens, dtype=torch.long),
                                 torch.ones(B, demo_tokens)) if now.demos else None
        g_rl, g_sft = {}, {}
        if now.rl:
            with tracker.during("rollouts"):
                roll = _rollout(model, B * G, P, cfg.max_new_tokens, cfg, tracker)
                A, A_demo, _ = amft.advantages(torch.rand(B, G).round(),
                                               torch.ones(B) if method.demo_in_group else None)
            with tracker.during("RL backward", grads="g_RL"):
                # (--beta > 0: the frozen copy of the KL term)
                ref_model = train.reference(model, None, cfg.beta)
                tracker.tag(ref_model.parameters() if ref_model is not None else [], "KL reference")
                train.rl_backward(model, ref_model, roll, A, cfg, shaped=method.shaped, demos=demos,
                                  A_demo=A_demo)
                g_rl = train.take_grads(params)
        if now.sft:
            with tracker.during("SFT backward", grads="g_SFT"):
                train.sft_backward(model, demos, cfg.micro_batch)
                g_sft = train.take_grads(params)
        if now.rl and method.mixes and method.meta_term:  # --meta-every 1: due at every step
            with tracker.during("meta-gradient", grads="grad U"):
                val = _rollout(model, cfg.val_prompts * G, P, cfg.max_new_tokens, cfg, tracker)
                A_val = amft.group_advantages(torch.rand(cfg.val_prompts, G).round())[0].flatten()
                train.dU_dmu(model, val, A_val, len(A_val), params=params, g_rl=g_rl, g_sft=g_sft,
                             mu=0.5, alpha=cfg.lr, cfg=cfg)
                del val
        with tracker.during("optimizer step"):
            w_rl, w_sft = amft.loss_weights(method, 0.5, 1.0)
            train.set_grads(params, amft.mix_grads_(g_rl, g_sft, w_rl, w_sft), cfg.grad_clip)
            g_rl = g_sft = None
            opt.step()
            opt.zero_grad(set_to_none=True)
        for h in hooks:
            h.remove()
    return tracker


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(tracker: LiveBytes) -> str:
    """Each phase's peak and its make-up by kind, in GiB (a markdown table)."""
    kinds = [k for k in KINDS if any(parts.get(k) for _, parts, _ in tracker.peaks.values())]
    lines = ["| phase | peak GiB | " + " | ".join(kinds) + " |",
             "|---|---:|" + "---:|" * len(kinds)]
    for phase, (peak, parts, _) in tracker.peaks.items():
        if phase != "between phases":
            lines.append(f"| {phase} | **{gib(peak)}** | "
                         + " | ".join(gib(parts.get(k, 0)) for k in kinds) + " |")
    return "\n".join(lines)


def peak(tracker: LiveBytes) -> int:
    return max(p[0] for p in tracker.peaks.values())


def report(sizes=tuple(QWEN), lora_r: int = 16, prompt_tokens: int = 128,
           demo_tokens: int = 64) -> dict:
    """amft's step at the pretrained recipe's sizes (memory-hungriest: the meta-gradient every
    step, autograd), replayed for each Qwen2.5 size with full fine-tuning and with LoRA. Returns
    {"tables": markdown, "peaks": {(size, lora_r): bytes}}; the first size's per-phase table
    leads."""
    from tqdm import tqdm
    peaks, first = {}, None
    runs = [(size, r) for size in sizes for r in (0, lora_r)]
    for size, r in tqdm(runs, desc="memory replay", dynamic_ncols=True):
        cfg = recipe_config(meta_grad="autograd", lora_r=r)
        tracker = step_memory(QWEN[size], cfg, prompt_tokens, demo_tokens)
        peaks[size, r] = peak(tracker)
        first = first or (size, cfg, table(tracker))
    size, cfg, phases = first
    sizes_line = (f"B={cfg.batch_size} x G={cfg.group_size}, prompts of {prompt_tokens} tokens + "
                  f"{cfg.max_new_tokens} new, demonstrations of {demo_tokens}, "
                  f"micro-batch {cfg.micro_batch}, amp, gradient checkpointing, "
                  f"sampler {cfg.sampler}, {cfg.val_prompts} x G validation rollouts")
    lines = [(f"amft, meta-gradient (autograd) every step, Qwen2.5-{size} shape, full fine-tuning; "
              f"{sizes_line}."), "",
             phases, "", f"| model | full fine-tuning | LoRA r={lora_r} |", "|---|---:|---:|"]
    lines += [f"| Qwen2.5-{s} | {gib(peaks[s, 0])} GiB | {gib(peaks[s, lora_r])} GiB |"
              for s in sizes]
    return {"tables": "\n".join(lines), "peaks": peaks}
