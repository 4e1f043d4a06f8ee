"""
Sampling: G completions per prompt from the policy, by one of three samplers.

- generate: transformers' generate(), its generation config blanked so that it draws from
  softmax(logits / temperature) and nothing else.
- loop: the same decode loop written out (prefill, then one token per forward), generate's
  draw op for op: the same tokens for a seed.
- compiled, for GPUs: a static KV cache per batch shape and one torch.compile'd decode step
  (a CUDA graph) holding the forward and the draw, by the Gumbel-max trick: generate's
  distribution, drawn with no host sync, other tokens for a seed.

Every sampler returns a Rollout: prompts, completions, the mask up to each first end token, and
the decoded texts.
"""
import contextlib
import functools
import inspect
import weakref
from typing import NamedTuple

import torch

from model import completion_mask, copy_with_weights, eos_ids


class Rollout(NamedTuple):
    """G completions per prompt, rows in prompt-major order (prompt b's are rows b*G .. b*G+G-1)."""
    prompt_ids: torch.Tensor    # (B*G, P) left-padded
    prompt_mask: torch.Tensor   # (B*G, P)
    completions: torch.Tensor   # (B*G, C)
    mask: torch.Tensor          # (B*G, C) 1 up to and including the first EOS
    texts: list                 # (B*G,) decoded completions, up to the first EOS

    @property
    def ids(self):              # (B*G, P+C) prompt and completion, as the log-probs read them
        return torch.cat([self.prompt_ids, self.completions], 1)

    @property
    def attn(self):             # (B*G, P+C)
        return torch.cat([self.prompt_mask, self.mask.long()], 1)


@torch.no_grad()
def sample(model, tok, prompts: list, G: int, temperature: float = 1.0, max_new_tokens: int = 16,
           greedy: bool = False, eos=None, sampler: str = "generate") -> Rollout:
    """G completions per prompt. sampler: 'generate' (transformers), 'loop' (decode_loop below:
    generate's tokens for a seed) or 'compiled' (decode_compiled: static cache, torch.compile,
    the same distribution by another draw; under --amp through bf16_copy)."""
    # the compiled sampler's shapes (prompt + cache length) come in steps of 64, so a new batch
    # seldom means a new graph; extra left padding is masked and changes no probability
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
              pad_to_multiple_of=64 if sampler == "compiled" else None)
    device = next(model.parameters()).device
    ids = enc.input_ids.repeat_interleave(G, 0).to(device)           # (B*G, P)
    attn = enc.attention_mask.repeat_interleave(G, 0).to(device)     # (B*G, P)
    eos = eos or eos_ids(tok, model)
    if sampler == "generate":
        completions = _generate(model, ids, attn, max_new_tokens, temperature, eos,
                                tok.pad_token_id, greedy)
    elif sampler == "loop":
        completions = decode_loop(model, ids, attn, max_new_tokens, temperature, eos,
                                  tok.pad_token_id, greedy)
    else:
        decoder = bf16_copy(model) if getattr(model, "amp", False) else model
        completions = decode_compiled(decoder, ids, attn, max_new_tokens, temperature, eos,
                                      tok.pad_token_id, greedy)
        # the bucket's extra columns go again: the log-probs need only the prompts' own padding
        first = int(attn.any(0).long().argmax())
        ids, attn = ids[:, first:], attn[:, first:]
    mask = completion_mask(completions, eos)
    lengths = mask.sum(1).long().tolist()
    texts = tok.batch_decode([c[:n] for c, n in zip(completions.tolist(), lengths)],
                             skip_special_tokens=True)
    return Rollout(ids, attn, completions, mask, texts)


def _generate(model, ids, attn, max_new_tokens, temperature, eos, pad, greedy):
    """transformers' generate, drawing from softmax(logits / temperature) and nothing else. A
    checkpoint's generation_config.json may set top-k, top-p, min-p, repetition or n-gram
    penalties, suppressed or forced tokens (Qwen2.5-Instruct ships repetition_penalty 1.05 and
    top-k/top-p), and generate() fills every setting we leave unset from it; the GRPO ratio and
    U's surrogate would then score samples from another distribution. So for the call the
    model's generation config is a blank one, and ours sets temperature only."""
    from transformers import GenerationConfig
    plain = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                             do_sample=not greedy,
                             **({} if greedy else
                                {"temperature": temperature, "top_k": 0, "top_p": 1.0}))
    saved, model.generation_config = model.generation_config, GenerationConfig()
    # synced_gpus under FSDP (parallel.shard): every forward is a collective, so no rank stops early
    try:
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=plain,
                             synced_gpus=getattr(model, "synced_generation", False))
    finally:
        model.generation_config = saved
    return out[:, ids.shape[1]:]                                      # (B*G, C)


# model -> {(batch, length): StaticCache}, the most recent few: freed with the model
_static_caches = weakref.WeakKeyDictionary()
STATIC_CACHES_KEPT = 4
# model -> its bfloat16 decoding copy (--amp, compiled sampler)
_bf16_copies = weakref.WeakKeyDictionary()


def static_cache(model, batch: int, length: int):
    """A zeroed StaticCache for `batch` rows of `length` positions, the same tensors from call to
    call for each shape: a CUDA graph reads the cache at fixed addresses, so a new cache would
    mean recording the graph again. One per shape, up to STATIC_CACHES_KEPT of the most recent,
    so the training rollouts, the meta-gradient's validation rollouts and the evaluations can
    take turns, each replaying its own graph."""
    from transformers import StaticCache
    held = _static_caches.setdefault(model, {})
    cache = held.pop((batch, length), None)
    if cache is None:
        cache = StaticCache(config=model.config, max_cache_len=length)
    held[batch, length] = cache  # the most recent last
    while len(held) > STATIC_CACHES_KEPT:
        held.pop(next(iter(held)))
    cache.reset()
    return cache


@torch.no_grad()
def bf16_copy(model):
    """The weights in bfloat16 for the compiled sampler under --amp, refreshed from the float32
    weights at every call (2 bytes/param more memory). Two reasons: a static KV cache holds keys
    and values in one dtype, but under autocast the keys come out of the rotary embedding in
    float32 and the values in bfloat16; and casting every weight at every decode step would
    triple the bytes a step reads. It computes as a bfloat16 model, not as autocast does (norms
    and the residual stream are bfloat16 too), so its samples come from a distribution within
    bfloat16 rounding of the one the log-probs score; the GRPO ratio is taken against log-probs
    recomputed by the training forward, as with any separate inference engine."""
    twin = _bf16_copies.get(model)
    if twin is None:
        twin = copy_with_weights(model, lambda p: p.to(torch.bfloat16))
        # no autocast wrapper: it computes in bfloat16 throughout
        twin.__dict__.pop("forward", None)
        twin.amp = False
        twin.eval()
        _bf16_copies[model] = twin
    for mine, theirs in zip(twin.parameters(), model.parameters()):
        mine.copy_(theirs)
    return twin


def _cache_kwarg(model) -> str:
    """The name of forward's cache argument (renamed in transformers 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _prefill(model, ids, attn, cache, mask):
    """The prompts through the model into `cache`: the last position's logits (B, 1, V) and each
    row's last position id (B, 1), from which the new tokens count on."""
    P = ids.shape[1]
    position = (attn.cumsum(-1) - 1).clamp(min=0)                             # (B, P)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position,
                   cache_position=torch.arange(P, device=ids.device), logits_to_keep=1,
                   **{_cache_kwarg(model): cache}).logits
    return logits, position[:, -1:]


def decode_loop(model, ids, attn, max_new_tokens, temperature, eos, pad, greedy=False):
    """The decode loop of generate(), written out: prefill the prompts into a KV cache, then
    one token per forward. Sampling is generate()'s, op for op (float32 logits / temperature,
    softmax, one torch.multinomial per step; finished rows get pad), so with the same seed it
    draws the same tokens."""
    from transformers import DynamicCache
    B, P = ids.shape
    cache = DynamicCache(config=model.config)
    mask = torch.cat([attn, attn.new_ones(B, max_new_tokens)], 1)             # (B, P+C)
    logits, position = _prefill(model, ids, attn, cache, mask[:, :P])
    kv = _cache_kwarg(model)
    out = ids.new_full((B, max_new_tokens), pad)                               # (B, C)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    eos_t = torch.tensor(eos, device=ids.device)
    for t in range(max_new_tokens):
        scores = logits[:, -1].float()                                         # (B, V)
        if greedy:
            token = scores.argmax(-1)
        else:
            token = torch.multinomial(torch.softmax(scores / temperature, -1), 1).squeeze(1)
        token = torch.where(done, torch.full_like(token, pad), token)
        out[:, t] = token
        done |= torch.isin(token, eos_t)
        if bool(done.all()) or t + 1 == max_new_tokens:
            return out[:, :t + 1]
        logits = model(input_ids=token[:, None], attention_mask=mask[:, :P + t + 1],
                       position_ids=position + t + 1,
                       cache_position=torch.full((1,), P + t, device=ids.device),
                       **{kv: cache}).logits
    return out


def draw(scores, temperature: float, greedy: bool):
    """The next token (B,) from float32 logits (B, V): the argmax if greedy, else a draw from
    softmax(scores / temperature) by the Gumbel-max trick, argmax(scores / temperature - log q)
    with q ~ Exp(1) per entry: the same distribution as torch.multinomial, drawn with no host
    sync and no cumulative sum, so a compiled graph fuses it into one pass over the vocabulary
    (gpt-fast samples this way). q = -log u for u ~ U[0, 1): u = 0 gives q = inf, a token not
    drawn; u never reaches 1, so no q is 0 (q = 0 would draw its token whatever its score)."""
    if greedy:
        return scores.argmax(-1)
    q = -torch.rand_like(scores).log()
    return (scores / temperature - q.log()).argmax(-1)


def _decode_step(model, token, done, position, cache_position, mask, cache, eos, kv: str,
                 temperature: float, greedy: bool, pad: int):
    """One token for every row: the forward of the last tokens (B,) against the cache, the draw,
    pad for rows already ended. Returns the new (token, done, position, cache_position)."""
    logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                   cache_position=cache_position, **{kv: cache}).logits
    token = torch.where(done, pad, draw(logits[:, -1].float(), temperature, greedy))
    return token, done | torch.isin(token, eos), position + 1, cache_position + 1


@functools.cache
def compiled_step():
    """_decode_step through torch.compile, built once per process, the draw inside the graph.
    The model is an argument, not captured, so nothing here keeps a model alive, and a new model
    of the same shape and dtype reuses the compiled code (its CUDA graph is recorded again for
    the new weights). dynamic=False: one graph per batch size, cache length, temperature and
    greedy flag, each specialised; a run meets several (training and validation rollouts,
    evaluation batches), so a new one compiles under RECOMPILES rather than dynamo's default
    limit of 8, past which it would fall back to eager code."""
    return torch.compile(_decode_step, mode="reduce-overhead", dynamic=False)


RECOMPILES = 64


def _more_recompiles():
    """dynamo's limit on compiled variants of one function raised to RECOMPILES, for a block."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: RECOMPILES})


def decode_compiled(model, ids, attn, max_new_tokens, temperature, eos, pad, greedy=False):
    """The decode loop for GPUs. The prompts are prefilled eagerly into a preallocated
    StaticCache (fixed shapes: the whole (B, P + C) attention mask is passed every step); each
    later token is one call of compiled_step (torch.compile, mode="reduce-overhead": a CUDA graph
    of the forward and the draw). The host asks the GPU whether every row has ended only every 8
    steps, each question being a sync. Tokens come from the same distribution as decode_loop's,
    by another draw (see draw), so not the same tokens for a seed."""
    B, P = ids.shape
    C = max_new_tokens
    if C == 0:
        return ids.new_empty(B, 0)
    cache = static_cache(model, B, P + C)
    mask = torch.cat([attn, attn.new_ones(B, C)], 1)                           # (B, P+C)
    logits, last = _prefill(model, ids, attn, cache, mask)
    eos_t = torch.tensor(eos, device=ids.device)
    token = draw(logits[:, -1].float(), temperature, greedy)
    done = torch.isin(token, eos_t)
    position = last + 1                                                        # (B, 1)
    cache_position = torch.full((1,), P, device=ids.device)
    out = ids.new_full((B, C), pad)                                            # (B, C)
    out[:, 0] = token
    step, kv = compiled_step(), _cache_kwarg(model)
    for t in range(1, C):
        if t % 8 == 0 and bool(done.all()):
            break
        # the last step's outputs were copied out: the graph may overwrite its output buffers
        torch.compiler.cudagraph_mark_step_begin()
        # the first step looks the graph up (and compiles a new shape); the others find it
        with _more_recompiles() if t == 1 else contextlib.nullcontext():
            new = step(model, token, done, position, cache_position, mask, cache, eos_t, kv,
                       temperature, greedy, pad)
        token, done, position, cache_position = (x.clone() for x in new)
        out[:, t] = token
    # the columns after the last row ended hold only pad
    return out[:, :int(completion_mask(out, eos).sum(1).max())]
