"""The backend contract: what every MoE kernel backend (and the attention kernels) must do,
written once as check functions.

Each `check_*` function runs a backend on a small problem and holds it to the reference
(the "reference" backend, or the attention reference), raising ContractViolation -- an
AssertionError whose message names the output and its worst error -- when it does not hold.
tests/kernels/test_conformance.py parametrises them over every backend and device; the
self-test (`python -m m2dino_kernels.selftest`) runs them in a child process per backend
before `auto` trusts a compiled backend on a device (m2dino_kernels.gate). How outputs are
compared (tolerances, NaN placement) is m2dino_kernels.compare's, shared with `auto`'s trials.

The problems: `moe_problem` draws one (float64 values cast to the dtype, so every dtype sees
the same numbers); CASES names the edge cases (one token, odd sizes, one expert, k = 1 and
k = E, idle experts, tasks without tokens, every token on one expert, 27 tasks).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from m2dino_kernels.attention import attention
from m2dino_kernels.backends import ExpertWeights, Routing
from m2dino_kernels.compare import difference, mismatch
from m2dino_kernels.moe import expert_mlp, task_topk_route
from m2dino_kernels.registry import BACKEND_DTYPES, REFERENCE, backend_module
from m2dino_kernels.selection import use_backend

# The contract's own (atol, rtol) for outputs and for gradients, fp32 inputs: tight, the
# error of a different summation order. 16-bit inputs are held to compare.TOLERANCE.
FP32_OUTPUTS = (1e-5, 1e-4)
FP32_GRADIENTS = (1e-4, 1e-4)
ACTIVATIONS = ("gelu", "swiglu")
GRAD_NAMES = ("x", "gate_weight", "gate_bias", "fc1_weight", "fc1_bias", "fc2_weight",
              "fc2_bias")


class ContractViolation(AssertionError):
    """A backend broke the contract; the message names the output and the worst error."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def require_close(name, got, want, atol, rtol, what="") -> None:
    problem = difference(name, got, want, atol, rtol)
    if problem:
        raise ContractViolation(f"{what}: {problem}" if what else problem)


def require_within_dtype(name, got, want, dtype, what="") -> None:
    """`got` within TOLERANCE[dtype] of `want` (atol scaled by the reference's magnitude)."""
    problem = mismatch(name, got, want, dtype)
    if problem:
        raise ContractViolation(f"{what}: {problem}" if what else problem)


# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class MoEProblem:
    """One MoE problem under the public API's names (fc1_weight [E, H1, D], H1 = 2H for
    swiglu), with its top_k and activation."""

    x: Tensor
    task_ids: Tensor
    gate_weight: Tensor
    gate_bias: Optional[Tensor]
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor
    top_k: int
    activation: str

    def params(self) -> dict:
        """The floating-point inputs by name (what the gradients are of)."""
        return {name: getattr(self, name) for name in GRAD_NAMES}

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)

    def route_args(self) -> tuple:
        return self.x, self.task_ids, self.gate_weight, self.gate_bias, self.top_k

    def to(self, device=None, dtype=None) -> "MoEProblem":
        """A copy on `device`, its floating-point tensors cast to `dtype` (when given)."""
        def move(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name))
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), Tensor)})


def moe_problem(T: int, D: int, H: int, E: int, NT: int, k: int = 2, activation="gelu", *,
                dtype=torch.float32, device="cpu", task_pool=None, bias_boost=None,
                gate_scale: float = 1.0, seed: int = 0) -> MoEProblem:
    """Random MoE inputs: T tokens of width D, E experts of hidden H, NT tasks, top-k.

    task_pool: the task ids tokens may carry (default all). bias_boost: added to every task's
    gate bias, one value per expert (large negative values leave experts idle). gate_scale:
    multiplies the router (0 makes every probability equal: exact ties; large, sharp logits).
    Values are drawn in float64 and cast, so every dtype sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    H1 = 2 * H if activation == "swiglu" else H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    pool = torch.tensor(list(task_pool) if task_pool is not None else list(range(NT)))
    task_ids = pool[torch.randint(0, len(pool), (T,), generator=gen)]
    gate_bias = rand(NT, E, scale=0.5)
    if bias_boost is not None:
        gate_bias = gate_bias + torch.tensor(bias_boost, dtype=dtype)
    problem = MoEProblem(
        x=rand(T, D), task_ids=task_ids, gate_weight=rand(NT, E, D, scale=D ** -0.5) * gate_scale,
        gate_bias=gate_bias * gate_scale, fc1_weight=rand(E, H1, D, scale=D ** -0.5),
        fc1_bias=rand(E, H1, scale=0.1), fc2_weight=rand(E, D, H, scale=H ** -0.5),
        fc2_bias=rand(E, D, scale=0.1), top_k=k, activation=activation)
    return problem.to(device)


# name -> (T, D, H, E, NT, k, options of moe_problem): the edge cases
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
# The cases the protocol functions are checked at one by one, and (the self-test's share of
# CASES: the protocol checks cover the rest) the whole public chain through autograd.
PROTOCOL_CASES = ("odd_dims", "idle_experts", "idle_tasks", "all_on_one_expert", "27_tasks")
PUBLIC_OPS_CASES = ("single_token", "odd_dims", "k_equals_E", "idle_tasks")


def case_problem(case: str, activation="gelu", dtype=torch.float32, device="cpu") -> MoEProblem:
    T, D, H, E, NT, k, options = CASES[case]
    return moe_problem(T, D, H, E, NT, k, activation, dtype=dtype, device=device, **options)


# ---------------------------------------------------------------------------------------
# Running the public ops
# ---------------------------------------------------------------------------------------
def run_public_ops(params: dict, task_ids, k, activation):
    """task_topk_route then expert_mlp with the selected backend -> y, logits, probs,
    weights, experts, routing."""
    routing = task_topk_route(params["x"], task_ids, params["gate_weight"], params["gate_bias"],
                              top_k=k)
    y = expert_mlp(params["x"], routing, params["fc1_weight"], params["fc1_bias"],
                   params["fc2_weight"], params["fc2_bias"], activation=activation)
    return y, routing.logits, routing.probs, routing.weights, routing.experts, routing


def forward_backward(fn, params: dict, task_ids, k, activation, seed=1):
    """Run fn (like run_public_ops) on leaf copies, backprop a random combination of y,
    logits, probs and weights (every path into the router) -> (outputs, gradients)."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in params.items()}
    y, logits, probs, weights, experts, *_ = fn(leaves, task_ids, k, activation)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out.float() * torch.randn(out.shape, generator=gen).to(out.device)).sum()
               for out in (y, logits, probs, weights))
    loss.backward()
    outs = dict(y=y.detach(), logits=logits.detach(), probs=probs.detach(),
                weights=weights.detach(), experts=experts)
    grads = {name: leaves[name].grad for name in GRAD_NAMES if name in leaves}
    return outs, grads


def require_all_close(got: dict, want: dict, atol, rtol, what: str) -> None:
    """Every entry of `want` matched in `got` (a missing gradient is a violation)."""
    for name in want:
        require(got[name] is not None, f"{what}: no gradient for {name}")
        g, w = got[name], want[name]
        if name != "experts":
            g, w = g.float(), w.float()
        require_close(name, g, w, atol, rtol, what)


def _public_run(backend, problem: MoEProblem, seed=1):
    with use_backend(backend):
        return forward_backward(run_public_ops, problem.params(), problem.task_ids,
                                problem.top_k, problem.activation, seed)


def _random_like(tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            for t in tensors]


# ---------------------------------------------------------------------------------------
# The MoE contract
# ---------------------------------------------------------------------------------------
def check_public_ops(backend: str, case: str, activation: str, device="cpu") -> None:
    """The public ops forward and every gradient equal the reference's at an edge case."""
    problem = case_problem(case, activation, device=device)
    got, got_grads = _public_run(backend, problem)
    want, want_grads = _public_run(REFERENCE, problem)
    require_all_close(got, want, *FP32_OUTPUTS, f"{backend} {case}/{activation}")
    require_all_close(got_grads, want_grads, *FP32_GRADIENTS,
                      f"{backend} grads {case}/{activation}")


def _require_like(name, got, want, dtype, fp32_tolerance, what):
    """Same dtype and shape, and close: within `fp32_tolerance` (atol, rtol) for fp32 (and
    float64) inputs, within TOLERANCE[dtype] for 16-bit ones."""
    require(got.dtype == want.dtype and got.shape == want.shape,
            f"{what}: {name}: {got.dtype} {list(got.shape)}, expected {want.dtype} "
            f"{list(want.shape)}")
    if dtype in (torch.float32, torch.float64):
        require_close(name, got, want, *fp32_tolerance, what)
    else:
        require_within_dtype(name, got, want, dtype, what)


def check_routing(backend: str, case: str, activation="gelu", device="cpu",
                  dtype=torch.float32) -> Routing:
    """route_forward and route_backward of the backend equal the reference's on the same
    inputs: every Routing field (integers exactly, fp32 fields within 1e-6), the gradients
    with and without a gate bias. Returns the backend's Routing."""
    impl, ref = backend_module(backend), backend_module(REFERENCE)
    problem = case_problem(case, activation, dtype, device)
    what = f"{backend} route {case} {str(dtype).replace('torch.', '')}"
    got_route = impl.route_forward(*problem.route_args())
    want_route = ref.route_forward(*problem.route_args())
    require(isinstance(got_route, Routing) and got_route.top_k == problem.top_k,
            f"{what}: route_forward must return a Routing with top_k {problem.top_k}")
    for name in Routing._fields[:-1]:
        got, want = getattr(got_route, name), getattr(want_route, name)
        _require_like(name, got, want, torch.float32, (1e-6, 1e-5), what)
    if case == "idle_experts":
        require(bool((got_route.counts[3:] == 0).all()), f"{what}: idle experts got tokens")
    if case == "all_on_one_expert":
        require(got_route.counts.tolist() == [0, 0, problem.x.shape[0], 0],
                f"{what}: counts {got_route.counts.tolist()}")
    # backward with random upstream gradients (the same routing on both sides)
    upstream = _random_like([got_route.logits, got_route.probs, got_route.weights], seed=1)
    args = (*upstream, problem.x, problem.task_ids, problem.gate_weight)
    for name, got, want in zip(("grad_x", "grad_gate_weight", "grad_gate_bias"),
                               impl.route_backward(*args, True, got_route),
                               ref.route_backward(*args, True, got_route)):
        _require_like(name, got, want, dtype, (1e-5, 1e-5), what)
    require(impl.route_backward(*args, False, got_route)[2] is None,
            f"{what}: grad_gate_bias must be None without a gate bias")
    return got_route


def check_experts(backend: str, case: str, activation: str, device="cpu",
                  dtype=torch.float32) -> None:
    """experts_forward and experts_backward of the backend equal the reference's on the same
    inputs and routing: y, the saved h_pre and expert_out rows, every gradient."""
    impl, ref = backend_module(backend), backend_module(REFERENCE)
    problem = case_problem(case, activation, dtype, device)
    what = f"{backend} experts {case}/{activation} {str(dtype).replace('torch.', '')}"
    route = ref.route_forward(*problem.route_args())
    weights = problem.expert_weights()
    got_fwd = impl.experts_forward(problem.x, route, weights, activation)
    want_fwd = ref.experts_forward(problem.x, route, weights, activation)
    for name, got, want in zip(("y", "h_pre", "expert_out"), got_fwd, want_fwd):
        _require_like(name, got, want, dtype, (1e-5, 1e-5), what)
    (grad_y,) = _random_like([want_fwd[0]], seed=2)
    got_x, got_rw, got_w = impl.experts_backward(grad_y, problem.x, route, weights, activation,
                                                 *got_fwd[1:])
    want_x, want_rw, want_w = ref.experts_backward(grad_y, problem.x, route, weights,
                                                   activation, *want_fwd[1:])
    require(isinstance(got_w, ExpertWeights),
            f"{what}: experts_backward must return an ExpertWeights of the gradients")
    for name, got, want in [("grad_x", got_x, want_x), ("grad_weights", got_rw, want_rw),
                            *zip(ExpertWeights._fields, got_w, want_w)]:
        _require_like(name, got, want, dtype, (1e-5, 1e-4), what)


def check_missing_upstream_gradients(backend: str, device="cpu") -> None:
    """Only y (or only the routing weights) reaching the loss: the other gradients are zeros
    the op makes, equal to the reference's."""
    problem = moe_problem(9, 8, 6, 4, 3, 2, device=device)
    results = {}
    for name in (REFERENCE, backend):
        leaves = {n: t.clone().requires_grad_(True) for n, t in problem.params().items()}
        with use_backend(name):
            y, _, _, weights, _, _ = run_public_ops(leaves, problem.task_ids, 2, "gelu")
            (y.square().sum() + weights[:, 0].sum()).backward()
        results[name] = {n: leaves[n].grad for n in GRAD_NAMES}
    require_all_close(results[backend], results[REFERENCE], *FP32_GRADIENTS,
                      f"{backend} with missing upstream gradients")


def check_ties(backend: str, device="cpu") -> None:
    """Exact ties go to the lower expert index, in the choice and in its order."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).to(device)
    with use_backend(backend):
        r = task_topk_route(x, torch.tensor([0, 1, 0, 1, 1], device=device),
                            torch.zeros(2, 6, 4, device=device), None, top_k=3)
    require(r.experts.tolist() == [[0, 1, 2]] * 5,
            f"{backend}: a zero router must choose experts 0, 1, 2, got {r.experts.tolist()}")
    require_close("weights", r.weights.cpu(), torch.full((5, 3), 1 / 3), 1e-6, 1e-6,
                  f"{backend} ties")
    # identical router rows for experts 1 and 3 of every task: they tie pairwise
    p = moe_problem(50, 6, 4, 5, 3, device=device)
    p.gate_weight[:, 3] = p.gate_weight[:, 1]
    p.gate_bias[:, 3] = p.gate_bias[:, 1]
    with use_backend(backend):
        r = task_topk_route(p.x, p.task_ids, p.gate_weight, p.gate_bias, top_k=2)
    experts = r.experts.cpu()
    tied = (experts == 1).any(dim=1) & (experts == 3).any(dim=1)
    only_one = (experts == 1).any(dim=1) ^ (experts == 3).any(dim=1)
    require(bool(tied.any() and only_one.any()), "the tie problem lacks a tied token")
    for t in tied.nonzero().flatten().tolist():  # both picked: 1 must come first
        require(experts[t].tolist().index(1) < experts[t].tolist().index(3),
                f"{backend}: tied experts 1 and 3 ordered {experts[t].tolist()}")
    require(not bool((experts[only_one] == 3).any()),
            f"{backend}: a tie went to the higher expert index")
    flat = experts.reshape(-1)
    require(torch.equal(r.sorted_slots.cpu(), torch.sort(flat, stable=True).indices),
            f"{backend}: sorted_slots is not the stable sort of the experts")
    require(torch.equal(r.offsets.cpu()[1:], torch.cumsum(torch.bincount(flat, minlength=5), 0)),
            f"{backend}: offsets are not those of the experts")


def check_nan_policy(backend: str, device="cpu") -> None:
    """NaN/Inf propagate into the affected tokens only; experts stay in range."""
    p = moe_problem(8, 6, 5, 4, 2, 2)
    p.x[3, 2] = float("nan")
    p.gate_weight[p.task_ids[5], 1, 0] = float("inf")
    p = p.to(device)
    with use_backend(backend):
        y, _, probs, _, experts, routing = run_public_ops(p.params(), p.task_ids, 2, "gelu")
    y, probs, experts, task_ids = y.cpu(), probs.cpu(), experts.cpu(), p.task_ids.cpu()
    require(bool(((experts >= 0) & (experts < 4)).all()), f"{backend}: experts out of range")
    require(int(routing.offsets[-1]) == 16 and int(routing.counts.sum()) == 16,
            f"{backend}: a NaN token lost its slots")
    require(bool(torch.isnan(probs[3]).all() and torch.isnan(y[3]).all()),
            f"{backend}: NaN in x did not propagate")
    clean = (task_ids != task_ids[5]) & (torch.arange(8) != 3)
    require(bool(clean.any() and torch.isfinite(y[clean]).all()),
            f"{backend}: a bad token leaked into others")


def check_empty_batch(backend: str, device="cpu") -> None:
    """T = 0: empty outputs, zero gradients of the right shapes."""
    problem = moe_problem(0, 6, 5, 3, 2, 2, device=device)
    leaves = {n: t.clone().requires_grad_(True) for n, t in problem.params().items()}
    with use_backend(backend):
        y, logits, _, _, _, routing = run_public_ops(leaves, problem.task_ids, 2, "gelu")
        (y.sum() + logits.sum()).backward()
    require(tuple(y.shape) == (0, 6) and routing.offsets.tolist() == [0, 0, 0, 0]
            and routing.sorted_slots.numel() == 0, f"{backend}: wrong empty-batch outputs")
    for name in GRAD_NAMES:
        grad = leaves[name].grad
        require(grad is not None and grad.shape == leaves[name].shape and bool((grad == 0).all()),
                f"{backend}: empty batch gradient of {name}")


def check_half_precision(backend: str, dtype: torch.dtype, device="cpu") -> None:
    """16-bit inputs: the same expert choices as fp32 (fp32 routing math), fp32 routing
    outputs, y and every gradient in the dtype within 3% of the fp32 reference's scale."""
    problem = moe_problem(300, 40, 24, 8, 27, 2, dtype=dtype, device=device)
    params, task_ids = problem.params(), problem.task_ids
    params32 = {name: t.float() for name, t in params.items()}
    with use_backend(backend):
        y, _, probs, weights, experts, _ = run_public_ops(params, task_ids, 2, "gelu")
    with use_backend(REFERENCE):
        y32, _, probs32, _, experts32, _ = run_public_ops(params32, task_ids, 2, "gelu")
    what = f"{backend} {str(dtype).replace('torch.', '')}"
    require(y.dtype == dtype and probs.dtype == torch.float32 and weights.dtype == torch.float32,
            f"{what}: output dtypes y {y.dtype}, probs {probs.dtype}, weights {weights.dtype}")
    require(torch.equal(experts, experts32), f"{what}: other experts than fp32 chose")
    require_close("probs", probs, probs32, 1e-5, 1e-4, what)
    require_close("y", y.float(), y32, 3e-2, 3e-2, what)
    grads = {}
    for name, p, backend_name in (("half", params, backend), ("fp32", params32, REFERENCE)):
        leaves = {n: t.clone().requires_grad_(True) for n, t in p.items()}
        with use_backend(backend_name):
            run_public_ops(leaves, task_ids, 2, "gelu")[0].float().square().sum().backward()
        grads[name] = {n: leaves[n].grad for n in GRAD_NAMES}
    for name in GRAD_NAMES:
        got, want = grads["half"][name], grads["fp32"][name]
        require(got.dtype == dtype, f"{what}: gradient of {name} is {got.dtype}")
        err = (got.float() - want).abs().max().item() / (want.abs().max().item() + 1e-6)
        require(err < 3e-2, f"{what}: gradient of {name}: max error {err:.3g} of its scale")


def check_non_contiguous(backend: str, device="cpu") -> None:
    """Strided inputs give exactly what contiguous ones do."""
    problem = moe_problem(9, 6, 5, 4, 3, 2, device=device)

    def run_with_views(p, task_ids, k, activation):
        p = dict(p)
        p["x"] = torch.stack([p["x"], p["x"]], dim=2)[:, :, 0]
        p["fc1_weight"] = p["fc1_weight"].transpose(1, 2).contiguous().transpose(1, 2)
        return run_public_ops(p, task_ids, k, activation)

    with use_backend(backend):
        got, got_grads = forward_backward(run_public_ops, problem.params(), problem.task_ids,
                                          2, "gelu")
        strided, strided_grads = forward_backward(run_with_views, problem.params(),
                                                  problem.task_ids, 2, "gelu")
    require_all_close(strided, got, 1e-6, 1e-5, f"{backend} non-contiguous")
    require_all_close(strided_grads, got_grads, 1e-6, 1e-5, f"{backend} non-contiguous grads")


def check_autocast(backend: str, device="cpu") -> None:
    """Under a caller's autocast the ops keep their dtypes: fp32 routing outputs, results
    equal to the same call without autocast."""
    problem = moe_problem(24, 16, 12, 4, 3, 2, dtype=torch.bfloat16, device=device)
    results = []
    for enabled in (False, True):
        leaves = {n: t.clone().requires_grad_(True) for n, t in problem.params().items()}
        with use_backend(backend), torch.autocast(torch.device(device).type,
                                                    dtype=torch.bfloat16, enabled=enabled):
            y, logits, probs, weights, _, _ = run_public_ops(leaves, problem.task_ids, 2, "gelu")
            (y.float().square().sum() + probs.sum()).backward()
        require(logits.dtype == probs.dtype == weights.dtype == torch.float32
                and y.dtype == torch.bfloat16,
                f"{backend}: autocast changed the output dtypes")
        results.append((y.detach(), logits.detach(), {n: t.grad for n, t in leaves.items()}))
    (y0, l0, g0), (y1, l1, g1) = results
    require_all_close({"y": y1, "logits": l1, **g1}, {"y": y0, "logits": l0, **g0}, 0, 0,
                      f"{backend} under autocast")


def check_gradcheck(backend: str, activation: str, device="cpu") -> None:
    """float64 gradcheck of the whole public chain (routing + experts) through the custom
    ops; a backend without float64 refuses it with a TypeError naming itself."""
    problem = moe_problem(6, 5, 3, 3, 2, 2, activation, dtype=torch.float64, device=device)
    params, task_ids = problem.params(), problem.task_ids
    if torch.float64 not in BACKEND_DTYPES[backend]:
        try:
            with use_backend(backend):
                run_public_ops(params, task_ids, 2, activation)
        except TypeError as err:
            require(f"backend {backend!r} does not support torch.float64" in str(err),
                    f"{backend}: float64 refused with {err}")
            return
        raise ContractViolation(f"{backend}: float64 inputs were not refused")
    names = list(params)

    def fn(*tensors):
        return run_public_ops(dict(zip(names, tensors)), task_ids, 2, activation)[:4]

    inputs = tuple(t.clone().requires_grad_(True) for t in params.values())
    with use_backend(backend):
        require(torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, raise_exception=False),
                f"{backend}: float64 gradcheck failed ({activation})")


def check_custom_ops(backend: str, device="cpu") -> None:
    """torch.library.opcheck of the custom ops (schema, fake implementation, autograd
    registration, AOT dispatch) on the backend's real outputs."""
    for activation in ACTIVATIONS:
        problem = moe_problem(7, 6, 5, 3, 2, 2, activation, device=device)
        p = {n: t.requires_grad_(True) for n, t in problem.params().items()}
        task_ids = problem.task_ids
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
# The attention contract
# ---------------------------------------------------------------------------------------
def dinov3_rope(n_patch_tokens: int, head_dim: int, batch=None, device="cpu"):
    """sin/cos like DINOv3's axial RoPE on a near-square grid (coordinates jittered per image
    when `batch` is given, like the training-time augmentation). [L, d] or [B, L, d]."""
    side = max(1, math.isqrt(n_patch_tokens))
    idx = torch.arange(n_patch_tokens, dtype=torch.float64)
    coords = torch.stack(((idx // side + 0.5) / side, (idx % side + 0.5) / side), -1) * 2 - 1
    if batch is not None:
        coords = coords * torch.linspace(0.5, 2.0, batch, dtype=torch.float64)[:, None, None]
    periods = 100 ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))
    angles = 2 * math.pi * coords[..., None] / periods  # [..., L, 2, d/4]
    angles = angles.flatten(-2).tile(2)  # y then x, then tiled twice to d
    return angles.sin().float().to(device), angles.cos().float().to(device)


def make_qkv(batch, heads, n, head_dim, dtype, device="cpu", contiguous=False, seed=None):
    """q, k, v leaves; non-contiguous ones are views of one [B, N, 3, heads, d] qkv tensor,
    as a ViT block makes them."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if contiguous:
        return [randn(batch, heads, n, head_dim).requires_grad_(True) for _ in range(3)]
    views = randn(batch, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, d]
    return [views[i].detach().requires_grad_(True) for i in range(3)]


def attention_forward_backward(q, k, v, grad, **kwargs):
    """out, dq, dk, dv of attention(q, k, v, **kwargs) backpropagating `grad`."""
    for t in (q, k, v):
        t.grad = None
    out = attention(q, k, v, **kwargs)
    out.backward(grad)
    return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def check_attention_matches_reference(q, k, v, rope, prefix, backend, atol, rtol=1e-3) -> None:
    """Forward and the q, k, v gradients of `backend` against the attention reference
    (upstream gradient transposed: non-contiguous); errors within atol x scale + rtol x
    scale of each output."""
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(q.shape[:2] + q.shape[2:][::-1], generator=gen).to(
        device=q.device, dtype=q.dtype).transpose(-1, -2)
    got = attention_forward_backward(q, k, v, grad, rope=rope, num_prefix_tokens=prefix,
                                     backend=backend)
    want = attention_forward_backward(q, k, v, grad, rope=rope, num_prefix_tokens=prefix,
                                      backend="reference")
    require(got[0].dtype == q.dtype and got[0].shape == q.shape,
            f"{backend}: attention output {got[0].dtype} {list(got[0].shape)}")
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = w.float().abs().max().item() + 1e-6
        err = (g.float() - w.float()).abs().max().item()
        require(err <= atol * max(1.0, scale) + rtol * scale,
                f"{backend} attention {name}: max error {err:.3g} (reference max {scale:.3g})")


# (N, prefix tokens) of the attention contract: less than one block; several blocks with a
# tail and DINOv3's 5 prefix tokens
ATTENTION_CASES = ((5, 0), (70, 5))
# (atol, rtol) against the fp32 reference, per input dtype
ATTENTION_TOLERANCE = {torch.float32: (5e-5, 1e-3), torch.float16: (4e-3, 4e-3),
                       torch.bfloat16: (3e-2, 3e-2)}


def check_attention(backend: str, dtype=torch.float32, device="cpu", head_dim=64) -> None:
    """The attention backend with and without RoPE, with and without prefix tokens, strided
    q/k/v, against the reference."""
    for rope in (False, True):
        for n, prefix in ATTENTION_CASES:
            q, k, v = make_qkv(2, 2, n, head_dim, dtype, device, seed=n)
            tables = dinov3_rope(n - prefix, head_dim, device=device) if rope else None
            check_attention_matches_reference(q, k, v, tables, prefix if rope else 0, backend,
                                              *ATTENTION_TOLERANCE[dtype])
