"""The Triton kernels compiled for sm_90 and sm_80 without a GPU (python -m m2dino_kernels.inspect).

Every config autotune can choose, at every launch site and shape class, must compile, use no
spill, fit the target's shared memory, and run its dots on tensor cores (exact fp32 "ieee"
dots have no tensor-core form and are exempt). The tool runs in a subprocess without
TRITON_INTERPRET (the suite sets it) and compiles in a process pool, one per core. Nothing is
launched on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from m2dino_kernels import inspect as kernel_inspect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _has_triton_cuda_backend():
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module", params=[90, 80], ids=["sm_90", "sm_80"])
def compiled(request, tmp_path_factory):
    if not _has_triton_cuda_backend():
        pytest.skip("triton has no CUDA backend")
    out = tmp_path_factory.mktemp(f"inspect{request.param}") / "inspect.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "m2dino_kernels.inspect", "--arch", str(request.param),
                           "--dtype", "bf16,fp32", "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_every_kernel_is_reached(compiled):
    """The launch recorder reaches every kernel of the Triton backends, in both dtypes."""
    for dtype in ("bf16", "fp32"):
        names = {r["kernel"].split("[")[0] for r in compiled if r["dtype"] == dtype}
        assert {"_fc1_kernel", "_grouped_scatter_kernel", "_dhidden_kernel", "_weight_grad_kernel",
                "_route_kernel", "_route_backward_kernel", "_route_weight_grad_kernel",
                "_attention_forward_kernel", "_attention_backward_dkdv_kernel",
                "_attention_backward_dq_kernel"} <= names, dtype


def test_bf16_choosable_configs_compile_clean(compiled):
    bad = kernel_inspect.problems([r for r in compiled if r["dtype"] == "bf16"])
    assert not bad, "\n".join(bad)


def test_fp32_choosable_configs_compile_clean(compiled):
    bad = kernel_inspect.problems([r for r in compiled if r["dtype"] == "fp32"])
    assert not bad, "\n".join(bad)


def test_every_launch_keeps_a_config(compiled):
    """Pruning never leaves a launch without a config."""
    kept = {}
    for r in compiled:
        kept.setdefault((r["kernel"], r["shape"]), []).append(not r["pruned"])
    assert all(any(v) for v in kept.values())


def test_preset_shapes_match_the_backbone_presets():
    from m2dino.models.backbone import PRESETS
    expected = sorted((name, c.embed_dim, c.mlp_hidden, "swiglu" if c.ffn == "swiglu" else "gelu",
                       c.head_dim) for name, c in PRESETS.items() if c.official)
    assert sorted(kernel_inspect.PRESET_SHAPES) == expected
