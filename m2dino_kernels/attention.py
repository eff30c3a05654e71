"""Multi-head attention with DINOv3's rotate-half RoPE: one API, several implementations.

    attention(q, k, v, rope=None, num_prefix_tokens=0, backend=None) -> out

q, k, v are [B, heads, N, head_dim]; `rope = (sin, cos)`, each [N - num_prefix_tokens,
head_dim] or [B (or 1), N - num_prefix_tokens, head_dim] (broadcast over heads). The last
N - num_prefix_tokens tokens of q and k are rotated, in fp32,

    x' = x * cos + rotate_half(x) * sin,    rotate_half(x) = cat(-x2, x1)

(x1, x2 the two halves of head_dim); the first `num_prefix_tokens` tokens (DINOv3's cls and
storage tokens) are not. Then out = softmax(q' k'^T / sqrt(head_dim)) v, with fp32
accumulation, in the input dtype (fp32, fp16 or bf16).

Gradients flow to q, k and v. sin/cos are treated as constants (they are fixed functions of
the patch grid): no gradient flows to them, whichever backend runs. Rotate-half RoPE turns
each pair (i, i + d/2) by one angle, so the two halves of sin and of cos are equal (DINOv3's
are tiled twice); the triton kernel reads only the first half (checked on CPU tensors).

Backends:
  "reference"  explicit rotation, explicit fp32 softmax: the oracle (slow, O(N^2) memory);
               "torch" is accepted for it, as for the MoE ops
  "sdpa"       rotate in PyTorch (fp32), then F.scaled_dot_product_attention, which picks
               its own kernel (flash / efficient / cuDNN / math; see torch.nn.attention)
  "xformers"   rotate in PyTorch, then xformers.ops.memory_efficient_attention; needs the
               optional `xformers` package and CUDA tensors
  "triton"     ours: flash attention with the rotation fused into the q/k tile loads
               (m2dino_kernels.triton.attention); CUDA, or CPU under TRITON_INTERPRET=1
               (fp32/fp16 only there); head_dim 32, 64 or 128
  "auto"       CPU: "sdpa". CUDA: measured (m2dino_kernels.selection): the first call of a
               shape times "sdpa" and, where it can run, "triton" forward+backward on that
               call's inputs, checks triton against sdpa and keeps the faster for the key
               (device, dtype, batch bucket, heads, N, head_dim, RoPE); "sdpa" when not
               measured (M2DINO_KERNELS_AUTOTUNE=0, or under torch.compile before a decision)

backend=None follows the package-wide kernel backend (m2dino_kernels.set_backend): when it
is "triton" attention uses "triton", otherwise "auto". (The package setting names the MoE
implementation; m2dino_kernels.selection makes every choice of backend, this one included.)

The triton path is the torch.library custom op `m2dino::rope_flash_attention` (with a fake
implementation and autograd), so torch.compile traces it as one op without a graph break;
the other backends are plain PyTorch and trace through.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from m2dino_kernels import selection
from m2dino_kernels.registry import ATTENTION_BACKENDS, xformers_available
from m2dino_kernels.shapes import TRITON_HEAD_DIMS

__all__ = ["ATTENTION_BACKENDS", "SUPPORTED_DTYPES", "TRITON_HEAD_DIMS", "apply_rope", "attention",
           "attention_reference", "rotate_half", "xformers_available"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# RoPE in PyTorch (used by the reference, sdpa and xformers backends)
# ---------------------------------------------------------------------------------------
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _broadcast_rope(table: torch.Tensor) -> torch.Tensor:
    """[L, d] or [B, L, d] -> broadcastable against [B, heads, L, d]."""
    return table.unsqueeze(1) if table.dim() == 3 else table


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
               num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rotate the last N - num_prefix_tokens tokens of x [B, heads, N, d], in fp32.

    Returns fp32; callers cast to the dtype they compute in."""
    x = x.float()
    prefix, patches = x[..., :num_prefix_tokens, :], x[..., num_prefix_tokens:, :]
    sin = _broadcast_rope(sin.detach().float())
    cos = _broadcast_rope(cos.detach().float())
    rotated = patches * cos + rotate_half(patches) * sin
    return torch.cat((prefix, rotated), dim=-2)


def _rotate_qk(q, k, rope, num_prefix_tokens):
    """q', k' in the input dtype (the rotation itself in fp32); identity without rope."""
    if rope is None:
        return q, k
    sin, cos = rope
    return (apply_rope(q, sin, cos, num_prefix_tokens).to(q.dtype),
            apply_rope(k, sin, cos, num_prefix_tokens).to(k.dtype))


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------
def attention_reference(q, k, v, rope=None, num_prefix_tokens=0):
    """The oracle: explicit rotation and explicit softmax, everything in fp32.

    Inputs are not validated here (use `attention(..., backend="reference")`)."""
    if rope is None:
        q32, k32 = q.float(), k.float()
    else:
        sin, cos = rope
        q32 = apply_rope(q, sin, cos, num_prefix_tokens)
        k32 = apply_rope(k, sin, cos, num_prefix_tokens)
    scores = (q32 @ k32.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights @ v.float()).to(q.dtype)


def _sdpa_attention(q, k, v, rope, num_prefix_tokens):
    q_rot, k_rot = _rotate_qk(q, k, rope, num_prefix_tokens)
    return F.scaled_dot_product_attention(q_rot, k_rot, v)


def _xformers_attention(q, k, v, rope, num_prefix_tokens):
    import xformers.ops as xops  # noqa: PLC0415 (optional dependency)

    q_rot, k_rot = _rotate_qk(q, k, rope, num_prefix_tokens)
    # xformers takes [B, N, heads, d]; its default scale is 1/sqrt(d).
    out = xops.memory_efficient_attention(q_rot.transpose(1, 2), k_rot.transpose(1, 2),
                                          v.transpose(1, 2))
    return out.transpose(1, 2)


# ----- triton: custom op (forward + backward ops, fake impls, autograd) -----------------
@torch.library.custom_op("m2dino::rope_flash_attention", mutates_args=())
def _rope_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          sin: Optional[torch.Tensor], cos: Optional[torch.Tensor],
                          num_prefix_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from m2dino_kernels.triton import attention as triton_attention  # noqa: PLC0415 (lazy)

    return triton_attention.attention_forward(q, k, v, sin, cos, num_prefix_tokens)


@_rope_flash_attention.register_fake
def _(q, k, v, sin, cos, num_prefix_tokens):
    batch, heads, n, _ = q.shape
    return (q.new_empty(q.shape),
            q.new_empty((batch, heads, n), dtype=torch.float32))


@torch.library.custom_op("m2dino::rope_flash_attention_backward", mutates_args=())
def _rope_flash_attention_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        sin: Optional[torch.Tensor], cos: Optional[torch.Tensor], out: torch.Tensor,
        lse: torch.Tensor, num_prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from m2dino_kernels.triton import attention as triton_attention  # noqa: PLC0415

    return triton_attention.attention_backward(grad_out, q, k, v, sin, cos, out, lse,
                                               num_prefix_tokens)


@_rope_flash_attention_backward.register_fake
def _(grad_out, q, k, v, sin, cos, out, lse, num_prefix_tokens):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, sin, cos, num_prefix_tokens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sin, cos, out, lse)
    ctx.num_prefix_tokens = num_prefix_tokens
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, sin, cos, out, lse = ctx.saved_tensors
    dq, dk, dv = _rope_flash_attention_backward(grad_out, q, k, v, sin, cos, out, lse,
                                                ctx.num_prefix_tokens)
    return dq, dk, dv, None, None, None


_rope_flash_attention.register_autograd(_backward, setup_context=_setup_context)


def _triton_attention(q, k, v, rope, num_prefix_tokens):
    if rope is None or num_prefix_tokens == q.shape[2]:  # nothing to rotate
        sin = cos = None
    else:
        # fp32 [1 or B, L, d], contiguous: the layout the kernels index (they read the first
        # half of each row: the halves of a rotate-half table are equal).
        sin, cos = ((t if t.dim() == 3 else t[None]).detach().float().contiguous()
                    for t in rope)
        half = q.shape[-1] // 2
        # free on CPU (eager); on a GPU it would be a host sync, under tracing a graph break
        if q.device.type == "cpu" and not torch.compiler.is_compiling():
            for name, table in (("sin", sin), ("cos", cos)):
                if not torch.equal(table[..., :half], table[..., half:]):
                    raise ValueError(f"attention backend 'triton': the two halves of rope "
                                     f"{name} differ; rotate-half RoPE rotates each pair "
                                     "(i, i + d/2) by one angle, so they must be equal")
    out, _ = _rope_flash_attention(q, k, v, sin, cos, num_prefix_tokens)
    return out


_BACKEND_FUNCTIONS = {
    "reference": attention_reference,
    "sdpa": _sdpa_attention,
    "xformers": _xformers_attention,
    "triton": _triton_attention,
}


# ---------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------
def _validate(q, k, v, rope, num_prefix_tokens):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be [B, heads, N, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; expected one of "
                            "float32, float16, bfloat16")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"attention: {name} shape {tuple(t.shape)} does not match "
                             f"q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    batch, _, n, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"attention: head_dim must be even (rotate-half RoPE splits it in "
                         f"two), got {head_dim}")
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"attention: num_prefix_tokens must be an int, "
                        f"got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens <= n:
        raise ValueError(f"attention: num_prefix_tokens={num_prefix_tokens} must be in "
                         f"[0, N={n}]")
    if rope is None:
        return
    if not isinstance(rope, Sequence) or len(rope) != 2:
        raise TypeError("attention: rope must be a (sin, cos) pair of tensors or None")
    expected = (n - num_prefix_tokens, head_dim)
    for name, t in zip(("sin", "cos"), rope):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: rope {name} must be a torch.Tensor, "
                            f"got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"attention: rope {name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: rope {name} is on {t.device} but q is on {q.device}")
        if t.dim() not in (2, 3):
            raise ValueError(f"attention: rope {name} must be [N - num_prefix_tokens, head_dim] "
                             f"or [B, N - num_prefix_tokens, head_dim], got shape "
                             f"{tuple(t.shape)}")
        if tuple(t.shape[-2:]) != expected:
            raise ValueError(
                f"attention: rope {name} has shape {tuple(t.shape)} but needs its last two "
                f"dims to be (N - num_prefix_tokens, head_dim) = {expected} "
                f"(N={n}, num_prefix_tokens={num_prefix_tokens}, head_dim={head_dim})")
        if t.dim() == 3 and t.shape[0] not in (1, batch):
            raise ValueError(f"attention: rope {name} has leading (batch) dim {t.shape[0]}; "
                             f"expected 1 or B={batch}")
    if rope[0].shape != rope[1].shape:
        raise ValueError(f"attention: rope sin shape {tuple(rope[0].shape)} does not match "
                         f"cos shape {tuple(rope[1].shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope=None,
              num_prefix_tokens: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q' k'^T / sqrt(head_dim)) v with q', k' rotated by RoPE (see module doc).

    Args:
        q, k, v: [B, heads, N, head_dim], same dtype (fp32/fp16/bf16) and device; head_dim
            even. Any strides.
        rope: None, or (sin, cos), each [N - num_prefix_tokens, head_dim] or
            [B or 1, N - num_prefix_tokens, head_dim]. No gradient flows to them.
        num_prefix_tokens: leading tokens that are not rotated, 0 <= it <= N.
        backend: "auto", "sdpa", "xformers", "triton", "reference" (alias "torch"), or None
            to follow the package setting ("triton" if it is "triton", else "auto").

    Returns:
        [B, heads, N, head_dim] in q's dtype.
    """
    _validate(q, k, v, rope, num_prefix_tokens)
    name = selection.attention_backend(backend, _BACKEND_FUNCTIONS, q, k, v, rope,
                                       num_prefix_tokens)
    return _BACKEND_FUNCTIONS[name](q, k, v, rope, num_prefix_tokens)
