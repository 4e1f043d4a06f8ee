"""
Tests of the training loop (train.py) and the command line, offline on a CPU. Most runs call
train.main in this process (the same loop the command line runs, without an interpreter
start-up); the tests of the command line itself run `python train.py` as a user would.
"""
import glob
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import amft
import model as policy
import train

from conftest import HERE, run_cli


def run(tmp_path, name="run", **kw):
    """train.main in this process; returns its summary, metrics lines and output folder."""
    out = tmp_path / name
    summary = train.main(train.Config(out=str(out), **{**dict(recipe="tiny", eval_every=1000, save_every=0, skip_test=True), **kw}))
    return summary, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


SMALL = dict(batch_size=3, group_size=2, max_new_tokens=8, val_prompts=3)


# ---------------------------------------------------------------------------- the loop, method by method
def test_cli_smoke_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = run_cli("--steps", "6", "--warmup", "2", "--meta-every", "2", "--eval-every", "3", "--batch-size", "4",
                  "--group-size", "4", "--meta-grad", "autograd", "--beta", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(6)) and [m["phase"] for m in lines] == ["warmup"] * 2 + ["main"] * 4
    for key in ("mu", "entropy", "H_target", "reward_mean", "sft_loss", "rl_loss", "meta_grad", "frac_zero_std",
                "samples_per_s", "kl", "clip_frac", "prompts_crc32"):
        assert key in lines[-1]
    assert lines[2]["meta_grad"] is not None and lines[3]["meta_grad"] is None and lines[2]["kl"] == 0.0 < lines[3]["kl"]
    assert [m["step"] for m in lines if "val_accuracy" in m] == [2, 5]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "id_accuracy", "ood_accuracy", "steps", "wall_seconds", "final_mu", "mu_rejected"):
        assert key in summary
    assert json.loads((out / "config.json").read_text())["meta_grad"] == "autograd"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").decode([10]) != ""


@pytest.mark.parametrize("method", list(amft.METHODS))
def test_every_method_runs_and_uses_its_rule(tmp_path, warm_path, method):
    summary, lines, _ = run(tmp_path, model=warm_path, method=method, steps=4, warmup=2, meta_every=1,
                            **dict(SMALL, group_size=4, max_new_tokens=16, val_prompts=16))
    rule = amft.METHODS[method]
    main = [m for m in lines if m["phase"] == "main"]
    assert len(main) == (2 if rule.warmup else 4) and all(m["w_rl"] == 0 and m["w_sft"] == 1 for m in lines[:4 - len(main)])
    for m in main:
        expect = amft.loss_weights(rule, 0.8 if m["mu"] is None else m["mu"], m["entropy"] or 0.0)
        assert (m["w_rl"], m["w_sft"]) == pytest.approx(expect)
        assert (m["rl_loss"] is not None) == rule.rl and (m["sft_loss"] is not None) == (rule.sft or not rule.rl)
        assert (m["meta_grad"] is not None) == rule.meta_term and (m["mu"] is not None) == rule.mixes
    if rule.mixes:  # mu moves exactly when one of the controller's terms is on and says so
        moved = any(m["mu"] != 0.8 for m in main)
        signal_ = any(m["meta_grad"] for m in main) or (rule.entropy_term and any(m["entropy"] != m["H_target"] for m in main))
        assert moved == signal_ and moved == (method != "fixed-mix")


def test_loop_reads_switches_not_method_names():
    import re
    source = open(os.path.join(HERE, "train.py")).read()
    compared = re.findall(r"cfg\.method\s*(?:==|!=|in\b)[^,\n]*", source)
    assert compared == ["cfg.method in amft.METHODS"], compared  # the only one: checking the flag at the door


def test_meta_gradient_in_the_loop_is_nonzero_and_autograd_equals_fd_float64(tmp_path, warm_path):
    # a model that solves some hands: validation rewards differ within groups, so dU/dmu != 0
    common = ["--model", warm_path, "--recipe", "tiny", "--method", "amft-no-entropy", "--dtype", "float64", "--warmup", "0", "--steps", "1",
              "--meta-every", "1", "--batch-size", "4", "--group-size", "4", "--val-prompts", "16", "--skip-test"]
    first = {}
    for name in ("autograd", "fd"):
        out = tmp_path / name
        res = run_cli(*common, "--meta-grad", name, "--out", str(out))
        assert res.returncode == 0, res.stderr[-2000:]
        first[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # the same step with the meta-gradient's validation pass in micro-batches of 5 sequences
    _, lines, _ = run(tmp_path, "micro", model=warm_path, method="amft-no-entropy", dtype="float64", warmup=0, steps=1,
                      meta_every=1, batch_size=4, group_size=4, val_prompts=16, meta_grad="autograd", micro_batch=5)
    first["autograd-micro"] = lines[0]
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

    def meta_gradient(*args, **kw):  # main step 3: dU/dmu NaN (none is computed at step 2: its entropy is NaN)
        dU, val_reward = real_meta(*args, **kw)
        calls["meta"] += 1
        return (math.nan if calls["meta"] == 2 else dU), val_reward
    monkeypatch.setattr(train, "rl_backward", rl_backward)
    monkeypatch.setattr(train, "meta_gradient", meta_gradient)
    summary, lines, _ = run(tmp_path, model=warm_path, method="amft", steps=7, warmup=1, meta_every=1, **SMALL)
    mu = [m["mu"] for m in lines]
    assert len(lines) == 7 and all(math.isfinite(x) for x in mu) and math.isfinite(summary["final_mu"])
    assert mu[2] == mu[1] and mu[3] == mu[1] and mu[4] == mu[1] and mu[5] != mu[4]
    assert [m["mu_rejected"] for m in lines[1:]] == [0, 1, 2, 3, 3, 3] and summary["mu_rejected"] == 3
    assert lines[4]["skipped"] and not lines[5]["skipped"] and lines[4]["meta_grad"] is None  # no meta-gradient on a bad step
    assert lines[2]["meta_grad"] is None and math.isnan(lines[3]["meta_grad"]) and calls["meta"] == 4
    assert all(m["H_target"] == lines[1]["entropy"] for m in lines[2:]) and math.isfinite(lines[5]["meta_grad_scaled"])


def test_ablations_see_the_same_training_hands_in_the_same_order(tmp_path, tiny_path):
    crc = {}
    for method, seed in [("amft", 0), ("amft-no-meta", 0), ("fixed-mix", 0), ("amft", 1)]:
        _, lines, _ = run(tmp_path, f"{method}-{seed}", model=tiny_path, method=method, seed=seed, steps=6, warmup=2,
                          meta_every=1, **SMALL)
        crc[method, seed] = [m["prompts_crc32"] for m in lines]
    assert crc["amft", 0] == crc["amft-no-meta", 0] == crc["fixed-mix", 0] != crc["amft", 1]


def test_a_meta_gradient_draws_nothing_from_the_training_rollouts_stream(tmp_path, tiny_path):
    # a random model earns no validation reward, so dU/dmu = 0 and mu stays: amft-no-entropy
    # must then train exactly like fixed-mix, although it samples validation rollouts every step
    keys = ("rl_loss", "sft_loss", "entropy", "completion_len", "mu", "grad_norm")
    runs = {}
    for method in ("amft-no-entropy", "fixed-mix"):
        _, lines, _ = run(tmp_path, method, model=tiny_path, method=method, steps=6, warmup=1, meta_every=1, **SMALL)
        runs[method] = [{k: m.get(k) for k in keys} for m in lines]
        assert method == "fixed-mix" or all(m["meta_grad"] == 0 for m in lines[1:])
    assert runs["amft-no-entropy"] == runs["fixed-mix"]


def test_micro_batches_give_the_same_gradients_losses_and_metrics(tiny64):
    model, tok = tiny64
    ref = policy.frozen_copy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs: KL > 0
    cfg = train.Config(group_size=3, max_new_tokens=5, beta=0.1)
    torch.manual_seed(1)
    roll, _ = train.rollouts(model, tok, [{"prompt": "make 3: ", "answer": "3"}, {"prompt": "ab", "answer": "1"}], cfg, [tok.eos_token_id])
    A = torch.randn(len(roll.texts), dtype=torch.float64)
    demos = policy.sft_batch(tok, ["make 3: ", "x", "make 10: "], ["1+2", "12", "5*2"], tok.eos_token_id, "cpu")
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
    roll, _ = train.rollouts(model, tok, [{"prompt": "make 3: ", "answer": "3"}], cfg, [tok.eos_token_id])
    demos = policy.sft_batch(tok, ["make 3: "], ["1+2"], tok.eos_token_id, "cpu")
    A, A_demo = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
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
    expected = -((A[:, None] * roll.mask).sum() + (A_demo[:, None] * demo_obj * demos.mask).sum()) / (n_roll + n_demo) + 0.1 * kl
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-9) and out["kl"] == pytest.approx(kl.item(), rel=1e-9)


# ---------------------------------------------------------------------------- checkpoints, resume, Ctrl-C
def test_resume_continues_exactly(tmp_path):
    common = dict(steps=6, warmup=2, batch_size=3, group_size=2, meta_every=2, eval_every=100, beta=0.05)
    run(tmp_path, "straight", **common)
    run(tmp_path, "split", **dict(common, steps=3))
    resumed = run_cli("--resume", str(tmp_path / "split"), "--steps", "6")  # as a user resumes
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    drop = {"samples_per_s", "val_accuracy"}
    lines = lambda d: [{k: v for k, v in json.loads(line).items() if k not in drop} for line in (d / "metrics.jsonl").read_text().splitlines()]
    straight, split = lines(tmp_path / "straight"), lines(tmp_path / "split")
    assert len(split) == 6 and split == straight and straight[3]["kl"] > 0 and straight[2]["meta_grad"] is not None
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "straight" / "model" / "model.safetensors"), load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """An object whose unpickling runs a command: what a shared checkpoint could carry."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_unsafe_checkpoint_is_refused_in_one_line(tmp_path, tiny_path):
    run(tmp_path, model=tiny_path, method="sft", steps=2, batch_size=2)
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    assert torch.load(state_file, weights_only=True)["state"]["step"] == 2  # what we write loads safely
    good = state_file.read_bytes()
    state_file.write_bytes(good[:len(good) // 2])  # truncated
    res = run_cli("--resume", str(tmp_path / "run"), "--steps", "3")
    last = res.stderr.strip().splitlines()[-1]  # (after the model's own loading bar)
    assert res.returncode == 1 and last.startswith("error:") and "damaged" in last and "Traceback" not in res.stderr, res.stderr[-2000:]
    marker = tmp_path / "pwned"
    torch.save({"optimizer": {}, "state": {"step": 1}, "ref": None, "x": _Payload(marker)}, state_file)
    res = run_cli("--resume", str(tmp_path / "run"), "--steps", "3")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last.startswith("error:") and "refusing" in last and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not marker.exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
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
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert saved["state"]["step"] == (out / "metrics.jsonl").read_text().count("\n") >= 3


def test_a_run_leaves_no_handler_open_file_or_temporary_model(tmp_path, monkeypatch):
    opened = []

    def recording_open(*args, **kw):
        f = open(*args, **kw)
        opened.append(f)
        return f
    monkeypatch.setattr(train, "open", recording_open, raising=False)
    handler = signal.getsignal(signal.SIGINT)
    temps = set(glob.glob(os.path.join(tempfile.gettempdir(), "amft-tiny-*")))
    with pytest.raises(train.TrainingError, match="non-finite"):  # a run that ends in an exception
        run(tmp_path, method="sft", lr=1e30, steps=20, max_bad_steps=3, batch_size=4)
    assert opened and all(f.closed for f in opened)
    assert signal.getsignal(signal.SIGINT) is handler
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "amft-tiny-*"))) == temps


# ---------------------------------------------------------------------------- the command line
def test_help_lists_every_flag():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr[-2000:]
    for f in train.Config.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in res.stdout


@pytest.mark.parametrize("settings,message", [
    (dict(mu_min=0.9, mu_max=0.1), "mu bounds"),
    (dict(mu_max=1.5), "mu bounds"),
    (dict(group_size=1), "at least 2"),
    (dict(eta_meta=-0.1), "must be finite and >= 0"),
    (dict(eta_H=-1.0), "must be finite and >= 0"),
    (dict(meta_alpha=-1e-3), "must be finite and >= 0"),
    (dict(max_bad_steps=0), "must be >= 1"),
    (dict(eta_H=math.inf), "must be finite"),
    (dict(H_target=math.inf), "--H-target"),
    (dict(lr=math.inf), "--lr must be finite"),
])
def test_impossible_settings_are_refused_at_the_door(tmp_path, settings, message):
    with pytest.raises(train.UsageError, match=message):
        train.main(train.Config(out=str(tmp_path / "run"), **settings))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "cannot load model"),
    (["--method", "magic"], "--method"),
    (["--task", "/no/such/file.jsonl"], "existing file"),
    (["--meta-grad", "fd", "--dtype", "bfloat16"], "refused in bfloat16"),
    (["--eta-H", "-0.5"], "must be finite and >= 0"),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, args, message):
    out = tmp_path / "run"
    res = run_cli(*args, "--steps", "2", "--out", str(out))
    assert res.returncode != 0 and message in res.stderr, res.stderr[-2000:]
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
                  "--batch-size", "4", "--skip-test", "--out", str(tmp_path / "run"))
    assert res.returncode != 0 and "non-finite" in res.stderr and "Traceback" not in res.stderr
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["skipped"] for m in lines) >= 2


# ---------------------------------------------------------------------------- real data, models and tools
def test_cli_trains_saved_tiny_model_on_gsm8k_file_and_eval_only(tmp_path, tiny_path, math_files):
    out = tmp_path / "run"
    res = run_cli("--model", tiny_path, "--recipe", "tiny", "--task", math_files["gsm8k"], "--steps", "3", "--warmup", "1", "--batch-size", "2",
                  "--group-size", "2", "--max-new-tokens", "6", "--meta-every", "1", "--micro-batch", "2", "--grad-ckpt", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == math_files["gsm8k"] and summary["ood_accuracy"] is None and 0 <= summary["id_accuracy"] <= 1
    assert (out / "checkpoint" / "trainer_state.pt").exists() and not (out / "checkpoint.tmp").exists()
    res = run_cli("--eval-only", "--model", str(out / "model"), "--recipe", "tiny", "--task", math_files["gsm8k"], "--max-new-tokens", "6",
                  "--pass-k", "2", "--out", str(tmp_path / "eval"))
    assert res.returncode == 0, res.stderr[-2000:]
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert ev["method"] == "eval-only" and ev["id_accuracy"] == summary["id_accuracy"] and 0 <= ev["pass@2"] <= 1


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


def test_lora_run_trains_adapters_only_and_saves_a_merged_model(tmp_path, tiny_path):
    pytest.importorskip("peft")
    model, _ = policy.load_policy(tiny_path, lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _, _, out = run(tmp_path, model=tiny_path, lora_r=4, steps=3, warmup=1, meta_every=1, batch_size=2, group_size=2)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


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
    (estimator, gib, bytes_per_param, _), = result["memory"]  # the tiny model's whole loop, in its own process
    assert estimator == "autograd" and 0.1 < gib < 8 and bytes_per_param > 20 and "bytes/param" in result["table"]


# ---------------------------------------------------------------------------- a pretrained model's recipe
@pytest.fixture(scope="module")
def instruct_path(tmp_path_factory):
    """A pretrained-like checkpoint, offline: a chat template ending turns with <|im_end|>, a
    generation config that sets processors, no pad token, untied embeddings, 'Instruct' in its name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    base = policy.make_tiny_model(str(tmp_path_factory.mktemp("base")), n_layer=2, n_embd=32, n_head=2)
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = None
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model.resize_token_embeddings(len(tok))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
                                               eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id])
    path = tmp_path_factory.mktemp("hub") / "Tiny-Instruct"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_pretrained_model_resolves_to_the_pretrained_recipe(instruct_path):
    cfg = train.parse_args(["--model", instruct_path])
    assert train.resolve(cfg, cuda=False) == "pretrained"
    assert (cfg.lr, cfg.warmup, cfg.meta_every, cfg.cards, cfg.target, cfg.prompt) == (1e-6, 50, 20, 4, 24, "plain")
    assert (cfg.micro_batch, cfg.dtype, cfg.grad_ckpt, cfg.group_size) == (16, "float32", False, 8)
    cfg = train.parse_args(["--model", "Qwen2.5-0.5B"])  # the headline command, on a GPU
    train.resolve(cfg, cuda=True)
    assert (cfg.recipe, cfg.lr, cfg.dtype, cfg.grad_ckpt) == ("pretrained", 1e-6, "bfloat16", True)
    cfg = train.parse_args(["--model", "Qwen2.5-0.5B", "--lr", "3e-6", "--no-grad-ckpt", "--cards", "3"])
    train.resolve(cfg, cuda=True)  # every explicit flag wins
    assert (cfg.lr, cfg.grad_ckpt, cfg.cards, cfg.target) == (3e-6, False, 3, 24)
    cfg = train.parse_args([])
    assert train.resolve(cfg, cuda=True) == "tiny" and (cfg.lr, cfg.dtype, cfg.prompt, cfg.steps) == (1e-3, "float32", "compact", 700)


def test_a_pretrained_like_checkpoint_trains_evaluates_and_resumes(tmp_path, instruct_path):
    import data
    hands = tmp_path / "hands.jsonl"  # 4-card hands (a file: the full 4-card split takes ~20 s to solve)
    hands.write_text("\n".join(json.dumps({"cards": list(h)}) for h in data.all_hands(4)[::40]) + "\n")
    out = tmp_path / "run"
    budget = ["--task", str(hands), "--steps", "3", "--warmup", "1", "--batch-size", "2", "--group-size", "2",
              "--max-new-tokens", "8", "--val-prompts", "2", "--meta-every", "1"]
    res = run_cli("--model", instruct_path, *budget, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "recipe: pretrained" in res.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["recipe"], config["lr"], config["prompt"], config["micro_batch"], config["target"]) == ("pretrained", 1e-6, "plain", 16, 24)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in lines] == ["warmup", "main", "main"] and lines[1]["rl_loss"] is not None
    assert json.loads((out / "summary.json").read_text())["id_accuracy"] is not None
    res = run_cli("--resume", str(out), "--steps", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    res = run_cli("--model", instruct_path, *budget, "--dtype", "bfloat16", "--skip-test", "--out", str(tmp_path / "bf16"))
    assert res.returncode == 0, res.stderr[-2000:]  # bfloat16 on a CPU: slow, but it runs
