"""Grouped expert GEMMs over expert-sorted rows (scatter2scatter), as Triton kernels.

Rows are the T*k (token, choice) slots sorted by expert; expert e owns the rows
[offsets[e], offsets[e+1]). A program of the row-tiled kernels owns one (row tile, column
tile); the row tile's expert is found from `offsets` inside the kernel (each expert's rows are
cut into tiles; experts are never mixed inside a tile).
- fc1: gathers the x rows through `sorted_slots // k` in its prologue, adds the bias and
  applies the activation (gelu, or swiglu on the two halves) in its epilogue.
- grouped scatter: C[r] = A[r] @ B[e] (+ bias), stored in slot order (fp32, optionally
  times the router weight) so that a sum over k gives token order: fc2 forward, and the
  dX GEMM of the backward.
- dhidden: (w * grad_y[token]) @ W2 with the activation derivative in the epilogue.
- route weight grad: <grad_y[token], expert_out[r]> per row.
- weight grad: dW[e] = sum_r G[r]^T A[r] (+ db) per group of rows, for fc1/fc2 and, over
  tokens sorted by task, for the gate.

fp32 accumulation throughout; fp32 dots follow torch.get_float32_matmul_precision() (exact
unless the user allows TF32). Under TRITON_INTERPRET=1 (CPU tensors) bf16 dots are upcast,
because the interpreter's bf16 dot is wrong, and a single small tile config is used; CUDA
gets autotuned configs chosen by input dtype and activation (below).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from m2dino_kernels.triton.target import INTERPRETER, config_pruner

# Activation codes of the kernels' ACT constexpr; also the fc1 width factor (H1 = ACT * H).
_ACTIVATIONS = {"gelu": 1, "swiglu": 2}

# ---------------------------------------------------------------------------------------
# Tile configurations. The interpreter runs one program at a time with numpy and cannot
# autotune over several configs, so it gets one small config. GPUs get, per kernel and input
# dtype, the configs that compile for sm_80, sm_86 and sm_90 without spilling registers and within
# shared memory (`python -m m2dino_kernels.inspect`, checked by test_triton_compile); each
# kernel's autotune list is the union and its early_config_prune picks the launch's share.
# ---------------------------------------------------------------------------------------
def _config(block_m, block_n, block_k, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_warps=num_warps, num_stages=num_stages)


_INTERPRETER_GEMM_CONFIGS = [_config(16, 16, 16, 1, 1)]
# 16-bit inputs: tensor-core tiles for every row-tiled GEMM ...
_MMA_CONFIGS = [_config(64, 64, 32, 4, 3), _config(64, 64, 64, 4, 3), _config(64, 128, 32, 8, 3),
                _config(128, 64, 32, 8, 3)]
# ... and 128x128 tiles for those with one fp32 tile per output: SwiGLU's fc1 (two
# accumulators) and dhidden (both h_pre halves in its epilogue) spill them at sm_80.
_MMA_LARGE_CONFIGS = [_config(128, 128, 32, 8, 3), _config(128, 128, 64, 8, 3)]
# fp32 inputs (exact fp32 FMA dots, or TF32): four-byte operand tiles live in registers.
_FP32_CONFIGS = [_config(32, 32, 32, 4, 2), _config(64, 32, 16, 4, 2)]
# The per-expert weight gradient reduces over rows (its K loop is the expert's rows).
_MMA_WGRAD_CONFIGS = [_config(64, 64, 32, 4, 3), _config(64, 128, 64, 8, 3), _config(128, 128, 32, 8, 3)]
# Few-row weight gradients (the gate's: M = E rows, fp32 FMA dots) get a 16-row tile: a 64- or
# 128-row tile would be mostly masked and its fp32 accumulators spill registers.
_FEW_ROW_WGRAD_CONFIGS = [_config(16, 64, 32, 4, 2)]
_FEW_ROWS = 16

_GEMM_CONFIGS = (_INTERPRETER_GEMM_CONFIGS if INTERPRETER
                 else _MMA_CONFIGS + _MMA_LARGE_CONFIGS + _FP32_CONFIGS)
_WGRAD_CONFIGS = (_INTERPRETER_GEMM_CONFIGS if INTERPRETER
                  else _MMA_WGRAD_CONFIGS + _FP32_CONFIGS + _FEW_ROW_WGRAD_CONFIGS)


def _pipelined_bytes(config, a_cols_factor=1, b_cols_factor=1, elem_bytes=2):
    """Shared memory of a BM x BK by BK x BN tile pair (bytes), times num_stages: Triton keeps
    that many buffers of each tile."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (bm * bk * a_cols_factor + bk * bn * b_cols_factor) * elem_bytes


def _elem_bytes(ptr):
    return ptr.element_size() if hasattr(ptr, "element_size") else 2


def _act(named_args, kwargs):
    """The launch's ACT (dhidden's; the grouped scatter has none: 1)."""
    return kwargs.get("ACT", named_args.get("ACT", 1))


def _row_tiled_candidates(elem_bytes, act):
    if elem_bytes > 2:
        return _FP32_CONFIGS
    return _MMA_CONFIGS + (_MMA_LARGE_CONFIGS if act != _ACTIVATIONS["swiglu"] else [])


def _gemm_elem_bytes(named_args):
    return _elem_bytes(named_args.get("a_ptr", named_args.get("grad_y_ptr")))


# fc1: SwiGLU loads two weight tiles per stage.
_prune_fc1 = config_pruner(
    lambda named_args, kwargs: _row_tiled_candidates(_elem_bytes(named_args["x_ptr"]),
                                                     _act(named_args, kwargs)),
    lambda c, named_args, kwargs: _pipelined_bytes(c, 1, _act(named_args, kwargs),
                                                   _elem_bytes(named_args["x_ptr"])))
_prune_gemm = config_pruner(
    lambda named_args, kwargs: _row_tiled_candidates(_gemm_elem_bytes(named_args),
                                                     _act(named_args, kwargs)),
    lambda c, named_args, kwargs: _pipelined_bytes(c, 1, 1, _gemm_elem_bytes(named_args)))


def _wgrad_candidates(named_args, kwargs):
    """Few-row outputs (M <= 16) take the 16-row tile, fp32 inputs the small tiles."""
    if named_args["M"] <= _FEW_ROWS:
        return _FEW_ROW_WGRAD_CONFIGS
    return _FP32_CONFIGS if _elem_bytes(named_args["a_ptr"]) > 2 else _MMA_WGRAD_CONFIGS


def _wgrad_shared_bytes(config, named_args, kwargs):
    dot_fp32 = kwargs.get("DOT_FP32", named_args.get("DOT_FP32"))
    return _pipelined_bytes(config, 1, 1, 4 if dot_fp32 else _elem_bytes(named_args["a_ptr"]))


_prune_wgrad = config_pruner(_wgrad_candidates, _wgrad_shared_bytes)

# The route-weight gradient is a row-wise dot over D: fixed small tiles.
_ROW_DOT_BLOCK_M = 16
_ROW_DOT_BLOCK_D = 32 if INTERPRETER else 64

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
# Tile lookup: which expert, rows and columns a program of a row-tiled kernel covers.
# ---------------------------------------------------------------------------------------
@triton.jit
def _expert_tile(offsets_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Grid axis 0 numbers row tiles, axis 1 tiles of the N output columns. Each expert's
    rows [offsets[e], offsets[e+1]) are cut into ceil(count / BLOCK_M) tiles, numbered
    expert after expert. Returns (expert, rows, row_mask, cols, col_mask); expert == E when
    the row tile is past the last one (the grid is an upper bound: cdiv(T*k, BM) + E), and
    the kernel then returns at once."""
    pid_m = tl.program_id(0)
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
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, rows, rows < row_end, cols, cols < N


def _num_row_tiles(num_rows, num_experts, block_m):
    return triton.cdiv(num_rows, block_m) + num_experts


# ---------------------------------------------------------------------------------------
# Dot precision: fp32 accumulation; the inputs' precision from their dtype and device.
# ---------------------------------------------------------------------------------------
def dot_mode(dtype: torch.dtype, device: torch.device):
    """(input_precision, upcast_to_fp32) for tl.dot. fp32 inputs: exact fp32 products like
    torch's default matmul, TF32 only where the user allowed it for torch matmuls. bf16
    under the interpreter: upcast, because its bf16 dot is wrong there; the products of two
    bf16 values are exact in fp32, so the result is what a GPU's bf16 dot gives."""
    if dtype == torch.float32:
        # "meta" is m2dino_kernels.inspect's stand-in for a CUDA tensor.
        allow_tf32 = device.type in ("cuda", "meta") and torch.get_float32_matmul_precision() != "highest"
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


# ---------------------------------------------------------------------------------------
# Grouped GEMMs over expert-sorted rows
# ---------------------------------------------------------------------------------------
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "H", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_fc1})
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
    expert, rows, row_mask, cols, col_mask = _expert_tile(offsets_ptr, E, H, BLOCK_M, BLOCK_N,
                                                          BLOCK_E)
    if expert >= E:
        return
    H1 = H * ACT
    token = tl.load(slots_ptr + rows, mask=row_mask, other=0) // TOP_K
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


@triton.autotune(configs=_GEMM_CONFIGS, key=["N", "KDIM", "HAS_BIAS", "SCALE_BY_ROUTE"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
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
    expert, rows, row_mask, cols, col_mask = _expert_tile(offsets_ptr, E, N, BLOCK_M, BLOCK_N,
                                                          BLOCK_E)
    if expert >= E:
        return
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


@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "H", "ACT"],
                 prune_configs_by={"early_config_prune": _prune_gemm})
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
    expert, rows, row_mask, cols, col_mask = _expert_tile(offsets_ptr, E, H, BLOCK_M, BLOCK_N,
                                                          BLOCK_E)
    if expert >= E:
        return
    H1 = H * ACT
    slot = tl.load(slots_ptr + rows, mask=row_mask, other=0)
    token = slot // TOP_K
    route_w = tl.load(route_w_ptr + slot, mask=row_mask, other=0.0)
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
                 key=["M", "N", "GATHER_G", "GATHER_A", "ACT_A", "DOT_FP32"],
                 prune_configs_by={"early_config_prune": _prune_wgrad})
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
# Host launchers (no device-to-host syncs: every size used here is known from shapes)
# ---------------------------------------------------------------------------------------
def activation_code(activation: str) -> int:
    try:
        return _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, "
                         f"got {activation!r}") from None


def _row_tile_grid(num_rows, num_experts, n_cols):
    return lambda meta: (_num_row_tiles(num_rows, num_experts, meta["BLOCK_M"]),
                         triton.cdiv(n_cols, meta["BLOCK_N"]))


def fc1_forward(x, sorted_slots, offsets, fc1_w, fc1_b, act_code, top_k):
    """(h_pre [R, H1], act(h_pre) [R, H]) in x's dtype, R = T*k rows in expert order."""
    T, D = x.shape
    E, H1, _ = fc1_w.shape
    H = H1 // act_code
    R = T * top_k
    h_pre = torch.empty(R, H1, dtype=x.dtype, device=x.device)
    hidden = torch.empty(R, H, dtype=x.dtype, device=x.device)
    if R > 0:
        prec, dot_fp32 = dot_mode(x.dtype, x.device)
        _fc1_kernel[_row_tile_grid(R, E, H)](
            x, sorted_slots, offsets, fc1_w, fc1_b, h_pre, hidden, E, D, H,
            TOP_K=top_k, ACT=act_code, PREC=prec, DOT_FP32=dot_fp32,
            BLOCK_E=triton.next_power_of_2(E),
        )
    return h_pre, hidden


def fc2_scatter_forward(hidden, sorted_slots, offsets, fc2_w, fc2_b, weights):
    """(expert_out [R, D] in hidden's dtype, grouped; y_slots [R, D] fp32: expert_out times
    the router weight, at row slot_r, so that a sum over k gives y in token order)."""
    R, H = hidden.shape
    E, D, _ = fc2_w.shape
    expert_out = torch.empty(R, D, dtype=hidden.dtype, device=hidden.device)
    y_slots = torch.empty(R, D, dtype=torch.float32, device=hidden.device)
    if R > 0:
        prec, dot_fp32 = dot_mode(hidden.dtype, hidden.device)
        _grouped_scatter_kernel[_row_tile_grid(R, E, D)](
            hidden, sorted_slots, offsets, fc2_w, fc2_b, weights, expert_out, y_slots,
            E, D, H, D * H, 1, H,
            HAS_BIAS=True, STORE_GROUPED=True, SCALE_BY_ROUTE=True, PREC=prec,
            DOT_FP32=dot_fp32, BLOCK_E=triton.next_power_of_2(E),
        )
    return expert_out, y_slots


def route_weight_grad(grad_y, expert_out, sorted_slots, top_k):
    """grad_weights [T, k] fp32: <grad_y[token], expert_out[r]> stored at slot_r."""
    R, D = expert_out.shape
    grad_weights = torch.empty(grad_y.shape[0], top_k, dtype=torch.float32,
                               device=grad_y.device)
    if R > 0:
        _route_weight_grad_kernel[(triton.cdiv(R, _ROW_DOT_BLOCK_M),)](
            grad_y, expert_out, sorted_slots, grad_weights, R, D,
            TOP_K=top_k, BLOCK_M=_ROW_DOT_BLOCK_M, BLOCK_D=_ROW_DOT_BLOCK_D,
        )
    return grad_weights


def dhidden_backward(grad_y, sorted_slots, offsets, weights, fc2_w, h_pre, act_code, top_k):
    """d_hidden [R, H1] in h_pre's dtype: the gradient w.r.t. h_pre (fc1's output)."""
    R, H1 = h_pre.shape
    E, D, H = fc2_w.shape
    d_hidden = torch.empty(R, H1, dtype=h_pre.dtype, device=h_pre.device)
    if R > 0:
        prec, dot_fp32 = dot_mode(h_pre.dtype, h_pre.device)
        _dhidden_kernel[_row_tile_grid(R, E, H)](
            grad_y, sorted_slots, offsets, weights, fc2_w, h_pre, d_hidden, E, D, H,
            TOP_K=top_k, ACT=act_code, PREC=prec, DOT_FP32=dot_fp32,
            BLOCK_E=triton.next_power_of_2(E),
        )
    return d_hidden


def fc1_scatter_input_grad(d_hidden, sorted_slots, offsets, fc1_w):
    """dx_slots [R, D] fp32: d_hidden[r] @ W1[e] at row slot_r (a sum over k gives dx)."""
    R, H1 = d_hidden.shape
    E, _, D = fc1_w.shape
    dx_slots = torch.empty(R, D, dtype=torch.float32, device=d_hidden.device)
    if R > 0:
        prec, dot_fp32 = dot_mode(d_hidden.dtype, d_hidden.device)
        # No bias, no grouped store, no router scale: those pointers are never read.
        _grouped_scatter_kernel[_row_tile_grid(R, E, D)](
            d_hidden, sorted_slots, offsets, fc1_w, fc1_w, fc1_w, d_hidden, dx_slots,
            E, D, H1, H1 * D, D, 1,
            HAS_BIAS=False, STORE_GROUPED=False, SCALE_BY_ROUTE=False, PREC=prec,
            DOT_FP32=dot_fp32, BLOCK_E=triton.next_power_of_2(E),
        )
    return dx_slots


def weight_grad(g, a, index, g_scale, offsets, num_groups, M, N, *, a_stride, a_half=0,
                index_div=1, gather_g, gather_a, act_a=0, with_bias=True, dot_fp32=False,
                dw_dtype, db_dtype):
    """(dW [num_groups, M, N], db [num_groups, M] or None): see _weight_grad_kernel."""
    dev = g.device
    dw = torch.empty(num_groups, M, N, dtype=dw_dtype, device=dev)
    db = torch.empty(num_groups, M, dtype=db_dtype, device=dev) if with_bias else None
    prec, upcast = dot_mode(a.dtype, a.device)
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
