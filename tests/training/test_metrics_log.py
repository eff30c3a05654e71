"""The metrics log and the best-checkpoint score alone."""
import json
import math

from m2dino.tasks import get_task
from m2dino.training.metrics_log import MetricsLog, flatten
from m2dino.training.scoring import intervals, primary_score


def test_lines_are_json_a_cut_line_is_skipped_and_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    log.write("start", config={"lr": 1.0})
    log.write("train", step=1, loss=0.5)
    log.write("resume", step=1, config={"lr": 2.0})
    with open(log.path, "a") as fh:
        fh.write('{"event": "resume", "config": {"lr": 3')  # a kill in the middle of a line
    assert log.last_config() == {"lr": 2.0}
    lines = log.path.read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines[:3]] == ["start", "train", "resume"]
    log.clear()
    assert not log.path.exists() and log.last_config() is None
    log.close()
    quiet = MetricsLog(tmp_path / "rank1", enabled=False)
    quiet.write("start", step=0)
    assert not (tmp_path / "rank1").exists()
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_primary_score_is_the_mean_primary_metric_with_mre_as_baseline_error_removed():
    cls, lm = get_task("breast_2cls"), get_task("fetal_femur")
    tasks = {cls.task_id: cls, lm.task_id: lm}
    metrics = {cls.task_id: {cls.primary_metric: 0.8}, lm.task_id: {lm.primary_metric: 5.0}}
    baselines = {lm.task_id: {lm.primary_metric: 20.0}}
    assert math.isclose(primary_score(metrics, tasks, baselines), (0.8 + (1 - 5.0 / 20.0)) / 2)
    # without a baseline, the error itself (lower is better); a missing metric counts 0
    assert math.isclose(primary_score(metrics, tasks, {}), (0.8 - 5.0) / 2)
    assert math.isclose(primary_score({}, tasks, baselines), 0.0)


def test_no_resamples_no_intervals():
    assert intervals({"breast_2cls": {"correct": [1, 0]}}, {}, n_resamples=0) == {}
