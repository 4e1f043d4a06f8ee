"""
What a run keeps and what it leaves behind: checkpoints (model, optimizer, the loop's state
and every random stream, loaded without unpickling arbitrary objects), the metrics file on
resume, random streams of their own, Ctrl-C that stops between steps, and the process's memory
(its peak, and freed memory handed back to the OS on Linux). train.py uses all of it.
"""
import contextlib
import ctypes
import json
import math
import os
import pickle
import shutil
import signal
import sys
import time

import torch

import model as policy
import parallel


def strict(obj):
    """obj with every NaN or infinity replaced by None: json.dumps(strict(obj), allow_nan=False)
    is JSON that strict parsers read (Python's json writes a bare NaN by default)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def to_json(obj, **kw) -> str:
    return json.dumps(strict(obj), allow_nan=False, **kw)


def atomic_json(obj, path):
    with open(path + ".tmp", "w") as f:
        f.write(to_json(obj, indent=2))
    os.replace(path + ".tmp", path)


def save_checkpoint(path, model, tok, opt, state: dict, ref_model=None, full=(None, None)):
    """Model + tokenizer (save_pretrained), optimizer, the loop's state (with the controller and
    every random stream). Only tensors, numbers, strings, lists, tuples and dicts, so it loads with
    torch.load(weights_only=True). Written to path.tmp and swapped in: never half a checkpoint.
    full: under FSDP, the gathered (model, optimizer) state dicts (parallel.full_state)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_state = full
    with policy.no_progress_bars():
        model.save_pretrained(tmp, state_dict=model_state)
    tok.save_pretrained(tmp)
    torch.save({"optimizer": optimizer_state if optimizer_state is not None else opt.state_dict(),
                "optimizer_by_name": optimizer_state is not None, "state": state,
                "ref": ref_model.state_dict() if ref_model is not None else None},
               os.path.join(tmp, "trainer_state.pt"))
    if os.path.isdir(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, model, opt):
    """The loop's state and the reference policy (if the run had one); restores the optimizer.
    The weights were loaded from `path` with the model. Never unpickles arbitrary objects.
    Raises ValueError with a one-line message for a damaged or unsafe file."""
    file = os.path.join(path, "trainer_state.pt")
    try:
        saved = torch.load(file, weights_only=True)
        if saved.get("optimizer_by_name"):  # written under FSDP: loads into any number of processes
            parallel.load_full_optimizer_state(model, opt, saved["optimizer"])
        elif parallel.sharded():  # whole weights then, sharded now
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            parallel.load_full_optimizer_state(model, opt,
                                               parallel.by_name(saved["optimizer"], names))
        else:
            opt.load_state_dict(saved["optimizer"])
        ref_model = None
        if saved["ref"] is not None:
            ref_model = policy.frozen_copy(model)
            ref_model.load_state_dict(saved["ref"])
        return saved["state"], ref_model
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ValueError(f"{file} holds objects other than tensors and plain data; "
                             "refusing to load it (it could run code). Only resume checkpoints "
                             "written by train.py") from None
        raise ValueError(f"{file} is damaged and cannot be read ({first_line(e)})") from None
    except Exception as e:
        raise ValueError(f"{file} is damaged and cannot be read ({first_line(e)})") from None


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}"


def keep_metrics_before(path, step: int):
    """On resume: drop the metrics lines logged after the checkpoint (and a line a crash tore)."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    with open(path, "w") as f:
        f.writelines(kept)


def streams(data_rng, val_rng, val_stream: dict) -> dict:
    """The state of every random stream of a run: training order, validation prompts, the
    validation rollouts' torch stream, and torch's own (training rollouts), CPU and CUDA."""
    return {"data": data_rng.getstate(), "val": val_rng.getstate(), "val_torch": val_stream,
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_streams(state: dict, data_rng, val_rng, val_stream: dict, rank=0, world=1, seed=0):
    """The inverse of `streams`, from a checkpoint's state. With several processes each rank gets
    its own streams back (state["rng_ranks"]); resumed with another number of processes, every
    rank continues the data streams (the same on all ranks) and ranks other than 0 sample on
    fresh torch streams of their own."""
    per_rank = state.get("rng_ranks") or [state["rng"]]
    same = len(per_rank) == world
    saved = per_rank[rank] if same else state["rng"]
    data_rng.setstate(saved["data"])
    val_rng.setstate(saved["val"])
    val_stream.update(saved["val_torch"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    if not same and rank > 0:
        torch.manual_seed(parallel.own_seed(seed + state["step"], rank))
        val_stream.clear()
        val_stream.update(seed=parallel.own_seed(seed + 1_000_003 + state["step"], rank))


class Laps:
    """Seconds spent in each phase of a step. On a GPU the queued work is waited for at each
    boundary, so each phase is charged with its own kernels."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.start = self.last = self.now()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __call__(self) -> float:
        """Seconds since the last call (or since the start)."""
        t, self.last = self.last, self.now()
        return round(self.last - t, 4)

    def total(self) -> float:
        return self.now() - self.start


@contextlib.contextmanager
def torch_stream(stream: dict):
    """Run a block on its own torch random stream: torch's generators (CPU and CUDA) start from
    `stream`, their state is saved back to it at the end, and outside the block they continue
    as if it had not run. The meta-gradient's validation rollouts use one, so turning the
    meta-gradient on or off leaves the training rollouts' stream alone."""
    devices = list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=devices):
        if stream.get("cpu") is None:
            torch.manual_seed(stream["seed"])
        else:
            torch.set_rng_state(stream["cpu"])
            if devices and stream.get("cuda") is not None:
                torch.cuda.set_rng_state_all(stream["cuda"])
        yield
        stream.update(cpu=torch.get_rng_state(),
                      cuda=torch.cuda.get_rng_state_all() if devices else None)


@contextlib.contextmanager
def stop_on_ctrl_c():
    """Ctrl-C asks the loop to stop between steps (so the checkpoint is consistent); a second
    Ctrl-C interrupts at once. The previous handler is back when the block ends."""
    stop = []
    # under torchrun a Ctrl-C reaches the launcher too, which then sends SIGTERM to every process
    # and waits 30 s before killing them: SIGTERM also asks for a stop at the end of the step
    signals = [signal.SIGINT] + ([signal.SIGTERM] if parallel.launched() else [])

    def handler(signum, _):
        stop.append(True)
        signal.signal(signum, previous[signum])
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield stop
    finally:
        for s in signals:
            signal.signal(s, previous[s])


def release_freed_memory():
    """glibc keeps large freed blocks for reuse instead of returning them; in a 0.5B-parameter run
    on a CPU that added about 5 GiB to the peak resident memory. malloc_trim returns them."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_memory(device: str) -> int:
    """This process's peak memory in bytes: max allocated on CUDA; on a CPU the peak resident set
    (VmHWM), which also counts what the allocator keeps after tensors are freed."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        import resource  # macOS reports bytes, Linux kilobytes; /proc is Linux's
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
