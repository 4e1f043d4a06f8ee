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
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(n), os.path.join(HERE, "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_in_sync(rank, world, port, q):
    import torch.distributed as dist
    import parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # one float32 ulp apart
        two = (torch.tensor(2.0) if rank == 0
               else torch.nextafter(torch.tensor(2.0), torch.tensor(3.0)))
        params = [torch.full((3,), 1.0), two.expand(2).clone()]
        q.put((rank, parallel.in_sync([0.8, parallel.fingerprint(params)]),
               parallel.in_sync([0.8, 7.0]), parallel.total(rank + 1.0),
               parallel.gather(torch.tensor([[rank, 10 + rank]])).tolist()))
    finally:
        dist.destroy_process_group()


def test_the_sync_check_and_the_reductions_across_two_processes():
    # the check that guards every multi-process step can fail: weights one rounding apart are
    # caught
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


AMFT = ["--recipe", "tiny", "--method", "amft", "--warmup", "1", "--steps", "3",
        "--meta-every", "1", "--batch-size", "4", "--group-size", "4", "--val-prompts", "16",
        "--meta-grad", "autograd", "--skip-test", "--target", "10",
        "--demo", "formula"]  # the task the warm model has seen whole (conftest.WARM_TASK)


@pytest.fixture(scope="module")
def amft_runs(tmp_path_factory, warm_path):
    """amft on a model that solves some hands (so dU/dmu != 0): one SFT warm-up step, then two
    steps with the meta-gradient; on 2 processes replicated (DDP-style) and sharded (--fsdp), and
    on one."""
    import train
    runs = {}
    for mode in ("replicated", "fsdp", "one"):
        out = tmp_path_factory.mktemp(mode) / "amft"
        args = ["--model", warm_path, *AMFT, *(["--fsdp"] if mode == "fsdp" else []),
                "--out", str(out)]
        if mode == "one":  # in this process
            train.main(train.parse_args(args))
            runs[mode] = out, None
            continue
        res = torchrun(*args)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[mode] = out, res
    return runs


def test_two_processes_stay_in_sync_and_compute_the_single_process_step(amft_runs):
    # train.py checks after every step that both ranks hold bit-identical mu and H_target, and
    # (replicated) a float64 sum of all weights; the test above shows that check catches one
    # rounding. A difference stops the run.
    (rep, res), (fsdp, _), (one, _) = (amft_runs["replicated"], amft_runs["fsdp"],
                                       amft_runs["one"])
    a, b, c = metrics(rep), metrics(fsdp), metrics(one)
    assert ([m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2]
            and "differ" not in res.stderr)
    assert res.stdout.count("after training") == 1  # rank 0 speaks, rank 1 is quiet
    # a real, reduced dU/dmu
    assert (all(m["meta_grad"] and 0 < m["val_reward"] < 1 for m in a[1:])
            and a[-1]["mu"] != 0.8), [(m["meta_grad"], m.get("val_reward")) for m in a]
    # deterministic: the warm-up step (SFT only) on the same global batch of 4 demonstrations,
    # split 2 + 2. Each process's loss is its share of the global token mean, so the summed
    # gradients are one process's; step 1's SFT loss is computed on the weights that step 0 left,
    # so they agree too
    assert [m["prompts_crc32"] for m in a] == [m["prompts_crc32"] for m in c]
    for two in (a, b):
        assert two[0]["sft_loss"] == pytest.approx(c[0]["sft_loss"], rel=1e-6)
        assert two[0]["grad_norm"] == pytest.approx(c[0]["grad_norm"], rel=1e-5)
        assert two[1]["sft_loss"] == pytest.approx(c[1]["sft_loss"], rel=1e-5)
    # the first sampled step: the same seeds draw the same rollouts whether the weights are whole
    # or sharded; the gradients are reduced in another order (all-reduce of sums, FSDP's
    # reduce-scatter of means), so they agree to rounding, and dU/dmu (a difference of two dot
    # products) to a few percent. (From there mu's RMS-normalised meta steps amplify that
    # rounding: later steps are not compared.)
    x, y = a[1], b[1]
    assert ((x["reward_mean"], x["val_reward"], x["rl_loss"])
            == (y["reward_mean"], y["val_reward"], y["rl_loss"]))
    assert (y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)
            and y["meta_grad"] == pytest.approx(x["meta_grad"], rel=0.1))
    # the first meta step is +- eta_meta after normalisation: its sign agrees
    assert y["mu"] == x["mu"] == pytest.approx(0.85)


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_resume_from_two_processes_in_one(amft_runs, mode):
    import train
    # fsdp: its checkpoint holds the gathered weights and the optimizer state by name
    out, _ = amft_runs[mode]
    saved = load_file(str(out / "checkpoint" / "model.safetensors"))
    summary = train.main(train.parse_args(["--resume", str(out), "--steps", "4"]))
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3] and summary["steps"] == 4
    # the same tensors, whole
    assert set(saved) == set(load_file(str(out / "model" / "model.safetensors")))


def test_resume_from_one_process_in_two_sharded(amft_runs):
    # the other way: a checkpoint with whole weights and a plain optimizer state, resumed under
    # --fsdp
    out, _ = amft_runs["one"]
    res = torchrun("--resume", str(out), "--fsdp", "--steps", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert ([m["step"] for m in metrics(out)] == [0, 1, 2, 3]
            and res.stdout.count("after training") == 1)


def test_settings_the_processes_cannot_run_are_refused_at_the_door(tmp_path, monkeypatch):
    import settings
    # no torchrun: nothing to shard across
    alone = run_cli("--fsdp", "--steps", "1", "--out", str(tmp_path / "a"))
    assert (alone.returncode != 0 and "start it with torchrun --nproc_per_node N" in alone.stderr
            and not (tmp_path / "a").exists())
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it
    for flags, message in [(["--batch-size", "3"],
                            "--batch-size 3 must be a multiple of the 2 processes"),
                           (["--fsdp", "--meta-grad", "fd"], "--fsdp works with"),
                           (["--fsdp", "--lora-r", "4"], "--fsdp works with"),
                           (["--fsdp", "--beta", "0.1"], "--fsdp works with"),
                           (["--fsdp", "--sampler", "loop"], "--fsdp works with")]:
        cfg = settings.parse_args(flags)
        settings.resolve(cfg, cuda=False)
        with pytest.raises(settings.UsageError, match=message):
            settings.check(cfg)
    cfg = settings.parse_args(["--fsdp", "--batch-size", "4"])
    settings.resolve(cfg, cuda=True)
    settings.check(cfg)
    # sampler auto under FSDP on CUDA: generate, which keeps the processes in step
    assert cfg.sampler == "generate"


def test_ctrl_c_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", os.path.join(HERE, "train.py"),
                             "--steps", "500", "--warmup", "2", "--save-every", "0",
                             "--skip-test", "--out", str(out)],
                            cwd=HERE, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(240):  # until a few steps are logged
        time.sleep(0.5)
        if ((out / "metrics.jsonl").exists()
                and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            break
    # what a terminal's Ctrl-C does: the launcher and both processes get it
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    saved = torch.load(out / "checkpoint" / "trainer_state.pt",
                       weights_only=True)["state"]["step"]
    assert (3 <= steps < 500 and saved == steps
            and f"interrupted: stopped at step {steps}; checkpoint saved" in stderr)
    assert stderr.count("interrupted: stopped") == 1  # rank 0 says it, once
