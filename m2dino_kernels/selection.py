"""Which kernel backend runs, for the MoE ops and for attention alike: the selected backend
and the `auto` policy.

Names. MoE: "auto" and the registered backends (m2dino_kernels.registry: "reference", "cpp",
"cuda", "triton", "grouped_mm", and any added by register_backend). Attention: "auto",
"sdpa", "xformers", "triton", "reference". "reference" is the plain-PyTorch oracle in both.
Its old MoE name "torch" stays an alias: set_backend, use_backend, M2DINO_KERNELS_BACKEND and
attention(backend=...) accept it and store/run "reference"; get_backend() and
available_backends() show the canonical name only, so a listing names each backend once.

The `auto` policy. A compiled backend (cpp, cuda, triton, registered ones) is considered on a
device only after it passed the self-test there (m2dino_kernels.gate: once, in a child
process, then cached). Without a measurement -- CPU, M2DINO_KERNELS_AUTOTUNE=0, or
torch.compile tracing before a decision was made in memory (tracing never times) -- MoE uses
the first trusted backend the device type prefers (CPU: "cpp" when built; registered
backends may ask to come first), else "reference" on CPU and the library path on other
devices ("grouped_mm" where it runs and takes the dtype, else "reference"); attention uses
"sdpa". On the device types the tuner measures (CUDA), the first call for a key runs every
trusted candidate on that call's inputs (m2dino_kernels.trials), forward and backward,
checks it against the library path, and keeps the fastest that agrees (timing and the cache
file: m2dino_kernels.autotune). A backend chosen by name is used as named (warning once per
device when it has no passing self-test verdict there). attention(backend=None) follows the
package setting when it is "triton" and is "auto" otherwise: the package setting names the
MoE implementation, and "reference" there does not make attention O(N^2).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Optional

import torch

from m2dino_kernels import autotune, gate, registry, trials
from m2dino_kernels.registry import (
    ATTENTION_BACKENDS,
    BACKEND_DTYPES,
    REFERENCE,
    available_backends,
    canonical_name,
    triton_runs_on,
)
from m2dino_kernels.shapes import TRITON_HEAD_DIMS

BACKEND_NAMES = ("auto",) + registry.CONCRETE_BACKENDS  # the built-in choices
ENV_VAR = "M2DINO_KERNELS_BACKEND"

# ---------------------------------------------------------------------------------------
# The selected backend
# ---------------------------------------------------------------------------------------
_state = {"name": canonical_name(os.environ.get(ENV_VAR, "auto"), registry.backend_names(),
                                 f"environment variable {ENV_VAR}")}


def set_backend(name: str) -> None:
    """Select the MoE backend for all later calls: "auto", "reference" (alias "torch"),
    "cpp", "cuda", "triton", "grouped_mm" or a registered one. Whether it can run is checked
    at call time against the tensors' device."""
    _state["name"] = canonical_name(name, registry.backend_names(), "set_backend")


def get_backend() -> str:
    """The selected backend name (possibly "auto"; aliases shown by their canonical name)."""
    return _state["name"]


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed calls with backend `name`, then restore."""
    previous = _state["name"]
    set_backend(name)
    try:
        yield
    finally:
        _state["name"] = previous


# ---------------------------------------------------------------------------------------
# The unmeasured rule
# ---------------------------------------------------------------------------------------
def library_backend(device_type: str, available, dtype=None) -> str:
    """The library path on `device_type`: "grouped_mm" where it runs (and takes `dtype`),
    else "reference". What measured backends are checked against."""
    if "grouped_mm" in available and (dtype is None or dtype in BACKEND_DTYPES["grouped_mm"]):
        return "grouped_mm"
    return REFERENCE


def _unmeasured_auto(device: torch.device, available, dtype) -> str:
    for name in registry.preferred_backends(device.type):
        if (name in available and (dtype is None or dtype in BACKEND_DTYPES[name])
                and gate.trusts(name, device)):
            return name
    if device.type == "cpu":
        return REFERENCE
    return library_backend(device.type, available, dtype)


def resolve_backend(device, name=None, dtype=None) -> str:
    """The concrete MoE backend that runs on `device` for `name` (default: the selected one);
    "auto" resolves to its unmeasured rule.

    Raises ValueError, listing the backends that can run there, if `name` cannot."""
    name = _state["name"] if name is None else canonical_name(name, registry.backend_names(),
                                                               "backend")
    device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    available = registry._available_cache.get(device.type)
    if available is None:
        available = tuple(available_backends(device.type))
    if name == "auto":
        return _unmeasured_auto(device, available, dtype)
    if name not in available:
        why = (f" (left out by {registry.EXCLUDE_ENV})" if name in registry.excluded_backends()
               else "")
        raise ValueError(f"kernel backend {name!r} cannot run on {device.type} tensors{why}; "
                         f"available there: {', '.join(available)}")
    gate.warn_unverified(name, device)
    return name


def decide(op: str, device: torch.device, dtype: torch.dtype, sizes: dict, names,
           references, make_trial: Callable[[], autotune.Trial], default: str) -> str:
    """The measured backend for this call (autotune.TUNER's decision among the candidates the
    gate trusts; `default` where it does not tune). sizes: the key's sizes, in order, the
    token bucket included."""
    tuner = autotune.TUNER
    if not tuner.applies_to(device.type):
        return default
    key = autotune.TuneKey.of(op, device, dtype, sizes)
    return tuner.choose(key, names, references, make_trial, default,
                        screen=lambda candidates: gate.trusted(candidates, device))


# ---------------------------------------------------------------------------------------
# MoE
# ---------------------------------------------------------------------------------------
def moe_backend(op: str, x: torch.Tensor, sizes: dict,
                make_trial: Callable[[], autotune.Trial]) -> str:
    """The backend of one MoE op call: the selected one, or for `auto` the measured one where
    the tuner measures x's device (make_trial builds the trial on this call's inputs, only
    when one is needed)."""
    name = _state["name"]
    if name != "auto":
        return resolve_backend(x.device, name)
    default = resolve_backend(x.device, "auto", x.dtype)
    if x.shape[0] == 0:
        return default
    names = [b for b in available_backends(x.device) if x.dtype in BACKEND_DTYPES[b]]
    library = library_backend(x.device.type, names, x.dtype)
    sizes = {**sizes, "T": autotune.token_bucket(x.shape[0])}
    return decide(op, x.device, x.dtype, sizes, names, (library, REFERENCE), make_trial,
                  default)


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
def triton_attention_refusal(q: torch.Tensor) -> Optional[str]:
    """Why the triton attention kernel cannot take q (None when it can): head_dim, or a head
    too large for its int32 offsets."""
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return (f"attention backend 'triton' supports head_dim {TRITON_HEAD_DIMS}, got "
                f"{q.shape[-1]}; use 'sdpa'")
    from m2dino_kernels.triton.attention import int32_offset_problem  # noqa: PLC0415 (lazy)

    return int32_offset_problem(q.shape, q.stride())


def _triton_attention_can_take(q: torch.Tensor) -> bool:
    if "triton" not in available_backends(q.device):  # (not installed, no interpreter, left out)
        return False
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return False  # the interpreter's bf16 dot is wrong
    return triton_attention_refusal(q) is None


def _auto_attention(functions, q, k, v, rope, num_prefix_tokens) -> str:
    """sdpa, or where the tuner measures (CUDA) the faster of sdpa and triton for the key."""
    if q.numel() == 0 or not autotune.TUNER.applies_to(q.device.type):
        return "sdpa"
    # (under tracing only a remembered decision counts: no import, no probe of triton)
    tracing = torch.compiler.is_compiling()
    names = ["sdpa"] + (["triton"] if not tracing and _triton_attention_can_take(q) else [])
    batch, heads, n, head_dim = q.shape
    sizes = {"B": autotune.token_bucket(batch), "heads": heads, "N": n,
             "head_dim": head_dim, "rope": rope is not None}
    return decide("attention", q.device, q.dtype, sizes, names, ("sdpa",),
                  lambda: trials.attention_trial(functions, q, k, v, rope, num_prefix_tokens),
                  "sdpa")


def attention_backend(backend, functions: dict, q, k, v, rope=None,
                      num_prefix_tokens: int = 0) -> str:
    """The attention backend that runs for `backend` (None: follow the package setting) on
    these inputs; functions: name -> implementation (what an `auto` trial runs).

    Raises when the named backend cannot take them, saying why."""
    if backend is None:
        backend = "triton" if _state["name"] == "triton" else "auto"
    backend = canonical_name(backend, ATTENTION_BACKENDS, "attention")
    if backend == "auto":
        return _auto_attention(functions, q, k, v, rope, num_prefix_tokens)
    device_type = q.device.type
    if backend == "xformers":
        if not registry.xformers_available():
            raise RuntimeError("attention backend 'xformers' needs the optional xformers "
                               "package (pip install xformers); it is not installed")
        if device_type != "cuda":
            raise RuntimeError(f"attention backend 'xformers' runs on CUDA tensors only, "
                               f"got {device_type} tensors; use 'sdpa' there")
    elif backend == "triton":
        if importlib.util.find_spec("triton") is None:
            raise RuntimeError("attention backend 'triton' needs the triton package")
        if "triton" in registry.excluded_backends():
            raise RuntimeError(f"attention backend 'triton' is left out by {registry.EXCLUDE_ENV}")
        if not triton_runs_on(device_type):
            if device_type == "cpu":
                raise RuntimeError("attention backend 'triton' on CPU tensors needs "
                                   "TRITON_INTERPRET=1 set before m2dino_kernels is imported "
                                   "(slow; meant for tests); use 'sdpa' on CPU")
            raise RuntimeError(f"attention backend 'triton' runs on CUDA tensors, "
                               f"got {device_type}")
        if device_type == "cpu" and q.dtype == torch.bfloat16:
            raise TypeError("attention backend 'triton' on CPU (Triton interpreter) "
                            "supports float32 and float16; its bfloat16 dot is wrong")
        problem = triton_attention_refusal(q)
        if problem:
            raise ValueError(problem)
        gate.warn_unverified("triton", q.device)
    return backend
