"""The transfer report recomputed from hand-built run directories with known numbers."""
import csv
import json
import math

import pytest

from m2dino import report as report_cli
from m2dino.evaluation import report as R

# task: (type, group, train_size, primary metric, {paradigm: primary value}, baseline)
TASKS = {
    "segA": ("segmentation", "G1", 100, "dice", {"ts": 0.8, "cg": 0.6, "au": 0.84}, 0.1),
    "clsB": ("classification", "G1", 20, "f1_macro", {"ts": 0.5, "cg": 0.55, "au": 0.45}, 0.3),
    "detC": ("detection", "G2", 50, "iou", {"ts": 0.6, "cg": 0.6, "au": 0.3}, 0.2),
    "regD": ("regression", "G2", 10, "mre", {"ts": 20.0, "cg": 25.0, "au": 10.0}, 40.0),
}
HD = {"ts": 10.0, "cg": 12.0, "au": 8.0}
MODELS = {"ts": lambda t, g: t, "cg": lambda t, g: g, "au": lambda t, g: "all"}


def write_paradigm(run_dir, paradigm, overrides=None, routing=None):
    overrides = overrides or {}
    tasks = {}
    models = {}
    for task_id, (task_type, group, size, metric, values, baseline) in TASKS.items():
        metrics = {metric: overrides.get(task_id, values[paradigm])}
        base = {metric: baseline}
        if task_type == "segmentation":
            metrics["hd"] = HD[paradigm]
            base["hd"] = 50.0
        model = MODELS[paradigm](task_id, group)
        models.setdefault(model, []).append(task_id)
        tasks[task_id] = {"task_type": task_type, "group": group, "train_size": size, "model": model,
                          "metrics": metrics, "baseline": base}
    folder = run_dir / paradigm
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"paradigm": paradigm, "models": models, "tasks": tasks}))
    if routing is not None:
        (folder / "all").mkdir()
        (folder / "all" / "routing.json").write_text(json.dumps(routing))


ROUTING = {
    "tasks": ["segA", "clsB", "detC"],
    "num_experts": 2,
    "layers": {
        "10": [[10, 0], [0, 5], [1, 1]],
        "11": [[3, 1], [3, 1], [2, 0]],
    },
}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    for paradigm in ("ts", "cg"):
        write_paradigm(run, paradigm)
    write_paradigm(run, "au", routing=ROUTING)
    return run


def test_per_task_changes_and_flags(run_dir):
    rep = R.build_report([run_dir])
    assert rep["paradigms"] == ["ts", "cg", "au"]
    seg = rep["tasks"]["segA"]["paradigms"]
    assert seg["cg"]["change_vs_ts"]["dice"] == pytest.approx(-0.25)
    assert seg["au"]["change_vs_ts"]["dice"] == pytest.approx(0.05)
    # HD: lower is better, so 12 vs 10 is -20% and 8 vs 10 is +20%
    assert seg["cg"]["change_vs_ts"]["hd"] == pytest.approx(-0.2)
    assert seg["au"]["change_vs_ts"]["hd"] == pytest.approx(0.2)
    reg = rep["tasks"]["regD"]["paradigms"]
    assert reg["cg"]["change_vs_ts"]["mre"] == pytest.approx(-0.25)
    assert reg["au"]["change_vs_ts"]["mre"] == pytest.approx(0.5)
    assert reg["au"]["beats_baseline"] is True  # MRE 10 < 40
    assert "change_vs_ts" not in seg["ts"]
    flagged = {(n["task_id"], n["paradigm"]) for n in rep["negative_transfer"]}
    assert flagged == {("segA", "cg"), ("clsB", "au"), ("detC", "au"), ("regD", "cg")}
    stricter = R.build_report([run_dir], negative_threshold=0.2)
    assert {(n["task_id"], n["paradigm"]) for n in stricter["negative_transfer"]} == {
        ("segA", "cg"), ("detC", "au"), ("regD", "cg")}


def test_averages_by_group_type_and_scale(run_dir):
    rep = R.build_report([run_dir])
    assert rep["settings"]["scale_threshold"] == 35.0  # median of 100, 20, 50, 10
    assert rep["tasks"]["detC"]["scale"] == "data-rich" and rep["tasks"]["clsB"]["scale"] == "data-scarce"
    scale = rep["averages"]["by_scale"]
    assert scale["data-rich"]["cg"]["primary_change_vs_ts"] == pytest.approx((-0.25 + 0.0) / 2)
    assert scale["data-rich"]["au"]["primary_change_vs_ts"] == pytest.approx((0.05 - 0.5) / 2)
    assert scale["data-scarce"]["cg"]["primary_change_vs_ts"] == pytest.approx((0.1 - 0.25) / 2)
    assert scale["data-scarce"]["au"]["primary_change_vs_ts"] == pytest.approx((-0.1 + 0.5) / 2)
    group = rep["averages"]["by_group"]
    assert group["G1"]["cg"]["primary_change_vs_ts"] == pytest.approx((-0.25 + 0.1) / 2)
    assert group["G2"]["au"]["primary_change_vs_ts"] == pytest.approx(0.0)
    assert group["G2"]["au"]["negative_transfer_tasks"] == 1
    by_type = rep["averages"]["by_task_type"]
    assert by_type["segmentation"]["au"]["metrics"] == {"dice": 0.84, "hd": 8.0}
    assert by_type["segmentation"]["au"]["change_vs_ts"]["hd"] == pytest.approx(0.2)
    overall = rep["averages"]["overall"]["all"]["au"]["primary_change_vs_ts"]
    assert overall == pytest.approx((0.05 - 0.1 - 0.5 + 0.5) / 4)
    custom = R.build_report([run_dir], scale_threshold=20)
    assert custom["tasks"]["clsB"]["scale"] == "data-rich"  # >= threshold is data-rich
    assert custom["settings"]["scale_threshold_rule"] == "given"


def test_routing_shares_and_affinity(run_dir):
    rep = R.build_report([run_dir])
    routing = rep["routing"]["au"]["all"]
    assert routing["shares"]["10"] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert routing["shares"]["11"][2] == [1.0, 0.0]
    affinity = routing["affinity"]
    # segA vs clsB: disjoint in block 10 (JSD 1 -> 0), identical in block 11 (-> 1)
    assert affinity[0][1] == pytest.approx(0.5)
    # segA vs detC: block 10 (1,0) vs (.5,.5) and block 11 (.75,.25) vs (1,0)
    def jsd(p, q):
        m = [(a + b) / 2 for a, b in zip(p, q)]

        def kl(x):
            return sum(a * math.log2(a / c) for a, c in zip(x, m) if a > 0)
        return (kl(p) + kl(q)) / 2
    expected = ((1 - jsd([1, 0], [0.5, 0.5])) + (1 - jsd([0.75, 0.25], [1, 0]))) / 2
    assert affinity[0][2] == pytest.approx(expected)
    assert affinity[1][1] == pytest.approx(1.0)


def test_replicates_are_averaged(run_dir, tmp_path):
    other = tmp_path / "seed2"
    write_paradigm(other, "au", overrides={"segA": 0.76})
    rep = R.build_report([run_dir, other])
    au = rep["tasks"]["segA"]["paradigms"]["au"]
    assert au["runs"] == 2
    assert au["metrics"]["dice"] == pytest.approx(0.8)
    assert au["change_vs_ts"]["dice"] == pytest.approx(0.0)


def test_written_files_recompute(run_dir, tmp_path):
    out = tmp_path / "report"
    assert report_cli.main([str(run_dir), "--out", str(out)]) == 0
    for name in ("report.md", "report.csv", "report.json", "change_vs_ts.png", "averages.png",
                 "routing_au_all.png", "affinity_au_all.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 5  # 3 paradigms x (4 primary metrics + hd)
    for row in rows:
        if row["paradigm"] == "ts":
            assert row["change_vs_ts"] == ""
            continue
        value, ts_value = float(row["value"]), float(row["ts_value"])
        sign = -1 if row["metric"] in ("hd", "mre") else 1
        assert float(row["change_vs_ts"]) == pytest.approx(sign * (value - ts_value) / abs(ts_value))
    flagged = {(r["task_id"], r["paradigm"]) for r in rows if r["negative_transfer"] == "True"}
    assert flagged == {("segA", "cg"), ("clsB", "au"), ("detC", "au"), ("regD", "cg")}
    data = json.loads((out / "report.json").read_text())
    assert data["tasks"]["segA"]["paradigms"]["cg"]["change_vs_ts"]["dice"] == pytest.approx(-0.25)
    markdown = (out / "report.md").read_text()
    # no per-image values: the effects are untested, flagged by the threshold alone (no mark when within it)
    row = ("| segA | segmentation | G1 | 100 | data-rich | dice | 0.8000 | 0.6000 (-0.2000) ! | 0.8400 (+0.0400) | "
           "0.1000 | no |")
    assert row in markdown


def test_undefined_change_is_null_in_json(tmp_path):
    run = tmp_path / "run"
    write_paradigm(run, "ts", overrides={"detC": 0.0})
    write_paradigm(run, "au")
    rep = R.build_report([run])
    assert math.isnan(rep["tasks"]["detC"]["paradigms"]["au"]["change_vs_ts"]["iou"])
    R.write_report(rep, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["tasks"]["detC"]["paradigms"]["au"]["change_vs_ts"]["iou"] is None


def test_bad_input_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        R.build_report([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no <paradigm>/metrics.json"):
        R.build_report([tmp_path / "empty"])
    bad = tmp_path / "bad" / "au"
    bad.mkdir(parents=True)
    (bad / "metrics.json").write_text('{"paradigm": "au", "tasks": {"x": {"metrics": {}}}}')
    with pytest.raises(ValueError, match=r"metrics.json: task 'x' has no 'task_type'"):
        R.build_report([tmp_path / "bad"])
    assert report_cli.main([str(tmp_path / "bad"), "--out", str(tmp_path / "o")]) == 2
    assert "task 'x'" in capsys.readouterr().err


def test_single_paradigm_report_has_no_changes(tmp_path):
    run = tmp_path / "run"
    write_paradigm(run, "au")
    rep = R.build_report([run])
    assert rep["negative_transfer"] == []
    assert "change_vs_ts" not in rep["tasks"]["segA"]["paradigms"]["au"]
    markdown = R.render_markdown(rep)
    assert "Changes against TS need a TS run" in markdown
    assert "Not assessed" in markdown


# ------------------------------------------------------------ intervals, seeds and answers
# Per-image IoU of a detection task under each paradigm: AU truly better than TS on every
# image, CG the same as TS plus noise; two training seeds of each.
IMAGES = [f"../Detection/d/{i:02d}.png" for i in range(30)]


def write_detection_run(run_dir, seed, gains=None):
    """A run directory whose only task is detection, with per-image values (eval_per_image.json)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.uniform(0.3, 0.6, len(IMAGES))
    gains = gains or {"ts": 0.0, "cg": 0.0, "au": 0.15}
    for paradigm, gain in gains.items():
        iou = np.clip(base + gain + rng.normal(0, 0.02, len(IMAGES)), 0, 1)
        model = {"ts": "det", "cg": "Thyroid", "au": "all"}[paradigm]
        folder = run_dir / paradigm
        (folder / model).mkdir(parents=True)
        entry = {"task_type": "detection", "group": "Thyroid", "train_size": 40, "num_classes": 1, "model": model,
                 "metrics": {"iou": float(iou.mean())}, "baseline": {"iou": 0.2}}
        (folder / "metrics.json").write_text(json.dumps({
            "paradigm": paradigm, "models": {model: ["det"]}, "tasks": {"det": entry},
            "training": {model: {"train_images": 40, "epochs": 9.0, "steps": 27, "samples_seen": 360,
                                 "seconds": 3.0}}}))
        # stored in another image order than the other paradigms: the report aligns by image_path
        order = rng.permutation(len(IMAGES)) if paradigm == "cg" else np.arange(len(IMAGES))
        (folder / model / "eval_per_image.json").write_text(json.dumps({"tasks": {"det": {
            "image_path": [IMAGES[i] for i in order], "iou": [float(iou[i]) for i in order]}}}))


def test_intervals_paired_changes_and_evidence_flags(tmp_path):
    write_detection_run(tmp_path / "seed-0", seed=0)
    rep = R.build_report([tmp_path / "seed-0"], n_resamples=500)
    det = rep["tasks"]["det"]["paradigms"]
    lo, hi = det["au"]["ci"]["iou"]
    assert lo < det["au"]["metrics"]["iou"] < hi
    assert det["au"]["transfer"] == "positive" and det["au"]["change_ci"]["iou"][0] > 0
    assert det["cg"]["transfer"] == "n.s." and det["cg"]["change_ci"]["iou"][0] < 0 < det["cg"]["change_ci"]["iou"][1]
    # the paired change interval is the bootstrap's, recomputed here on the same resamples
    from m2dino.evaluation import bootstrap as B

    values = {p: json.loads((tmp_path / "seed-0" / p / m / "eval_per_image.json").read_text())["tasks"]["det"]
              for p, m in (("ts", "det"), ("au", "all"))}
    seed = B.task_seed(B.BOOTSTRAP_SEED, "det")
    index = B.resample_indices(len(IMAGES), 500, seed)
    by_path = {p: dict(zip(v["image_path"], v["iou"])) for p, v in values.items()}
    ordered = {p: [by_path[p][path] for path in sorted(IMAGES)] for p in by_path}
    change = [(sum(ordered["au"][i] for i in row) - sum(ordered["ts"][i] for i in row))
              / sum(ordered["ts"][i] for i in row)
              for row in index]
    assert det["au"]["change_ci"]["iou"] == pytest.approx(list(B.percentile_interval(change)), rel=1e-9)
    # without intervals the threshold alone flags, and the report says so
    plain = R.build_report([tmp_path / "seed-0"], n_resamples=0)
    assert plain["tasks"]["det"]["paradigms"]["au"]["ci"] == {}
    assert "threshold alone" in plain["settings"]["transfer_rule"]


def test_seeds_are_pooled_as_stated(tmp_path):
    """Two seeds: value = mean of the seeds, spread = their std, interval = the two-level
    bootstrap recomputed by hand from the per-image values."""
    import numpy as np

    from m2dino.evaluation import bootstrap as B

    for seed in (0, 1):
        write_detection_run(tmp_path / f"seed-{seed}", seed=seed)
    rep = R.build_report([tmp_path / "seed-0", tmp_path / "seed-1"], n_resamples=300)
    au = rep["tasks"]["det"]["paradigms"]["au"]
    per_seed = [json.loads((tmp_path / f"seed-{s}" / "au" / "metrics.json").read_text())
                ["tasks"]["det"]["metrics"]["iou"]
                for s in (0, 1)]
    assert au["runs"] == 2 and rep["replicates"] == ["seed-0", "seed-1"]
    assert au["metrics"]["iou"] == pytest.approx(np.mean(per_seed))
    assert au["spread"]["iou"] == pytest.approx(np.std(per_seed, ddof=1))
    # by hand: the same image resamples for both seeds, then for each resample a draw of the seeds
    index = B.resample_indices(len(IMAGES), 300, B.task_seed(B.BOOTSTRAP_SEED, "det"))
    dists = []
    for s in (0, 1):
        values = json.loads((tmp_path / f"seed-{s}" / "au" / "all" / "eval_per_image.json").read_text())["tasks"]["det"]
        by_path = dict(zip(values["image_path"], values["iou"]))
        ordered = np.array([by_path[p] for p in sorted(IMAGES)])
        dists.append(ordered[index].mean(axis=1))
    draws = np.random.default_rng([B.task_seed(B.BOOTSTRAP_SEED, "det/iou"), 1]).integers(0, 2, (300, 1, 2))
    pooled = np.stack(dists).T[np.arange(300)[:, None, None], draws].mean(axis=2).ravel()
    assert au["ci"]["iou"] == pytest.approx(list(B.percentile_interval(pooled)), rel=1e-9)
    assert "two-level bootstrap" in rep["settings"]["seed_method"]
    assert rep["training"]["au"]["all"]["steps"] == 27


def test_answers_are_recomputed_from_report_json(tmp_path):
    for seed in (0, 1):
        write_detection_run(tmp_path / f"seed-{seed}", seed=seed)
    out = tmp_path / "report"
    written = R.generate_report([tmp_path / "seed-0", tmp_path / "seed-1"], out, n_resamples=200)
    data = json.loads((out / "report.json").read_text())
    assert R.answers(data) == data["answers"] == written["answers"]
    assert set(data["answers"]) == {"RQ1", "RQ2", "RQ3", "RQ4", "RQ5"}
    # one task, one group: the scale, type and stability questions cannot be decided, and say why
    rq2 = data["answers"]["RQ2"]
    assert rq2["verdict"] == "inconclusive" and "fewer than 5 tasks" in rq2["answer"]
    assert data["answers"]["RQ4"]["verdict"] == "inconclusive"
    # two seeds: the per-task tests run over them (1 degree of freedom); AU's gain is large and steady
    assert data["tasks"]["det"]["effect_units"]["au"]["method"] == "t over seeds"
    assert data["tasks"]["det"]["paradigms"]["au"]["transfer"] == "positive"
    assert "Thyroid: CG" in data["answers"]["RQ1"]["answer"]
    markdown = (out / "report.md").read_text()
    assert "## Answers" in markdown and "## Training length per model" in markdown


def test_scale_split_is_stated_and_an_empty_side_said_in_words(run_dir):
    rep = R.build_report([run_dir])
    assert rep["settings"]["scale_counts"] == {"data-rich": 2, "data-scarce": 2}
    markdown = R.render_markdown(rep)
    assert "data-rich when its training size is >= 35 (median training size): 2 data-rich, 2 data-scarce" in markdown
    one_sided = R.build_report([run_dir], scale_threshold=5)
    text = R.render_markdown(one_sided)
    assert "no data-scarce task" in text and "data scale: data-rich" not in text
    assert one_sided["answers"]["RQ2"]["verdict"] == "inconclusive"


def test_plots_grow_to_show_long_task_names(tmp_path):
    from PIL import Image

    def width(task_name, folder):
        run = tmp_path / folder
        for paradigm in ("ts", "au"):
            write_paradigm(run, paradigm)
        for paradigm in ("ts", "au"):
            path = run / paradigm / "metrics.json"
            data = json.loads(path.read_text())
            data["tasks"][task_name] = data["tasks"].pop("segA")
            path.write_text(json.dumps(data))
        R.generate_report([run], tmp_path / f"out-{folder}")
        with Image.open(tmp_path / f"out-{folder}" / "change_vs_ts.png") as image:
            return image.size[0]

    assert width("s", "short") < width("fetal_abdomen_multi_with_a_very_long_name_indeed", "long")


def test_report_out_replaces_only_its_own_files(run_dir, tmp_path, capsys):
    """--out may hold anything; a file at one of the report's names that no m2dino report wrote
    stops the command (exit 2, named, untouched) unless --overwrite, which moves the folder aside."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "report.md").write_text("my own notes")
    (out / "keep.txt").write_text("mine too")
    argv = [str(run_dir), "--out", str(out), "--bootstrap", "0"]
    assert report_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "report.md" in err and "--overwrite" in err and "did not write" in err
    assert (out / "report.md").read_text() == "my own notes" and sorted(p.name for p in out.iterdir()) == [
        "keep.txt", "report.md"]
    assert not list(tmp_path.glob(".notes.tmp-*"))  # the staging folder went
    assert report_cli.main(argv + ["--overwrite"]) == 0
    moved, = tmp_path.glob("notes.old-*")
    assert (moved / "report.md").read_text() == "my own notes" and (moved / "keep.txt").is_file()
    first = json.loads((out / R.REPORT_MARKER).read_text())["files"]
    assert {"report.md", "report.csv", "report.json", R.REPORT_MARKER} <= set(first)
    (out / "keep.txt").write_text("a user's file beside a report")
    capsys.readouterr()
    assert report_cli.main(argv) == 0  # its own files: replaced without a flag, the user's kept
    assert (out / "keep.txt").read_text() == "a user's file beside a report"
    (out / R.REPORT_MARKER).unlink()  # a report written by an m2dino that kept no list: recognised
    assert report_cli.main(argv) == 0
