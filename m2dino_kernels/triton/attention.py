"""Triton flash attention with DINOv3's rotate-half RoPE fused into the q/k tile loads.

`attention_forward` and `attention_backward` are called by m2dino_kernels.attention (which
validates the inputs and wraps them in a torch.library custom op with autograd); nothing here
re-checks shapes.

Layout of the work:
- Every q/k tile is loaded as its two halves over head_dim, x1 = x[:, :d/2], x2 = x[:, d/2:],
  so rotate_half needs no in-register permutation:
      x1' = x1 * cos - x2 * sin,   x2' = x2 * cos + x1 * sin       (in fp32)
  with sin/cos the first half of each table: rotate-half RoPE turns the pair (i, i + d/2) by
  one angle, so the tables' two halves are equal (DINOv3's are tiled twice) and each is read
  once.
  and q'k'^T = q1' k1'^T + q2' k2'^T (two dots). Rows of the first `P` (prefix) tokens get
  cos = 1, sin = 0, i.e. they are not rotated. Rotated tiles are cast back to the input dtype
  before the dots, exactly like the PyTorch backends do before calling SDPA.
- Forward: one program per (query block, batch*head); online softmax over key blocks in the
  log2 domain; writes the output and the row logsumexp (log2 domain) for the backward.
- Backward: delta = rowsum(o * do); q and k are rotated once into q', k' (the same fp32
  math and rounding as the forward's loads), because rotating them inside the backward's
  loops (every query block once per key block) leaves an sm_80 compile without a config that
  does not spill registers. One kernel per key block accumulates dk', dv over all query
  blocks, one kernel per query block accumulates dq'; both recompute the probabilities from
  the saved logsumexp instead of storing them. Their stores map dx' back to dx by the
  rotation's transpose:  dx1 = dx1' * cos + dx2' * sin,  dx2 = dx2' * cos - dx1' * sin.
- Offsets: a program's base (batch * batch stride + head * head stride) is computed in int64
  (a q view into a [B, N, 3, heads, d] qkv tensor has batch stride 3*N*heads*d, so B*N*3*D
  passes 2**31 at ViT-L / 1029 tokens with a few hundred images); the offsets within one head
  (tokens * token stride + columns) stay int32, which `int32_offset_problem` checks on the
  host.
- Keys and queries past N (N not a multiple of the block) are masked: loads give zeros,
  scores of missing keys are -inf, probabilities of missing rows/columns are zero.

Runs on CUDA (fp32/fp16/bf16, fp32 accumulation) and, under TRITON_INTERPRET=1, on CPU tensors
(fp32/fp16; the interpreter's bf16 dot is wrong). head_dim must be 32, 64 or 128. The
interpreter gets one small config; CUDA gets autotuned configs per head_dim and dtype.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from m2dino_kernels.triton.grouped_gemm import dot_mode
from m2dino_kernels.triton.target import INTERPRETER, config_pruner

_LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------
# Tile configurations. The interpreter runs one program at a time with numpy and cannot
# autotune over several configs, so it gets one small config (small blocks also exercise the
# multi-block loops and the tail masking on short test sequences; BLOCK_M != BLOCK_N so a
# mix-up of the two shows). GPUs get a small autotuned set per head_dim: the configs that
# compile for sm_80, sm_86 and sm_90 without spilling registers and within shared memory, in
# bf16 and fp32 (`python -m m2dino_kernels.inspect`, checked by test_triton_compile). fp32
# (exact, FMA code; or TF32) keeps four-byte tiles in registers and gets small tiles only.
# BLOCK_M tiles queries, BLOCK_N tiles keys.
# ---------------------------------------------------------------------------------------
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1, num_stages=1)]


def _config(block_m, block_n, num_warps, num_stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps,
                         num_stages=num_stages)


# The one fp32 config (four-byte tiles), and every kernel's last resort: fits any target.
_GPU_SMALL_CONFIG = _config(16, 16, 4, 2)
# {head_dim class: configs} for 16-bit inputs; head_dim 32 takes the 64 set.
GPU_FORWARD_CONFIGS = {
    64: [_config(128, 64, 8, 3), _config(128, 32, 4, 4), _config(64, 64, 4, 3)],
    128: [_config(64, 64, 4, 2), _config(64, 32, 4, 3)],
}
# dk/dv: a program owns BLOCK_N keys and walks all queries in BLOCK_M steps.
GPU_BACKWARD_DKDV_CONFIGS = {
    64: [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 64, 4, 4)],
    128: [_config(64, 32, 4, 2), _config(32, 32, 4, 2)],
}
# dq: a program owns BLOCK_M queries and walks all keys in BLOCK_N steps.
GPU_BACKWARD_DQ_CONFIGS = {
    64: [_config(128, 64, 8, 3), _config(128, 32, 4, 3), _config(64, 64, 4, 3), _config(64, 32, 4, 4)],
    128: [_config(64, 64, 4, 3), _config(64, 32, 4, 4)],
}


def _gpu_configs(by_head_dim):
    """Every config a kernel may be offered (autotune takes one flat list)."""
    return [c for configs in by_head_dim.values() for c in configs] + [_GPU_SMALL_CONFIG]


_FORWARD_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETER else _gpu_configs(GPU_FORWARD_CONFIGS)
_DKDV_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETER else _gpu_configs(GPU_BACKWARD_DKDV_CONFIGS)
_DQ_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETER else _gpu_configs(GPU_BACKWARD_DQ_CONFIGS)
# rows per program of the row-wise kernels (delta, rotation)
_ROW_BLOCK = 16 if INTERPRETER else 64

# Retune when the sequence length, head size, rope presence or dtype changes.
_TUNE_KEY = ["N", "HEAD_DIM", "HAS_ROPE", "PREC"]


def _shared_bytes(config, kwargs, named_args, fixed, streamed):
    """Shared memory of a config: the tile the program keeps (`fixed` rows of HEAD_DIM) plus
    num_stages buffers of the tiles it streams (`streamed` rows each step), in q's dtype."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    el = named_args["q_ptr"].element_size()
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    rows = {"M": bm, "N": bn}
    return el * head_dim * (rows[fixed[0]] * fixed[1]
                            + config.num_stages * rows[streamed[0]] * streamed[1])


def _pruner(by_head_dim, fixed, streamed):
    """early_config_prune: the configs of the launch's head_dim class (16-bit inputs) or the
    small config (fp32) that fit the target's shared memory, else the small config."""
    def candidates(named_args, kwargs):
        if named_args["q_ptr"].element_size() > 2:
            return [_GPU_SMALL_CONFIG]
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        return by_head_dim[64 if head_dim <= 64 else 128]

    def shared_bytes(config, named_args, kwargs):
        return _shared_bytes(config, kwargs, named_args, fixed, streamed)

    return config_pruner(candidates, shared_bytes, fallback=_GPU_SMALL_CONFIG)


# forward and dq keep the BLOCK_M query rows (forward: q; dq: q and dO) and stream keys and
# values; dkdv keeps k and v and streams q and dO.
_prune_forward = _pruner(GPU_FORWARD_CONFIGS, ("M", 1), ("N", 2))
_prune_dq = _pruner(GPU_BACKWARD_DQ_CONFIGS, ("M", 2), ("N", 2))
_prune_dkdv = _pruner(GPU_BACKWARD_DKDV_CONFIGS, ("N", 2), ("M", 2))


@triton.jit
def _load_rope(sin_base, cos_base, stride_sn, rows, row_mask, P, half_cols):
    """sin/cos (the first half of each table: both halves are equal) for token rows; prefix
    rows (and rows past N) get sin 0, cos 1."""
    rotated = row_mask & (rows >= P)
    offs = (rows - P)[:, None] * stride_sn + half_cols[None, :]
    sin = tl.load(sin_base + offs, mask=rotated[:, None], other=0.0)
    cos = tl.load(cos_base + offs, mask=rotated[:, None], other=1.0)
    return sin, cos


@triton.jit
def _load_rotated_halves(x_base, stride_n, rows, row_mask, half_cols, sin_base, cos_base,
                         stride_sn, P, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Load rows of x as two halves over head_dim and apply the rotation in fp32."""
    x1, x2 = _load_halves(x_base, stride_n, rows, row_mask, half_cols, HALF)
    if HAS_ROPE:
        sin, cos = _load_rope(sin_base, cos_base, stride_sn, rows, row_mask, P, half_cols)
        x1f = x1.to(tl.float32)
        x2f = x2.to(tl.float32)
        y1 = x1f * cos - x2f * sin
        y2 = x2f * cos + x1f * sin
        x1 = y1.to(x_base.dtype.element_ty)
        x2 = y2.to(x_base.dtype.element_ty)
    return x1, x2


@triton.jit
def _store_unrotated_halves(out_base, stride_n, rows, row_mask, half_cols, g1, g2, sin_base,
                            cos_base, stride_sn, P, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    """Store the gradient w.r.t. x given the fp32 gradient w.r.t. the rotated x'
    (the rotation's transpose: dx1 = g1*cos + g2*sin, dx2 = g2*cos - g1*sin)."""
    if HAS_ROPE:
        sin, cos = _load_rope(sin_base, cos_base, stride_sn, rows, row_mask, P, half_cols)
        r1 = g1 * cos + g2 * sin
        r2 = g2 * cos - g1 * sin
    else:
        r1 = g1
        r2 = g2
    ptrs = out_base + rows[:, None] * stride_n + half_cols[None, :]
    tl.store(ptrs, r1.to(out_base.dtype.element_ty), mask=row_mask[:, None])
    tl.store(ptrs + HALF, r2.to(out_base.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _program_head(H):
    """(pid_bh, b, h) of this program from grid axis 1 = batch * heads, in int64 so that the
    products with the batch and head strides cannot wrap."""
    pid_bh = tl.program_id(1).to(tl.int64)
    return pid_bh, pid_bh // H, pid_bh % H


@triton.jit
def _head_offset(b, h, stride_b, stride_h):
    """Element offset of head (b, h): int64 (b and h are)."""
    return b * stride_b + h * stride_h


@triton.jit
def _head_bases(H, q_ptr, k_ptr, v_ptr, x_ptr, sin_ptr, cos_ptr, stride_qb, stride_qh,
                stride_kb, stride_kh, stride_vb, stride_vh, stride_xb, stride_xh, stride_sb):
    """Grid axis 1 is batch * heads: (pid_bh, b, h) of this program (int64) and the bases of
    its head's q, k, v and x (the output in the forward, its gradient in the backward) and of
    its batch's sin/cos."""
    pid_bh, b, h = _program_head(H)
    q_base = q_ptr + _head_offset(b, h, stride_qb, stride_qh)
    k_base = k_ptr + _head_offset(b, h, stride_kb, stride_kh)
    v_base = v_ptr + _head_offset(b, h, stride_vb, stride_vh)
    x_base = x_ptr + _head_offset(b, h, stride_xb, stride_xh)
    sin_base = sin_ptr + b * stride_sb
    cos_base = cos_ptr + b * stride_sb
    return pid_bh, b, h, q_base, k_base, v_base, x_base, sin_base, cos_base


@triton.jit
def _load_halves(x_base, stride_n, rows, row_mask, half_cols, HALF: tl.constexpr):
    """Rows of x as its two halves over head_dim."""
    ptrs = x_base + rows[:, None] * stride_n + half_cols[None, :]
    x1 = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
    x2 = tl.load(ptrs + HALF, mask=row_mask[:, None], other=0.0)
    return x1, x2


@triton.jit
def _load_key_block(k_base, v_base, stride_kn, stride_vn, cols, N, half_cols, dim_cols,
                    HALF: tl.constexpr):
    """Keys `cols` for the backward (k already rotated): (col_mask, k halves, v)."""
    col_mask = cols < N
    k1, k2 = _load_halves(k_base, stride_kn, cols, col_mask, half_cols, HALF)
    v = tl.load(v_base + cols[:, None] * stride_vn + dim_cols[None, :],
                mask=col_mask[:, None], other=0.0)
    return col_mask, k1, k2, v


@triton.jit
def _load_query_block(q_base, do_base, lse_base, delta_base, stride_qn, stride_don, rows, N,
                      half_cols, dim_cols, HALF: tl.constexpr):
    """Queries `rows` for the backward (q already rotated): (row_mask, q halves, do, and the
    rows' logsumexp and delta; lse_base/delta_base point at this head's rows)."""
    row_mask = rows < N
    q1, q2 = _load_halves(q_base, stride_qn, rows, row_mask, half_cols, HALF)
    do = tl.load(do_base + rows[:, None] * stride_don + dim_cols[None, :],
                 mask=row_mask[:, None], other=0.0)
    lse = tl.load(lse_base + rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_base + rows, mask=row_mask, other=0.0)
    return row_mask, q1, q2, do, lse, delta


@triton.autotune(configs=_FORWARD_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_forward})
@triton.jit
def _attention_forward_kernel(
        q_ptr, k_ptr, v_ptr, sin_ptr, cos_ptr, o_ptr, lse_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        stride_sb, stride_sn, H, N, P, qk_scale,
        HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh, b, h, q_base, k_base, v_base, o_base, sin_base, cos_base = _head_bases(
        H, q_ptr, k_ptr, v_ptr, o_ptr, sin_ptr, cos_ptr, stride_qb, stride_qh, stride_kb,
        stride_kh, stride_vb, stride_vh, stride_ob, stride_oh, stride_sb)

    half_cols = tl.arange(0, HALF)
    dim_cols = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    q1, q2 = _load_rotated_halves(q_base, stride_qn, rows, row_mask, half_cols, sin_base,
                                  cos_base, stride_sn, P, HALF, HAS_ROPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        k1, k2 = _load_rotated_halves(k_base, stride_kn, cols, col_mask, half_cols, sin_base,
                                      cos_base, stride_sn, P, HALF, HAS_ROPE)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
        s = tl.where(col_mask[None, :], s * qk_scale, float("-inf"))  # log2 domain
        # Every key block holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vn + dim_cols[None, :],
                    mask=col_mask[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(o_base + rows[:, None] * stride_on + dim_cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None])
    tl.store(lse_ptr + pid_bh * N + rows, m_i + tl.log2(l_i), mask=row_mask)


@triton.jit
def _rope_rotate_kernel(
        x_ptr, sin_ptr, cos_ptr, out_ptr, stride_xb, stride_xh, stride_xn, stride_sb, stride_sn,
        H, N, P, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = x rotated (rows past the P prefix tokens), contiguous [B, H, N, d], in x's dtype:
    the tiles the forward's loads make, computed once for the backward."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_bh, b, h = _program_head(H)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    half_cols = tl.arange(0, HALF)
    x1, x2 = _load_rotated_halves(x_ptr + _head_offset(b, h, stride_xb, stride_xh), stride_xn, rows,
                                  row_mask, half_cols, sin_ptr + b * stride_sb, cos_ptr + b * stride_sb,
                                  stride_sn, P, HALF, True)
    out = out_ptr + pid_bh * N * HEAD_DIM + rows[:, None] * HEAD_DIM + half_cols[None, :]
    tl.store(out, x1, mask=row_mask[:, None])
    tl.store(out + HALF, x2, mask=row_mask[:, None])


@triton.jit
def _attention_backward_delta_kernel(
        o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_on,
        stride_dob, stride_doh, stride_don, H, N,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[row] = sum_d o[row, d] * do[row, d] in fp32 (the softmax backward's row term)."""
    pid_m = tl.program_id(0)
    pid_bh, b, h = _program_head(H)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    dim_cols = tl.arange(0, HEAD_DIM)
    o = tl.load(o_ptr + _head_offset(b, h, stride_ob, stride_oh) + rows[:, None] * stride_on
                + dim_cols[None, :], mask=row_mask[:, None], other=0.0)
    do = tl.load(do_ptr + _head_offset(b, h, stride_dob, stride_doh)
                 + rows[:, None] * stride_don + dim_cols[None, :], mask=row_mask[:, None],
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * N + rows, delta, mask=row_mask)


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _attention_backward_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, sin_ptr, cos_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        stride_gb, stride_gh, stride_gn, stride_sb, stride_sn, H, N, P, qk_scale, sm_scale,
        HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dk and dv for one block of keys; dk/dv share strides (stride_g*), both contiguous."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_n = tl.program_id(0)
    pid_bh, b, h, q_base, k_base, v_base, do_base, sin_base, cos_base = _head_bases(
        H, q_ptr, k_ptr, v_ptr, do_ptr, sin_ptr, cos_ptr, stride_qb, stride_qh, stride_kb,
        stride_kh, stride_vb, stride_vh, stride_dob, stride_doh, stride_sb)

    half_cols = tl.arange(0, HALF)
    dim_cols = tl.arange(0, HEAD_DIM)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask, k1, k2, v = _load_key_block(k_base, v_base, stride_kn, stride_vn, cols, N,
                                          half_cols, dim_cols, HALF)

    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_mask, q1, q2, do, lse, delta = _load_query_block(
            q_base, do_base, lse_ptr + pid_bh * N, delta_ptr + pid_bh * N, stride_qn,
            stride_don, rows, N, half_cols, dim_cols, HALF)
        # Transposed scores: keys on rows, queries on columns.
        s_t = tl.dot(k1, tl.trans(q1), input_precision=PREC)
        s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=PREC)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        p_t = tl.where(row_mask[None, :] & col_mask[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(ds_t, q1, dk1, input_precision=PREC)
        dk2 = tl.dot(ds_t, q2, dk2, input_precision=PREC)

    g_off = _head_offset(b, h, stride_gb, stride_gh)
    tl.store(dv_ptr + g_off + cols[:, None] * stride_gn + dim_cols[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=col_mask[:, None])
    _store_unrotated_halves(dk_ptr + g_off, stride_gn, cols, col_mask, half_cols,
                            dk1 * sm_scale, dk2 * sm_scale, sin_base, cos_base, stride_sn, P,
                            HALF, HAS_ROPE)


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit
def _attention_backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, sin_ptr, cos_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        stride_gb, stride_gh, stride_gn, stride_sb, stride_sn, H, N, P, qk_scale, sm_scale,
        HAS_ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq for one block of queries."""
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh, b, h, q_base, k_base, v_base, do_base, sin_base, cos_base = _head_bases(
        H, q_ptr, k_ptr, v_ptr, do_ptr, sin_ptr, cos_ptr, stride_qb, stride_qh, stride_kb,
        stride_kh, stride_vb, stride_vh, stride_dob, stride_doh, stride_sb)

    half_cols = tl.arange(0, HALF)
    dim_cols = tl.arange(0, HEAD_DIM)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, q1, q2, do, lse, delta = _load_query_block(
        q_base, do_base, lse_ptr + pid_bh * N, delta_ptr + pid_bh * N, stride_qn, stride_don,
        rows, N, half_cols, dim_cols, HALF)

    dq1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    dq2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_mask, k1, k2, v = _load_key_block(k_base, v_base, stride_kn, stride_vn, cols, N,
                                              half_cols, dim_cols, HALF)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
        s = tl.dot(q2, tl.trans(k2), s, input_precision=PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(row_mask[:, None] & col_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = (p * (dp - delta[:, None])).to(k1.dtype)
        dq1 = tl.dot(ds, k1, dq1, input_precision=PREC)
        dq2 = tl.dot(ds, k2, dq2, input_precision=PREC)

    _store_unrotated_halves(dq_ptr + _head_offset(b, h, stride_gb, stride_gh), stride_gn, rows, row_mask,
                            half_cols, dq1 * sm_scale, dq2 * sm_scale, sin_base, cos_base,
                            stride_sn, P, HALF, HAS_ROPE)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------
INT32_LIMIT = 2 ** 31


def int32_offset_problem(shape, *strides) -> "str | None":
    """None when the offsets a program computes within one head fit int32 for tensors of
    `shape` [B, heads, N, d] with the given strides (one tuple per tensor), else why not. The
    head bases are int64 (see the module doc), so only one head's span matters:
    (N - 1) * token stride + (d - 1) * column stride."""
    _, _, n, d = shape
    for stride in strides:
        span = (n - 1) * stride[2] + (d - 1) * stride[3]
        if span >= INT32_LIMIT:
            return (f"attention backend 'triton' computes offsets within a head in int32: "
                    f"shape {tuple(shape)} with strides {tuple(stride)} spans {span + 1} "
                    f"elements per head (>= 2**31); use 'sdpa'")
    return None


def head_base_offset(shape, stride) -> int:
    """The largest head base offset a program computes (in int64): (B-1)*batch stride +
    (heads-1)*head stride."""
    return (shape[0] - 1) * stride[0] + (shape[1] - 1) * stride[1]


def _check_offsets(*tensors) -> None:
    problem = int32_offset_problem(tensors[0].shape, *(t.stride() for t in tensors))
    if problem:
        raise ValueError(problem)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Kernels take any batch/head/token strides but need unit stride over head_dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(x: torch.Tensor) -> str:
    """The dots' input precision: the MoE kernels' rule (fp32 exact unless the user allowed
    TF32 for matmuls). Attention never upcasts bf16: it does not run bf16 on the CPU."""
    return dot_mode(x.dtype, x.device)[0]


def _rope_args(sin, cos, like: torch.Tensor):
    """(sin, cos, batch stride, token stride, has_rope); sin/cos are fp32 [1 or B, L, d]."""
    if sin is None:
        dummy = like.new_empty(1, dtype=torch.float32)
        return dummy, dummy, 0, 0, False
    batch_stride = 0 if sin.shape[0] == 1 else sin.stride(0)
    return sin, cos, batch_stride, sin.stride(1), True


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def attention_forward(q, k, v, sin, cos, num_prefix_tokens: int):
    """Forward: (out [B,H,N,d] contiguous, lse [B,H,N] fp32 in the log2 domain).

    q, k, v: [B, H, N, d] of one dtype and device, d in SUPPORTED_HEAD_DIMS; sin/cos: None or
    contiguous fp32 [1 or B, N - num_prefix_tokens, d]."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    _check_offsets(q, k, v)
    batch, heads, n, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    sin, cos, stride_sb, stride_sn, has_rope = _rope_args(sin, cos, q)
    qk_scale = _LOG2E / math.sqrt(head_dim)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)

    _attention_forward_kernel[grid](
        q, k, v, sin, cos, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        stride_sb, stride_sn, heads, n, num_prefix_tokens, qk_scale,
        HAS_ROPE=has_rope, HEAD_DIM=head_dim, PREC=_precision(q))
    return out, lse


def _rotated(x, sin, cos, stride_sb, stride_sn, num_prefix_tokens):
    """x with RoPE applied past the prefix tokens, contiguous, in x's dtype."""
    batch, heads, n, head_dim = x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rope_rotate_kernel[(triton.cdiv(n, _ROW_BLOCK), batch * heads)](
        x, sin, cos, out, *_strides(x), stride_sb, stride_sn, heads, n, num_prefix_tokens,
        HEAD_DIM=head_dim, BLOCK_M=_ROW_BLOCK)
    return out


def attention_backward(grad_out, q, k, v, sin, cos, out, lse, num_prefix_tokens: int):
    """Backward of `attention_forward`: (dq, dk, dv), contiguous, in q's dtype."""
    grad_out, q, k, v = (_last_dim_contiguous(t) for t in (grad_out, q, k, v))
    _check_offsets(q, k, v, grad_out)
    batch, heads, n, head_dim = q.shape
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if dq.numel() == 0:
        return dq, dk, dv
    sin, cos, stride_sb, stride_sn, has_rope = _rope_args(sin, cos, q)
    sm_scale = 1.0 / math.sqrt(head_dim)
    qk_scale = sm_scale * _LOG2E
    prec = _precision(q)

    if has_rope:  # the backward's kernels take q' and k' (module docstring)
        q = _rotated(q, sin, cos, stride_sb, stride_sn, num_prefix_tokens)
        k = _rotated(k, sin, cos, stride_sb, stride_sn, num_prefix_tokens)

    delta = torch.empty((batch, heads, n), dtype=torch.float32, device=q.device)
    _attention_backward_delta_kernel[(triton.cdiv(n, _ROW_BLOCK), batch * heads)](
        out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, n,
        HEAD_DIM=head_dim, BLOCK_M=_ROW_BLOCK)

    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
              stride_sb, stride_sn, heads, n, num_prefix_tokens, qk_scale, sm_scale)

    def grid_keys(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), batch * heads)

    def grid_queries(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)

    _attention_backward_dkdv_kernel[grid_keys](
        q, k, v, sin, cos, grad_out, lse, delta, dk, dv, *common,
        HAS_ROPE=has_rope, HEAD_DIM=head_dim, PREC=prec)
    _attention_backward_dq_kernel[grid_queries](
        q, k, v, sin, cos, grad_out, lse, delta, dq, *common,
        HAS_ROPE=has_rope, HEAD_DIM=head_dim, PREC=prec)
    return dq, dk, dv
