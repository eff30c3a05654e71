"""torchrun / data-parallel helpers.

`torchrun --nproc_per_node=N -m m2dino.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; we
initialise the process group (nccl on GPU, gloo on CPU) and train data-parallel:
- `parallelize(model, device)` wraps the model in DistributedDataParallel: gradients are
  averaged by bucketed all-reduces that overlap the backward pass. Every parameter is in every
  step's graph (the MoE kernels return full-size gradients; heads absent from a batch are tied
  in by the model's zero `unused_anchor`, which the loss adds), so DDP runs with
  find_unused_parameters=False and no per-step graph walk.
- `parallelize(model, device, fsdp=True)` shards it with FSDP2 instead (`fully_shard` per
  transformer block, then the rest): for the large presets, whose weights, gradients and AdamW
  state do not fit on one GPU several times over. Checkpoints gather the full state on rank 0
  (`full_state_dicts`) and resume scatters it back (`load_full_state_dicts`).
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


def parallelize(model: torch.nn.Module, device: torch.device, fsdp: bool = False) -> torch.nn.Module:
    """The module to run training steps through (see the module docstring); the model itself
    outside torchrun. Build the optimizer after this (FSDP2 replaces the parameters)."""
    if not is_distributed():
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        broadcast_parameters(model)  # shards are cut from rank 0's full weights
        mesh = init_device_mesh(device.type, (world_size(),))
        for block in model.backbone.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False,  # our buffers are constants (RoPE periods, masks)
                                   find_unused_parameters=False, gradient_as_bucket_view=True)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dicts(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state), complete: gathered onto rank 0's CPU when the model is
    sharded (a collective: call it on all ranks; the other ranks get empty dicts), the plain
    state dicts otherwise."""
    if not is_sharded(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if not optimizer.state:
        # Nothing to gather before the first step, and get_optimizer_state_dict would make
        # something: it initialises an empty state with a zero-gradient step(), which advances
        # AdamW's step count (its bias correction) for the whole run.
        return model_state, optimizer.state_dict()
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """The inverse of full_state_dicts (every rank passes the same full states)."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state.get("state"):  # an empty state (saved before the first step) is a fresh optimizer
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (FSDP2 shards in place)."""
    return getattr(model, "module", model)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy); the tensor itself without a process group."""
    if not is_distributed():
        return values
    out = values.clone()
    dist.all_reduce(out)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


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
