"""
Tests of the policy (model.py), offline on a CPU: the tokenizer, log-probs and entropy,
sampling with each sampler, and the bfloat16 decoding copy, on a tiny Qwen2 built from a
config (conftest.py).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import model as policy
import sampling


def test_tokenizer_round_trip_after_reload(tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    text = "cards 3 J 5; J,Q,K=10; make 10: 5*(3-J)"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tok.decode(ids) == text


def test_logprobs_match_model_cross_entropy(tiny64):
    model, tok = tiny64
    ids = torch.randint(3, len(tok), (2, 9))
    attn = torch.ones_like(ids)
    logp, ent = policy.token_logprobs(model, ids, attn, with_entropy=True)
    ce = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                           reduction="none")
    torch.testing.assert_close(logp, -ce)
    assert ((ent > 0).all() and (ent <= torch.log(torch.tensor(float(len(tok))))).all()
            and not ent.requires_grad)
    # left padding does not change a row's log-probs (positions follow the attention mask)
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids[:1]], 1)
    pattn = torch.cat([torch.zeros(1, 3, dtype=torch.long), attn[:1]], 1)
    torch.testing.assert_close(policy.token_logprobs(model, padded, pattn)[:, 3:], logp[:1])


def plain_logprobs(model, ids, attn, temperature, n):
    """token_logprobs as one vocabulary-sized batch: the formula the chunked code must equal."""
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids,
                   logits_to_keep=n + 1).logits
    z = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, -1)
    return (z.gather(-1, ids[:, -n:, None]).squeeze(-1) - lse,
            lse - (torch.softmax(z, -1) * z).sum(-1))


@pytest.mark.parametrize("dtype,amp",
                         [(torch.float64, False), (torch.float32, False), (torch.float32, True)])
def test_chunked_logprobs_equal_the_whole_batch_formula(tmp_path, monkeypatch, dtype, amp):
    """Values, entropies and gradients equal the one-batch formula's, with many chunks of uneven
    size (7 positions of a 500-token vocabulary each, 3 x 6 positions in all), at temperature 0.7,
    for the policy (autograd) and under no_grad (old and reference log-probs)."""
    path = policy.make_tiny_model(str(tmp_path / "m"), n_layer=2, n_embd=32, n_head=2,
                                  vocab_size=500)
    model, _ = policy.load_policy(path, dtype=dtype, amp=amp)
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (3, 10))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0  # a left-padded row
    w = torch.randn(3, 6, dtype=torch.float64)
    want_logp, want_ent = plain_logprobs(model, ids, attn, 0.7, 6)
    (want_logp.double() * w).sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(policy, "CHUNK_VALUES", 7 * 500)
    logp, ent = policy.token_logprobs(model, ids, attn, 0.7, n_last=6, with_entropy=True)
    (logp.double() * w).sum().backward()
    exact = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    torch.testing.assert_close(logp, want_logp, **exact)
    torch.testing.assert_close(ent, want_ent.detach(), **exact)
    # distinct values: not equal by being constant
    assert not ent.requires_grad and want_logp.std() > 0.1
    head = model.get_output_embeddings().weight
    for p, g in zip(model.parameters(), want_grads):
        # bfloat16 matmuls: each chunk's share of the output layer's gradient is rounded apart
        if amp and p is head:
            assert (p.grad - g).norm() < 1e-2 * g.norm()  # (both are 3e-3 from float64's in norm)
        else:
            torch.testing.assert_close(p.grad, g, **exact)
    assert max(g.abs().max() for g in want_grads) > 0
    with torch.no_grad():
        torch.testing.assert_close(policy.token_logprobs(model, ids, attn, 0.7, n_last=6),
                                   want_logp.detach(), **exact)


def test_logprobs_of_last_tokens_only(tiny64):
    model, tok = tiny64
    ids = torch.randint(3, len(tok), (2, 12))
    attn = torch.ones_like(ids)
    full_logp, full_ent = policy.token_logprobs(model, ids, attn, with_entropy=True)
    logp, ent = policy.token_logprobs(model, ids, attn, with_entropy=True, n_last=4)
    torch.testing.assert_close(logp, full_logp[:, -4:])
    torch.testing.assert_close(ent, full_ent[:, -4:])


def test_logprobs_at_temperature_are_the_distribution_sampled_from(warm_path):
    # 2000 first tokens drawn at tau = 0.5 from a trained model (a peaked distribution): their
    # frequencies match exp(token_logprobs at tau = 0.5), and not the log-probs at tau = 1.
    # (--sampler loop draws the same tokens as generate:
    # test_decode_loop_draws_the_same_tokens_as_generate; --sampler compiled:
    # test_compiled_sampler_draws_from_the_distribution_the_logprobs_score)
    model, tok = policy.load_policy(warm_path)
    prompt, N = "4 3 3; J,Q,K=10; 10=", 2000
    torch.manual_seed(0)
    roll = sampling.sample(model, tok, [prompt], G=N, temperature=0.5, max_new_tokens=1)
    first = roll.completions[:, 0]
    counts = torch.bincount(first, minlength=len(tok)).double() / N
    top = counts.argsort(descending=True)[:3]
    p_ids = tok([prompt], add_special_tokens=False,
                return_tensors="pt").input_ids.repeat(len(top), 1)
    ids = torch.cat([p_ids, top[:, None]], 1)
    for tau, should_match in ((0.5, True), (1.0, False)):
        p = policy.token_logprobs(model, ids, torch.ones_like(ids), temperature=tau,
                                  n_last=1)[:, 0].exp().double()
        sigma = (p * (1 - p) / N).sqrt()
        within = ((counts[top] - p).abs() < 5 * sigma + 1e-3).all().item()
        assert within == should_match, (tau, counts[top].tolist(), p.tolist())


def test_completion_mask_keeps_first_eos_when_pad_equals_eos():
    eos = 1
    comps = torch.tensor([[5, 7, eos, eos, eos], [5, 7, 8, 9, 6], [eos, eos, eos, eos, eos]])
    mask = policy.completion_mask(comps, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_sampling_shapes_and_stop(tiny64):
    model, tok = tiny64
    prompts = ["cards 1 2; make 3: ", "x"]
    every_token = list(range(len(tok)))  # any token ends the completion: one token each
    roll = sampling.sample(model, tok, prompts, G=3, max_new_tokens=6, eos=every_token)
    assert roll.completions.shape == (6, 1) and roll.mask.tolist() == [[1.0]] * 6
    assert (roll.ids.shape == (6, roll.prompt_ids.shape[1] + 1)
            and roll.attn[:, -1].tolist() == [1] * 6)
    never = [len(tok) + 5]  # no token ends it: all six run to max_new_tokens
    roll = sampling.sample(model, tok, prompts, G=3, max_new_tokens=6, eos=never)
    assert (roll.completions.shape == (6, 6) and roll.mask.sum().item() == 36
            and len(roll.texts) == 6)


@pytest.mark.parametrize("greedy", [True, False])
def test_decode_loop_draws_the_same_tokens_as_generate(tiny_path, greedy):
    model, tok = policy.load_policy(tiny_path)
    prompts = ["cards 3 J 5; J,Q,K=10; make 10: ", "ab", "make"]
    outs = {}
    for sampler in ("generate", "loop"):
        torch.manual_seed(3)
        outs[sampler] = sampling.sample(model, tok, prompts, G=4, temperature=0.7,
                                        max_new_tokens=10, greedy=greedy, sampler=sampler)
    assert torch.equal(outs["generate"].completions, outs["loop"].completions)
    assert (torch.equal(outs["generate"].mask, outs["loop"].mask)
            and outs["generate"].texts == outs["loop"].texts)


# the compiled sampler's tests run on a GPU too where there is one (CUDA graphs)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
def test_draw_samples_the_softmax_at_its_temperature(compiled, device):
    # the Gumbel-max draw against its distribution: 100,000 rows of 4 categories; chi-square (3
    # degrees of freedom) under 16.3 (p = 0.001) at the temperature asked, far above it for a
    # temperature 10% off; fresh random numbers at every call; greedy is the argmax
    N, p = 100_000, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    scores = p.log().float().expand(N, 4).contiguous().to(device)
    draw = torch.compile(sampling.draw, dynamic=False) if compiled else sampling.draw
    torch.manual_seed(0)
    for tau in (0.5, 1.0):
        tokens = draw(scores, tau, False)
        counts = torch.bincount(tokens.cpu(), minlength=4).double()
        chi2 = lambda t: (((counts - N * torch.softmax(p.log() / t, 0)) ** 2)
                          / (N * torch.softmax(p.log() / t, 0))).sum().item()
        assert chi2(tau) < 16.3 and chi2(1.1 * tau) > 100, (tau, counts.tolist())
    # two calls agree on a row with probability sum p^2 = 0.365 when their numbers are fresh
    assert 0.3 < (draw(scores, 1.0, False) != tokens).float().mean().item() < 0.7
    assert (draw(scores, 1.0, True) == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampler_decodes_generates_greedy_tokens_and_trims(warm_path, tiny_path, device):
    # its own path: a static cache reused across calls, prompts padded to a 64-column bucket (and
    # trimmed again), positions and cache positions at every step: greedy, on a trained model
    # whose next token depends on them, 40 tokens with no end are generate's tokens (float32)
    model, tok = policy.load_policy(warm_path, device=device)
    prompts = ["4 3 3; J,Q,K=10; 10=", "ab", "K Q 9 8 7 ; J,Q,K=11,12,13; 24="]
    never = [len(tok) + 5]
    g = sampling.sample(model, tok, prompts, G=2, max_new_tokens=40, eos=never, greedy=True)
    for _ in range(2):  # the second call reuses the cache and the graph
        c = sampling.sample(model, tok, prompts, G=2, max_new_tokens=40, eos=never, greedy=True,
                            sampler="compiled")
        assert (torch.equal(g.completions, c.completions) and torch.equal(g.mask, c.mask)
                and g.texts == c.texts)
        assert torch.equal(g.prompt_ids, c.prompt_ids) and torch.equal(g.prompt_mask, c.prompt_mask)
    assert len(set(g.texts)) > 1  # the prompts lead to different completions
    # rows end at different steps (checked every 8), the last within the 40: trimmed after it
    model, tok = policy.load_policy(tiny_path, device=device)
    ends = list(range(3, 33))  # a third of the vocabulary ends a row
    for seed in range(2):
        torch.manual_seed(seed)
        c = sampling.sample(model, tok, prompts, G=4, max_new_tokens=40, eos=ends,
                            sampler="compiled")
        lengths = c.mask.sum(1)
        assert lengths.min() < lengths.max() == c.completions.shape[1] < 40, lengths.tolist()
        after_end = c.completions[c.mask == 0]  # every row's tokens after its end are pad
        assert (after_end == tok.pad_token_id).all() and len(after_end) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampler_draws_fresh_numbers_at_every_step(tiny_path, device):
    # every logit 0: each token uniform over the vocabulary, whatever came before. Random numbers
    # reused from step to step (or call to call, as a replayed graph could) would repeat tokens
    model, tok = policy.load_policy(tiny_path, device=device)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    V, never = model.config.vocab_size, [model.config.vocab_size + 5]
    torch.manual_seed(0)
    first, second = (sampling.sample(model, tok, ["ab"], G=256, max_new_tokens=12, eos=never,
                                     sampler="compiled").completions.cpu() for _ in range(2))
    assert (first[:, 1:] == first[:, :-1]).float().mean() < 3 / V  # 1 / V expected
    assert (first == second).float().mean() < 3 / V
    counts = torch.bincount(first.flatten(), minlength=V).double()
    expected = first.numel() / V
    chi2 = ((counts - expected) ** 2 / expected).sum().item()  # V - 1 degrees of freedom
    assert chi2 < V - 1 + 5 * (2 * (V - 1)) ** 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampler_draws_from_the_distribution_the_logprobs_score(warm_path, device):
    # 500 rows x 16 tokens at tau = 0.5 from a trained model, every token but the first out of
    # the compiled graph. Under the distribution it was drawn from, a token's log-prob has mean
    # minus the entropy: mean(log p + H) over the graph's 7,500 tokens is 0 within 5 standard
    # errors at tau = 0.5 (each token scored given its own row's prefix), not at tau = 0.6 or 1
    model, tok = policy.load_policy(warm_path, device=device)
    model.eval()
    torch.manual_seed(0)
    roll = sampling.sample(model, tok, ["4 3 3; J,Q,K=10; 10="], G=500, temperature=0.5,
                           max_new_tokens=16, eos=[len(tok) + 5], sampler="compiled")
    assert roll.completions.shape == (500, 16)
    for tau, should_match in ((0.5, True), (0.6, False), (1.0, False)):
        with torch.no_grad():
            logp, H = policy.token_logprobs(model, roll.ids, roll.attn, temperature=tau,
                                            n_last=16, with_entropy=True)
        x = (logp + H)[:, 1:].double().flatten()  # the graph's tokens
        z = x.mean() / (x.std() / len(x) ** 0.5)
        assert (abs(z) < 5) == should_match, (tau, z.item())


def test_static_caches_are_kept_per_shape_for_their_graphs(tiny_path):
    # training rollouts, validation rollouts and evaluation take turns: each shape keeps its own
    # cache (a CUDA graph reads it at fixed addresses), the most recent STATIC_CACHES_KEPT of them
    model, _ = policy.load_policy(tiny_path)
    train = sampling.static_cache(model, 64, 576)
    assert sampling.static_cache(model, 16, 320) is not train
    assert sampling.static_cache(model, 64, 576) is train
    for batch in range(1, sampling.STATIC_CACHES_KEPT + 1):
        sampling.static_cache(model, batch, 64)
    assert sampling.static_cache(model, 64, 576) is not train  # the oldest went
    assert len(sampling._static_caches[model]) == sampling.STATIC_CACHES_KEPT


def test_the_bfloat16_decoding_copy_follows_the_weights_and_dies_with_the_model(tiny_path):
    import gc
    import weakref
    # --amp: the compiled sampler decodes with this copy
    model, tok = policy.load_policy(tiny_path, amp=True)
    twin = sampling.bf16_copy(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    # no autocast in the copy
    assert "forward" not in twin.__dict__ and getattr(model, "amp", False) and not twin.amp
    bf16 = lambda m: [p.detach().to(torch.bfloat16) for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), bf16(model)))
    with torch.no_grad():  # an optimizer step, as far as the copy can tell
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # stale until the next call ...
    assert not any(torch.equal(a, b) for a, b in zip(twin.parameters(), bf16(model)))
    assert sampling.bf16_copy(model) is twin  # ... which refreshes the same tensors
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), bf16(model)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    alive = weakref.ref(twin)
    del model, twin
    gc.collect()
    assert alive() is None


def test_sampling_ignores_the_checkpoints_generation_settings(tmp_path, tiny_path):
    # a checkpoint whose generation_config.json sets processors (as Qwen2.5-Instruct's does):
    # rollouts must still be drawn from softmax(logits / temperature), the distribution we score
    from transformers import GenerationConfig
    model, tok = policy.load_policy(tiny_path)
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=0.2, top_k=3, top_p=0.5, min_p=0.2,
        repetition_penalty=1.8, no_repeat_ngram_size=2,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok = policy.load_policy(str(tmp_path / "m"))
    assert model.generation_config.repetition_penalty == 1.8 and model.generation_config.top_k == 3
    prompts = ["4 3 3; J,Q,K=10; 10=", "ab"]
    outs = {}
    for sampler in ("generate", "loop"):
        for greedy in (False, True):
            torch.manual_seed(5)
            outs[sampler, greedy] = sampling.sample(
                model, tok, prompts, G=8, temperature=0.9, max_new_tokens=12,
                greedy=greedy, sampler=sampler, eos=[tok.eos_token_id])
    for greedy in (False, True):
        assert torch.equal(outs["generate", greedy].completions, outs["loop", greedy].completions)
    # the file's settings are real: generate() left to them draws other tokens ...
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(5)
    raw = model.generate(input_ids=enc.input_ids.repeat_interleave(8, 0),
                         attention_mask=enc.attention_mask.repeat_interleave(8, 0),
                         max_new_tokens=12, temperature=0.9)
    ours = outs["generate", False].completions
    assert (raw.shape[1] - enc.input_ids.shape[1] != ours.shape[1]
            or not torch.equal(raw[:, enc.input_ids.shape[1]:], ours))
    # ... and ours reach outside the top 3 of the model's next-token distribution, which top_k=3
    # forbids
    first = ours[:8, 0]
    ids = tok(prompts[:1], return_tensors="pt", add_special_tokens=False).input_ids
    top3 = model(ids).logits[0, -1].topk(3).indices
    assert not torch.isin(first, top3).all()


def test_pad_is_no_padding_idx_and_gets_input_gradient(tiny_path):
    # the policy can sample <pad>; as the embedding's padding_idx its input row would get no
    # gradient
    model, tok = policy.load_policy(tiny_path, dtype=torch.float64)
    assert model.get_input_embeddings().padding_idx is None
    ids = torch.tensor([[5, tok.pad_token_id, 7, 9]])
    model.zero_grad()
    policy.token_logprobs(model, ids, torch.ones_like(ids))[:, -1].sum().backward()
    assert model.get_input_embeddings().weight.grad[tok.pad_token_id].abs().sum() > 0


