"""
Math tasks and the benchmarks a run is scored on, all through `datasets`, from the hub (or its
cache) or from a local .jsonl/.json/.parquet file of the same schema.

Training tasks (`--task`): a source's train split trains (5% of it, at most 200 rows, is the
validation split that the meta-gradient's U and the periodic accuracy check use), and its test
split, when it has one, is the task's own test set.
  gsm8k   openai/gsm8k "main" (7,473 train / 1,319 test): question / answer; the worked answer
          (calculator annotations removed, "#### N" turned into "The final answer is \boxed{N}.")
          is the demonstration.
  math    DigitalLearningGmbH/MATH-lighteval (7,500 train / 5,000 test): problem / solution; the
          answer is the solution's last \boxed{}. MATH-500 is drawn from MATH's test split, so
          training on the train split keeps it clean.
  openr1  Elliott/Openr1-Math-46k-8192 (LUFFY's): chat `prompt`, `target`,
          reward_model.ground_truth.
  FILE    any of these schemas, or generic rows {"prompt", "answer", "demo"}.

Benchmarks (`--eval-tasks`), each scored whole: gsm8k (its test split), math500, aime24, amc23,
minerva, olympiadbench; a local file (every row of it); or NAME=FILE (a benchmark saved as a
file, scored under its name). An evaluation row needs a question and an answer, no
demonstration. A benchmark that is only a test set is refused as a training task.

Held out means held out: a training or validation row whose problem text (whitespace
normalised) stands in any evaluation set of the run (a benchmark, or the task's own test split)
is dropped before the split, and the run says how many (math_task's "overlap"). Every prompt
asks for the final answer in \boxed{}.
"""
import contextlib
import json
import os
import random
import re
import sys

import rewards

# name: (hub id, config) of the training tasks
TRAIN = {"gsm8k": ("openai/gsm8k", "main"),
         "math": ("DigitalLearningGmbH/MATH-lighteval", "default"),
         "openr1": ("Elliott/Openr1-Math-46k-8192", None)}
# name: (hub id, config, split) of the benchmarks, each scored whole
BENCHMARKS = {"gsm8k": ("openai/gsm8k", "main", "test"),            # 1,319
              "math500": ("HuggingFaceH4/MATH-500", None, "test"),  # 500, from MATH's test split
              "aime24": ("HuggingFaceH4/aime_2024", None, "train"),  # 30
              "amc23": ("math-ai/amc23", None, "test"),              # 40
              "minerva": ("math-ai/minervamath", None, "test"),      # 272
              "olympiadbench": ("math-ai/olympiadbench", None, "test")}  # 675
# test sets only: never training data
TEST_ONLY = tuple(name for name in BENCHMARKS if name not in TRAIN)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _text(x) -> str:
    """A chat message list (OpenR1's `prompt` and `target`) or a string, as plain text."""
    if isinstance(x, list):
        turns = [m.get("content", "") for m in x
                 if isinstance(m, dict) and m.get("role") != "system"]
        return str(turns[-1]) if turns else ""
    return "" if x is None else str(x)


def _answer(x) -> str | None:
    """An answer field as text: OlympiadBench's is a list (several answers: joined by commas),
    AMC 2023's a number (27.0 -> '27')."""
    if isinstance(x, list):
        x = ", ".join(str(a) for a in x) if x else None
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return None if x is None else str(x)


def math_row(ex: dict):
    """{"prompt", "demo", "answer", "problem"} from one example of a known schema, or None.
    Field names are read case-blind (Maxwell-Jia/AIME_2024 writes Problem / Answer).
      GSM8K: question / answer ('... #### 72')
      MATH-500, AIME 2024: problem / solution / answer
      MATH (lighteval): problem / solution (the answer is its last box)
      OpenR1 (LUFFY): prompt / target / reward_model.ground_truth
      OlympiadBench: question / final_answer (a list)
      AMC 2023, Minerva, generic: question or prompt / answer (/ demo)"""
    ex = {str(k).lower(): v for k, v in ex.items()}
    demo = None
    if "question" in ex and "####" in str(ex.get("answer", "")):
        work, _, answer = str(ex["answer"]).rpartition("####")
        work = re.sub(r"<<[^>]*>>", "", work).strip()  # GSM8K's calculator annotations
        answer = answer.strip()
        problem, demo = ex["question"], f"{work}\nThe final answer is \\boxed{{{answer}}}."
    elif "problem" in ex and ("answer" in ex or "solution" in ex):
        problem, demo = ex["problem"], ex.get("solution")
        answer = (_answer(ex["answer"]) if "answer" in ex
                  else rewards.extract_answer(str(demo or "")))
    elif "prompt" in ex and isinstance(ex.get("reward_model"), dict):
        problem, demo, answer = (_text(ex["prompt"]), _text(ex.get("target")) or None,
                                 ex["reward_model"].get("ground_truth"))
    elif "question" in ex and "final_answer" in ex:
        problem, answer = ex["question"], _answer(ex["final_answer"])
    elif ("question" in ex or "prompt" in ex) and "answer" in ex:
        problem, demo, answer = ex.get("question", ex.get("prompt")), ex.get("demo"), ex["answer"]
    else:
        return None
    answer = _answer(answer)
    if not problem or not isinstance(problem, str) or answer is None or not answer.strip():
        return None
    prompt = problem if "\\boxed" in problem else f"{problem}\n{INSTRUCTION}"
    return {"prompt": prompt, "demo": str(demo) if demo else None, "answer": answer,
            "problem": problem}


def why_unusable(ex: dict) -> str:
    """Why math_row(ex) is None, in a few words."""
    fields = sorted(str(k).lower() for k, v in ex.items() if v is not None)
    if any(k in fields for k in ("question", "problem", "prompt")):
        return ("no answer" if not any(k in fields for k in ("answer", "final_answer", "solution",
                                                             "reward_model"))
                else "an empty question or answer")
    return f"its fields {fields} match no schema"


# ---------------------------------------------------------------------------- loading
@contextlib.contextmanager
def local_file_quiet(datasets):
    """No "Generating train split" bar while `datasets` reads a local file (it says nothing there;
    downloads keep theirs)."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def check_json_file(path: str, flag: str = "--task"):
    """Read a .jsonl/.json file ourselves before `datasets` does, so that an empty file or a row
    that is not JSON is reported by file, row and reason in one line (ValueError)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{flag} {path}: the file is empty")
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{flag} {path}: line {n} is not JSON "
                                     f"({e.msg}, column {e.colno})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{flag} {path}: line {n} is not a JSON object "
                                     f"({{\"field\": value, ...}})")
    else:
        try:
            json.loads(text)
        except ValueError as e:
            raise ValueError(f"{flag} {path}: not JSON "
                             f"({e.msg}, line {e.lineno}, column {e.colno})") from None


def load_hub(name: str, repo: str, config, flag: str, split=None):
    """A DatasetDict (or one split) from the hub or its cache; a one-line ValueError that says to
    pass a file where the hub cannot be reached."""
    import datasets  # imported here: only the loaders need it
    from model import OFFLINE_HINT, hub_offline, hub_reachable
    hint = f"save it as a file where there is network and pass {flag} path/to/{name}.jsonl"
    if not hub_offline() and not hub_reachable():
        raise ValueError(f"{flag} {name}: cannot load {repo}: {OFFLINE_HINT}; or {hint}")
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{flag} {name}: cannot load {repo} from the hub or the local cache "
                         f"({first}); {hint}") from None


def load_file(path: str, flag: str = "--task"):
    """A DatasetDict from a local .jsonl/.json/.parquet file (its rows are the 'train' split)."""
    import datasets
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(os.path.splitext(path)[1])
    if kind is None:
        raise ValueError(f"{flag} {path}: expected a .jsonl, .json or .parquet file")
    if kind == "json":
        check_json_file(path, flag)
    try:
        with local_file_quiet(datasets):
            return datasets.load_dataset(kind, data_files=path)
    except Exception as e:
        raise ValueError(f"{flag} {path}: cannot read it: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None


def rows_of(splits: dict, source: str, flag: str) -> dict:
    """{split: [row]} of a {split: dataset}, the unusable rows counted and reported in one note;
    ValueError when none is usable."""
    rows, skipped, total = {}, [], 0
    for name, split in splits.items():
        rows[name] = []
        for i, ex in enumerate(split):
            row = math_row(ex)
            rows[name].append(row) if row is not None else skipped.append(
                f"{name} row {i + 1}: {why_unusable(ex)}")
        total += len(split)
    if skipped and any(rows.values()):  # reported, not dropped silently
        print(f"note: {flag} {source}: {len(skipped)} of {total} rows skipped "
              f"({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})", file=sys.stderr)
    if not any(rows.values()):
        fields = next(iter(splits.values())).column_names if splits else []
        raise ValueError(f"{flag} {source}: no usable rows; fields found: {fields}; expected "
                         "question/answer (GSM8K), problem/solution/answer (MATH), "
                         "question/final_answer (OlympiadBench), prompt/target/reward_model "
                         "(OpenR1) or prompt/answer/demo")
    return rows


def math_task(task: str, seed: int = 0, test_frac=0.2, max_val=200, need_demos=True,
              exclude=frozenset()):
    """Train / val / test rows. The source's test split is used when it has one; otherwise 20%
    of the shuffled rows. Validation is 5% of train (at most max_val): the meta-gradient's U.
    need_demos: training rows without a demonstration are dropped, and none left is an error.
    exclude: normalised problems of the run's evaluation sets; the rows that hold one are taken
    out before the split, into "overlap" (a test split of the source keeps its rows)."""
    dd = load_hub(task, *TRAIN[task], "--task") if task in TRAIN else load_file(task)
    rows = rows_of(dict(dd), task, "--task")
    overlap = []
    for name in [n for n in rows if n != "test" or len(rows) == 1]:
        overlap += [r for r in rows[name] if normalised(r["problem"]) in exclude]
        rows[name] = [r for r in rows[name] if normalised(r["problem"]) not in exclude]
    rng = random.Random(seed)
    if "test" in rows and len(rows) > 1:
        test = rows.pop("test")
        train = rows.get("train") or next(iter(rows.values()))
    else:
        pool = [r for split in rows.values() for r in split]
        rng.shuffle(pool)
        n_test = max(1, int(len(pool) * test_frac))
        test, train = pool[:n_test], pool[n_test:]
    train = list(train)
    rng.shuffle(train)
    n_val = max(1, min(max_val, len(train) // 20))
    val, train = train[:n_val], [r for r in train[n_val:] if r["demo"] or not need_demos]
    if not train and need_demos:
        raise ValueError(f"--task {task}: no training row has a demonstration "
                         "(solution / target / demo); a file to score only goes to --eval-tasks")
    # the source's own test split is an evaluation set too
    in_test = {normalised(r["problem"]) for r in test}
    overlap += [r for r in train + val if normalised(r["problem"]) in in_test]
    train, val = ([r for r in rows_ if normalised(r["problem"]) not in in_test]
                  for rows_ in (train, val))
    return {"train": train, "val": val, "test": test, "overlap": overlap}


def check_benchmark(spec: str):
    """A one-line ValueError for an --eval-tasks entry that names nothing loadable, before anything
    is loaded."""
    name, _, path = spec.partition("=")
    if path and not (name and os.path.isfile(path)):
        raise ValueError(f"--eval-tasks {spec}: NAME=FILE needs a name and an existing file")
    if not path and spec not in BENCHMARKS and not os.path.isfile(spec):
        raise ValueError(f"--eval-tasks {spec}: not one of {', '.join(BENCHMARKS)}, an existing "
                         "file, or NAME=FILE")


def load_benchmark(spec: str):
    """(name, rows) of one --eval-tasks entry, scored whole: a benchmark's name (its hub split),
    a local file (every row; named by the file), or NAME=FILE (a benchmark saved as a file)."""
    flag = "--eval-tasks"
    name, _, path = spec.partition("=")
    if path:
        splits = dict(load_file(path, flag))
    elif spec in BENCHMARKS:
        repo, config, split = BENCHMARKS[spec]
        splits = {split: load_hub(spec, repo, config, flag, split=split)}
    else:
        check_benchmark(spec)
        name, splits = os.path.splitext(os.path.basename(spec))[0], dict(load_file(spec, flag))
    rows = rows_of(splits, spec, flag)
    return name, [r for split in rows.values() for r in split]


def normalised(text: str) -> str:
    """A problem's text with its whitespace normalised: what 'the same problem' means here."""
    return " ".join(str(text).split())


def problems(*evaluation_sets) -> frozenset:
    """The normalised problems of evaluation sets (rows without a problem text, General Points
    hands, are held out by construction)."""
    return frozenset(normalised(r["problem"]) for rows in evaluation_sets for r in rows
                     if "problem" in r)
