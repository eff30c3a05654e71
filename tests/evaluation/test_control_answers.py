"""The RQ answers against the converged-TS control (TS*), from hand-built report.json
contents: each conclusion holds against TS*, holds only against TS, or is inconclusive."""
import pytest

from m2dino.evaluation.report.answers import answers
from m2dino.evaluation.report.render import _header


def _summary(change, ci, gains=0, drops=0):
    return {"n_tasks": 3, "tasks": [], "metrics": {}, "change_vs_ts": {"dice": change}, "primary_change_vs_ts": change,
            "primary_change_ci": ci, "significant_gains": gains, "significant_drops": drops}


def _side(scarce_minus_rich_ci):
    """averages and comparisons where AU's data-scarce tasks gain (ci of scarce - rich as given)."""
    averages = {"overall": {"all": {"au": _summary(0.3, [0.1, 0.5], gains=3)}},
                "by_group": {"G": {"au": _summary(0.3, [0.1, 0.5], gains=3)}},
                "by_task_type": {"segmentation": {"au": _summary(0.3, [0.1, 0.5], gains=3)}},
                "by_scale": {"data-scarce": {"au": _summary(0.5, [0.2, 0.8], gains=3)},
                             "data-rich": {"au": _summary(0.1, [-0.1, 0.3])}}}
    comparisons = {"au": {"scarce_minus_rich": {"value": 0.4, "ci": scarce_minus_rich_ci}}}
    return averages, comparisons


def _report(vs_ts_ci, vs_star_ci):
    averages, comparisons = _side(vs_ts_ci)
    star_averages, star_comparisons = _side(vs_star_ci)
    task = {"au": {"change_vs_ts": {"dice": 0.3}, "change_ci": {"dice": [0.1, 0.5]}, "transfer": "positive",
                   "negative_transfer": False}}
    tasks = {f"t{i}": {"task_type": "segmentation", "group": "G", "train_size": 10 * (i + 1), "primary_metric": "dice",
                       "scale": "data-scarce" if i < 3 else "data-rich",
                       "paradigms": {"ts": {"metrics": {"dice": 0.5}}, "ts_converged": {"metrics": {"dice": 0.6}},
                                     "au": {"metrics": {"dice": 0.6}, **task["au"]}}} for i in range(6)}
    return {"paradigms": ["ts", "au", "ts_converged"], "protocol": "equal exposure (--epochs 7 for every model)",
            "settings": {"bootstrap": {"n_resamples": 100}, "scale_counts": {"data-rich": 3, "data-scarce": 3}},
            "tasks": tasks, "averages": averages, "comparisons": comparisons,
            "control": {"reference": "ts_converged", "tasks": {t: dict(task) for t in tasks},
                        "averages": star_averages, "comparisons": star_comparisons}}


@pytest.mark.parametrize("vs_ts, vs_star, expected", [
    ([0.1, 0.7], [0.05, 0.6], "holds against TS*"),
    ([0.1, 0.7], [-0.2, 0.6], "only against TS"),
    ([-0.1, 0.7], [0.05, 0.6], "inconclusive"),
])
def test_rq2_says_whether_it_survives_the_control(vs_ts, vs_star, expected):
    result = answers(_report(vs_ts, vs_star))
    rq2 = result["RQ2"]
    assert rq2["control"] == expected
    assert ("data-scarce tasks gain more" in rq2["answer"]) == (vs_ts[0] > 0)
    assert ("data-scarce tasks gain more" in rq2["control_answer"]) == (vs_star[0] > 0)


def test_without_control_answers_have_no_control_verdict():
    report = _report([0.1, 0.7], [0.1, 0.7])
    del report["control"]
    assert all("control" not in item for item in answers(report).values())


def test_the_protocol_line_leads_the_header():
    report = _report([0.1, 0.7], [0.05, 0.6])
    report["settings"].update(scale_threshold=20, scale_threshold_rule="given", change_definition="d",
                              interval_method="m", seed_method="one training seed", transfer_rule="r",
                              negative_transfer_threshold=0.0)
    header = _header(report)
    assert header[0] == "Protocol: equal exposure (--epochs 7 for every model)."
