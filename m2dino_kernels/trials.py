"""The in-process trials behind a measured `auto`: each op's forward + backward on a call's own
inputs, for any backend, checked against the reference by m2dino_kernels.compare's rules and timed
by m2dino_kernels.autotune.
"""
from __future__ import annotations

import torch

from m2dino_kernels import autotune, compare, registry
from m2dino_kernels.backends import ExpertWeights, Routing, no_autocast, routing_dtype

EXPERT_TRIAL_NAMES = ("y", "h_pre", "expert_out", "grad_x", "grad_weights", "grad_fc1_w",
                      "grad_fc1_b", "grad_fc2_w", "grad_fc2_b")


def _random_like(shape, like, dtype, seed):
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=like.device, dtype=dtype)


def route_trial(x, task_ids, gate_weight, gate_bias, top_k) -> autotune.Trial:
    """Routing forward + backward of a backend on this call's inputs. The backward runs on
    the first run's routing (the reference's), so that a near-tie another backend broke the
    other way does not change the gradients compared."""
    num_tokens, num_experts = x.shape[0], gate_weight.shape[1]
    rdt = routing_dtype(x.dtype)
    upstream = (_random_like((num_tokens, num_experts), x, rdt, 1),
                _random_like((num_tokens, num_experts), x, rdt, 2),
                _random_like((num_tokens, top_k), x, rdt, 3))
    fixed = {}

    def run(name):
        module = registry.backend_module(name)
        with torch.no_grad(), no_autocast(x):
            routing = module.route_forward(x, task_ids, gate_weight, gate_bias, top_k)
            grads = module.route_backward(*upstream, x, task_ids, gate_weight,
                                          gate_bias is not None,
                                          fixed.setdefault("routing", routing))
        return routing, tuple(grads)

    def check(got, want):
        return compare.route_mismatch(got, want, x.dtype)

    return autotune.Trial(run, (), x.dtype, x.device, check=check)


def experts_trial(x, routing: Routing, weights: ExpertWeights, activation: str) -> autotune.Trial:
    """Expert MLP forward + backward of a backend on this call's inputs and routing."""
    grad_y = _random_like(x.shape, x, x.dtype, 4)

    def run(name):
        module = registry.backend_module(name)
        with torch.no_grad(), no_autocast(x):
            y, h_pre, expert_out = module.experts_forward(x, routing, weights, activation)
            grad_x, grad_rw, grad_weights = module.experts_backward(
                grad_y, x, routing, weights, activation, h_pre, expert_out)
        return (y, h_pre, expert_out, grad_x, grad_rw, *grad_weights)

    return autotune.Trial(run, EXPERT_TRIAL_NAMES, x.dtype, x.device)


def attention_trial(functions: dict, q, k, v, rope, num_prefix_tokens) -> autotune.Trial:
    """Forward + backward of an attention backend on copies of this call's inputs (same
    strides; the caller's autocast applies, as in the real call)."""
    with torch.inference_mode(False):
        def copy(t):
            out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            return out.copy_(t.detach())

        leaves = [copy(t).requires_grad_(True) for t in (q, k, v)]
        tables = None if rope is None else tuple(t.detach().clone() for t in rope)
        grad = torch.randn(q.shape, generator=torch.Generator(q.device).manual_seed(5),
                           device=q.device, dtype=q.dtype)

    def run(name):
        with (torch.inference_mode(False), torch.enable_grad(),
              torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
            out = functions[name](*leaves, tables, num_prefix_tokens)
            return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return autotune.Trial(run, ("out", "dq", "dk", "dv"), q.dtype, q.device)
