"""Public MoE ops: task-conditioned top-k routing and the grouped expert MLP.

This module is the only door to the backends. It
- validates every argument (ValueError / TypeError naming the argument and its shape),
- makes inputs contiguous,
- exposes each op as a torch.library custom op in the `m2dino` namespace, with a fake (meta)
  implementation and autograd registered, and the concrete backend name passed as a string
  argument, so torch.compile traces one op per call with no graph break,
- dispatches to the backend module chosen by m2dino_kernels.selection (for `auto` on the
  devices it tunes, measured on the call's inputs), handing it the Routing and ExpertWeights
  NamedTuples of the backend protocol (m2dino_kernels.backends),
- runs the backends with autocast off: a caller's autocast region (the model's) has already
  fixed the dtype of the inputs, and the backends' fp32 accumulation and output dtypes must
  not be recast by it inside the op.

Dtypes: x and all weights share one dtype: float32, bfloat16, float16 (or float64 with the
"reference" backend, for gradcheck). Routing outputs (logits, probs, weights) are float32
(float64 for float64 inputs); accumulation is always fp32.

Range checks: task ids are checked against the number of tasks inside the op, on the real
tensors (one device-to-host sync per routing call on GPU: correctness beats that sync).
Expert ids in a Routing are produced in range by task_topk_route; expert_mlp re-checks them
on CPU tensors only (free there), and on CUDA checks only the shapes. A caller that has
validated its task ids once for many calls (M2DINO checks the B per-image ids at its entry)
passes `check_task_ids=False` / `check_routing=False` and the ops then read nothing back to
the host: the shape, dtype and device checks always run.

NaN policy: NaN/Inf in x or the gate weights propagate into logits, probs and outputs; the
routing of such a token is undefined but its experts stay in [0, E), so nothing is ever read
out of bounds. Nothing is silently clamped or zeroed.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from m2dino_kernels import registry, selection, trials
from m2dino_kernels.backends import ROUTING_TENSORS, ExpertWeights, Routing, no_autocast, routing_dtype
from m2dino_kernels.registry import REFERENCE

__all__ = ["ACTIVATIONS", "ExpertWeights", "Routing", "expert_mlp", "task_topk_route"]

ACTIVATIONS = ("gelu", "swiglu")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------
def _require_tensor(value, name):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_shape(tensor, name, expected, meaning):
    """expected: tuple of ints (or None for 'any'), meaning: the same shape in words."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(
        want is None or have == want for have, want in zip(shape, expected))
    if not ok:
        raise ValueError(f"{name} must have shape {meaning}, got {list(shape)}")


def _require_same(tensor, name, ref, ref_name):
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but {ref_name} has {ref.dtype}; "
                        "they must match")
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}; "
                         "they must be on the same device")


def _check_backend_dtype(backend, dtype):
    supported = registry.BACKEND_DTYPES[backend]
    if dtype not in supported:
        raise TypeError(f"kernel backend {backend!r} does not support {dtype}; it supports "
                        f"{', '.join(str(d) for d in supported)} (backend {REFERENCE!r} supports "
                        f"{', '.join(str(d) for d in _DTYPES)})")


def _is_int(value) -> bool:
    """Python or numpy integers (not bool, not float, not tensors)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_route(x, task_ids, gate_weight, gate_bias, top_k):
    _require_tensor(x, "x")
    _require_tensor(task_ids, "task_ids")
    _require_tensor(gate_weight, "gate_weight")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, D], got {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    num_tokens, dim = x.shape
    if task_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    _require_shape(task_ids, "task_ids", (num_tokens,), f"[T] = [{num_tokens}] (one per row of x)")
    if task_ids.device != x.device:
        raise ValueError(f"task_ids is on {task_ids.device} but x is on {x.device}")
    if gate_weight.dim() != 3:
        raise ValueError(f"gate_weight must have shape [num_tasks, E, D], "
                         f"got {list(gate_weight.shape)}")
    num_tasks, num_experts, gate_dim = gate_weight.shape
    if gate_dim != dim:
        raise ValueError(f"gate_weight has shape {list(gate_weight.shape)}: its last dim "
                         f"{gate_dim} must equal D = {dim} of x {list(x.shape)}")
    if num_tasks < 1 or num_experts < 1:
        raise ValueError(f"gate_weight must have at least one task and one expert, got "
                         f"shape {list(gate_weight.shape)}")
    _require_same(gate_weight, "gate_weight", x, "x")
    if gate_bias is not None:
        _require_tensor(gate_bias, "gate_bias")
        _require_shape(gate_bias, "gate_bias", (num_tasks, num_experts),
                       f"[num_tasks, E] = [{num_tasks}, {num_experts}]")
        _require_same(gate_bias, "gate_bias", x, "x")
    if not _is_int(top_k):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E] = [1, {num_experts}], got {top_k}")


def _validate_experts(x, routing, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation):
    _require_tensor(x, "x")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be the Routing returned by task_topk_route, "
                        f"got {type(routing).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"x must have shape [T, D], got {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")
    num_tokens, dim = x.shape
    _require_tensor(fc1_weight, "fc1_weight")
    _require_tensor(fc2_weight, "fc2_weight")
    if fc1_weight.dim() != 3:
        raise ValueError(f"fc1_weight must have shape [E, H1, D], got {list(fc1_weight.shape)}")
    num_experts, hidden_in, fc1_dim = fc1_weight.shape
    if fc1_dim != dim:
        raise ValueError(f"fc1_weight has shape {list(fc1_weight.shape)}: its last dim must "
                         f"equal D = {dim} of x {list(x.shape)}")
    if fc2_weight.dim() != 3:
        raise ValueError(f"fc2_weight must have shape [E, D, H], got {list(fc2_weight.shape)}")
    if activation == "swiglu" and hidden_in % 2 != 0:
        raise ValueError(f"swiglu needs an even fc1 output size H1 = 2H, got fc1_weight "
                         f"{list(fc1_weight.shape)} (H1 = {hidden_in})")
    expected_hidden = hidden_in // 2 if activation == "swiglu" else hidden_in
    _require_shape(fc2_weight, "fc2_weight", (num_experts, dim, expected_hidden),
                   f"[E, D, H] = [{num_experts}, {dim}, {expected_hidden}] for {activation} "
                   f"with fc1_weight {list(fc1_weight.shape)}")
    _require_same(fc1_weight, "fc1_weight", x, "x")
    _require_same(fc2_weight, "fc2_weight", x, "x")
    if fc1_bias is not None:
        _require_tensor(fc1_bias, "fc1_bias")
        _require_shape(fc1_bias, "fc1_bias", (num_experts, hidden_in),
                       f"[E, H1] = [{num_experts}, {hidden_in}]")
        _require_same(fc1_bias, "fc1_bias", x, "x")
    if fc2_bias is not None:
        _require_tensor(fc2_bias, "fc2_bias")
        _require_shape(fc2_bias, "fc2_bias", (num_experts, dim), f"[E, D] = [{num_experts}, {dim}]")
        _require_same(fc2_bias, "fc2_bias", x, "x")

    top_k = routing.top_k
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"routing.top_k must be an int in [1, E] = [1, {num_experts}], "
                         f"got {top_k!r}")
    fields = {
        "routing.weights": (routing.weights, (num_tokens, top_k), f"[T, k] = [{num_tokens}, {top_k}]"),
        "routing.experts": (routing.experts, (num_tokens, top_k), f"[T, k] = [{num_tokens}, {top_k}]"),
        "routing.sorted_slots": (routing.sorted_slots, (num_tokens * top_k,),
                                 f"[T*k] = [{num_tokens * top_k}]"),
        "routing.offsets": (routing.offsets, (num_experts + 1,),
                            f"[E+1] = [{num_experts + 1}] (E from fc1_weight)"),
    }
    for name in ("logits", "probs", "counts"):  # carried along, unused by the experts
        _require_tensor(getattr(routing, name), f"routing.{name}")
    for name, (tensor, shape, meaning) in fields.items():
        _require_tensor(tensor, name)
        _require_shape(tensor, name, shape, meaning)
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if routing.weights.dtype != routing_dtype(x.dtype):
        raise TypeError(f"routing.weights must be {routing_dtype(x.dtype)} for x of dtype "
                        f"{x.dtype}, got {routing.weights.dtype}")
    for name in ("routing.experts", "routing.sorted_slots", "routing.offsets"):
        if fields[name][0].dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {fields[name][0].dtype}")


def _check_task_range(task_ids, num_tasks):
    # One host sync on GPU; see the module docstring.
    if task_ids.numel() == 0:
        return
    low, high = int(task_ids.min()), int(task_ids.max())
    if low < 0 or high >= num_tasks:
        raise ValueError(f"task_ids must be in [0, num_tasks) = [0, {num_tasks}) (num_tasks "
                         f"from gate_weight), got values in [{low}, {high}]")


def _check_routing_values(routing: Routing, num_experts: int):
    """Index ranges of a Routing: free on CPU, skipped on GPU (it would cost a sync)."""
    experts, sorted_slots, offsets = routing.experts, routing.sorted_slots, routing.offsets
    if experts.device.type != "cpu" or experts.numel() == 0:
        return
    if int(experts.min()) < 0 or int(experts.max()) >= num_experts:
        raise ValueError(f"routing.experts must be in [0, E) = [0, {num_experts})")
    num_slots = sorted_slots.numel()
    if int(sorted_slots.min()) < 0 or int(sorted_slots.max()) >= num_slots:
        raise ValueError(f"routing.sorted_slots must be in [0, T*k) = [0, {num_slots})")
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_slots or bool((offsets.diff() < 0).any()):
        raise ValueError(f"routing.offsets must rise from 0 to T*k = {num_slots}")


def _zeros_if_none(grad, like, dtype=None):
    if grad is None:
        return torch.zeros(like.shape, dtype=like.dtype if dtype is None else dtype,
                           device=like.device)
    return grad.contiguous()


# ---------------------------------------------------------------------------------------
# Custom ops. Their schemas carry a Routing as Routing.tensors() and the expert parameters
# as the list of an ExpertWeights; the backends get the NamedTuples back.
# ---------------------------------------------------------------------------------------
# (a tuple, not a list: autograd then hands each output's gradient to the backward)
_RoutingTensors = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("m2dino::task_topk_route", mutates_args=())
def _route_op(x: Tensor, task_ids: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor],
              top_k: int, backend: str, check_task_ids: bool = True) -> _RoutingTensors:
    if check_task_ids:
        _check_task_range(task_ids, gate_weight.shape[0])
    with no_autocast(x):
        routing = registry.backend_module(backend).route_forward(x, task_ids, gate_weight,
                                                                 gate_bias, top_k)
    return tuple(routing.tensors())


@_route_op.register_fake
def _route_fake(x, task_ids, gate_weight, gate_bias, top_k, backend, check_task_ids=True):
    num_tokens = x.shape[0]
    num_experts = gate_weight.shape[1]
    fdt = routing_dtype(x.dtype)
    idx = dict(dtype=torch.int64, device=x.device)
    fake = Routing(logits=x.new_empty(num_tokens, num_experts, dtype=fdt),
                   probs=x.new_empty(num_tokens, num_experts, dtype=fdt),
                   weights=x.new_empty(num_tokens, top_k, dtype=fdt),
                   experts=torch.empty(num_tokens, top_k, **idx),
                   counts=torch.empty(num_experts, **idx),
                   sorted_slots=torch.empty(num_tokens * top_k, **idx),
                   offsets=torch.empty(num_experts + 1, **idx), top_k=top_k)
    return tuple(fake.tensors())


@torch.library.custom_op("m2dino::task_topk_route_backward", mutates_args=())
def _route_backward_op(grad_logits: Tensor, grad_probs: Tensor, grad_weights: Tensor,
                       x: Tensor, task_ids: Tensor, gate_weight: Tensor, has_bias: bool,
                       routing: list[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with no_autocast(x):
        grad_x, grad_gw, grad_gb = registry.backend_module(backend).route_backward(
            grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight, has_bias,
            Routing.from_tensors(routing))
    if grad_gb is None:  # custom ops cannot return None: a zero stand-in, dropped in autograd
        grad_gb = gate_weight.new_zeros(gate_weight.shape[:2])
    return grad_x, grad_gw, grad_gb


@_route_backward_op.register_fake
def _route_backward_fake(grad_logits, grad_probs, grad_weights, x, task_ids, gate_weight,
                         has_bias, routing, backend):
    return (torch.empty_like(x), torch.empty_like(gate_weight),
            gate_weight.new_empty(gate_weight.shape[:2]))


def _route_setup_context(ctx, inputs, output):
    x, task_ids, gate_weight, gate_bias, _top_k, backend, _check = inputs
    ctx.has_bias = gate_bias is not None
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # unused outputs (counts, slots...) need no zero grads
    ctx.save_for_backward(x, task_ids, gate_weight, *output)


def _route_backward(ctx, grad_logits, grad_probs, grad_weights, *_int_output_grads):
    x, task_ids, gate_weight, *routing = ctx.saved_tensors
    routing = Routing.from_tensors(routing)
    grad_x, grad_gw, grad_gb = _route_backward_op(
        _zeros_if_none(grad_logits, routing.probs), _zeros_if_none(grad_probs, routing.probs),
        _zeros_if_none(grad_weights, routing.weights), x, task_ids, gate_weight, ctx.has_bias,
        routing.tensors(), ctx.backend)
    return grad_x, None, grad_gw, grad_gb if ctx.has_bias else None, None, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


@torch.library.custom_op("m2dino::expert_mlp", mutates_args=())
def _experts_op(x: Tensor, routing: list[Tensor], weights: list[Tensor], activation: str,
                backend: str, check_routing: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    routing = Routing.from_tensors(routing)
    weights = ExpertWeights(*weights)
    if check_routing:
        _check_routing_values(routing, weights.fc1_weight.shape[0])
    with no_autocast(x):
        y, h_pre, expert_out = registry.backend_module(backend).experts_forward(
            x, routing, weights, activation)
    return y, h_pre, expert_out


@_experts_op.register_fake
def _experts_fake(x, routing, weights, activation, backend, check_routing=True):
    num_rows = Routing.from_tensors(routing).sorted_slots.shape[0]
    return (torch.empty_like(x), x.new_empty(num_rows, ExpertWeights(*weights).fc1_weight.shape[1]),
            x.new_empty(num_rows, x.shape[1]))


@torch.library.custom_op("m2dino::expert_mlp_backward", mutates_args=())
def _experts_backward_op(grad_y: Tensor, x: Tensor, routing: list[Tensor],
                         weights: list[Tensor], activation: str, h_pre: Tensor,
                         expert_out: Tensor, backend: str) -> list[Tensor]:
    with no_autocast(x):
        grad_x, grad_routing_weights, grad_weights = registry.backend_module(
            backend).experts_backward(grad_y, x, Routing.from_tensors(routing),
                                      ExpertWeights(*weights), activation, h_pre, expert_out)
    return [grad_x, grad_routing_weights, *grad_weights]


@_experts_backward_op.register_fake
def _experts_backward_fake(grad_y, x, routing, weights, activation, h_pre, expert_out, backend):
    return [torch.empty_like(x), torch.empty_like(Routing.from_tensors(routing).weights),
            *(torch.empty_like(w) for w in weights)]


def _experts_setup_context(ctx, inputs, output):
    x, routing, weights, activation, backend, _check = inputs
    _, h_pre, expert_out = output
    ctx.activation = activation
    ctx.backend = backend
    # h_pre and expert_out never receive gradients: without this autograd would allocate and
    # zero-fill [T*k, H1] and [T*k, D] tensors for them on every backward.
    ctx.set_materialize_grads(False)
    ctx.num_routing = len(routing)
    ctx.save_for_backward(x, h_pre, expert_out, *routing, *weights)


def _experts_backward(ctx, grad_y, _grad_h_pre, _grad_expert_out):
    # h_pre and expert_out are saved activations, never handed to users: only y has a grad.
    x, h_pre, expert_out, *rest = ctx.saved_tensors
    routing, weights = rest[:ctx.num_routing], rest[ctx.num_routing:]
    grad_x, grad_routing_weights, *grad_weights = _experts_backward_op(
        _zeros_if_none(grad_y, x), x, routing, weights, ctx.activation, h_pre, expert_out,
        ctx.backend)
    grad_routing = [grad_routing_weights if name == "weights" else None
                    for name in ROUTING_TENSORS]
    return grad_x, grad_routing, grad_weights, None, None, None


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup_context)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------
def task_topk_route(x, task_ids, gate_weight, gate_bias=None, top_k=2, *,
                    check_task_ids: bool = True) -> Routing:
    """Route each token by the router of its own task.

    x [T, D], task_ids [T] (integer, in [0, num_tasks)), gate_weight [num_tasks, E, D]
    (nn.Linear layout), gate_bias [num_tasks, E] or None. logits[t] = gate_weight[task_t] @
    x[t] + gate_bias[task_t] in fp32; probs = softmax(logits); the top_k experts by
    probability (descending, ties to the lower index); weights = their probabilities
    renormalised to sum to 1. Gradients reach x, gate_weight and gate_bias through
    logits, probs and weights. No device-to-host sync except the task-id range check
    (skipped with check_task_ids=False, for callers that validated the ids already).
    """
    _validate_route(x, task_ids, gate_weight, gate_bias, top_k)
    top_k = int(top_k)
    x, task_ids, gate_weight = (x.contiguous(), task_ids.to(torch.int64).contiguous(),
                                gate_weight.contiguous())
    gate_bias = None if gate_bias is None else gate_bias.contiguous()
    num_tasks, num_experts, dim = gate_weight.shape

    def make_trial():
        if check_task_ids:  # no backend runs on ids out of range
            _check_task_range(task_ids, num_tasks)
        return trials.route_trial(x, task_ids, gate_weight, gate_bias, top_k)

    backend = selection.moe_backend(
        "task_topk_route", x, {"D": dim, "E": num_experts, "k": top_k, "tasks": num_tasks},
        make_trial)
    _check_backend_dtype(backend, x.dtype)
    out = _route_op(x, task_ids, gate_weight, gate_bias, top_k, backend, bool(check_task_ids))
    return Routing.from_tensors(out)


def expert_mlp(x, routing, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation="gelu", *,
               check_routing: bool = True):
    """y[t] = sum_j routing.weights[t, j] * expert_{routing.experts[t, j]}(x[t]). Dropless.

    fc1_weight [E, H1, D], fc1_bias [E, H1], fc2_weight [E, D, H], fc2_bias [E, D]
    (biases may be None: zeros). activation "gelu" (exact erf, H1 = H) or "swiglu"
    (H1 = 2H, hidden = silu(a) * b with a, b = fc1(x).chunk(2)). Gradients reach x, every
    weight and bias, and routing.weights. check_routing=False skips the index-range checks
    of the routing (CPU only; they read values on the host) for a Routing straight from
    task_topk_route.
    """
    _validate_experts(x, routing, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation)
    num_experts, hidden_in, dim = fc1_weight.shape
    if fc1_bias is None:
        fc1_bias = fc1_weight.new_zeros(num_experts, hidden_in)
    if fc2_bias is None:
        fc2_bias = fc2_weight.new_zeros(num_experts, dim)
    x = x.contiguous()
    routing = Routing.from_tensors([t.contiguous() for t in routing.tensors()])
    weights = ExpertWeights(*(w.contiguous() for w in (fc1_weight, fc1_bias, fc2_weight, fc2_bias)))

    def make_trial():
        if check_routing:  # no backend runs on a routing out of range
            _check_routing_values(routing, num_experts)
        return trials.experts_trial(x, routing, weights, activation)

    backend = selection.moe_backend(
        "expert_mlp", x, {"activation": activation, "D": dim, "H": fc2_weight.shape[2],
                          "E": num_experts, "k": routing.top_k}, make_trial)
    _check_backend_dtype(backend, x.dtype)
    y, _, _ = _experts_op(x, routing.tensors(), list(weights), activation, backend,
                          bool(check_routing))
    return y
