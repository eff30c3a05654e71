"""The transfer report's PNG plots: the gap share vs TS per task (with each bar's 95% interval),
the group / type / scale medians over tasks (with theirs), the gap share against the task's and
its clinical group's training size, and per multi-task model the task-by-expert routing
shares and the task affinity. Every figure is saved with a tight bounding box, so the full
task names show whatever their length."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from m2dino import io
from m2dino.evaluation.report.change import Change
from m2dino.paradigms import label


def write_plots(report: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    view = (report.get("against") or {}).get("ts")
    paradigms = view["compared"] if view else []
    task_ids = list(report["tasks"])
    if paradigms and task_ids:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(task_ids) + 1.5))
        height = 0.8 / len(paradigms)
        for k, paradigm in enumerate(paradigms):
            values, errors = _bars([_gap_share_bar(view, t, paradigm) for t in task_ids])
            ax.barh(np.arange(len(task_ids)) + k * height, values, height, xerr=errors, capsize=1.5,
                    error_kw={"elinewidth": 0.6}, label=label(paradigm))
        ax.axvline(0, color="black", linewidth=0.6)
        ax.axvline(-100, color="red", linestyle="--", linewidth=0.8, label="back to the trivial baseline")
        ax.invert_yaxis()  # first task on top, as in the tables
        names = [f"{t} (TS at chance)" if report["tasks"][t].get("at_chance") else t for t in task_ids]
        ax.set_yticks(np.arange(len(task_ids)) + 0.4 - height / 2, names, fontsize=7)
        ax.set_xlabel("gap share vs TS (%): effect / (TS - trivial baseline); bars: the effect's 95% interval; "
                      "positive is better")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / "change_vs_ts.png", plt))

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, (key, title) in zip(axes, (("by_group", "clinical group"), ("by_task_type", "task type"),
                                            ("by_scale", "data scale"))):
            names = list(view["averages"][key])
            for k, paradigm in enumerate(paradigms):
                shares = [view["averages"][key][n].get(paradigm, {}).get("gap_share") or {} for n in names]
                values, errors = _bars([(s.get("median"), s.get("ci_median")) for s in shares])
                ax.bar(np.arange(len(names)) + k * height, values, height, yerr=errors, capsize=1.5,
                       error_kw={"elinewidth": 0.6}, label=label(paradigm))
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_xticks(np.arange(len(names)) + 0.4 - height / 2, names, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"median gap share vs TS by {title} (%)", fontsize=9)
        axes[0].legend(fontsize=7)
        written.append(_save(fig, out_dir / "averages.png", plt))
        written.append(_scale_scatter(report, view, paradigms, out_dir, plt))

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


def _gap_share_bar(view: dict, task_id: str, paradigm: str):
    """(gap share, its interval: the effect's interval over the same gap), (None, None) at chance."""
    data = view["tasks"].get(task_id, {}).get(paradigm)
    gap = (view["at_chance"].get(task_id) or {}).get("gap")
    change = Change.from_json(paradigm, data) if data else None
    if change is None or change.gap_share is None or not gap:
        return None, None
    interval = change.units_ci
    return change.gap_share, [v / gap for v in interval] if interval and None not in interval else None


def _scale_scatter(report: dict, view: dict, paradigms: list[str], out_dir: Path, plt) -> Path:
    """Gap share against log(train size) and log(clinical-group size), one point per task, with the
    rank correlations of the tests over tasks in the legend."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: PLC0415 (matplotlib loads lazily)

    group_size: dict[str, int] = {}
    for task in report["tasks"].values():
        group_size[task["group"]] = group_size.get(task["group"], 0) + int(task["train_size"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (test, size_of, title) in zip(axes, (
            ("spearman_log_train_size", lambda t: t["train_size"], "training images of the task"),
            ("spearman_log_group_size", lambda t: group_size[t["group"]], "training images of its clinical group"))):
        for paradigm in paradigms:
            points = [(size_of(report["tasks"][t]), share) for t in view["tasks"]
                      for share in [_gap_share_bar(view, t, paradigm)[0]] if share is not None]
            entry = next((e for e in view["task_level_tests"] if e["test"] == test and e["paradigm"] == paradigm), {})
            rho = entry.get("statistic")
            name = label(paradigm) + ("" if rho is None else f" (rho {rho:+.2f}, adj. p {entry['p_adjusted']:.2g})")
            if points:
                x, y = zip(*points)
                ax.scatter(x, 100 * np.asarray(y), s=14, label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers, no crowded minor labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xlabel(f"{title} (log scale)")
        if ax.collections:  # no point when every task is at chance
            ax.legend(fontsize=7)
    axes[0].set_ylabel("gap share vs TS (%)")
    fig.suptitle("Scale and transfer, one point per task (tasks at chance left out)", fontsize=9)
    return _save(fig, out_dir / "scale_scatter.png", plt)


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
