"""The report's statistics recomputed with scipy and statsmodels from the same hand-built run
directories (conftest.simulate_study written to disk): effects in the metrics' units and their
tests over seeds or over images, the multiplicity correction, at chance and the gap share, the
summaries over tasks, the tests over tasks; and what report.json carries beside them (seeds,
budget, stop reasons, capacity, the per-group table)."""
import json
import math
import warnings

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests

from m2dino import report as report_cli
from m2dino.evaluation import bootstrap as B
from m2dino.evaluation import report as R
from m2dino.evaluation.report.change import DEFAULT_MARGINS
from m2dino.evaluation.report.tasklevel import PERMUTATIONS

LOWER = {"mre"}


def oriented(value, reference, metric):
    return reference - value if metric in LOWER else value - reference


def per_seed(run_dirs, paradigm, task):
    return [json.loads((d / paradigm / "metrics.json").read_text())["tasks"][task] for d in run_dirs]


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory, simulate):
    root = tmp_path_factory.mktemp("three")
    study = simulate(np.random.default_rng(11), n_tasks=9, n_groups=3, chance_tasks=(4,),
                           effect=lambda p, i, n, t: {"au": 0.08, "cg": -0.03, "ts": 0.0}[p])
    run_dirs = study.write(root)
    return run_dirs, R.build_report([root], n_resamples=300)


def test_effects_are_t_tests_over_seeds(three_seeds):
    run_dirs, report = three_seeds
    assert report["seeds"] == [0, 1, 2] and report["replicates"] == ["seed-0", "seed-1", "seed-2"]
    for task_id, task in report["tasks"].items():
        metric = task["primary_metric"]
        ts = [e["metrics"][metric] for e in per_seed(run_dirs, "ts", task_id)]
        for paradigm in ("cg", "au"):
            values = [e["metrics"][metric] for e in per_seed(run_dirs, paradigm, task_id)]
            d = np.array([oriented(v, r, metric) for v, r in zip(values, ts)])
            test = scipy.stats.ttest_1samp(d, 0.0)
            effect = task["effect_units"][paradigm]
            assert effect["method"] == "t over seeds" and effect["n_seeds"] == 3
            assert effect["value"] == pytest.approx(d.mean(), abs=1e-12)
            assert effect["p"] == pytest.approx(test.pvalue, rel=1e-9)
            assert effect["ci"] == pytest.approx(list(test.confidence_interval(0.95)), rel=1e-9)
            margin = DEFAULT_MARGINS[metric]
            ni = task["paradigms"][paradigm]["non_inferiority"]
            assert ni["margin"] == margin
            assert ni["p"] == pytest.approx(scipy.stats.ttest_1samp(d, -margin, alternative="greater").pvalue)
            relative = [oriented(v, r, metric) / abs(r) for v, r in zip(values, ts)]
            assert task["paradigms"][paradigm]["change_vs_ts"][metric] == pytest.approx(np.mean(relative))


def test_every_per_task_p_value_is_adjusted_in_one_family(three_seeds, tmp_path):
    run_dirs, report = three_seeds
    changes = [c for view in report["against"].values() for per_task in view["tasks"].values()
               for c in per_task.values()]
    raw = [c["effect_units"]["p"] for c in changes] + [min(1.0, 2 * c["non_inferiority"]["p"]) for c in changes]
    adjusted = [c["effect_units"]["p_adjusted"] for c in changes] + [c["non_inferiority"]["p_adjusted"]
                                                                     for c in changes]
    assert report["correction"] == "bh" and report["settings"]["correction"]["n_per_task_tests"] == len(raw)
    assert adjusted == pytest.approx(list(multipletests(raw, alpha=0.05, method="fdr_bh")[1]))
    holm = R.build_report(run_dirs, n_resamples=0, correction="holm")
    changes = [c for per_task in holm["against"]["ts"]["tasks"].values() for c in per_task.values()]
    raw = [c["effect_units"]["p"] for c in changes] + [min(1.0, 2 * c["non_inferiority"]["p"]) for c in changes]
    adjusted = [c["effect_units"]["p_adjusted"] for c in changes] + [c["non_inferiority"]["p_adjusted"]
                                                                     for c in changes]
    assert adjusted == pytest.approx(list(multipletests(raw, alpha=0.05, method="holm")[1]))
    for c in changes:  # a flag: adjusted p <= 0.05, the effect's sign, and the relative change beyond 5%
        relative = c["change_vs_ts"][c["effect_units"]["metric"]]
        expected = ("positive" if c["effect_units"]["p_adjusted"] <= 0.05 and c["effect_units"]["value"] > 0
                    and relative > 0.05 else "negative" if c["effect_units"]["p_adjusted"] <= 0.05
                    and c["effect_units"]["value"] < 0 and relative < -0.05 else "n.s.")
        assert c["transfer"] == expected
    none = R.build_report(run_dirs, n_resamples=0, correction="none")
    for per_task in none["against"]["ts"]["tasks"].values():
        for c in per_task.values():
            assert c["effect_units"]["p_adjusted"] == c["effect_units"]["p"]
    with pytest.raises(ValueError, match="--correction"):
        R.build_report(run_dirs, correction="bonferroni")


def test_at_chance_tasks_have_no_gap_share_and_leave_the_relative_summaries(three_seeds):
    run_dirs, report = three_seeds
    assert report["tasks"]["t04"]["at_chance"] is True  # planted: its quality sits at the baseline
    view = report["against"]["ts"]
    for task_id, task in report["tasks"].items():
        metric = task["primary_metric"]
        ts = np.mean([e["metrics"][metric] for e in per_seed(run_dirs, "ts", task_id)])
        baseline = per_seed(run_dirs, "ts", task_id)[0]["baseline"][metric]
        for paradigm in ("cg", "au"):
            share = task["paradigms"][paradigm]["gap_share"]
            if task["at_chance"]:
                assert share is None
            else:
                expected = task["effect_units"][paradigm]["value"] / oriented(ts, baseline, metric)
                assert share == pytest.approx(expected)
    overall = view["averages"]["overall"]["all"]["au"]
    assert overall["at_chance_tasks"] == ["t04"]
    shares = [report["tasks"][t]["paradigms"]["au"]["gap_share"] for t in report["tasks"] if t != "t04"]
    assert overall["gap_share"]["n_tasks"] == len(shares) == 8
    assert overall["gap_share"]["mean"] == pytest.approx(np.mean(shares))
    assert overall["gap_share"]["median"] == pytest.approx(np.median(shares))
    relative = [report["tasks"][t]["paradigms"]["au"]["change_vs_ts"][report["tasks"][t]["primary_metric"]]
                for t in report["tasks"] if t != "t04"]
    assert overall["relative_change"]["median"] == pytest.approx(np.median(relative))
    # the interval of the mean resamples the tasks: scipy.stats.bootstrap with the report's stream
    rng = np.random.default_rng(B.task_seed(B.BOOTSTRAP_SEED, "ts/overall/all/au/gap"))
    expected = scipy.stats.bootstrap((np.array(shares),), np.mean, n_resamples=300, method="percentile", rng=rng)
    assert overall["gap_share"]["ci_mean"] == pytest.approx(list(expected.confidence_interval))
    units = view["averages"]["by_task_type"]["detection"]["au"]["effect_units"]
    detection = [report["tasks"][t]["effect_units"]["au"]["value"] for t in report["tasks"]
                 if report["tasks"][t]["task_type"] == "detection"]
    assert units["metric"] == "iou" and units["median"] == pytest.approx(np.median(detection))


def test_the_tests_over_tasks_are_scipys_and_statsmodels(three_seeds):
    import pandas as pd
    import statsmodels.formula.api as smf

    _, report = three_seeds
    tests = {(e["test"], e["paradigm"]): e for e in report["against"]["ts"]["task_level_tests"]}
    tasks = {t: task for t, task in report["tasks"].items() if not task["at_chance"]}
    share = {p: [tasks[t]["paradigms"][p]["gap_share"] for t in tasks] for p in ("cg", "au")}
    log_n = [math.log(tasks[t]["train_size"]) for t in tasks]
    for paradigm in ("cg", "au"):
        rho = tests["spearman_log_train_size", paradigm]
        assert rho["n_tasks"] == 8
        assert rho["statistic"] == pytest.approx(scipy.stats.spearmanr(share[paradigm], log_n).statistic)
        assert 1 / (PERMUTATIONS + 1) <= rho["p"] <= 1
        kruskal = tests["kruskal_task_type", paradigm]
        by_type = {}
        for t, value in zip(tasks, share[paradigm]):
            by_type.setdefault(tasks[t]["task_type"], []).append(value)
        assert kruskal["statistic"] == pytest.approx(scipy.stats.kruskal(*by_type.values()).statistic)
        frame = pd.DataFrame({"effect": share[paradigm], "log_n": log_n,
                              "task_type": [tasks[t]["task_type"] for t in tasks],
                              "group": [tasks[t]["group"] for t in tasks]})
        with warnings.catch_warnings():  # a group variance at 0 with three groups: statsmodels warns
            warnings.simplefilter("ignore")
            fit = smf.mixedlm("effect ~ log_n + C(task_type)", frame, groups="group").fit(reml=True)
        mixed = tests["mixedlm_log_train_size", paradigm]
        assert mixed["slope"] == pytest.approx(fit.params["log_n"], rel=1e-6)
        assert mixed["p"] == pytest.approx(fit.pvalues["log_n"], rel=1e-6)
    iqr = tests["paired_permutation_iqr", "au-cg"]
    assert iqr["statistic"] == pytest.approx(scipy.stats.iqr(share["au"]) - scipy.stats.iqr(share["cg"]))
    family = [e["p"] for e in report["against"]["ts"]["task_level_tests"] if e["p"] is not None]
    adjusted = [e["p_adjusted"] for e in report["against"]["ts"]["task_level_tests"] if e["p"] is not None]
    assert adjusted == pytest.approx(list(multipletests(family, method="fdr_bh")[1]))
    assert {e["question"] for e in report["task_level_tests"]} == {"RQ2", "RQ3", "RQ4"}
    for entry in report["task_level_tests"]:
        assert {"test", "statistic", "p", "n_tasks"} <= set(entry)


def test_one_seed_tests_over_images_and_says_so(tmp_path, simulate):
    study = simulate(np.random.default_rng(12), n_tasks=6, n_groups=2, seeds=(0,))
    run_dir = study.write(tmp_path)[0]
    report = R.build_report([run_dir], n_resamples=200)
    assert report["seeds"] == [0]
    assert "validation images only" in report["settings"]["seed_method"]
    for rq in ("RQ1", "RQ5"):
        assert report["answers"][rq]["answer"].startswith("inconclusive: one training seed")
    task = study.tasks[1]  # detection: IoU per image
    effect = report["tasks"][task.task_id]["effect_units"]["au"]
    assert effect["method"] == "permutation over images"
    values = {p: np.asarray(study.values(p, task, 0)["iou"]) for p in ("au", "ts")}
    # p: the paired permutation test, by hand with scipy (the metric is the mean IoU)
    seed = B.task_seed(B.BOOTSTRAP_SEED, f"{task.task_id}/au/ts")
    by_hand = scipy.stats.permutation_test((values["au"], values["ts"]),
                                           lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                                           permutation_type="samples", vectorized=True, n_resamples=200,
                                           rng=np.random.default_rng(seed))
    assert effect["p"] == pytest.approx(by_hand.pvalue)
    # interval: the paired percentile bootstrap; non-inferiority: the bootstrap p-value rule
    index = B.resample_indices(len(task.paths), 200, B.task_seed(B.BOOTSTRAP_SEED, task.task_id))
    difference = values["au"][index].mean(axis=1) - values["ts"][index].mean(axis=1)
    assert effect["ci"] == pytest.approx(list(B.percentile_interval(difference)))
    k = int((difference + DEFAULT_MARGINS["iou"] <= 0).sum())
    ni = report["tasks"][task.task_id]["paradigms"]["au"]["non_inferiority"]
    assert ni["p"] == pytest.approx((k + 1) / 201)


def test_bootstrap_p_value_rule():
    dist = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])  # one of five at or below 0, none at or above... four
    assert B.bootstrap_p_value(dist) == pytest.approx(2 * (1 + 1) / 6)
    assert B.bootstrap_p_value(dist, alternative="greater") == pytest.approx(2 / 6)
    assert B.bootstrap_p_value(dist, alternative="less") == pytest.approx(5 / 6)
    assert B.bootstrap_p_value(np.full(9, 2.0)) == pytest.approx(2 / 10)    # never 0: (0 + 1) / (B + 1), twice
    assert B.bootstrap_p_value(np.zeros(9)) == 1.0                          # at most 1
    assert B.bootstrap_p_value([np.nan, 1.0, 2.0], 0.0, "greater") == pytest.approx(1 / 3)  # NaN left out
    assert np.allclose(B.bootstrap_p_value(np.stack([dist, -dist])), [0.6667, 0.6667], atol=1e-3)
    with pytest.raises(ValueError, match="alternative"):
        B.bootstrap_p_value(dist, alternative="both")


def test_budget_stop_reason_final_lr_and_capacity_from_metrics_json(tmp_path, simulate):
    study = simulate(np.random.default_rng(13), n_tasks=3, n_groups=1, seeds=(0, 1))

    def training(paradigm, model, seed):
        entry = {"train_images": 10, "epochs": 3.0, "steps": 30 + seed, "samples_seen": 30, "seconds": 1.0}
        if paradigm != "ts":  # TS models of this run predate the fields
            entry.update(stop_reason="plateau" if seed == 0 else "cap", final_lr=1e-5,
                         capacity={"params_total": 1000, "params_active_per_token": 600, "train_flops": 2.0e12})
        return entry

    run_dirs = study.write(tmp_path, config={"budget": "converged"}, training=training)
    report = R.build_report(run_dirs, n_resamples=0)
    assert report["budget"] == "converged" and report["protocol"].startswith("converged budget")
    au = report["training"]["au"]["all"]
    assert au["steps"] == 30.5 and au["stop_reason"] == "cap x1, plateau x1" and au["final_lr"] == 1e-5
    assert report["training"]["cg"]["G0"]["capacity"]["source"] == "metrics.json"
    assert report["capacity"]["au"] == {"models": 1, "params_total": 1000, "params_active_per_token": 600,
                                        "params_active_per_token_min": 600, "train_flops": 4.0e12,
                                        "sources": ["metrics.json"]}
    ts = report["training"]["ts"]["t00"]
    assert ts["stop_reason"] is None and ts["final_lr"] is None
    assert report["capacity"]["ts"]["params_total"] is None and report["capacity"]["ts"]["sources"] == ["not recorded"]
    markdown = R.render_markdown(report)
    assert "| TS | t00 | 10 | 3.00 | 30 | 30 | 1.0 | not recorded | not recorded | n/a |" in markdown
    assert "## Capacity per paradigm" in markdown and "4.00 TFLOP" in markdown


def test_capacity_counted_from_best_json_where_metrics_json_has_none(tmp_path, simulate):
    from m2dino.models import create_model
    from m2dino.models.capacity import parameter_counts

    study = simulate(np.random.default_rng(14), n_tasks=3, n_groups=1, seeds=(0,))
    run_dir = study.write(tmp_path)[0]
    model = create_model("dinov3_tiny", ["lung", "fetal_femur", "breast_2cls"], moe_layers=2, num_experts=4, top_k=2)
    (run_dir / "au" / "all" / "best.json").write_text(json.dumps(model.checkpoint_config()))
    report = R.build_report([run_dir], n_resamples=0)
    counts = parameter_counts(model)
    assert report["capacity"]["au"]["params_total"] == counts["total"]
    assert report["capacity"]["au"]["params_active_per_token"] == counts["active_per_token"]
    assert report["capacity"]["au"]["train_flops"] is None and report["capacity"]["au"]["sources"] == ["best.json"]
    assert "not recorded" in R.render_markdown(report)


def test_old_runs_without_budget_read_as_equal_exposure(tmp_path, simulate):
    run_dirs = simulate(np.random.default_rng(15), n_tasks=3, n_groups=1, seeds=(0,)).write(tmp_path)
    report = R.build_report(run_dirs, n_resamples=0)
    assert report["budget"] == "equal-exposure"
    assert report["protocol"] == "equal exposure (--epochs 7 for every model)"


def test_group_table_has_each_paradigms_absolute_metric(three_seeds):
    _, report = three_seeds
    table = {g["group"]: g for g in report["group_table"]}
    assert sorted(table) == ["G0", "G1", "G2"]
    g0 = table["G0"]
    assert g0["tasks"] == [t for t, task in report["tasks"].items() if task["group"] == "G0"]
    assert g0["train_images"] == sum(report["tasks"][t]["train_size"] for t in g0["tasks"])
    assert g0["cg_models"] == ["G0"] and g0["cg_steps"] == 5
    row = g0["rows"][0]
    task = report["tasks"][row["task"]]
    assert row["values"] == {p: task["paradigms"][p]["metrics"][task["primary_metric"]] for p in ("ts", "cg", "au")}
    assert "## Per clinical group (the paper's table)" in R.render_markdown(report)


def test_cli_takes_the_correction_and_the_margins(three_seeds, tmp_path, capsys):
    run_dirs, _ = three_seeds
    root = run_dirs[0].parent
    out = tmp_path / "out"
    assert report_cli.main([str(root), "--out", str(out), "--bootstrap", "0", "--correction", "holm",
                            "--non-inferiority-margin", "dice=0.05,mre=2"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["correction"] == "holm" and data["settings"]["non_inferiority_margins"]["dice"] == 0.05
    assert data["settings"]["non_inferiority_margins"]["mre"] == 2.0
    assert data["replicates"] == ["seed-0", "seed-1", "seed-2"]  # a folder of seed-N run directories
    for name in ("report.md", "report.csv", "change_vs_ts.png", "averages.png", "scale_scatter.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Holm" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        report_cli.main([str(root), "--out", str(out), "--non-inferiority-margin", "accuracy=0.1"])
    assert "unknown metric 'accuracy'" in capsys.readouterr().err


def test_the_command_lines_defaults_are_the_librarys():
    from m2dino.evaluation.report.tasklevel import CORRECTIONS, DEFAULT_CORRECTION

    assert report_cli.DEFAULT_CORRECTION == DEFAULT_CORRECTION == R.DEFAULT_CORRECTION
    assert tuple(report_cli.CORRECTIONS) == tuple(CORRECTIONS)
    assert report_cli.DEFAULT_MARGINS == DEFAULT_MARGINS
