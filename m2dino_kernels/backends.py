"""Backend registry: which implementation of the MoE ops runs, and on which devices it can.

Backends (each a module exposing DESIGN.md's four protocol functions, imported lazily):
  "torch"       m2dino_kernels.reference   plain PyTorch, the oracle; runs everywhere
  "cpp"         m2dino_kernels.extension   the C++ extension m2dino_kernels._C, CPU tensors
  "cuda"        m2dino_kernels.extension   the same extension's CUDA kernels (built with CUDA)
  "triton"      m2dino_kernels.triton.moe  Triton kernels: CUDA tensors, or CPU tensors when
                                           TRITON_INTERPRET=1 (slow; meant for tests)
  "grouped_mm"  m2dino_kernels.grouped_mm  the reference's routing, expert GEMMs through
                                           torch.nn.functional.grouped_mm: the library floor;
                                           CUDA (sm >= 80) and CPU where this torch runs it

"auto" (the default) picks per device: on CPU "cpp" if the extension is built, else "torch";
on CUDA the backend m2dino_kernels.autotune measured fastest for the call's shape (see there;
with M2DINO_KERNELS_AUTOTUNE=0, or without a measurement under torch.compile: "grouped_mm",
else "torch"). The environment variable M2DINO_KERNELS_BACKEND sets the initial choice.

If the extension fails to import, one warning is given when this module is imported, and the
"torch" backend is used instead.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings

import torch

BACKEND_NAMES = ("auto", "torch", "cpp", "cuda", "triton", "grouped_mm")
ENV_VAR = "M2DINO_KERNELS_BACKEND"

_BACKEND_MODULES = {
    "torch": "m2dino_kernels.reference",
    "cpp": "m2dino_kernels.extension",
    "cuda": "m2dino_kernels.extension",
    "triton": "m2dino_kernels.triton.moe",
    "grouped_mm": "m2dino_kernels.grouped_mm",
}

_HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
# Input dtypes each concrete backend accepts (float64 only in the reference: gradcheck).
# Kept here rather than in the backend modules so that checking it never imports one
# (an import inside a torch.compile'd call would be a graph break).
BACKEND_DTYPES = {
    "torch": _HALF_AND_FLOAT + (torch.float64,),
    "cpp": _HALF_AND_FLOAT + (torch.float64,),  # float64 for gradcheck
    "cuda": _HALF_AND_FLOAT,
    "triton": _HALF_AND_FLOAT,
    "grouped_mm": _HALF_AND_FLOAT,  # what torch.nn.functional.grouped_mm takes
}


def _validate_name(name, source: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; "
                         f"expected one of {', '.join(BACKEND_NAMES)}")
    return name


def _load_extension():
    """Import m2dino_kernels._C once; on failure warn once and return None."""
    try:
        return importlib.import_module("m2dino_kernels._C")
    except (ImportError, OSError) as err:
        warnings.warn(
            f"m2dino_kernels._C could not be imported ({err}); the C++/CUDA kernel backends "
            "are unavailable and the plain PyTorch backend 'torch' is used instead. Build "
            "the extension with `pip install -e .` (see README.md) to enable them.",
            RuntimeWarning, stacklevel=3)
        return None


_C = _load_extension()
_state = {"name": _validate_name(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")}


def _triton_can_run(device_type: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _compute_available(device_type: str) -> tuple:
    names = ["torch"]
    if _C is not None and device_type == "cpu":
        names.append("cpp")
    if _C is not None and device_type == "cuda" and bool(getattr(_C, "with_cuda", False)):
        names.append("cuda")
    if _triton_can_run(device_type):
        names.append("triton")
    if importlib.import_module("m2dino_kernels.grouped_mm").runs_on(device_type):
        names.append("grouped_mm")
    return tuple(names)


# Availability per device type, filled eagerly so that resolving a backend inside a
# torch.compile'd function is a plain dict read (nothing dynamo would have to trace).
_available_cache = {"cpu": _compute_available("cpu")}
if torch.cuda.is_available():
    _available_cache["cuda"] = _compute_available("cuda")


def _device_type(device) -> str:
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def available_backends(device="cpu") -> list:
    """Names of the backends that can run on tensors of `device` ("torch" always first)."""
    device_type = _device_type(device)
    if device_type not in _available_cache:
        _available_cache[device_type] = _compute_available(device_type)
    return list(_available_cache[device_type])


def refresh_available_backends() -> None:
    """Recompute availability (e.g. after setting TRITON_INTERPRET in a running process)."""
    for device_type in list(_available_cache):
        _available_cache[device_type] = _compute_available(device_type)


def set_backend(name: str) -> None:
    """Select the backend for all later calls: "auto", "torch", "cpp", "cuda", "triton" or
    "grouped_mm".

    Whether it can run is checked at call time against the tensors' device."""
    _state["name"] = _validate_name(name, "set_backend")


def get_backend() -> str:
    """The selected backend name (possibly "auto")."""
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


def library_backend(device_type: str, available, dtype=None) -> str:
    """The library path on `device_type`: "grouped_mm" where it runs (and takes `dtype`),
    else "torch". What `auto` uses on CUDA when nothing was measured."""
    if "grouped_mm" in available and (dtype is None or dtype in BACKEND_DTYPES["grouped_mm"]):
        return "grouped_mm"
    return "torch"


def _auto_backend(device_type: str, available, dtype=None) -> str:
    """`auto` without a measurement: CPU "cpp" when built, else "torch"; elsewhere the
    library path (m2dino_kernels.autotune measures on CUDA and may choose another)."""
    if device_type == "cpu":
        return "cpp" if "cpp" in available else "torch"
    return library_backend(device_type, available, dtype)


def resolve_backend(device, name=None, dtype=None) -> str:
    """The concrete backend that runs on `device` for `name` (default: the selected one);
    "auto" resolves to its unmeasured rule (see _auto_backend; moe.py asks
    m2dino_kernels.autotune first on the devices it tunes).

    Raises ValueError, listing the backends that can run there, if `name` cannot."""
    name = _state["name"] if name is None else _validate_name(name, "backend")
    device_type = _device_type(device)
    available = _available_cache.get(device_type)
    if available is None:
        available = tuple(available_backends(device_type))
    if name == "auto":
        return _auto_backend(device_type, available, dtype)
    if name not in available:
        raise ValueError(f"kernel backend {name!r} cannot run on {device_type} tensors; "
                         f"available there: {', '.join(available)}")
    return name


def backend_module(name: str):
    """The module implementing concrete backend `name` (imported on first use)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"unknown concrete kernel backend {name!r}; "
                         f"expected one of {', '.join(_BACKEND_MODULES)}")
    return importlib.import_module(_BACKEND_MODULES[name])
