"""How a backend's outputs are compared with the reference's: the tolerances, and the rules
for tensors and for a routing (where a near-tie may go either way).

Used by `auto`'s in-process trials (m2dino_kernels.trials, m2dino_kernels.autotune) and by
the backend contract (m2dino_kernels.contract).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from m2dino_kernels.backends import routing_dtype

# (atol relative to the reference's largest magnitude, rtol) per dtype: what different
# accumulation orders and roundings of a correct kernel stay within in `auto`'s trials.
# fp32 allows for TF32.
TOLERANCE = {
    torch.float64: (1e-8, 1e-8),
    torch.float32: (2e-3, 2e-3),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def difference(name: str, got: Optional[Tensor], want: Optional[Tensor], atol: float,
               rtol: float) -> Optional[str]:
    """None when `got` equals `want` within |got - want| <= atol + rtol * |want| (integer
    tensors exactly; NaN and infinities in the same places), else why not, with the worst
    difference."""
    if want is None or got is None:
        return None if got is None and want is None else f"{name}: one side is missing"
    if tuple(got.shape) != tuple(want.shape):
        return f"{name}: shape {list(got.shape)}, expected {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype}, expected {want.dtype}"
    if want.numel() == 0:
        return None
    if not want.is_floating_point():
        return None if torch.equal(got.cpu(), want.cpu()) else f"{name}: integer values differ"
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        if not torch.equal(test(g), test(w)):
            return f"{name}: {what} in different places"
    finite = torch.isfinite(w)
    g, w = g[finite], w[finite]
    if w.numel() == 0:
        return None
    diff = (g - w).abs()
    if bool((diff > atol + rtol * w.abs()).any()):
        return (f"{name}: max |difference| {float(diff.max()):.3g} exceeds atol {atol:.3g} + "
                f"rtol {rtol:g} x |reference| (reference max {float(w.abs().max()):.3g})")
    return None


def mismatch(name: str, got: Optional[Tensor], want: Optional[Tensor],
             dtype: torch.dtype) -> Optional[str]:
    """None when `got` agrees with `want` within TOLERANCE of `dtype` (atol scaled by the
    reference's largest magnitude), else why not: the rule of `auto`'s trials."""
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    scale = 1.0
    if want is not None and want.numel() and want.is_floating_point():
        finite = want[torch.isfinite(want)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1.0)
    return difference(name, got, want, atol * scale, rtol)


def route_mismatch(got, want, dtype) -> Optional[str]:
    """None when a backend's routing (Routing, (grad_x, grad_gate_weight, grad_gate_bias))
    agrees with the reference's: logits and probs within the tolerance; each chosen expert
    among the reference's top-k up to the fp32 tolerance (a near-tie may go either way);
    weights equal where the choices are; the permutation the stable sort of its own choices;
    the gradients within the dtype's tolerance."""
    (got_r, got_grads), (want_r, want_grads) = got, want
    fp32 = routing_dtype(dtype)
    for name in ("logits", "probs"):
        problem = mismatch(name, getattr(got_r, name), getattr(want_r, name), fp32)
        if problem:
            return problem
    experts, probs, top_k = got_r.experts, want_r.probs, want_r.top_k
    if experts.shape != want_r.experts.shape or experts.dtype != torch.int64:
        return f"experts: shape {list(experts.shape)} / dtype {experts.dtype}"
    if experts.numel():
        num_experts = probs.shape[1]
        if bool(((experts < 0) | (experts >= num_experts)).any()):
            return "experts: out of range"
        atol = TOLERANCE[torch.float32][0]
        kth = probs.sort(dim=1, descending=True).values[:, top_k - 1:top_k]
        chosen = probs.gather(1, experts)
        finite = torch.isfinite(chosen).all(dim=1)
        if bool((chosen[finite] < kth[finite] - atol).any()):
            return "experts: an expert outside the reference's top-k was chosen"
        same = (experts == want_r.experts).all(dim=1)
        problem = mismatch("weights", got_r.weights[same], want_r.weights[same], fp32)
        if problem:
            return problem
    flat = experts.reshape(-1)
    counts = torch.zeros(probs.shape[1], dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    if not torch.equal(got_r.sorted_slots, torch.sort(flat, stable=True).indices):
        return "sorted_slots: not the stable sort of its experts"
    if not (torch.equal(got_r.counts, counts)
            and torch.equal(got_r.offsets[1:], counts.cumsum(0))
            and int(got_r.offsets[0]) == 0):
        return "counts/offsets: not those of its experts"
    for name, g, w in zip(("grad_x", "grad_gate_weight", "grad_gate_bias"), got_grads,
                          want_grads):
        problem = mismatch(name, g, w, dtype)
        if problem:
            return problem
    return None
