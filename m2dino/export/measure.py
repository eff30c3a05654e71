"""Time per image and peak memory of an exported entry, measured at export: its model.py run in
a fresh child process (measure_child.py) on a data root, by default a small synthetic FM_UIA
folder of the checkpoint's tasks, with the machine and its load described. The time quoted is
the median of several passes after a warm-up pass: a shared machine makes single passes noisy,
and the load average beside it says how busy the machine was."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m2dino.export.options import ExportError
from m2dino.tasks import TASKS

MEASURE_PASSES = 5  # timed passes after the warm-up pass; their median is quoted
PURE_BACKEND = "reference"  # the kernel backend of a pure-Python wheel's image
CHILD = Path(__file__).with_name("measure_child.py")


def synthetic_measure_root(tasks, scratch: Path, rows_per_task: int) -> Path | None:
    """A small FM_UIA folder of the checkpoint's registry tasks (the synthetic suite's val split)."""
    from m2dino.data import write_suite

    registry = [t for t in tasks if t in TASKS]
    if not registry:
        return None
    write_suite(scratch, scale=1e-6, tasks=registry, min_train=1, min_val=rows_per_task, workers=1)
    return scratch / "val"


def _run_child(folder: Path, data_root: Path, device: str, env: dict, progress) -> tuple[int, list[str]]:
    """The child's exit code and its output lines, each pass reported to `progress` as it ends."""
    with tempfile.TemporaryDirectory(prefix="m2dino-measure-") as scratch:
        proc = subprocess.Popen([sys.executable, "-c", CHILD.read_text(encoding="utf-8"), str(data_root),
                                 str(Path(scratch) / "out"), device, str(MEASURE_PASSES)],
                                cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("M2DINO-PASS ") and progress is not None:
                index, total, seconds = line.split()[1:]
                what = "warm-up pass" if index == "0" else f"timed pass {index}/{total}"
                progress(f"measure: {what}: {float(seconds):.1f} s")
        return proc.wait(), lines


def measure_run(folder: Path, data_root: Path, specs: dict, device: str = "cpu", backend: str | None = PURE_BACKEND,
                progress=None) -> dict:
    """Run the exported model.py in a child process on data_root: wall time per image (the
    median of MEASURE_PASSES passes after a warm-up pass) and the child's peak resident memory
    (its own getrusage), with the machine and its load described. progress: called with a
    line of text after each pass (None: silent)."""
    import torch

    from m2dino.data.images import to_pil_image
    from m2dino.data.reader import resolve_split_root
    from m2dino.evaluation.predict import read_prediction_rows

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2])]
                                         + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    if backend:
        env["M2DINO_KERNELS_BACKEND"] = backend
    start = time.perf_counter()
    code, lines = _run_child(folder, data_root, device, env, progress)
    wall = time.perf_counter() - start
    results = [line for line in lines if line.startswith("M2DINO-MEASURE ")]
    if code != 0 or not results:
        raise ExportError(f"the exported model.py failed on {data_root} (exit {code}):\n"
                          + "\n".join(lines)[-3000:])
    result = json.loads(results[-1].split(" ", 1)[1])
    rows, _ = read_prediction_rows(resolve_split_root(data_root), {t: specs[t] for t in result["counts"]})
    sizes = [to_pil_image(r.image_file).size for r in rows]
    result.update(wall_s=wall, device=device,
                  kernel_backend=backend or os.environ.get("M2DINO_KERNELS_BACKEND", "auto"),
                  data_root=str(data_root), machine=machine_description(),
                  image_sizes=[min(sizes), max(sizes)] if sizes else None,
                  cuda_available=torch.cuda.is_available())
    images = max(1, result["rows"])
    median = statistics.median(result["again_s"])
    result["seconds_per_image"] = median / images
    result["fastest_seconds_per_image"] = min(result["again_s"]) / images
    result["slowest_seconds_per_image"] = max(result["again_s"]) / images
    result["warmup_s"] = max(0.0, result["first_s"] - median)
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
    return (f"{cpu}, {os.cpu_count()} logical cores{memory}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
