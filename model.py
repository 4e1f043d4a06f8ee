"""
The policy: load a causal LM and its tokenizer, format prompts, and compute per-token log-probs
and entropies (sampling.py draws completions from it).

Every model goes through `load_policy`, which calls `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained`: a hub id, a local directory, or a short alias such as
`Qwen2.5-0.5B`. The default tiny model is no exception: `make_tiny_model` builds a small
Qwen2 (the architecture of Qwen2.5) with random weights and a character-level tokenizer,
saves both with `save_pretrained`, and the trainer loads that folder like any other.

Log-probs (one function for policy, old and reference), computed a chunk of positions at a
time so that no vocabulary-sized batch of logits is ever held whole:
    logp[b, t] = log softmax(logits[b, t] / temperature)[ids[b, t + 1]]
    entropy[b, t] = logsumexp(z) - sum softmax(z) * z,   z = logits[b, t] / temperature
"""
import contextlib
import copy
import os
import socket
import tempfile
import types
import urllib.parse
from typing import NamedTuple

import torch
import torch.utils.checkpoint

QWEN_SIZES = ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"]
ALIASES = {f"Qwen2.5-{s}{i}": f"Qwen/Qwen2.5-{s}{i}" for s in QWEN_SIZES for i in ("", "-Instruct")}
TINY_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII and newline


# Qwen2.5-0.5B's shape, for benchmarks without the hub: random weights, our char tokenizer
QWEN_0_5B = dict(n_layer=24, n_embd=896, n_head=14, n_kv_head=2, n_inner=4864, vocab_size=151936,
                 max_len=32768)


def make_tiny_model(path: str, n_layer=4, n_embd=128, n_head=4, max_len=128, seed=0, n_kv_head=None,
                    n_inner=None, vocab_size=None):
    """Write a randomly initialised tiny Qwen2 and a character-level Qwen2 tokenizer to `path`.
    The tokenizer is Qwen2's own class (byte-level BPE) with one token per character and no
    merges, so it saves, reloads and decodes exactly like Qwen2.5's. make_tiny_model(path,
    **QWEN_0_5B) gives Qwen2.5-0.5B's shape (its vocabulary is larger than the tokenizer's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
    byte_level = {" ": "\u0120", "\n": "\u010a"}  # how byte-level BPE spells space and newline
    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [byte_level.get(c, c) for c in TINY_CHARS])}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<unk>", eos_token="<eos>",
                         pad_token="<pad>")
    config = Qwen2Config(vocab_size=vocab_size or len(vocab), hidden_size=n_embd,
                         intermediate_size=n_inner or 4 * n_embd,
                         num_hidden_layers=n_layer, num_attention_heads=n_head,
                         num_key_value_heads=n_kv_head or n_head, max_position_embeddings=max_len,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id)
    # no pad_token_id in the model's config: it would make <pad> the embedding's padding_idx, whose
    # row gets no gradient from the input side, yet the policy can sample <pad> like any token
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@contextlib.contextmanager
def no_progress_bars():
    """transformers' "Loading weights" / "Writing model shards" bars, off for the block: they say
    nothing about a model we write ourselves or a checkpoint (downloads keep theirs)."""
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: the hub is not to be tried at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) takes a connection within `timeout` seconds.
    Without this check an offline machine spends about 50 s in retries before its error. False
    under HF_HUB_OFFLINE=1; True behind a proxy (which we cannot probe)."""
    if hub_offline():
        return False
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


OFFLINE_HINT = ("the hub is unreachable (set HF_HUB_OFFLINE=1 to use the local cache without "
                "trying it)")

# built from a config with random weights (seeded)
BUILT_IN = {"tiny": {}, "random-0.5b": QWEN_0_5B}


def load_policy(name_or_path: str, dtype=torch.float32, device="cpu", lora_r=0, grad_ckpt=False,
                seed=0, amp=False):
    """(model, tokenizer) from a hub id, an alias, a local folder, or a built-in name ('tiny',
    'random-0.5b': written by make_tiny_model to a temporary folder, loaded from it the same way,
    and the folder removed), optionally wrapped in LoRA adapters (peft) and with gradient
    checkpointing. amp=True is mixed precision: every forward (sampling, log-probs, evaluation)
    computes in bfloat16 under torch.autocast while the weights, gradients and optimizer state stay
    in `dtype` (float32): bfloat16 weights would round away an update of lr 1e-6 on 98% of them.
    Raises ValueError with a one-line message when the model cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if name_or_path in BUILT_IN:
        with tempfile.TemporaryDirectory(prefix="amft-tiny-") as tmp, no_progress_bars():
            make_tiny_model(tmp, seed=seed, **BUILT_IN[name_or_path])
            return load_policy(tmp, dtype, device, lora_r, grad_ckpt, amp=amp)
    name = ALIASES.get(name_or_path, name_or_path)
    if lora_r and os.path.isfile(os.path.join(name, "adapter_config.json")):
        raise ValueError("resuming a LoRA run is not supported yet; start again from its merged "
                         "model/ folder")
    cache_only = not os.path.isdir(name) and not hub_reachable()  # offline: the cache, at once
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=cache_only)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=cache_only)
    except (OSError, ValueError, KeyError) as e:
        if cache_only:
            raise ValueError(f"cannot load model {name_or_path!r}: it is not in the local cache "
                             f"and {OFFLINE_HINT}; or pass a local folder") from None
        where = "local folder" if os.path.isdir(name) else "hub id"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load model {name_or_path!r} as a {where}: {first}") from None
    if dtype == torch.float64:
        _norms_in_float64(model)
    if tok.pad_token is None:  # Qwen base and many others: pad with EOS, masks never read pad
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts end at the same column, so completions start together
    return prepare(model, device, lora_r, grad_ckpt, amp), tok


def prepare(model, device="cpu", lora_r=0, grad_ckpt=False, amp=False):
    """A loaded model made ready to train as the flags say: LoRA adapters, gradient checkpointing,
    bfloat16 autocast (amp), on `device`. (load_policy's last step; memory.py's too, on models
    built without weights.)"""
    embed = model.get_input_embeddings()
    if getattr(embed, "padding_idx", None) is not None:
        embed.padding_idx = None  # pad can be sampled: its embedding row must get its gradient too
    if lora_r:
        try:
            import peft
        except ImportError:
            raise ValueError("--lora-r needs peft: pip install peft") from None
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r,
                                                           target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
    if grad_ckpt:
        set_checkpointing(model, True)
    if amp:  # bound to the model, so a deepcopy (the KL reference) rebinds it to the copy
        model.forward = types.MethodType(
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)(type(model).forward),
            model)
        model.amp = True
    return model.to(device)


def set_checkpointing(model, on: bool):
    """Gradient (activation) checkpointing on or off, under the name this transformers has
    (`gradient_checkpointing_*` is deprecated from 5.x on)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}) if on \
            else model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}) if on \
            else model.gradient_checkpointing_disable()


def copy_with_weights(model, weight):
    """A deepcopy of the model whose parameters are weight(p), frozen, and whose buffers are
    clones: each tensor of the copy is made once, by `weight`, and no tensor is deepcopied (a
    deepcopy of a float32 model before a cast to bfloat16 would hold a float32 copy first)."""
    memo = {id(p): torch.nn.Parameter(weight(p.detach()), requires_grad=False)
            for p in model.parameters()}
    memo.update({id(b): b.clone() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def frozen_copy(model):
    """A frozen reference policy for the KL term."""
    return copy_with_weights(model, torch.clone).eval()


def _norms_in_float64(model):
    """RMSNorm in transformers computes in float32, which in a float64 model rounds every
    activation to float32. --dtype float64 exists for exact numerical checks (the meta-gradient
    tests), so there the norms keep float64: same formula, no cast."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                              + self.variance_epsilon))
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = forward.__get__(module)


TURN_ENDS = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"]  # Qwen/ChatML, Llama 3, Gemma


def use_chat(tok, name: str, mode: str) -> bool:
    """Instruction models get their chat template; base models a plain prompt. 'auto' decides
    by the name (Qwen2.5 *base* tokenizers also ship a chat template)."""
    if mode == "auto":
        return bool(tok.chat_template) and any(w in name.lower() for w in CHAT_WORDS)
    return mode == "on"


# in a model's name: an instruction model (chat template, the instruct recipe)
CHAT_WORDS = ("instruct", "chat", "-it")
# a base model's prompt in words ends in a cue to answer: without one it may go on writing
# questions of its own
ANSWER_CUE = "Question:\n{}\nAnswer:\nLet's think step by step.\n"


def format_prompt(tok, text: str, chat: bool, cue: bool = False) -> str:
    """The prompt the model sees: through the chat template (chat), as a question followed by
    an answer cue (cue: a base model and a prompt in words), or as it is (the compact prompt)."""
    if chat:
        return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    return ANSWER_CUE.format(text) if cue else text


def end_id(tok, chat: bool) -> int:
    """The token a demonstration ends with: the chat template's end of turn, or EOS."""
    vocab = tok.get_vocab()
    turn_end = [vocab[t] for t in TURN_ENDS if t in vocab and t in (tok.chat_template or "")]
    return turn_end[0] if chat and turn_end else tok.eos_token_id


def eos_ids(tok, model, chat: bool = False):
    """Token ids that end a completion: EOS, the model's generation EOS, and with a chat
    template its end-of-turn token (for Qwen base models pad == EOS == <|endoftext|>)."""
    ids = {tok.eos_token_id, end_id(tok, chat)}
    gen = getattr(model.generation_config, "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------- masks
def completion_mask(completions: torch.Tensor, eos: list) -> torch.Tensor:
    """(N, T) 1 up to and including the first EOS, 0 after; all 1 if no EOS was sampled.
    Built from positions, never from pad values (pad may equal EOS)."""
    is_eos = torch.isin(completions, torch.tensor(eos, device=completions.device))
    T = completions.shape[1]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1),
                        torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    return (torch.arange(T, device=completions.device)[None, :] <= first[:, None]).float()


# ---------------------------------------------------------------------------- log-probs
# vocabulary-sized values (logits) token_logprobs holds at once: 128 MiB in float32
CHUNK_VALUES = 2**25


@contextlib.contextmanager
def hidden_states_out(model):
    """Inside the block the model's forward returns its last hidden states where it returned
    logits: its output layer (lm_head) is swapped for an identity and handed to the caller.
    The forward stays the model's own (autocast under --amp, LoRA, FSDP's hooks)."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head)
    parent, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent)
    setattr(parent, attr, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(parent, attr, head)


def _chunk_logprobs(h, weight, bias, targets, temperature, with_entropy):
    """(logp, entropy or None) of one chunk of positions: h (n, H) -> logits (n, V) by the output
    layer's weight and bias, given as tensors so that a recompute in backward uses these very
    ones (also when they are functions of other tensors, as under torch.func.functional_call)."""
    logits = torch.nn.functional.linear(h, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (n, V)
    lse = torch.logsumexp(z, -1)                                                   # (n,)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse                       # (n,)
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        return logp, lse - (torch.softmax(z, -1) * z).sum(-1)


def token_logprobs(model, ids, attn, temperature: float = 1.0, n_last=None, with_entropy=False):
    """Log-probs of the last n_last tokens of each row given their prefix, (N, n_last), in
    float32 (float64 for a float64 model); with_entropy=True returns (logp, entropy), the
    entropy of each of those next-token distributions, without an autograd graph (it is only
    ever a metric or a stop-gradient weight).

    The logits are never materialised whole: the model returns its last hidden states (only the
    n_last + 1 positions read), and the output layer runs on CHUNK_VALUES / V positions at a
    time. With gradients on, each chunk is checkpointed: its backward recomputes that chunk's
    logits rather than keeping them, so forward and backward alike hold one chunk of
    vocabulary-sized values (one extra output-layer matmul per token in backward)."""
    n = ids.shape[1] - 1 if n_last is None else n_last
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate()
    with hidden_states_out(model) as head:
        # (N, n+1, H); scoring needs no KV cache
        hidden = model(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                       logits_to_keep=n + 1, use_cache=False).logits
    # each row's last position predicts a token past the sequence (target 0, dropped below): it is
    # computed anyway so that the products have the shapes they have inside the model's forward
    h = hidden.reshape(-1, hidden.shape[-1])                             # (N*(n+1), H)
    targets = torch.nn.functional.pad(ids[:, -n:], (0, 1)).reshape(-1)   # (N*(n+1),)
    rows = max(1, CHUNK_VALUES // model.config.vocab_size)
    # the output layer computes as it would inside the model's forward, but each chunk casts the
    # weight itself (no cache), so the chunks' gradients of it add up in float32
    amp = getattr(model, "amp", False)
    pieces = []
    with (torch.autocast(ids.device.type, dtype=torch.bfloat16, cache_enabled=False) if amp
          else contextlib.nullcontext()):
        for i in range(0, len(h), rows):
            args = (h[i:i + rows], head.weight, head.bias, targets[i:i + rows], temperature,
                    with_entropy)
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args,
                                                            use_reentrant=False)
                          if torch.is_grad_enabled() else _chunk_logprobs(*args))
    logp = torch.cat([p[0] for p in pieces]).view(len(ids), n + 1)[:, :-1]
    if not with_entropy:
        return logp
    return logp, torch.cat([p[1] for p in pieces]).view(len(ids), n + 1)[:, :-1]


class DemoBatch(NamedTuple):
    ids: torch.Tensor    # (B, T) prompt + demonstration + end token, left-padded
    attn: torch.Tensor   # (B, T)
    mask: torch.Tensor   # (B, D) 1 on demonstration tokens and the end token, over the last D
                         # positions


def sft_batch(tok, prompts: list, demos: list, end: int, device) -> DemoBatch:
    """Prompt + demonstration + end token per row, left-padded, with the loss mask over the last
    D = longest demonstration positions, aligned with token_logprobs(..., n_last=D)."""
    rows, n_demo = [], []
    for p, d in zip(prompts, demos):
        d_ids = tok(d, add_special_tokens=False).input_ids + [end]
        rows.append(tok(p, add_special_tokens=False).input_ids + d_ids)
        n_demo.append(len(d_ids))
    T, D = max(len(r) for r in rows), max(n_demo)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), D)
    for b, (r, n) in enumerate(zip(rows, n_demo)):
        ids[b, T - len(r):], attn[b, T - len(r):] = torch.tensor(r), 1
        loss_mask[b, D - n:] = 1
    return DemoBatch(ids.to(device), attn.to(device), loss_mask.to(device))
