"""The MoE kernel backend protocol: the values that travel through it and the backend modules.

Backends (each a module exposing DESIGN.md's four protocol functions, imported lazily):
  "reference"   m2dino_kernels.reference   plain PyTorch, the oracle; runs everywhere
                                           ("torch" is its old name, still accepted)
  "cpp"         m2dino_kernels.extension   the C++ extension m2dino_kernels._C, CPU tensors
  "cuda"        m2dino_kernels.extension   the same extension's CUDA kernels (built with CUDA)
  "triton"      m2dino_kernels.triton.moe  Triton kernels: CUDA tensors, or CPU tensors under
                                           the Triton interpreter (slow; meant for tests)
  "grouped_mm"  m2dino_kernels.grouped_mm  the reference's routing, expert GEMMs through
                                           torch.nn.functional.grouped_mm: the library floor

Protocol (the backend may assume valid, contiguous inputs; m2dino_kernels.moe checks them):
  route_forward(x, task_ids, gate_weight, gate_bias, top_k) -> Routing
  route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                 routing) -> (grad_x, grad_gate_weight, grad_gate_bias or None)
  experts_forward(x, routing, params: ExpertWeights, activation) -> (y, h_pre, expert_out)
  experts_backward(grad_y, x, routing, params, activation, h_pre, expert_out)
      -> (grad_x, grad_routing_weights, ExpertWeights of the weight and bias gradients)

Which backend runs where, and which one `auto` picks, is m2dino_kernels.selection's job.
If the extension fails to import, one warning is given when this module is imported.
"""
from __future__ import annotations

import importlib
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

REFERENCE = "reference"
# Old names still accepted wherever a backend is named (and read from autotune cache files).
BACKEND_ALIASES = {"torch": REFERENCE}

_BACKEND_MODULES = {
    REFERENCE: "m2dino_kernels.reference",
    "cpp": "m2dino_kernels.extension",
    "cuda": "m2dino_kernels.extension",
    "triton": "m2dino_kernels.triton.moe",
    "grouped_mm": "m2dino_kernels.grouped_mm",
}
CONCRETE_BACKENDS = tuple(_BACKEND_MODULES)

_HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
# Input dtypes each concrete backend accepts (float64 for gradcheck). Kept here rather than in
# the backend modules so that checking it never imports one (an import inside a
# torch.compile'd call would be a graph break).
BACKEND_DTYPES = {
    REFERENCE: _HALF_AND_FLOAT + (torch.float64,),
    "cpp": _HALF_AND_FLOAT + (torch.float64,),
    "cuda": _HALF_AND_FLOAT,
    "triton": _HALF_AND_FLOAT,
    "grouped_mm": _HALF_AND_FLOAT,  # what torch.nn.functional.grouped_mm takes
}


class Routing(NamedTuple):
    """Result of task_topk_route. Slot s = t * top_k + j is token t's j-th expert choice."""

    logits: Tensor        # [T, E] fp32: router logits of each token's own task
    probs: Tensor         # [T, E] fp32: softmax(logits)
    weights: Tensor       # [T, k] fp32: top-k probabilities renormalised to sum to 1
    experts: Tensor       # [T, k] int64: chosen experts, by descending probability
    counts: Tensor        # [E] int64: slots routed to each expert
    sorted_slots: Tensor  # [T*k] int64: slots stably sorted by expert
    offsets: Tensor       # [E+1] int64: expert e owns sorted_slots[offsets[e]:offsets[e+1]]
    top_k: int

    def tensors(self) -> list:
        """Every field but top_k, in order: how a custom op's schema carries a Routing."""
        return [getattr(self, name) for name in ROUTING_TENSORS]

    @classmethod
    def from_tensors(cls, tensors) -> "Routing":
        """The Routing of tensors() (top_k is the width of weights)."""
        logits, probs, weights, experts, counts, sorted_slots, offsets = tensors
        return cls(logits, probs, weights, experts, counts, sorted_slots, offsets,
                   int(weights.shape[1]))


ROUTING_TENSORS = Routing._fields[:-1]


class ExpertWeights(NamedTuple):
    """The stacked expert MLP parameters (nn.Linear layout), or their gradients."""

    fc1_weight: Tensor  # [E, H1, D]
    fc1_bias: Tensor    # [E, H1]
    fc2_weight: Tensor  # [E, D, H]
    fc2_bias: Tensor    # [E, D]


def _load_extension():
    """Import m2dino_kernels._C once; on failure warn once and return None."""
    try:
        return importlib.import_module("m2dino_kernels._C")
    except (ImportError, OSError) as err:
        warnings.warn(
            f"m2dino_kernels._C could not be imported ({err}); the C++/CUDA kernel backends "
            f"are unavailable and the plain PyTorch backend {REFERENCE!r} is used instead. "
            "A wheel built with M2DINO_BUILD_EXT=0 (such as an exported challenge entry's) has none on "
            "purpose; in an m2dino checkout, `pip install --no-build-isolation -e .` builds them "
            "(docs/troubleshooting.md there).",
            RuntimeWarning, stacklevel=3)
        return None


_C = _load_extension()


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, probs and weights: fp32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(tensor: Tensor):
    """Autocast off around a backend call: the op's inputs already have their dtype, and the
    backends' fp32 accumulation and output dtypes must not be recast by a caller's region."""
    return torch.autocast(tensor.device.type, enabled=False)


def backend_module(name: str):
    """The module implementing concrete backend `name` (imported on first use)."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"unknown concrete kernel backend {name!r}; "
                         f"expected one of {', '.join(_BACKEND_MODULES)}")
    return importlib.import_module(_BACKEND_MODULES[name])
