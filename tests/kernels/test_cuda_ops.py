"""The extension's CUDA kernels (backend "cuda", its expert GEMMs both through
at::_grouped_mm with device offsets and through the per-expert fallback loop) and the library
floor "grouped_mm" against the reference backend, in fp32, fp16 and bf16, and without a host
sync where grouped_mm takes the offsets on the device. Needs a CUDA device (and for "cuda" an
extension built with CUDA): skipped otherwise (the `gpu` marker). Run with
`python -m pytest tests/kernels/test_cuda_ops.py -q`.

The reference runs on CPU on the same inputs upcast to float64 (fp32 for routing outputs),
and with the routing the kernel chose, so that the expert checks do not depend on how a
near-tie was broken in reduced precision."""
from __future__ import annotations

import pytest
import torch

from m2dino_kernels import reference as ref
from m2dino_kernels import registry
from m2dino_kernels.backends import Routing
from m2dino_kernels.contract import moe_problem

_C = registry._C
HAS_CUDA = torch.cuda.is_available()
HAS_CUDA_EXT = HAS_CUDA and "cuda" in registry.available_backends("cuda")  # (not left out)
NEEDS_EXT = pytest.mark.skipif(not HAS_CUDA_EXT, reason="needs a GPU and _C built with CUDA")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
if HAS_CUDA_EXT:
    from m2dino_kernels import extension as ext
# (backend, M2DINO_CUDA_GROUPED_MM): the extension's grouped path (where the device takes it)
# and its fallback loop, and the library floor
PROTOCOL = [pytest.param("cuda", "1", id="cuda-grouped", marks=NEEDS_EXT),
            pytest.param("cuda", "0", id="cuda-loop", marks=NEEDS_EXT),
            pytest.param("grouped_mm", "1", id="grouped_mm", marks=pytest.mark.skipif(
                not HAS_CUDA or "grouped_mm" not in registry.available_backends("cuda"),
                reason="torch's grouped_mm does not run on this GPU"))]


def grouped_mm_on_device():
    """Whether grouped_mm takes the offsets on the device here (bf16, sm90/sm100)."""
    return HAS_CUDA and torch.cuda.get_device_capability()[0] in (9, 10)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, D, H, E, NT, k, gate bias boost or None, task pool or None)
CASES = {
    "single_token": (1, 8, 6, 4, 3, 2, None, None),
    "odd_dims": (33, 7, 5, 3, 2, 2, None, None),
    "one_expert": (6, 8, 6, 1, 2, 1, None, None),
    "k_equals_E": (17, 6, 5, 3, 2, 3, None, None),
    "idle_experts": (40, 8, 6, 6, 2, 2, [0, 0, 0, -30, -30, -30], None),
    "idle_tasks": (41, 8, 6, 4, 5, 2, None, [0, 2]),
    "all_on_one_expert": (300, 16, 8, 4, 3, 1, [0, 0, 30, 0], None),
    "vit_s_like": (16 * 201, 384, 1536, 8, 27, 2, None, None),  # many blocks, long scans
    # aligned sizes (multiples of 8): the grouped GEMM path, with idle experts and tasks
    "aligned_idle_experts": (300, 64, 32, 8, 27, 2, [0, 0, 0, 0, -30, -30, -30, -30], None),
    "aligned_idle_tasks": (257, 32, 64, 4, 5, 1, None, [1, 3]),
}
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}


def close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double().cpu(), want.double(), atol=atol * max(scale, 1.0),
                               rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend,grouped", PROTOCOL)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_protocol_matches_reference(case, dtype, activation, backend, grouped, monkeypatch):
    monkeypatch.setenv("M2DINO_CUDA_GROUPED_MM", grouped)
    ext = registry.backend_module(backend)
    T, D, H, E, NT, k, boost, pool = CASES[case]
    p_cpu = moe_problem(T, D, H, E, NT, k, activation, dtype=dtype, bias_boost=boost,
                        task_pool=pool)
    p = p_cpu.to("cuda")
    p64 = p_cpu.to("cpu", torch.float64)

    # routing: logits/probs/weights vs the reference in float64; the permutation must be
    # the stable sort of the kernel's own expert choices, which must be a top-k of probs
    route = ext.route_forward(*p.route_args())
    route_cpu = Routing.from_tensors([t.cpu() for t in route.tensors()])
    logits, probs, weights, experts, counts, sorted_slots, offsets, _ = route_cpu
    want = ref.route_forward(*p64.route_args())
    assert logits.dtype == probs.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(logits.double(), want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(probs.double(), want.probs, atol=1e-5, rtol=1e-4)
    assert ((experts >= 0) & (experts < E)).all()
    chosen = torch.gather(want.probs, 1, experts)
    kth_best = want.probs.sort(dim=1, descending=True).values[:, k - 1:k]
    assert (chosen >= kth_best - 1e-5).all(), "an expert outside the top-k was chosen"
    assert (chosen[:, :-1] >= chosen[:, 1:] - 1e-5).all(), "choices not by descending prob"
    torch.testing.assert_close(weights.double(), chosen / chosen.sum(1, keepdim=True),
                               atol=1e-5, rtol=1e-4)
    flat = experts.reshape(-1)
    assert torch.equal(sorted_slots, torch.sort(flat, stable=True).indices)
    assert torch.equal(counts, torch.bincount(flat, minlength=E))
    assert offsets[0] == 0 and torch.equal(offsets[1:], torch.cumsum(counts, 0))

    # routing backward (same routing on both sides)
    gen = torch.Generator().manual_seed(1)
    g_logits, g_probs = (torch.randn(T, E, generator=gen) for _ in range(2))
    g_weights = torch.randn(T, k, generator=gen)
    got = ext.route_backward(g_logits.cuda(), g_probs.cuda(), g_weights.cuda(), p.x,
                             p.task_ids, p.gate_weight, True, route)
    route64 = route_cpu._replace(logits=logits.double(), probs=probs.double(),
                                 weights=weights.double())
    want = ref.route_backward(g_logits.double(), g_probs.double(), g_weights.double(), p64.x,
                              p64.task_ids, p64.gate_weight, True, route64)
    for name, g, w in zip(("grad_x", "grad_gate_weight", "grad_gate_bias"), got, want):
        assert g.dtype == dtype, name
        close(g, w, dtype, f"route_backward {name}")

    # experts forward/backward with the kernel's routing
    args = (p.x, route, p.expert_weights(), activation)
    args64 = (p64.x, route64, p64.expert_weights(), activation)
    fwd = ext.experts_forward(*args)
    fwd64 = ref.experts_forward(*args64)
    for name, g, w in zip(("y", "h_pre", "expert_out"), fwd, fwd64):
        assert g.dtype == dtype, name
        close(g, w, dtype, f"experts_forward {name}")
    grad_y = torch.randn(T, D, generator=gen).to(dtype)
    grad_x, grad_rw, grad_params = ext.experts_backward(grad_y.cuda(), *args, *fwd[1:])
    grad_x64, grad_rw64, grad_params64 = ref.experts_backward(grad_y.double(), *args64, *fwd64[1:])
    pairs = [("grad_x", grad_x, grad_x64), ("grad_weights", grad_rw, grad_rw64),
             *zip(("grad_fc1_w", "grad_fc1_b", "grad_fc2_w", "grad_fc2_b"), grad_params,
                  grad_params64)]
    for name, g, w in pairs:
        assert g.dtype == (torch.float32 if name == "grad_weights" else dtype), name
        close(g, w, dtype, f"experts_backward {name}")


@pytest.mark.parametrize("backend,grouped", PROTOCOL)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_expert_gemms_make_no_host_sync(backend, grouped, activation, monkeypatch):
    """bf16 on sm90/sm100 with aligned sizes: the expert forward and backward (grouped GEMMs
    with device offsets) never wait for the device; the loop fallback does, once per call."""
    if not grouped_mm_on_device():
        pytest.skip("grouped_mm takes device offsets on sm90/sm100 only")
    monkeypatch.setenv("M2DINO_CUDA_GROUPED_MM", grouped)
    module = registry.backend_module(backend)
    p = moe_problem(512, 64, 128, 8, 27, 2, activation, dtype=torch.bfloat16, device="cuda",
                    bias_boost=[0] * 7 + [-30])
    route = module.route_forward(*p.route_args())
    args = (p.x, route, p.expert_weights(), activation)
    grad_y = torch.randn_like(p.x)

    def run():
        fwd = module.experts_forward(*args)
        return module.experts_backward(grad_y, *args, *fwd[1:])

    run()
    torch.cuda.synchronize()
    if backend == "cuda" and grouped == "0":
        with pytest.warns(UserWarning, match="synchroniz"):
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, _, grads = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (grads.fc1_weight[7] == 0).all() and (grads.fc2_weight[7] == 0).all()  # idle expert


@NEEDS_EXT
def test_cuda_routing_reads_nothing_out_of_bounds_on_bad_task_ids():
    p = moe_problem(64, 32, 24, 8, 5, 2, device="cuda")
    # Straight into the extension (bypassing moe.py's range check): an out-of-range task id
    # must not read out of bounds; that token gets NaN routing and valid experts.
    bad = p.task_ids.clone()
    bad[3] = 1000
    route = ext.route_forward(p.x, bad, p.gate_weight, p.gate_bias, 2)
    torch.cuda.synchronize()
    experts = route.experts.cpu()
    assert ((experts >= 0) & (experts < 8)).all()
    assert torch.isnan(route.probs[3]).all() and torch.isfinite(route.probs[torch.arange(64) != 3]).all()
    with pytest.raises(RuntimeError, match="is on"):
        ext.route_forward(p.x, p.task_ids.cpu(), p.gate_weight, p.gate_bias, 2)
