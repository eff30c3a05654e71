"""Backend "reference" (formerly "torch"): the plain PyTorch implementation every other
backend is tested against.

The four functions of DESIGN.md's kernel backend protocol, written for readability:
routing as one matmul against every task's router followed by a per-token gather, a stable
sort of the token slots by expert, and the experts as a loop of dense matmuls over each
expert's contiguous block of sorted rows. Accumulation is always fp32 (inputs are upcast,
results are cast back to the input dtype). Routing outputs are fp32, except that float64
inputs give float64 routing outputs so that the whole chain can be gradchecked.

`m2dino_kernels.moe` validates inputs and makes them contiguous before calling in here.

`naive_task_moe` is the way public task-MoE code does it (loop over tasks, then experts,
masks and index_add). It is kept only as the benchmarks' baseline; it is not a backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2dino_kernels.backends import ExpertWeights, Routing

ACTIVATIONS = ("gelu", "swiglu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for the 16-bit types; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------
def _task_gate_logits(x, task_ids, gate_weight, gate_bias):
    """logits[t] = gate_weight[task_t] @ x[t] (+ gate_bias[task_t]), accumulated in fp32.

    One matmul against all NT*E router rows then a gather: the gate is tiny next to the
    experts, and this avoids materialising a [T, E, D] copy of the selected routers."""
    num_tasks, num_experts, dim = gate_weight.shape
    acc = _acc_dtype(x.dtype)
    all_logits = x.to(acc) @ gate_weight.reshape(num_tasks * num_experts, dim).to(acc).t()
    rows = torch.arange(x.shape[0], device=x.device)
    logits = all_logits.view(-1, num_tasks, num_experts)[rows, task_ids]
    if gate_bias is not None:
        logits = logits + gate_bias.to(acc)[task_ids]
    return logits


def sort_slots_by_expert(experts: torch.Tensor, num_experts: int):
    """Stable expert-sorted permutation of the T*k slots, with per-expert counts and offsets.

    No device-to-host sync: counts come from a scatter_add (bincount would sync to size its
    output on CUDA)."""
    flat = experts.reshape(-1)
    sorted_slots = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return counts, sorted_slots, offsets


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
    num_experts = gate_weight.shape[1]
    logits = _task_gate_logits(x, task_ids, gate_weight, gate_bias)
    probs = torch.softmax(logits, dim=-1)
    # A stable descending sort breaks ties towards the lower expert index (topk does not
    # promise any tie order). NaN probabilities sort first but indices stay in [0, E).
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    experts = order.indices[:, :top_k].contiguous()
    top = order.values[:, :top_k]
    weights = top / top.sum(dim=-1, keepdim=True)
    counts, sorted_slots, offsets = sort_slots_by_expert(experts, num_experts)
    return Routing(logits, probs, weights.contiguous(), experts, counts, sorted_slots, offsets,
                   top_k)


def route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                   routing: Routing):
    probs, weights, experts = routing.probs, routing.weights, routing.experts
    num_tasks, num_experts, dim = gate_weight.shape
    num_tokens = x.shape[0]
    acc = _acc_dtype(x.dtype)
    p = probs.to(acc)
    # weights_j = p_sel_j / S with S = sum_i p_sel_i  =>  dL/dp_sel_j = (gw_j - <gw, w>) / S
    p_sel = torch.gather(p, 1, experts)
    total = p_sel.sum(dim=-1, keepdim=True)
    gw = grad_weights.to(acc)
    d_p_sel = (gw - (gw * weights.to(acc)).sum(dim=-1, keepdim=True)) / total
    g_probs = grad_probs.to(acc).scatter_add(1, experts, d_p_sel)
    # softmax backward
    g = grad_logits.to(acc) + p * (g_probs - (g_probs * p).sum(dim=-1, keepdim=True))
    # Gate GEMM backward, the transpose of the all-tasks matmul of the forward: each token's
    # gradient sits in its own task's E columns, zeros elsewhere.
    g_all = torch.zeros(num_tokens, num_tasks, num_experts, dtype=acc, device=x.device)
    g_all[torch.arange(num_tokens, device=x.device), task_ids] = g
    g_all = g_all.view(num_tokens, num_tasks * num_experts)
    w_flat = gate_weight.reshape(num_tasks * num_experts, dim).to(acc)
    grad_x = (g_all @ w_flat).to(x.dtype)
    grad_gate_weight = (g_all.t() @ x.to(acc)).view(num_tasks, num_experts, dim)
    grad_gate_weight = grad_gate_weight.to(gate_weight.dtype)
    grad_gate_bias = None
    if has_bias:
        grad_gate_bias = torch.zeros(num_tasks, num_experts, dtype=acc, device=x.device)
        grad_gate_bias.index_add_(0, task_ids, g)
        grad_gate_bias = grad_gate_bias.to(gate_weight.dtype)
    return grad_x, grad_gate_weight, grad_gate_bias


# ---------------------------------------------------------------------------------------
# Expert MLP
# ---------------------------------------------------------------------------------------
def activate(h_pre: torch.Tensor, activation: str) -> torch.Tensor:
    """The hidden activation: exact erf GELU, or SwiGLU silu(a) * b with a, b = h.chunk(2)."""
    if activation == "gelu":
        return F.gelu(h_pre)
    a, b = h_pre.chunk(2, dim=-1)
    return F.silu(a) * b


def activate_backward(h_pre: torch.Tensor, grad_act: torch.Tensor, activation: str):
    """d act / d h_pre applied to grad_act (closed forms, no autograd inside a backward)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_act, h_pre)
    a, b = h_pre.chunk(2, dim=-1)
    sig = torch.sigmoid(a)
    grad_a = grad_act * b * sig * (1.0 + a * (1.0 - sig))
    grad_b = grad_act * a * sig
    return torch.cat([grad_a, grad_b], dim=-1)


def _expert_ranges(offsets: torch.Tensor):
    """(expert, start, end) of each expert that has rows. One host read of offsets:
    acceptable for the oracle, which favours clarity over avoiding syncs."""
    bounds = offsets.tolist()
    return [(e, bounds[e], bounds[e + 1]) for e in range(len(bounds) - 1)
            if bounds[e + 1] > bounds[e]]


def invert_slots(sorted_slots: torch.Tensor) -> torch.Tensor:
    """Inverse of the permutation, row_of_slot: row_of_slot[sorted_slots[i]] = i. Combining the k rows
    of a token is then a parallel gather instead of a serial index_add."""
    rows = torch.arange(sorted_slots.numel(), device=sorted_slots.device)
    return torch.empty_like(sorted_slots).scatter_(0, sorted_slots, rows)


def combine_slots(rows, row_of_slot, weights, top_k, acc):
    """out[t] = sum_j weights[t, j] * rows[row of slot t*k+j], in `acc` (weights None: the
    plain sum over the k slots). rows [T*k, C] in expert-sorted order -> [T, C]."""
    by_slot = rows[row_of_slot].to(acc).view(-1, top_k, rows.shape[1])
    if weights is None:
        return by_slot.sum(dim=1)
    return torch.bmm(weights.to(acc).unsqueeze(1), by_slot).squeeze(1)


def route_weight_grad(grad_y, expert_out, row_of_slot, top_k, acc):
    """grad_weights[t, j] = <grad_y[t], expert_out[row of slot t*k+j]>, in `acc`."""
    num_tokens, dim = grad_y.shape
    out_by_slot = expert_out[row_of_slot].to(acc).view(num_tokens, top_k, dim)
    return torch.bmm(out_by_slot, grad_y.to(acc).unsqueeze(2)).view(num_tokens, top_k)


def experts_forward(x, routing: Routing, params: ExpertWeights, activation):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, sorted_slots, offsets, top_k = (routing.weights, routing.sorted_slots,
                                             routing.offsets, routing.top_k)
    num_tokens, dim = x.shape
    acc = _acc_dtype(x.dtype)
    num_rows = sorted_slots.numel()
    x_rows = x[sorted_slots // top_k].to(acc)  # row i holds the token of slot sorted_slots[i]
    h_pre = torch.empty(num_rows, fc1_w.shape[1], dtype=acc, device=x.device)
    expert_out = torch.empty(num_rows, dim, dtype=acc, device=x.device)
    for e, start, end in _expert_ranges(offsets):
        # each expert's rows are one contiguous block: write the matmuls straight into it
        torch.addmm(fc1_b[e].to(acc), x_rows[start:end], fc1_w[e].to(acc).t(),
                    out=h_pre[start:end])
        torch.addmm(fc2_b[e].to(acc), activate(h_pre[start:end], activation),
                    fc2_w[e].to(acc).t(), out=expert_out[start:end])
    y = combine_slots(expert_out, invert_slots(sorted_slots), weights, top_k, acc)
    return y.to(x.dtype), h_pre.to(x.dtype), expert_out.to(x.dtype)


def experts_backward(grad_y, x, routing: Routing, params: ExpertWeights, activation, h_pre,
                     expert_out):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, sorted_slots, offsets, top_k = (routing.weights, routing.sorted_slots,
                                             routing.offsets, routing.top_k)
    num_tokens, dim = x.shape
    acc = _acc_dtype(x.dtype)
    token_of_row = sorted_slots // top_k
    row_of_slot = invert_slots(sorted_slots)
    x_rows = x[token_of_row].to(acc)
    grad_y = grad_y.to(acc)

    grad_weights = route_weight_grad(grad_y, expert_out, row_of_slot, top_k, acc)

    # gradient of each row's unweighted output: its token's grad_y times its router weight
    row_weight = weights.reshape(-1)[sorted_slots].to(acc)
    grad_out = grad_y[token_of_row] * row_weight[:, None]
    grad_x_rows = torch.empty_like(x_rows)  # every row belongs to one expert: all written
    grad_fc1_w = torch.zeros(fc1_w.shape, dtype=acc, device=x.device)
    grad_fc1_b = torch.zeros(fc1_b.shape, dtype=acc, device=x.device)
    grad_fc2_w = torch.zeros(fc2_w.shape, dtype=acc, device=x.device)
    grad_fc2_b = torch.zeros(fc2_b.shape, dtype=acc, device=x.device)
    for e, start, end in _expert_ranges(offsets):
        h = h_pre[start:end].to(acc)
        g_out = grad_out[start:end]
        torch.mm(g_out.t(), activate(h, activation), out=grad_fc2_w[e])
        torch.sum(g_out, dim=0, out=grad_fc2_b[e])
        g_h = activate_backward(h, g_out @ fc2_w[e].to(acc), activation)
        torch.mm(g_h.t(), x_rows[start:end], out=grad_fc1_w[e])
        torch.sum(g_h, dim=0, out=grad_fc1_b[e])
        torch.mm(g_h, fc1_w[e].to(acc), out=grad_x_rows[start:end])
    grad_x = combine_slots(grad_x_rows, row_of_slot, None, top_k, acc)
    return (grad_x.to(x.dtype), grad_weights.to(weights.dtype),
            ExpertWeights(grad_fc1_w.to(fc1_w.dtype), grad_fc1_b.to(fc1_b.dtype),
                          grad_fc2_w.to(fc2_w.dtype), grad_fc2_b.to(fc2_b.dtype)))


# ---------------------------------------------------------------------------------------
# The naive baseline (benchmarks only)
# ---------------------------------------------------------------------------------------
def naive_task_moe(x, task_ids, gate_weight, gate_bias, top_k, fc1_weight, fc1_bias,
                   fc2_weight, fc2_bias, activation="gelu", split_experts=False):
    """Task-conditioned top-k MoE as public task-MoE code writes it: a Python loop over the
    tasks present, then over experts, with boolean masks and index_add. Differentiable
    through plain autograd. Returns y [T, D]. Slow on purpose: the benchmarks' baseline.

    The experts are indexed in the stacked [E, ...] weights, so autograd gives every
    (task, expert) pair a full-size zero-filled weight gradient; `split_experts=True` splits
    the weights once into per-expert tensors (as an nn.ModuleList of experts holds them),
    the cheaper way to write the same loop."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if split_experts:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = (
            w.unbind(0) for w in (fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    num_experts = gate_weight.shape[1]
    y = torch.zeros_like(x)
    for task in torch.unique(task_ids).tolist():
        token_idx = (task_ids == task).nonzero(as_tuple=True)[0]
        x_task = x[token_idx]
        bias = None if gate_bias is None else gate_bias[task]
        probs = torch.softmax(F.linear(x_task, gate_weight[task], bias).float(), dim=-1)
        top_probs, top_experts = probs.topk(top_k, dim=-1)
        top_weights = top_probs / top_probs.sum(dim=-1, keepdim=True)
        y_task = torch.zeros_like(x_task)
        for e in range(num_experts):
            rows, slots = (top_experts == e).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            hidden = activate(F.linear(x_task[rows], fc1_weight[e], fc1_bias[e]), activation)
            out = F.linear(hidden, fc2_weight[e], fc2_bias[e])
            y_task = y_task.index_add(0, rows, out * top_weights[rows, slots, None].to(x.dtype))
        y = y.index_add(0, token_idx, y_task)
    return y
