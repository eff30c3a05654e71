"""The GPU the kernels' configs are chosen for: its shared memory per block, and the one way
our autotuned kernels prune their configs for it.

Autotune prunes configs that cannot run on the card at hand (Triton would otherwise launch
them and fail); m2dino_kernels.inspect sets a compile target here to see what a card of that
architecture would be offered.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch

# Triton runs CPU tensors one program at a time with numpy when set (before the import).
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Opt-in shared memory per block (bytes) by compute capability: A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_BY_ARCH = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_target_arch: Optional[int] = None


def shared_memory_limit() -> Optional[int]:
    """Bytes of shared memory a block may use on the target; None when there is no GPU target
    (the interpreter: every config is kept)."""
    if _target_arch is not None:
        return SHARED_MEMORY_BY_ARCH[_target_arch]
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    return SHARED_MEMORY_BY_ARCH.get(props.major * 10 + props.minor)


@contextlib.contextmanager
def compile_target(arch: int):
    """Choose configs for compute capability `arch` (e.g. 90) instead of the current card."""
    global _target_arch
    if arch not in SHARED_MEMORY_BY_ARCH:
        raise ValueError(f"arch must be one of {sorted(SHARED_MEMORY_BY_ARCH)}, got {arch}")
    saved, _target_arch = _target_arch, arch
    try:
        yield
    finally:
        _target_arch = saved


def config_pruner(candidates: Callable, shared_bytes: Callable, fallback=None) -> Callable:
    """An autotune `early_config_prune`: of candidates(named_args, kwargs) -- the configs of
    this launch's dtype and shape class -- those whose shared memory, shared_bytes(config,
    named_args, kwargs), fits the target's opt-in limit (all when there is no GPU target);
    when none fits, [fallback] (default: the candidate needing the least). Under the
    interpreter every config (it is given one)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRETER:
            return list(configs)
        offered = list(candidates(named_args, kwargs))
        limit = shared_memory_limit()
        if limit is None:
            return offered
        fits = [c for c in offered if shared_bytes(c, named_args, kwargs) <= limit]
        if fits:
            return fits
        if fallback is not None:
            return [fallback]
        return [min(offered, key=lambda c: shared_bytes(c, named_args, kwargs))]
    return prune
