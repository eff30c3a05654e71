"""Random task-MoE inputs and the public-API runners of the kernel tests (the conformance
suite, the extension, CUDA and public-API tests draw and run them the same way)."""
from __future__ import annotations

import torch

import m2dino_kernels as mk


def random_moe_inputs(T, D, H, E, NT, boost=None, pool=None, activation="gelu",
                      dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """x [T, D], task_ids [T] (drawn from `pool`, default every task), per-task gates [NT, E, D]
    with bias [NT, E] (+ `boost` per expert, to skew routing), experts in nn.Linear layout
    (fc1 rows 2H for swiglu). Names as the backend protocol's. Drawn in float64 and cast, so
    every dtype sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    H1 = 2 * H if activation == "swiglu" else H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    pool_t = torch.tensor(pool if pool is not None else list(range(NT)))
    task_ids = pool_t[torch.randint(0, len(pool_t), (T,), generator=gen)]
    gate_bias = rand(NT, E, scale=0.5)
    if boost is not None:
        gate_bias = gate_bias + torch.tensor(boost, dtype=dtype)
    return dict(x=rand(T, D), task_ids=task_ids, gate_weight=rand(NT, E, D, scale=D ** -0.5),
                gate_bias=gate_bias, fc1_w=rand(E, H1, D, scale=D ** -0.5),
                fc1_b=rand(E, H1, scale=0.1), fc2_w=rand(E, D, H, scale=H ** -0.5),
                fc2_b=rand(E, D, scale=0.1))


def make_problem(T, D, H, E, NT, k, activation="gelu", dtype=torch.float32, task_pool=None,
                 bias_boost=None, seed=0):
    """Random MoE inputs under the public API's names -> (params, task_ids). task_pool: the
    task ids tokens may use. bias_boost: added to the gate bias (one value per expert)."""
    p = random_moe_inputs(T, D, H, E, NT, bias_boost, task_pool, activation, dtype, seed)
    params = dict(x=p["x"], gate_weight=p["gate_weight"], gate_bias=p["gate_bias"],
                  fc1_weight=p["fc1_w"], fc1_bias=p["fc1_b"], fc2_weight=p["fc2_w"], fc2_bias=p["fc2_b"])
    return params, p["task_ids"]


GRAD_NAMES = ("x", "gate_weight", "gate_bias", "fc1_weight", "fc1_bias", "fc2_weight",
              "fc2_bias")


def run_api(p, task_ids, k, activation):
    routing = mk.task_topk_route(p["x"], task_ids, p["gate_weight"], p["gate_bias"], top_k=k)
    y = mk.expert_mlp(p["x"], routing, p["fc1_weight"], p["fc1_bias"], p["fc2_weight"],
                      p["fc2_bias"], activation=activation)
    return y, routing.logits, routing.probs, routing.weights, routing.experts, routing


def forward_backward(fn, params, task_ids, k, activation, seed=1):
    """Run fn on leaf copies, backprop a random combination of y, logits, probs and weights
    (so every path into the router is exercised) and return outputs and gradients."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in params.items()}
    y, logits, probs, weights, experts, *_ = fn(leaves, task_ids, k, activation)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out.float() * torch.randn(out.shape, generator=gen)).sum()
               for out in (y, logits, probs, weights))
    loss.backward()
    outs = dict(y=y.detach(), logits=logits.detach(), probs=probs.detach(),
                weights=weights.detach(), experts=experts)
    grads = {name: leaves[name].grad for name in GRAD_NAMES}
    return outs, grads


def assert_close_all(got, want, atol, rtol, what):
    for name in want:
        g, w = got[name], want[name]
        assert g is not None, f"{what}: no gradient for {name}"
        if name == "experts":
            assert torch.equal(g.long(), w.long()), f"{what}: experts differ"
            continue
        torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


# (T, D, H, E, NT, k, extra) covering the edge cases of the issue
CASES = {
    "single_token": (1, 8, 6, 4, 3, 2, {}),
    "odd_dims": (9, 7, 5, 3, 2, 2, {}),
    "one_expert": (6, 8, 6, 1, 2, 1, {}),
    "k1": (10, 8, 6, 4, 3, 1, {}),
    "k_equals_E": (7, 6, 5, 3, 2, 3, {}),
    "idle_experts": (12, 8, 6, 6, 2, 2, {"bias_boost": [0, 0, 0, -30, -30, -30]}),
    "idle_tasks": (11, 8, 6, 4, 5, 2, {"task_pool": [0, 2]}),
    "all_on_one_expert": (10, 8, 6, 4, 3, 1, {"bias_boost": [0, 0, 30, 0]}),
    "27_tasks": (40, 8, 6, 4, 27, 2, {}),
}


def case_problem(name, activation, dtype=torch.float32):
    T, D, H, E, NT, k, extra = CASES[name]
    params, task_ids = make_problem(T, D, H, E, NT, k, activation, dtype=dtype, **extra)
    return params, task_ids, k
