"""Task-conditioned top-k routing and the stable counting sort, as Triton kernels.

- Routing forward: one program per block of tokens gathers each token's task gate rows,
  computes fp32 logits, softmax, top-k (descending, ties to the lower expert) and the
  renormalised weights.
- Counting sort: the expert-sorted permutation (and, in the backward, the tokens sorted by
  task) is a block-parallel stable counting sort on the device (block histograms, two tiny
  exclusive scans, stable placement): no device-to-host sync.
- Routing backward: the softmax / top-k / renormalise chain back to the logits, and
  grad_x = W[task]^T grad_logits. The gate weight gradient is a grouped GEMM
  (grouped_gemm.weight_grad over tokens sorted by task), composed in moe.py.

Inputs are validated and contiguous (m2dino_kernels.moe); nothing here re-checks shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from m2dino_kernels.triton.target import INTERPRETER

# Routing kernels are elementwise over [tokens, experts, D-chunk]: fixed small tiles.
_ROUTE_BLOCK_T = 16
_ROUTE_BLOCK_D = 32 if INTERPRETER else 64
_PERMUTE_BLOCK = 64 if INTERPRETER else 256  # keys per program of the counting sort


# ---------------------------------------------------------------------------------------
# Routing forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _route_kernel(
    x_ptr, task_ptr, gate_w_ptr, gate_b_ptr,
    logits_ptr, probs_ptr, weights_ptr, experts_ptr,
    T, E, D,
    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per block of BLOCK_T tokens: task-selected gate logits (fp32), softmax, top-k and
    renormalised weights. BLOCK_E / BLOCK_K are E / top_k rounded up to powers of two."""
    pid = tl.program_id(0)
    t_idx = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e_idx = tl.arange(0, BLOCK_E)
    t_mask = t_idx < T
    e_mask = e_idx < E
    te_mask = t_mask[:, None] & e_mask[None, :]
    task = tl.load(task_ptr + t_idx, mask=t_mask, other=0)

    # logits[t, e] = <gate_w[task[t], e, :], x[t, :]>: a gathered [T, E, D] product.
    logits = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    gate_row = (task[:, None] * E + e_idx[None, :]) * D  # [BT, BE]
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_idx < D
        xv = tl.load(x_ptr + t_idx[:, None].to(tl.int64) * D + d_idx[None, :],
                     mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        wv = tl.load(gate_w_ptr + gate_row[:, :, None] + d_idx[None, None, :],
                     mask=te_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
        logits += tl.sum(wv * xv[:, None, :], axis=2)
    if HAS_BIAS:
        logits += tl.load(gate_b_ptr + task[:, None] * E + e_idx[None, :], mask=te_mask,
                          other=0.0).to(tl.float32)

    out_te = t_idx[:, None].to(tl.int64) * E + e_idx[None, :]
    tl.store(logits_ptr + out_te, logits, mask=te_mask)
    masked = tl.where(e_mask[None, :], logits, float("-inf"))
    row_max = tl.max(masked, axis=1)
    numer = tl.exp(masked - row_max[:, None])
    probs = numer / tl.sum(numer, axis=1)[:, None]
    tl.store(probs_ptr + out_te, probs, mask=te_mask)

    # Top-k by repeated arg-max; ties go to the lower expert index. If a row is NaN no
    # value equals the max: fall back to the lowest expert not yet taken, so indices
    # always stay in [0, E) (DESIGN.md NaN policy).
    available = te_mask
    k_idx = tl.arange(0, BLOCK_K)
    top_p = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_e = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        cand = tl.where(available, probs, float("-inf"))
        best = tl.max(cand, axis=1)
        hit = available & (cand == best[:, None])
        choice = tl.min(tl.where(hit, e_idx[None, :], BLOCK_E), axis=1)
        fallback = tl.min(tl.where(available, e_idx[None, :], BLOCK_E), axis=1)
        choice = tl.where(choice < BLOCK_E, choice, fallback)
        choice = tl.minimum(choice, E - 1)
        chosen = e_idx[None, :] == choice[:, None]
        p_sel = tl.sum(tl.where(chosen, probs, 0.0), axis=1)
        available = available & ~chosen
        top_p = tl.where(k_idx[None, :] == j, p_sel[:, None], top_p)
        top_e = tl.where(k_idx[None, :] == j, choice[:, None].to(tl.int64), top_e)
    top_w = top_p / tl.sum(top_p, axis=1)[:, None]
    out_tk = t_idx[:, None].to(tl.int64) * TOP_K + k_idx[None, :]
    tk_mask = t_mask[:, None] & (k_idx[None, :] < TOP_K)
    tl.store(weights_ptr + out_tk, top_w, mask=tk_mask)
    tl.store(experts_ptr + out_tk, top_e, mask=tk_mask)


def route_topk(x, task_ids, gate_weight, gate_bias, top_k):
    """(logits [T, E] fp32, probs [T, E] fp32, weights [T, k] fp32, experts [T, k] int64)."""
    T, D = x.shape
    E = gate_weight.shape[1]
    dev = x.device
    logits = torch.empty(T, E, dtype=torch.float32, device=dev)
    probs = torch.empty(T, E, dtype=torch.float32, device=dev)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    experts = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    if T > 0:
        has_bias = gate_bias is not None
        _route_kernel[(triton.cdiv(T, _ROUTE_BLOCK_T),)](
            x, task_ids, gate_weight, gate_bias if has_bias else gate_weight,
            logits, probs, weights, experts, T, E, D,
            HAS_BIAS=has_bias, TOP_K=top_k, BLOCK_T=_ROUTE_BLOCK_T,
            BLOCK_E=triton.next_power_of_2(E), BLOCK_D=_ROUTE_BLOCK_D,
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return logits, probs, weights, experts


# ---------------------------------------------------------------------------------------
# Stable counting sort
# ---------------------------------------------------------------------------------------
@triton.jit
def _block_histogram_kernel(keys_ptr, block_counts_ptr, N, E,
                            BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """block_counts[b, e] = how many of keys[b*BLOCK : (b+1)*BLOCK] equal e."""
    pid = tl.program_id(0)
    s_idx = pid * BLOCK + tl.arange(0, BLOCK)
    e_idx = tl.arange(0, BLOCK_E)
    key = tl.load(keys_ptr + s_idx, mask=s_idx < N, other=BLOCK_E)
    counts = tl.sum((key[:, None] == e_idx[None, :]).to(tl.int32), axis=0)
    tl.store(block_counts_ptr + pid * E + e_idx, counts, mask=e_idx < E)


@triton.jit
def _block_place_kernel(keys_ptr, block_base_ptr, sorted_ptr, N, E,
                        BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Stable placement: item s of block b goes to block_base[b, key] + the number of
    earlier items of its block with the same key."""
    pid = tl.program_id(0)
    s_idx = pid * BLOCK + tl.arange(0, BLOCK)
    s_mask = s_idx < N
    e_idx = tl.arange(0, BLOCK_E)
    key = tl.load(keys_ptr + s_idx, mask=s_mask, other=BLOCK_E)
    onehot = (key[:, None] == e_idx[None, :]).to(tl.int32)
    earlier_same_key = tl.cumsum(onehot, 0) - onehot
    base = tl.load(block_base_ptr + pid * E + e_idx, mask=e_idx < E, other=0)
    dest = tl.sum(onehot.to(tl.int64) * (base[None, :] + earlier_same_key), axis=1)
    tl.store(sorted_ptr + dest, s_idx.to(tl.int64), mask=s_mask)


def stable_sort_by_key(keys: torch.Tensor, num_keys: int):
    """Stable counting sort on the device, parallel over blocks of keys (no host sync).
    keys [N] int64 in [0, num_keys) -> (order [N] int64, offsets [num_keys+1] int64)."""
    n = keys.numel()
    dev = keys.device
    num_blocks = triton.cdiv(n, _PERMUTE_BLOCK)
    block_e = triton.next_power_of_2(num_keys)
    block_counts = torch.empty(num_blocks, num_keys, dtype=torch.int32, device=dev)
    offsets = torch.zeros(num_keys + 1, dtype=torch.int64, device=dev)
    order = torch.empty(n, dtype=torch.int64, device=dev)
    if n == 0:
        return order, offsets
    _block_histogram_kernel[(num_blocks,)](keys, block_counts, n, num_keys,
                                           BLOCK=_PERMUTE_BLOCK, BLOCK_E=block_e)
    # Exclusive scans: over keys (where each key starts) and over blocks (where each
    # block's items of a key start). Tiny [num_blocks, E] tensors.
    block_counts = block_counts.to(torch.int64)
    torch.cumsum(block_counts.sum(dim=0), dim=0, out=offsets[1:])
    block_base = offsets[:-1] + block_counts.cumsum(dim=0) - block_counts
    _block_place_kernel[(num_blocks,)](keys, block_base, order, n, num_keys,
                                       BLOCK=_PERMUTE_BLOCK, BLOCK_E=block_e)
    return order, offsets


# ---------------------------------------------------------------------------------------
# Routing backward
# ---------------------------------------------------------------------------------------
@triton.jit
def _route_backward_kernel(
    grad_logits_ptr, grad_probs_ptr, grad_weights_ptr,
    probs_ptr, weights_ptr, experts_ptr, task_ptr, gate_w_ptr,
    grad_logits_total_ptr, grad_x_ptr,
    T, E, D,
    HAS_GRAD_LOGITS: tl.constexpr, HAS_GRAD_PROBS: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per block of tokens: the softmax / top-k / renormalise chain back to the logits
    (stored, fp32, for the per-task gate weight GEMM) and grad_x = W[task]^T g."""
    pid = tl.program_id(0)
    t_idx = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    e_idx = tl.arange(0, BLOCK_E)
    k_idx = tl.arange(0, BLOCK_K)
    t_mask = t_idx < T
    te_mask = t_mask[:, None] & (e_idx[None, :] < E)
    tk_mask = t_mask[:, None] & (k_idx[None, :] < TOP_K)
    te_off = t_idx[:, None].to(tl.int64) * E + e_idx[None, :]
    tk_off = t_idx[:, None].to(tl.int64) * TOP_K + k_idx[None, :]

    probs = tl.load(probs_ptr + te_off, mask=te_mask, other=0.0)
    if HAS_GRAD_PROBS:
        grad_p = tl.load(grad_probs_ptr + te_off, mask=te_mask, other=0.0)
    else:
        grad_p = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_GRAD_WEIGHTS:
        top_e = tl.load(experts_ptr + tk_off, mask=tk_mask, other=0)
        top_w = tl.load(weights_ptr + tk_off, mask=tk_mask, other=0.0)
        top_gw = tl.load(grad_weights_ptr + tk_off, mask=tk_mask, other=0.0)
        # weights_j = p_j / S with S = sum of the selected probabilities:
        # d p_sel_j = (gw_j - sum_i gw_i w_i) / S.
        gw_dot_w = tl.sum(top_gw * top_w, axis=1)
        selected = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for j in tl.static_range(TOP_K):
            e_j = tl.sum(tl.where(k_idx[None, :] == j, top_e, 0), axis=1)
            selected = selected | (e_idx[None, :] == e_j[:, None])
        sel_sum = tl.sum(tl.where(selected & te_mask, probs, 0.0), axis=1)
        sel_sum = tl.where(t_mask, sel_sum, 1.0)
        for j in tl.static_range(TOP_K):
            e_j = tl.sum(tl.where(k_idx[None, :] == j, top_e, 0), axis=1)
            gw_j = tl.sum(tl.where(k_idx[None, :] == j, top_gw, 0.0), axis=1)
            d_sel = (gw_j - gw_dot_w) / sel_sum
            grad_p += tl.where(e_idx[None, :] == e_j[:, None], d_sel[:, None], 0.0)
    grad_l = probs * (grad_p - tl.sum(grad_p * probs, axis=1)[:, None])
    if HAS_GRAD_LOGITS:
        grad_l += tl.load(grad_logits_ptr + te_off, mask=te_mask, other=0.0)
    grad_l = tl.where(te_mask, grad_l, 0.0)
    tl.store(grad_logits_total_ptr + te_off, grad_l, mask=te_mask)

    task = tl.load(task_ptr + t_idx, mask=t_mask, other=0)
    gate_row = (task[:, None] * E + e_idx[None, :]) * D
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        d_mask = d_idx < D
        wv = tl.load(gate_w_ptr + gate_row[:, :, None] + d_idx[None, None, :],
                     mask=te_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
        gx = tl.sum(wv * grad_l[:, :, None], axis=1)
        tl.store(grad_x_ptr + t_idx[:, None].to(tl.int64) * D + d_idx[None, :], gx,
                 mask=t_mask[:, None] & d_mask[None, :])


def route_logits_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight,
                          probs, weights, experts):
    """(grad_logits_total [T, E] fp32: every upstream gradient taken back to the logits,
    grad_x [T, D] in x's dtype). Absent upstream gradients (None) count as zero."""
    T, D = x.shape
    E = gate_weight.shape[1]
    top_k = experts.shape[1]
    dev = x.device
    grad_logits_total = torch.empty(T, E, dtype=torch.float32, device=dev)
    grad_x = torch.empty(T, D, dtype=x.dtype, device=dev)
    if T > 0:
        _route_backward_kernel[(triton.cdiv(T, _ROUTE_BLOCK_T),)](
            grad_logits if grad_logits is not None else probs,
            grad_probs if grad_probs is not None else probs,
            grad_weights if grad_weights is not None else weights,
            probs, weights, experts, task_ids, gate_weight, grad_logits_total, grad_x,
            T, E, D,
            HAS_GRAD_LOGITS=grad_logits is not None, HAS_GRAD_PROBS=grad_probs is not None,
            HAS_GRAD_WEIGHTS=grad_weights is not None, TOP_K=top_k,
            BLOCK_T=_ROUTE_BLOCK_T, BLOCK_E=triton.next_power_of_2(E),
            BLOCK_K=triton.next_power_of_2(top_k), BLOCK_D=_ROUTE_BLOCK_D,
        )
    return grad_logits_total, grad_x
