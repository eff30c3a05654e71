"""Backend "triton": fused task-conditioned routing and scatter2scatter grouped expert GEMMs.

The four functions of DESIGN.md's kernel backend protocol (`route_forward`, `route_backward`,
`experts_forward`, `experts_backward`). m2dino_kernels.moe validates and makes inputs
contiguous before calling them, so nothing here re-checks shapes.

Layout of the work:
- Routing: one kernel per block of tokens gathers each token's task gate rows, computes fp32
  logits, softmax, top-k (descending, ties to the lower expert) and renormalises. The
  expert-sorted permutation is a block-parallel stable counting sort on the device (block
  histograms, two tiny exclusive scans, stable placement): no device-to-host sync.
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

Runs on CUDA (fp32/fp16/bf16, fp32 accumulation; fp32 matmuls follow
torch.get_float32_matmul_precision(): exact unless the user allows TF32) and, under
TRITON_INTERPRET=1, on CPU tensors (bf16 dots are upcast there: the interpreter's bf16 dot
is wrong). The interpreter gets a single small tile config; CUDA gets autotuned configs
(`_GPU_GEMM_CONFIGS`, `_GPU_WGRAD_CONFIGS`).
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
_PERMUTE_BLOCK = 64 if INTERPRETER else 256  # keys per program of the counting sort

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


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


def _dot_mode(dtype: torch.dtype, device: torch.device):
    """(input_precision, upcast_to_fp32) for tl.dot. fp32 inputs: exact fp32 products like
    torch's default matmul, TF32 only where the user allowed it for torch matmuls. bf16
    under the interpreter: upcast, because its bf16 dot is wrong there; the products of two
    bf16 values are exact in fp32, so the result is what a GPU's bf16 dot gives."""
    if dtype == torch.float32:
        allow_tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
        return ("tf32" if allow_tf32 else "ieee"), False
    if dtype == torch.bfloat16 and device.type == "cpu":
        return "ieee", True
    return "tf32", False


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation; b is brought to a's dtype (or both to fp32)."""
    if DOT_FP32:
        a = a.to(tl.float32)
    return tl.dot(a, b.to(a.dtype), acc, input_precision=PREC)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtypes(function: str, **tensors) -> None:
    """fp16/bf16/fp32 only (fp32 accumulation throughout)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"triton backend {function}: {name} has dtype {tensor.dtype}; "
                            "supported: float16, bfloat16, float32 (use the 'torch' or "
                            "'cpp' backend for float64)")


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


def _stable_sort_by_key(keys: torch.Tensor, num_keys: int):
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


def route_forward(x, task_ids, gate_weight, gate_bias, top_k):
    _check_dtypes("route_forward", x=x, gate_weight=gate_weight, gate_bias=gate_bias)
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


# ---------------------------------------------------------------------------------------
# Grouped GEMMs over expert-sorted rows
# ---------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "H", "ACT"])
@triton.jit
def _fc1_kernel(
    x_ptr, slots_ptr, offsets_ptr, w1_ptr, b1_ptr, h_pre_ptr, act_ptr,
    E, D, H,
    TOP_K: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h_pre[r] = W1[e] x[slot_r // k] + b1[e]; act[r] = gelu(h_pre) or silu(a) * b.
    ACT: 1 gelu (H1 = H), 2 swiglu (H1 = 2H, this program computes both halves)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    H1 = H * ACT
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    token = tl.load(slots_ptr + rows, mask=row_mask, other=0) // TOP_K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    w1 = w1_ptr + expert.to(tl.int64) * H1 * D
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < D
        # Gather in the prologue: rows of x through the sorted slots, no gathered copy.
        xa = tl.load(x_ptr + token[:, None] * D + kk[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wk_mask = k_mask[:, None] & col_mask[None, :]
        wa = tl.load(w1 + cols[None, :] * D + kk[:, None], mask=wk_mask, other=0.0)
        acc_a = _dot(xa, wa, acc_a, PREC, DOT_FP32)
        if ACT == 2:
            wb = tl.load(w1 + (cols[None, :] + H) * D + kk[:, None], mask=wk_mask, other=0.0)
            acc_b = _dot(xa, wb, acc_b, PREC, DOT_FP32)

    out_mask = row_mask[:, None] & col_mask[None, :]
    b1 = b1_ptr + expert.to(tl.int64) * H1
    acc_a += tl.load(b1 + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    h_row = rows[:, None].to(tl.int64) * H1
    tl.store(h_pre_ptr + h_row + cols[None, :], acc_a, mask=out_mask)
    # The activation reads h_pre as stored (rounded to its dtype), like the backward does.
    a = acc_a.to(h_pre_ptr.dtype.element_ty).to(tl.float32)
    if ACT == 1:
        act = _gelu(a)
    else:
        acc_b += tl.load(b1 + H + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(h_pre_ptr + h_row + H + cols[None, :], acc_b, mask=out_mask)
        b = acc_b.to(h_pre_ptr.dtype.element_ty).to(tl.float32)
        act = a * _sigmoid(a) * b
    tl.store(act_ptr + rows[:, None].to(tl.int64) * H + cols[None, :], act, mask=out_mask)


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "KDIM", "HAS_BIAS", "SCALE_BY_ROUTE"])
@triton.jit
def _grouped_scatter_kernel(
    a_ptr, slots_ptr, offsets_ptr, w_ptr, bias_ptr, route_w_ptr,
    out_grouped_ptr, out_slots_ptr,
    E, N, KDIM, stride_we, stride_wk, stride_wn,
    HAS_BIAS: tl.constexpr, STORE_GROUPED: tl.constexpr, SCALE_BY_ROUTE: tl.constexpr,
    PREC: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[r] = A[r] @ B[e] (+ bias[e]) over grouped rows; optionally store C grouped, and
    store C[r] (times the router weight of slot_r) at row slot_r of an fp32 slot-order
    buffer, which a sum over k turns into token order. B[e][kk, n] is read through strides
    so one kernel serves GEMM2 (B = W2[e]^T) and the dX GEMM (B = W1[e])."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < KDIM
        av = tl.load(a_ptr + rows[:, None].to(tl.int64) * KDIM + kk[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        bv = tl.load(w + kk[:, None] * stride_wk + cols[None, :] * stride_wn,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(av, bv, acc, PREC, DOT_FP32)
    out_mask = row_mask[:, None] & col_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert.to(tl.int64) * N + cols, mask=col_mask,
                       other=0.0).to(tl.float32)[None, :]
    if STORE_GROUPED:
        tl.store(out_grouped_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc,
                 mask=out_mask)
        # y sums the stored (rounded) expert outputs, as the protocol defines it.
        acc = acc.to(out_grouped_ptr.dtype.element_ty).to(tl.float32)
    slot = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    if SCALE_BY_ROUTE:
        acc *= tl.load(route_w_ptr + slot, mask=row_mask, other=0.0)[:, None]
    tl.store(out_slots_ptr + slot[:, None] * N + cols[None, :], acc, mask=out_mask)


@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "H", "ACT"])
@triton.jit
def _dhidden_kernel(
    grad_y_ptr, slots_ptr, offsets_ptr, route_w_ptr, w2_ptr, h_pre_ptr, dh_ptr,
    E, D, H,
    TOP_K: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dAct[r] = (w[slot_r] * grad_y[slot_r // k]) @ W2[e], times the activation
    derivative at h_pre[r]: dH1 = [dAct * gelu'(h)] or [dA, dB] for swiglu."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = _expert_row_tile(pid_m, offsets_ptr, E, BLOCK_M, BLOCK_E)
    if expert >= E:
        return
    H1 = H * ACT
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slot = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    token = slot // TOP_K
    route_w = tl.load(route_w_ptr + slot, mask=row_mask, other=0.0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    w2 = w2_ptr + expert.to(tl.int64) * D * H
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < D
        gy = tl.load(grad_y_ptr + token[:, None] * D + kk[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        gy = (gy.to(tl.float32) * route_w[:, None]).to(grad_y_ptr.dtype.element_ty)
        wv = tl.load(w2 + kk[:, None] * H + cols[None, :],
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(gy, wv, acc, PREC, DOT_FP32)
    out_mask = row_mask[:, None] & col_mask[None, :]
    h_row = rows[:, None].to(tl.int64) * H1
    a = tl.load(h_pre_ptr + h_row + cols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    if ACT == 1:
        tl.store(dh_ptr + h_row + cols[None, :], acc * _gelu_grad(a), mask=out_mask)
    else:
        b = tl.load(h_pre_ptr + h_row + H + cols[None, :], mask=out_mask,
                    other=0.0).to(tl.float32)
        sig = _sigmoid(a)
        silu = a * sig
        tl.store(dh_ptr + h_row + cols[None, :], acc * b * sig * (1.0 + a * (1.0 - sig)),
                 mask=out_mask)
        tl.store(dh_ptr + h_row + H + cols[None, :], acc * silu, mask=out_mask)


@triton.jit
def _route_weight_grad_kernel(
    grad_y_ptr, expert_out_ptr, slots_ptr, grad_w_ptr, R, D,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grad_weights[slot_r] = <grad_y[slot_r // k], expert_out[r]> in fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < R
    slot = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    token = slot // TOP_K
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + tl.arange(0, BLOCK_D)
        m = row_mask[:, None] & (d_idx[None, :] < D)
        gy = tl.load(grad_y_ptr + token[:, None] * D + d_idx[None, :], mask=m, other=0.0)
        eo = tl.load(expert_out_ptr + rows[:, None].to(tl.int64) * D + d_idx[None, :], mask=m,
                     other=0.0)
        acc += tl.sum(gy.to(tl.float32) * eo.to(tl.float32), axis=1)
    tl.store(grad_w_ptr + slot, acc, mask=row_mask)


@triton.autotune(configs=_WGRAD_CONFIGS,
                 key=["M", "N", "GATHER_G", "GATHER_A", "ACT_A", "DOT_FP32"])
@triton.jit
def _weight_grad_kernel(
    g_ptr, a_ptr, index_ptr, g_scale_ptr, offsets_ptr, dw_ptr, db_ptr,
    M, N, A_STRIDE, A_HALF,
    INDEX_DIV: tl.constexpr, GATHER_G: tl.constexpr, SCALE_G: tl.constexpr,
    GATHER_A: tl.constexpr, ACT_A: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per group e (an expert, or a task for the gate): dW[e] = sum_r G[r]^T A[r] and
    db[e] = sum_r G[r] over the group's rows r in [offsets[e], offsets[e+1]).
    G[r] is g[index[r] // INDEX_DIV] (times g_scale[index[r]]) when GATHER_G, else g[r];
    A[r] likewise; ACT_A applies the activation to A = h_pre (1 gelu, 2 swiglu, A_HALF = H)
    so act(h_pre) is never stored. G has M columns, A has N (A_STRIDE per row)."""
    pid_e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(offsets_ptr + pid_e)
    row_end = tl.load(offsets_ptr + pid_e + 1)
    m_idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m_idx < M
    n_mask = n_idx < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < row_end
        index = tl.load(index_ptr + rows, mask=r_mask, other=0)
        g_row = (index // INDEX_DIV) if GATHER_G else rows.to(tl.int64)
        a_row = (index // INDEX_DIV) if GATHER_A else rows.to(tl.int64)
        gv = tl.load(g_ptr + g_row[:, None] * M + m_idx[None, :],
                     mask=r_mask[:, None] & m_mask[None, :], other=0.0)
        if SCALE_G:
            scale = tl.load(g_scale_ptr + index, mask=r_mask, other=0.0)
            gv = (gv.to(tl.float32) * scale[:, None]).to(g_ptr.dtype.element_ty)
        a_mask = r_mask[:, None] & n_mask[None, :]
        av = tl.load(a_ptr + a_row[:, None] * A_STRIDE + n_idx[None, :], mask=a_mask,
                     other=0.0)
        if ACT_A == 1:
            av = _gelu(av.to(tl.float32)).to(a_ptr.dtype.element_ty)
        elif ACT_A == 2:
            bv = tl.load(a_ptr + a_row[:, None] * A_STRIDE + A_HALF + n_idx[None, :],
                         mask=a_mask, other=0.0).to(tl.float32)
            af = av.to(tl.float32)
            av = (af * _sigmoid(af) * bv).to(a_ptr.dtype.element_ty)
        acc = _dot(tl.trans(gv), av, acc, PREC, DOT_FP32)
        if HAS_BIAS:
            bias_acc += tl.sum(gv.to(tl.float32), axis=0)
    e64 = pid_e.to(tl.int64)
    tl.store(dw_ptr + e64 * M * N + m_idx[:, None] * N + n_idx[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + e64 * M + m_idx, bias_acc, mask=m_mask & (pid_n == 0))


# ---------------------------------------------------------------------------------------
# Host wrappers (no device-to-host syncs: every size used here is known from shapes)
# ---------------------------------------------------------------------------------------
def _weight_grad(g, a, index, g_scale, offsets, num_groups, M, N, *, a_stride, a_half=0,
                 index_div=1, gather_g, gather_a, act_a=0, with_bias=True, dot_fp32=False,
                 dw_dtype, db_dtype):
    dev = g.device
    dw = torch.empty(num_groups, M, N, dtype=dw_dtype, device=dev)
    db = torch.empty(num_groups, M, dtype=db_dtype, device=dev) if with_bias else None
    prec, upcast = _dot_mode(a.dtype, a.device)
    if dot_fp32 or upcast:
        prec, dot_fp32 = "ieee", True
    grid = lambda meta: (num_groups, triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(N, meta["BLOCK_N"]))
    _weight_grad_kernel[grid](
        g, a, index, g_scale if g_scale is not None else g, offsets, dw,
        db if with_bias else dw, M, N, a_stride, a_half,
        INDEX_DIV=index_div, GATHER_G=gather_g, SCALE_G=g_scale is not None,
        GATHER_A=gather_a, ACT_A=act_a, HAS_BIAS=with_bias, DOT_FP32=dot_fp32, PREC=prec,
    )
    return dw, db


def route_backward(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
                   probs, weights, experts):
    _check_dtypes("route_backward", x=x, gate_weight=gate_weight)
    T, D = x.shape
    NT, E, _ = gate_weight.shape
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
    # Gate weight GEMM backward grouped by task: tokens stably sorted by task id.
    token_order, task_offsets = _stable_sort_by_key(task_ids, NT)
    grad_gate_weight, grad_gate_bias = _weight_grad(
        grad_logits_total, x, token_order, None, task_offsets, NT, E, D, a_stride=D,
        gather_g=True, gather_a=True, with_bias=has_bias, dot_fp32=True,
        dw_dtype=gate_weight.dtype, db_dtype=gate_weight.dtype,
    )
    return grad_x, grad_gate_weight, grad_gate_bias


def _act_code(activation: str) -> int:
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                         f"got {activation!r}") from None


def _row_tile_grid(num_rows, num_experts, n_cols):
    return lambda meta: (_num_row_tiles(num_rows, num_experts, meta["BLOCK_M"]),
                         triton.cdiv(n_cols, meta["BLOCK_N"]))


def experts_forward(x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w, fc2_b,
                    activation):
    act_code = _act_code(activation)
    _check_dtypes("experts_forward", x=x, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)
    T, D = x.shape
    top_k = experts.shape[1]
    E, H1, _ = fc1_w.shape
    H = fc2_w.shape[2]
    R = T * top_k
    dev = x.device
    h_pre = torch.empty(R, H1, dtype=x.dtype, device=dev)
    hidden = torch.empty(R, H, dtype=x.dtype, device=dev)
    expert_out = torch.empty(R, D, dtype=x.dtype, device=dev)
    y_slots = torch.empty(R, D, dtype=torch.float32, device=dev)
    if R > 0:
        block_e = triton.next_power_of_2(E)
        prec, dot_fp32 = _dot_mode(x.dtype, x.device)
        _fc1_kernel[_row_tile_grid(R, E, H)](
            x, sorted_slots, offsets, fc1_w, fc1_b, h_pre, hidden, E, D, H,
            TOP_K=top_k, ACT=act_code, PREC=prec, DOT_FP32=dot_fp32, BLOCK_E=block_e,
        )
        _grouped_scatter_kernel[_row_tile_grid(R, E, D)](
            hidden, sorted_slots, offsets, fc2_w, fc2_b, weights, expert_out, y_slots,
            E, D, H, D * H, 1, H,
            HAS_BIAS=True, STORE_GROUPED=True, SCALE_BY_ROUTE=True, PREC=prec,
            DOT_FP32=dot_fp32,            BLOCK_E=block_e,
        )
    # Each token's k weighted contributions, summed in fp32 (slot t*k+j is row t, column j).
    y = y_slots.view(T, top_k, D).sum(dim=1).to(x.dtype)
    return y, h_pre, expert_out


def experts_backward(grad_y, x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b, fc2_w,
                     fc2_b, activation, h_pre, expert_out):
    act_code = _act_code(activation)
    _check_dtypes("experts_backward", grad_y=grad_y, x=x, fc1_w=fc1_w, fc2_w=fc2_w)
    T, D = x.shape
    top_k = experts.shape[1]
    E, H1, _ = fc1_w.shape
    H = fc2_w.shape[2]
    R = T * top_k
    dev = x.device
    grad_y = grad_y.contiguous()
    grad_weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    d_hidden = torch.empty(R, H1, dtype=x.dtype, device=dev)
    dx_slots = torch.empty(R, D, dtype=torch.float32, device=dev)
    block_e = triton.next_power_of_2(E)
    prec, dot_fp32 = _dot_mode(x.dtype, x.device)
    if R > 0:
        _route_weight_grad_kernel[(triton.cdiv(R, 16),)](
            grad_y, expert_out, sorted_slots, grad_weights, R, D,
            TOP_K=top_k, BLOCK_M=16, BLOCK_D=_ROUTE_BLOCK_D,
        )
        _dhidden_kernel[_row_tile_grid(R, E, H)](
            grad_y, sorted_slots, offsets, weights, fc2_w, h_pre, d_hidden, E, D, H,
            TOP_K=top_k, ACT=act_code, PREC=prec, DOT_FP32=dot_fp32, BLOCK_E=block_e,
        )
        _grouped_scatter_kernel[_row_tile_grid(R, E, D)](
            d_hidden, sorted_slots, offsets, fc1_w, fc1_b, weights, d_hidden, dx_slots,
            E, D, H1, H1 * D, D, 1,
            HAS_BIAS=False, STORE_GROUPED=False, SCALE_BY_ROUTE=False, PREC=prec,
            DOT_FP32=dot_fp32,            BLOCK_E=block_e,
        )
    grad_x = dx_slots.view(T, top_k, D).sum(dim=1).to(x.dtype)
    # dW2[e] = sum_r (w * grad_y[token])^T act(h_pre[r]); dW1[e] = sum_r dH1[r]^T x[token].
    grad_fc2_w, grad_fc2_b = _weight_grad(
        grad_y, h_pre, sorted_slots, weights, offsets, E, D, H, a_stride=H1, a_half=H,
        index_div=top_k, gather_g=True, gather_a=False, act_a=act_code,
        dw_dtype=fc2_w.dtype, db_dtype=fc2_b.dtype,
    )
    grad_fc1_w, grad_fc1_b = _weight_grad(
        d_hidden, x, sorted_slots, None, offsets, E, H1, D, a_stride=D, index_div=top_k,
        gather_g=False, gather_a=True, dw_dtype=fc1_w.dtype, db_dtype=fc1_b.dtype,
    )
    return grad_x, grad_weights, grad_fc1_w, grad_fc1_b, grad_fc2_w, grad_fc2_b
