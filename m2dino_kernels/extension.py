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

from m2dino_kernels.backends import _C


def _extension():
    if _C is None:
        raise RuntimeError("m2dino_kernels._C is not built; build it with "
                           "`pip install --no-build-isolation -e .` (see README.md)")
    return _C


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
    return tuple(_extension().route_forward(x, task_ids, gate_weight, gate_bias, int(top_k)))


def route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                   probs, weights, experts):
    grad_x, grad_gate_weight, grad_gate_bias = _extension().route_backward(
        grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, bool(has_bias), probs,
        weights, experts)
    return grad_x, grad_gate_weight, grad_gate_bias


def experts_forward(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b,
                    activation):
    return tuple(_extension().experts_forward(x, weights, experts, sorted_slots, offsets,
                                              fc1_w, fc1_b, fc2_w, fc2_b, activation))


def experts_backward(grad_y, x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w,
                     fc2_b, activation, h_pre, expert_out):
    return tuple(_extension().experts_backward(grad_y, x, weights, experts, sorted_slots,
                                               offsets, fc1_w, fc1_b, fc2_w, fc2_b, activation,
                                               h_pre, expert_out))
