"""torchrun / data-parallel helpers.

`torchrun --nproc_per_node=N -m m2dino.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we
initialise the process group (nccl on GPU, gloo on CPU) and train data-parallel: every
process holds a full replica, takes its share of each global batch from the sampler, and the
gradients are averaged with one all-reduce per step (`all_reduce_gradients`).

Why not the DistributedDataParallel wrapper: with task-conditioned MoE and per-task heads,
which parameters receive a gradient changes every step and differs between ranks (an expert
or a head with no sample on one rank). We all-reduce a "has a gradient" flag per parameter
first: a parameter used on any rank gets the averaged gradient on every rank (zeros where it
was unused locally), and one unused on every rank keeps `grad=None` everywhere, exactly as
in a single process with the whole global batch (AdamW then leaves it untouched). The
result does not depend on the bucket order or on graph-traversal flags, and works
unchanged with gradient checkpointing.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device; under torchrun 'auto'/'cuda' take cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        if name == "cuda":
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return torch.device("cpu")


def setup(device: torch.device, timeout_s: float = 1800) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 (idempotent); True when distributed."""
    if env_world_size() <= 1:
        return False
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        # A store namespace per torchrun attempt: after a restart, the gloo mesh must not read the
        # addresses the dead attempt's workers published (seen: "connectFullMesh ... Connection refused").
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        base = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                             env_world_size(), is_master=not agent_store and int(os.environ["RANK"]) == 0,
                             timeout=timeout)
        store = dist.PrefixStore(f"m2dino/attempt-{restart_count()}", base)
        dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=env_world_size(), timeout=timeout)
    return True


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks; see the module docstring for unused parameters."""
    if not is_distributed():
        return
    W = world_size()
    device = params[0].device
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(used)
    live = [p for p, u in zip(params, used.tolist()) if u > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in live])
    dist.all_reduce(flat)
    flat /= W
    offset = 0
    for p in live:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; identity without a process group)."""
    out = values.clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is True on any rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device or torch.device("cpu"))
    dist.all_reduce(t)
    return bool(t.item() > 0)


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. writing a cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
