"""
Tests of memory.py, offline on a CPU: the live-tensor accounting, the chunked log-probs' bound
on vocabulary-sized values, and the replay of a step against the real loop at the same sizes.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import memory
import model as policy
import sampling
import train


def test_live_bytes_counts_storages_once_and_frees_them():
    with memory.LiveBytes() as tracker:
        a = torch.zeros(1000, 250)                # 1,000,000 bytes
        view = a[10:]                             # a view: no new bytes
        b = a + 1                                 # 1,000,000 more
        del b
        c = torch.ones(500)                       # 2,000 bytes
    assert tracker.total == 1_002_000 and tracker.peaks["setup"][0] == 2_000_000
    del a
    assert tracker.total == 1_002_000  # the view keeps the storage alive
    del view
    assert tracker.total == 2_000 and c.numel() == 500


def test_tagging_a_tensor_corrects_the_peaks_it_was_live_in():
    with memory.LiveBytes() as tracker:
        with tracker.during("one"):
            kept = torch.zeros(1000)              # 4,000 bytes, live at this phase's peak
            tmp = torch.zeros(500)
            del tmp
        with tracker.during("two"):
            torch.zeros(10)
    tracker.tag([kept], "weights")
    assert tracker.peaks["one"][1] == {"activations": 2000, "weights": 4000}
    assert tracker.peaks["two"][1]["weights"] == 4000 and tracker.by_kind["weights"] == 4000


def test_chunked_logprobs_hold_one_chunk_of_logits(tmp_path, monkeypatch):
    """Forward and backward over 4 x 200 positions of a 4,000-token vocabulary: the one-batch
    formula holds several (800, 4000) float32 tensors at once (12.8 MB each); the chunked code,
    at 50 positions a chunk, never more than a few chunks (0.8 MB each; 5.3 of them measured)."""
    from test_model import plain_logprobs
    path = policy.make_tiny_model(str(tmp_path / "m"), n_layer=1, n_embd=32, n_head=2,
                                  vocab_size=4000, max_len=256)
    model, _ = policy.load_policy(path)
    ids = torch.randint(3, 4000, (4, 201))
    attn = torch.ones_like(ids)
    monkeypatch.setattr(policy, "CHUNK_VALUES", 50 * 4000)
    whole, chunk = 800 * 4000 * 4, 50 * 4000 * 4
    peaks = {}
    for name, fn in [("plain", lambda: plain_logprobs(model, ids, attn, 1.0, 200)[0]),
                     ("chunked", lambda: policy.token_logprobs(model, ids, attn, n_last=200,
                                                               with_entropy=True)[0])]:
        with memory.LiveBytes(vocab=4000) as tracker:
            fn().sum().backward()
        peaks[name] = max(parts.get("logits", 0) for _, parts, _ in tracker.peaks.values())
        model.zero_grad(set_to_none=True)
    assert peaks["plain"] >= 2 * whole
    assert peaks["chunked"] <= 7 * chunk < whole / 2


@pytest.mark.parametrize("precision", ["float32, generate", "amp, compiled sampler, KL"])
def test_the_replay_of_a_step_agrees_with_the_real_loop_phase_by_phase(tmp_path, monkeypatch,
                                                                        precision):
    """The loop itself (train.main, 2 steps: warm-up, then an amft step with its meta-gradient)
    counted by the tracker on real tensors, each phase apart, against memory.step_memory at the
    same sizes under FakeTensorMode: in float32 with generate (the CPU recipe), and with amp, the
    compiled sampler (its bfloat16 copy and static KV cache; run eagerly, in both) and a KL
    reference. Rollouts run to full length in both."""
    shape = dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=20000, tie_word_embeddings=True)
    path = policy.make_tiny_model(str(tmp_path / "m"), n_layer=1, n_embd=64, n_head=2,
                                  vocab_size=20000, max_len=512)
    kw = dict(recipe="pretrained", task="general-points", steps=2, warmup=1, batch_size=2,
              group_size=2, max_new_tokens=32, micro_batch=4, meta_every=1, meta_grad="autograd",
              val_prompts=2, skip_test=True, device="cpu", save_every=0)
    if precision != "float32, generate":
        kw.update(amp=True, sampler="compiled", beta=0.1)
        # the same decode loop, not compiled
        monkeypatch.setattr(sampling, "compiled_step", lambda: sampling._decode_step)
    # a reward of 1 for every other completion: groups differ, so the meta-gradient is not silent
    import itertools
    import data
    counter = itertools.count()
    monkeypatch.setattr(data, "reward",
                        lambda row, text, verifier="builtin": float(next(counter) % 2))
    # no token ends a rollout: every one runs its 32 tokens, as the replay's do
    monkeypatch.setattr(policy, "eos_ids", lambda *_, **__: [20000 + 7])
    tracker = memory.LiveBytes(vocab=20000)
    phases = {"rl_backward": "RL backward", "sft_backward": "SFT backward",
              "meta_gradient": "meta-gradient"}
    # each phase of the real loop counted apart, as the replay counts it
    for name, phase in phases.items():
        def counted(*args, _f=getattr(train, name), _phase=phase, **kw_):
            with tracker.during(_phase, grads={"RL backward": "g_RL",
                                               "SFT backward": "g_SFT"}.get(_phase, "grad U")):
                return _f(*args, **kw_)
        monkeypatch.setattr(train, name, counted)
    with tracker:
        train.main(train.Config(model=path, out=str(tmp_path / "run"), **kw))
    cfg = train.Config(model=path, **kw)
    train.resolve(cfg, cuda=False)
    # the plain prompt's characters at most (padded to a multiple of 64 by the compiled sampler)
    replay = memory.step_memory(shape, cfg, prompt_tokens=277 + 63 * cfg.amp, demo_tokens=78)
    for phase in phases.values():
        real, replayed = tracker.peaks[phase][0], replay.peaks[phase][0]
        assert 0.95 * real <= replayed <= 1.1 * real, (phase, real, replayed)
    held = replay.peaks["meta-gradient"][1]  # both gradients, whole, through the meta phase
    assert held["g_SFT"] == held["g_RL"] == held["weights"] > 20000 * 64 * 4
    if cfg.amp:
        assert (replay.peaks["RL backward"][1]["bf16 copy"] > 0
                and replay.peaks["RL backward"][1]["KL reference"] > 0)
