"""The MoE kernel backend protocol: the values that travel between m2dino_kernels.moe and a
backend module.

Protocol (the backend may assume valid, contiguous inputs; m2dino_kernels.moe checks them):
  route_forward(x, task_ids, gate_weight, gate_bias, top_k) -> Routing
  route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                 routing) -> (grad_x, grad_gate_weight, grad_gate_bias or None)
  experts_forward(x, routing, params: ExpertWeights, activation) -> (y, h_pre, expert_out)
  experts_backward(grad_y, x, routing, params, activation, h_pre, expert_out)
      -> (grad_x, grad_routing_weights, ExpertWeights of the weight and bias gradients)

Which backends exist and where they run is m2dino_kernels.registry's (its names are also
importable from here, as before); which one runs is m2dino_kernels.selection's.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, probs and weights: fp32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(tensor: Tensor):
    """Autocast off around a backend call: the op's inputs already have their dtype, and the
    backends' fp32 accumulation and output dtypes must not be recast by a caller's region."""
    return torch.autocast(tensor.device.type, enabled=False)


# The registry's names, where callers have always found them (imported last: the registry
# imports the backend modules, which import the protocol types above).
from m2dino_kernels.registry import (  # noqa: E402, F401
    _C,
    BACKEND_ALIASES,
    BACKEND_DTYPES,
    CONCRETE_BACKENDS,
    REFERENCE,
    backend_module,
)
