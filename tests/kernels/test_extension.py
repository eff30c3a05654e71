"""The C++ extension m2dino_kernels._C on CPU (backend "cpp") and the library floor
"grouped_mm": the TORCH_CHECKs that turn misuse of the extension into a RuntimeError instead
of a crash, and the public API with a frozen input and activation checkpointing. What every
backend must satisfy (the protocol against the reference, ties, NaN, the empty batch, half
precision, gradcheck) is tests/kernels/test_conformance.py."""
from __future__ import annotations

import pytest
import torch

from m2dino_kernels import registry
from m2dino_kernels.contract import moe_problem

_C = registry._C
NEEDS_C = pytest.mark.skipif(_C is None, reason="m2dino_kernels._C is not built")
if _C is not None:
    from m2dino_kernels import extension as ext
# the backends whose public API runs with a frozen input and under checkpointing here
PROTOCOL_BACKENDS = [pytest.param("cpp", marks=NEEDS_C),
                     pytest.param("grouped_mm", marks=pytest.mark.skipif(
                         "grouped_mm" not in registry.available_backends("cpu"),
                         reason="this torch's grouped_mm does not run on CPU"))]


def expert_args(p, route, activation):
    """The extension's flat experts_forward arguments for a Routing."""
    return (p.x, route.weights, route.experts, route.sorted_slots, route.offsets, *p.expert_weights(),
            activation)


# ---------------------------------------------------------------------------------------
# Misuse raises RuntimeError (never a crash)
# ---------------------------------------------------------------------------------------
def _route_args(**override):
    p = moe_problem(6, 4, 3, 3, 2)
    args = dict(x=p.x, task_ids=p.task_ids, gate_weight=p.gate_weight, gate_bias=p.gate_bias,
                top_k=2)
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
    p = moe_problem(6, 4, 3, 3, 2, 2, activation)
    route = ext.route_forward(*p.route_args())
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
    p = moe_problem(6, 4, 3, 3, 2)
    route = ext.route_forward(*p.route_args())
    logits, probs, weights, experts = route.logits, route.probs, route.weights, route.experts
    bad_experts = experts.clone()
    bad_experts[2, 1] = 7
    with pytest.raises(RuntimeError, match=r"experts.view\(-1\)\[5\] = 7 is out of range"):
        _C.route_backward(torch.zeros_like(logits), torch.zeros_like(probs),
                          torch.zeros_like(weights), p.x, p.task_ids, p.gate_weight,
                          True, probs, weights, bad_experts)
    with pytest.raises(RuntimeError, match="grad_probs must have shape"):
        _C.route_backward(torch.zeros_like(logits), torch.zeros(6, 2), torch.zeros_like(weights),
                          p.x, p.task_ids, p.gate_weight, True, probs, weights, experts)


# ---------------------------------------------------------------------------------------
# Through the public API: frozen inputs, activation checkpointing, no_grad
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", PROTOCOL_BACKENDS)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_public_api_frozen_input_and_checkpointing(checkpointed, backend):
    """x needing no grad while the experts do (a frozen backbone), and non-reentrant
    activation checkpointing (Python saved-tensor hooks active while the kernels run their
    worker threads: this once deadlocked), both equal to the reference backend."""
    from torch.utils.checkpoint import checkpoint

    import m2dino_kernels as mk

    p = moe_problem(40, 16, 12, 4, 3)
    results = {}
    for name in ("reference", backend):
        experts = {n: getattr(p, n).clone().requires_grad_(True)
                   for n in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}
        x = p.x.clone().requires_grad_(checkpointed)

        def block(x, experts=experts):
            r = mk.task_topk_route(x, p.task_ids, p.gate_weight, p.gate_bias, top_k=2)
            return mk.expert_mlp(x, r, **experts)

        with mk.use_backend(name):
            y = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            y.square().sum().backward()
            with torch.no_grad():
                torch.testing.assert_close(block(x), y.detach())
        results[name] = (y.detach(), {n: t.grad for n, t in experts.items()}, x.grad)
    (y_c, g_c, gx_c), (y_t, g_t, gx_t) = results[backend], results["reference"]
    torch.testing.assert_close(y_c, y_t, atol=1e-5, rtol=1e-5)
    for name in g_t:
        torch.testing.assert_close(g_c[name], g_t[name], atol=1e-4, rtol=1e-4)
    if checkpointed:
        torch.testing.assert_close(gx_c, gx_t, atol=1e-4, rtol=1e-4)
