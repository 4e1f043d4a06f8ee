"""
Several processes, one run: what `torchrun --nproc_per_node N train.py ...` needs, through
PyTorch's own torch.distributed (NCCL on GPUs, gloo on CPUs). With one process every function
here does nothing, so the single-process path is the plain loop.

How the work is shared (train.py calls these):
- every rank draws the same global batch of B prompts (same seed, same data stream) and takes
  its contiguous share of B / N prompts (`share`); rollouts use a torch seed of their own per
  rank, so the ranks sample different completions;
- each loss on a rank is its share of the global loss: sums over its own tokens divided by the
  global count (`total`), so the gradients of the shares add up to the single-process gradient
  and `sum_grads_` all-reduces them once per backward phase (what DDP does after the last
  micro-batch). DDP's wrapper is not used: the meta-gradient reads gradients as they arrive
  (hooks) and moves the weights in place for its look-ahead, and DDP's reducer would all-reduce
  those gradients again, for nothing;
- the metrics that are shares (losses, entropy, clip fraction, KL) are summed (`sum_scalars`);
  rewards are gathered (`gather`), so advantages, reward statistics and the controller's inputs
  are the same numbers on every rank, and so is mu. `in_sync` checks it every step;
- the meta-gradient: each rank evaluates its share of the validation prompts; U's shares add
  up, so dU/dmu is their sum;
- only rank 0 writes (metrics, checkpoints, summary, model, plots) and prints;
- --fsdp shards the weights, gradients and optimizer state instead of replicating them (`shard`).
"""
import os

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (before the group is joined: the launcher's RANK, for messages)."""
    return dist.get_rank() if world() > 1 else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def own_seed(seed: int, of_rank=None) -> int:
    """A seed of this rank's own (or of rank `of_rank`); rank 0 keeps `seed`, so a single process
    draws what it always drew."""
    return seed + 7919 * (rank() if of_rank is None else of_rank)


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device_of_rank(device: str) -> str:
    """This process's device: under a launcher 'cuda' becomes 'cuda:LOCAL_RANK'."""
    if launched() and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def join(device: str):
    """Join the process group when launched with several processes (NCCL for CUDA, else gloo).
    Called once the model is loaded: transformers' save_pretrained writes nothing on a rank other
    than 0 once a group exists, which would leave a built-in model's folder empty."""
    if launched() and not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo",
                                device_id=torch.device(device) if cuda else None)


def close():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(items: list) -> list:
    """This rank's contiguous share of a list whose length the ranks divide."""
    n = len(items) // world()
    return items[rank() * n:(rank() + 1) * n]


def strided(items: list) -> list:
    """This rank's rows of a list of any length (evaluation): every N-th, from its rank."""
    return items[rank()::world()]


def total(x):
    """The sum over ranks of a count or tensor (a float or a tensor back, as given)."""
    if world() == 1:
        return x
    t = _on_backend(torch.as_tensor(x, dtype=torch.float64).clone())
    dist.all_reduce(t)
    return t.to(x.device, x.dtype) if torch.is_tensor(x) else t.item()


def sum_scalars(d: dict) -> dict:
    """Sum each number of d over ranks (None stays None), in one all-reduce."""
    if world() == 1:
        return d
    keys = [k for k, v in d.items() if v is not None]
    t = _on_backend(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64))
    dist.all_reduce(t)
    return dict(d, **{k: v for k, v in zip(keys, t.cpu().tolist())})


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a Ctrl-C seen by one rank stops them all)."""
    if world() == 1:
        return flag
    t = _on_backend(torch.tensor([float(flag)]))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x (same shape on all), concatenated along dim 0 in rank order."""
    if world() == 1:
        return x
    parts = [torch.empty_like(_on_backend(x)) for _ in range(world())]
    dist.all_gather(parts, _on_backend(x.contiguous()))
    return torch.cat([p.to(x.device) for p in parts])


def gather_objects(obj) -> list:
    """Every rank's obj (picklable), in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sum_grads_(grads: dict, bucket_bytes: int = 64 * 2**20):
    """Sum each gradient over ranks, in place, in flat buckets of about bucket_bytes (one
    all-reduce per bucket rather than one per tensor). Under FSDP the backward has already
    reduced them (each rank holds its slice of the sum)."""
    if world() == 1 or not grads:
        return grads
    if sharded():  # FSDP's backward has averaged them over ranks: N times the mean is the sum
        for g in grads.values():
            g.mul_(world())
        return grads
    tensors = list(grads.values())
    bucket, size = [], 0
    for i, g in enumerate(tensors):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes or i == len(tensors) - 1:
            groups = {}
            for t in bucket:  # one flat buffer per dtype
                groups.setdefault(t.dtype, []).append(t)
            for same in groups.values():
                flat = torch.cat([t.reshape(-1) for t in same])
                dist.all_reduce(flat)
                offset = 0
                for t in same:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
            bucket, size = [], 0
    return grads


# ---------------------------------------------------------------------------- FSDP (--fsdp)
_sharded = []


def sharded() -> bool:
    """Are the weights split across ranks (FSDP), rather than replicated?"""
    return bool(_sharded)


def shard(model):
    """FSDP through PyTorch's fully_shard: each decoder layer, and the rest of the model, keeps
    1/N of its weights, gradients and AdamW state on each rank; a layer's weights are gathered
    for its forward and backward and freed after. Its backward averages the gradients over ranks;
    sum_grads_ and reduced_by_fsdp turn the average into the sum our loss shares need. Generation
    runs with synced_gpus, so a rank whose rows have all ended keeps stepping while another's have
    not (every forward is a collective)."""
    from torch.distributed.fsdp import fully_shard
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    model.synced_generation = True
    _sharded.append(True)
    return model


def reduced_by_fsdp(x: float) -> float:
    """A sum over ranks of partial dot products with FSDP-averaged gradients, made the sum (x N)."""
    return x * world() if sharded() else x


def full_state(model, opt=None):
    """Under FSDP, the whole model's state dict (and the optimizer's, keyed by parameter name),
    gathered to the CPU; every rank must call it. Otherwise (None, None): they save themselves."""
    if not sharded():
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(tied, dict):
        # a tied copy (lm_head = the embedding) is not written, as save_pretrained does
        for name in tied:
            weights.pop(name, None)
    return weights, (get_optimizer_state_dict(model, opt, options=options) if opt else None)


def load_full_optimizer_state(model, opt, state: dict):
    """The inverse for the optimizer: a state keyed by parameter name, into this model's
    optimizer, sharded or not (so a run saved by N processes resumes in any number)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def by_name(state: dict, names: list) -> dict:
    """A plain optimizer state dict (keyed by position, as opt.state_dict() writes it) keyed by
    parameter name instead, for load_full_optimizer_state: a checkpoint written with whole weights
    resumed under --fsdp. `names` are the trained parameters in the optimizer's order."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def broadcast_(tensors):
    """Rank 0's values into every rank's tensors, in place."""
    if world() > 1:
        with torch.no_grad():
            for t in tensors:
                dist.broadcast(t.data, src=0)


def in_sync(values: list) -> bool:
    """Do all ranks hold exactly these float values (bit for bit)? Checked on every rank."""
    if world() == 1:
        return True
    mine = torch.tensor(values, dtype=torch.float64)
    return all(torch.equal(mine, torch.tensor(v, dtype=torch.float64))
               for v in gather_objects(values))


def fingerprint(params) -> float:
    """A float64 sum of every weight: equal on two ranks only if (in practice) the weights are."""
    with torch.no_grad():
        return torch.stack([p.detach().sum(dtype=torch.float64) for p in params]).sum().item()


def _on_backend(t: torch.Tensor) -> torch.Tensor:
    """NCCL moves CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.cuda.current_device())
    return t
