"""Task-conditioned MoE MLP side by side: routing alone, routing + expert MLP forward, and
forward+backward, for every backend this device runs, the `naive` loop over tasks and experts
(as public task-MoE code does it), and the dense MLP of hidden k*H on the same tokens (the
FLOP floor). E=8, k=2, 27 tasks mixed: every token draws its task, so all 27 tasks are present
in every case (the kernels issue's setup; with the task per image, 16 images could carry at most
16 tasks). The `_by_image` case gives every token of an image the image's task, as the model
does, for comparison."""
import pytest
import torch
import torch.nn.functional as F

from harness import DEVICE, matmul_peak, recorded

import m2dino_kernels as mk
from m2dino_kernels.reference import naive_task_moe

E, K, NUM_TASKS = 8, 2, 27
if DEVICE == "cuda":
    DTYPE = torch.bfloat16
    SHAPES = {  # name: (images, tokens per image, D, H)
        "vit_s_201": (64, 201, 384, 1536),
        "vit_b_201": (64, 201, 768, 3072),
        "vit_b_201_by_image": (64, 201, 768, 3072),
        "vit_l_201": (64, 201, 1024, 4096),
        "vit_b_1029": (16, 1029, 768, 3072),
    }
    TARGET_SHAPE = "vit_b_201"
else:  # scaled to what 2 cores measure in seconds; vit_s_201 is the CPU target shape
    DTYPE = torch.float32
    SHAPES = {
        "vit_s_201": (16, 201, 384, 1536),
        "vit_s_201_by_image": (16, 201, 384, 1536),
        "vit_b_201": (4, 201, 768, 3072),
        "vit_l_201": (2, 201, 1024, 4096),
        "vit_s_1029": (2, 1029, 384, 1536),
    }
    TARGET_SHAPE = "vit_s_201"

BACKENDS = [b for b in mk.available_backends(DEVICE) if b not in ("naive", "auto")]
if DEVICE == "cpu":  # the Triton interpreter is a correctness tool, not a speed path
    BACKENDS = [b for b in BACKENDS if b != "triton"]
# the targets are against `naive` (the loop over the stacked expert weights); `naive_split` is
# the same loop over per-expert tensors, shown beside it
NAIVE = ["naive", "naive_split"]


def make_problem(shape_name, requires_grad):
    images, n, d, h = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    t = images * n

    def param(*size, scale):
        p = (torch.randn(*size, generator=g) * scale).to(DEVICE, DTYPE)
        return p.requires_grad_(requires_grad)

    x = param(t, d, scale=1.0)
    if shape_name.endswith("_by_image"):
        task_ids = torch.randint(0, NUM_TASKS, (images,), generator=g).repeat_interleave(n).to(DEVICE)
    else:
        task_ids = torch.randint(0, NUM_TASKS, (t,), generator=g).to(DEVICE)
    p = dict(
        gate_weight=param(NUM_TASKS, E, d, scale=d ** -0.5), gate_bias=param(NUM_TASKS, E, scale=0.1),
        fc1_weight=param(E, h, d, scale=d ** -0.5), fc1_bias=param(E, h, scale=0.02),
        fc2_weight=param(E, d, h, scale=h ** -0.5), fc2_bias=param(E, d, scale=0.02),
    )
    dense = dict(  # the dense MLP with the same active FLOPs: hidden k*H
        w1=param(K * h, d, scale=d ** -0.5), b1=param(K * h, scale=0.02),
        w2=param(d, K * h, scale=(K * h) ** -0.5), b2=param(d, scale=0.02),
    )
    return x, task_ids, p, dense


def moe_forward(backend, x, task_ids, p):
    if backend in ("naive", "naive_split"):
        return naive_task_moe(x, task_ids, p["gate_weight"], p["gate_bias"], K, p["fc1_weight"],
                              p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], activation="gelu",
                              split_experts=backend == "naive_split")
    with mk.use_backend(backend):
        routing = mk.task_topk_route(x, task_ids, p["gate_weight"], p["gate_bias"], top_k=K)
        return mk.expert_mlp(x, routing, p["fc1_weight"], p["fc1_bias"], p["fc2_weight"],
                             p["fc2_bias"], activation="gelu")


def dense_forward(x, w):
    return F.linear(F.gelu(F.linear(x, w["w1"], w["b1"])), w["w2"], w["b2"])


def expert_flops(shape):
    images, n, d, h = shape
    return 2 * images * n * K * (d * h + h * d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_routing(measure, shape_name, backend):
    x, task_ids, p, _ = make_problem(shape_name, requires_grad=False)

    def route():
        with mk.use_backend(backend):
            mk.task_topk_route(x, task_ids, p["gate_weight"], p["gate_bias"], top_k=K)

    measure(f"routing {shape_name}", backend, route, rounds=10)


@pytest.mark.parametrize("variant", BACKENDS + NAIVE + ["dense"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_moe_mlp_forward(measure, shape_name, variant):
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=False)
    with torch.no_grad():
        fn = (lambda: dense_forward(x, dense)) if variant == "dense" else (lambda: moe_forward(variant, x, task_ids, p))
        measure(f"moe_mlp_fwd {shape_name}", variant, fn, flops=expert_flops(SHAPES[shape_name]), rounds=5)


@pytest.mark.parametrize("variant", BACKENDS + NAIVE + ["dense"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_moe_mlp_forward_backward(measure, shape_name, variant):
    shape = SHAPES[shape_name]
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=True)
    grad = torch.randn_like(x)
    leaves = [x, *p.values(), *dense.values()]

    def step():
        for t in leaves:
            t.grad = None
        y = dense_forward(x, dense) if variant == "dense" else moe_forward(variant, x, task_ids, p)
        y.backward(grad)

    measure(f"moe_mlp_fwdbwd {shape_name}", variant, step, flops=3 * expert_flops(shape),
            rounds=5 if DEVICE == "cuda" or variant not in NAIVE else 3)


def test_targets_moe():
    """The issue's ratio targets, each from measurements of this run on this device."""
    case = f"moe_mlp_fwdbwd {TARGET_SHAPE}"
    dense, naive = recorded(case, "dense"), recorded(case, "naive")
    fastest = min((recorded(case, b) for b in BACKENDS if b != "torch"), key=lambda m: m.seconds,
                  default=None)
    if fastest is None:
        pytest.skip("no compiled backend was measured")
    failures = []
    if DEVICE == "cpu":
        cpp = recorded(case, "cpp")
        if cpp.seconds > 1.1 * dense.seconds:
            failures.append(f"cpp {cpp.seconds / dense.seconds:.3f}x the dense floor (target <= 1.1x)")
        if naive.seconds < 5 * cpp.seconds:
            failures.append(f"cpp only {naive.seconds / cpp.seconds:.2f}x faster than naive (target >= 5x)")
    else:
        if fastest.seconds > 1.15 * dense.seconds:
            failures.append(f"{fastest.variant} {fastest.seconds / dense.seconds:.3f}x the dense floor (target <= 1.15x)")
        if naive.seconds < 5 * fastest.seconds:
            failures.append(f"{fastest.variant} only {naive.seconds / fastest.seconds:.2f}x faster than naive")
        peak = matmul_peak()
        if peak and fastest.tflops < 0.5 * peak:
            failures.append(f"expert GEMMs at {fastest.tflops / peak:.0%} of the matmul rate (target >= 50%)")
        route = recorded(f"routing {TARGET_SHAPE}", fastest.variant)
        if route.seconds > 0.05 * fastest.seconds:
            failures.append(f"routing {route.seconds / fastest.seconds:.1%} of the MoE MLP time (target < 5%)")
    assert not failures, "; ".join(failures)
