"""Backend "grouped_mm": our routing and permutation, the expert GEMMs through PyTorch's
`torch.nn.functional.grouped_mm` with device-side offsets. The library floor: what a user with
only PyTorch already has, and what our own kernels must beat.

The four functions of DESIGN.md's kernel backend protocol:
- route_forward / route_backward: the reference's (m2dino_kernels.reference). They are plain
  PyTorch, run on every device, make no device-to-host sync (a stable sort and a scatter_add
  give the permutation and the counts) and need no extension, so this backend stays a pure
  library path; the routing is a few percent of the MoE block.
- experts_forward: gather x by the expert-sorted slots, fc1 as one grouped GEMM over the
  experts' contiguous row blocks (offsets = offsets[1:] as int32, on the device), bias, the
  activation, fc2 the same way, then the router-weighted sum over k in fp32.
- experts_backward: grouped_mm called directly rather than through its autograd (which
  recomputes what we keep and, on CPU, takes ~7x the forward): dHidden = grouped dY @ W2,
  dX = grouped dH1 @ W1, dW = per-expert X^T dY through the 2-D x 2-D form ("offs on K"),
  bias gradients by a segment sum over each expert's rows (fp32 accumulation).

No .item()/.tolist()/nonzero/.cpu(): nothing here reads a tensor on the host. Whether
grouped_mm itself syncs is PyTorch's: on CUDA sm90/sm100 in bf16 it runs CUTLASS with the
offsets on the device; elsewhere (other dtypes, sm80, CPU) its fallback loops over the groups
and copies the offsets to the host (on CPU that is free).

grouped_mm needs every non-unit stride to be a multiple of 16 bytes: operands whose rows are
not (D or H not a multiple of 4 in fp32, of 8 in fp16/bf16; never at ViT sizes) are copied into
row-padded buffers first. Inputs fp32, bf16, fp16; the GEMMs run in the input dtype, the
combine over k and the bias gradients accumulate in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from m2dino_kernels.backends import ExpertWeights, Routing
from m2dino_kernels.reference import (
    activate,
    activate_backward,
    combine_slots,
    invert_slots,
    route_backward,
    route_forward,
    route_weight_grad,
)

__all__ = ["route_forward", "route_backward", "experts_forward", "experts_backward",
           "SUPPORTED_DTYPES", "runs_on"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ALIGN_BYTES = 16


def runs_on(device_type: str) -> bool:
    """Whether this torch's grouped_mm runs on `device_type` tensors (probed on CPU; on CUDA
    it needs compute capability >= 8.0)."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    if device_type != "cpu":
        return False
    try:
        a = torch.ones(4, 4)
        out = F.grouped_mm(a, torch.ones(2, 4, 4), offs=torch.tensor([2, 4], dtype=torch.int32))
        return tuple(out.shape) == (4, 4)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t when grouped_mm accepts its strides (unit last stride, every other stride and the
    start 16-byte aligned), else a copy whose rows are padded to that alignment (a view of
    the same shape; the padding is never read)."""
    size = t.element_size()
    # (allocations start 16-byte aligned: the storage offset tells where a view starts)
    if (t.stride(-1) == 1 and t.storage_offset() * size % _ALIGN_BYTES == 0
            and all(s * size % _ALIGN_BYTES == 0 for s in t.stride()[:-1])):
        return t
    width = t.shape[-1]
    padded = t.new_empty(*t.shape[:-1], width + (-width) % (_ALIGN_BYTES // size))
    view = padded[..., :width]
    view.copy_(t)
    return view


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm on aligned operands; a result with padded rows is made contiguous."""
    return F.grouped_mm(a, b, offs=offs).contiguous()


def _weight_grad(g_rows: torch.Tensor, inputs: torch.Tensor, offs: torch.Tensor,
                 idle: torch.Tensor) -> torch.Tensor:
    """dW[e] = g_rows[rows of e]^T @ inputs[rows of e] ([E, G, I]) as one 2-D x 2-D grouped
    GEMM. Experts without rows get exact zeros whatever the kernel does with an empty
    group (K = 0)."""
    out = _gmm(_aligned(g_rows).t(), _aligned(inputs), offs)
    return out.masked_fill_(idle.view(-1, 1, 1), 0)


def _group_sums(rows: torch.Tensor, counts: torch.Tensor, dtype) -> torch.Tensor:
    """Per-expert column sums of the expert-sorted rows [N, C] -> [E, C] in `dtype`,
    accumulated in fp32 (no host read: `unsafe` skips segment_reduce's checks of lengths
    on the host; the routing made them)."""
    num_experts = counts.numel()
    if rows.shape[0] == 0:
        return rows.new_zeros(num_experts, rows.shape[1], dtype=dtype)
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    sums = torch.segment_reduce(rows.to(acc), "sum", lengths=counts, unsafe=True)
    return sums.to(dtype)


def _rows(x, sorted_slots, experts, offsets, top_k):
    """token_of_row, expert_of_row and the int32 group ends grouped_mm takes."""
    token_of_row = sorted_slots // top_k
    expert_of_row = experts.reshape(-1)[sorted_slots]
    return token_of_row, expert_of_row, offsets[1:].to(torch.int32)


def experts_forward(x, routing: Routing, params: ExpertWeights, activation):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, experts, sorted_slots, offsets, top_k = (
        routing.weights, routing.experts, routing.sorted_slots, routing.offsets, routing.top_k)
    acc = torch.float32
    token_of_row, expert_of_row, offs = _rows(x, sorted_slots, experts, offsets, top_k)
    x_rows = _aligned(x.index_select(0, token_of_row))
    h_pre = _gmm(x_rows, _aligned(fc1_w).transpose(-2, -1), offs)
    h_pre += fc1_b.index_select(0, expert_of_row)
    hidden = _aligned(activate(h_pre, activation))
    expert_out = _gmm(hidden, _aligned(fc2_w).transpose(-2, -1), offs)
    expert_out += fc2_b.index_select(0, expert_of_row)
    y = combine_slots(expert_out, invert_slots(sorted_slots), weights, top_k, acc)
    return y.to(x.dtype), h_pre, expert_out


def experts_backward(grad_y, x, routing: Routing, params: ExpertWeights, activation, h_pre,
                     expert_out):
    fc1_w, fc1_b, fc2_w, fc2_b = params
    weights, experts, sorted_slots, offsets, top_k = (
        routing.weights, routing.experts, routing.sorted_slots, routing.offsets, routing.top_k)
    dtype = x.dtype
    acc = torch.float32
    token_of_row, _, offs = _rows(x, sorted_slots, experts, offsets, top_k)
    row_of_slot = invert_slots(sorted_slots)
    counts = offsets.diff()
    idle = counts == 0
    grad_y = grad_y.contiguous()
    grad_weights = route_weight_grad(grad_y, expert_out, row_of_slot, top_k, acc)
    # gradient of each row's unweighted output: its token's grad_y times its router weight
    row_weight = weights.reshape(-1)[sorted_slots]
    g_out = (grad_y.index_select(0, token_of_row).to(acc) * row_weight[:, None]).to(dtype)
    hidden = activate(h_pre, activation)  # recomputed: only h_pre is saved
    grad_fc2_w = _weight_grad(g_out, hidden, offs, idle)
    grad_fc2_b = _group_sums(g_out, counts, fc2_b.dtype)
    grad_hidden = _gmm(_aligned(g_out), _aligned(fc2_w), offs)
    grad_h_pre = activate_backward(h_pre, grad_hidden, activation)
    x_rows = x.index_select(0, token_of_row)
    grad_fc1_w = _weight_grad(grad_h_pre, x_rows, offs, idle)
    grad_fc1_b = _group_sums(grad_h_pre, counts, fc1_b.dtype)
    grad_x_rows = _gmm(_aligned(grad_h_pre), _aligned(fc1_w), offs)
    grad_x = combine_slots(grad_x_rows, row_of_slot, None, top_k, acc)
    return (grad_x.to(dtype), grad_weights.to(weights.dtype),
            ExpertWeights(grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b))
