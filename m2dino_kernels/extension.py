"""Backends "cpp" and "cuda": a thin adaptor onto the compiled extension m2dino_kernels._C.

The four functions of DESIGN.md's kernel backend protocol. The extension dispatches on the
device of x itself (C++ kernels for CPU tensors, CUDA kernels for CUDA tensors when it was
built with CUDA), so both backend names map onto this one module. Every C++ entry point
re-checks shapes, dtypes, contiguity and devices (a misuse raises RuntimeError); the public
validation with friendly messages happens in m2dino_kernels.moe before this module is called.

CPU: fp32, bf16, fp16 and (for gradcheck) float64 inputs, fp32 accumulation (fp64 for fp64).
CUDA: fp32, fp16, bf16 with fp32 accumulation. The CUDA expert GEMM loop reads the E+1
offsets to the host once per call (one sync); routing itself never syncs.
"""
from __future__ import annotations

from m2dino_kernels.backends import ExpertWeights, Routing
from m2dino_kernels.registry import _C


def _extension():
    if _C is None:
        raise RuntimeError("m2dino_kernels._C is not built; build it in an m2dino checkout with "
                           "`pip install --no-build-isolation -e .` (docs/troubleshooting.md there)")
    return _C


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
    out = _extension().route_forward(x, task_ids, gate_weight, gate_bias, int(top_k))
    return Routing(*out, top_k=int(top_k))


def route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                   routing: Routing):
    grad_x, grad_gate_weight, grad_gate_bias = _extension().route_backward(
        grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, bool(has_bias),
        routing.probs, routing.weights, routing.experts)
    return grad_x, grad_gate_weight, grad_gate_bias


def experts_forward(x, routing: Routing, params: ExpertWeights, activation):
    y, h_pre, expert_out = _extension().experts_forward(
        x, routing.weights, routing.experts, routing.sorted_slots, routing.offsets, *params,
        activation)
    return y, h_pre, expert_out


def experts_backward(grad_y, x, routing: Routing, params: ExpertWeights, activation, h_pre,
                     expert_out):
    grad_x, grad_weights, *grad_params = _extension().experts_backward(
        grad_y, x, routing.weights, routing.experts, routing.sorted_slots, routing.offsets,
        *params, activation, h_pre, expert_out)
    return grad_x, grad_weights, ExpertWeights(*grad_params)
