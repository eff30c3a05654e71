"""From a checkpoint to an FM_UIA 2026 challenge entry: a self-contained predictor folder.

`export_predictor(checkpoint, out)` (and `python -m m2dino.export`) writes `out/`:

    model.py                      class Model: __init__() loads the weights from its folder,
                                  predict(data_root, output_dir, batch_size=None); `python
                                  model.py` predicts /input/ into /output/ (MODEL_PY below)
    model.safetensors model.json  the weights and the model config (m2dino.save_model; no pickle)
    predictor.json                the defaults the Model runs with: device, batch_size, amp, tta
    wheels/m2dino-*.whl           m2dino, built from this checkout (or the --wheel given)
    requirements.txt Dockerfile   the image: a PyTorch CUDA runtime base, the wheel, `python model.py`
    README.md                     build, run, check, and the measured time per image and peak memory
    src/                          (--build-ext only) the sources the Dockerfile compiles the kernels from

model.py is a thin wrapper over `predict_folder` (m2dino.evaluation.predict), the code behind
`python -m m2dino.predict`, so both write the same files for the same checkpoint, data and
settings. The folder is built beside `out` under a temporary name and renamed into place
(m2dino.io.replace_directory): a failed export writes nothing.

The wheel. By default it is built with `M2DINO_BUILD_EXT=0`: pure Python, independent of the
torch ABI, which an image with its own torch needs (the extension compiled here against this
machine's torch would not load against the image's). The image then runs the `torch` kernel
backend (M2DINO_KERNELS_BACKEND=torch: the Triton backend needs a C compiler at run time, which
PyTorch's runtime images lack). `build_ext=True` writes a two-stage Dockerfile instead that
compiles the C++/CUDA kernels inside the matching `-devel` image for `cuda_arches`.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from m2dino import io
from m2dino.evaluation.predict import AMP_DTYPES
from m2dino.models.m2dino import FORMAT_VERSION, M2DINO, load_model, save_model
from m2dino.models.weights import WeightsError
from m2dino.tasks import TASKS

# A current PyTorch CUDA runtime image (torch 2.14.1, the torch this project is developed
# with). Docker Hub's tags read <torch>-cuda<major.minor>-cudnn<N>-runtime|devel.
DEFAULT_BASE_IMAGE = "pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime"
DEFAULT_CUDA_ARCHES = "8.0;8.6;8.9;9.0+PTX"
DEVICES = ("auto", "cpu", "cuda")
AMP_CHOICES = tuple(AMP_DTYPES)
SETTINGS_FILE = "predictor.json"
MODEL_STEM = "model"
WHEEL_DIR = "wheels"
SOURCE_DIR = "src"
MEASURE_ROWS = 4  # per task, on the synthetic folder
MEASURE_PASSES = 3  # timed passes after the first
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")
# What a wheel (and the --build-ext source copy) is built from, relative to the project root.
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md")
SOURCE_TREES = ("m2dino", "m2dino_kernels", "csrc")
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".pyd", ".o")


class ExportError(ValueError):
    """The checkpoint, the output folder or the wheel cannot be exported; names the culprit."""


# ---------------------------------------------------------------------- the entry's files
MODEL_PY = '''\
"""FM_UIA 2026 challenge entry: an M2DINO predictor written by `python -m m2dino.export`.

    python model.py                      # predict /input/ into /output/ (the image's command)
    python model.py DATA_ROOT OUT_DIR    # any other folders

Model() loads the weights and its settings (predictor.json) from this file's folder;
Model().predict(data_root, output_dir, batch_size) writes the challenge's submission format:
the three prediction JSON files and the segmentation index PNGs at each mask_path without its
leading ../ (plus missing_tasks.json listing rows of tasks this model has no head for). It is a
thin wrapper over m2dino.evaluation.predict.predict_folder, the code behind
`python -m m2dino.predict`: both write the same files for the same checkpoint and data.
"""
import json
import sys
from pathlib import Path

from m2dino.evaluation.predict import predict_folder, run_prediction
from m2dino.models.m2dino import load_model

HERE = Path(__file__).resolve().parent


class Model:
    def __init__(self, device=None):
        """Load the weights from this folder; `device` (cpu, cuda, auto) overrides predictor.json."""
        self.settings = json.loads((HERE / "predictor.json").read_text(encoding="utf-8"))
        if device is not None:
            self.settings["device"] = device
        self.model = load_model(HERE / self.settings["checkpoint"])

    def predict(self, data_root, output_dir, batch_size=None):
        """Predict every CSV row under data_root/csv_files into output_dir; batch_size None:
        the exported default (predictor.json)."""
        s = self.settings
        return predict_folder(self.model, data_root, output_dir, batch_size=batch_size or s["batch_size"],
                              device=s["device"], amp=s["amp"], tta=s["tta"])


def main(argv):
    data_root, output_dir = (list(argv) + ["/input/", "/output/"][len(argv):])[:2]
    return run_prediction(lambda: Model().predict(data_root, output_dir), "model.py")

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
'''

# Run in a child process from the exported folder: time and peak memory of a real run. The
# data is predicted twice: the first pass carries the one-off warm-up of a fresh process (lazy
# initialisation in torch), the next MEASURE_PASSES give the steady time per image (their best:
# on a shared machine a single pass can be several times slower).
MEASURE_DRIVER = '''\
import json, os, resource, sys, time
t0 = time.perf_counter()
import model
import torch
t1 = time.perf_counter()
predictor = model.Model(device=sys.argv[3])
t2 = time.perf_counter()
first = predictor.predict(sys.argv[1], sys.argv[2] + "/first")
t3 = time.perf_counter()
again = []
for i in range(int(sys.argv[4])):
    start = time.perf_counter()
    predictor.predict(sys.argv[1], sys.argv[2] + f"/again{i}")
    again.append(time.perf_counter() - start)
print("M2DINO-MEASURE " + json.dumps({
    "import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "again_s": again,
    "rows": sum(first["counts"].values()), "counts": first["counts"],
    "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "load_average": os.getloadavg()[0],
    "threads": torch.get_num_threads(), "torch": torch.__version__}))
'''


# -------------------------------------------------------------------- checking the inputs
def check_checkpoint(path) -> M2DINO:
    """The model of an m2dino safetensors checkpoint (<stem>.safetensors + <stem>.json, written
    by save_model), or ExportError naming the file: a pickle, a missing config, a safetensors
    file without m2dino's metadata, a truncated or mismatched file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ExportError(f"{path} is not a safetensors m2dino checkpoint (a {suffix} file is a pickle, which is "
                          f"never loaded); export the <stem>.safetensors + <stem>.json pair that training writes "
                          f"(e.g. runs/default/au/all/best.safetensors)")
    if suffix not in ("", ".safetensors", ".json"):
        raise ExportError(f"{path} is not a safetensors m2dino checkpoint (expected <stem>.safetensors with "
                          f"<stem>.json beside it)")
    stem = path.with_suffix("") if suffix else path
    weights, config = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for file, what in ((weights, "weights"), (config, "model config")):
        if not file.is_file():
            raise ExportError(f"{file} does not exist: an m2dino checkpoint is {weights.name} (weights) + "
                              f"{config.name} (model config), and its {what} is missing")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{weights} is not a readable safetensors file (a pickle renamed, truncated or "
                          f"corrupt?): {err}") from err
    if metadata.get("format") != "m2dino":
        raise ExportError(f"{weights} is a safetensors file but not an m2dino checkpoint: its metadata is "
                          f"{metadata!r}, m2dino.save_model writes {{'format': 'm2dino'}}")
    try:
        return load_model(stem)
    except (WeightsError, KeyError, TypeError, ValueError) as err:
        raise ExportError(f"{weights} cannot be loaded as an m2dino model: {err}") from err


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")


# ------------------------------------------------------------------------------ the wheel
def project_root() -> Path:
    """The source checkout this m2dino runs from (an editable install): the folder holding
    pyproject.toml above m2dino/."""
    root = Path(__file__).resolve().parents[2]
    if all((root / f).is_file() for f in ("pyproject.toml", "setup.py")) and (root / "m2dino_kernels").is_dir():
        return root
    raise ExportError(f"m2dino runs from {root}, not from a source checkout (no pyproject.toml and setup.py "
                      f"there), so no wheel can be built from it: pass --wheel PATH (a wheel built with "
                      f"`M2DINO_BUILD_EXT=0 pip wheel --no-build-isolation --no-deps -w DIR <checkout>`)")


def source_files(root: Path) -> list[Path]:
    """The files a wheel is built from, relative to the project root (no caches, no compiled
    objects, no hidden files: a stale extension or build folder never reaches the image)."""
    files = [Path(name) for name in SOURCE_FILES if (root / name).is_file()]
    for tree in SOURCE_TREES:
        for path in sorted((root / tree).rglob("*")):
            rel = path.relative_to(root)
            if (path.is_file() and path.suffix not in SKIP_SUFFIXES
                    and not any(part.startswith(".") or part == "__pycache__" or part.endswith(".egg-info")
                                for part in rel.parts)):
                files.append(rel)
    return files


def copy_sources(root: Path, dest: Path) -> None:
    for rel in source_files(root):
        io.write_bytes(dest / rel, (root / rel).read_bytes())


def build_wheel(root: Path, dest: Path) -> Path:
    """`M2DINO_BUILD_EXT=0 pip wheel --no-build-isolation --no-deps` of a clean copy of the
    sources (the checkout is left untouched: setuptools builds in the source folder)."""
    with tempfile.TemporaryDirectory(prefix="m2dino-wheel-") as scratch:
        source = Path(scratch) / "source"
        copy_sources(root, source)
        built = Path(scratch) / "wheels"
        command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                   "--disable-pip-version-check", "-w", str(built), str(source.resolve())]
        proc = subprocess.run(command, env={**os.environ, "M2DINO_BUILD_EXT": "0"}, capture_output=True, text=True)
        wheels = sorted(built.glob("m2dino-*.whl")) if built.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            raise ExportError(f"building the m2dino wheel failed ({' '.join(command)}):\n"
                              f"{(proc.stdout + proc.stderr)[-3000:]}")
        return copy_wheel(wheels[0], dest)


def wheel_metadata(wheel: Path) -> dict:
    """Name, version, dependencies and purity of an m2dino wheel; ExportError when it is not one."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            meta_name = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
            metadata = archive.read(meta_name).decode("utf-8") if meta_name else ""
    except (OSError, zipfile.BadZipFile) as err:
        raise ExportError(f"{wheel} is not a readable wheel: {err}") from err
    fields = [line.split(":", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ":" in line]
    name = next((v.strip() for k, v in fields if k == "Name"), None)
    needed = ("m2dino/__init__.py", "m2dino/evaluation/predict.py", "m2dino_kernels/__init__.py")
    if name != "m2dino" or not all(n in names for n in needed):
        raise ExportError(f"{wheel} is not an m2dino wheel (name {name!r}; it must hold {list(needed)})")
    return {"name": name, "version": next((v.strip() for k, v in fields if k == "Version"), "?"),
            "requires": [v.strip() for k, v in fields if k == "Requires-Dist" and "extra ==" not in v],
            "pure": wheel.name.endswith("-none-any.whl"), "files": names}


def copy_wheel(wheel: Path, dest: Path) -> Path:
    wheel = Path(wheel)
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise ExportError(f"{wheel} is not a wheel file (*.whl)")
    wheel_metadata(wheel)
    return io.write_bytes(dest / wheel.name, wheel.read_bytes())


def requirement_name(requirement: str) -> str:
    name = requirement.split(";")[0].strip()
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower()


def requirements_text(meta: dict) -> str:
    # torch (and torchvision) come from the base image: installing another would replace its CUDA build
    requires = [r for r in meta["requires"] if requirement_name(r) not in ("torch", "torchvision")]
    return ("# The m2dino wheel's run-time dependencies (its metadata) except torch, which the base image\n"
            "# provides. Installed when the image is built; nothing is downloaded when it runs.\n"
            + "".join(f"{r}\n" for r in requires))


# ------------------------------------------------------------------------- the Dockerfile
def dockerfile_text(wheel_name: str, base_image: str, build_ext: bool, cuda_arches: str,
                    version: str) -> str:
    header = textwrap.dedent(f"""\
        # FM_UIA 2026 entry: the M2DINO predictor of this folder, written by `python -m m2dino.export`
        # (m2dino {version}). Build: docker build -t m2dino-fmuia .   Run and check: README.md.
        #
        # Base: a PyTorch CUDA runtime image; the predictor runs on its torch. The tag must exist on
        # Docker Hub (hub.docker.com/r/pytorch/pytorch/tags, <torch>-cuda<X.Y>-cudnn9-runtime): to change
        # it, edit the FROM line (or export with --base-image) and pick a CUDA version the host's NVIDIA
        # driver supports.
        """)
    env = textwrap.dedent(f"""\
        # HOME writable whatever user runs the container; offline at run time (nothing is downloaded).
        ENV HOME=/home/predictor \\
            PYTHONUNBUFFERED=1 \\
            PYTHONDONTWRITEBYTECODE=1 \\
            PIP_NO_CACHE_DIR=1 \\
            PIP_DISABLE_PIP_VERSION_CHECK=1 \\
            PIP_BREAK_SYSTEM_PACKAGES=1 \\
            HF_HUB_OFFLINE=1 \\
            M2DINO_KERNELS_BACKEND={'auto' if build_ext else 'torch'}
        RUN mkdir -p "$HOME" && chmod 1777 "$HOME"
        """)
    install = textwrap.dedent(f"""\
        WORKDIR /opt/m2dino-predictor
        # Build time only: the dependencies the base image lacks, then m2dino itself (the wheel).
        RUN python -m pip install -r /tmp/build/requirements.txt \\
         && python -m pip install --no-deps /tmp/build/{wheel_name} \\
         && rm -rf /tmp/build \\
         && python -c "import m2dino.evaluation.predict"
        COPY model.py {SETTINGS_FILE} {MODEL_STEM}.json {MODEL_STEM}.safetensors ./
        CMD ["python", "model.py"]
        """)
    if not build_ext:
        return (header + "# The wheel is pure Python (M2DINO_BUILD_EXT=0): no compiled kernels, the `torch` kernel\n"
                "# backend (Triton would need a C compiler at run time, which runtime images lack).\n"
                f"FROM {base_image}\n\n" + env + "\nCOPY requirements.txt /tmp/build/\n"
                f"COPY {WHEEL_DIR}/{wheel_name} /tmp/build/\n" + install)
    devel = base_image.replace("-runtime", "-devel")
    return (header + textwrap.dedent(f"""\
        # Two stages: the C++/CUDA kernels are compiled in the -devel image of the same torch (so the
        # extension matches the runtime image's torch ABI) for the GPU architectures below, and the
        # resulting wheel is installed into the runtime image. Both tags must exist.
        FROM {devel} AS kernels
        ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
        RUN python -m pip install ninja
        COPY {SOURCE_DIR}/ /src/
        RUN M2DINO_BUILD_EXT=1 M2DINO_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="{cuda_arches}" MAX_JOBS=4 \\
            python -m pip wheel --no-build-isolation --no-deps --no-index -w /wheels /src \\
         && mv /wheels/m2dino-*.whl /wheels/{wheel_name}

        FROM {base_image}
        """) + "\n" + env
        + "# The kernels link OpenMP (libgomp), which a runtime image may lack.\n"
        "RUN (apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*) \\\n"
        "    || echo 'libgomp1 not installed: the C++ kernels may fall back to the torch backend'\n"
        "COPY requirements.txt /tmp/build/\n"
        f"COPY --from=kernels /wheels/{wheel_name} /tmp/build/\n" + install)


# --------------------------------------------------------------------------- measuring
def synthetic_measure_root(tasks, scratch: Path, rows_per_task: int) -> Path | None:
    """A small FM_UIA folder of the checkpoint's registry tasks (the synthetic suite's val split)."""
    from m2dino.data import write_suite

    registry = [t for t in tasks if t in TASKS]
    if not registry:
        return None
    write_suite(scratch, scale=1e-6, tasks=registry, min_train=1, min_val=rows_per_task, workers=1)
    return scratch / "val"


def measure_run(folder: Path, data_root: Path, specs: dict, device: str = "cpu", backend: str | None = "torch") -> dict:
    """Run the exported model.py in a child process on data_root: wall time per image and the
    child's peak resident memory (its own getrusage), with the machine described."""
    import torch

    from m2dino.data.images import to_pil_image
    from m2dino.data.reader import resolve_split_root
    from m2dino.evaluation.predict import read_prediction_rows

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                         + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if backend:
        env["M2DINO_KERNELS_BACKEND"] = backend
    with tempfile.TemporaryDirectory(prefix="m2dino-measure-") as scratch:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", MEASURE_DRIVER, str(data_root), str(Path(scratch) / "out"), device,
                               str(MEASURE_PASSES)],
                              cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("M2DINO-MEASURE ")]
    if proc.returncode != 0 or not lines:
        raise ExportError(f"the exported model.py failed on {data_root} (exit {proc.returncode}):\n"
                          f"{(proc.stdout + proc.stderr)[-3000:]}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    rows, _ = read_prediction_rows(resolve_split_root(data_root), {t: specs[t] for t in result["counts"]})
    sizes = [to_pil_image(r.image_file).size for r in rows]
    result.update(wall_s=wall, device=device, kernel_backend=backend or os.environ.get("M2DINO_KERNELS_BACKEND", "auto"),
                  data_root=str(data_root), machine=machine_description(),
                  image_sizes=[min(sizes), max(sizes)] if sizes else None,
                  cuda_available=torch.cuda.is_available())
    passes = sorted(result["again_s"])
    result["seconds_per_image"] = passes[0] / max(1, result["rows"])
    result["median_seconds_per_image"] = passes[len(passes) // 2] / max(1, result["rows"])
    result["warmup_s"] = max(0.0, result["first_s"] - passes[0])
    return result


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores{memory}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


# ------------------------------------------------------------------------------ README
README = """\
# M2DINO predictor for FM_UIA 2026

Written by `python -m m2dino.export` (m2dino {version}) on {exported_at} from
`{source}` (sha256 `{sha}...`). Nothing in this folder is a pickle; nothing is downloaded when
it runs.

| file | what |
|---|---|
| `model.py` | `class Model`: `Model()` loads the weights from this folder, `Model().predict(data_root, output_dir, batch_size=None)` writes the challenge's submission; `python model.py` predicts `/input/` into `/output/` |
| `{stem}.safetensors`, `{stem}.json` | the weights and the model config |
| `{settings_file}` | the defaults the Model runs with (below) |
| `{wheel_dir}/{wheel}` | m2dino, built from the exporting checkout |
| `Dockerfile`, `requirements.txt` | the image |

Settings (`{settings_file}`): device `{device}` (`auto`: CUDA when available), batch size {batch_size},
autocast `{amp}` (CUDA only), test-time flip averaging {tta}. `Model(device="cpu")` overrides the
device, `predict(..., batch_size=N)` the batch size.

Tasks (flip: whether TTA averages the task over a horizontal flip):

| task | type | classes / points | flip |
|---|---|---|---|
{task_lines}

CSV rows of any other task are skipped, named in a warning and listed in `missing_tasks.json` in
the output folder; every other row is predicted. A data root without `csv_files/` stops with a
message and writes nothing.

## Build

```bash
docker build -t m2dino-fmuia .
```

Base image: `{base_image}`. The tag must exist on Docker Hub (`docker pull {base_image}`
tells); to change it, edit the `FROM` line (or export again with `--base-image`), choosing a CUDA
version that the host's NVIDIA driver supports.

{kernels}

## Run on a validation folder

```bash
docker run --rm --gpus all -v /data/FM_UIA/val:/input/:ro -v "$PWD/predictions":/output m2dino-fmuia
# without Docker, in an environment with torch:
pip install -r requirements.txt {wheel_dir}/{wheel} && python model.py /data/FM_UIA/val predictions/
```

## Check

```bash
python -m m2dino.evaluate --data-root /data/FM_UIA/val --predictions predictions/
```

scores the folder as the challenge's evaluator does (per task and per task type).

## Time and memory

{numbers}
"""

KERNELS_PURE = """\
The wheel is pure Python, built with `M2DINO_BUILD_EXT=0`: no compiled kernels, so it does not
depend on the torch ABI and installs on the image's torch (the extension compiled on the
exporting machine would not load against another torch). The image runs the `torch` kernel
backend (`M2DINO_KERNELS_BACKEND=torch`; m2dino warns once that the extension is absent) with
PyTorch's own attention (SDPA; flash attention on GPU). The `triton` backend needs a C compiler
at run time, which runtime images lack (add `apt-get install -y gcc` to the Dockerfile, then
`M2DINO_KERNELS_BACKEND=auto`). To compile the C++/CUDA kernels into the image instead, export
with `--build-ext [--cuda-arches "8.0;9.0"]`: a two-stage Dockerfile that builds them in the
matching `-devel` image."""

KERNELS_EXT = """\
The image compiles m2dino's C++/CUDA kernels in its first stage (`{devel}`, the same torch as the
runtime image, so the extension fits its ABI) for `TORCH_CUDA_ARCH_LIST="{arches}"` and runs the
`auto` kernel backend (the CUDA kernels on a GPU). Edit the list in the Dockerfile for other
GPUs. If the extension does not load, m2dino warns once and runs its `torch` backend."""

MEASURED = """\
Measured at export time: this folder's `Model` in a fresh process (`import model`,
`Model(device="cpu")`, `predict` {total} times) on {rows} images ({sizes}; {label}), batch size {batch_size},
TTA {tta}, kernel backend `{backend}`, {threads} torch threads, torch {torch}, on {machine} (1-minute load average {load:.1f} at the end, this run included):

| | |
|---|---|
| time per image (prediction and files written; the best of {passes} passes after the first) | {per_image:.1f} ms |
| the same, median pass | {median:.1f} ms |
| warm-up, once per process (the first pass took this much longer) | {warmup:.2f} s |
| model load (weights from this folder) | {load_s:.2f} s |
| imports (torch, m2dino) | {imports:.2f} s |
| the whole process, wall (imports, load, {total} passes) | {wall:.2f} s |
| peak resident memory of the process | {rss:.0f} MiB |

On a GPU the time per image is far lower and the host memory similar; the challenge recommends
staying under 16 GB. `python -m m2dino.export ... --measure DIR` measures on a folder of your own
(with csv_files/)."""

NOT_MEASURED = """\
Not measured at export time (`--no-measure`, or no task of the synthetic suite): export with
`--measure DIR` (a folder with csv_files/) for the time per image and the peak memory."""


def readme_text(settings: dict, meta: dict, measured: dict | None, build_ext: bool, base_image: str,
                cuda_arches: str) -> str:
    on_off = "on" if settings["tta"] else "off"
    if measured:
        m = measured
        sizes = ("images of {}x{} to {}x{} px".format(*m["image_sizes"][0], *m["image_sizes"][1])
                 if m.get("image_sizes") else "sizes of the data")
        numbers = MEASURED.format(rows=m["rows"], sizes=sizes, label=m["data_root_label"],
                                  batch_size=settings["batch_size"], tta=on_off, backend=m["kernel_backend"],
                                  threads=m["threads"], torch=m["torch"], machine=m["machine"],
                                  per_image=m["seconds_per_image"] * 1000, median=m["median_seconds_per_image"] * 1000,
                                  passes=len(m["again_s"]), total=len(m["again_s"]) + 1, load=m["load_average"],
                                  warmup=m["warmup_s"], load_s=m["load_s"],
                                  imports=m["import_s"], wall=m["wall_s"], rss=m["max_rss_kib"] / 1024)
    else:
        numbers = NOT_MEASURED
    kernels = (KERNELS_EXT.format(devel=base_image.replace("-runtime", "-devel"), arches=cuda_arches)
               if build_ext else KERNELS_PURE)
    task_lines = "\n".join(f"| {t['task_id']} | {t['task_type']} | {t['num_classes']} | "
                           f"{'yes' if t['hflip'] else 'no'} |" for t in settings["tasks"])
    return README.format(version=meta["version"], exported_at=settings["exported_at"],
                         source=settings["source_checkpoint"], sha=settings["source_sha256"][:16],
                         stem=MODEL_STEM, settings_file=SETTINGS_FILE, wheel_dir=WHEEL_DIR, wheel=meta["wheel"],
                         device=settings["device"], batch_size=settings["batch_size"], amp=settings["amp"],
                         tta=on_off, task_lines=task_lines, base_image=base_image, kernels=kernels,
                         numbers=numbers)


# ------------------------------------------------------------------------------ export
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def readable_by_all(folder: Path) -> None:
    """Folders 0755, files 0644 (temporary files are created 0600): the image's COPY keeps the
    modes, and the container may run as any user."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def export_predictor(checkpoint, out, tta: bool = False, device: str = "auto", batch_size: int = 8,
                     amp: str = "off", force: bool = False, wheel=None, base_image: str = DEFAULT_BASE_IMAGE,
                     build_ext: bool = False, cuda_arches: str = DEFAULT_CUDA_ARCHES, measure="synthetic",
                     measure_rows: int = MEASURE_ROWS) -> dict:
    """Write the predictor folder `out` (see the module doc); returns its settings, with the
    measurement under "measured" (None when not measured). `measure`: "synthetic" (a small
    synthetic folder of the checkpoint's tasks), a data root with csv_files/, or None."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {DEVICES}, got {device!r}")
    if amp not in AMP_CHOICES:
        raise ExportError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if int(batch_size) < 1:
        raise ExportError(f"batch size must be >= 1, got {batch_size}")
    if not base_image or any(c.isspace() for c in base_image):
        raise ExportError(f"base image {base_image!r} is not an image reference")
    out = Path(out).absolute()
    check_out_dir(out, force)
    checkpoint = Path(checkpoint)
    for given, what in ((checkpoint, "checkpoint"), (Path(wheel) if wheel else None, "wheel")):
        if given is not None and out in given.absolute().parents:
            raise ExportError(f"the {what} {given} lies inside the output folder {out}")
    model = check_checkpoint(checkpoint)
    if measure not in (None, "synthetic") and not (Path(measure) / "csv_files").is_dir() \
            and not (Path(measure) / "val" / "csv_files").is_dir():
        raise ExportError(f"--measure {measure}: no csv_files/ folder there (nor val/csv_files/)")
    root = None if wheel else project_root()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, staging / MODEL_STEM)
        built = copy_wheel(Path(wheel), staging / WHEEL_DIR) if wheel else build_wheel(root, staging / WHEEL_DIR)
        meta = {**wheel_metadata(built), "wheel": built.name}
        if build_ext:
            copy_sources(root or project_root(), staging / SOURCE_DIR)
        weights = checkpoint.with_suffix(".safetensors") if checkpoint.suffix else checkpoint.parent / (checkpoint.name + ".safetensors")
        settings = {
            "format_version": 1, "checkpoint": f"{MODEL_STEM}.safetensors", "device": device,
            "batch_size": int(batch_size), "amp": amp, "tta": bool(tta),
            "tasks": [{"task_id": t.task_id, "task_type": t.task_type, "num_classes": t.num_classes, "hflip": t.hflip}
                      for t in model.tasks],
            "model_format_version": FORMAT_VERSION, "m2dino_version": meta["version"], "wheel": meta["wheel"],
            "source_checkpoint": str(weights.absolute()), "source_sha256": sha256(weights),
            "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        io.write_json(staging / SETTINGS_FILE, settings, indent=2)
        io.write_text(staging / "model.py", MODEL_PY)
        io.write_text(staging / "requirements.txt", requirements_text(meta))
        io.write_text(staging / "Dockerfile", dockerfile_text(meta["wheel"], base_image, build_ext, cuda_arches,
                                                              meta["version"]))
        measured = None
        if measure is not None:
            with tempfile.TemporaryDirectory(prefix="m2dino-measure-data-") as scratch:
                if measure == "synthetic":
                    data_root = synthetic_measure_root(model.task_ids, Path(scratch), measure_rows)
                    label = f"a synthetic FM_UIA folder, {measure_rows} rows per task"
                else:
                    data_root, label = Path(measure), f"`{measure}`"
                if data_root is not None:
                    # on this machine's CPU, with the kernel backend the image runs
                    measured = measure_run(staging, data_root, {t.task_id: t for t in model.tasks}, device="cpu",
                                       backend=None if build_ext else "torch")
                    measured["data_root_label"] = label
        io.write_text(staging / "README.md", readme_text(settings, meta, measured, build_ext, base_image, cuda_arches))
        readable_by_all(staging)
        io.replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**settings, "out": str(out), "measured": measured}

