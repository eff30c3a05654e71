"""No host reads inside the MoE backbone, few in a model forward, one per training step.

A read back to the host is a device sync on a GPU (the CPU waits for the GPU to catch up).
They are counted here on CPU tensors, in eager mode, by wrapping the tensor methods and torch
functions that read values (`item`, `tolist`, `int()`, `float()`, `bool()`, `nonzero`,
`unique`, `cpu`, `numpy`): a TorchFunctionMode would see the forward only (the autograd
engine runs backward code without it). Only calls made from m2dino's and m2dino_kernels' own
source count: the Triton interpreter's internal numpy use is no device read.
"""
import contextlib
import sys
from pathlib import Path

import pytest
import torch

import m2dino_kernels as mk
from m2dino import create_model

ROOT = Path(__file__).resolve().parents[2]
OURS = (str(ROOT / "m2dino") + "/", str(ROOT / "m2dino_kernels") + "/")
METHODS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "unique", "cpu", "numpy")
FUNCTIONS = ("nonzero", "unique")
TASKS = ["fetal_head", "breast_3cls", "IUGC", "thyroid_nodule_det"]


@contextlib.contextmanager
def count_host_reads():
    """Yields the list of reads ("file:line name") made from our source while it is open."""
    reads = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS):
                reads.append(f"{Path(caller).relative_to(ROOT)}:{sys._getframe(1).f_lineno} {name}")
            return original(*args, **kwargs)
        return wrapper

    saved_methods = {n: getattr(torch.Tensor, n) for n in METHODS}
    saved_functions = {n: getattr(torch, n) for n in FUNCTIONS}
    try:
        for name, original in saved_methods.items():
            setattr(torch.Tensor, name, counting(name, original))
        for name, original in saved_functions.items():
            setattr(torch, name, counting(f"torch.{name}", original))
        yield reads
    finally:
        for name, original in saved_methods.items():
            setattr(torch.Tensor, name, original)
        for name, original in saved_functions.items():
            setattr(torch, name, original)


def test_the_counter_sees_forward_and_backward_reads():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            grad.tolist()
            return grad * 2

    x = torch.randn(3, requires_grad=True)
    with count_host_reads() as reads:
        int(x[0])  # this file is not ours: not counted
    assert reads == []
    import m2dino.models.moe as moe_module
    with count_host_reads() as reads:
        moe_module.validate_task_ids(torch.tensor([0, 1]), 2, 3)
    assert len(reads) == 1 and "tolist" in reads[0]
    saved = OURS
    try:
        globals()["OURS"] = (str(Path(__file__).resolve()),)
        with count_host_reads() as reads:
            ReadsInBackward.apply(x).sum().backward()
    finally:
        globals()["OURS"] = saved
    assert [r.split()[-1] for r in reads] == ["tolist"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dinov3_tiny", TASKS, num_experts=4, top_k=2, moe_layers=2, img_size=32)


def _backends():
    names = [b for b in mk.available_backends("cpu")]
    return [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in names]


@pytest.mark.parametrize("backend", _backends())
def test_moe_backbone_forward_and_backward_read_nothing_back(model, backend):
    images = torch.randn(3, 3, 32, 32)
    task_ids = torch.tensor([2, 0, 2])
    with mk.use_backend(backend), count_host_reads() as reads:
        features = model.backbone.forward_features(images, task_ids=task_ids, check_task_ids=False)
        features["x_norm_patchtokens"].square().mean().backward()
    if backend == "reference":
        # the oracle loops over the experts on the host by design (`auto` never picks it on a GPU)
        assert reads and all(r.startswith("m2dino_kernels/reference.py") for r in reads), reads
    else:
        assert reads == [], reads
    model.zero_grad()


def test_model_forward_reads_at_most_two_plus_one_per_task(model):
    images = torch.randn(5, 3, 32, 32)
    task_ids = model.task_index(["IUGC", "fetal_head", "IUGC", "breast_3cls", "thyroid_nodule_det"])
    model.train()
    with count_host_reads() as reads:
        out = model(images, task_ids)
    present = len(out["tasks"])
    assert present == 4 and len(reads) <= 2 + present, reads
    assert len(reads) == 2, reads  # the id check and the per-task counts, on the host copy


def test_the_backbone_compiles_with_fullgraph(model):
    torch._dynamo.reset()
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    task_ids = torch.tensor([1, 3])
    compiled = torch.compile(model.backbone.forward_features, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(images, task_ids=task_ids)["x_norm_clstoken"]
        expected = model.backbone.forward_features(images, task_ids=task_ids)["x_norm_clstoken"]
    torch.testing.assert_close(got, expected)


def test_a_training_step_reads_once_and_logs_read_at_log_steps(tiny_suite, tiny_config, tmp_path, monkeypatch):
    from m2dino.training import loop as loop_module
    from m2dino.training.study import run

    calls = []
    original = loop_module.host_values

    def counted(*tensors):
        calls.append(len(tensors))
        return original(*tensors)

    monkeypatch.setattr(loop_module, "host_values", counted)
    suite = tiny_suite(["breast_2cls", "lung"], min_train=8, min_val=4)
    run(tiny_config(suite, tmp_path / "run", steps=6, log_every=3, warmup=0))
    # 6 steps: one read of (loss, grad norm) each; the parts read at steps 3 and 6 (3 and 6 are
    # also the epoch ends: 16 samples / batch 4 = 4 steps per epoch, so step 4 ends epoch 1)
    steps = [n for n in calls if n == 2]
    logs = [n for n in calls if n != 2]
    assert len(steps) == 6, calls
    assert len(logs) == 3, calls
