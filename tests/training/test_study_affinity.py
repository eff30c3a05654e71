"""The study's AU run records the affinity probe (affinity.json in the AU model's folder) at
--affinity-steps measured steps, every PROBE_EVERY-th; the other paradigms and 0 record none."""
import pytest

from m2dino.evaluation.affinity import AFFINITY_FILE, read_affinity
from m2dino.training.affinity import PROBE_EVERY
from m2dino.training.study import run

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
RUN_OPTIONS = dict(bootstrap=0, jobs=1)


@pytest.mark.slow
def test_the_au_run_records_its_probe_window(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(suite, out, steps=PROBE_EVERY + 2, affinity_steps=2))
    record = read_affinity(out / "au" / "all" / AFFINITY_FILE)
    assert record.tasks == TASKS and record.steps == [0, PROBE_EVERY]
    assert record.measured["every"] == PROBE_EVERY and record.measured["seconds"] > 0
    assert all(lr > 0 for lr in record.lr)


def test_a_run_shorter_than_the_window_records_what_it_measured(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(suite, out, steps=2, affinity_steps=3))
    assert read_affinity(out / "au" / "all" / AFFINITY_FILE).steps == [0]


def test_no_probe_off_au_or_with_zero_steps(suite, tiny_config, tmp_path):
    run(tiny_config(suite, tmp_path / "ts", paradigm="ts", steps=1))
    run(tiny_config(suite, tmp_path / "off", steps=1, affinity_steps=0))
    assert not list(tmp_path.rglob(AFFINITY_FILE))
