"""MoE ops: the reference against the independent loop oracle (conftest.py), the routing's
permutation fields, the naive baseline, the library floor's host reads, backend availability
errors, optional biases, torch.compile tracing, the auxiliary losses and the CUDA-only
properties. What every backend must satisfy (matching the reference, ties, NaN, the empty
batch, dtypes, gradcheck, opcheck, misuse errors) is tests/kernels/test_conformance.py."""
from __future__ import annotations

import math

import pytest
import torch

import m2dino_kernels as mk
from m2dino_kernels import contract, registry, selection
from m2dino_kernels.contract import forward_backward, require_all_close, run_public_ops
from m2dino_kernels.reference import naive_task_moe

CPU_BACKENDS = mk.available_backends("cpu")


# ---------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", list(contract.CASES))
def test_reference_matches_the_loop_oracle(case, activation, loop_oracle):
    problem = contract.case_problem(case, activation, dtype=torch.float64)
    params, task_ids, k = problem.params(), problem.task_ids, problem.top_k
    with mk.use_backend("reference"):
        got, got_grads = forward_backward(run_public_ops, params, task_ids, k, activation)
    want, want_grads = forward_backward(loop_oracle, params, task_ids, k, activation)
    require_all_close(got, want, 1e-10, 1e-10, f"reference {case}/{activation}")
    require_all_close(got_grads, want_grads, 1e-10, 1e-10, f"reference grads {case}/{activation}")


def test_edge_case_routing_is_what_the_case_says():
    for case, expect in (("idle_experts", lambda c, n: c[3:].sum() == 0 and c.sum() == n * 2),
                         ("all_on_one_expert", lambda c, n: c.tolist() == [0, 0, n, 0])):
        problem = contract.case_problem(case)
        routing = run_public_ops(problem.params(), problem.task_ids, problem.top_k, "gelu")[-1]
        assert expect(routing.counts, problem.task_ids.numel()), (case, routing.counts)


def test_routing_permutation_fields(moe_problem):
    problem = moe_problem(13, 8, 6, 5, 3, 2)
    params, task_ids = problem.params(), problem.task_ids
    with mk.use_backend("reference"):
        r = mk.task_topk_route(params["x"], task_ids, params["gate_weight"], params["gate_bias"],
                               top_k=2)
    flat = r.experts.reshape(-1)
    assert r.counts.tolist() == torch.bincount(flat, minlength=5).tolist()
    assert r.offsets.tolist() == [0] + torch.cumsum(r.counts, 0).tolist()
    # stable sort by expert: ascending expert, then ascending slot
    keys = [(int(flat[s]), int(s)) for s in r.sorted_slots]
    assert keys == sorted(keys)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(13))
    assert (r.weights[:, 0] >= r.weights[:, 1]).all()


@pytest.mark.parametrize("split_experts", [False, True])
def test_naive_baseline_matches_reference(split_experts, moe_problem):
    problem = moe_problem(20, 8, 6, 4, 5, 2)
    params, task_ids = problem.params(), problem.task_ids
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    with mk.use_backend("reference"):
        y_ref = run_public_ops(leaves, task_ids, 2, "gelu")[0]
    y_ref.square().sum().backward()
    expected = {k: v.grad for k, v in leaves.items()}
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    y_naive = naive_task_moe(leaves["x"], task_ids, leaves["gate_weight"], leaves["gate_bias"], 2,
                             leaves["fc1_weight"], leaves["fc1_bias"], leaves["fc2_weight"],
                             leaves["fc2_bias"], activation="gelu", split_experts=split_experts)
    torch.testing.assert_close(y_naive, y_ref, atol=1e-5, rtol=1e-5)
    y_naive.square().sum().backward()
    for name, grad in expected.items():
        torch.testing.assert_close(leaves[name].grad, grad, atol=1e-5, rtol=1e-5, msg=name)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read tensor values on the host (a device-to-host sync on GPU)."""

    READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero",
             "cpu", "numpy")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_backend_reads_nothing_on_the_host(activation, moe_problem):
    """The library floor's four protocol functions, called directly (inside the custom ops a
    TorchFunctionMode sees nothing), read no tensor value on the host, idle experts included."""
    if "grouped_mm" not in CPU_BACKENDS:
        pytest.skip("this torch's grouped_mm does not run on CPU")
    from m2dino_kernels import grouped_mm as gmm

    p = moe_problem(37, 7, 5, 6, 4, 2, activation, bias_boost=[0, 0, 0, -30, -30, -30])
    params = p.expert_weights()
    with _HostReads() as reads:
        routing = gmm.route_forward(*p.route_args())
        gmm.route_backward(torch.ones_like(routing.logits), torch.ones_like(routing.probs),
                           torch.ones_like(routing.weights), p.x, p.task_ids,
                           p.gate_weight, True, routing)
        y, h_pre, expert_out = gmm.experts_forward(p.x, routing, params, activation)
        _, _, grads = gmm.experts_backward(torch.ones_like(y), p.x, routing, params,
                                           activation, h_pre, expert_out)
    assert reads.seen == []
    assert (grads.fc1_weight[3:] == 0).all() and (grads.fc2_weight[3:] == 0).all()  # idle experts


def test_unavailable_backend_names_the_ones_that_can_run(moe_problem):
    problem = moe_problem(6, 4, 3, 3, 2, 2)
    params, task_ids = problem.params(), problem.task_ids
    with mk.use_backend("cuda"), pytest.raises(
            ValueError, match=r"'cuda' cannot run on cpu tensors; available there: reference"):
        mk.task_topk_route(params["x"], task_ids, params["gate_weight"], None, top_k=2)


def test_biases_may_be_none(moe_problem):
    problem = moe_problem(7, 6, 5, 3, 2, 2)
    params, task_ids = problem.params(), problem.task_ids
    with mk.use_backend("reference"):
        routing = mk.task_topk_route(params["x"], task_ids, params["gate_weight"], None, top_k=2)
        y = mk.expert_mlp(params["x"], routing, params["fc1_weight"], None, params["fc2_weight"], None)
        zero_bias = {**params, "gate_bias": torch.zeros(2, 3), "fc1_bias": torch.zeros(3, 5),
                     "fc2_bias": torch.zeros(3, 6)}
        y_zero = run_public_ops(zero_bias, task_ids, 2, "gelu")[0]
    torch.testing.assert_close(y, y_zero)


def test_torch_compile_fullgraph_matches_eager(moe_problem):
    torch._dynamo.reset()
    problem = moe_problem(12, 8, 6, 4, 3, 2)
    params, task_ids = problem.params(), problem.task_ids

    def moe_block(x, gate_weight, gate_bias, fc1_w, fc1_b, fc2_w, fc2_b):
        routing = mk.task_topk_route(x, task_ids, gate_weight, gate_bias, top_k=2)
        y = mk.expert_mlp(x, routing, fc1_w, fc1_b, fc2_w, fc2_b, activation="gelu")
        aux = mk.moe_aux_losses(routing, task_ids, 3)
        return y, aux.load_balance + aux.z_loss + aux.mutual_information

    compiled = torch.compile(moe_block, fullgraph=True, backend="aot_eager")
    names = list(params)
    results = []
    for fn in (moe_block, compiled):
        leaves = [params[n].clone().requires_grad_(True) for n in names]
        with mk.use_backend("reference"):
            y, aux = fn(*leaves)
        (y.pow(2).sum() + aux).backward()
        results.append((y.detach(), aux.detach(), [t.grad for t in leaves]))
    (y0, a0, g0), (y1, a1, g1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(a1, a0)
    for name, a, b in zip(names, g1, g0):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    explanation = torch._dynamo.explain(moe_block)(*[params[n] for n in names])
    assert explanation.graph_break_count == 0
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
           if node.op == "call_function"]
    assert sum("m2dino.task_topk_route" in op for op in ops) == 1
    assert sum("m2dino.expert_mlp" in op for op in ops) == 1


# ---------------------------------------------------------------------------------------
# Auxiliary losses (hand-computed)
# ---------------------------------------------------------------------------------------
def _routing_from(probs, experts, logits):
    probs = torch.tensor(probs, dtype=torch.float32)
    experts = torch.tensor(experts)
    weights = torch.gather(probs, 1, experts)
    weights = weights / weights.sum(-1, keepdim=True)
    E, k = probs.shape[1], experts.shape[1]
    counts = torch.bincount(experts.reshape(-1), minlength=E)
    return mk.Routing(torch.tensor(logits, dtype=torch.float32), probs, weights, experts, counts,
                      torch.sort(experts.reshape(-1), stable=True).indices,
                      torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), k)


def test_aux_losses_hand_computed():
    probs = [[0.75, 0.25], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]
    shifts = [1.0, 0.0, 2.0, -1.0]  # logsumexp of each row of logits
    logits = [[math.log(p) + c for p in row] for row, c in zip(probs, shifts)]
    routing = _routing_from(probs, [[0], [0], [1], [0]], logits)
    task_ids = torch.tensor([0, 0, 1, 2])  # task 3 has no token
    aux = mk.moe_aux_losses(routing, task_ids, num_tasks=4)
    # task 0: f = [1, 0], P = [0.625, 0.375] -> 2 * 0.625; task 1: 2 * 0.8; task 2: 2 * 0.6
    assert aux.load_balance.item() == pytest.approx((1.25 + 1.6 + 1.2) / 3, rel=1e-6)
    assert aux.z_loss.item() == pytest.approx((1 + 0 + 4 + 1) / 4, rel=1e-5)
    joint = [[0.3125, 0.1875], [0.05, 0.2], [0.15, 0.1]]  # summed probs / 4 tokens
    p_task = [0.5, 0.25, 0.25]
    p_expert = [0.5125, 0.4875]
    mi = sum(joint[t][e] * math.log(joint[t][e] / (p_task[t] * p_expert[e]))
             for t in range(3) for e in range(2))
    assert aux.mutual_information.item() == pytest.approx(-mi, rel=1e-5)


def test_aux_losses_extremes():
    # two tasks (2 and 1 tokens), each on its own expert with certainty: expert determines
    # task, so MI = H(task) = 2/3 ln(3/2) + 1/3 ln 3; load_balance = E for each task
    routing = _routing_from([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[0], [0], [1]],
                            [[0.0, -50.0], [0.0, -50.0], [-50.0, 0.0]])
    aux = mk.moe_aux_losses(routing, torch.tensor([0, 0, 1]), num_tasks=2)
    assert aux.load_balance.item() == pytest.approx(2.0)
    entropy = 2 / 3 * math.log(3 / 2) + 1 / 3 * math.log(3)
    assert aux.mutual_information.item() == pytest.approx(-entropy, rel=1e-6)
    # uniform router: balanced (loss 1) and no task information (MI 0)
    routing = _routing_from([[0.5, 0.5]] * 4, [[0, 1], [1, 0], [0, 1], [1, 0]], [[0.0, 0.0]] * 4)
    aux = mk.moe_aux_losses(routing, torch.tensor([0, 1, 0, 1]), num_tasks=3)
    assert aux.load_balance.item() == pytest.approx(1.0)
    assert aux.mutual_information.item() == pytest.approx(0.0, abs=1e-7)
    assert aux.z_loss.item() == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_aux_losses_gradients_finite_with_idle_tasks(moe_problem):
    problem = moe_problem(10, 6, 5, 4, 6, 2, task_pool=[1, 4])
    params, task_ids = problem.params(), problem.task_ids
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    with mk.use_backend("reference"):
        routing = mk.task_topk_route(leaves["x"], task_ids, leaves["gate_weight"],
                                     leaves["gate_bias"], top_k=2)
    aux = mk.moe_aux_losses(routing, task_ids, num_tasks=6)
    sum(aux).backward()
    assert all(torch.isfinite(v) for v in aux)
    assert torch.isfinite(leaves["gate_weight"].grad).all()
    assert leaves["gate_weight"].grad[[0, 2, 3, 5]].abs().sum() == 0  # idle tasks untouched
    assert leaves["gate_weight"].grad[[1, 4]].abs().sum() > 0


def test_aux_losses_empty_batch_is_zero():
    with mk.use_backend("reference"):
        routing = mk.task_topk_route(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                                     torch.randn(2, 3, 4), None, top_k=2)
    aux = mk.moe_aux_losses(routing, torch.zeros(0, dtype=torch.long), num_tasks=2)
    assert [v.item() for v in aux] == [0.0, 0.0, 0.0]


def test_aux_losses_reject_bad_arguments():
    routing = _routing_from([[0.5, 0.5]] * 3, [[0], [1], [0]], [[0.0, 0.0]] * 3)
    with pytest.raises(ValueError, match=r"task_ids must have shape \[T\] = \[3\]"):
        mk.moe_aux_losses(routing, torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, num_tasks\) = \[0, 2\)"):
        mk.moe_aux_losses(routing, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        mk.moe_aux_losses(routing, torch.tensor([0, 1, 0]), 0)
    with pytest.raises(TypeError, match="task_ids must be an integer tensor"):
        mk.moe_aux_losses(routing, torch.tensor([0.0, 1.0, 0.0]), 2)
    with pytest.raises(TypeError, match="routing must be the Routing"):
        mk.moe_aux_losses((1, 2), torch.tensor([0, 1, 0]), 2)


# ---------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; run by benchmarks/gpu_check.sh on a GPU machine)
# ---------------------------------------------------------------------------------------
CUDA_BACKENDS = mk.available_backends("cuda") if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_routing_has_no_host_sync(backend, moe_problem):
    problem = moe_problem(128, 32, 16, 8, 27, 2, device="cuda")
    module = registry.backend_module(backend)
    module.route_forward(*problem.route_args())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module.route_forward(*problem.route_args())
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_auto_resolution():
    # unmeasured `auto` on CUDA is the library path (m2dino_kernels.selection measures)
    expected = "grouped_mm" if "grouped_mm" in CUDA_BACKENDS else "reference"
    assert selection.resolve_backend("cuda", "auto") == expected


def test_compiled_function_follows_a_backend_change(moe_problem):
    # the selected backend is read at trace time: changing it must re-trace, not reuse
    torch._dynamo.reset()
    problem = moe_problem(5, 4, 3, 3, 2, 2)
    params, task_ids = problem.params(), problem.task_ids

    def route(x):
        return mk.task_topk_route(x, task_ids, params["gate_weight"], None, top_k=2).weights

    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")
    with mk.use_backend("reference"):
        compiled(params["x"])
    # under fullgraph dynamo re-raises our ValueError wrapped in its own exception type
    with mk.use_backend("cuda"), pytest.raises(Exception, match="'cuda' cannot run on cpu"):
        compiled(params["x"])


def test_numpy_integer_top_k_is_accepted(moe_problem):
    import numpy as np

    problem = moe_problem(4, 4, 3, 3, 2, 2)
    params, task_ids = problem.params(), problem.task_ids
    with mk.use_backend("reference"):
        routing = mk.task_topk_route(params["x"], task_ids, params["gate_weight"], None,
                                     top_k=np.int64(2))
    assert routing.top_k == 2 and type(routing.top_k) is int and routing.experts.shape == (4, 2)
