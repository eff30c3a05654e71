"""Task-conditioned MoE MLP side by side: routing alone, routing + expert MLP forward, and
forward+backward, for every backend this device runs (the library floor `grouped_mm` among
them), on GPU also `auto` (the autotuner measuring afresh in this run; its choice is recorded
with the measurement), the `naive` loop over tasks and experts (as public task-MoE code does
it), and the dense MLP of hidden k*H on the same tokens (the FLOP floor). E=8, k=2, 27 tasks
mixed: every token draws its task, so all 27 tasks are present in every case (the kernels
issue's setup; with the task per image, 16 images could carry at most 16 tasks). The
`_by_image` case gives every token of an image the image's task, as the model does, for
comparison. The backends, auto and dense of a case are timed round-robin (measure_peers): their
ratios are what the targets assert, and sequential timing let a burst of other load on a
shared machine land on one of them; the naive loops (seconds per call) are timed apart."""
import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, RESULTS, autotuned, choices, matmul_peak, recorded

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

BACKENDS = [b for b in mk.available_backends(DEVICE) if DTYPE in mk.backends.BACKEND_DTYPES[b]]
if DEVICE == "cpu":  # the Triton interpreter is a correctness tool, not a speed path
    BACKENDS = [b for b in BACKENDS if b != "triton"]
# On GPU `auto` measures (m2dino_kernels.selection); on CPU it is cpp by rule, measured as cpp already.
AUTO = ["auto"] if DEVICE == "cuda" else []


def with_backend(backend, fn):
    """fn run under `backend`; `auto` measures afresh (harness.autotuned): (run, tuner)."""
    if backend == "auto":
        def run_auto():
            with mk.use_backend("auto"):
                return fn()
        return autotuned(run_auto)

    def run():
        with mk.use_backend(backend):
            return fn()
    return run, None


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
    """The MoE MLP under `backend` (the selected one when None)."""
    if backend in ("naive", "naive_split"):
        return naive_task_moe(x, task_ids, p["gate_weight"], p["gate_bias"], K, p["fc1_weight"],
                              p["fc1_bias"], p["fc2_weight"], p["fc2_bias"], activation="gelu",
                              split_experts=backend == "naive_split")
    if backend is not None:
        with mk.use_backend(backend):
            return moe_forward(None, x, task_ids, p)
    routing = mk.task_topk_route(x, task_ids, p["gate_weight"], p["gate_bias"], top_k=K)
    return mk.expert_mlp(x, routing, p["fc1_weight"], p["fc1_bias"], p["fc2_weight"],
                         p["fc2_bias"], activation="gelu")


def dense_forward(x, w):
    return F.linear(F.gelu(F.linear(x, w["w1"], w["b1"])), w["w2"], w["b2"])


def expert_flops(shape):
    images, n, d, h = shape
    return 2 * images * n * K * (d * h + h * d)


PEERS = BACKENDS + AUTO + ["dense"]  # timed round-robin within each case (measure_peers)


def _record_choices(case, tuners):
    for variant, tuner in tuners.items():
        RESULTS[case][variant].extra.update(choices(tuner))


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_routing(measure_peers, shape_name):
    x, task_ids, p, _ = make_problem(shape_name, requires_grad=False)
    fns, tuners = {}, {}
    for backend in BACKENDS + AUTO:
        fns[backend], tuners[backend] = with_backend(backend, lambda: mk.task_topk_route(
            x, task_ids, p["gate_weight"], p["gate_bias"], top_k=K))
    measure_peers(f"routing {shape_name}", fns, rounds=10)
    _record_choices(f"routing {shape_name}", tuners)


def _variant_step(variant, x, task_ids, p, dense):
    if variant == "dense":
        return lambda: dense_forward(x, dense), None
    if variant in NAIVE:
        return lambda: moe_forward(variant, x, task_ids, p), None
    return with_backend(variant, lambda: moe_forward(None, x, task_ids, p))


def _forward_backward_step(variant, x, task_ids, p, dense, grad):
    leaves = [x, *p.values(), *dense.values()]
    forward, tuner = _variant_step(variant, x, task_ids, p, dense)

    def step():
        for t in leaves:
            t.grad = None
        forward().backward(grad)

    return step, tuner


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_moe_mlp_forward(measure_peers, shape_name):
    """Every backend, auto (GPU) and the dense floor, round-robin."""
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=False)
    steps = {v: _variant_step(v, x, task_ids, p, dense) for v in PEERS}
    case = f"moe_mlp_fwd {shape_name}"
    with torch.no_grad():
        measure_peers(case, {v: fn for v, (fn, _) in steps.items()},
                      flops=expert_flops(SHAPES[shape_name]), rounds=20)
    _record_choices(case, {v: tuner for v, (_, tuner) in steps.items()})


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_moe_mlp_forward_backward(measure_peers, shape_name):
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=True)
    grad = torch.randn_like(x)
    steps = {v: _forward_backward_step(v, x, task_ids, p, dense, grad) for v in PEERS}
    case = f"moe_mlp_fwdbwd {shape_name}"
    measure_peers(case, {v: fn for v, (fn, _) in steps.items()},
                  flops=3 * expert_flops(SHAPES[shape_name]), rounds=10)
    _record_choices(case, {v: tuner for v, (_, tuner) in steps.items()})


@pytest.mark.parametrize("variant", NAIVE)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_naive_forward(measure, shape_name, variant):
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=False)
    fn, _ = _variant_step(variant, x, task_ids, p, dense)
    with torch.no_grad():
        measure(f"moe_mlp_fwd {shape_name}", variant, fn, flops=expert_flops(SHAPES[shape_name]),
                rounds=5)


@pytest.mark.parametrize("variant", NAIVE)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_naive_forward_backward(measure, shape_name, variant):
    x, task_ids, p, dense = make_problem(shape_name, requires_grad=True)
    step, _ = _forward_backward_step(variant, x, task_ids, p, dense, torch.randn_like(x))
    measure(f"moe_mlp_fwdbwd {shape_name}", variant, step,
            flops=3 * expert_flops(SHAPES[shape_name]), rounds=5 if DEVICE == "cuda" else 3)


def test_targets_moe():
    """The issue's ratio targets, each from measurements of this run on this device."""
    case = f"moe_mlp_fwdbwd {TARGET_SHAPE}"
    dense, naive = recorded(case, "dense"), recorded(case, "naive")
    failures = []
    if DEVICE == "cpu":
        cpp = recorded(case, "cpp")
        if cpp.seconds > 1.1 * dense.seconds:
            failures.append(f"cpp {cpp.seconds / dense.seconds:.3f}x the dense floor (target <= 1.1x)")
        if naive.seconds < 5 * cpp.seconds:
            failures.append(f"cpp only {naive.seconds / cpp.seconds:.2f}x faster than naive (target >= 5x)")
        for name, variants in RESULTS.items():  # cpp never slower than the reference
            if name.startswith("moe_mlp") and "cpp" in variants and "reference" in variants:
                ratio = variants["cpp"].seconds / variants["reference"].seconds
                if ratio > 1.0:
                    failures.append(f"{name}: cpp {ratio:.3f}x the reference backend (target <= 1)")
    else:
        auto = recorded(case, "auto")
        if auto.seconds > 1.15 * dense.seconds:
            failures.append(f"auto ({auto.extra.get('choice_expert_mlp')}) "
                            f"{auto.seconds / dense.seconds:.3f}x the dense floor (target <= 1.15x)")
        library = RESULTS.get(case, {}).get("grouped_mm")
        if library is not None and auto.seconds > 1.02 * library.seconds:  # 2%: timing noise
            failures.append(f"auto {auto.seconds * 1e3:.3f} ms slower than grouped_mm "
                            f"{library.seconds * 1e3:.3f} ms")
        if naive.seconds < 5 * auto.seconds:
            failures.append(f"auto only {naive.seconds / auto.seconds:.2f}x faster than naive")
        peak = matmul_peak()
        if peak and auto.tflops < 0.5 * peak:
            failures.append(f"expert GEMMs at {auto.tflops / peak:.0%} of the dense bf16 matmul "
                            "rate (target >= 50%)")
        route = recorded(f"routing {TARGET_SHAPE}", "auto")
        if route.seconds > 0.05 * auto.seconds:
            failures.append(f"routing {route.seconds / auto.seconds:.1%} of the MoE MLP time (target < 5%)")
    assert not failures, "; ".join(failures)
