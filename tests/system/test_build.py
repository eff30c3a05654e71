"""A second install does not recompile what has not changed: setup.py keeps the compiled
objects in build/ext-*/ between builds (pip's editable install otherwise compiles in a fresh
temporary folder each time), ninja recompiles only changed sources, and the build says what it
compiles and how to skip CUDA. Checked on a copy of setup.py and pyproject.toml with one small
source (the real kernels take minutes), through the hook pip calls (build_editable), CPU only."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A plain CPython module named as the real one (torch's headers alone take minutes to compile here)
SOURCE = """#include <Python.h>
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(%d); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
"""
BUILD_EDITABLE = "from setuptools import build_meta; print(build_meta.build_editable(%r))"


def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    for package in ("m2dino", "m2dino_kernels"):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    (root / "csrc").mkdir()
    (root / "csrc" / "answer.cpp").write_text(SOURCE % 41)
    return root


def build(root: Path, wheels: Path) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BUILD_EDITABLE % str(wheels)], cwd=root, capture_output=True,
                          text=True, env={**env, "M2DINO_BUILD_CUDA": "0"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.mark.slow
def test_a_second_editable_build_compiles_only_what_changed(tmp_path):
    root = project(tmp_path)
    first, _ = build(root, tmp_path / "w1")
    assert "m2dino: building the C++ CPU kernels only (M2DINO_BUILD_CUDA=0)" in first
    assert "m2dino: compiling: answer.cpp" in first and "[1/1] c++" in first
    objects = list((root / "build").glob("ext-torch*-cpu-*"))
    assert len(objects) == 1 and "(new;" in first

    again, _ = build(root, tmp_path / "w2")
    assert "ninja: no work to do." in again and "[1/1] c++" not in again
    assert "kept from the last build" in again

    (root / "csrc" / "answer.cpp").write_text(SOURCE % 42)  # a changed source is compiled again
    changed, _ = build(root, tmp_path / "w3")
    assert "[1/1] c++" in changed
    built = next(root.glob("m2dino_kernels/_C*.so"))  # the editable build puts the extension in place
    probe = subprocess.run([sys.executable, "-c", "import torch, importlib.util as u, sys; "
                            "s = u.spec_from_file_location('m2dino_kernels._C', sys.argv[1]); "
                            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.answer())", str(built)],
                           capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "42", probe.stderr
