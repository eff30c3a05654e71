"""Writing the entry folder: the checks before anything is written, the files built in a
staging folder beside `out` and renamed into place (m2dino.io.replace_directory), so that a
failed export writes nothing. `out` may hold none of the inputs (the checkpoint, the wheel, the
--measure data) nor lie inside the --measure data; the export holds `out`'s writer's lock
(m2dino.io.lock_directory) from the last check to the swap, so two exports never write one
folder."""
from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from m2dino import io
from m2dino.data.reader import csv_num_classes
from m2dino.export.checkpoint import check_checkpoint
from m2dino.export.measure import PURE_BACKEND, measure_run, synthetic_measure_root
from m2dino.export.options import DEFAULT_BASE_IMAGE, DEFAULT_CUDA_ARCHES, MEASURE_ROWS, ExportError, check_options
from m2dino.export.render import dockerfile_text, model_py, readme_text
from m2dino.export.wheel import build_wheel, copy_sources, copy_wheel, project_root, requirements_text, wheel_metadata
from m2dino.models.m2dino import FORMAT_VERSION, save_model
from m2dino.models.pretrained import describe_record, file_sha256

SETTINGS_FILE = "predictor.json"  # model.py reads it; the Dockerfile and README name these files
MODEL_STEM = "model"
WHEEL_DIR = "wheels"
SOURCE_DIR = "src"


def holds_files(out: Path) -> bool:
    """Whether the folder `out` holds anything but a writer's lock file."""
    return out.is_dir() and any(p.name != io.LOCK_FILE for p in out.iterdir())


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if holds_files(out) and not force:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")


def check_inputs_outside(out: Path, checkpoint: Path, wheel, measure) -> None:
    """ExportError when `out` holds an input (the checkpoint, the wheel) or overlaps the --measure data root."""
    here = out.resolve()
    for given, what in ((checkpoint, "checkpoint"), (Path(wheel) if wheel else None, "wheel")):
        if given is not None and here in given.resolve().parents:
            raise ExportError(f"the {what} {given} lies inside the output folder {out}")
    if measure not in (None, "synthetic"):
        data = Path(measure).resolve()
        if here == data or data in here.parents or here in data.parents:
            raise ExportError(f"--out {out} and the --measure data root {measure} overlap: the export writes into "
                              f"none of its inputs. Choose an --out outside the data")


def readable_by_all(folder: Path) -> None:
    """Folders 0755, files 0644 (temporary files are created 0600): the image's COPY keeps the
    modes, and the container may run as any user."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def predictor_settings(model, weights: Path, device: str, batch_size: int, amp: str, tta: bool, meta: dict) -> dict:
    """predictor.json: what model.py runs with, and where the weights came from (the checkpoint,
    and the DINOv3 weights it started from: its `pretrained` record, None when it has none)."""
    return {
        "format_version": 1, "checkpoint": f"{MODEL_STEM}.safetensors", "device": device,
        "batch_size": int(batch_size), "amp": amp, "tta": bool(tta),
        "tasks": [{"task_id": t.task_id, "task_type": t.task_type, "num_classes": csv_num_classes(t), "hflip": t.hflip}
                  for t in model.tasks],
        "model_format_version": FORMAT_VERSION, "m2dino_version": meta["version"], "wheel": meta["wheel"],
        "source_checkpoint": str(weights.absolute()), "source_sha256": file_sha256(weights),
        "pretrained": model.pretrained,
        "exported_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def export_predictor(checkpoint, out, tta: bool = False, device: str = "auto", batch_size: int = 8,
                     amp: str = "off", force: bool = False, wheel=None, base_image: str = DEFAULT_BASE_IMAGE,
                     build_ext: bool = False, cuda_arches: str = DEFAULT_CUDA_ARCHES, measure="synthetic",
                     measure_rows: int = MEASURE_ROWS, progress=None) -> dict:
    """Write the predictor folder `out` (see the package doc); returns its settings, with the
    measurement under "measured" (None when not measured). `measure`: "synthetic" (a small
    synthetic folder of the checkpoint's tasks), a data root with csv_files/, or None.
    progress: called with a line of text as each step starts and ends (None: silent)."""
    say = progress or (lambda message: None)
    check_options(device, amp, batch_size, base_image)
    out = Path(out).absolute()
    check_out_dir(out, force)
    checkpoint = Path(checkpoint)
    check_inputs_outside(out, checkpoint, wheel, measure)
    model, weights = check_checkpoint(checkpoint)
    say(f"checkpoint {checkpoint}: {len(model.tasks)} task(s), a model {describe_record(model.pretrained)}")
    if measure not in (None, "synthetic") and not (Path(measure) / "csv_files").is_dir() \
            and not (Path(measure) / "val" / "csv_files").is_dir():
        raise ExportError(f"--measure {measure}: no csv_files/ folder there (nor val/csv_files/)")
    root = None if wheel else project_root()

    with io.lock_directory(out, "m2dino.export"):
        check_out_dir(out, force)  # again, under the lock: what another process did meanwhile counts
        return _write_entry(model, weights, out, tta, device, batch_size, amp, wheel, root, base_image, build_ext,
                            cuda_arches, measure, measure_rows, say)


def _write_entry(model, weights: Path, out: Path, tta: bool, device: str, batch_size: int, amp: str, wheel, root,
                 base_image: str, build_ext: bool, cuda_arches: str, measure, measure_rows: int, say) -> dict:
    """Build the entry in a staging folder beside `out`, then swap it in (the old one moved aside)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_model(model, staging / MODEL_STEM)
        if not wheel:
            say("building the m2dino wheel (pure Python, M2DINO_BUILD_EXT=0) from this checkout ...")
        started = time.perf_counter()
        built = copy_wheel(Path(wheel), staging / WHEEL_DIR) if wheel else build_wheel(root, staging / WHEEL_DIR)
        say(f"wheel {built.name} ({time.perf_counter() - started:.0f} s)")
        meta = {**wheel_metadata(built), "wheel": built.name}
        if build_ext:
            copy_sources(root or project_root(), staging / SOURCE_DIR)
        settings = predictor_settings(model, weights, device, batch_size, amp, tta, meta)
        io.write_json(staging / SETTINGS_FILE, settings, indent=2)
        io.write_text(staging / "model.py", model_py())
        io.write_text(staging / "requirements.txt", requirements_text(meta))
        io.write_text(staging / "Dockerfile", dockerfile_text(meta["wheel"], base_image, build_ext, cuda_arches,
                                                              meta["version"], pretrained=model.pretrained))
        measured = None
        if measure is not None:
            with tempfile.TemporaryDirectory(prefix="m2dino-measure-data-") as scratch:
                if measure == "synthetic":
                    data_root = synthetic_measure_root(model.task_ids, Path(scratch), measure_rows)
                    label = f"a synthetic FM_UIA folder, {measure_rows} rows per task"
                else:
                    data_root, label = Path(measure), f"`{measure}`"
                if data_root is not None:
                    say(f"measuring time and memory on {label}: a fresh process, a warm-up pass and timed passes")
                    # on this machine's CPU, with the kernel backend the image runs
                    measured = measure_run(staging, data_root, {t.task_id: t for t in model.tasks}, device="cpu",
                                           backend=None if build_ext else PURE_BACKEND, progress=say)
                    measured["data_root_label"] = label
        io.write_text(staging / "README.md", readme_text(settings, meta, measured, build_ext, base_image, cuda_arches))
        readable_by_all(staging)
        if holds_files(out):  # --force: the old folder moves aside, nothing is deleted
            print(f"moved the existing {out} aside to {io.move_aside(out)}")
        io.replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**settings, "out": str(out), "measured": measured}
