"""The backend conformance suite: every MoE kernel backend held to the same contract.

The contract itself is m2dino_kernels.contract (its check functions are what the self-test,
`python -m m2dino_kernels.selftest`, runs in a child process per backend); this suite runs
every check for every backend on every device it may run on (CPU; CUDA, skipped without a
GPU; a backend that cannot run on a device here is skipped there): the public ops forward and
every gradient at the edge cases (one token, one expert, k = E, idle experts, tasks with no
tokens, every token on one expert, 27 tasks), the four protocol functions themselves (Routing
fields exactly, saved activations, gradients), missing upstream gradients, ties to the lower
expert, the NaN policy, the empty batch, half precision, non-contiguous inputs, autocast, the
torch.library registration (opcheck), a float64 gradcheck where the backend takes float64
(its refusal where it does not); and every misuse of the public API raising a clear error
before a kernel runs. A new backend is one registry entry (m2dino_kernels.registry.
register_backend), and so one more parameter here.
"""
from __future__ import annotations

import pytest
import torch

import m2dino_kernels as mk
from m2dino_kernels import contract, registry

HAS_CUDA = torch.cuda.is_available()


def _runs(name: str, device: str) -> bool:
    if device == "cuda" and not HAS_CUDA:
        return False
    return name in registry.available_backends(device)


def _param(name: str, device: str):
    marks = [pytest.mark.skipif(not _runs(name, device),
                                reason=f"backend {name!r} cannot run on {device} here")]
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    return pytest.param(name, device, marks=marks, id=f"{name}-{device}")


# every registered backend on every device it may run on (the GPU ones skipped without a GPU)
BACKENDS = [_param(name, device) for device in ("cpu", "cuda")
            for name in registry.concrete_backends()]
CPU_BACKENDS = [_param(name, "cpu") for name in registry.concrete_backends()]
ACTIVATIONS = list(contract.ACTIVATIONS)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", list(contract.CASES))
def test_public_ops_match_reference(backend, device, case, activation):
    contract.check_public_ops(backend, case, activation, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", contract.PROTOCOL_CASES)
def test_protocol_functions_match_reference(backend, device, case, activation):
    contract.check_routing(backend, case, activation, device)
    contract.check_experts(backend, case, activation, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_missing_upstream_gradients_count_as_zero(backend, device):
    contract.check_missing_upstream_gradients(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ties_go_to_the_lower_expert(backend, device):
    contract.check_ties(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_and_experts_stay_in_range(backend, device):
    contract.check_nan_policy(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_batch(backend, device):
    contract.check_empty_batch(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_tolerance(backend, device, dtype):
    if registry.interpreter_bf16(backend, device, dtype):
        pytest.skip("the Triton interpreter's bf16 dot is wrong: bf16 triton is GPU-only")
    contract.check_half_precision(backend, dtype, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    contract.check_non_contiguous(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_autocast_does_not_recast_inside_the_ops(backend, device):
    if registry.interpreter_bf16(backend, device, torch.bfloat16):
        pytest.skip("the Triton interpreter's bf16 dot is wrong: bf16 triton is GPU-only")
    contract.check_autocast(backend, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64_or_a_clear_refusal(backend, device, activation):
    contract.check_gradcheck(backend, activation, device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck_custom_ops(backend, device):
    contract.check_custom_ops(backend, device)


def test_a_broken_backend_breaks_the_contract(monkeypatch):
    """The checks can fail: the reference with y 10% off breaks check_public_ops and
    check_experts, naming y and its error; one that drops a gradient breaks the gradient
    checks."""
    import sys
    import types

    from m2dino_kernels import reference as ref

    wrong = types.ModuleType("m2dino_test_wrong_backend")
    wrong.__dict__.update({n: getattr(ref, n) for n in ("route_forward", "route_backward",
                                                        "experts_backward")})

    def experts_forward(*args):
        y, h_pre, expert_out = ref.experts_forward(*args)
        return y * 1.1, h_pre, expert_out

    wrong.experts_forward = experts_forward
    monkeypatch.setitem(sys.modules, wrong.__name__, wrong)
    registry.register_backend("wrong", wrong.__name__, (torch.float32,), ("cpu",), compiled=False)
    try:
        with pytest.raises(contract.ContractViolation, match=r"y: max \|difference\|"):
            contract.check_public_ops("wrong", "odd_dims", "gelu")
        with pytest.raises(contract.ContractViolation, match=r"experts odd_dims/gelu float32: y"):
            contract.check_experts("wrong", "odd_dims", "gelu")
        contract.check_routing("wrong", "odd_dims")  # its routing is the reference's
    finally:
        registry.unregister_backend("wrong")


# ---------------------------------------------------------------------------------------
# Misuse: every bad call raises a clear Python error, whichever backend is selected (CPU
# tensors: the validation runs before any kernel, the same for every device)
# ---------------------------------------------------------------------------------------
def _good():
    problem = contract.moe_problem(6, 4, 3, 3, 2, 2)
    return problem.params(), problem.task_ids


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
