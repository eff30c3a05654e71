"""The transfer report's PNG plots: change vs TS per task (with each bar's 95% interval), the
group / type / scale averages (with theirs), and per multi-task model the task-by-expert routing
shares and the task affinity. Every figure is saved with a tight bounding box, so the full
task names show whatever their length."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from m2dino import io
from m2dino.paradigms import label


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    paradigms = [p for p in report["paradigms"] if p != "ts"]
    task_ids = list(report["tasks"])
    if "ts" in report["paradigms"] and paradigms and task_ids:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(task_ids) + 1.5))
        height = 0.8 / len(paradigms)
        for k, paradigm in enumerate(paradigms):
            results = [(report["tasks"][t]["paradigms"].get(paradigm, {}), report["tasks"][t]["primary_metric"])
                       for t in task_ids]
            values, errors = _bars([(r.get("change_vs_ts", {}).get(m), r.get("change_ci", {}).get(m))
                                    for r, m in results])
            ax.barh(np.arange(len(task_ids)) + k * height, values, height, xerr=errors, capsize=1.5,
                    error_kw={"elinewidth": 0.6}, label=label(paradigm))
        ax.axvline(-100 * report["settings"]["negative_transfer_threshold"], color="red", linestyle="--",
                   linewidth=0.8, label="negative-transfer threshold")
        ax.axvline(0, color="black", linewidth=0.6)
        ax.invert_yaxis()  # first task on top, as in the tables
        ax.set_yticks(np.arange(len(task_ids)) + 0.4 - height / 2, task_ids, fontsize=7)
        ax.set_xlabel("primary-metric change vs TS (%), bars: 95% interval; positive is better")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "change_vs_ts.png", plt))

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, (key, title) in zip(axes, (("by_group", "clinical group"), ("by_task_type", "task type"),
                                            ("by_scale", "data scale"))):
            names = list(report["averages"][key])
            for k, paradigm in enumerate(paradigms):
                summaries = [report["averages"][key][n].get(paradigm, {}) for n in names]
                values, errors = _bars([(s.get("primary_change_vs_ts"), s.get("primary_change_ci")) for s in summaries])
                ax.bar(np.arange(len(names)) + k * height, values, height, yerr=errors, capsize=1.5,
                       error_kw={"elinewidth": 0.6}, label=label(paradigm))
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(np.arange(len(names)) + 0.4 - height / 2, names, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"mean change vs TS by {title} (%)", fontsize=9)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out_dir / "averages.png", plt))

    for paradigm, models in report["routing"].items():
        for model_name, data in models.items():
            stem = f"{paradigm}_{model_name}".replace(os.sep, "_").replace("@", "_")
            layers = list(data["shares"])
            if not layers or len(data["tasks"]) < 2:  # single-task (TS) models: numbers in report.json only
                continue
            fig, axes = plt.subplots(1, len(layers), figsize=(2.2 * len(layers) + 1, 0.25 * len(data["tasks"]) + 1.5),
                                     squeeze=False)
            for ax, layer in zip(axes[0], layers):
                image = ax.imshow(np.asarray(data["shares"][layer]), vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_title(f"block {layer}", fontsize=8)
                ax.set_xlabel("expert", fontsize=7)
                ax.set_yticks(range(len(data["tasks"])), data["tasks"] if ax is axes[0][0] else [], fontsize=6)
            fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the task's tokens")
            written.append(_save(fig, out_dir / f"routing_{stem}.png", plt))

            fig, ax = plt.subplots(figsize=(0.3 * len(data["tasks"]) + 3, 0.3 * len(data["tasks"]) + 2.5))
            affinity = np.asarray(data["affinity"], dtype=np.float64)
            image = ax.imshow(affinity, vmin=0, vmax=1, cmap="magma")
            ax.set_xticks(range(len(data["tasks"])), data["tasks"], rotation=90, fontsize=6)
            ax.set_yticks(range(len(data["tasks"])), data["tasks"], fontsize=6)
            ax.set_title("task affinity (1 - JS divergence of routing)", fontsize=9)
            fig.colorbar(image, ax=ax, shrink=0.8)
            written.append(_save(fig, out_dir / f"affinity_{stem}.png", plt))
    return written


def _bars(pairs) -> tuple[list[float], np.ndarray | None]:
    """[(change, [low, high] | None)] -> bar lengths in % (0 where undefined) and matplotlib's
    asymmetric error array [2, n] (None when no bar has an interval)."""
    values, low, high, any_interval = [], [], [], False
    for value, interval in pairs:
        value = 100 * value if value is not None and math.isfinite(value) else 0.0
        values.append(value)
        if interval and all(v is not None and math.isfinite(v) for v in interval):
            any_interval = True
            low.append(max(0.0, value - 100 * interval[0]))
            high.append(max(0.0, 100 * interval[1] - value))
        else:
            low.append(0.0)
            high.append(0.0)
    return values, (np.array([low, high]) if any_interval else None)


def _save(fig, path: Path, plt) -> Path:
    # bbox_inches="tight" grows the canvas to the labels: no task name is cut at the edge
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path
