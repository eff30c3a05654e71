"""Backend selection (m2dino_kernels.selection) and the registry (m2dino_kernels.registry):
availability per device, registering a backend, the selected name and its alias, the
environment override, the one-time warning when the extension is missing, and auto
resolution."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import m2dino_kernels as mk
from m2dino_kernels import backends, contract, registry, selection

HAS_C = importlib.util.find_spec("m2dino_kernels._C") is not None


def _python(code, **env):
    """Run code in a fresh interpreter (import-time behaviour), return the completed run."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("M2DINO_KERNELS_BACKEND", "TRITON_INTERPRET")}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_reference_is_always_available_and_first():
    assert mk.available_backends("cpu")[0] == "reference"
    assert mk.available_backends(torch.device("cpu")) == mk.available_backends("cpu")
    assert mk.available_backends(torch.zeros(1)) == mk.available_backends("cpu")


def test_cpu_availability_matches_what_is_installed():
    names = mk.available_backends("cpu")
    assert ("cpp" in names) == (registry._C is not None)
    assert "cuda" not in names  # CUDA kernels never run on CPU tensors
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    has_triton = importlib.util.find_spec("triton") is not None
    assert ("triton" in names) == (interpreted and has_triton)
    # the library floor: offered wherever this torch's grouped_mm runs (it does on CPU here)
    assert ("grouped_mm" in names) == hasattr(torch.nn.functional, "grouped_mm")
    assert registry.BACKEND_DTYPES["grouped_mm"] == (torch.float32, torch.bfloat16, torch.float16)
    assert backends.BACKEND_DTYPES is registry.BACKEND_DTYPES  # where callers found it before


def test_set_get_and_use_backend_restore():
    start = mk.get_backend()
    with mk.use_backend("reference"):
        assert mk.get_backend() == "reference"
        with pytest.raises(RuntimeError, match="inner failure"), mk.use_backend("auto"):
            assert mk.get_backend() == "auto"
            raise RuntimeError("inner failure")
        assert mk.get_backend() == "reference"  # restored even after an exception
    assert mk.get_backend() == start
    mk.set_backend("cpp" if "cpp" in mk.available_backends("cpu") else "grouped_mm")
    try:
        assert mk.get_backend() in ("cpp", "grouped_mm")
    finally:
        mk.set_backend(start)


def test_torch_is_an_alias_shown_as_reference():
    """The old name selects the reference wherever a name is taken and runs it; what is shown
    (get_backend, available_backends) is the canonical name, each backend once."""
    start = mk.get_backend()
    problem = contract.moe_problem(6, 4, 3, 3, 2, 2)
    with mk.use_backend("reference"):
        want = contract.run_public_ops(problem.params(), problem.task_ids, 2, "gelu")[0]
    with mk.use_backend("torch"):
        assert mk.get_backend() == "reference"
        got = contract.run_public_ops(problem.params(), problem.task_ids, 2, "gelu")[0]
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    mk.set_backend("torch")
    try:
        assert mk.get_backend() == "reference"
    finally:
        mk.set_backend(start)
    assert selection.resolve_backend("cpu", "torch") == "reference"
    assert "torch" not in mk.available_backends("cpu")
    assert registry.BACKEND_ALIASES == {"torch": "reference"}


@pytest.mark.parametrize("bad", ["numpy", "", "Torch", None, 3])
def test_unknown_backend_names_are_rejected(bad):
    with pytest.raises(ValueError, match=r"unknown kernel backend .*expected one of auto, reference, cpp, cuda, "
                                         r"triton, grouped_mm \(or 'torch' for 'reference'\)"):
        mk.set_backend(bad)
    with pytest.raises(ValueError, match="unknown kernel backend"), mk.use_backend(bad):
        pass


def test_auto_resolution_on_cpu():
    expected = "cpp" if "cpp" in mk.available_backends("cpu") else "reference"
    assert selection.resolve_backend("cpu", "auto") == expected
    with mk.use_backend("auto"):
        assert selection.resolve_backend(torch.zeros(2)) == expected


def test_auto_rule_per_device_type(monkeypatch):
    """`auto` without a measurement: CPU keeps cpp (else reference); CUDA, where the tuner
    measures (or with M2DINO_KERNELS_AUTOTUNE=0, or under torch.compile before any
    measurement), takes the library path grouped_mm, else reference."""
    def auto(device_type, available, dtype=None):
        monkeypatch.setitem(registry._available_cache, device_type, tuple(available))
        return selection.resolve_backend(device_type, "auto", dtype)

    assert auto("cpu", ("reference", "cpp", "triton", "grouped_mm")) == "cpp"
    assert auto("cpu", ("reference", "triton")) == "reference"
    assert auto("cuda", ("reference", "cuda", "triton", "grouped_mm")) == "grouped_mm"
    assert auto("cuda", ("reference", "cuda", "triton")) == "reference"
    assert auto("cuda", ("reference", "grouped_mm"), torch.float64) == "reference"
    assert auto("cuda", ("reference",)) == "reference"


def test_unrunnable_backend_lists_those_that_can():
    available = ", ".join(mk.available_backends("cpu"))
    with pytest.raises(ValueError, match=f"'cuda' cannot run on cpu tensors; available there: {available}"):
        selection.resolve_backend("cpu", "cuda")
    x = torch.randn(3, 4)
    with mk.use_backend("cuda"), pytest.raises(ValueError, match="available there"):
        mk.task_topk_route(x, torch.zeros(3, dtype=torch.long), torch.randn(1, 2, 4), top_k=1)


def test_backend_modules_expose_the_protocol():
    assert selection.BACKEND_NAMES == ("auto",) + registry.CONCRETE_BACKENDS
    assert registry.backend_names() == selection.BACKEND_NAMES  # nothing registered
    for name in mk.available_backends("cpu"):
        module = registry.backend_module(name)
        for fn in ("route_forward", "route_backward", "experts_forward", "experts_backward"):
            assert callable(getattr(module, fn)), f"{name} lacks {fn}"
    with pytest.raises(ValueError, match="unknown concrete kernel backend 'auto'"):
        registry.backend_module("auto")
    assert registry.compiled_backends() == ("cpp", "cuda", "triton")


def test_a_registered_backend_is_named_listed_and_runs():
    """register_backend: the name is accepted wherever a backend is named, listed where its
    devices are, runs through the public ops, may come first in CPU's `auto`; unregistering
    takes it back out."""
    import sys
    import types

    from m2dino_kernels import reference as ref

    module = types.ModuleType("m2dino_test_registered_backend")
    calls = []
    def counted(name):
        def call(*args):
            calls.append(name)
            return getattr(ref, name)(*args)
        return call

    for fn in ("route_forward", "route_backward", "experts_forward", "experts_backward"):
        setattr(module, fn, counted(fn))
    sys.modules[module.__name__] = module
    registry.register_backend("mine", module.__name__, (torch.float32,), ("cpu",),
                              compiled=False, preferred_on=("cpu",))
    try:
        assert "mine" in mk.available_backends("cpu") and "mine" in registry.backend_names()
        assert registry.preferred_backends("cpu")[0] == "mine"
        assert selection.resolve_backend("cpu", "auto", torch.float32) == "mine"
        assert selection.resolve_backend("cpu", "auto", torch.float64) != "mine"  # its dtypes
        problem = contract.moe_problem(6, 4, 3, 3, 2, 2)
        with mk.use_backend("mine"):
            contract.forward_backward(contract.run_public_ops, problem.params(), problem.task_ids,
                                      2, "gelu")
        assert set(calls) == {"route_forward", "route_backward", "experts_forward",
                              "experts_backward"}
        with pytest.raises(ValueError, match="is a built-in backend"):
            registry.register_backend("cpp", module.__name__, (torch.float32,), ("cpu",))
        with pytest.raises(ValueError, match="cannot name a backend"):
            registry.register_backend("torch", module.__name__, (torch.float32,), ("cpu",))
    finally:
        registry.unregister_backend("mine")
        sys.modules.pop(module.__name__)
    assert "mine" not in mk.available_backends("cpu")
    assert "mine" not in registry.preferred_backends("cpu")
    with pytest.raises(ValueError, match="unknown kernel backend 'mine'"):
        mk.set_backend("mine")


def test_environment_variable_sets_the_default_and_is_validated():
    for name, shown in (("torch", "reference"), ("reference", "reference"), ("auto", "auto")):
        run = _python("import m2dino_kernels as mk; print(mk.get_backend())",
                      M2DINO_KERNELS_BACKEND=name)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == shown
    run = _python("import m2dino_kernels", M2DINO_KERNELS_BACKEND="fastest")
    assert run.returncode != 0
    assert "environment variable M2DINO_KERNELS_BACKEND: unknown kernel backend 'fastest'" in run.stderr


def test_excluded_backends_are_left_out_everywhere():
    code = ("import m2dino_kernels as mk\n"
            "from m2dino_kernels.selection import resolve_backend\n"
            "print(','.join(mk.available_backends('cpu')), resolve_backend('cpu', 'auto'))\n"
            "mk.set_backend('cpp')\n"
            "import torch; mk.task_topk_route(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), "
            "torch.zeros(1, 2, 3), top_k=1)")
    run = _python(code, M2DINO_KERNELS_EXCLUDE="cpp, grouped_mm", M2DINO_KERNELS_SELFTEST="0")
    assert run.stdout.split() == ["reference", "reference"]
    assert ("kernel backend 'cpp' cannot run on cpu tensors (left out by M2DINO_KERNELS_EXCLUDE); "
            "available there: reference") in run.stderr


def test_triton_on_cpu_needs_the_interpreter():
    code = "import m2dino_kernels as mk; print(','.join(mk.available_backends('cpu')))"
    assert "triton" not in _python(code).stdout.strip().split(",")
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in _python(code, TRITON_INTERPRET="1").stdout.strip().split(",")


def test_missing_extension_warns_once_and_falls_back():
    # simulate an unbuilt (or broken) extension by refusing its import
    code = ("import sys, warnings; warnings.simplefilter('always')\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'm2dino_kernels._C':\n"
            "            raise ImportError('simulated: extension not built')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import m2dino_kernels, m2dino_kernels.backends, m2dino_kernels.moe\n"
            "import importlib; importlib.reload(m2dino_kernels)\n"
            "from m2dino_kernels.selection import resolve_backend\n"
            "print(resolve_backend('cpu'), ','.join(m2dino_kernels.available_backends('cpu')))")
    run = _python(code)
    assert run.returncode == 0, run.stderr
    # the library floor needs no extension: only the extension's backends are gone
    assert run.stdout.split()[0] == "reference"
    assert "cpp" not in run.stdout.split()[1].split(",")
    assert run.stdout.split()[1].split(",")[0] == "reference"
    assert run.stderr.count("m2dino_kernels._C could not be imported") == 1
    assert "simulated: extension not built" in run.stderr
    assert "'reference' is used instead" in run.stderr


@pytest.mark.skipif(not HAS_C, reason="the extension is not built here")
def test_built_extension_gives_no_warning_and_auto_picks_cpp():
    run = _python("import warnings; warnings.simplefilter('error')\n"
                  "import m2dino_kernels\n"
                  "from m2dino_kernels.selection import resolve_backend; print(resolve_backend('cpu'))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "cpp"
