"""
Scoring: rewards of completions, greedy accuracy (and pass@k) on a split, and the held-out
test accuracies before and after training, General Points hands with and without a face card
apart, as a small table for a person.
"""
import torch
from tqdm import tqdm

import data
import parallel
import sampling


def score(texts, rows, G, verifier):
    """Rewards (B, G) of B*G completions, prompt-major."""
    return torch.tensor([data.reward(rows[i // G], t, verifier)
                         for i, t in enumerate(texts)]).view(len(rows), G)


@torch.no_grad()
def evaluate(model, tok, rows, cfg, eos, k=0, desc="evaluating") -> dict:
    """{"accuracy": greedy pass@1}: the fraction of rows whose greedy completion earns reward 1;
    with k, also "pass@k" (any of k samples at --temperature earns it) and "avg@k" (the mean
    accuracy of the k samples, as AIME and AMC are reported). A progress bar counts the rows."""
    model.eval()
    hits, hits_k, mean_k = 0.0, 0.0, 0.0
    # with several processes each scores its rows, and the hits add up
    mine = parallel.strided(rows)
    bar = tqdm(total=len(rows), desc=desc, unit="row", leave=False, dynamic_ncols=True,
               disable=not parallel.is_main())
    # as many calls on every process (FSDP needs it)
    for i in range(0, -(-len(rows) // parallel.world()), cfg.eval_batch):
        chunk = mine[i:i + cfg.eval_batch]
        n = len(chunk)  # a process with fewer rows scores a stand-in row and counts none of it
        chunk = chunk or rows[:1]
        prompts = [r["prompt"] for r in chunk]
        greedy = sampling.sample(model, tok, prompts, G=1, max_new_tokens=cfg.max_new_tokens,
                                 greedy=True, eos=eos, sampler=cfg.sampler)
        hits += score(greedy.texts, chunk, 1, cfg.verifier)[:n].sum().item()
        if k:
            drawn = sampling.sample(model, tok, prompts, G=k, temperature=cfg.temperature,
                                    max_new_tokens=cfg.max_new_tokens, eos=eos, sampler=cfg.sampler)
            correct = (score(drawn.texts, chunk, k, cfg.verifier)[:n] == 1).float()  # (n, k)
            hits_k += correct.max(1).values.sum().item()
            mean_k += correct.mean(1).sum().item()
        bar.update(n * parallel.world())
    bar.close()
    model.train()
    hits, hits_k, mean_k = parallel.total(hits), parallel.total(hits_k), parallel.total(mean_k)
    n = max(len(rows), 1)
    with_k = {f"pass@{k}": hits_k / n, f"avg@{k}": mean_k / n} if k else {}
    return {"accuracy": hits / n, **with_k}


def benchmark_scores(model, tok, benchmarks: dict, cfg, eos, k=0) -> dict:
    """{name: {"rows", "pass@1" (greedy), and with k "pass@k", "avg@k"}} of every benchmark,
    each scored whole."""
    result = {}
    for name, rows in benchmarks.items():
        scores = evaluate(model, tok, rows, cfg, eos, k, desc=f"scoring {name}")
        result[name] = {"rows": len(rows), "pass@1": scores.pop("accuracy"), **scores}
    return result


def held_out_accuracy(model, tok, splits, cfg, eos, k=0, benchmarks=None) -> dict:
    """Greedy accuracy on the test split(s) (None when --skip-test), and pass@k on the ID test
    when k > 0. General Points hands are also scored apart by whether they hold a J, Q or K: the
    OOD rule changes those cards' values only, so an OOD hand without them differs from its ID
    twin in the rule's text alone (id_/ood_accuracy_faces and _no_faces)."""
    result = {"id_accuracy": None, "ood_accuracy": None}
    if benchmarks:  # --eval-tasks: they, in place of the task's test split
        return dict(result, eval=None if cfg.skip_test else benchmark_scores(model, tok, benchmarks,
                                                                            cfg, eos, k))
    for name, split in (("id", "test"), ("ood", "test_ood")):
        rows = [] if cfg.skip_test else splits.get(split, [])
        if not rows:
            continue
        pass_k = k if name == "id" else 0
        if all("cards" in r for r in rows):
            parts = {"faces": [r for r in rows if data.has_face(r)],
                     "no_faces": [r for r in rows if not data.has_face(r)]}
        else:
            parts = {"all": rows}
        scores = {part: evaluate(model, tok, part_rows, cfg, eos, pass_k,
                                 desc=f"scoring {split}" + ("" if part == "all" else f" ({part})"))
                  for part, part_rows in parts.items() if part_rows}
        # the parts, weighted by their rows, give the whole
        for key in ("accuracy", *([f"pass@{pass_k}", f"avg@{pass_k}"] if pass_k else [])):
            result[f"{name}_accuracy" if key == "accuracy" else key] = (
                sum(s[key] * len(parts[p]) for p, s in scores.items()) / len(rows))
        result.update({f"{name}_accuracy_{p}": scores[p]["accuracy"] if p in scores else None
                       for p in parts if p != "all"})
    return result


def accuracy_table(before: dict, after: dict) -> str:
    """The held-out accuracies before and after training, aligned, to 3 digits (absent: -)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"{'':24}{'before':>8}{'after':>8}"]
    for name, scores in (after.get("eval") or {}).items():  # --eval-tasks: one row per benchmark
        was = (before.get("eval") or {}).get(name, {})
        for key in scores:
            if key != "rows":
                label = f"{name} {key}" if key != "pass@1" else f"{name} ({scores['rows']} rows)"
                lines.append(f"{label[:23]:24}{fmt(was.get(key)):>8}{fmt(scores[key]):>8}")
    for key, label in [("id_accuracy", "ID test"), ("id_accuracy_faces", "  hands with J, Q or K"),
                       ("id_accuracy_no_faces", "  hands without"), ("ood_accuracy", "OOD test"),
                       ("ood_accuracy_faces", "  hands with J, Q or K"),
                       ("ood_accuracy_no_faces", "  hands without"),
                       *[(k, f"ID {k}") for k in after if k.startswith(("pass@", "avg@"))]]:
        if key in after and (after[key] is not None or before.get(key) is not None):
            lines.append(f"{label:24}{fmt(before.get(key)):>8}{fmt(after[key]):>8}")
    return "\n".join(lines)
