"""Shared test setup and fixtures.

Triton kernels run on CPU tensors through the interpreter; the flag must be set before any
module defining a `@triton.jit` kernel is imported, so it is set here, first.

Fixtures for the training tests: `tiny_suite(tasks, min_train, min_val)` (a synthetic suite of a
few tasks, written once per session and shape; tests must not modify it), `suite` (the tiny
suite of the module's SUITE = dict(tasks=..., min_train=..., min_val=...)) and
`tiny_config(suite, out, **options)` (a validated TrainConfig of a seconds-long AU run on it,
with the module's RUN_OPTIONS, then `options`, over the shared base).

`child_venv(path)` makes a fresh virtual environment for tests that install something into a
child interpreter (the exported wheel): it sees every package the running interpreter sees,
whether the suite runs in a venv, a conda env or the system Python.
"""
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    from m2dino.data import write_suite

    written = {}

    def make(tasks, min_train: int, min_val: int):
        key = (tuple(tasks), min_train, min_val)
        if key not in written:
            root = tmp_path_factory.mktemp("suite")
            write_suite(root, scale=0.001, tasks=list(tasks), min_train=min_train, min_val=min_val, workers=1)
            written[key] = root
        return written[key]

    return make


@pytest.fixture(scope="module")
def suite(tiny_suite, request):
    return tiny_suite(**request.module.SUITE)


@pytest.fixture
def tiny_config(request):
    from m2dino.training.config import TrainConfig

    module_options = getattr(request.module, "RUN_OPTIONS", {})

    def make(suite, out, **options):
        base = dict(data=str(suite), out=str(out), paradigm="au", img_size=32, batch_size=4, log_every=1,
                    progress=False, seeds=None)  # one seed, `seed`
        return TrainConfig(**{**base, **module_options, **options}).validate()

    return make


def parent_site_dirs() -> list[str]:
    """The site-packages folders the running interpreter reads (its own, a venv's base ones when it
    was made with --system-site-packages, the user site), in its order."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def make_child_venv(path: Path) -> Path:
    """A new venv at `path`; returns its python. Its own site-packages come first (what is installed
    there wins), then the running interpreter's, added by a .pth file with site.addsitedir so that
    their own .pth files (an editable install, say) work there too. `--system-site-packages` alone
    is not enough: inside a venv it links the *base* interpreter's site-packages, not the venv's."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in parent_site_dirs()]
    (Path(own) / "zz_m2dino_parent_site.pth").write_text("\n".join(lines) + "\n")
    return python


@pytest.fixture
def child_venv():
    return make_child_venv
