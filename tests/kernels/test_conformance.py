"""The backend conformance suite: every MoE kernel backend held to the same contract.

Each backend is one parameter of BACKENDS per device it may run on (CPU; CUDA, skipped
without a GPU; a backend that cannot run on a device here is skipped there). Held against
the reference backend: the public ops forward and every gradient at edge-case shapes (one
token, one expert, k = E, idle experts, tasks with no tokens, every token on one expert, 27
tasks), the four protocol functions themselves (Routing fields exactly, saved activations,
gradients), ties to the lower expert, the NaN policy, the empty batch, half precision,
non-contiguous inputs, autocast, the torch.library registration (opcheck), a float64
gradcheck where the backend takes float64 (its refusal where it does not), and every misuse
of the public API raising a clear error before a kernel runs. A new backend is one entry in
m2dino_kernels.backends' registry, and so one more parameter here.
"""
from __future__ import annotations

import pytest
import torch
from moe_inputs import (
    CASES,
    GRAD_NAMES,
    assert_close_all,
    case_problem,
    forward_backward,
    make_problem,
    random_moe_inputs,
    run_api,
)

import m2dino_kernels as mk
from m2dino_kernels import backends, selection
from m2dino_kernels import reference as ref
from m2dino_kernels.backends import ExpertWeights, Routing

HAS_CUDA = torch.cuda.is_available()


def _runs(name: str, device: str) -> bool:
    if device == "cuda" and not HAS_CUDA:
        return False
    return name in selection.available_backends(device)


def _param(name: str, device: str):
    marks = [pytest.mark.skipif(not _runs(name, device),
                                reason=f"backend {name!r} cannot run on {device} here")]
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(name, device, marks=marks, id=f"{name}-{device}")


# every concrete backend on every device it may run on (the GPU ones skipped without a GPU)
BACKENDS = [_param(name, device) for device in ("cpu", "cuda")
            for name in backends.CONCRETE_BACKENDS]
CPU_BACKENDS = [_param(name, "cpu") for name in backends.CONCRETE_BACKENDS]
ACTIVATIONS = ["gelu", "swiglu"]


def on(device, params):
    return {n: t.to(device) for n, t in params.items()}


def interpreter_bf16(backend: str, device: str) -> bool:
    """The Triton interpreter's bf16 dot is wrong: bf16 triton is checked on GPU only."""
    return backend == "triton" and device == "cpu"


# ---------------------------------------------------------------------------------------
# The public ops against the reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_public_ops_match_reference(backend, device, case, activation):
    params, task_ids, k = case_problem(case, activation)
    params, task_ids = on(device, params), task_ids.to(device)
    with mk.use_backend(backend):
        got, got_grads = forward_backward(run_api, params, task_ids, k, activation)
    with mk.use_backend("reference"):
        want, want_grads = forward_backward(run_api, params, task_ids, k, activation)
    assert_close_all(got, want, 1e-5, 1e-4, f"{backend} {case}/{activation}")
    assert_close_all(got_grads, want_grads, 1e-4, 1e-4, f"{backend} grads {case}/{activation}")


# ---------------------------------------------------------------------------------------
# The four protocol functions against the reference's
# ---------------------------------------------------------------------------------------
def _random_like(tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            for t in tensors]


def _protocol_inputs(p):
    return ExpertWeights(p["fc1_w"], p["fc1_b"], p["fc2_w"], p["fc2_b"])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", ["odd_dims", "idle_experts", "idle_tasks", "all_on_one_expert",
                                  "27_tasks"])
def test_protocol_functions_match_reference(backend, device, case, activation):
    impl = backends.backend_module(backend)
    T, D, H, E, NT, k, extra = CASES[case]
    p = on(device, random_moe_inputs(T, D, H, E, NT, extra.get("bias_boost"),
                                     extra.get("task_pool"), activation))
    route_args = (p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], k)
    got_route = impl.route_forward(*route_args)
    want_route = ref.route_forward(*route_args)
    assert isinstance(got_route, Routing) and got_route.top_k == k
    for name in Routing._fields[:-1]:
        got, want = getattr(got_route, name), getattr(want_route, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == torch.int64:
            assert torch.equal(got, want), f"{case}: {name} differs"
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    if case == "idle_experts":
        assert (got_route.counts[3:] == 0).all()
    if case == "all_on_one_expert":
        assert got_route.counts.tolist() == [0, 0, T, 0]

    # routing backward with random upstream gradients (the same routing on both sides)
    grads = _random_like([got_route.logits, got_route.probs, got_route.weights], seed=1)
    back = (*grads, p["x"], p["task_ids"], p["gate_weight"])
    for got, want in zip(impl.route_backward(*back, True, got_route),
                         ref.route_backward(*back, True, got_route)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert impl.route_backward(*back, False, got_route)[2] is None

    weights = _protocol_inputs(p)
    got_fwd = impl.experts_forward(p["x"], got_route, weights, activation)
    want_fwd = ref.experts_forward(p["x"], got_route, weights, activation)
    for name, got, want in zip(("y", "h_pre", "expert_out"), got_fwd, want_fwd):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    (grad_y,) = _random_like([got_fwd[0]], seed=2)
    got_x, got_rw, got_w = impl.experts_backward(grad_y, p["x"], got_route, weights, activation,
                                                 *got_fwd[1:])
    want_x, want_rw, want_w = ref.experts_backward(grad_y, p["x"], got_route, weights,
                                                   activation, *want_fwd[1:])
    assert isinstance(got_w, ExpertWeights)
    for name, got, want in [("grad_x", got_x, want_x), ("grad_weights", got_rw, want_rw),
                            *zip(ExpertWeights._fields, got_w, want_w)]:
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_missing_upstream_gradients_count_as_zero(backend, device):
    """Only y (or only the routing weights) reaching the loss: the other gradients are zeros
    the op makes, equal to the reference's."""
    params, task_ids = make_problem(9, 8, 6, 4, 3, 2)
    params, task_ids = on(device, params), task_ids.to(device)
    results = {}
    for name in ("reference", backend):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        with mk.use_backend(name):
            y, _, _, weights, _, _ = run_api(leaves, task_ids, 2, "gelu")
            (y.square().sum() + weights[:, 0].sum()).backward()
        results[name] = {n: leaves[n].grad for n in GRAD_NAMES}
    assert_close_all(results[backend], results["reference"], 1e-4, 1e-4, backend)


# ---------------------------------------------------------------------------------------
# Ties, NaN, the empty batch
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_go_to_the_lower_expert(backend, device):
    # zero gate: every expert has probability 1/E, so the top-k must be experts 0..k-1
    x = torch.randn(5, 4, device=device)
    with mk.use_backend(backend):
        r = mk.task_topk_route(x, torch.tensor([0, 1, 0, 1, 1], device=device),
                               torch.zeros(2, 6, 4, device=device), None, top_k=3)
    assert r.experts.tolist() == [[0, 1, 2]] * 5
    torch.testing.assert_close(r.weights.cpu(), torch.full((5, 3), 1 / 3))
    # identical router rows for experts 1 and 3 of every task: they tie pairwise
    p = on(device, random_moe_inputs(50, 6, 4, 5, 3))
    p["gate_weight"][:, 3] = p["gate_weight"][:, 1]
    p["gate_bias"][:, 3] = p["gate_bias"][:, 1]
    with mk.use_backend(backend):
        r = mk.task_topk_route(p["x"], p["task_ids"], p["gate_weight"], p["gate_bias"], top_k=2)
    experts = r.experts.cpu()
    tied = (experts == 1).any(dim=1) & (experts == 3).any(dim=1)
    only_one = (experts == 1).any(dim=1) ^ (experts == 3).any(dim=1)
    assert tied.any() and only_one.any()
    for t in tied.nonzero().flatten().tolist():  # both picked: 1 must come first
        assert experts[t].tolist().index(1) < experts[t].tolist().index(3)
    assert not (experts[only_one] == 3).any(), "a tie went to the higher expert index"
    flat = experts.reshape(-1)
    assert torch.equal(r.sorted_slots.cpu(), torch.sort(flat, stable=True).indices)
    assert torch.equal(r.offsets.cpu()[1:], torch.cumsum(torch.bincount(flat, minlength=5), 0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_and_experts_stay_in_range(backend, device):
    params, task_ids = make_problem(8, 6, 5, 4, 2, 2)
    params["x"][3, 2] = float("nan")
    params["gate_weight"][task_ids[5], 1, 0] = float("inf")
    params, task_ids = on(device, params), task_ids.to(device)
    with mk.use_backend(backend):
        y, _, probs, _, experts, routing = run_api(params, task_ids, 2, "gelu")
    y, probs, experts, task_ids = y.cpu(), probs.cpu(), experts.cpu(), task_ids.cpu()
    assert ((experts >= 0) & (experts < 4)).all()
    assert routing.offsets[-1] == 16 and routing.counts.sum() == 16
    assert torch.isnan(probs[3]).all() and torch.isnan(y[3]).all()
    # the inf router row only touches tokens of its task; others stay finite
    clean = (task_ids != task_ids[5]) & (torch.arange(8) != 3)
    assert clean.any() and torch.isfinite(y[clean]).all(), "a bad token leaked into others"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    params, task_ids = make_problem(0, 6, 5, 3, 2, 2)
    params, task_ids = on(device, params), task_ids.to(device)
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    with mk.use_backend(backend):
        y, logits, _, _, _, routing = run_api(leaves, task_ids, 2, "gelu")
        (y.sum() + logits.sum()).backward()
    assert y.shape == (0, 6) and routing.offsets.tolist() == [0, 0, 0, 0]
    assert routing.sorted_slots.numel() == 0
    for name in GRAD_NAMES:
        grad = leaves[name].grad
        assert grad is not None and grad.shape == params[name].shape and (grad == 0).all(), name


# ---------------------------------------------------------------------------------------
# Dtypes, layouts, autocast
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_tolerance(backend, device, dtype):
    if dtype == torch.bfloat16 and interpreter_bf16(backend, device):
        pytest.skip("the Triton interpreter's bf16 dot is wrong: bf16 triton is GPU-only")
    params, task_ids = make_problem(300, 40, 24, 8, 27, 2, dtype=dtype)
    params, task_ids = on(device, params), task_ids.to(device)
    params32 = {name: t.float() for name, t in params.items()}
    with mk.use_backend(backend):
        y, _, probs, weights, experts, _ = run_api(params, task_ids, 2, "gelu")
    with mk.use_backend("reference"):
        y32, _, probs32, _, experts32, _ = run_api(params32, task_ids, 2, "gelu")
    assert y.dtype == dtype and probs.dtype == torch.float32 and weights.dtype == torch.float32
    assert torch.equal(experts, experts32)  # the same inputs upcast exactly: the same choices
    torch.testing.assert_close(probs, probs32, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    # the backward keeps the dtypes and stays within a few percent of the fp32 gradients
    grads = {}
    for name, p, backend_name in (("half", params, backend), ("fp32", params32, "reference")):
        leaves = {n: t.clone().requires_grad_(True) for n, t in p.items()}
        with mk.use_backend(backend_name):
            run_api(leaves, task_ids, 2, "gelu")[0].float().square().sum().backward()
        grads[name] = {n: leaves[n].grad for n in GRAD_NAMES}
    for name in GRAD_NAMES:
        got, want = grads["half"][name], grads["fp32"][name]
        assert got.dtype == dtype, name
        err = (got.float() - want).abs().max().item() / (want.abs().max().item() + 1e-6)
        assert err < 3e-2, f"{name}: max error {err:.3g} of the gradient's scale"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    params, task_ids = make_problem(9, 6, 5, 4, 3, 2)
    params, task_ids = on(device, params), task_ids.to(device)

    def run_with_views(p, tids, k, act):
        # leaf copies are contiguous; re-stride them so the API sees non-contiguous tensors
        p = dict(p)
        p["x"] = torch.stack([p["x"], p["x"]], dim=2)[:, :, 0]
        p["fc1_weight"] = p["fc1_weight"].transpose(1, 2).contiguous().transpose(1, 2)
        assert not p["x"].is_contiguous() and not p["fc1_weight"].is_contiguous()
        return run_api(p, tids, k, act)

    with mk.use_backend(backend):
        got, got_grads = forward_backward(run_api, params, task_ids, 2, "gelu")
        strided, strided_grads = forward_backward(run_with_views, params, task_ids, 2, "gelu")
    assert_close_all(strided, got, 1e-6, 1e-5, f"{backend} non-contiguous")
    assert_close_all(strided_grads, got_grads, 1e-6, 1e-5, f"{backend} non-contiguous grads")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_does_not_recast_inside_the_ops(backend, device):
    """Under a caller's autocast (the model's) the ops keep their dtypes: fp32 routing
    outputs, fp32 accumulation, results equal to the same call without autocast."""
    if interpreter_bf16(backend, device):
        pytest.skip("the Triton interpreter's bf16 dot is wrong: bf16 triton is GPU-only")
    params, task_ids = make_problem(24, 16, 12, 4, 3, 2, dtype=torch.bfloat16)
    params, task_ids = on(device, params), task_ids.to(device)
    results = []
    for enabled in (False, True):
        leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        with mk.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16,
                                                     enabled=enabled):
            y, logits, probs, weights, _, _ = run_api(leaves, task_ids, 2, "gelu")
            (y.float().square().sum() + probs.sum()).backward()
        assert logits.dtype == probs.dtype == weights.dtype == torch.float32
        assert y.dtype == torch.bfloat16
        results.append((y.detach(), logits.detach(), {n: t.grad for n, t in leaves.items()}))
    (y0, l0, g0), (y1, l1, g1) = results
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64_or_a_clear_refusal(backend, device, activation):
    """float64 gradcheck of the whole public chain (routing + experts) through the custom ops
    and their autograd; a backend without float64 refuses it, naming itself."""
    params, task_ids = make_problem(6, 5, 3, 3, 2, 2, activation, dtype=torch.float64)
    params, task_ids = on(device, params), task_ids.to(device)
    if torch.float64 not in backends.BACKEND_DTYPES[backend]:
        with mk.use_backend(backend), pytest.raises(
                TypeError, match=f"backend {backend!r} does not support torch.float64"):
            run_api(params, task_ids, 2, activation)
        return
    names = list(params)

    def fn(*tensors):
        y, logits, probs, weights, _, _ = run_api(dict(zip(names, tensors)), task_ids, 2,
                                                  activation)
        return y, logits, probs, weights

    inputs = tuple(t.clone().requires_grad_(True) for t in params.values())
    with mk.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_custom_ops(backend, device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, on the
    real outputs of each backend (which must match the fake shapes/dtypes and not alias)."""
    for activation in ACTIVATIONS:
        params, task_ids = make_problem(7, 6, 5, 3, 2, 2, activation)
        p = {n: t.to(device).requires_grad_(True) for n, t in params.items()}
        task_ids = task_ids.to(device)
        route_args = (p["x"], task_ids, p["gate_weight"], p["gate_bias"], 2, backend)
        torch.library.opcheck(torch.ops.m2dino.task_topk_route.default, route_args)
        torch.library.opcheck(torch.ops.m2dino.task_topk_route.default,
                              (p["x"], task_ids, p["gate_weight"], None, 1, backend))
        routing = Routing.from_tensors(torch.ops.m2dino.task_topk_route.default(*route_args))
        routing = routing._replace(weights=routing.weights.detach().requires_grad_(True))
        weights = [p["fc1_weight"], p["fc1_bias"], p["fc2_weight"], p["fc2_bias"]]
        torch.library.opcheck(torch.ops.m2dino.expert_mlp.default,
                              (p["x"], routing.tensors(), weights, activation, backend))


# ---------------------------------------------------------------------------------------
# Misuse: every bad call raises a clear Python error, whichever backend is selected (CPU
# tensors: the validation runs before any kernel, the same for every device)
# ---------------------------------------------------------------------------------------
def _good():
    return make_problem(6, 4, 3, 3, 2, 2)


def _route(params, good_task_ids, **override):
    args = dict(x=params["x"], task_ids=good_task_ids, gate_weight=params["gate_weight"],
                gate_bias=params["gate_bias"], top_k=2)
    args.update(override)
    return mk.task_topk_route(**args)


ROUTE_ERRORS = {
    "x_3d": (dict(x=torch.randn(6, 4, 1)), ValueError, r"x must have shape \[T, D\]"),
    "x_dim": (dict(x=torch.randn(6, 5)), ValueError, r"gate_weight has shape \[2, 3, 4\]"),
    "ids_shape": (dict(task_ids=torch.zeros(5, dtype=torch.long)), ValueError,
                  r"task_ids must have shape \[T\] = \[6\]"),
    "ids_float": (dict(task_ids=torch.zeros(6)), TypeError, "task_ids must be an integer tensor"),
    "ids_high": (dict(task_ids=torch.tensor([0, 1, 2, 0, 1, 0])), ValueError,
                 r"task_ids must be in \[0, num_tasks\) = \[0, 2\)"),
    "ids_negative": (dict(task_ids=torch.tensor([0, -1, 0, 0, 1, 0])), ValueError,
                     r"got values in \[-1, 1\]"),
    "gate_2d": (dict(gate_weight=torch.randn(2, 3)), ValueError,
                r"gate_weight must have shape \[num_tasks, E, D\]"),
    "gate_dtype": (dict(gate_weight=torch.randn(2, 3, 4, dtype=torch.float64)), TypeError,
                   "gate_weight has dtype torch.float64"),
    "bias_shape": (dict(gate_bias=torch.randn(2, 4)), ValueError,
                   r"gate_bias must have shape \[num_tasks, E\] = \[2, 3\]"),
    "bias_dtype": (dict(gate_bias=torch.randn(2, 3).bfloat16()), TypeError, "gate_bias has dtype"),
    "top_k_0": (dict(top_k=0), ValueError, r"top_k must be in \[1, E\] = \[1, 3\], got 0"),
    "top_k_4": (dict(top_k=4), ValueError, r"top_k must be in \[1, E\] = \[1, 3\], got 4"),
    "top_k_float": (dict(top_k=2.0), TypeError, "top_k must be an int"),
    "top_k_bool": (dict(top_k=True), TypeError, "top_k must be an int"),
    "x_int": (dict(x=torch.randn(6, 4).int()), TypeError, "x must be float32"),
    "x_list": (dict(x=[[0.0] * 4] * 6), TypeError, "x must be a torch.Tensor"),
    "ids_meta": (dict(task_ids=torch.zeros(6, dtype=torch.long, device="meta")), ValueError,
                 "task_ids is on meta"),
    "gate_meta": (dict(gate_weight=torch.randn(2, 3, 4, device="meta")), ValueError,
                  "gate_weight is on meta"),
}


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(ROUTE_ERRORS))
def test_route_rejects_bad_arguments(backend, device, case):
    override, error, message = ROUTE_ERRORS[case]
    params, task_ids = _good()
    with mk.use_backend(backend):
        with pytest.raises(error, match=message):
            _route(params, task_ids, **override)


def _experts(params, good_routing, **override):
    args = dict(x=params["x"], routing=good_routing, fc1_weight=params["fc1_weight"],
                fc1_bias=params["fc1_bias"], fc2_weight=params["fc2_weight"],
                fc2_bias=params["fc2_bias"], activation="gelu")
    args.update(override)
    return mk.expert_mlp(**args)


EXPERT_ERRORS = {
    "activation": (lambda r: dict(activation="relu"), ValueError, "activation must be one of"),
    "swiglu_odd": (lambda r: dict(activation="swiglu"), ValueError,
                   r"swiglu needs an even fc1 output size H1 = 2H"),
    "swiglu_fc2": (lambda r: dict(activation="swiglu", fc1_weight=torch.randn(3, 4, 4),
                                  fc1_bias=torch.randn(3, 4)), ValueError,
                   r"fc2_weight must have shape \[E, D, H\] = \[3, 4, 2\]"),
    "fc1_dim": (lambda r: dict(fc1_weight=torch.randn(3, 3, 5)), ValueError,
                r"fc1_weight has shape \[3, 3, 5\]"),
    "fc1_2d": (lambda r: dict(fc1_weight=torch.randn(3, 3)), ValueError,
               r"fc1_weight must have shape \[E, H1, D\]"),
    "fc2_shape": (lambda r: dict(fc2_weight=torch.randn(3, 4, 2)), ValueError,
                  r"fc2_weight must have shape"),
    "fc1_bias": (lambda r: dict(fc1_bias=torch.randn(3, 4)), ValueError,
                 r"fc1_bias must have shape \[E, H1\] = \[3, 3\]"),
    "fc2_bias": (lambda r: dict(fc2_bias=torch.randn(2, 4)), ValueError,
                 r"fc2_bias must have shape \[E, D\] = \[3, 4\]"),
    "fc2_dtype": (lambda r: dict(fc2_weight=torch.randn(3, 4, 3).half()), TypeError,
                  "fc2_weight has dtype torch.float16"),
    "tokens": (lambda r: dict(x=torch.randn(5, 4)), ValueError,
               r"routing.weights must have shape \[T, k\] = \[5, 2\]"),
    "experts_count": (lambda r: dict(fc1_weight=torch.randn(4, 3, 4), fc1_bias=torch.randn(4, 3),
                                     fc2_weight=torch.randn(4, 4, 3), fc2_bias=torch.randn(4, 4)),
                      ValueError, r"routing.offsets must have shape \[E\+1\] = \[5\]"),
    "tuple": (lambda r: dict(routing=tuple(r)), TypeError, "routing must be the Routing"),
    "experts_int32": (lambda r: dict(routing=r._replace(experts=r.experts.int())), TypeError,
                      "routing.experts must be int64"),
    "weights_double": (lambda r: dict(routing=r._replace(weights=r.weights.double())), TypeError,
                       "routing.weights must be torch.float32"),
    "logits_missing": (lambda r: dict(routing=r._replace(logits=None)), TypeError,
                       "routing.logits must be a torch.Tensor"),
    "experts_range": (lambda r: dict(routing=r._replace(experts=r.experts + 3)), ValueError,
                      r"routing.experts must be in \[0, E\) = \[0, 3\)"),
    "slots_range": (lambda r: dict(routing=r._replace(sorted_slots=r.sorted_slots * 5)),
                    ValueError, "routing.sorted_slots must be in"),
    "offsets_falling": (lambda r: dict(routing=r._replace(offsets=r.offsets.flip(0))), ValueError,
                        "routing.offsets must rise"),
    "fc1_meta": (lambda r: dict(fc1_weight=torch.randn(3, 3, 4, device="meta")), ValueError,
                 "fc1_weight is on meta"),
}


@pytest.mark.parametrize("backend,device", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(EXPERT_ERRORS))
def test_expert_mlp_rejects_bad_arguments(backend, device, case):
    make_override, error, message = EXPERT_ERRORS[case]
    params, task_ids = _good()
    with mk.use_backend(backend):
        routing = _route(params, task_ids)
        _experts(params, routing)  # the unmodified call works
        with pytest.raises(error, match=message):
            _experts(params, routing, **make_override(routing))
