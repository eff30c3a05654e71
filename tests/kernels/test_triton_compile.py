"""The Triton kernels compiled for sm_90 and sm_80 without a GPU (m2dino_kernels.inspect).

Every config autotune can choose, at every launch site and shape class, must compile, use no
spill, fit the target's shared memory, and run its dots on tensor cores (exact fp32 "ieee"
dots have no tensor-core form and are exempt). Compiling runs in a process pool, one per core.
Runs wherever Triton is installed; nothing is launched.
"""
import os

import pytest

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("compiles the GPU configs: needs TRITON_INTERPRET unset", allow_module_level=True)

from m2dino_kernels import inspect as kernel_inspect  # noqa: E402


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def compiled(request):
    return kernel_inspect.inspect_all(archs=(request.param,), dtypes=("bf16", "fp32"))


def test_recorded_launches_cover_every_kernel():
    """The launch recorder reaches every kernel of the Triton backends."""
    names = {launch.kernel.split("[")[0] for launch in kernel_inspect.record_launches(("bf16",))}
    assert {"_fc1_kernel", "_grouped_scatter_kernel", "_dhidden_kernel", "_weight_grad_kernel",
            "_route_kernel", "_route_backward_kernel", "_route_weight_grad_kernel",
            "_attention_forward_kernel", "_attention_backward_dkdv_kernel",
            "_attention_backward_dq_kernel"} <= names


def test_bf16_choosable_configs_compile_clean(compiled):
    bad = kernel_inspect.problems([r for r in compiled if r["dtype"] == "bf16"])
    assert not bad, "\n".join(bad)


def test_fp32_choosable_configs_compile_clean(compiled):
    bad = kernel_inspect.problems([r for r in compiled if r["dtype"] == "fp32"])
    assert not bad, "\n".join(bad)


def test_every_launch_keeps_a_config(compiled):
    """Pruning never leaves a launch without a config that can run."""
    kept = {}
    for r in compiled:
        kept.setdefault((r["kernel"], r["shape"]), []).append(not r["pruned"])
    assert all(any(v) for v in kept.values())
