"""Backend "triton": fused task-conditioned routing and scatter2scatter grouped expert GEMMs.

The four functions of DESIGN.md's kernel backend protocol (`route_forward`, `route_backward`,
`experts_forward`, `experts_backward`), as host code over the kernels of routing.py and
grouped_gemm.py. m2dino_kernels.moe validates and makes inputs contiguous before calling
them, so nothing here re-checks shapes; only the dtypes this backend supports are checked.

- route_forward: routing kernel (logits, softmax, top-k, renormalise), then the expert-sorted
  permutation by the device counting sort: no device-to-host sync.
- route_backward: the routing chain back to the logits and grad_x in one kernel; the gate
  weight GEMM backward grouped by task (tokens stably sorted by task id).
- experts_forward: fc1 (gather + activation), then fc2 scattered to slot order, times the
  router weight, summed over k into y in fp32 (no atomics).
- experts_backward: route weight grad, dHidden (activation derivative in the epilogue), dX
  scattered to slot order then summed over k, and per-expert weight and bias gradients.

Runs on CUDA (fp32/fp16/bf16, fp32 accumulation) and, under TRITON_INTERPRET=1, on CPU
tensors (slow; meant for tests).
"""
from __future__ import annotations

import torch

from m2dino_kernels.backends import ExpertWeights, Routing
from m2dino_kernels.triton import grouped_gemm, routing

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtypes(function: str, **tensors) -> None:
    """fp16/bf16/fp32 only (fp32 accumulation throughout)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton backend {function}: {name} has dtype {tensor.dtype}; "
                            "supported: float16, bfloat16, float32 (use the 'reference' "
                            "or 'cpp' backend for float64)")


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
    _check_dtypes("route_forward", x=x, gate_weight=gate_weight, gate_bias=gate_bias)
    logits, probs, weights, experts = routing.route_topk(x, task_ids, gate_weight, gate_bias,
                                                         top_k)
    sorted_slots, offsets = routing.stable_sort_by_key(experts.view(-1), gate_weight.shape[1])
    return Routing(logits, probs, weights, experts, offsets.diff(), sorted_slots, offsets, top_k)


def route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                   routed: Routing):
    probs, weights, experts = routed.probs, routed.weights, routed.experts
    _check_dtypes("route_backward", x=x, gate_weight=gate_weight)
    D = x.shape[1]
    NT, E, _ = gate_weight.shape
    grad_logits_total, grad_x = routing.route_logits_backward(
        grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, probs, weights,
        experts)
    # Gate weight GEMM backward grouped by task: tokens stably sorted by task id.
    token_order, task_offsets = routing.stable_sort_by_key(task_ids, NT)
    grad_gate_weight, grad_gate_bias = grouped_gemm.weight_grad(
        grad_logits_total, x, token_order, None, task_offsets, NT, E, D, a_stride=D,
        gather_g=True, gather_a=True, with_bias=has_bias, dot_fp32=True,
        dw_dtype=gate_weight.dtype, db_dtype=gate_weight.dtype,
    )
    return grad_x, grad_gate_weight, grad_gate_bias


def experts_forward(x, routed: Routing, params: ExpertWeights, activation):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, sorted_slots, offsets, top_k = (routed.weights, routed.sorted_slots, routed.offsets,
                                             routed.top_k)
    act_code = grouped_gemm.activation_code(activation)
    _check_dtypes("experts_forward", x=x, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)
    T, D = x.shape
    h_pre, hidden = grouped_gemm.fc1_forward(x, sorted_slots, offsets, fc1_w, fc1_b, act_code,
                                             top_k)
    expert_out, y_slots = grouped_gemm.fc2_scatter_forward(hidden, sorted_slots, offsets,
                                                           fc2_w, fc2_b, weights)
    # Each token's k weighted contributions, summed in fp32 (slot t*k+j is row t, column j).
    y = y_slots.view(T, top_k, D).sum(dim=1).to(x.dtype)
    return y, h_pre, expert_out


def experts_backward(grad_y, x, routed: Routing, params: ExpertWeights, activation, h_pre,
                     expert_out):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, sorted_slots, offsets, top_k = (routed.weights, routed.sorted_slots, routed.offsets,
                                             routed.top_k)
    act_code = grouped_gemm.activation_code(activation)
    _check_dtypes("experts_backward", grad_y=grad_y, x=x, fc1_w=fc1_w, fc2_w=fc2_w)
    T, D = x.shape
    E, H1, _ = fc1_w.shape
    H = fc2_w.shape[2]
    grad_y = grad_y.contiguous()
    grad_weights = grouped_gemm.route_weight_grad(grad_y, expert_out, sorted_slots, top_k)
    d_hidden = grouped_gemm.dhidden_backward(grad_y, sorted_slots, offsets, weights, fc2_w,
                                             h_pre, act_code, top_k)
    dx_slots = grouped_gemm.fc1_scatter_input_grad(d_hidden, sorted_slots, offsets, fc1_w)
    grad_x = dx_slots.view(T, top_k, D).sum(dim=1).to(x.dtype)
    # dW2[e] = sum_r (w * grad_y[token])^T act(h_pre[r]); dW1[e] = sum_r dH1[r]^T x[token].
    grad_fc2_w, grad_fc2_b = grouped_gemm.weight_grad(
        grad_y, h_pre, sorted_slots, weights, offsets, E, D, H, a_stride=H1, a_half=H,
        index_div=top_k, gather_g=True, gather_a=False, act_a=act_code,
        dw_dtype=fc2_w.dtype, db_dtype=fc2_b.dtype,
    )
    grad_fc1_w, grad_fc1_b = grouped_gemm.weight_grad(
        d_hidden, x, sorted_slots, None, offsets, E, H1, D, a_stride=D, index_div=top_k,
        gather_g=False, gather_a=True, dw_dtype=fc1_w.dtype, db_dtype=fc1_b.dtype,
    )
    return grad_x, grad_weights, ExpertWeights(grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b)
