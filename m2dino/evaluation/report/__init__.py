"""The transfer report: TS / CG / AU compared task by task, by clinical group, task type and
data scale, with the MoE routing of every multi-task model.

`generate_report(run_dirs, out_dir)` (and `python -m m2dino.report RUN_DIR... --out DIR`)
reads each run directory's `<paradigm>/metrics.json` (and `<paradigm>/<model>/routing.json`,
per-image values and best.json where present; runs.py), computes every number (compute.py, where
the definitions are; the per-task tests in change.py, the claims over tasks in tasklevel.py) and
the answers to the study's questions from them (answers.py), and writes `report.md`,
`report.csv` (render.py), `report.json` and PNG plots (plots.py) into DIR.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from m2dino import io
from m2dino.evaluation.report.answers import answers
from m2dino.evaluation.report.change import DEFAULT_MARGINS
from m2dino.evaluation.report.compute import DEFAULT_NEGATIVE_THRESHOLD, compute_report
from m2dino.evaluation.report.design import read_answers
from m2dino.evaluation.report.plots import write_plots
from m2dino.evaluation.report.render import render_csv, render_markdown
from m2dino.evaluation.report.tasklevel import DEFAULT_CORRECTION

REPORT_MARKER = ".m2dino-report.json"  # the files m2dino.report wrote into its folder (m2dino.io.claim_files)


def write_report(report: dict, out_dir: os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write report.md, report.csv, report.json and the PNG plots into out_dir; returns the paths.
    The files are made in a staging folder beside out_dir, then renamed in one by one; out_dir may
    hold anything else, but a file at one of these names that an m2dino report did not write
    stops it (InputError) unless `overwrite`, which moves out_dir aside first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        plots = write_plots(report, staging)
        io.write_json(staging / "report.json", report)
        io.write_text(staging / "report.csv", render_csv(report))
        io.write_text(staging / "report.md", render_markdown(report, [p.name for p in plots]))
        names = sorted(p.name for p in staging.iterdir())
        with io.lock_directory(out_dir, "m2dino.report"):
            ours = io.claim_files(out_dir, names, "m2dino.report", REPORT_MARKER, overwrite,
                                  also_ours=_older_report(out_dir))
            with io.lock_directory(out_dir, "m2dino.report"):  # the same lock, or the new folder's after a move
                io.record_files(out_dir, "m2dino.report", REPORT_MARKER, ours | set(names))
                for name in names:
                    os.replace(staging / name, out_dir / name)
                io.fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    paths = {"json": out_dir / "report.json", "csv": out_dir / "report.csv", "markdown": out_dir / "report.md"}
    return {**paths, "plots": [out_dir / p.name for p in plots]}


def _older_report(out_dir: Path) -> frozenset:
    """The files of a report an m2dino without REPORT_MARKER wrote into out_dir (its report.json
    is ours: a JSON object with our keys), else nothing."""
    try:
        data = io.read_json(out_dir / "report.json")
    except (OSError, ValueError):
        return frozenset()
    if not {"tasks", "answers"} <= set(data):
        return frozenset()
    return frozenset({"report.json", "report.md", "report.csv"} | {p.name for p in out_dir.glob("*.png")})


def build_report(run_dirs: Sequence[os.PathLike], scale_threshold: float | None = None,
                 negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD, n_resamples: int = 1000,
                 correction: str = DEFAULT_CORRECTION, margins: dict | None = None) -> dict:
    """Every number of the report (compute_report) and the answers computed from them.
    correction: "bh" (Benjamini-Hochberg, the default), "holm" or "none", over every per-task test;
    margins: non-inferiority margins in metric units ({"dice": 0.02, ...}; DEFAULT_MARGINS otherwise)."""
    report = compute_report(run_dirs, scale_threshold=scale_threshold, negative_threshold=negative_threshold,
                            n_resamples=n_resamples, correction=correction, margins=margins)
    report["answers"] = answers(report)
    for rq, sentence in read_answers(report).items():  # on the synthetic suite: does its design agree?
        report["answers"][rq]["designed_truth"] = sentence
    return report


def generate_report(run_dirs: Sequence[os.PathLike], out_dir: os.PathLike, scale_threshold: float | None = None,
                    negative_threshold: float = DEFAULT_NEGATIVE_THRESHOLD, n_resamples: int = 1000,
                    correction: str = DEFAULT_CORRECTION, margins: dict | None = None,
                    overwrite: bool = False) -> dict:
    """Build and write the report (what `m2dino.train --paradigm all` calls); returns the report dict."""
    # the folder's writer lock from the first read to the last rename: a second report into the
    # same folder stops at once instead of replacing this one's files when it ends
    with io.lock_directory(out_dir, "m2dino.report"):
        report = build_report(run_dirs, scale_threshold, negative_threshold, n_resamples, correction, margins)
        write_report(report, out_dir, overwrite)
    return report


__all__ = ["DEFAULT_CORRECTION", "DEFAULT_MARGINS", "DEFAULT_NEGATIVE_THRESHOLD", "REPORT_MARKER", "answers",
           "build_report", "compute_report", "generate_report", "render_markdown", "write_report"]
