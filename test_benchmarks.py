"""
Tests of the math tasks and benchmarks (math_tasks.py): each benchmark's loader on a local file
written in its hub schema, held-out problems kept out of training, and the scores a benchmark
reports (pass@1, pass@k, avg@k). Offline, in seconds:
    HF_HUB_OFFLINE=1 python -m pytest -q test_benchmarks.py
"""
import json

import datasets
import pytest

import data
import math_tasks
from rewards import math_reward

# each benchmark's hub id, config and split, as their dataset cards and lighteval load them
HUB = {"gsm8k": ("openai/gsm8k", "main", "test"),
       "math500": ("HuggingFaceH4/MATH-500", None, "test"),
       "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
       "amc23": ("math-ai/amc23", None, "test"),
       "minerva": ("math-ai/minervamath", None, "test"),
       "olympiadbench": ("math-ai/olympiadbench", None, "test")}


def schema_row(name: str, i: int) -> tuple:
    """(a row in the benchmark's schema, the question, the true answer as a person writes it)."""
    q = f"Problem {i}: what is {i} plus {i + 2}?"
    rows = {
        "gsm8k": {"question": q, "answer": f"{i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n"
                                           f"#### {2 * i + 2:,}"},
        "math500": {"problem": q, "solution": f"So $\\boxed{{{2 * i + 2}}}$.",
                    "answer": str(2 * i + 2), "subject": "Algebra", "level": 2,
                    "unique_id": f"test/algebra/{i}.json"},
        "aime24": {"id": 60 + i, "problem": q, "solution": "...", "answer": str(2 * i + 2),
                   "url": "https://artofproblemsolving.com/", "year": "2024"},
        # AMC 2023's answers are numbers: 27.0
        "amc23": {"id": i, "question": q, "answer": float(2 * i + 2), "url": "https://aops/"},
        "minerva": {"question": q, "answer": str(2 * i + 2)},
        # OlympiadBench's final answer is a list of LaTeX strings
        "olympiadbench": {"id": 2000 + i, "question": q, "solution": ["..."],
                          "final_answer": [f"${2 * i + 2}$"], "context": None,
                          "modality": "Text-only", "is_multiple_answer": False, "unit": None,
                          "answer_type": "Numerical", "subfield": "Algebra", "language": "English"},
    }
    return rows[name], q, str(2 * i + 2)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """datasets.load_dataset for hub ids, answered from local files ({repo: {split: path}}):
    the real loader reads them; each call is recorded."""
    files, calls, real = {}, [], datasets.load_dataset

    def load(repo, config=None, split=None, **kw):
        if repo in ("json", "parquet"):
            return real(repo, config, split=split, **kw)
        calls.append((repo, config, split))
        with math_tasks.local_file_quiet(datasets):
            dd = real("json", data_files=files[repo])
        return dd[split] if split else dd
    monkeypatch.setattr(datasets, "load_dataset", load)
    return files, calls


@pytest.mark.parametrize("name", list(HUB))
def test_each_benchmark_loads_whole_from_its_hub_id_in_its_schema(name, hub, tmp_path):
    files, calls = hub
    rows = [schema_row(name, i) for i in range(1, 13)]
    repo, config, split = HUB[name]
    files[repo] = {split: write_jsonl(tmp_path / f"{name}.jsonl", [r for r, _, _ in rows])}
    got_name, got = math_tasks.load_benchmark(name)
    assert calls == [(repo, config, split)] and got_name == name
    assert len(got) == 12  # whole
    for row, (_, question, truth) in zip(got, rows):
        assert row["problem"] == question and question in row["prompt"]
        assert "\\boxed{}" in row["prompt"]
        # the answer as a person writes it scores 1, a wrong one 0
        assert math_reward(f"so \\boxed{{{truth}}}", row["answer"]) == 1.0, (name, row)
        assert math_reward(f"so \\boxed{{{int(truth) + 1}}}", row["answer"]) == 0.0, (name, row)


def test_a_benchmark_file_is_scored_whole_and_needs_no_demonstration(tmp_path):
    # an AIME-style file of 30 problems: question and answer, nothing else
    aime = write_jsonl(tmp_path / "aime_like.jsonl",
                       [{"problem": f"Find {i}.", "answer": str(i)} for i in range(30)])
    name, rows = math_tasks.load_benchmark(aime)
    assert (name, len(rows)) == ("aime_like", 30) and all(r["demo"] is None for r in rows)
    name, rows = math_tasks.load_benchmark(f"aime24={aime}")
    assert (name, len(rows)) == ("aime24", 30)
    # Maxwell-Jia/AIME_2024 writes its fields capitalised, its answers as numbers
    path = write_jsonl(tmp_path / "maxwell.jsonl", [{"ID": f"2024-I-{i}", "Problem": f"Find {i}.",
                                                     "Solution": "...", "Answer": i}
                                                    for i in range(1, 16)])
    rows = math_tasks.load_benchmark(path)[1]
    assert len(rows) == 15 and [r["answer"] for r in rows[:2]] == ["1", "2"]
    # as a training task, the same file has no demonstration to imitate
    with pytest.raises(ValueError, match="no training row has a demonstration"):
        data.load_task(aime)
    assert len(data.load_task(aime, need_demos=False)["test"]) == 6  # 20%: the task's test split


def test_math_trains_on_maths_train_split_and_reads_the_answer_from_the_solution(hub, tmp_path):
    files, calls = hub
    # DigitalLearningGmbH/MATH-lighteval: problem / level / solution / type, no answer field
    train = [{"problem": f"Train problem {i}?", "level": "Level 1", "type": "Algebra",
              "solution": f"First $\\boxed{{1}}$ then $\\boxed{{\\frac{{{i}}}{{3}}}}$."}
             for i in range(1, 41)]
    test = [{"problem": f"Test problem {i}?", "level": "Level 2", "type": "Algebra",
             "solution": f"$\\boxed{{{i}}}$"} for i in range(1, 11)]
    files["DigitalLearningGmbH/MATH-lighteval"] = {
        "train": write_jsonl(tmp_path / "train.jsonl", train),
        "test": write_jsonl(tmp_path / "test.jsonl", test)}
    splits = data.load_task("math")
    assert calls == [("DigitalLearningGmbH/MATH-lighteval", "default", None)]
    assert len(splits["train"]) + len(splits["val"]) == 40 and len(splits["test"]) == 10
    assert all(r["problem"].startswith("Train") for r in splits["train"] + splits["val"])
    row = splits["train"][0]
    assert row["answer"] == row["demo"].rsplit("boxed{", 1)[1][:-3]  # the last box: \frac{i}{3}
    assert data.reward(row, row["demo"]) == 1.0
    with pytest.raises(ValueError, match="is a test set"):
        data.load_task("math500")


def test_training_rows_holding_an_evaluation_problem_are_dropped(tmp_path):
    evaluation = [{"problem": f"Evaluation problem number {i}?", "answer": str(i)}
                  for i in range(30)]
    # 5 of them planted in a GSM8K-format training file, their whitespace changed
    planted = [{"question": "  Evaluation problem\nnumber  " + f"{i}? ", "answer": f"x\n#### {i}"}
               for i in (3, 7, 11, 19, 23)]
    own = [{"question": f"Training problem {i}?", "answer": f"x\n#### {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", own + planted)
    exclude = math_tasks.problems(math_tasks.load_benchmark(
        write_jsonl(tmp_path / "eval.jsonl", evaluation))[1])
    splits = data.load_task(path, exclude=exclude)
    assert len(splits["overlap"]) == 5
    kept = [r["problem"] for s in ("train", "val", "test") for r in splits[s]]
    assert len(kept) == 40 and not any(p.startswith("  Evaluation") for p in kept)
    # without evaluation sets nothing goes
    assert data.load_task(path)["overlap"] == []


def test_a_row_in_the_sources_own_test_split_never_trains(hub, tmp_path):
    files, _ = hub
    train = [{"question": f"Q{i}?", "answer": f"x\n#### {i}"} for i in range(40)]
    test = [{"question": f"Q{i}?", "answer": f"x\n#### {i}"} for i in (1, 2)]  # duplicated
    files["openai/gsm8k"] = {"train": write_jsonl(tmp_path / "train.jsonl", train),
                             "test": write_jsonl(tmp_path / "test.jsonl", test)}
    splits = data.load_task("gsm8k")
    assert len(splits["test"]) == 2 and len(splits["overlap"]) == 2
    assert not {"Q1?", "Q2?"} & {r["problem"] for r in splits["train"] + splits["val"]}


# ------------------------------------------------------------ scores, and a run that uses them
def test_pass_at_1_pass_at_k_and_avg_at_k_count_what_they_say(tiny_path, monkeypatch):
    import model as policy
    import scoring
    import train
    model, tok = policy.load_policy(tiny_path)
    rows = [{"prompt": f"Find {i}.", "answer": str(i), "problem": f"Find {i}."} for i in range(10)]
    cfg = train.Config(model=tiny_path, recipe="tiny", max_new_tokens=4, pass_k=4)
    train.resolve(cfg, cuda=False)
    k, calls = 4, []

    # rows 0-2 right when greedy; when sampled, rows 0-5 right in their first sample only
    def reward(row, text, verifier="builtin"):
        calls.append(row["answer"])
        j = len(calls) - 1 - len(rows)  # the sampled calls, prompt-major
        if j < 0:
            return float(int(row["answer"]) < 3)
        return float(j % k == 0 and int(row["answer"]) < 6)
    monkeypatch.setattr(data, "reward", reward)
    scores = scoring.benchmark_scores(model, tok, {"made-up": rows}, cfg, [tok.eos_token_id], k)
    assert scores == {"made-up": {"rows": 10, "pass@1": 0.3, "pass@4": 0.6, "avg@4": 0.15}}
    assert len(calls) == 10 * (1 + k)


def test_a_stand_in_of_the_pretrained_recipe_scores_two_benchmarks_whole(tmp_path, tiny_path,
                                                                         capsys):
    import train
    # a GSM8K-format training file with 5 problems of an AIME-style evaluation file planted in it
    aime = [{"problem": f"Evaluation problem number {i}?", "answer": str(i)} for i in range(30)]
    amc = [{"question": f"How many {i}?", "answer": float(i)} for i in range(12)]
    gsm = [{"question": f"Tom has {a} pens and buys {b}. How many?",
            "answer": f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
           for a in range(1, 9) for b in range(1, 6)]
    gsm += [{"question": f"Evaluation problem  number {i}?", "answer": f"so\n#### {i}"}
            for i in (3, 7, 11, 19, 23)]
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", r)
             for n, r in (("aime", aime), ("amc", amc), ("gsm", gsm))}
    out = tmp_path / "run"
    summary = train.main(train.parse_args([
        "--model", tiny_path, "--recipe", "pretrained", "--task", files["gsm"],
        "--eval-tasks", f"aime24={files['aime']},{files['amc']}", "--pass-k", "2",
        "--steps", "3", "--warmup", "1", "--batch-size", "2", "--group-size", "2",
        "--max-new-tokens", "8", "--micro-batch", "4", "--val-prompts", "2", "--meta-every", "1",
        "--eval-every", "2", "--out", str(out)]))
    printed = capsys.readouterr().out
    assert summary["train_rows_dropped_overlap"] == 5 and "dropped 5 rows" in printed
    for when in ("eval", "eval_before"):
        assert {n: s["rows"] for n, s in summary[when].items()} == {"aime24": 30, "amc": 12}
        assert all(set(s) == {"rows", "pass@1", "pass@2", "avg@2"}
                   for s in summary[when].values())
    assert "aime24 (30 rows)" in printed and "amc avg@2" in printed
    config = json.loads((out / "config.json").read_text())
    assert ((config["recipe"], config["lr"], config["warmup_lr"], config["group_size"])
            == ("pretrained", 5e-6, 2e-5, 2))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in lines] == [2e-5, 5e-6, 5e-6]
    # scores only those, loading no training task (gsm8k is not reachable offline)
    again = train.main(train.parse_args([
        "--eval-only", "--model", str(out / "model"), "--task", "gsm8k", "--recipe", "pretrained",
        "--eval-tasks", files["aime"], "--max-new-tokens", "8", "--out", str(tmp_path / "ev")]))
    assert again["eval"]["aime"]["rows"] == 30 and again["eval"]["aime"]["pass@1"] is not None


def test_a_base_model_is_asked_in_words_and_cued_to_answer(tmp_path, tiny_path, math_files):
    import train
    run = train.setup(train.Config(model=tiny_path, recipe="pretrained", task=math_files["gsm8k"],
                                   eval_tasks=math_files["math500"], out=str(tmp_path / "a")))
    for rows in (run.splits["test"], run.splits["val"], *run.benchmarks.values()):
        assert all(r["prompt"].startswith("Question:\n") and r["prompt"].endswith(
            "\\boxed{}.\nAnswer:\nLet's think step by step.\n") for r in rows)
    # the compact prompt of the tiny recipe ends in its own cue ('=') and gets none
    run = train.setup(train.Config(model=tiny_path, recipe="tiny", out=str(tmp_path / "b")))
    assert run.splits["test"][0]["prompt"].endswith("=") and not run.cue
