"""
Several processes, one run: train.py under torchrun with 2 CPU processes (gloo), checked
against itself (every rank holds the same weights and mu after every step), against one
process (SFT steps on the same global batch agree to float rounding), and across a resume
from 2 processes to 1. Each launch takes a few seconds: the processes start torch and
transformers, then run a handful of steps of the tiny model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import HERE, run_cli


def torchrun(*args, n=2, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           os.path.join(HERE, "train.py"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_in_sync(rank, world, port, q):
    import torch.distributed as dist
    import parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        two = torch.tensor(2.0) if rank == 0 else torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))  # one float32 ulp apart
        params = [torch.full((3,), 1.0), two.expand(2).clone()]
        q.put((rank, parallel.in_sync([0.8, parallel.fingerprint(params)]), parallel.in_sync([0.8, 7.0]),
               parallel.total(rank + 1.0), parallel.gather(torch.tensor([[rank, 10 + rank]])).tolist()))
    finally:
        dist.destroy_process_group()


def test_the_sync_check_and_the_reductions_across_two_processes():
    # the check that guards every multi-process step can fail: weights one rounding apart are caught
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_check_in_sync, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, differ, same, total, gathered in results:
        assert differ is False and same is True and total == 3.0 and gathered == [[0, 10], [1, 11]]


@pytest.fixture(scope="module")
def two_process_amft(tmp_path_factory, warm_path):
    """amft on a model that solves some hands (so dU/dmu != 0), 2 processes, a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("ddp") / "amft"
    res = torchrun("--model", warm_path, "--recipe", "tiny", "--method", "amft", "--warmup", "0", "--steps", "4",
                   "--meta-every", "1", "--batch-size", "4", "--group-size", "4", "--val-prompts", "8", "--save-every", "2",
                   "--skip-test", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_two_processes_hold_the_same_weights_and_mu_after_every_step(two_process_amft):
    out, res = two_process_amft
    lines = metrics(out)
    # train.py checks after every step that both ranks hold bit-identical mu, H_target and a float64 sum of all
    # weights (test above: that check catches one rounding); a difference would have stopped the run with an error
    assert [m["step"] for m in lines] == [0, 1, 2, 3] and "differ" not in res.stderr
    assert any(m["meta_grad"] not in (None, 0.0) for m in lines)  # a real meta-gradient, reduced over both ranks
    assert lines[-1]["mu"] != 0.8 and all(0 < m["val_reward"] < 1 for m in lines[:1])
    assert res.stdout.count("after training") == 1  # rank 0 speaks, rank 1 is quiet
    assert json.loads((out / "config.json").read_text())["batch_size"] == 4


def test_resume_from_two_processes_in_one(two_process_amft):
    out, _ = two_process_amft
    res = run_cli("--resume", str(out), "--steps", "6")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = metrics(out)
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4, 5] and json.loads((out / "summary.json").read_text())["steps"] == 6


def test_sft_on_two_processes_matches_one_process(tmp_path):
    # deterministic: no sampling. The same global batch of 8 demonstrations per step, split 4 + 4; each process's
    # loss is its share of the global token mean, so the summed gradients are the single process's
    common = ["--method", "sft", "--steps", "3", "--batch-size", "8", "--save-every", "0", "--skip-test"]
    two = torchrun(*common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["prompts_crc32"] for m in a] == [m["prompts_crc32"] for m in b]
    for x, y in zip(a, b):
        assert y["sft_loss"] == pytest.approx(x["sft_loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert a[-1]["sft_loss"] < a[0]["sft_loss"] - 0.5  # it trained (lr 1e-3): the weights below moved
    w1, w2 = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6) for k in w1)


def test_a_batch_the_processes_cannot_share_is_refused(tmp_path):
    res = torchrun("--batch-size", "3", "--steps", "1", "--out", str(tmp_path / "odd"))
    assert res.returncode != 0 and "--batch-size 3 must be a multiple of the 2 processes" in res.stderr
    assert not (tmp_path / "odd").exists()
