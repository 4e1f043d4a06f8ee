"""
Tests of the training loop (train.py) as the algorithm runs it: every method's rule, the
meta-gradient and the mu controller inside the loop, random streams, micro-batches, the
srft/luffy groups, and exact resume. The runs call train.main in this process (`run` in
conftest.py); the command line, checkpoints' safety and the tools are tested in test_cli.py.
"""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import amft
import data
import model as policy
import sampling
import train

from conftest import HERE, SMALL, WARM_TASK, run


@pytest.mark.parametrize("method", list(amft.METHODS))
def test_every_method_runs_and_uses_its_rule(tmp_path, warm_path, method):
    summary, lines, _ = run(tmp_path, model=warm_path, method=method, steps=4, warmup=2,
                            meta_every=1,
                            **dict(SMALL, group_size=4, max_new_tokens=16, val_prompts=16),
                            **WARM_TASK)
    rule = amft.METHODS[method]
    main = [m for m in lines if m["phase"] == "main"]
    assert len(main) == (2 if rule.warmup else 4) and all(m["w_rl"] == 0 and m["w_sft"] == 1
                                                          for m in lines[:4 - len(main)])
    for m in main:
        expect = amft.loss_weights(rule, 0.8 if m["mu"] is None else m["mu"], m["entropy"] or 0.0)
        assert (m["w_rl"], m["w_sft"]) == pytest.approx(expect)
        assert ((m["rl_loss"] is not None) == rule.rl
                and (m["sft_loss"] is not None) == (rule.sft or not rule.rl))
        assert ((m["meta_grad"] is not None) == rule.meta_term
                and (m["mu"] is not None) == rule.mixes)
    if rule.mixes:  # mu moves exactly when one of the controller's terms is on and says so
        moved = any(m["mu"] != 0.8 for m in main)
        signal_ = any(m["meta_grad"] for m in main) or (
            rule.entropy_term and any(m["entropy"] != m["H_target"] for m in main))
        assert moved == signal_ and moved == (method != "fixed-mix")


def test_loop_reads_switches_not_method_names():
    import re
    # the loop and its door
    source = "".join(open(os.path.join(HERE, f)).read() for f in ("train.py", "settings.py"))
    compared = re.findall(r"cfg\.method\s*(?:==|!=|in\b)[^,\n]*", source)
    # the only one: checking the flag at the door
    assert compared == ["cfg.method in amft.METHODS"], compared


def test_a_silent_meta_gradient_is_counted_and_moves_nothing(tmp_path, tiny_path):
    # the random tiny model earns no reward: every validation group's rewards are equal (all 0), so
    # each dU/dmu due is silent; it is counted, logged as none, and mu moves by the entropy term
    # alone
    summary, lines, _ = run(tmp_path, model=tiny_path, method="amft", steps=4, warmup=1,
                            meta_every=1, **SMALL)
    main = [m for m in lines if m["phase"] == "main"]
    assert len(main) == 3 and all(m["val_reward"] == 0 and m["meta_grad"] is None for m in main)
    assert [m["meta_silent"] for m in main] == [1, 2, 3] and summary["meta_silent"] == 3
    expected = 0.8
    for m in main:  # mu's moves are the entropy term's, nothing more
        expected = min(max(expected + 0.01 * (m["H_target"] - m["entropy"]), 0.05), 0.95)
        assert m["mu"] == pytest.approx(expected)
    assert main[-1]["mu"] != 0.8


def test_meta_gradient_in_the_loop_is_nonzero_and_autograd_equals_fd_float64(tmp_path, warm_path):
    # a model that solves some hands: validation rewards differ within groups, so dU/dmu != 0
    common = dict(model=warm_path, method="amft-no-entropy", dtype="float64", warmup=0, steps=1,
                  meta_every=1, batch_size=4, group_size=4, val_prompts=16, **WARM_TASK)
    first = {}
    # micro: U in chunks of 5
    for name, extra in [("autograd", {}), ("fd", {}), ("autograd-micro", dict(micro_batch=5))]:
        _, lines, _ = run(tmp_path, name, **common, meta_grad=name.split("-")[0], **extra)
        first[name] = lines[0]
    exact = first["autograd"]["meta_grad"]
    assert 0 < first["autograd"]["val_reward"] < 1 and exact != 0 and first["autograd"]["mu"] != 0.8
    assert abs(first["fd"]["meta_grad"] - exact) <= 1e-6 * abs(exact)
    assert first["autograd-micro"]["meta_grad"] == pytest.approx(exact, rel=1e-9)


def test_non_finite_entropy_loss_and_meta_gradient_in_the_loop(tmp_path, warm_path, monkeypatch):
    calls = {"rl": 0, "meta": 0}
    real_rl, real_meta = train.rl_backward, train.meta_gradient

    def rl_backward(*args, **kw):  # main step 2: entropy NaN; main step 4: loss NaN
        out = real_rl(*args, **kw)
        calls["rl"] += 1
        out["entropy"] = math.nan if calls["rl"] == 2 else out["entropy"]
        out["loss"] = math.nan if calls["rl"] == 4 else out["loss"]
        return out

    # main step 3: dU/dmu NaN (none is computed at step 2: its entropy is NaN)
    def meta_gradient(*args, **kw):
        dU, val_reward = real_meta(*args, **kw)
        calls["meta"] += 1
        return (math.nan if calls["meta"] == 2 else dU), val_reward
    monkeypatch.setattr(train, "rl_backward", rl_backward)
    monkeypatch.setattr(train, "meta_gradient", meta_gradient)
    summary, lines, out = run(tmp_path, model=warm_path, method="amft", steps=7, warmup=1,
                              meta_every=1, **dict(SMALL, group_size=4, val_prompts=8),
                              **WARM_TASK)  # enough samples: never silent
    mu = [m["mu"] for m in lines]
    assert (len(lines) == 7 and all(math.isfinite(x) for x in mu)
            and math.isfinite(summary["final_mu"]))
    assert mu[2] == mu[1] and mu[3] == mu[1] and mu[4] == mu[1] and mu[5] != mu[4]
    assert ([m["mu_rejected"] for m in lines[1:]] == [0, 1, 2, 3, 3, 3]
            and summary["mu_rejected"] == 3)
    # no meta-gradient on a bad step
    assert lines[4]["skipped"] and not lines[5]["skipped"] and lines[4]["meta_grad"] is None
    # NaN is written null
    assert (lines[2]["meta_grad"] is None and lines[3]["meta_grad"] is None
            and calls["meta"] == 4)
    # strict JSON: no bare NaN or Infinity
    for name in ("metrics.jsonl", "config.json", "summary.json"):
        text = (out / name).read_text()
        assert all(json.loads(line, parse_constant=lambda c: pytest.fail(f"{name}: {c}"))
                   for line in (text.splitlines() if name.endswith("l") else [text]))
    assert (all(m["H_target"] == lines[1]["entropy"] for m in lines[2:])
            and math.isfinite(lines[5]["meta_grad_scaled"]))


def test_ablations_see_the_same_training_hands_in_the_same_order(tmp_path, tiny_path):
    crc = {}
    for method, seed in [("amft", 0), ("amft-no-meta", 0), ("fixed-mix", 0), ("amft", 1)]:
        _, lines, _ = run(tmp_path, f"{method}-{seed}", model=tiny_path, method=method, seed=seed,
                          steps=6, warmup=2, meta_every=1, **SMALL)
        crc[method, seed] = [m["prompts_crc32"] for m in lines]
    assert crc["amft", 0] == crc["amft-no-meta", 0] == crc["fixed-mix", 0] != crc["amft", 1]


def test_a_meta_gradient_draws_nothing_from_the_training_rollouts_stream(tmp_path, tiny_path):
    # a random model earns no validation reward, so dU/dmu is silent and mu stays: amft-no-entropy
    # must then train exactly like fixed-mix, although it samples validation rollouts every step
    keys = ("rl_loss", "sft_loss", "entropy", "completion_len", "mu", "grad_norm")
    runs = {}
    for method in ("amft-no-entropy", "fixed-mix"):
        _, lines, _ = run(tmp_path, method, model=tiny_path, method=method, steps=6, warmup=1,
                          meta_every=1, **SMALL)
        runs[method] = [{k: m.get(k) for k in keys} for m in lines]
        assert method == "fixed-mix" or all(m["meta_grad"] is None and m["val_reward"] == 0
                                            for m in lines[1:])
    assert runs["amft-no-entropy"] == runs["fixed-mix"]


def test_micro_batches_give_the_same_gradients_losses_and_metrics(tiny64):
    model, tok = tiny64
    ref = policy.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs: KL > 0
    cfg = train.Config(group_size=3, max_new_tokens=5, beta=0.1)
    torch.manual_seed(1)
    roll, _ = train.rollouts(model, tok, [{"prompt": "make 3: ", "answer": "3"},
                                          {"prompt": "ab", "answer": "1"}], cfg, [tok.eos_token_id])
    A = torch.randn(len(roll.texts), dtype=torch.float64)
    demos = policy.sft_batch(tok, ["make 3: ", "x", "make 10: "], ["1+2", "12", "5*2"],
                             tok.eos_token_id, "cpu")
    results = []
    for micro in (0, 1, 2):
        cfg.micro_batch = micro
        model.zero_grad()
        sft = train.sft_backward(model, demos, micro)
        rl = train.rl_backward(model, ref, roll, A, cfg)
        results.append(([p.grad.clone() for p in model.parameters()], sft, rl))
    model.zero_grad()
    assert results[0][2]["kl"] > 1e-4
    for grads, sft, rl in results[1:]:
        assert sft == pytest.approx(results[0][1]) and rl == pytest.approx(results[0][2], rel=1e-9)
        for a, b in zip(grads, results[0][0]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shaped", [False, True])
def test_demonstrations_in_the_group_share_one_token_mean(tiny64, shaped):
    # srft / luffy: sum over rollout and demonstration tokens / (rollout + demonstration tokens);
    # the KL and the clip fraction are over the rollouts' tokens only
    model, tok = tiny64
    cfg = train.Config(group_size=2, max_new_tokens=4, beta=0.1)
    torch.manual_seed(2)
    roll, _ = train.rollouts(model, tok, [{"prompt": "make 3: ", "answer": "3"}], cfg,
                             [tok.eos_token_id])
    demos = policy.sft_batch(tok, ["make 3: "], ["1+2"], tok.eos_token_id, "cpu")
    A, A_demo = (torch.tensor([0.5, -1.0], dtype=torch.float64),
                 torch.tensor([0.8], dtype=torch.float64))
    ref = policy.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = train.rl_backward(model, ref, roll, A, cfg, shaped, demos, A_demo)
    model.zero_grad()
    C, D = roll.mask.shape[1], demos.mask.shape[1]
    with torch.no_grad():
        logp = policy.token_logprobs(model, roll.ids, roll.attn, n_last=C)
        ref_logp = policy.token_logprobs(ref, roll.ids, roll.attn, n_last=C)
        demo_logp = policy.token_logprobs(model, demos.ids, demos.attn, n_last=D)
    n_roll, n_demo = roll.mask.sum(), demos.mask.sum()
    demo_obj = demo_logp.exp() / (demo_logp.exp() + 0.1) if shaped else demo_logp
    kl = ((torch.exp(ref_logp - logp) - (ref_logp - logp) - 1) * roll.mask).sum() / n_roll
    expected = -((A[:, None] * roll.mask).sum()
                 + (A_demo[:, None] * demo_obj * demos.mask).sum()) / (n_roll + n_demo) + 0.1 * kl
    assert (out["loss"] == pytest.approx(expected.item(), rel=1e-9)
            and out["kl"] == pytest.approx(kl.item(), rel=1e-9))


def test_resume_continues_exactly(tmp_path):
    common = dict(steps=6, warmup=2, batch_size=3, group_size=2, meta_every=2, eval_every=100,
                  beta=0.05)
    run(tmp_path, "straight", **common)
    first, _, _ = run(tmp_path, "split", **dict(common, steps=3))
    # from the files alone, as a user resumes
    train.main(train.parse_args(["--resume", str(tmp_path / "split"), "--steps", "6"]))
    # the run's total time, and this call's
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert (summary["wall_seconds"]
            >= summary["wall_seconds_this_call"] + 0.8 * first["wall_seconds"])
    drop = {"samples_per_s", "val_accuracy"}
    lines = lambda d: [{k: v for k, v in json.loads(line).items()
                        if k not in drop and not k.startswith("seconds")}
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    straight, split = lines(tmp_path / "straight"), lines(tmp_path / "split")
    assert (len(split) == 6 and split == straight and straight[3]["kl"] > 0
            and straight[2]["meta_silent"] == 1)
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / "straight" / "model" / "model.safetensors"),
            load_file(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_precision_computes_in_bfloat16_and_keeps_weights_that_a_small_lr_moves(tiny_path):
    # the reason for --amp: in bfloat16 weights, an AdamW step of lr 1e-6 rounds away on most of
    # them
    changed = {}
    for name, dtype, amp in (("bf16", torch.bfloat16, False), ("amp", torch.float32, True)):
        model, tok = policy.load_policy(tiny_path, dtype=dtype, amp=amp)
        demos = policy.sft_batch(tok, ["make 3: ", "make 2: "], ["1+2", "1*2"], tok.eos_token_id,
                                 "cpu")
        # computed in bfloat16 either way
        assert model(input_ids=demos.ids).logits.dtype == torch.bfloat16
        amft.sft_loss(policy.token_logprobs(model, demos.ids, demos.attn,
                                            n_last=demos.mask.shape[1]), demos.mask).backward()
        before = [p.detach().clone() for p in model.parameters()]
        torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True).step()
        changed[name] = (sum((p != b).sum().item() for p, b in zip(model.parameters(), before))
                         / sum(b.numel() for b in before))
    assert changed["amp"] > 0.99 and changed["bf16"] < 0.2, changed
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the KL reference, a deep copy, computes with its own weights (forward is rebound to the copy)
    ref = policy.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
        assert not torch.equal(ref(input_ids=demos.ids).logits, model(input_ids=demos.ids).logits)


def test_held_out_accuracy_is_its_two_parts_scored_apart(warm_path):
    # hands with a J, Q or K (whose values the OOD rule changes) and hands without are scored apart
    # and add up, weighted by their rows, to each split's accuracy (pass@k too); made non-trivial
    # by scoring ID rows, which this model solves in part, as the OOD split as well
    model, tok = policy.load_policy(warm_path)
    cfg = train.Config(model="tiny", recipe="tiny", max_new_tokens=24, verifier="builtin")
    train.resolve(cfg, cuda=False)
    # it solves some, not all
    test = data.general_points(3, WARM_TASK["target"], seed=0, demo=WARM_TASK["demo"])["test"]
    scores = train.held_out_accuracy(model, tok, {"test": test, "test_ood": test}, cfg,
                                     tok.eos_token_id, k=2)
    faces = sum(bool(set(r["cards"]) & {"J", "Q", "K"}) for r in test)
    assert (0 < faces < len(test) and 0 < scores["id_accuracy_faces"] < 1
            and 0 < scores["id_accuracy_no_faces"] < 1)
    for split in ("id", "ood"):
        assert scores[f"{split}_accuracy"] == pytest.approx(
            (faces * scores[f"{split}_accuracy_faces"]
             + (len(test) - faces) * scores[f"{split}_accuracy_no_faces"]) / len(test))
    # same rows
    assert (scores["ood_accuracy_faces"] == scores["id_accuracy_faces"]
            and scores["ood_accuracy"] == scores["id_accuracy"])
    # sampled, at --temperature: on ID only
    assert 0 < scores["pass@2"] < 1 and "ood_pass@2" not in scores
    # in one pass, batched otherwise
    whole = train.evaluate(model, tok, test, cfg, tok.eos_token_id)["accuracy"]
    assert scores["id_accuracy"] == pytest.approx(whole, abs=2 / len(test))
    # rows without cards: one part, no breakdown
    gsm = [{"prompt": "1+1=", "demo": "7919", "answer": "7919"}]
    assert (train.held_out_accuracy(model, tok, {"test": gsm}, cfg, tok.eos_token_id)
            == {"id_accuracy": 0.0, "ood_accuracy": None})


@pytest.mark.parametrize("method", ["srft", "luffy", "amft"])
def test_the_losses_get_every_tensor_on_the_models_device(tiny_path, method):
    """The model and its inputs on the 'meta' device (shapes, no data: a stand-in for a GPU that a
    CPU can run), and the advantages as the loop makes them, from rewards on the CPU: rl_backward
    and sft_backward must move what they are given, or an op mixes devices and raises."""
    import memory
    model, _ = policy.load_policy(tiny_path)
    model = model.to("meta")
    cfg = train.Config(model="tiny", recipe="tiny", method=method, micro_batch=2)
    train.resolve(cfg, cuda=False)
    B, G, P, C, D = 2, 2, 5, 4, 3
    rand = lambda *shape: torch.randint(3, 50, shape, device="meta")
    roll = sampling.Rollout(rand(B * G, P), torch.ones(B * G, P, dtype=torch.long, device="meta"),
                            rand(B * G, C), torch.ones(B * G, C, device="meta"), [""] * (B * G))
    demos = policy.DemoBatch(rand(B, P + D), torch.ones(B, P + D, dtype=torch.long, device="meta"),
                             torch.ones(B, D, device="meta"))
    way = amft.METHODS[method]
    A, A_demo, _ = amft.advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                                   torch.ones(B) if way.demo_in_group else None)
    assert A.device.type == "cpu" and (A_demo is None or A_demo.device.type == "cpu")
    with memory.LiveBytes(placeholders=True):  # the losses' .item() reads 0 from data-less tensors
        train.rl_backward(model, None, roll, A.flatten(), cfg, shaped=way.shaped, demos=demos,
                          A_demo=A_demo)
        train.sft_backward(model, demos, cfg.micro_batch)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def test_out_of_memory_says_where_and_what_to_change_and_keeps_the_checkpoint(
        tmp_path, tiny_path, monkeypatch):
    """A CUDA out-of-memory error raised inside the RL backward of step 2 (a CPU cannot run out of
    GPU memory, so the error is raised where the allocation would fail): the message names the
    phase and the flags, and the checkpoint saved after step 1 loads as it was."""
    import checkpoint
    real, calls = policy.token_logprobs, []

    def token_logprobs(*args, **kw):
        calls.append(1)
        if len(calls) > 1:  # grpo, one micro-batch: one call a step
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kw)
    with pytest.raises(torch.cuda.OutOfMemoryError) as caught:
        monkeypatch.setattr(policy, "token_logprobs", token_logprobs)
        run(tmp_path, model=tiny_path, method="grpo", steps=3, save_every=1, **SMALL)
    message = train.out_of_memory(caught.value)
    assert (message.startswith("out of GPU memory during the RL backward")
            and "--micro-batch" in message)
    assert "\n" not in message and "--lora-r" in message and "--max-new-tokens" in message
    monkeypatch.setattr(policy, "token_logprobs", real)
    model, _ = policy.load_policy(tiny_path)
    opt = torch.optim.AdamW(model.parameters())
    state, _ = checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoint"), model, opt)
    assert state["step"] == 1
