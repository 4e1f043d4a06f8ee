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


AMFT = ["--recipe", "tiny", "--method", "amft", "--warmup", "0", "--steps", "2", "--meta-every", "1", "--batch-size", "4",
        "--group-size", "4", "--val-prompts", "8", "--meta-grad", "autograd", "--skip-test"]


@pytest.fixture(scope="module")
def amft_runs(tmp_path_factory, warm_path):
    """amft on a model that solves some hands (so dU/dmu != 0) on 2 processes, replicated (DDP-style)
    and sharded (--fsdp), with the same settings and seeds."""
    runs = {}
    for mode in ("replicated", "fsdp"):
        out = tmp_path_factory.mktemp(mode) / "amft"
        res = torchrun("--model", warm_path, *AMFT, *(["--fsdp"] if mode == "fsdp" else []), "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = out, res
    return runs


def test_two_processes_stay_in_sync_and_fsdp_computes_the_same_step(amft_runs):
    # train.py checks after every step that both ranks hold bit-identical mu and H_target, and (replicated) a
    # float64 sum of all weights; the test above shows that check catches one rounding. A difference stops the run.
    (rep, res), (fsdp, _) = amft_runs["replicated"], amft_runs["fsdp"]
    a, b = metrics(rep), metrics(fsdp)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1] and "differ" not in res.stderr
    assert res.stdout.count("after training") == 1  # rank 0 speaks, rank 1 is quiet
    assert all(m["meta_grad"] and 0 < m["val_reward"] < 1 for m in a) and a[-1]["mu"] != 0.8  # a real, reduced dU/dmu
    # the same seeds draw the same rollouts whether the weights are whole or sharded; the gradients are reduced
    # in another order (all-reduce of sums against FSDP's reduce-scatter of means), so they agree to rounding
    x, y = a[0], b[0]
    assert (x["reward_mean"], x["rl_loss"], x["val_reward"]) == (y["reward_mean"], y["rl_loss"], y["val_reward"])
    assert y["sft_loss"] == pytest.approx(x["sft_loss"], rel=1e-6) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
    assert y["meta_grad"] == pytest.approx(x["meta_grad"], rel=0.05) and y["mu"] == pytest.approx(x["mu"], abs=1e-4)


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_resume_from_two_processes_in_one(amft_runs, mode):
    out, _ = amft_runs[mode]  # fsdp: its checkpoint holds the gathered weights and the optimizer state by name
    res = run_cli("--resume", str(out), "--steps", "3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == [0, 1, 2] and json.loads((out / "summary.json").read_text())["steps"] == 3


SFT = ["--method", "sft", "--steps", "3", "--batch-size", "8", "--save-every", "0", "--skip-test"]


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "sft"
    res = run_cli(*SFT, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_sft_on_two_processes_matches_one_process(tmp_path, one_process_sft, mode):
    # deterministic: no sampling. The same global batch of 8 demonstrations per step, split 4 + 4; each process's
    # loss is its share of the global token mean, so the summed gradients are the single process's
    two = torchrun(*SFT, *(["--fsdp"] if mode == "fsdp" else []), "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = metrics(one_process_sft), metrics(tmp_path / "two")
    assert [m["prompts_crc32"] for m in a] == [m["prompts_crc32"] for m in b]
    for x, y in zip(a, b):
        assert y["sft_loss"] == pytest.approx(x["sft_loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    assert a[-1]["sft_loss"] < a[0]["sft_loss"] - 0.5  # it trained (lr 1e-3): the weights below moved
    w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (one_process_sft, tmp_path / "two"))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6) for k in w1)


def test_settings_the_processes_cannot_run_are_refused_at_the_door(tmp_path, monkeypatch):
    import settings
    alone = run_cli("--fsdp", "--steps", "1", "--out", str(tmp_path / "a"))  # no torchrun: nothing to shard across
    assert alone.returncode != 0 and "start it with torchrun --nproc_per_node N" in alone.stderr and not (tmp_path / "a").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    for flags, message in [(["--batch-size", "3"], "--batch-size 3 must be a multiple of the 2 processes"),
                           (["--fsdp", "--meta-grad", "fd"], "--fsdp works with"), (["--fsdp", "--lora-r", "4"], "--fsdp works with"),
                           (["--fsdp", "--beta", "0.1"], "--fsdp works with"), (["--fsdp", "--sampler", "loop"], "--fsdp works with")]:
        cfg = settings.parse_args(flags)
        settings.resolve(cfg, cuda=False)
        with pytest.raises(settings.UsageError, match=message):
            settings.check(cfg)
    cfg = settings.parse_args(["--fsdp", "--batch-size", "4"])
    settings.resolve(cfg, cuda=True)
    settings.check(cfg)
    assert cfg.sampler == "generate"  # sampler auto under FSDP on CUDA: generate, which keeps the processes in step
