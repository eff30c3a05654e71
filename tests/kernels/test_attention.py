"""attention(): the fp32 reference against independent float64 math and timm's RoPE; sdpa and
triton (under TRITON_INTERPRET=1 on CPU) against the reference in forward and in the q, k, v
gradients (the attention contract of m2dino_kernels.contract, which the self-test also runs);
validation errors; backend resolution; custom op registration and torch.compile.
GPU tests (`gpu` marker): bf16/fp16 at larger shapes."""
import math
import os

import pytest
import torch

from m2dino_kernels import contract, registry, selection
from m2dino_kernels.attention import ATTENTION_BACKENDS, apply_rope, attention, attention_reference
from m2dino_kernels.contract import attention_forward_backward as forward_backward
from m2dino_kernels.contract import check_attention_matches_reference as assert_matches_reference
from m2dino_kernels.contract import dinov3_rope, make_qkv

PREFIX = 5  # DINOv3: cls + 4 storage tokens
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# the GPU tests of the triton kernels: where triton runs on CUDA and is not left out
TRITON_ON_CUDA = pytest.mark.skipif(not HAS_CUDA or "triton" not in registry.available_backends("cuda"),
                                    reason="needs triton on a CUDA device")


# ---------------------------------------------------------------------------------------
# The reference against independent math
# ---------------------------------------------------------------------------------------
def rotation_matrices(sin, cos):
    """Explicit [L, d, d] matrices R with x' = R x for the rotate-half layout: pair (i, i+d/2)
    rotated by the angle whose sine/cosine sit at columns i (first row) and i+d/2 (second)."""
    length, d = sin.shape
    half = d // 2
    rot = torch.zeros(length, d, d, dtype=torch.float64)
    i = torch.arange(half)
    rot[:, i, i] = cos[:, :half].double()
    rot[:, i, i + half] = -sin[:, :half].double()
    rot[:, i + half, i + half] = cos[:, half:].double()
    rot[:, i + half, i] = sin[:, half:].double()
    return rot


def test_reference_equals_float64_rotation_matrices_and_softmax():
    batch, heads, n, d = 2, 3, 21, 8
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    sin, cos = dinov3_rope(n - PREFIX, d)
    rot = rotation_matrices(sin, cos)

    def rotate(x):
        x = x.double()
        patches = torch.einsum("lij,bhlj->bhli", rot, x[:, :, PREFIX:])
        return torch.cat((x[:, :, :PREFIX], patches), 2)

    scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(d)
    expected = torch.softmax(scores, -1) @ v.double()
    got = attention_reference(q, k, v, rope=(sin, cos), num_prefix_tokens=PREFIX)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    # The tables matter: other angles give other outputs.
    other = attention_reference(q, k, v, rope=(sin.flip(0), cos.flip(0)),
                                num_prefix_tokens=PREFIX)
    assert not torch.allclose(other[:, :, PREFIX:], got[:, :, PREFIX:], atol=1e-3)


def test_apply_rope_matches_timm_rotate_half():
    from timm.layers.pos_embed_sincos import apply_rot_embed

    x = torch.randn(2, 3, 16 + PREFIX, 32)
    sin, cos = dinov3_rope(16, 32)
    want = apply_rot_embed(x[:, :, PREFIX:], sin, cos, half=True)
    got = apply_rope(x, sin, cos, PREFIX)
    assert torch.allclose(got[:, :, PREFIX:], want, atol=1e-6)
    assert torch.equal(got[:, :, :PREFIX], x[:, :, :PREFIX])


def test_rope_scores_depend_only_on_relative_position():
    """1-D RoPE property: q'.k' is unchanged when every position shifts by the same amount."""
    d, n = 16, 9
    freqs = 1.0 / 100 ** (torch.arange(d // 2) / (d // 2))
    pos = torch.arange(n, dtype=torch.float32)
    q, k = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)

    def scores(offset):
        angles = ((pos + offset)[:, None] * freqs).tile(2)
        rope = (angles.sin(), angles.cos())
        return apply_rope(q, *rope) @ apply_rope(k, *rope).transpose(-1, -2)

    assert torch.allclose(scores(0.0), scores(7.5), atol=1e-4)


# ---------------------------------------------------------------------------------------
# sdpa and triton against the reference
# ---------------------------------------------------------------------------------------
N_VALUES = [1, 5, 21, 70, 201]


def _shape_for(n):
    # The interpreter is slow: tiny batch*heads at long sequences (still both > 1 below 201).
    return (2, 3) if n <= 21 else ((2, 2) if n <= 70 else (1, 2))


@pytest.mark.parametrize("prefix", [0, PREFIX])
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_matches_reference(n, prefix, dtype):
    if prefix > n:
        pytest.skip("more prefix tokens than tokens")
    q, k, v = make_qkv(2, 3, n, 32, dtype)
    rope = dinov3_rope(n - prefix, 32)
    atol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_matches_reference(q, k, v, rope, prefix, "sdpa", atol=atol)


@pytest.mark.parametrize("prefix", [0, PREFIX])
@pytest.mark.parametrize("n", N_VALUES)
def test_triton_fp32_matches_reference(n, prefix):
    if prefix > n:
        pytest.skip("more prefix tokens than tokens")
    batch, heads = _shape_for(n)
    q, k, v = make_qkv(batch, heads, n, 32, torch.float32, DEVICE)
    rope = dinov3_rope(n - prefix, 32, device=DEVICE)
    assert_matches_reference(q, k, v, rope, prefix, "triton", atol=5e-5)


@pytest.mark.parametrize("n,prefix", [(5, 0), (21, PREFIX), (70, PREFIX)])
def test_triton_fp16_head_dim_64_matches_reference(n, prefix):
    batch, heads = _shape_for(n)
    q, k, v = make_qkv(batch, heads, n, 64, torch.float16, DEVICE)
    rope = dinov3_rope(n - prefix, 64, device=DEVICE)
    assert_matches_reference(q, k, v, rope, prefix, "triton", atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("backend,dtype", [
    ("sdpa", torch.float32), pytest.param("triton", torch.float32, marks=pytest.mark.slow),
    pytest.param("triton", torch.float16, marks=pytest.mark.slow)], ids=str)
def test_the_attention_contract(backend, dtype):
    """What the self-test holds an attention backend to: head dim 64, with and without RoPE
    and prefix tokens, strided q/k/v, forward and gradients (m2dino_kernels.contract)."""
    contract.check_attention(backend, dtype, DEVICE)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("leading", ["batch", "one"])
def test_batch_leading_rope(backend, leading):
    batch, n = 2, 21
    q, k, v = make_qkv(batch, 2, n, 32, torch.float32, DEVICE)
    sin, cos = dinov3_rope(n - PREFIX, 32, batch=batch if leading == "batch" else 1,
                           device=DEVICE)
    assert sin.shape == (batch if leading == "batch" else 1, n - PREFIX, 32)
    assert_matches_reference(q, k, v, (sin, cos), PREFIX, backend, atol=5e-5)
    if leading == "batch":  # each image really uses its own table
        out = attention(q, k, v, rope=(sin, cos), num_prefix_tokens=PREFIX, backend=backend)
        first = attention(q[:1], k[:1], v[:1], rope=(sin[0], cos[0]),
                          num_prefix_tokens=PREFIX, backend=backend)
        second = attention(q[1:], k[1:], v[1:], rope=(sin[1], cos[1]),
                           num_prefix_tokens=PREFIX, backend=backend)
        assert torch.allclose(out, torch.cat((first, second)), atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_without_rope(backend):
    q, k, v = make_qkv(2, 2, 37, 32, torch.float32, DEVICE, contiguous=True)
    assert_matches_reference(q, k, v, None, 0, backend, atol=5e-5)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attention(q, k, v, backend=backend), plain, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_all_tokens_prefix_means_no_rotation(backend):
    n = 6
    q, k, v = make_qkv(1, 2, n, 32, torch.float32, DEVICE)
    empty = torch.empty(0, 32, device=DEVICE)
    got = attention(q, k, v, rope=(empty, empty), num_prefix_tokens=n, backend=backend)
    assert torch.allclose(got, attention(q, k, v, backend="reference"), atol=1e-5)


def test_no_gradient_flows_to_rope_tables():
    q, k, v = make_qkv(1, 2, 9, 32, torch.float32)
    sin, cos = (t.requires_grad_(True) for t in dinov3_rope(9, 32))
    attention(q, k, v, rope=(sin, cos), backend="sdpa").sum().backward()
    assert sin.grad is None and cos.grad is None and q.grad is not None


# ---------------------------------------------------------------------------------------
# Validation and dispatch
# ---------------------------------------------------------------------------------------
def _good(n=7, d=32, prefix=2):
    q, k, v = (torch.randn(2, 3, n, d) for _ in range(3))
    return q, k, v, dinov3_rope(n - prefix, d), prefix


@pytest.mark.parametrize("case,error,match", [
    ("rope_too_long", ValueError, r"rope sin has shape \(6, 32\).*\(5, 32\)"),
    ("rope_wrong_head_dim", ValueError, r"rope sin has shape \(5, 16\)"),
    ("rope_rank_1", ValueError, r"rope sin must be \[N - num_prefix_tokens"),
    ("rope_bad_batch", ValueError, r"leading \(batch\) dim 3; expected 1 or B=2"),
    ("rope_not_pair", TypeError, r"\(sin, cos\) pair"),
    ("rope_sin_cos_differ", ValueError, r"sin shape \(2, 5, 32\) does not match cos"),
    ("odd_head_dim", ValueError, r"head_dim must be even.*got 33"),
    ("dtype_mismatch", TypeError, r"v dtype torch.float16 does not match q dtype torch.float32"),
    ("shape_mismatch", ValueError, r"k shape \(2, 3, 8, 32\) does not match q shape"),
    ("rank_3", ValueError, r"q must be \[B, heads, N, head_dim\], got shape \(3, 7, 32\)"),
    ("int_dtype", TypeError, r"q has dtype torch.int64"),
    ("prefix_negative", ValueError, r"num_prefix_tokens=-1 must be in \[0, N=7\]"),
    ("prefix_too_large", ValueError, r"num_prefix_tokens=8 must be in \[0, N=7\]"),
    ("prefix_float", TypeError, r"num_prefix_tokens must be an int"),
    ("unknown_backend", ValueError, r"attention: unknown kernel backend 'numpy'"),
    ("triton_head_dim", ValueError, r"supports head_dim \(32, 64, 128\), got 48"),
    ("xformers_on_cpu", RuntimeError, r"xformers"),
])
def test_bad_input_raises_clear_error(case, error, match):
    q, k, v, rope, prefix = _good()
    kwargs = dict(rope=rope, num_prefix_tokens=prefix, backend="sdpa")
    if case == "rope_too_long":
        kwargs["rope"] = dinov3_rope(6, 32)
    elif case == "rope_wrong_head_dim":
        kwargs["rope"] = dinov3_rope(5, 16)
    elif case == "rope_rank_1":
        kwargs["rope"] = (rope[0][0], rope[1][0])
    elif case == "rope_bad_batch":
        kwargs["rope"] = tuple(t.expand(3, -1, -1) for t in rope)
    elif case == "rope_not_pair":
        kwargs["rope"] = rope[0]
    elif case == "rope_sin_cos_differ":
        kwargs["rope"] = (rope[0].expand(2, -1, -1), rope[1])
    elif case == "odd_head_dim":
        q, k, v, _, _ = _good(d=33)
        kwargs["rope"] = None
    elif case == "dtype_mismatch":
        v = v.half()
    elif case == "shape_mismatch":
        k = torch.randn(2, 3, 8, 32)
    elif case == "rank_3":
        q = q[0]
    elif case == "int_dtype":
        q = q.long()
    elif case == "prefix_negative":
        kwargs.update(num_prefix_tokens=-1, rope=None)
    elif case == "prefix_too_large":
        kwargs.update(num_prefix_tokens=8, rope=None)
    elif case == "prefix_float":
        kwargs["num_prefix_tokens"] = 2.0
    elif case == "unknown_backend":
        kwargs["backend"] = "numpy"
    elif case == "triton_head_dim":
        q, k, v, rope, _ = _good(d=48)
        kwargs.update(rope=rope, backend="triton")
    elif case == "xformers_on_cpu":
        kwargs["backend"] = "xformers"
    with pytest.raises(error, match=match):
        attention(q, k, v, **kwargs)


def _chosen(backend, q):
    """The attention backend selection picks for q (as k and v) with the process tuner."""
    return selection.attention_backend(backend, {}, q, q, q)


def test_backend_none_follows_package_setting():
    from m2dino_kernels import use_backend

    q = torch.randn(1, 1, 4, 32, device=DEVICE)
    auto = "sdpa" if DEVICE == "cpu" else _chosen("auto", q)  # CPU: unmeasured, the library path
    with use_backend("triton"):
        assert _chosen(None, q) == "triton"
    for name in ("reference", "torch", "auto"):  # the MoE oracle does not make attention O(N^2)
        with use_backend(name):
            assert _chosen(None, q) == auto
    assert _chosen("auto", q) == auto
    assert _chosen("auto", torch.randn(1, 1, 4, 48, device=DEVICE)) == "sdpa"
    assert set(ATTENTION_BACKENDS) == {"auto", "sdpa", "xformers", "triton", "reference"}


def test_torch_is_an_alias_of_the_reference():
    q, k, v, rope, prefix = _good()
    assert _chosen("torch", q) == "reference"
    torch.testing.assert_close(attention(q, k, v, rope, prefix, backend="torch"),
                               attention(q, k, v, rope, prefix, backend="reference"), atol=0, rtol=0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only triton refusal")
def test_triton_bf16_refused_under_interpreter():
    q, k, v = make_qkv(1, 1, 4, 32, torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter"):
        attention(q, k, v, backend="triton")


# ---------------------------------------------------------------------------------------
# Offsets past 2**31 and the rope tables' halves
# ---------------------------------------------------------------------------------------
VIT_L_1029 = (700, 16, 1029, 64)  # 700 images of ViT-L at 512 px: B*N*3*D > 2**31
QKV_VIEW_STRIDES = (1029 * 3 * 16 * 64, 64, 3 * 16 * 64, 1)  # q as a view into qkv


try:  # a probe of the kernels' own offset helpers (module level: @triton.jit globals)
    import triton
    import triton.language as tl

    from m2dino_kernels.triton import attention as _ta

    @triton.jit
    def _head_offset_probe(out_ptr, H, stride_b, stride_h):
        pid_bh, b, h = _ta._program_head(H)
        tl.store(out_ptr + pid_bh, _ta._head_offset(b, h, stride_b, stride_h))
except ImportError:
    _head_offset_probe = None


@pytest.mark.skipif(_head_offset_probe is None or not (HAS_CUDA or os.environ.get(
    "TRITON_INTERPRET") == "1"), reason="needs triton with a GPU or its interpreter")
def test_head_base_offsets_are_int64_past_2_31():
    """The kernels' head base offsets (batch * batch stride + head * head stride), computed
    by their own helpers for every program of a ViT-L / 1029-token batch of 700 images (q a
    view into qkv): exact past 2**31, where int32 arithmetic wraps (checked: the same probe
    without the int64 cast differs)."""
    batch, heads, _, _ = VIT_L_1029
    out = torch.zeros(batch * heads, dtype=torch.int64, device=DEVICE)
    _head_offset_probe[(1, batch * heads)](out, heads, QKV_VIEW_STRIDES[0],
                                           QKV_VIEW_STRIDES[1])
    pid = torch.arange(batch * heads, device=DEVICE)
    want = (pid // heads) * QKV_VIEW_STRIDES[0] + (pid % heads) * QKV_VIEW_STRIDES[1]
    assert int(want.max()) == _ta.head_base_offset(VIT_L_1029, QKV_VIEW_STRIDES) > 2 ** 31
    assert torch.equal(out, want)


def test_int32_offsets_within_a_head_are_checked():
    from m2dino_kernels.triton import attention as ta

    # ViT-L at 1029 tokens, 700 images: the int64 head bases take it; one head spans 3.2M
    assert ta.int32_offset_problem(VIT_L_1029, QKV_VIEW_STRIDES) is None
    # one head spanning more than 2**31 elements (4M tokens of a q view into qkv) is refused
    # with the shape named
    huge = (1, 16, 2 ** 22, 64)
    problem = ta.int32_offset_problem(huge, (2 ** 22 * 3072, 64, 3072, 1))
    assert problem and "(1, 16, 4194304, 64)" in problem and ">= 2**31" in problem
    assert "use 'sdpa'" in problem


def test_triton_refuses_rope_tables_with_unequal_halves():
    q, k, v = make_qkv(1, 2, 9, 32, torch.float32)
    sin, cos = dinov3_rope(9, 32)
    sin = sin.clone()
    sin[:, 20] += 0.5  # not a rotation of the pair (4, 20) any more
    with pytest.raises(ValueError, match="two halves of rope sin differ"):
        attention(q, k, v, rope=(sin, cos), backend="triton")
    assert torch.isfinite(attention(q, k, v, rope=(sin, cos), backend="sdpa")).all()


# ---------------------------------------------------------------------------------------
# Custom op and torch.compile
# ---------------------------------------------------------------------------------------
def test_triton_custom_op_passes_opcheck():
    q, k, v = make_qkv(1, 2, 9, 32, torch.float32, DEVICE, contiguous=True)
    sin, cos = (t[None].contiguous() for t in dinov3_rope(7, 32, device=DEVICE))
    torch.library.opcheck(torch.ops.m2dino.rope_flash_attention.default, (q, k, v, sin, cos, 2),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 2, 13, 32, torch.float32, DEVICE)
    rope = dinov3_rope(13 - PREFIX, 32, device=DEVICE)

    def step(q, k, v):
        return attention(q, k, v, rope=rope, num_prefix_tokens=PREFIX, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    got.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = step(q, k, v)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    for g, t in zip(grads, (q, k, v)):
        assert torch.allclose(g, t.grad, atol=1e-5)


# ---------------------------------------------------------------------------------------
# GPU (run with a CUDA device: `pytest tests/kernels/test_attention.py -m gpu`)
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@TRITON_ON_CUDA
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("n,prefix", [(201, PREFIX), (1029, PREFIX), (197, 0)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_triton_low_precision_matches_reference(dtype, n, prefix, head_dim):
    q, k, v = make_qkv(4, 6, n, head_dim, dtype, "cuda")
    rope = dinov3_rope(n - prefix, head_dim, batch=4, device="cuda")
    # Low precision: the error allowed is a few times that of PyTorch's own SDPA kernels.
    grad = torch.randn_like(q)
    want = forward_backward(q, k, v, grad, rope=rope, num_prefix_tokens=prefix,
                            backend="reference")
    sdpa = forward_backward(q, k, v, grad, rope=rope, num_prefix_tokens=prefix, backend="sdpa")
    ours = forward_backward(q, k, v, grad, rope=rope, num_prefix_tokens=prefix,
                            backend="triton")
    for name, o, s, w in zip(("out", "dq", "dk", "dv"), ours, sdpa, want):
        err = (o.float() - w.float()).abs().max().item()
        sdpa_err = (s.float() - w.float()).abs().max().item()
        scale = w.float().abs().max().item()
        slack = (1e-2 if dtype == torch.bfloat16 else 2e-3) * scale  # ~ the dtype's epsilon
        assert err <= 3 * sdpa_err + slack, (
            f"{name}: triton error {err:.3g}, sdpa error {sdpa_err:.3g}, scale {scale:.3g}")


@pytest.mark.gpu
@TRITON_ON_CUDA
@pytest.mark.parametrize("n", [1, 5, 70, 201])
def test_gpu_triton_fp32_matches_reference(n):
    prefix = min(PREFIX, n)
    q, k, v = make_qkv(2, 3, n, 64, torch.float32, "cuda")
    rope = dinov3_rope(n - prefix, 64, device="cuda")
    assert_matches_reference(q, k, v, rope, prefix, "triton", atol=1e-4)
