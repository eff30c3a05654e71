"""Backend "triton": fused task-conditioned routing and scatter2scatter grouped expert GEMMs.

The four functions of DESIGN.md's kernel backend protocol (`route_forward`, `route_backward`,
`experts_forward`, `experts_backward`). m2dino_kernels.moe validates and makes inputs
contiguous before calling them, so nothing here re-checks shapes.

Layout of the work:
- Routing: one kernel per block of tokens gathers each token's task gate rows, computes fp32
  logits, softmax, top-k (descending, ties to the lower expert) and renormalises. A second,
  single-program kernel builds the expert-sorted permutation on the device (histogram,
  exclusive scan, stable placement), so there is never a device-to-host sync.
- Expert MLP: grouped GEMMs over the expert-sorted rows. A program owns one (row tile,
  column tile); the row tile's expert is found from `offsets` inside the kernel (each
  expert's rows are cut into tiles; experts are never mixed inside a tile). GEMM1 gathers
  the x rows through `sorted_slots // k` in its prologue and applies the activation in its
  epilogue; GEMM2 adds the bias, writes `expert_out`, and writes router-weighted rows in
  slot order, summed over k into y in fp32 (no atomics).
- Backward: dHidden = (w * grad_y[token]) @ W2 with the activation derivative in the
  epilogue; dX = dHidden @ W1 scattered to slot order then summed over k; weight and bias
  gradients per expert by one kernel that walks the expert's rows; the gate GEMM backward
  reuses that kernel over tokens sorted by task.

Runs on CUDA (fp32/fp16/bf16, fp32 accumulation) and, under TRITON_INTERPRET=1, on CPU
tensors (fp32/fp16: the interpreter's bf16 dot is wrong). The interpreter gets a single
small config; CUDA gets autotuned configs (`_GPU_GEMM_CONFIGS`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

_ACTIVATIONS = {"gelu": 1, "swiglu": 2}

# ---------------------------------------------------------------------------------------
# Tile configurations. The interpreter runs one program at a time with numpy and cannot
# autotune over several configs, so it gets one small config; GPUs get a tuned set.
# ---------------------------------------------------------------------------------------
_INTERPRETER_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1),
]
_GPU_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# The per-expert weight-gradient kernel reduces over rows (its K loop is the expert's rows).
_INTERPRETER_WGRAD_CONFIGS = _INTERPRETER_GEMM_CONFIGS
_GPU_WGRAD_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
_GEMM_CONFIGS = _INTERPRETER_GEMM_CONFIGS if INTERPRETER else _GPU_GEMM_CONFIGS
_WGRAD_CONFIGS = _INTERPRETER_WGRAD_CONFIGS if INTERPRETER else _GPU_WGRAD_CONFIGS

# Routing kernels are elementwise over [tokens, experts, D-chunk]: fixed small tiles.
_ROUTE_BLOCK_T = 16
_ROUTE_BLOCK_D = 32 if INTERPRETER else 64
_PERMUTE_BLOCK = 64 if INTERPRETER else 1024

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# ---------------------------------------------------------------------------------------
# Activation math (plain exp/erf: no libdevice, so the interpreter runs it too).
# ---------------------------------------------------------------------------------------
@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))


@triton.jit
def _gelu_grad(h):
    cdf = 0.5 * (1.0 + tl.erf(h * _SQRT1_2))
    pdf = tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return cdf + h * pdf


@triton.jit
def _sigmoid(a):
    return 1.0 / (1.0 + tl.exp(-a))


# ---------------------------------------------------------------------------------------
# Tile lookup: which expert and which rows a program's row tile covers.
# ---------------------------------------------------------------------------------------
@triton.jit
def _expert_row_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Each expert's rows [offsets[e], offsets[e+1]) are cut into ceil(count / BLOCK_M)
    tiles, numbered expert after expert. Returns (expert, row_start, row_end); expert == E
    when pid_m is past the last tile (the grid is an upper bound: cdiv(T*k, BM) + E)."""
    e_idx = tl.arange(0, BLOCK_E)
    e_mask = e_idx < E
    starts = tl.load(offsets_ptr + e_idx, mask=e_mask, other=0)
    ends = tl.load(offsets_ptr + e_idx + 1, mask=e_mask, other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    expert = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    mine = e_idx == expert
    first_tile = tl.sum(tl.where(mine, tiles_end - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    return expert, row_start, row_end


def _num_row_tiles(num_rows, num_experts, block_m):
    return triton.cdiv(num_rows, block_m) + num_experts


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products like torch's default matmul (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


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


@triton.jit
def _permute_kernel(keys_ptr, sorted_ptr, offsets_ptr, N, E,
                    BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Stable counting sort of N keys in [0, E) in one program: pass 1 histograms,
    an exclusive scan gives offsets, pass 2 places each item at offset + running rank."""
    e_idx = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int64)
    for s0 in range(0, N, BLOCK):
        s_idx = s0 + tl.arange(0, BLOCK)
        key = tl.load(keys_ptr + s_idx, mask=s_idx < N, other=BLOCK_E)
        onehot = (key[:, None] == e_idx[None, :]).to(tl.int64)
        counts += tl.sum(onehot, axis=0)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tl.store(offsets_ptr + e_idx, starts, mask=e_idx < E)
    tl.store(offsets_ptr + E, tl.sum(counts, 0))

    placed = tl.zeros([BLOCK_E], dtype=tl.int64)
    for s0 in range(0, N, BLOCK):
        s_idx = s0 + tl.arange(0, BLOCK)
        s_mask = s_idx < N
        key = tl.load(keys_ptr + s_idx, mask=s_mask, other=BLOCK_E)
        onehot = (key[:, None] == e_idx[None, :]).to(tl.int64)
        rank_in_block = tl.cumsum(onehot, 0) - onehot  # earlier items of the same key
        dest = tl.sum(onehot * (starts + placed)[None, :] + onehot * rank_in_block, axis=1)
        tl.store(sorted_ptr + dest, s_idx.to(tl.int64), mask=s_mask)
        placed += tl.sum(onehot, axis=0)


def _stable_sort_by_key(keys: torch.Tensor, num_keys: int):
    """keys [N] int64 in [0, num_keys) -> (order [N] int64, offsets [num_keys+1] int64)."""
    n = keys.numel()
    order = torch.empty(n, dtype=torch.int64, device=keys.device)
    offsets = torch.empty(num_keys + 1, dtype=torch.int64, device=keys.device)
    _permute_kernel[(1,)](keys, order, offsets, n, num_keys,
                          BLOCK=_PERMUTE_BLOCK, BLOCK_E=triton.next_power_of_2(num_keys))
    return order, offsets


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
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
    sorted_slots, offsets = _stable_sort_by_key(experts.view(-1), E)
    counts = offsets.diff()
    return logits, probs, weights, experts, counts, sorted_slots, offsets
