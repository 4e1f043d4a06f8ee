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
    roll = policy.sample(model, tok, [prompt], G=N, temperature=0.5, max_new_tokens=1)
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
    roll = policy.sample(model, tok, prompts, G=3, max_new_tokens=6, eos=every_token)
    assert roll.completions.shape == (6, 1) and roll.mask.tolist() == [[1.0]] * 6
    assert (roll.ids.shape == (6, roll.prompt_ids.shape[1] + 1)
            and roll.attn[:, -1].tolist() == [1] * 6)
    never = [len(tok) + 5]  # no token ends it: all six run to max_new_tokens
    roll = policy.sample(model, tok, prompts, G=3, max_new_tokens=6, eos=never)
    assert (roll.completions.shape == (6, 6) and roll.mask.sum().item() == 36
            and len(roll.texts) == 6)


@pytest.mark.parametrize("greedy", [True, False])
def test_decode_loop_draws_the_same_tokens_as_generate(tiny_path, greedy):
    model, tok = policy.load_policy(tiny_path)
    prompts = ["cards 3 J 5; J,Q,K=10; make 10: ", "ab", "make"]
    outs = {}
    for sampler in ("generate", "loop"):
        torch.manual_seed(3)
        outs[sampler] = policy.sample(model, tok, prompts, G=4, temperature=0.7, max_new_tokens=10,
                                      greedy=greedy, sampler=sampler)
    assert torch.equal(outs["generate"].completions, outs["loop"].completions)
    assert (torch.equal(outs["generate"].mask, outs["loop"].mask)
            and outs["generate"].texts == outs["loop"].texts)


def test_compiled_sampler_ends_rows_and_trims_like_generate(tiny_path):
    # its own path: a static cache reused across calls, prompts padded to a 64-column bucket (and
    # trimmed again), the end of all rows checked every 8 steps (and the pad-only steps trimmed);
    # greedy, it decodes generate's tokens (float32: no rounding to tell them apart)
    model, tok = policy.load_policy(tiny_path)
    prompts = ["cards 3 J 5; J,Q,K=10; make 10: ", "ab", "make"]
    ends = list(range(3, 33))  # a third of the vocabulary ends a row
    torch.manual_seed(3)
    g = policy.sample(model, tok, prompts, G=4, max_new_tokens=40, eos=ends, greedy=True)
    for _ in range(2):  # the second call reuses the cache and the graph
        c = policy.sample(model, tok, prompts, G=4, max_new_tokens=40, eos=ends, greedy=True,
                          sampler="compiled")
        assert (torch.equal(g.completions, c.completions) and torch.equal(g.mask, c.mask)
                and g.texts == c.texts)
        assert torch.equal(g.prompt_ids, c.prompt_ids) and torch.equal(g.prompt_mask, c.prompt_mask)
    for seed in range(2):  # sampled: rows end at different steps, the last within the 40
        torch.manual_seed(seed)
        c = policy.sample(model, tok, prompts, G=4, max_new_tokens=40, eos=ends,
                          sampler="compiled")
        lengths = c.mask.sum(1)
        assert lengths.min() < lengths.max() == c.completions.shape[1] < 40, lengths.tolist()
        after_end = c.completions[c.mask == 0]  # every row's tokens after its end are pad
        assert (after_end == tok.pad_token_id).all() and len(after_end) > 0


def test_compiled_sampler_draws_from_the_distribution_the_logprobs_score(warm_path):
    # the compiled sampler draws by the Gumbel-max trick, not generate's multinomial: 2000 rows
    # at tau = 0.5 from a trained model (a peaked distribution); the second tokens come out of
    # the compiled graph. Their frequencies match exp(log-probs at tau = 0.5) given each row's
    # first token, and not the log-probs at tau = 1
    model, tok = policy.load_policy(warm_path)
    model.eval()
    prompt, N = "4 3 3; J,Q,K=10; 10=", 2000
    torch.manual_seed(0)
    roll = policy.sample(model, tok, [prompt], G=N, temperature=0.5, max_new_tokens=2,
                         eos=[len(tok) + 5], sampler="compiled")
    assert roll.completions.shape == (N, 2)
    second = roll.completions[:, 1]
    counts = torch.bincount(second, minlength=len(tok)).double()
    top = counts.argsort(descending=True)[:4]
    assert counts[top[1]] > 50  # several tokens are likely: a test of frequencies, not an argmax
    ids = torch.cat([roll.prompt_ids, roll.completions[:, :1]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].double()
    for tau, should_match in ((0.5, True), (1.0, False)):
        p = torch.softmax(logits / tau, -1)[:, top]  # (N, 4): each row's own probabilities
        sigma = (p * (1 - p)).sum(0).sqrt()
        within = ((counts[top] - p.sum(0)).abs() < 5 * sigma + 2).all().item()
        assert within == should_match, (tau, counts[top].tolist(), p.sum(0).tolist())


def test_static_caches_are_kept_per_shape_for_their_graphs(tiny_path):
    # training rollouts, validation rollouts and evaluation take turns: each shape keeps its own
    # cache (a CUDA graph reads it at fixed addresses), the most recent STATIC_CACHES_KEPT of them
    model, _ = policy.load_policy(tiny_path)
    train = policy.static_cache(model, 64, 576)
    assert policy.static_cache(model, 16, 320) is not train
    assert policy.static_cache(model, 64, 576) is train
    for batch in range(1, policy.STATIC_CACHES_KEPT + 1):
        policy.static_cache(model, batch, 64)
    assert policy.static_cache(model, 64, 576) is not train  # the oldest went
    assert len(policy._static_caches[model]) == policy.STATIC_CACHES_KEPT


def test_the_bfloat16_decoding_copy_follows_the_weights_and_dies_with_the_model(tiny_path):
    import gc
    import weakref
    # --amp: the compiled sampler decodes with this copy
    model, tok = policy.load_policy(tiny_path, amp=True)
    twin = policy.bf16_copy(model)
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
    assert policy.bf16_copy(model) is twin  # ... which refreshes the same tensors
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
            outs[sampler, greedy] = policy.sample(
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


