"""The RQ answers from hand-built report.json contents: against the converged-TS control (TS*)
each conclusion holds, holds only against TS, or is inconclusive; RQ2 needs both tests over
tasks; answers that rest on per-task evidence say "inconclusive: one training seed" with one seed."""
import pytest

from m2dino.evaluation.report.answers import ONE_SEED, answers
from m2dino.evaluation.report.change import Change
from m2dino.evaluation.report.render import _header

TASKS = [f"t{i}" for i in range(6)]


def _change(paradigm, reference, units=0.05, non_inferior=True, transfer="positive"):
    return Change(paradigm, reference, "dice", units, [units - 0.02, units + 0.02], {"dice": 0.1},
                  method="t over seeds", n_seeds=3, p=0.01, margin=0.02, non_inferiority_p=0.001, gap_share=0.2,
                  p_adjusted=0.02, non_inferiority_p_adjusted=0.004, transfer=transfer,
                  non_inferior=non_inferior).to_json()


def _tests(reference, rho_significant, slope_significant, rho=-0.6, slope=-0.1):
    def entry(test, statistic, significant, **extra):
        return {"question": "RQ2", "test": test, "paradigm": "au", "reference": reference, "statistic": statistic,
                "p": 0.001 if significant else 0.4, "p_adjusted": 0.004 if significant else 0.6,
                "significant": significant, "n_tasks": 6, "method": "m", **extra}
    return [entry("spearman_log_train_size", rho, rho_significant),
            entry("mixedlm_log_train_size", -2.5, slope_significant, slope=slope, converged=True)]


def _view(reference, compared, tests):
    summary = {"n_tasks": 6, "tasks": TASKS, "metrics": {}, "significant_gains": 6, "significant_drops": 0,
               "gap_share": {"mean": 0.2, "median": 0.2, "ci_mean": None, "ci_median": None, "n_tasks": 6}}
    return {"reference": reference, "compared": compared,
            "at_chance": {t: {"at_chance": False, "p": 0.001, "method": "m", "gap": 0.5} for t in TASKS},
            "tasks": {t: {p: _change(p, reference) for p in compared} for t in TASKS},
            "averages": {"overall": {"all": {"au": summary}}, "by_group": {"G": {"au": summary}}},
            "comparisons": {"au": {"scarce_minus_rich": {"value": 0.3, "median_difference": 0.2, "ci": None}}},
            "task_level_tests": tests}


def _report(vs_ts, vs_star, n_seeds=3):
    tasks = {t: {"task_type": "segmentation", "group": "G", "train_size": 10 * (i + 1), "primary_metric": "dice",
                 "scale": "data-scarce" if i < 3 else "data-rich", "paradigms": {}} for i, t in enumerate(TASKS)}
    return {"paradigms": ["ts", "au", "ts_converged"], "protocol": "equal exposure (--epochs 7 for every model)",
            "settings": {"bootstrap": {"n_resamples": 100}, "n_seeds": n_seeds, "alpha": 0.05,
                         "non_inferiority_margins": {"dice": 0.02},
                         "scale_counts": {"data-rich": 3, "data-scarce": 3}},
            "tasks": tasks,
            "against": {"ts": _view("ts", ["au", "ts_converged"], _tests("ts", *vs_ts)),
                        "ts_converged": _view("ts_converged", ["au"], _tests("ts_converged", *vs_star))}}


@pytest.mark.parametrize("vs_ts, vs_star, expected", [
    ((True, True), (True, True), "holds against TS*"),
    ((True, True), (True, False), "only against TS"),     # the mixed model disagrees against TS*
    ((True, False), (True, True), "inconclusive"),        # against TS the two tests do not agree
])
def test_rq2_says_whether_it_survives_the_control(vs_ts, vs_star, expected):
    result = answers(_report(vs_ts, vs_star))
    rq2 = result["RQ2"]
    assert rq2["control"] == expected
    assert ("data-scarce tasks gain more" in rq2["answer"]) == all(vs_ts)
    assert ("data-scarce tasks gain more" in rq2["control_answer"]) == all(vs_star)


def test_rq2_needs_the_rank_test_and_the_mixed_model_to_agree_in_sign():
    report = _report((True, True), (True, True))
    report["against"]["ts"]["task_level_tests"] = _tests("ts", True, True, rho=-0.6, slope=+0.1)
    assert answers(report)["RQ2"]["verdict"] == "inconclusive"


def test_rq2_needs_a_mixed_model_that_converged():
    report = _report((True, True), (True, True))
    report["against"]["ts"]["task_level_tests"][1]["converged"] = False
    assert answers(report)["RQ2"]["verdict"] == "inconclusive"


def test_without_control_answers_have_no_control_verdict():
    report = _report((True, True), (True, True))
    del report["against"]["ts_converged"]
    assert all("control" not in item for item in answers(report).values())


def test_one_seed_leaves_the_per_task_answers_inconclusive():
    result = answers(_report((True, True), (True, True), n_seeds=1))
    for rq in ("RQ1", "RQ5"):
        assert result[rq]["verdict"] == "inconclusive" and result[rq]["answer"].startswith(ONE_SEED)
    assert result["RQ2"]["verdict"] == "answered"  # a claim over tasks: their spread holds each task's seed noise
    with_seeds = answers(_report((True, True), (True, True)))
    assert with_seeds["RQ1"]["verdict"] == "answered" and "G: AU 6/6 non-inferior" in with_seeds["RQ1"]["answer"]
    assert with_seeds["RQ5"]["verdict"] == "answered" and "G: train AU" in with_seeds["RQ5"]["answer"]


def test_the_protocol_line_leads_the_header():
    report = _report((True, True), (True, True))
    report["settings"].update(scale_threshold=20, scale_threshold_rule="given", change_definition="d",
                              interval_method="m", seed_method="one training seed", transfer_rule="r",
                              negative_transfer_threshold=0.0)
    header = _header(report)
    assert header[0] == "Protocol: equal exposure (--epochs 7 for every model)."
