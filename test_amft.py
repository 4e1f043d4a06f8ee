"""
Tests of the algorithm, the policy and the command line, offline on a CPU (fixtures in
conftest.py; the verifiers' tests are in test_tasks.py):
    HF_HUB_OFFLINE=1 python -m pytest -q test_amft.py test_tasks.py

A tiny Qwen2 is built from a config and saved once per session; everything else (sampling,
log-probs, losses, meta-gradients, the CLI) runs on it for real.
"""
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import amft
import model as policy

from conftest import HERE, run_cli


# ---------------------------------------------------------------------------- policy
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
    ce = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    torch.testing.assert_close(logp, -ce)
    assert (ent > 0).all() and (ent <= torch.log(torch.tensor(float(len(tok))))).all()
    # left padding does not change a row's log-probs (positions follow the attention mask)
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids[:1]], 1)
    pattn = torch.cat([torch.zeros(1, 3, dtype=torch.long), attn[:1]], 1)
    torch.testing.assert_close(policy.token_logprobs(model, padded, pattn)[0][:, 3:], logp[:1])


def test_completion_mask_keeps_first_eos_when_pad_equals_eos():
    eos = 1
    comps = torch.tensor([[5, 7, eos, eos, eos], [5, 7, 8, 9, 6], [eos, eos, eos, eos, eos]])
    mask = policy.completion_mask(comps, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_sampling_shapes_and_stop(tiny64):
    model, tok = tiny64
    torch.manual_seed(0)
    ids, attn, comp, mask, texts = policy.sample(model, tok, ["cards 1 2; make 3: ", "x"], 3, 1.0, 6)
    assert ids.shape[0] == comp.shape[0] == 6 and len(texts) == 6 and comp.shape[1] <= 6
    assert (mask.sum(1) >= 1).all()


# ---------------------------------------------------------------------------- GRPO
def test_zero_std_groups_get_zero_advantage():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    A, frac = amft.group_advantages(r)
    assert A[0].abs().sum() == 0 and A[2].abs().sum() == 0 and frac == pytest.approx(2 / 3)
    assert A[1, 1] > 0 > A[1, 0] and A[1].sum().abs() < 1e-6


def test_grpo_gradient_raises_positive_and_lowers_negative(tiny64):
    model, tok = tiny64
    prompt = tok(["make 3: "] * 2, return_tensors="pt", add_special_tokens=False)
    comp = torch.tensor([tok("1+2", add_special_tokens=False).input_ids + [tok.eos_token_id],
                         tok("2*1", add_special_tokens=False).input_ids + [tok.eos_token_id]])
    cmask = torch.ones_like(comp, dtype=torch.float64)
    full, attn = torch.cat([prompt.input_ids, comp], 1), torch.ones(2, prompt.input_ids.shape[1] + comp.shape[1], dtype=torch.long)
    P = prompt.input_ids.shape[1]
    seq_logp = lambda: policy.token_logprobs(model, full, attn)[0][:, P - 1:].sum(1)
    before = seq_logp().detach()
    logp = policy.token_logprobs(model, full, attn)[0][:, P - 1:]
    loss, _ = amft.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0], dtype=torch.float64), cmask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 1e-2 * g
        after = seq_logp()
        for p, g in zip(model.parameters(), grads):  # undo: the fixture is shared
            p += 1e-2 * g
    assert after[0] > before[0] and after[1] < before[1]


def test_grpo_clip_and_k3_kl():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])  # ratio e on token 0: outside 1 + eps_high
    loss, m = amft.grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    assert m["clip_frac"] == 0.5 and loss.item() == pytest.approx(-(1.28 + 1.0) / 2)
    loss, m = amft.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=logp.detach())
    assert m["kl"] == 0.0
    _, m = amft.grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logp=old)
    assert m["kl"] > 0


# ---------------------------------------------------------------------------- meta-gradient
def _meta_setup(model, tok):
    """Real g_SFT and g_RL on the float64 tiny model, and a U_sur on fixed rollouts."""
    torch.manual_seed(0)
    params = {n: p for n, p in model.named_parameters()}
    ids, attn, lmask = policy.sft_batch(tok, ["make 3: ", "make 2: "], ["1+2", "1*2"], tok.eos_token_id, "cpu")
    logp_demo = policy.token_logprobs(model, ids, attn, n_last=lmask.shape[1])[0]
    g_sft = dict(zip(params, torch.autograd.grad(amft.sft_loss(logp_demo, lmask), list(params.values()))))
    pids, pattn, comp, cmask, _ = policy.sample(model, tok, ["make 3: ", "make 2: "], 3, 1.0, 5)
    full, fattn, P = torch.cat([pids, comp], 1), torch.cat([pattn, cmask.long()], 1), pids.shape[1]
    A_rl = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0], dtype=torch.float64)
    logp = policy.token_logprobs(model, full, fattn)[0][:, P - 1:]
    g_rl = dict(zip(params, torch.autograd.grad(amft.grpo_loss(logp, logp.detach(), A_rl, cmask)[0], list(params.values()))))
    A_val = torch.tensor([0.5, -1.0, 0.5, 1.2, -0.2, -1.0], dtype=torch.float64)

    def U(theta=None):
        lp = policy.token_logprobs(model, full, fattn, params=theta)[0][:, P - 1:]
        return amft.policy_gradient_surrogate(lp, A_val, cmask)
    return params, g_sft, g_rl, U


def test_meta_gradient_autograd_matches_finite_difference(tiny64):
    model, tok = tiny64
    params, g_sft, g_rl, U = _meta_setup(model, tok)
    for alpha in (1.0, 0.1):
        exact = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, alpha)
        fd = amft.meta_grad_fd(U, params, g_rl, g_sft, 0.6, alpha, h=1e-4)
        assert exact != 0 and abs(exact - fd) <= 1e-6 * abs(exact), (alpha, exact, fd)


def test_first_order_approaches_exact_as_alpha_shrinks(tiny64):
    model, tok = tiny64
    params, g_sft, g_rl, U = _meta_setup(model, tok)
    grad_U = dict(zip(params, torch.autograd.grad(U(), list(params.values()))))
    errors = []
    for alpha in (3.0, 0.3, 0.03, 0.003):
        exact = amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.6, alpha)
        first = amft.meta_grad_first_order(grad_U, g_rl, g_sft, alpha)
        errors.append(abs(first - exact) / abs(exact))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-2 < errors[0], errors


@pytest.mark.parametrize("sft_helps", [True, False])
def test_meta_step_moves_mu_toward_the_helpful_loss(sft_helps):
    # U(w) = <c, w>. A descent step on L_SFT moves w by -alpha g_SFT; with g_SFT = -c it
    # raises U (SFT helps), while g_RL = +c lowers it: mu must go up. Swapped: mu goes down.
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    params = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    g_sft, g_rl = ({"w": -c}, {"w": c}) if sft_helps else ({"w": c}, {"w": -c})
    U = lambda theta: (c * theta["w"]).sum()
    estimates = [amft.meta_grad_first_order({"w": c}, g_rl, g_sft, 0.1),
                 amft.meta_grad_autograd(U, params, g_rl, g_sft, 0.5, 0.1),
                 amft.meta_grad_fd(U, params, g_rl, g_sft, 0.5, 0.1)]
    for g in estimates:
        assert g == pytest.approx(estimates[0])
        scaled, _, _ = amft.normalize_meta_grad(g, 0.0, 0)
        mu = amft.update_mu(0.5, scaled, 0.0, eta_meta=0.1, eta_H=0.0, mu_min=0.05, mu_max=0.95)
        assert (mu > 0.5) == sft_helps and mu != 0.5


def test_entropy_term_sign_and_bounds():
    below = amft.entropy_signal(H_target=1.0, H=0.4)   # collapse: more imitation
    above = amft.entropy_signal(H_target=1.0, H=1.6)
    assert amft.update_mu(0.5, 0.0, below, 0.0, 0.1, 0.05, 0.95) > 0.5
    assert amft.update_mu(0.5, 0.0, above, 0.0, 0.1, 0.05, 0.95) < 0.5
    assert amft.update_mu(0.9, 0.0, below, 0.0, 10.0, 0.05, 0.95) == 0.95
    assert amft.update_mu(0.1, 0.0, above, 0.0, 10.0, 0.05, 0.95) == 0.05


def test_normalized_meta_grad_is_in_units_of_mu():
    v, n, out = 0.0, 0, []
    for g in (1e-9, -2e-9, 1.5e-9):
        s, v, n = amft.normalize_meta_grad(g, v, n)
        out.append(s)
    assert out[0] == pytest.approx(1.0) and out[1] < -1.0 and 0.3 < out[2] < 2


def test_mix_grads():
    g = amft.mix_grads({"a": torch.tensor(2.0)}, {"a": torch.tensor(4.0), "b": torch.tensor(1.0)}, 0.75, 0.25)
    assert g["a"].item() == pytest.approx(2.5) and g["b"].item() == pytest.approx(0.25)


# ---------------------------------------------------------------------------- the CLI
def test_cli_smoke_run_writes_outputs_and_mu_moves(tmp_path):
    out = tmp_path / "run"
    res = run_cli("--steps", "8", "--warmup", "2", "--meta-every", "2", "--eval-every", "4",
                  "--batch-size", "4", "--group-size", "4", "--meta-grad", "autograd", "--beta", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(8))
    for key in ("mu", "entropy", "H_target", "reward_mean", "sft_loss", "rl_loss", "meta_grad", "frac_zero_std", "samples_per_s", "kl"):
        assert key in lines[-1]
    mix = [m for m in lines if m["phase"] == "main"]
    assert len({round(m["mu"], 8) for m in mix}) > 1 and mix[0]["meta_grad"] is not None and mix[1]["meta_grad"] is None
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "id_accuracy", "ood_accuracy", "steps", "wall_seconds"):
        assert key in summary
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").decode([10]) != ""


@pytest.mark.parametrize("method", ["sft", "grpo", "sft-grpo", "fixed-mix", "srft", "luffy", "amft-no-meta", "amft-no-entropy"])
def test_every_method_runs_and_uses_its_rule(tmp_path, method):
    out = tmp_path / method
    res = run_cli("--method", method, "--steps", "4", "--warmup", "2", "--batch-size", "3", "--group-size", "2",
                  "--meta-every", "1", "--eval-every", "100", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    expect = {"sft": (0.0, 1.0), "grpo": (1.0, 0.0), "sft-grpo": (1.0, 0.0), "luffy": (1.0, 0.0), "fixed-mix": (0.2, 0.8)}
    if method in expect:
        assert (last["w_rl"], last["w_sft"]) == pytest.approx(expect[method])
    if method == "srft":
        assert last["w_rl"] == 1.0 and last["w_sft"] == pytest.approx(0.5 * math.exp(-last["entropy"]))
    if method in ("sft-grpo", "fixed-mix", "amft-no-meta", "amft-no-entropy"):
        assert lines[0]["phase"] == "warmup" and lines[0]["w_sft"] == 1.0 and lines[0]["rl_loss"] is None
    if method in ("grpo", "luffy", "srft"):
        assert lines[0]["phase"] == "main" and lines[0]["rl_loss"] is not None
    if method == "amft-no-meta":
        assert all(m["meta_grad"] is None for m in lines) and lines[-1]["mu"] != 0.8
    if method == "amft-no-entropy":
        # only the meta-gradient moves mu (a random model's validation rewards may all be 0: then it stays)
        assert lines[2]["meta_grad"] is not None and (lines[-1]["mu"] != 0.8) == any(m["meta_grad"] for m in lines[2:])


def test_off_policy_losses():
    logp = torch.log(torch.tensor([[0.5, 0.01]], requires_grad=True))
    logp.retain_grad()
    amft.off_policy_loss(logp, torch.tensor([1.0]), torch.ones(1, 2), shaping=True).backward()
    p = torch.tensor([0.5, 0.01])
    # d/dlogp of -mean(f(p)) = -(gamma p / (p + gamma)^2) / 2: rare tokens keep a large weight relative to p
    torch.testing.assert_close(logp.grad[0], -(0.1 * p / (p + 0.1) ** 2) / 2)
    logp2 = torch.zeros(1, 2, requires_grad=True)
    amft.off_policy_loss(logp2, torch.tensor([2.0]), torch.ones(1, 2), shaping=False).backward()
    torch.testing.assert_close(logp2.grad, torch.full((1, 2), -1.0))


def test_help_lists_every_flag():
    import train
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr[-2000:]
    for f in train.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in res.stdout


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "cannot load model"),
    (["--mu-min", "0.9", "--mu-max", "0.1"], "mu bounds"),
    (["--mu-max", "1.5"], "mu bounds"),
    (["--group-size", "1"], "at least 2"),
    (["--method", "magic"], "--method"),
    (["--task", "/no/such/file.jsonl"], "existing file"),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, args, message):
    out = tmp_path / "run"
    res = run_cli(*args, "--steps", "2", "--out", str(out))
    assert res.returncode != 0 and message in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_task_file_without_fields_is_rejected_by_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2"}) + "\n")
    res = run_cli("--task", str(bad), "--steps", "2", "--out", str(tmp_path / "run"))
    assert res.returncode != 0 and "no usable rows" in res.stderr and "question" in res.stderr
    assert not (tmp_path / "run").exists()


def test_diverging_run_skips_non_finite_steps_then_stops(tmp_path):
    res = run_cli("--method", "sft", "--lr", "1e30", "--steps", "20", "--max-bad-steps", "3",
                  "--batch-size", "4", "--out", str(tmp_path / "run"))
    assert res.returncode != 0 and "non-finite" in res.stderr and "Traceback" not in res.stderr
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(bool(m.get("skipped")) for m in lines) >= 2


# ---------------------------------------------------------------------------- real data, resume, eval
def test_chat_template_prompt_and_turn_end(tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert policy.use_chat(tok, "Qwen/Qwen2.5-0.5B-Instruct", "auto") and not policy.use_chat(tok, "Qwen/Qwen2.5-0.5B", "auto")
    assert policy.format_prompt(tok, "2+2?", True).endswith("<|im_start|>assistant\n")
    assert policy.format_prompt(tok, "2+2?", False) == "2+2?"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert policy.end_id(tok, True) == im_end and policy.end_id(tok, False) == tok.eos_token_id


def test_micro_batches_give_the_same_gradients(tiny64):
    import train
    model, tok = tiny64
    cfg = train.Config(group_size=3, max_new_tokens=5, beta=0.1, micro_batch=0)
    torch.manual_seed(1)
    rows = [{"prompt": "make 3: ", "answer": "3"}, {"prompt": "ab", "answer": "1"}]
    full, fattn, cmask, _ = train.rollouts(model, tok, rows, cfg, [tok.eos_token_id])
    A = torch.randn(len(full), dtype=torch.float64)
    ids, attn, lmask = policy.sft_batch(tok, ["make 3: ", "x", "make 10: "], ["1+2", "12", "5*2"], tok.eos_token_id, "cpu")
    grads = []
    for micro in (0, 1, 2):
        cfg.micro_batch = micro
        model.zero_grad()
        sft = train.sft_backward(model, ids, attn, lmask, micro)
        rl, H, metrics = train.rl_backward(model, model, full, fattn, cmask, A, cfg)
        grads.append(([p.grad.clone() for p in model.parameters()], sft, rl, H, metrics["kl"]))
    model.zero_grad()
    for g, sft, rl, H, kl in grads[1:]:
        assert sft == pytest.approx(grads[0][1]) and rl == pytest.approx(grads[0][2]) and H == pytest.approx(grads[0][3])
        assert kl == pytest.approx(0.0, abs=1e-12)
        for a, b in zip(g, grads[0][0]):
            torch.testing.assert_close(a, b)


def test_logprobs_of_last_tokens_only(tiny64):
    model, tok = tiny64
    ids = torch.randint(3, len(tok), (2, 12))
    attn = torch.ones_like(ids)
    full = policy.token_logprobs(model, ids, attn, with_entropy=True)
    last = policy.token_logprobs(model, ids, attn, with_entropy=True, n_last=4)
    torch.testing.assert_close(last[0], full[0][:, -4:])
    torch.testing.assert_close(last[1], full[1][:, -4:])


def test_cli_trains_saved_tiny_model_on_gsm8k_file_and_eval_only(tmp_path, tiny_path, math_files):
    out = tmp_path / "run"
    res = run_cli("--model", tiny_path, "--task", math_files["gsm8k"], "--steps", "3", "--warmup", "1", "--batch-size", "2",
                  "--group-size", "2", "--max-new-tokens", "6", "--meta-every", "1", "--micro-batch", "2", "--grad-ckpt", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == math_files["gsm8k"] and summary["ood_accuracy"] is None and 0 <= summary["id_accuracy"] <= 1
    assert (out / "checkpoint" / "trainer_state.pt").exists() and not (out / "checkpoint.tmp").exists()
    res = run_cli("--eval-only", "--model", str(out / "model"), "--task", math_files["gsm8k"], "--max-new-tokens", "6",
                  "--pass-k", "2", "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-2000:]
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert ev["method"] == "eval-only" and ev["id_accuracy"] == summary["id_accuracy"] and 0 <= ev["pass@2"] <= 1


def test_resume_continues_exactly(tmp_path):
    common = ["--steps", "6", "--warmup", "2", "--batch-size", "3", "--group-size", "2", "--meta-every", "2",
              "--eval-every", "100", "--beta", "0.05"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--out", str(straight)).returncode == 0
    first = run_cli(*common[:1], "3", *common[2:], "--out", str(split))
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli("--resume", str(split), "--steps", "6")
    assert second.returncode == 0, second.stderr[-2000:]
    drop = {"samples_per_s", "val_accuracy"}
    lines = lambda d: [{k: v for k, v in json.loads(l).items() if k not in drop} for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert len(lines(split)) == 6 and lines(split) == lines(straight)
    from safetensors.torch import load_file
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(split / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    import signal
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--steps", "400", "--warmup", "400",
                             "--save-every", "0", "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=HERE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err and "Traceback" not in err
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert saved["state"]["step"] == (out / "metrics.jsonl").read_text().count("\n") >= 3


def test_lora_run_trains_adapters_only_and_saves_a_merged_model(tmp_path, tiny_path):
    pytest.importorskip("peft")
    model, _ = policy.load_policy(tiny_path, lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = tmp_path / "run"
    res = run_cli("--model", tiny_path, "--lora-r", "4", "--steps", "3", "--warmup", "1", "--batch-size", "2",
                  "--group-size", "2", "--meta-every", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


# ---------------------------------------------------------------------------- comparison and speed
@pytest.mark.parametrize("greedy", [True, False])
def test_decode_loop_draws_the_same_tokens_as_generate(tiny_path, greedy):
    model, tok = policy.load_policy(tiny_path)
    prompts = ["cards 3 J 5; J,Q,K=10; make 10: ", "ab", "make"]
    outs = {}
    for sampler in ("generate", "loop"):
        torch.manual_seed(3)
        outs[sampler] = policy.sample(model, tok, prompts, 4, 0.7, 10, greedy=greedy, sampler=sampler)
    for a, b in zip(outs["generate"][2:4], outs["loop"][2:4]):
        assert a.shape == b.shape and torch.equal(a, b)
    assert outs["generate"][4] == outs["loop"][4]


def test_compare_quick_writes_table_and_figure(tmp_path):
    import compare
    results = compare.main(["--quick", "--methods", "sft,amft", "--seeds", "2", "--steps", "3", "--warmup", "1",
                            "--batch-size", "2", "--group-size", "2", "--eval-every", "1", "--out", str(tmp_path)])
    assert set(results) == {"sft", "amft"} and all(len(r) == 2 for r in results.values())
    table = (tmp_path / "results.md").read_text()
    assert "| sft |" in table and "| amft |" in table and "±" in table
    try:
        import matplotlib  # noqa: F401  (optional: without it the table is still written)
        assert (tmp_path / "comparison.png").stat().st_size > 10_000 and (tmp_path / "amft-seed1" / "curves.png").exists()
    except ImportError:
        assert not (tmp_path / "comparison.png").exists()
    # a finished run is reused, not trained again
    before = (tmp_path / "sft-seed0" / "summary.json").stat().st_mtime
    compare.main(["--methods", "sft", "--seeds", "1", "--steps", "3", "--out", str(tmp_path)])
    assert (tmp_path / "sft-seed0" / "summary.json").stat().st_mtime == before


def test_bench_quick_prints_every_row():
    import bench
    result = bench.main(["--quick"])
    assert len(result["decode"]) == 3 and all(ms > 0 and tps > 0 for _, ms, tps in result["decode"])
    assert result["train_tokens_per_s"] > 0 and set(result["steps"]) == {"fixed-mix", "amft, meta every step", "amft, meta every 20"}
    assert "x fixed-mix" in result["table"] and "x generate" in result["table"]
