"""The Triton kernels compiled for sm_90, sm_80 and sm_86 without a GPU (python -m m2dino_kernels.inspect).

Every config autotune can choose, at every launch site and shape class (the MoE of every
preset at top-k 1 and 2, attention at head dims 32/64/128 with and without RoPE), in bf16,
fp16, fp32 and fp32 with TF32 (every dtype the kernels accept), must compile, use no spill,
fit the target's shared memory, and run its dots on tensor cores (exact fp32 "ieee" dots have
no tensor-core form and are exempt).
sm_86 stands for the cards with 99 KB of shared memory per block (RTX 30xx/40xx, A10, L4,
L40: sm_89 compiles alike). The tool runs in a subprocess without TRITON_INTERPRET (the suite
sets it) and compiles in a process pool, one per core. Nothing is launched on a GPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from m2dino_kernels import inspect as kernel_inspect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", params=[90, 80, 86], ids=["sm_90", "sm_80", "sm_86"])
def compiled(request, tmp_path_factory):
    if not kernel_inspect.cuda_target_available():
        pytest.skip("triton has no CUDA backend")
    out = tmp_path_factory.mktemp(f"inspect{request.param}") / "inspect.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "m2dino_kernels.inspect", "--arch", str(request.param),
                           "--dtype", ",".join(DTYPES), "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


DTYPES = ("bf16", "fp16", "fp32", "tf32")

RECORD = """
import json
from m2dino_kernels import inspect
out = {}
for arch in (80, 90):
    for launch in inspect.record_launches(["bf16", "fp16", "fp32", "tf32"], arch):
        dtype = launch.shape.rsplit(" ", 1)[-1]
        out.setdefault(f"{arch} {dtype}", []).append([launch.shape, launch.kernel, launch.configs, launch.pruned])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def launches():
    """{"<arch> <dtype>": [[shape, kernel, configs, pruned], ...]}: every launch the host code makes."""
    if not kernel_inspect.cuda_target_available():
        pytest.skip("triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", RECORD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_is_reached(launches):
    """The launch recorder reaches every kernel of the Triton backends at both archs. Variants
    that compile alike are recorded once: the kernels with dots in every dtype (tf32 differs
    from fp32 in their precision only), the other floating-point ones in bf16 and fp32, the
    counting sort's (integer keys) once per arch."""
    dots = {"_fc1_kernel", "_grouped_scatter_kernel", "_dhidden_kernel", "_weight_grad_kernel",
            "_attention_forward_kernel", "_attention_backward_dkdv_kernel", "_attention_backward_dq_kernel"}
    others = {"_route_kernel", "_route_backward_kernel", "_route_weight_grad_kernel", "_rope_rotate_kernel",
              "_attention_backward_delta_kernel"}
    sort = {"_block_histogram_kernel", "_block_place_kernel"}
    for arch in (80, 90):
        names = {dtype: {kernel.split("[")[0] for _, kernel, _, _ in launches[f"{arch} {dtype}"]} for dtype in DTYPES}
        for dtype in DTYPES:
            assert dots <= names[dtype], (arch, dtype)
        for dtype in ("bf16", "fp16", "fp32"):
            assert others <= names[dtype], (arch, dtype)
        assert sort <= names["bf16"], arch


@pytest.mark.parametrize("dtype", DTYPES)
def test_choosable_configs_compile_clean(compiled, dtype):
    results = [r for r in compiled if r["dtype"] == dtype]
    assert results
    bad = kernel_inspect.problems(results)
    assert not bad, "\n".join(bad)


def test_every_launch_keeps_a_config(launches):
    """Pruning never leaves a launch without a config."""
    for key, recorded in launches.items():
        empty = [f"{kernel} ({shape})" for shape, kernel, _, pruned in recorded if all(pruned)]
        assert not empty, f"{key}: {empty}"


def _offered(configs, pruned):
    return {(c[0].get("BLOCK_M"), c[0].get("BLOCK_N"), c[0].get("BLOCK_K")) for c, p in zip(configs, pruned) if not p}


def test_configs_follow_dtype_and_activation(launches):
    """The prune picks the launch's share of a kernel's configs: fp32 inputs (exact or TF32)
    only small tiles, SwiGLU's fc1 and dhidden never the 128x128 tiles that GELU's get."""
    for arch in (80, 90):
        row_tiled = [(shape, kernel.split("[")[0], _offered(c, p)) for shape, kernel, c, p in
                     launches[f"{arch} bf16"] if kernel.startswith(("_fc1", "_dhidden"))]
        assert {act for shape, _, _ in row_tiled for act in ("gelu", "swiglu") if act in shape} == {"gelu", "swiglu"}
        for shape, kernel, tiles in row_tiled:
            big = {t for t in tiles if t[0] == t[1] == 128}
            assert bool(big) == ("gelu" in shape), (arch, kernel, shape, tiles)
        for dtype in ("fp32", "tf32"):
            for shape, kernel, c, p in launches[f"{arch} {dtype}"]:
                for bm, bn, _ in _offered(c, p):
                    if bm is not None:
                        assert bm * bn <= 64 * 32, (kernel, shape, bm, bn)


def test_preset_shapes_match_the_backbone_presets():
    from m2dino.models.backbone import PRESETS
    expected = sorted((name, c.embed_dim, c.mlp_hidden, "swiglu" if c.ffn == "swiglu" else "gelu",
                       c.head_dim) for name, c in PRESETS.items() if c.official)
    assert sorted(kernel_inspect.PRESET_SHAPES) == expected


def _result(**changes):
    r = dict(kernel="_k[host]", shape="s", config="BLOCK_M=64, w4 s3", dtype="bf16", arch=90, compiled=True,
             error="", regs=100, spill_stores=0, spill_loads=0, shared=1024, fits_shared=True, mma="wgmma",
             has_dot=True, prec="tf32", pruned=False, extra={})
    r.update(changes)
    return r


def test_problems_names_each_broken_rule():
    """The rule the compile tests apply: a clean variant passes; each broken part is named;
    a pruned config and an exact fp32 dot's FMA code are not problems."""
    clean = [_result(), _result(mma="", prec="ieee"), _result(pruned=True, spill_stores=8)]
    assert kernel_inspect.problems(clean) == []
    bad = kernel_inspect.problems([_result(spill_stores=8, spill_loads=4), _result(fits_shared=False, shared=300000),
                                   _result(mma=""), _result(compiled=False, error="OutOfResources: shared")])
    assert len(bad) == 4
    assert "spills 8 B stores / 4 B loads" in bad[0] and "sm_90" in bad[0]
    assert "300000 B shared > 232448" in bad[1]
    assert "FMA code" in bad[2]
    assert "OutOfResources" in bad[3]


def test_summary_has_one_row_per_kernel_arch_and_dtype():
    rows = kernel_inspect.summary([_result(regs=90), _result(regs=120, shared=4096), _result(arch=80, mma="mma"),
                                   _result(pruned=True, regs=255)]).splitlines()
    assert rows[2:] == ["| `_k[host]` | sm_80 | bf16 | 1 | 100 | 0 | 1024 | mma |",
                        "| `_k[host]` | sm_90 | bf16 | 2 | 90-120 | 0 | 4096 | wgmma |"]


@pytest.mark.parametrize("args,message", [(["--workers", "0"], "--workers: must be at least 1"),
                                          (["--arch", "75"], "--arch: 75 not one of"),
                                          (["--dtype", "int8"], "--dtype: 'int8' not one of")])
def test_bad_arguments_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        kernel_inspect.main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_json_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "inspect.json"
    out.write_text("a user's results")
    with pytest.raises(SystemExit):
        kernel_inspect.main(["--json", str(out)])
    assert "exists; not overwriting it" in capsys.readouterr().err
    assert out.read_text() == "a user's results"
