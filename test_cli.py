"""
Tests of the command line and what a run leaves behind: outputs, --help, bad input, damaged
and unsafe checkpoints, Ctrl-C, open files and temporary models, real-data and LoRA runs,
recipes on a pretrained-like checkpoint, compare.py and bench.py. Most run `python train.py`
as a user would; the loop itself is tested in test_train.py.
"""
import dataclasses
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

import model as policy
import settings
import train

from conftest import HERE, SMALL, WARM_TASK, run, run_cli


def test_cli_smoke_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    res = run_cli("--steps", "6", "--warmup", "2", "--meta-every", "2", "--eval-every", "3",
                  "--batch-size", "4", "--group-size", "4", "--meta-grad", "autograd",
                  "--beta", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ([m["step"] for m in lines] == list(range(6))
            and [m["phase"] for m in lines] == ["warmup"] * 2 + ["main"] * 4)
    for key in ("mu", "entropy", "H_target", "reward_mean", "sft_loss", "rl_loss", "meta_grad",
                "frac_zero_std", "samples_per_s", "kl", "clip_frac", "prompts_crc32"):
        assert key in lines[-1]
    assert ("val_reward" in lines[2] and "val_reward" not in lines[3]
            and lines[2]["kl"] == 0.0 < lines[3]["kl"])  # K = 2
    assert [m["step"] for m in lines if "val_accuracy" in m] == [2, 5]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "id_accuracy", "ood_accuracy", "ood_accuracy_faces",
                "ood_accuracy_no_faces", "steps", "wall_seconds", "final_mu", "mu_rejected"):
        assert key in summary
    assert json.loads((out / "config.json").read_text())["meta_grad"] == "autograd"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(out / "model")
    assert AutoTokenizer.from_pretrained(out / "model").decode([10]) != ""


class _Payload:
    """An object whose unpickling runs a command: what a shared checkpoint could carry."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_damaged_or_unsafe_checkpoint_is_refused_in_one_line(tmp_path, tiny_path):
    run(tmp_path, model=tiny_path, method="sft", steps=2, batch_size=2)
    state_file = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    # what we write loads safely
    assert torch.load(state_file, weights_only=True)["state"]["step"] == 2
    good = state_file.read_bytes()
    # truncated: a UsageError, which the command line prints in one line
    state_file.write_bytes(good[:len(good) // 2])
    with pytest.raises(train.UsageError, match="is damaged and cannot be read"):
        train.main(train.parse_args(["--resume", str(tmp_path / "run"), "--steps", "3"]))
    marker = tmp_path / "pwned"
    torch.save({"optimizer": {}, "state": {"step": 1}, "ref": None, "x": _Payload(marker)},
               state_file)
    res = run_cli("--resume", str(tmp_path / "run"), "--steps", "3")
    last = res.stderr.strip().splitlines()[-1]
    assert (res.returncode == 1 and last.startswith("error:") and "refusing" in last
            and "Traceback" not in res.stderr), res.stderr[-2000:]
    assert not marker.exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"),
                             "--steps", "400", "--warmup", "400", "--save-every", "0",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=HERE)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and (out / "metrics.jsonl").read_text().count("\n") >= 3):
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


def test_help_lists_every_flag_in_its_section():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr[-2000:]
    options = res.stdout[res.stdout.index("\noptions:"):]  # after the usage line
    # each flag in the section its field is under in Config, the sections in Config's order
    starts = [options.index(f"\n{title}:\n") for title in settings.SECTIONS.values()]
    assert starts == sorted(starts)
    section = -1
    for f in train.Config.__dataclass_fields__:
        section += f in settings.SECTIONS
        at = options.index("  --" + f.replace("_", "-"))
        assert starts[section] < at < (starts + [len(options)])[section + 1], f


@pytest.mark.parametrize("settings,message", [
    (dict(mu_min=0.9, mu_max=0.1), "mu bounds"),
    (dict(mu_max=1.5), "mu bounds"),
    (dict(group_size=1), "at least 2"),
    (dict(eta_meta=-0.1), "must be finite and >= 0"),
    (dict(eta_H=-1.0), "must be finite and >= 0"),
    (dict(meta_alpha=-1e-3), "must be finite and >= 0"),
    (dict(max_bad_steps=0), "--max-bad-steps must be >= 1"),
    # each check names its own flag
    (dict(max_new_tokens=-5), "^--max-new-tokens must be >= 0$"),
    (dict(steps=0), "^--steps must be >= 1$"),
    (dict(batch_size=0), "^--batch-size must be >= 1$"),
    (dict(micro_batch=-1), "^--micro-batch must be >= 0$"),
    (dict(warmup_lr=0.0), "^--warmup-lr must be finite and > 0$"),
    # a test set is never training data
    (dict(task="math500"), "--task math500: HuggingFaceH4/MATH-500 is a test set"),
    (dict(task="aime24"), "--eval-tasks aime24"),
    (dict(eval_tasks="gsm8k,nope"), "--eval-tasks nope: not one of"),
    (dict(eval_tasks="aime24=/no/such.jsonl"), "NAME=FILE needs a name and an existing file"),
    (dict(eta_H=math.inf), "must be finite"),
    (dict(H_target=math.inf), "--H-target"),
    (dict(lr=math.inf), "--lr must be finite"),
    (dict(target="15-6"), "--target 15-6"),
    (dict(target="1-100000"), "at most 30 targets"),
    (dict(target="0"), "from 1 to 999"),
    (dict(demo="proof"), "--demo must be one of reading, formula"),
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
    (["--meta-grad", "fd", "--amp"], "refused in bfloat16"),
    (["--amp", "--dtype", "float64"], "--amp computes in bfloat16 over float32 weights"),
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
    # one line on the command line, as above
    with pytest.raises(train.UsageError, match="no usable rows.*question"):
        train.main(train.parse_args(["--task", str(bad), "--steps", "2",
                                     "--out", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,message", [
    ("", "the file is empty"),
    (('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "4"}\n'
      '{"prompt": "3+3?" "answer": 6}\n'),
     "line 3 is not JSON"),
    ('{"prompt": "1+1?", "answer": "2"}\n[1, 2]\n', "line 2 is not a JSON object"),
])
def test_empty_or_broken_task_file_names_the_file_row_and_reason(tmp_path, text, message):
    path = tmp_path / "task.jsonl"
    path.write_text(text)
    with pytest.raises(train.UsageError, match=message):
        train.main(train.Config(task=str(path), steps=1, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_small_task_file_is_refused_at_the_door_and_unusable_rows_are_reported(tmp_path, capsys):
    rows = [{"prompt": f"{a}+1?", "answer": str(a + 1), "demo": f"\\boxed{{{a + 1}}}"}
            for a in range(16)]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(train.UsageError,
                       match="12 train / 1 val / 3 test rows, too few for --batch-size 16"):
        # tiny recipe: B = 16
        train.main(train.Config(task=str(path), steps=1, out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    rows[4].pop("answer")
    rows[9]["answer"] = ""
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train.main(train.Config(task=str(path), steps=1, batch_size=2, group_size=2, max_new_tokens=4,
                            warmup=0, eval_every=1000, save_every=0, skip_test=True,
                            out=str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert ("2 of 16 rows skipped (train row 5: no answer; "
            "train row 10: an empty question or answer)") in err, err


def test_diverging_run_skips_non_finite_steps_then_stops(tmp_path):
    # printed in one line by the command line
    with pytest.raises(train.TrainingError, match="3 non-finite steps in a row"):
        train.main(train.parse_args(["--method", "sft", "--lr", "1e30", "--steps", "20",
                                     "--max-bad-steps", "3", "--batch-size", "4", "--skip-test",
                                     "--out", str(tmp_path / "run")]))
    lines = [json.loads(line)
             for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["skipped"] for m in lines) >= 2


def test_cli_trains_saved_tiny_model_on_gsm8k_file_and_eval_only(tmp_path, tiny_path, math_files):
    out = tmp_path / "run"
    res = run_cli("--model", tiny_path, "--recipe", "tiny", "--task", math_files["gsm8k"],
                  "--steps", "3", "--warmup", "1", "--batch-size", "2", "--group-size", "2",
                  "--max-new-tokens", "6", "--meta-every", "1", "--micro-batch", "2", "--grad-ckpt",
                  "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["task"] == math_files["gsm8k"] and summary["ood_accuracy"] is None
            and 0 <= summary["id_accuracy"] <= 1)
    assert ((out / "checkpoint" / "trainer_state.pt").exists()
            and not (out / "checkpoint.tmp").exists())
    # in this process
    train.main(train.parse_args(["--eval-only", "--model", str(out / "model"), "--recipe", "tiny",
                                 "--task", math_files["gsm8k"], "--max-new-tokens", "6",
                                 "--pass-k", "2", "--out", str(tmp_path / "eval")]))
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert (ev["method"] == "eval-only" and ev["id_accuracy"] == summary["id_accuracy"]
            and 0 <= ev["pass@2"] <= 1)


def test_chat_template_prompt_and_turn_end(tiny_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert (policy.use_chat(tok, "Qwen/Qwen2.5-0.5B-Instruct", "auto")
            and not policy.use_chat(tok, "Qwen/Qwen2.5-0.5B", "auto"))
    assert policy.format_prompt(tok, "2+2?", True).endswith("<|im_start|>assistant\n")
    assert policy.format_prompt(tok, "2+2?", False) == "2+2?"
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert policy.end_id(tok, True) == im_end and policy.end_id(tok, False) == tok.eos_token_id


def test_lora_run_trains_adapters_only_and_saves_a_merged_model(tmp_path, tiny_path):
    pytest.importorskip("peft")
    model, _ = policy.load_policy(tiny_path, lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _, _, out = run(tmp_path, model=tiny_path, lora_r=4, steps=3, warmup=1, meta_every=1,
                    batch_size=2, group_size=2)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_compare_quick_writes_table_and_figure(tmp_path, warm_path):
    import compare
    # a model that scores: differences to pair
    task = ["--model", warm_path, "--recipe", "tiny", "--target", WARM_TASK["target"]]
    results = compare.main(["--quick", "--methods", "sft,amft", "--seeds", "2", "--steps", "3",
                            "--warmup", "1", "--jobs", "2", "--batch-size", "2",
                            "--group-size", "2", "--eval-every", "1", *task,
                            "--out", str(tmp_path)])
    assert set(results) == {"sft", "amft"} and all(len(r) == 2 for r in results.values())
    # --jobs 2: each run trained in a process of its own, its printout kept in its folder
    assert all("after training" in (tmp_path / f"{m}-seed{s}" / "train.log").read_text()
               for m in ("sft", "amft") for s in (0, 1))
    assert not list(tmp_path.glob("*.log"))
    table = (tmp_path / "results.md").read_text()
    assert ("| sft |" in table and "| amft |" in table and "±" in table
            and "| ID − amft [95% CI] |" in table)
    import re
    sft_row = next(line for line in table.splitlines() if line.startswith("| sft |"))
    # paired by seed, with its interval
    assert re.search(r"\| [+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\] \|", sft_row)
    ids = {m: [r["summary"]["id_accuracy"] for r in results[m]] for m in ("sft", "amft")}
    # the mean paired difference
    assert f"{sum(ids['sft']) / 2 - sum(ids['amft']) / 2:+.3f} [" in sft_row
    assert ("`python compare.py --quick --methods sft,amft --seeds 2 --steps 3" in table
            and "(4 runs trained, 0 reused)" in table)
    # made non-trivial: the intervals pair real scores
    assert all(0 < r["summary"]["id_accuracy"] for r in results["sft"])
    try:
        import matplotlib  # noqa: F401  (optional: without it the table is still written)
        assert ((tmp_path / "comparison.png").stat().st_size > 10_000
                and (tmp_path / "amft-seed1" / "curves.png").exists())
    except ImportError:
        assert not (tmp_path / "comparison.png").exists()
    # a finished run is reused, not trained again; a missing seed is trained (here in this process)
    before = (tmp_path / "sft-seed0" / "summary.json").stat().st_mtime
    more = compare.main(["--methods", "sft", "--seeds", "3", "--steps", "3", "--batch-size", "2",
                         *task, "--out", str(tmp_path)])
    assert (tmp_path / "sft-seed0" / "summary.json").stat().st_mtime == before
    assert ([r["summary"]["seed"] for r in more["sft"]] == [0, 1, 2]
            and (tmp_path / "sft-seed2" / "summary.json").exists())
    assert "(1 runs trained, 2 reused)" in (tmp_path / "results.md").read_text()
    assert (compare.mean_std([0.25]) == "0.250"
            and compare.mean_std([0.25, 0.75]) == "0.500 ± 0.354")  # one seed: no "± 0.000"
    assert (compare.difference([0.0, 0.0], [0.0, 0.0]) == "both 0"
            and compare.difference([0.0, 0.0], [0.0, 0.1]).startswith("+0.050 ["))


def test_a_compare_worker_is_interrupted_once_its_parent_is_gone():
    # the watchdog of --jobs: when compare.py is killed, each worker's run gets a Ctrl-C (so it
    # stops at a step boundary with its checkpoint) instead of training on as an orphan
    import threading
    import compare
    watchdog = threading.Thread(target=compare.stop_with_parent, args=(os.getppid(),), daemon=True)
    watchdog.start()
    time.sleep(1.5)
    assert watchdog.is_alive()  # our parent is still there: nothing happens
    with pytest.raises(KeyboardInterrupt):
        # "-1": a parent already gone
        threading.Thread(target=compare.stop_with_parent, args=(-1,), daemon=True).start()
        time.sleep(5)


def test_compare_takes_a_method_with_settings_of_its_own():
    import compare
    assert compare.parse_entry("amft") == ("amft", {})
    assert (compare.parse_entry("amft@H_target_ema=0.02,eta_H=0.03")
            == ("amft", {"H_target_ema": 0.02, "eta_H": 0.03}))
    for bad in ("amft@nope=1", "amft@H_target_ema=", "amft@meta_every=x"):
        with pytest.raises(SystemExit, match="error:"):
            compare.parse_entry(bad)


def test_bench_quick_prints_every_row():
    import bench
    result = bench.main(["--quick"])
    assert (len(result["decode"]) == 3
            and all(ms > 0 and tps > 0 for _, ms, tps, _ in result["decode"]))
    assert (result["decode"][1][3] == 1.0
            and result["agreement"] == {"generate": 1.0, "loop": 1.0, "generate greedy": 1.0,
                                        "loop greedy": 1.0})
    (dtype, micro, ckpt, tokens_s, tflops, _), = result["train"]
    assert tokens_s > 0 and tflops > 0 and ckpt
    assert set(result["steps"]) == {"fixed-mix", "amft first-order"}
    fixed, amft = result["steps"]["fixed-mix"], result["steps"]["amft first-order"]
    # after 2 warm-up steps, steps 3 and 4: amft's meta-gradient every 2 steps
    assert (fixed["meta"] is None and fixed["phases"]["meta"] is None
            and (fixed["n_plain"], fixed["n_meta"]) == (2, 0)
            and (amft["n_plain"], amft["n_meta"]) == (1, 1))
    assert all(v > 0 for k, v in amft["phases"].items()) and fixed["plain"] > 0
    assert (amft["phases"]["meta rollouts"] + amft["phases"]["U backward"]
            == pytest.approx(amft["phases"]["meta"], abs=2e-4))
    assert ("x fixed-mix" in result["table"] and "x generate" in result["table"]
            and "meta every 20, from 1 plain and 1 meta steps" in result["table"]
            and result["table"].startswith(f"| what (cpu; torch {torch.__version__}"))
    # the replayed step (memory.py)
    assert 0 < result["memory"] < 2**30 and "MiB of live tensors" in result["table"]


def test_bench_profiles_the_compiled_decode_step():
    # what a GPU session runs first (bench.py --profile), here on the CPU: no CUDA graphs, but
    # dynamo's guards and the compiled region are there to count, and no graph break
    import bench
    r = bench.main(["--profile", "--quick"])["profile"]
    assert (r["B"], r["C"]) == (4, 8) and r["wall_ms"] > 0
    assert 0 < r["guards_ms"] < r["compiled_regions_ms"] < r["wall_ms"]
    assert r["graphs"]["unique_graphs"] >= 1 and not r["graph_breaks"]
    # the prompts' prefill runs eagerly and is counted apart from the other eager ops
    assert (r["graph_launch_ms"] == 0 and r["prefill_ms"] > 0
            and "aten::linear" not in r["eager_ops"])


def test_bench_writes_its_json_section_by_section(tmp_path):
    import bench
    path = str(tmp_path / "bench.json")
    result = bench.main(["--quick", "--only", "decode", "--json", path])
    with open(path) as f:
        saved = json.load(f)
    assert saved["device"] == "cpu" and len(saved["decode"]) == 3 and "steps" not in saved
    assert saved["table"] == result["table"] and saved["train"] == []


def test_bench_refuses_unknown_sections():
    import bench
    with pytest.raises(SystemExit):
        bench.main(["--only", "decode,nope"])


@pytest.fixture(scope="module")
def instruct_path(tmp_path_factory):
    """A pretrained-like checkpoint, offline: a chat template ending turns with <|im_end|>, a
    generation config that sets processors, no pad token, untied embeddings, 'Instruct' in its
    name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    base = policy.make_tiny_model(str(tmp_path_factory.mktemp("base")),
                                  n_layer=2, n_embd=32, n_head=2)
    tok, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = None
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model.resize_token_embeddings(len(tok))
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                               repetition_penalty=1.05,
                                               eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"),
                                                             tok.eos_token_id])
    path = tmp_path_factory.mktemp("hub") / "Tiny-Instruct"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_pretrained_model_resolves_to_its_recipe(instruct_path):
    cfg = train.parse_args(["--model", instruct_path])
    assert train.resolve(cfg, cuda=False) == "instruct"  # by its name: Tiny-Instruct
    assert ((cfg.task, cfg.lr, cfg.warmup_lr, cfg.warmup, cfg.steps, cfg.meta_every,
             cfg.max_new_tokens, cfg.beta)
            == ("gsm8k", 5e-6, 1e-5, 20, 620, 20, 512, 0.0))
    assert ((cfg.micro_batch, cfg.dtype, cfg.grad_ckpt, cfg.amp, cfg.batch_size, cfg.group_size,
             cfg.sampler) == (16, "float32", True, False, 16, 8, "generate"))
    # the headline command, on a GPU: a base model's recipe, mixed precision, compiled sampler
    cfg = train.parse_args(["--model", "Qwen2.5-0.5B"])
    train.resolve(cfg, cuda=True)
    assert ((cfg.recipe, cfg.task, cfg.lr, cfg.warmup_lr, cfg.warmup, cfg.steps, cfg.dtype,
             cfg.amp, cfg.grad_ckpt, cfg.sampler)
            == ("pretrained", "gsm8k", 5e-6, 2e-5, 100, 700, "float32", True, True, "compiled"))
    cfg = train.parse_args(["--model", "Qwen2.5-0.5B", "--sampler", "loop"])
    train.resolve(cfg, cuda=True)
    assert cfg.sampler == "loop"
    cfg = train.parse_args(["--model", "Qwen2.5-0.5B", "--lr", "3e-6", "--no-grad-ckpt",
                            "--task", "general-points", "--cards", "3"])
    train.resolve(cfg, cuda=True)  # every explicit flag wins
    assert ((cfg.lr, cfg.warmup_lr, cfg.grad_ckpt, cfg.cards, cfg.target, cfg.prompt,
             cfg.max_new_tokens) == (3e-6, 2e-5, False, 3, "24", "plain", 256))
    cfg = train.parse_args([])
    assert (train.resolve(cfg, cuda=True) == "tiny"
            and (cfg.task, cfg.lr, cfg.warmup_lr, cfg.dtype, cfg.prompt, cfg.steps,
                 cfg.max_new_tokens) == ("general-points", 1e-3, 1e-3, "float32", "compact", 700,
                                         24))
    cfg = train.parse_args(["--lr", "5e-4"])  # the tiny recipe's warm-up follows --lr
    train.resolve(cfg, cuda=False)
    assert cfg.warmup_lr == 5e-4


def test_print_config_shows_the_recipe_offline_and_loads_nothing():
    res = run_cli("--model", "Qwen2.5-0.5B", "--print-config", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    shown = json.loads(res.stdout)
    assert ((shown["recipe"], shown["task"], shown["lr"], shown["warmup_lr"], shown["warmup"],
             shown["steps"], shown["batch_size"], shown["group_size"], shown["max_new_tokens"],
             shown["meta_every"], shown["beta"])
            == ("pretrained", "gsm8k", 5e-6, 2e-5, 100, 700, 16, 8, 512, 20, 0.0))
    # no hub model and no dataset is reachable here: had it tried, it would have failed
    assert "Loading" not in res.stderr and not os.path.exists(os.path.join(HERE, "runs", "x"))
    res = run_cli("--model", "Qwen2.5-0.5B-Instruct", "--warmup-lr", "3e-5", "--print-config",
                  timeout=120)
    shown = json.loads(res.stdout)
    assert (shown["recipe"], shown["warmup"], shown["warmup_lr"]) == ("instruct", 20, 3e-5)


def test_a_pretrained_like_checkpoint_trains_evaluates_and_resumes(tmp_path, instruct_path, capsys):
    import data
    # 4-card hands (a file: the full 4-card split takes ~20 s to solve)
    hands = tmp_path / "hands.jsonl"
    hands.write_text("\n".join(json.dumps({"cards": list(h)}) for h in data.all_hands(4)[::40])
                     + "\n")
    out = tmp_path / "run"
    budget = ["--task", str(hands), "--steps", "3", "--warmup", "1", "--batch-size", "2",
              "--group-size", "2", "--max-new-tokens", "8", "--val-prompts", "2",
              "--meta-every", "1"]
    # in this process
    train.main(train.parse_args(["--model", instruct_path, *budget, "--out", str(out)]))
    assert "recipe: instruct" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert ((config["recipe"], config["lr"], config["warmup_lr"], config["prompt"],
             config["micro_batch"], config["target"])
            == ("instruct", 5e-6, 1e-5, "plain", 16, "24"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ([m["phase"] for m in lines] == ["warmup", "main", "main"]
            and lines[1]["rl_loss"] is not None)
    assert json.loads((out / "summary.json").read_text())["id_accuracy"] is not None
    train.main(train.parse_args(["--resume", str(out), "--steps", "4"]))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    # the chat template was chosen by the name 'Tiny-Instruct'; RUN/model has no such name, and
    # config.json keeps the decision, so an eval-only of it scores the prompts the run was scored on
    assert config["chat"] == "on"
    scored = json.loads((out / "summary.json").read_text())
    again = train.main(train.parse_args(["--eval-only", "--model", str(out / "model"),
                                         "--out", str(tmp_path / "eval")]))
    assert again["test_prompts_crc32"] == scored["test_prompts_crc32"]
    bare = train.main(train.parse_args(["--eval-only", "--model", str(out / "model"),
                                        "--task", str(hands), "--chat", "off",
                                        "--out", str(tmp_path / "eval-bare")]))
    # without the template: other prompts
    assert bare["test_prompts_crc32"] != scored["test_prompts_crc32"]
    # on a CPU too (in this process: the command line ran above)
    for precision in (["--dtype", "bfloat16"], ["--amp"]):
        summary = train.main(train.parse_args(["--model", instruct_path, *budget, *precision,
                                               "--skip-test", "--out",
                                               str(tmp_path / precision[-1])]))
        assert summary["steps"] == 3 and summary["skipped_steps"] == 0


def test_eval_only_of_a_run_scores_the_run_own_test_split(tmp_path, tiny_path, capsys):
    # trained with seed 1, evaluated with no flags: the same test prompts it was scored on after
    # training
    summary, _, out = run(tmp_path, model=tiny_path, seed=1, steps=1, warmup=1, skip_test=False,
                          **SMALL)
    assert summary["seed"] == 1
    for where in (out / "model", out):
        again = train.main(train.parse_args(["--eval-only", "--model", str(where),
                                             "--out", str(tmp_path / f"eval-{where.name}")]))
        assert ((again["seed"], again["test_prompts_crc32"], again["id_accuracy"])
                == (1, summary["test_prompts_crc32"], summary["id_accuracy"]))
        assert (again["test_prompts"] == summary["test_prompts"]
                and "task settings" in capsys.readouterr().out)
    other = train.main(train.parse_args(["--eval-only", "--model", str(out / "model"),
                                         "--seed", "0", "--out", str(tmp_path / "eval0")]))
    assert other["test_prompts_crc32"] != summary["test_prompts_crc32"]
    assert "--seed 0 (the run's: 1)" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--model", "Qwen2.5-0.5B"], ["--task", "gsm8k"]])
def test_an_unreachable_hub_fails_at_once_and_says_how_to_run_offline(tmp_path, args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    env["HF_ENDPOINT"] = "https://127.0.0.1"  # nothing listens on its port 443: refused at once
    res = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *args,
                          "--steps", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
    assert (res.returncode != 0 and "hub is unreachable" in res.stderr
            and "HF_HUB_OFFLINE=1" in res.stderr), res.stderr[-2000:]
    assert res.stderr.strip().count("\n") == 0 and not (tmp_path / "run").exists()



@pytest.mark.parametrize("installed", [True, False])
def test_the_run_says_which_math_verifier_it_used(tmp_path, tiny_path, math_files, monkeypatch,
                                                  installed):
    if installed:
        pytest.importorskip("math_verify", reason="math-verify not installed")
    else:
        monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    summary, _, out = run(tmp_path, model=tiny_path, task=math_files["gsm8k"], steps=1, warmup=0,
                          **SMALL)
    assert (summary["verifier"] == json.loads((out / "config.json").read_text())["verifier"]
            == ("math-verify" if installed else "builtin"))
    if not installed:
        with pytest.raises(train.UsageError, match="pip install"):
            run(tmp_path, "asked", model=tiny_path, task=math_files["gsm8k"], steps=1,
                verifier="math-verify")


def test_a_run_from_before_the_split_by_problem_is_not_resumed_and_is_scored_with_a_warning(
        tmp_path, capsys):
    # its training order indexes rows of the old split, and today's test split may hold problems
    # it trained on
    run_dir = tmp_path / "old"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    old = {k: v for k, v in dataclasses.asdict(train.Config(target="10",
                                                            task="general-points")).items()
           if k != "demo"}
    (run_dir / "config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="predates the split of General Points by problem"):
        train.parse_args(["--resume", str(run_dir)])
    (run_dir / "metrics.jsonl").write_text("")
    cfg = train.parse_args(["--eval-only", "--model", str(run_dir)])
    assert cfg.target == "10" and "predates the split" in capsys.readouterr().err
    old["demo"] = "formula"  # a run of today's split: no warning
    (run_dir / "config.json").write_text(json.dumps(old))
    train.parse_args(["--eval-only", "--model", str(run_dir)])
    assert "predates" not in capsys.readouterr().err


def test_long_demonstrations_are_dropped_at_the_door(tmp_path, tiny_path, capsys):
    """A file whose every fourth answer is 600 characters long: with --max-demo-tokens 100 those
    training rows are dropped, the run names them, and trains on the rest."""
    import data
    from conftest import write_jsonl
    rows = [{"question": f"What is {a} plus {a}?",
             "answer": ("Think. " * 84 if a % 4 == 0 else "") + f"#### {2 * a}"}
            for a in range(1, 41)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    long_in_train = [i for i, r in enumerate(data.load_task(path, 0)["train"])
                     if len(r["demo"]) >= 100]
    assert long_in_train
    summary, lines, _ = run(tmp_path, model=tiny_path, task=path, steps=2, warmup=1,
                            max_demo_tokens=100, **SMALL)
    said = capsys.readouterr().out
    assert (f"dropped {len(long_in_train)} training rows" in said
            and ", ".join(map(str, long_in_train[:3])) in said)
    assert summary["steps"] == 2 and len(lines) == 2
    kept, dropped = data.drop_long_demos([{"demo": "ab"}, {"demo": "abcd"}],
                                         lambda ts: [len(t) for t in ts], 3)
    assert (kept, dropped) == ([{"demo": "ab"}], [1])
    assert (data.drop_long_demos([{"demo": "abcd"}], lambda ts: [len(t) for t in ts], 0)
            == ([{"demo": "abcd"}], []))
