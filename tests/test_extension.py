"""The C++ extension m2dino_kernels._C on CPU (backend "cpp") and the library floor
"grouped_mm" (torch.nn.functional.grouped_mm) at the protocol level: every protocol function
against the torch reference (m2dino_kernels.reference) at edge-case shapes, in fp32 and in
bf16/fp16, the empty batch and the public API with a frozen input and checkpointing; for the
extension also a float64 gradcheck of the whole routing + expert chain and the TORCH_CHECKs
that turn misuse into a RuntimeError instead of a crash."""
from __future__ import annotations

import pytest
import torch

from m2dino_kernels import backends
from m2dino_kernels import reference as ref
from moe_inputs import random_moe_inputs

_C = backends._C
NEEDS_C = pytest.mark.skipif(_C is None, reason="m2dino_kernels._C is not built")
if _C is not None:
    from m2dino_kernels import extension as ext
# the backends held to the reference protocol function by protocol here
PROTOCOL_BACKENDS = [pytest.param("cpp", marks=NEEDS_C),
                     pytest.param("grouped_mm", marks=pytest.mark.skipif(
                         "grouped_mm" not in backends.available_backends("cpu"),
                         reason="this torch's grouped_mm does not run on CPU"))]

ROUTE_NAMES = ("logits", "probs", "weights", "experts", "counts", "sorted_slots", "offsets")
EXPERT_GRAD_NAMES = ("grad_x", "grad_weights", "grad_fc1_w", "grad_fc1_b", "grad_fc2_w",
                     "grad_fc2_b")

# (T, D, H, E, NT, k, gate bias boost per expert or None, task pool or None)
CASES = {
    "single_token": (1, 8, 6, 4, 3, 2, None, None),
    "odd_dims": (13, 7, 5, 3, 2, 2, None, None),
    "one_expert": (6, 8, 6, 1, 2, 1, None, None),
    "k1": (10, 8, 6, 4, 3, 1, None, None),
    "k_equals_E": (7, 6, 5, 3, 2, 3, None, None),
    "idle_experts": (12, 8, 6, 6, 2, 2, [0, 0, 0, -30, -30, -30], None),
    "idle_tasks": (11, 8, 6, 4, 5, 2, None, [0, 2]),
    "all_on_one_expert": (10, 8, 6, 4, 3, 1, [0, 0, 30, 0], None),
    "27_tasks": (60, 9, 7, 8, 27, 2, None, None),
    "many_chunks": (300, 40, 24, 8, 27, 2, None, None),  # several parallel chunks
}


def case_inputs(name, activation="gelu", dtype=torch.float32):
    T, D, H, E, NT, k, boost, pool = CASES[name]
    return random_moe_inputs(T, D, H, E, NT, boost, pool, activation, dtype), k


def expert_args(p, route, activation):
    _, _, weights, experts, _, sorted_slots, offsets = route
    return (p["x"], weights, experts, sorted_slots, offsets, p["fc1_w"], p["fc1_b"], p["fc2_w"],
            p["fc2_b"], activation)


def random_like(tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in tensors]


# ---------------------------------------------------------------------------------------
# Every protocol function against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PROTOCOL_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(CASES))
def test_protocol_matches_reference(case, activation, backend):
    impl = backends.backend_module(backend)
    p, k = case_inputs(case, activation)
    route_args = (p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], k)
    got_route = impl.route_forward(*route_args)
    want_route = ref.route_forward(*route_args)
    for name, got, want in zip(ROUTE_NAMES, got_route, want_route):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == torch.int64:
            assert torch.equal(got, want), f"{case}: {name} differs"
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    if case == "idle_experts":
        assert (got_route[4][3:] == 0).all()
    if case == "all_on_one_expert":
        assert got_route[4].tolist() == [0, 0, p["x"].shape[0], 0]

    # routing backward with random upstream gradients (same routing on both sides)
    logits, probs, weights, experts = got_route[:4]
    grads = random_like([logits, probs, weights], seed=1)
    back_args = (*grads, p["x"], p["task_ids"], p["gate_weight"], True, probs, weights, experts)
    for got, want in zip(impl.route_backward(*back_args), ref.route_backward(*back_args)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    no_bias = impl.route_backward(*back_args[:6], False, *back_args[7:])
    assert no_bias[2] is None

    args = expert_args(p, got_route, activation)
    got_fwd = impl.experts_forward(*args)
    want_fwd = ref.experts_forward(*args)
    for name, got, want in zip(("y", "h_pre", "expert_out"), got_fwd, want_fwd):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    (grad_y,) = random_like([got_fwd[0]], seed=2)
    got_bwd = impl.experts_backward(grad_y, *args, *got_fwd[1:])
    want_bwd = ref.experts_backward(grad_y, *args, *want_fwd[1:])
    for name, got, want in zip(EXPERT_GRAD_NAMES, got_bwd, want_bwd):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@NEEDS_C
def test_sorted_slots_are_a_stable_sort_and_ties_go_low():
    # identical router rows for experts 1 and 3 of every task: all probabilities tie pairwise
    p = random_moe_inputs(50, 6, 4, 5, 3)
    p["gate_weight"][:, 3] = p["gate_weight"][:, 1]
    p["gate_bias"][:, 3] = p["gate_bias"][:, 1]
    out = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], 2)
    experts, sorted_slots, offsets = out[3], out[5], out[6]
    tied = (experts == 1).any(dim=1) & (experts == 3).any(dim=1)
    for t in tied.nonzero().flatten().tolist():  # both picked: 1 must come first
        assert experts[t].tolist().index(1) < experts[t].tolist().index(3)
    only_one = (experts == 1).any(dim=1) ^ (experts == 3).any(dim=1)
    assert tied.any() and only_one.any()
    assert not (experts[only_one] == 3).any(), "a tie went to the higher expert index"
    flat = experts.reshape(-1)
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(offsets[1:], torch.cumsum(torch.bincount(flat, minlength=5), 0))


@pytest.mark.parametrize("backend", PROTOCOL_BACKENDS)
def test_empty_batch(backend):
    ext = backends.backend_module(backend)
    p = random_moe_inputs(0, 6, 5, 3, 2)
    route = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], 2)
    assert route[6].tolist() == [0, 0, 0, 0] and route[5].numel() == 0
    y, h_pre, expert_out = ext.experts_forward(*expert_args(p, route, "gelu"))
    assert y.shape == (0, 6) and h_pre.shape == (0, 5) and expert_out.shape == (0, 6)
    grads = ext.experts_backward(torch.zeros(0, 6), *expert_args(p, route, "gelu"), h_pre,
                                 expert_out)
    assert (grads[2] == 0).all() and (grads[5] == 0).all()


@NEEDS_C
def test_nan_propagates_and_experts_stay_in_range():
    p = random_moe_inputs(8, 6, 5, 4, 2)
    p["x"][3, 2] = float("nan")
    route = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], 2)
    experts = route[3]
    assert ((experts >= 0) & (experts < 4)).all() and (experts[:, 0] != experts[:, 1]).all()
    assert torch.isnan(route[1][3]).all() and route[6][-1] == 16
    y = ext.experts_forward(*expert_args(p, route, "gelu"))[0]
    assert torch.isnan(y[3]).all() and torch.isfinite(y[torch.arange(8) != 3]).all()


# ---------------------------------------------------------------------------------------
# float64 gradcheck through the extension
# ---------------------------------------------------------------------------------------
class _CppMoE(torch.autograd.Function):
    """Routing + expert MLP through the extension's forward and backward functions."""

    @staticmethod
    def forward(ctx, x, gate_weight, gate_bias, fc1_w, fc1_b, fc2_w, fc2_b, task_ids, k,
                activation):
        logits, probs, weights, experts, _, sorted_slots, offsets = ext.route_forward(
            x, task_ids, gate_weight, gate_bias, k)
        y, h_pre, expert_out = ext.experts_forward(x, weights, experts, sorted_slots, offsets,
                                                   fc1_w, fc1_b, fc2_w, fc2_b, activation)
        ctx.save_for_backward(x, gate_weight, fc1_w, fc1_b, fc2_w, fc2_b, task_ids, probs,
                              weights, experts, sorted_slots, offsets, h_pre, expert_out)
        ctx.activation = activation
        return y, logits, probs, weights

    @staticmethod
    def backward(ctx, grad_y, grad_logits, grad_probs, grad_weights):
        (x, gate_weight, fc1_w, fc1_b, fc2_w, fc2_b, task_ids, probs, weights, experts,
         sorted_slots, offsets, h_pre, expert_out) = ctx.saved_tensors
        gx, gw_route, g1w, g1b, g2w, g2b = ext.experts_backward(
            grad_y.contiguous(), x, weights, experts, sorted_slots, offsets, fc1_w, fc1_b,
            fc2_w, fc2_b, ctx.activation, h_pre, expert_out)
        rx, rgw, rgb = ext.route_backward(grad_logits.contiguous(), grad_probs.contiguous(),
                                          (grad_weights + gw_route).contiguous(), x, task_ids,
                                          gate_weight, True, probs, weights, experts)
        return gx + rx, rgw, rgb, g1w, g1b, g2w, g2b, None, None, None


@NEEDS_C
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gradcheck_float64(activation):
    p = random_moe_inputs(7, 5, 3, 4, 3, activation=activation, dtype=torch.float64)
    names = ("x", "gate_weight", "gate_bias", "fc1_w", "fc1_b", "fc2_w", "fc2_b")
    inputs = tuple(p[n].clone().requires_grad_(True) for n in names)

    def fn(*tensors):
        return _CppMoE.apply(*tensors, p["task_ids"], 2, activation)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Half precision (fp32 accumulation)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PROTOCOL_BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp32_reference(dtype, activation, backend):
    ext = backends.backend_module(backend)
    p, k = case_inputs("many_chunks", activation, dtype=dtype)
    p32 = {n: (t.float() if t.is_floating_point() else t) for n, t in p.items()}
    route = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], k)
    route32 = ref.route_forward(p32["x"], p32["task_ids"], p32["gate_weight"], p32["gate_bias"], k)
    assert all(t.dtype == torch.float32 for t in route[:3])
    assert torch.equal(route[3], route32[3])  # same inputs upcast exactly: same choices
    torch.testing.assert_close(route[1], route32[1], atol=1e-5, rtol=1e-4)
    args = expert_args(p, route, activation)
    args32 = expert_args(p32, route32, activation)
    fwd = ext.experts_forward(*args)
    fwd32 = ref.experts_forward(*args32)
    assert all(t.dtype == dtype for t in fwd)
    torch.testing.assert_close(fwd[0].float(), fwd32[0], atol=3e-2, rtol=3e-2)
    (grad_y,) = random_like([fwd[0]], seed=3)
    bwd = ext.experts_backward(grad_y, *args, *fwd[1:])
    bwd32 = ref.experts_backward(grad_y.float(), *args32, *fwd32[1:])
    for name, got, want in zip(EXPERT_GRAD_NAMES, bwd, bwd32):
        assert got.dtype == (torch.float32 if name == "grad_weights" else dtype), name
        scale = want.abs().max().item() + 1e-6
        err = (got.float() - want).abs().max().item() / scale
        assert err < 3e-2, f"{name}: max error {err:.3g} of the gradient's scale"


# ---------------------------------------------------------------------------------------
# Misuse raises RuntimeError (never a crash)
# ---------------------------------------------------------------------------------------
def _route_args(**override):
    p = random_moe_inputs(6, 4, 3, 3, 2)
    args = dict(x=p["x"], task_ids=p["task_ids"], gate_weight=p["gate_weight"],
                gate_bias=p["gate_bias"], top_k=2)
    args.update(override)
    return args


ROUTE_MISUSE = [
    (dict(x=torch.randn(6, 5)), "gate_weight must have shape"),
    (dict(x=torch.randn(6, 4, dtype=torch.float64)), "gate_weight must be"),
    (dict(x=torch.randn(6, 8)[:, ::2]), "x must be contiguous"),
    (dict(x=torch.randn(6)), "x must be 2-D"),
    (dict(task_ids=torch.tensor([0, 1, 0, 2, 1, 0])), r"task_ids\[3\] = 2 is out of range"),
    (dict(task_ids=torch.tensor([0, 1, 0, -1, 1, 0])), r"task_ids\[3\] = -1 is out of range"),
    (dict(task_ids=torch.zeros(6, dtype=torch.int32)), "task_ids must be Long"),
    (dict(task_ids=torch.zeros(5, dtype=torch.int64)), "task_ids must have shape"),
    (dict(gate_bias=torch.zeros(2, 4)), "gate_bias must have shape"),
    (dict(top_k=4), r"top_k must be in \[1, E\]"),
    (dict(top_k=0), r"top_k must be in \[1, E\]"),
    (dict(x=torch.randn(6, 4, device="meta")), "is on cpu but x is on meta|no kernels for meta"),
]


@NEEDS_C
@pytest.mark.parametrize("override,message", ROUTE_MISUSE)
def test_route_forward_misuse_raises(override, message):
    args = _route_args(**override)
    with pytest.raises(RuntimeError, match=message):
        _C.route_forward(**args)


def _expert_args(activation="gelu", **override):
    p = random_moe_inputs(6, 4, 3, 3, 2, activation=activation)
    route = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], 2)
    names = ("x", "weights", "experts", "sorted_slots", "offsets", "fc1_w", "fc1_b", "fc2_w",
             "fc2_b", "activation")
    args = dict(zip(names, expert_args(p, route, activation)))
    args.update(override)
    return args


EXPERT_MISUSE = [
    (dict(activation="relu"), "activation must be 'gelu' or 'swiglu'"),
    (dict(sorted_slots=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])), "not a permutation"),
    (dict(sorted_slots=torch.arange(12) + 100), r"sorted_slots\[0\] = 100 is out of range"),
    (dict(sorted_slots=torch.arange(11)), "sorted_slots must have shape"),
    (dict(offsets=torch.tensor([0, 7, 3, 12])), "offsets must be non-decreasing"),
    (dict(offsets=torch.tensor([0, 4, 8, 13])), "offsets must start at 0 and end at T\\*k = 12"),
    (dict(weights=torch.rand(6, 2, dtype=torch.float64)), "weights must be Float"),
    (dict(experts=torch.zeros(6, 2, dtype=torch.int32)), "experts must be Long"),
    (dict(fc1_w=torch.randn(3, 3, 5)), "fc1_w must have shape"),
    (dict(fc2_w=torch.randn(3, 4, 4)), "fc2_w must have shape"),
    (dict(fc2_b=torch.randn(3, 4, dtype=torch.bfloat16)), "fc2_b must be|expert weights must have x's dtype"),
    (dict(fc1_b=torch.randn(3, 8)[:, ::2].T.contiguous().T), "fc1_b must have shape|fc1_b must be contiguous"),
]


@NEEDS_C
@pytest.mark.parametrize("override,message", EXPERT_MISUSE)
def test_experts_misuse_raises(override, message):
    args = _expert_args(**override)
    with pytest.raises(RuntimeError, match=message):
        _C.experts_forward(**args)


@NEEDS_C
def test_swiglu_needs_even_hidden():
    args = _expert_args()
    args["activation"] = "swiglu"  # fc1_w has H1 = 3 rows: odd
    with pytest.raises(RuntimeError, match="swiglu needs an even fc1 output size"):
        _C.experts_forward(**args)


@NEEDS_C
def test_backward_misuse_raises():
    args = _expert_args()
    y, h_pre, expert_out = _C.experts_forward(**args)
    with pytest.raises(RuntimeError, match="h_pre must have shape"):
        _C.experts_backward(torch.ones_like(y), *args.values(), h_pre[:-1].contiguous(), expert_out)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        _C.experts_backward(torch.ones(5, 4), *args.values(), h_pre, expert_out)
    p = random_moe_inputs(6, 4, 3, 3, 2)
    route = ext.route_forward(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], 2)
    logits, probs, weights, experts = route[:4]
    bad_experts = experts.clone()
    bad_experts[2, 1] = 7
    with pytest.raises(RuntimeError, match=r"experts.view\(-1\)\[5\] = 7 is out of range"):
        _C.route_backward(torch.zeros_like(logits), torch.zeros_like(probs),
                          torch.zeros_like(weights), p["x"], p["task_ids"], p["gate_weight"],
                          True, probs, weights, bad_experts)
    with pytest.raises(RuntimeError, match="grad_probs must have shape"):
        _C.route_backward(torch.zeros_like(logits), torch.zeros(6, 2), torch.zeros_like(weights),
                          p["x"], p["task_ids"], p["gate_weight"], True, probs, weights, experts)


# ---------------------------------------------------------------------------------------
# Through the public API: frozen inputs, activation checkpointing, no_grad
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PROTOCOL_BACKENDS)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_public_api_frozen_input_and_checkpointing(checkpointed, backend):
    """x needing no grad while the experts do (a frozen backbone), and non-reentrant
    activation checkpointing (Python saved-tensor hooks active while the kernels run their
    worker threads: this once deadlocked), both equal to the torch backend."""
    import m2dino_kernels as mk
    from torch.utils.checkpoint import checkpoint

    p = random_moe_inputs(40, 16, 12, 4, 3)
    results = {}
    for name in ("torch", backend):
        experts = {n: p[n].clone().requires_grad_(True) for n in ("fc1_w", "fc1_b", "fc2_w", "fc2_b")}
        x = p["x"].clone().requires_grad_(checkpointed)

        def block(x):
            r = mk.task_topk_route(x, p["task_ids"], p["gate_weight"], p["gate_bias"], top_k=2)
            return mk.expert_mlp(x, r, experts["fc1_w"], experts["fc1_b"], experts["fc2_w"],
                                 experts["fc2_b"])

        with mk.use_backend(name):
            y = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            y.square().sum().backward()
            with torch.no_grad():
                torch.testing.assert_close(block(x), y.detach())
        results[name] = (y.detach(), {n: t.grad for n, t in experts.items()}, x.grad)
    (y_c, g_c, gx_c), (y_t, g_t, gx_t) = results[backend], results["torch"]
    torch.testing.assert_close(y_c, y_t, atol=1e-5, rtol=1e-5)
    for name in g_t:
        torch.testing.assert_close(g_c[name], g_t[name], atol=1e-4, rtol=1e-4)
    if checkpointed:
        torch.testing.assert_close(gx_c, gx_t, atol=1e-4, rtol=1e-4)
