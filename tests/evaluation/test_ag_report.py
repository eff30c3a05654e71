"""The report's AG section on hand-built run directories (two seeds; TS, CG, AG and three random
groupings, each seed's affinity.json planted): AG stands beside TS and CG in the tables, the
random groupings only in its section; the predictor's rank correlation, AG vs CG and AG vs the
random groupings come out as planted."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from m2dino.evaluation import metrics as M
from m2dino.evaluation.affinity import AffinityAccumulator, StepAffinity, write_affinity
from m2dino.evaluation.report import build_report, render_markdown
from m2dino.evaluation.report.render import render_csv

TASKS = [f"t{i}" for i in range(6)]
CG = {"G0": ["t0", "t1", "t2"], "G1": ["t3", "t4", "t5"]}
AG = {"affinity_1": ["t0", "t1", "t3"], "affinity_2": ["t2", "t4", "t5"]}
RANDOM = [{"group_1": ["t0", "t2", "t4"], "group_2": ["t1", "t3", "t5"]},
          {"group_1": ["t0", "t4", "t5"], "group_2": ["t1", "t2", "t3"]},
          {"group_1": ["t0", "t1", "t5"], "group_2": ["t2", "t3", "t4"]}]
# AG's gain on task i (Dice), and the affinity onto task i from its AG group: the same order
GAIN = {t: 0.02 * (i + 1) for i, t in enumerate(TASKS)}
BASE = {t: 0.5 + 0.03 * i for i, t in enumerate(TASKS)}  # every other paradigm's quality


def model_of(groups: dict, task: str) -> str:
    return next(g for g, members in groups.items() if task in members)


def write_paradigm(run_dir, paradigm, groups, quality, rng):
    entries, per_image = {}, {}
    for task in TASKS:
        model = model_of(groups, task) if groups else task
        q = np.clip(quality[task] + rng.normal(0, 0.05, 30), 0.01, 0.99)
        values = {"dice": [[float(v)] for v in q], "hd": [[float(20 * (1 - v))] for v in q],
                  "image_path": [f"../segmentation/{task}/{i:03d}.png" for i in range(30)]}
        per_image.setdefault(model, {})[task] = values
        entries[task] = {"task_type": "segmentation", "group": model_of(CG, task), "train_size": 40,
                         "primary_metric": "dice", "num_classes": 2, "model": model,
                         "metrics": M.metrics_from_values("segmentation", 2, values), "baseline": {"dice": 0.1}}
    for model, tasks in per_image.items():
        (run_dir / paradigm / model).mkdir(parents=True)
        (run_dir / paradigm / model / "eval_per_image.json").write_text(json.dumps({"tasks": tasks}))
    training = {m: {"train_images": 40, "epochs": 7.0, "steps": 5, "samples_seen": 280, "seconds": 1.0}
                for m in per_image}
    (run_dir / paradigm / "metrics.json").write_text(json.dumps(
        {"paradigm": paradigm, "models": groups or {t: [t] for t in TASKS}, "training": training, "tasks": entries}))


def planted_affinity(path, rng):
    """Lookahead affinity onto task j from each other task of its AG group: 0.01 (j + 1) (noisy)."""
    accumulator = AffinityAccumulator(TASKS)
    for step in range(4):
        lookahead = rng.normal(0, 0.001, (6, 6))
        for members in AG.values():
            for a in members:
                for b in members:
                    lookahead[TASKS.index(a), TASKS.index(b)] += 0.01 * (TASKS.index(b) + 1)
        accumulator.add(step, StepAffinity(TASKS, lookahead, rng.normal(0, 0.1, (6, 6)), np.ones(6)), 0.01)
    write_affinity(path, accumulator.record())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("ag-run")
    rng = np.random.default_rng(0)
    run_dirs = []
    for seed in (0, 1):
        run_dir = root / f"seed-{seed}"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(json.dumps({"seed": seed, "epochs": 7}))
        write_paradigm(run_dir, "ts", None, BASE, rng)
        write_paradigm(run_dir, "cg", CG, BASE, rng)
        write_paradigm(run_dir, "ag", AG, {t: BASE[t] + GAIN[t] for t in TASKS}, rng)
        for i, groups in enumerate(RANDOM, 1):
            write_paradigm(run_dir, f"random_{i}", groups, BASE, rng)
        planted_affinity(run_dir / "ag" / "affinity.json", rng)
        (run_dir / "ag" / "grouping.json").write_text(json.dumps({"affinity": "ag/affinity.json"}))
        run_dirs.append(run_dir)
    return build_report(run_dirs, n_resamples=200)


def test_ag_is_a_paradigm_of_the_tables_and_the_random_groupings_are_not(report):
    assert report["paradigms"] == ["ts", "cg", "ag"]
    assert set(report["training"]) == {"ts", "cg", "ag"}
    assert "ag" in report["tasks"]["t0"]["paradigms"]
    assert all(not p.startswith("random_") for t in report["tasks"].values() for p in t["paradigms"])
    assert "random_" not in render_csv(report)


def test_the_section_names_each_seeds_groups_and_its_affinity(report):
    section = report["affinity_groupings"]
    assert section["random_groupings"] == ["random_1", "random_2", "random_3"]
    for rep in ("seed-0", "seed-1"):
        assert section["groups"][rep]["ag"] == AG and section["groups"][rep]["cg"] == CG
        assert section["groups"][rep]["random_2"] == RANDOM[1]
        assert section["affinity_files"][rep].endswith(f"{rep}/ag/affinity.json")


def test_the_planted_affinity_predicts_the_planted_gains(report):
    for rep in ("seed-0", "seed-1"):
        ag = report["affinity_groupings"]["prediction"][rep]["ag"]
        assert ag["n"] == 6 and ag["spearman"] > 0.8
        assert set(report["affinity_groupings"]["prediction"][rep]) == {"cg", "ag"}


def test_ag_beats_cg_and_the_random_groupings_as_planted(report):
    versus = report["affinity_groupings"]["ag_vs_cg"]
    assert versus["n"] == 6 and versus["better"] == 6 and versus["p"] == pytest.approx(0.03125)
    null = report["affinity_groupings"]["ag_vs_random"]
    assert len(null["random"]) == 3 and null["at_least_as_good"] == 0 and null["p"] == pytest.approx(0.25)


def test_report_md_has_the_section(report):
    text = render_markdown(report)
    assert "## Affinity groups (AG)" in text
    assert "- seed-0: affinity_1: t0, t1, t3; affinity_2: t2, t4, t5" in text
    assert "AG vs 3 random groupings" in text and "AG vs CG (Wilcoxon" in text


def test_without_random_groupings_ag_vs_chance_is_not_tested(report, tmp_path):
    source = Path(report["affinity_groupings"]["affinity_files"]["seed-0"]).parents[1]
    run_dir = tmp_path / "seed-0"
    shutil.copytree(source, run_dir, ignore=lambda folder, names: [n for n in names if n.startswith("random_")])
    section = build_report([run_dir], n_resamples=50)["affinity_groupings"]
    assert section["random_groupings"] == [] and section["ag_vs_random"] is None
    assert section["ag_vs_cg"]["n"] == 6
    assert "no random groupings trained" in render_markdown(build_report([run_dir], n_resamples=0))
