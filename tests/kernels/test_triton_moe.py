"""Backend "triton" (m2dino_kernels.triton.moe) against the independent loop oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), so shapes stay
small. The oracle (tests/kernels/conftest.py) is written another way than the kernels: a
Python top-k per token, a loop over experts with boolean masks and index_add (no sorting),
differentiated by autograd in fp32. Every protocol output of the four backend functions is
checked, and every gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from m2dino_kernels import registry  # noqa: E402
from m2dino_kernels.backends import ExpertWeights, Routing  # noqa: E402
from m2dino_kernels.contract import moe_problem  # noqa: E402
from m2dino_kernels.triton import moe as triton_moe  # noqa: E402
from m2dino_kernels.triton import routing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the GPU tests: where triton runs on CUDA and is not left out (M2DINO_KERNELS_EXCLUDE)
ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available()
                             or "triton" not in registry.available_backends("cuda"),
                             reason="needs triton on a CUDA device")
ORACLE_INPUTS = ("x", "gate_weight", "gate_bias", "fc1_weight", "fc1_bias", "fc2_weight",
                 "fc2_bias")


def triton_problem(T, D, H, E, NT, k, activation, dtype, *, device=DEVICE, unused_task=None,
                 starved_expert=None, seed=0):
    """The factory's problem with `unused_task` carried by no token and `starved_expert`'s
    gate bias so low (-40) that no token routes to it (when k < E)."""
    pool = [n for n in range(NT) if n != unused_task]
    boost = None if starved_expert is None else [-40.0 * (e == starved_expert) for e in range(E)]
    return moe_problem(T, D, H, E, NT, k, activation, dtype=dtype, device=device,
                       task_pool=pool, bias_boost=boost, seed=seed)


def run_triton(p, grad_y, grad_logits, grad_probs):
    """Forward and backward through the four backend functions, as moe.py chains them."""
    routed = triton_moe.route_forward(*p.route_args())
    params = p.expert_weights()
    y, h_pre, expert_out = triton_moe.experts_forward(p.x, routed, params, p.activation)
    gx_e, grad_weights, (g1w, g1b, g2w, g2b) = triton_moe.experts_backward(
        grad_y, p.x, routed, params, p.activation, h_pre, expert_out)
    gx_r, ggw, ggb = triton_moe.route_backward(
        grad_logits, grad_probs, grad_weights, p.x, p.task_ids, p.gate_weight,
        p.gate_bias is not None, routed)
    fwd = dict(routed._asdict(), y=y, h_pre=h_pre, expert_out=expert_out)
    grads = dict(x=gx_e.float() + gx_r.float(), gate_weight=ggw, gate_bias=ggb, fc1_weight=g1w,
                 fc1_bias=g1b, fc2_weight=g2w, fc2_bias=g2b)
    return fwd, grads


def run_oracle(oracle, p, grad_y, grad_logits, grad_probs, experts):
    """Autograd through the oracle in fp32 with the kernel's expert choices (a near-tie that
    rounds differently on a GPU cannot change every downstream number; the selection itself
    is checked separately, `check_selection`)."""
    names = [n for n in ORACLE_INPUTS if getattr(p, n) is not None]
    leaves = {n: getattr(p, n).detach().float().clone().requires_grad_() for n in names}
    own = oracle(leaves, p.task_ids, p.top_k, p.activation)
    out = oracle(leaves, p.task_ids, p.top_k, p.activation, experts=experts)
    loss = (out.y * grad_y.float()).sum() + (out.logits * grad_logits).sum() \
        + (out.probs * grad_probs).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    fwd = dict(logits=out.logits.detach(), probs=out.probs.detach(),
               weights=out.weights.detach(), experts=own.experts, y=out.y.detach(),
               h_pre=out.h_pre.detach(), expert_out=out.expert_out.detach())
    return fwd, grads


def check_selection(experts, oracle_probs, oracle_experts, exact):
    """Top-k experts: identical to the oracle's (exact=True), or at least carrying the
    oracle's top-k probabilities in order up to fp32 rounding (GPU reduction order)."""
    experts, oracle_probs = experts.cpu(), oracle_probs.cpu()
    assert ((experts >= 0) & (experts < oracle_probs.shape[1])).all()
    for row in experts:
        assert len(set(row.tolist())) == len(row), f"an expert is chosen twice: {row.tolist()}"
    if exact:
        assert torch.equal(experts, oracle_experts.cpu()), "top-k experts differ"
    else:
        got = oracle_probs.gather(1, experts)
        want = oracle_probs.gather(1, oracle_experts.cpu())
        assert (got - want).abs().max().item() <= 1e-5, "top-k experts differ beyond a tie"


def assert_close(name, got, want, dtype):
    got, want = got.float().cpu(), want.float().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    tol = {torch.float32: 2e-5, torch.float16: 1.5e-2, torch.bfloat16: 4e-2}[dtype]
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1.0), f"{name}: max abs err {err:.3g} (scale {scale:.3g})"


def check_against_oracle(oracle, p, dtype):
    T, D = p.x.shape
    E = p.gate_weight.shape[1]
    dev = p.x.device
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(T, D, generator=g).to(device=dev, dtype=dtype)
    grad_logits = torch.randn(T, E, generator=g).to(dev) * 0.1
    grad_probs = torch.randn(T, E, generator=g).to(dev)
    fwd, grads = run_triton(p, grad_y, grad_logits, grad_probs)
    ofwd, ograds = run_oracle(oracle, p, grad_y, grad_logits, grad_probs, fwd["experts"])

    k = p.top_k
    assert fwd["experts"].dtype == torch.int64 and fwd["weights"].dtype == torch.float32
    check_selection(fwd["experts"], ofwd["probs"], ofwd["experts"], exact=dev.type == "cpu")
    for name in ("logits", "probs", "weights"):
        assert fwd[name].dtype == torch.float32, name
        assert_close(name, fwd[name], ofwd[name], torch.float32 if dtype != torch.float16
                     else torch.float16)
    assert fwd["y"].dtype == dtype
    assert_close("y", fwd["y"], ofwd["y"], dtype)

    # The permutation: slots stably sorted by expert, offsets and counts.
    flat = fwd["experts"].reshape(-1).cpu()
    want_slots = torch.sort(flat, stable=True).indices
    assert torch.equal(fwd["sorted_slots"].cpu(), want_slots)
    want_counts = torch.bincount(flat, minlength=E)
    assert torch.equal(fwd["counts"].cpu(), want_counts)
    assert torch.equal(fwd["offsets"].cpu(), F.pad(want_counts.cumsum(0), (1, 0)))
    assert fwd["h_pre"].shape == (T * k, p.fc1_weight.shape[1])
    assert fwd["expert_out"].shape == (T * k, D)
    assert fwd["h_pre"].dtype == fwd["expert_out"].dtype == dtype

    # h_pre and expert_out rows in sorted-slot order, unweighted (the protocol)
    slots = fwd["sorted_slots"]
    assert_close("h_pre", fwd["h_pre"], ofwd["h_pre"][slots], dtype)
    assert_close("expert_out", fwd["expert_out"], ofwd["expert_out"][slots], dtype)

    for name in ograds:
        assert grads[name].dtype == (torch.float32 if name == "x" else getattr(p, name).dtype), name
        assert_close(f"grad {name}", grads[name], ograds[name], dtype)
    return fwd, grads


# ---------------------------------------------------------------------------------------
# Interpreter (CPU) / any device: small shapes covering the edge cases
# ---------------------------------------------------------------------------------------
CASES = [
    # T, D, H, E, k, NT, activation, dtype, extra (triton_problem's options)
    (1, 16, 32, 1, 1, 1, "gelu", torch.float32, {}),
    (7, 24, 40, 3, 2, 4, "swiglu", torch.float32, {"unused_task": 2}),
    (33, 16, 32, 4, 4, 2, "gelu", torch.float32, {}),
    (33, 24, 40, 4, 2, 3, "swiglu", torch.float32, {"starved_expert": 3, "unused_task": 0}),
    (33, 24, 32, 4, 1, 27, "gelu", torch.float32, {"starved_expert": 0}),
    (33, 24, 40, 4, 2, 3, "gelu", torch.float16, {"starved_expert": 1}),
    (7, 16, 32, 3, 3, 2, "swiglu", torch.float16, {}),
    (33, 16, 40, 3, 1, 2, "swiglu", torch.float16, {"unused_task": 1}),
    (1, 24, 40, 3, 2, 3, "swiglu", torch.float16, {}),
    (7, 24, 32, 1, 1, 2, "swiglu", torch.float32, {}),
    # bf16: on CPU the kernels upcast their dots (the interpreter's bf16 dot is wrong).
    (33, 24, 40, 4, 2, 3, "gelu", torch.bfloat16, {"starved_expert": 0}),
    (7, 16, 32, 3, 3, 2, "swiglu", torch.bfloat16, {"unused_task": 1}),
]


@pytest.mark.parametrize("T,D,H,E,k,NT,activation,dtype,extra", CASES,
                         ids=[f"T{c[0]}-D{c[1]}-H{c[2]}-E{c[3]}-k{c[4]}-NT{c[5]}-{c[6]}-"
                              f"{str(c[7])[6:]}" + "".join(f"-{n}" for n in c[8])
                              for c in CASES])
def test_forward_and_gradients_match_oracle(T, D, H, E, k, NT, activation, dtype, extra,
                                           loop_oracle):
    p = triton_problem(T, D, H, E, NT, k, activation, dtype, **extra)
    fwd, grads = check_against_oracle(loop_oracle, p, dtype)
    if "starved_expert" in extra:
        e = extra["starved_expert"]
        assert fwd["counts"][e].item() == 0, "the test meant this expert to get no token"
        assert grads["fc1_weight"][e].abs().max().item() == 0.0
        assert grads["fc2_bias"][e].abs().max().item() == 0.0
    if "unused_task" in extra:
        n = extra["unused_task"]
        assert grads["gate_weight"][n].abs().max().item() == 0.0
        assert grads["gate_bias"][n].abs().max().item() == 0.0


def test_all_tokens_on_one_expert_and_no_gate_bias(loop_oracle):
    p = triton_problem(7, 16, 32, 4, 2, 1, "gelu", torch.float32)
    p.gate_weight = p.gate_weight * 0.01
    p.gate_weight[:, 2] += 1.0 / 16  # expert 2 wins every token (x . 1/16 is small)
    p.x = p.x.abs() + 1.0
    p.gate_bias = None
    fwd, grads = check_against_oracle(loop_oracle, p, torch.float32)
    assert fwd["counts"].tolist() == [0, 0, 7, 0]
    assert grads["gate_bias"] is None


def test_triton_subpackage_does_not_shadow_the_library():
    """m2dino_kernels.triton holds our kernels; `import triton` in it is the library."""
    import m2dino_kernels.triton as ours
    from m2dino_kernels.triton import attention, grouped_gemm

    assert ours.__name__ == "m2dino_kernels.triton" and triton is not ours
    assert hasattr(triton, "jit") and "m2dino_kernels" not in triton.__file__
    for module in (routing, grouped_gemm, attention):
        assert module.triton is triton and module.tl is triton.language


@pytest.mark.parametrize("n,num_keys", [(0, 3), (1, 1), (1000, 5), (257, 27)])
def test_stable_counting_sort(n, num_keys):
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(0, num_keys, (n,), generator=g)
    if num_keys > 2:
        keys[keys == 1] = 0  # a key with no item
    keys = keys.to(DEVICE)
    order, offsets = routing.stable_sort_by_key(keys, num_keys)
    assert torch.equal(order.cpu(), torch.sort(keys.cpu(), stable=True).indices)
    counts = torch.bincount(keys.cpu(), minlength=num_keys)
    assert torch.equal(offsets.cpu(), F.pad(counts.cumsum(0), (1, 0)))


def test_route_backward_kernel_specialises_absent_upstream_gradients():
    """The routing backward kernel's HAS_GRAD_* branches (None for an absent upstream
    gradient) give what zeros give. (That missing gradients count as zero through the public
    ops, for every backend, is the conformance suite's.)"""
    p = triton_problem(7, 16, 32, 3, 2, 2, "gelu", torch.float32)
    routed = triton_moe.route_forward(*p.route_args())
    grad_w = torch.randn(7, 2)
    zeros = torch.zeros(7, 3)
    with_zeros = triton_moe.route_backward(zeros, zeros, grad_w, p.x, p.task_ids,
                                           p.gate_weight, True, routed)
    with_none = triton_moe.route_backward(None, None, grad_w, p.x, p.task_ids,
                                          p.gate_weight, True, routed)
    for a, b in zip(with_zeros, with_none):
        assert torch.equal(a, b)
    assert with_zeros[0].abs().max() > 0


def test_unknown_activation_is_a_clear_error():
    p = triton_problem(7, 16, 32, 3, 2, 2, "gelu", torch.float32)
    routed = triton_moe.route_forward(*p.route_args())
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_moe.experts_forward(p.x, routed, p.expert_weights(), "relu")


def test_unsupported_dtypes_are_clear_errors():
    p = triton_problem(7, 16, 32, 3, 2, 2, "gelu", torch.float32)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        triton_moe.route_forward(p.x.double(), p.task_ids, p.gate_weight, p.gate_bias, 2)
    routed = triton_moe.route_forward(*p.route_args())
    params = p.expert_weights()._replace(fc2_weight=p.fc2_weight.double())
    with pytest.raises(TypeError, match="fc2_w has dtype torch.float64"):
        triton_moe.experts_forward(p.x, routed, params, "gelu")


# ---------------------------------------------------------------------------------------
# CUDA: real compiled kernels, larger shapes, bf16 too
# ---------------------------------------------------------------------------------------
GPU_CASES = [
    (512, 256, 512, 8, 2, 27, "gelu", torch.bfloat16),
    (512, 256, 512, 8, 2, 27, "swiglu", torch.float16),
    (300, 192, 384, 8, 2, 5, "gelu", torch.float32),
    (1000, 384, 1536, 8, 2, 27, "swiglu", torch.bfloat16),
    (64, 128, 256, 16, 16, 3, "gelu", torch.float16),
]


@pytest.mark.gpu
@ON_CUDA
@pytest.mark.parametrize("T,D,H,E,k,NT,activation,dtype", GPU_CASES)
def test_cuda_matches_oracle(T, D, H, E, k, NT, activation, dtype, loop_oracle):
    p = triton_problem(T, D, H, E, NT, k, activation, dtype, device="cuda", starved_expert=E - 1
                     if k < E else None)
    check_against_oracle(loop_oracle, p, dtype)


@pytest.mark.gpu
@ON_CUDA
def test_cuda_has_no_host_sync():
    p = triton_problem(256, 128, 256, 8, 27, 2, "gelu", torch.bfloat16, device="cuda")
    grad_y = torch.randn_like(p.x)
    zeros = torch.zeros(256, 8, device="cuda")
    run_triton(p, grad_y, zeros, zeros)  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_triton(p, grad_y, zeros, zeros)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_activation_math_over_a_wide_range():
    """The kernels' erf/exp GELU and SiLU (no libdevice) against torch for h in [-8, 8]:
    x = identity and fc2 = identity, so y = act(h_pre) and grad_x = act'(h) @ fc1_w."""
    n = 16
    x = torch.eye(n)
    fc1 = torch.linspace(-8, 8, 2 * n * n).reshape(1, 2 * n, n)
    # every token on expert 0 with weight 1 (only the fields the experts read matter)
    one_expert = Routing(logits=torch.zeros(n, 1), probs=torch.ones(n, 1), weights=torch.ones(n, 1),
                         experts=torch.zeros(n, 1, dtype=torch.int64),
                         counts=torch.tensor([n]), sorted_slots=torch.arange(n),
                         offsets=torch.tensor([0, n]), top_k=1)
    for activation, fc1_w in (("gelu", fc1[:, :n].contiguous()), ("swiglu", fc1)):
        fc1_b = torch.zeros(1, fc1_w.shape[1])
        fc2_w, fc2_b = torch.eye(n).reshape(1, n, n), torch.zeros(1, n)
        params = ExpertWeights(fc1_w, fc1_b, fc2_w, fc2_b)
        y, h_pre, expert_out = triton_moe.experts_forward(x, one_expert, params, activation)
        h = (x @ fc1_w[0].t()).requires_grad_()
        if activation == "gelu":
            act = F.gelu(h)
        else:
            a, b = h.chunk(2, dim=-1)
            act = F.silu(a) * b
        assert torch.allclose(h_pre, h.detach(), atol=1e-6)
        assert torch.allclose(y, act.detach(), atol=1e-5, rtol=1e-5)
        grad_h = torch.autograd.grad(act.sum(), h)[0]
        grad_x, _, _ = triton_moe.experts_backward(torch.ones(n, n), x, one_expert, params,
                                                   activation, h_pre, expert_out)
        assert torch.allclose(grad_x, grad_h @ fc1_w[0], atol=1e-4, rtol=1e-5)
