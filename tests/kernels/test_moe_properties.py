"""Property tests (hypothesis) of the MoE ops over random shapes, task mixes and routing
skews: the reference against the per-token loop oracle, every other CPU backend against the
reference (forward and backward), and invalid arguments always raising a Python error."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import m2dino_kernels as mk
from m2dino_kernels.contract import forward_backward, moe_problem, require_all_close, run_public_ops

OTHER_CPU_BACKENDS = [b for b in mk.available_backends("cpu") if b != "reference"]
SKEWS = ("none", "one_hot_expert", "idle_experts", "exact_ties", "sharp")


@st.composite
def moe_problems(draw, max_tokens=24, max_dim=12, max_hidden=10):
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, E))
    NT = draw(st.integers(1, 30))
    used_tasks = draw(st.lists(st.integers(0, NT - 1), min_size=1, max_size=4, unique=True))
    return dict(
        T=draw(st.integers(0, max_tokens)), D=draw(st.integers(1, max_dim)),
        H=draw(st.integers(1, max_hidden)), E=E, k=k, NT=NT, used_tasks=used_tasks,
        activation=draw(st.sampled_from(["gelu", "swiglu"])),
        skew=draw(st.sampled_from(SKEWS)), seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def build(spec, dtype):
    """The drawn spec's problem (params, task_ids). Skews: one expert favoured by a big bias,
    half the experts starved, an all-zero router (every probability equal: exact ties), or
    sharp logits."""
    E, skew = spec["E"], spec["skew"]
    boost = None
    if skew == "one_hot_expert":
        boost = [25.0 if e == spec["seed"] % E else 0.0 for e in range(E)]
    elif skew == "idle_experts":
        boost = [0.0 if e < E // 2 else -25.0 for e in range(E)]
    scale = {"exact_ties": 0.0, "sharp": 8.0}.get(skew, 1.0)
    problem = moe_problem(spec["T"], spec["D"], spec["H"], E, spec["NT"], spec["k"],
                          spec["activation"], dtype=dtype, task_pool=spec["used_tasks"],
                          bias_boost=boost, gate_scale=scale, seed=spec["seed"])
    return problem.params(), problem.task_ids


def no_near_ties(params, task_ids, k):
    """False when a token's k-th and (k+1)-th (or two chosen) probabilities differ by less
    than rounding can resolve: backends may then legitimately pick differently. Exact ties
    (gap 0) are kept: they must all go to the lower expert."""
    with mk.use_backend("reference"):
        probs = mk.task_topk_route(params["x"].double(), task_ids,
                                   params["gate_weight"].double(),
                                   params["gate_bias"].double(), top_k=k).probs
    if probs.shape[0] == 0 or probs.shape[1] == 1:
        return True
    ordered = probs.sort(dim=-1, descending=True).values[:, : k + 1]
    gaps = ordered[:, :-1] - ordered[:, 1:]
    return not bool(((gaps > 0) & (gaps < 1e-4)).any())


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=moe_problems())
def test_reference_matches_loop_oracle(spec, loop_oracle):
    params, task_ids = build(spec, torch.float64)
    k, act = spec["k"], spec["activation"]
    with mk.use_backend("reference"):
        got, got_grads = forward_backward(run_public_ops, params, task_ids, k, act)
    if spec["T"] == 0:
        assert got["y"].shape == (0, spec["D"])
        assert all(g is None or g.abs().sum() == 0 for g in got_grads.values())
        return
    want, want_grads = forward_backward(loop_oracle, params, task_ids, k, act)
    require_all_close(got, want, 1e-9, 1e-9, f"reference {spec}")
    require_all_close(got_grads, want_grads, 1e-9, 1e-9, f"reference grads {spec}")


@pytest.mark.parametrize("backend", OTHER_CPU_BACKENDS)
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=moe_problems(max_tokens=20, max_dim=10, max_hidden=8))
def test_backend_matches_reference(backend, spec):
    params, task_ids = build(spec, torch.float32)
    k, act = spec["k"], spec["activation"]
    assume(no_near_ties(params, task_ids, k))
    with mk.use_backend(backend):
        got, got_grads = forward_backward(run_public_ops, params, task_ids, k, act)
    with mk.use_backend("reference"):
        want, want_grads = forward_backward(run_public_ops, params, task_ids, k, act)
    require_all_close(got, want, 1e-5, 1e-4, f"{backend} {spec}")
    if spec["T"] == 0:
        return
    require_all_close(got_grads, want_grads, 1e-4, 1e-4, f"{backend} grads {spec}")


# ---------------------------------------------------------------------------------------
# Invalid arguments always raise a Python error (before any kernel runs)
# ---------------------------------------------------------------------------------------
CORRUPTIONS = ("task_high", "task_negative", "top_k_zero", "top_k_over", "x_dim", "x_rank",
               "task_len", "gate_dtype", "fc1_dim", "fc2_hidden", "bias_shape", "activation",
               "experts_out_of_range", "slots_out_of_range", "weights_shape")


@settings(max_examples=40, deadline=None)
@given(spec=moe_problems(max_tokens=8, max_dim=6, max_hidden=5),
       corruption=st.sampled_from(CORRUPTIONS), amount=st.integers(1, 1000),
       backend=st.sampled_from(mk.available_backends("cpu")))
def test_invalid_arguments_always_raise(spec, corruption, amount, backend):
    assume(spec["T"] > 0)
    params, task_ids = build(spec, torch.float32)
    k, E, NT, T, D = spec["k"], spec["E"], spec["NT"], spec["T"], spec["D"]
    route = dict(x=params["x"], task_ids=task_ids, gate_weight=params["gate_weight"],
                 gate_bias=params["gate_bias"], top_k=k)
    experts = dict(fc1_weight=params["fc1_weight"], fc1_bias=params["fc1_bias"],
                   fc2_weight=params["fc2_weight"], fc2_bias=params["fc2_bias"],
                   activation=spec["activation"])
    routing_change = {}
    if corruption == "task_high":
        route["task_ids"] = task_ids.clone().index_fill_(0, torch.tensor([amount % T]), NT + amount - 1)
    elif corruption == "task_negative":
        route["task_ids"] = task_ids.clone().index_fill_(0, torch.tensor([amount % T]), -amount)
    elif corruption == "top_k_zero":
        route["top_k"] = -(amount % 3)
    elif corruption == "top_k_over":
        route["top_k"] = E + amount
    elif corruption == "x_dim":
        route["x"] = torch.randn(T, D + amount % 5 + 1)
    elif corruption == "x_rank":
        route["x"] = params["x"].reshape(T, D, 1)
    elif corruption == "task_len":
        route["task_ids"] = torch.zeros(T + amount % 4 + 1, dtype=torch.long)
    elif corruption == "gate_dtype":
        route["gate_weight"] = params["gate_weight"].double()
    elif corruption == "fc1_dim":
        experts["fc1_weight"] = torch.randn(E, params["fc1_weight"].shape[1], D + 1)
    elif corruption == "fc2_hidden":
        experts["fc2_weight"] = torch.randn(E, D, params["fc2_weight"].shape[2] + amount % 3 + 1)
    elif corruption == "bias_shape":
        experts["fc2_bias"] = torch.randn(E + 1, D)
    elif corruption == "activation":
        experts["activation"] = "relu"
    elif corruption == "experts_out_of_range":
        routing_change["experts"] = lambda r: r.experts + E * amount
    elif corruption == "slots_out_of_range":
        routing_change["sorted_slots"] = lambda r: r.sorted_slots + T * k * amount
    elif corruption == "weights_shape":
        routing_change["weights"] = lambda r: r.weights[:, :1].repeat(1, k + 1)
    with mk.use_backend(backend), pytest.raises((ValueError, TypeError)):
        routing = mk.task_topk_route(**route)
        routing = routing._replace(**{name: fn(routing) for name, fn in routing_change.items()})
        mk.expert_mlp(params["x"], routing, **experts)
