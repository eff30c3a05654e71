"""A study's models one after another (--jobs 1, all cores' threads in one process) against
side by side (--jobs = cores, one process per core with cores/N threads): the same four TS
models of the default preset at 64 px, batch 16, six epochs each (a few seconds per model, a
short study: the workers' start is part of the time), timed round-robin. What
`--jobs` promises: more images per second on the CPU for the same training (the results are
identical at equal threads, tests/training/test_jobs.py). Target on >= 2 cores: at least 1.2x."""
from pathlib import Path

import pytest
import torch
from harness import RESULTS

from m2dino.data import load_fmuia, write_suite
from m2dino.tasks import apply_groups, load_groups
from m2dino.training.config import TrainConfig
from m2dino.training.jobs import ModelJob, StudyContext, cpu_cores, train_models

TASKS = ["breast_lesion", "breast_2cls", "fetal_femur", "thyroid_nodule_det"]
TRAIN_IMAGES = 64
EPOCHS = 6
MIN_SPEEDUP = 1.2


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study_suite")
    write_suite(root, scale=0.001, tasks=TASKS, min_train=TRAIN_IMAGES, min_val=4, workers=1)
    data = load_fmuia(root)
    specs = {s.task_id: s for s in apply_groups(list(data.tasks.values()), load_groups())}
    return data, specs, tmp_path_factory.mktemp("study_runs")


@pytest.mark.skipif(cpu_cores() < 2, reason="side by side needs 2 cores")
def test_models_side_by_side_vs_one_after_another(study, measure_peers):
    data, specs, runs = study
    jobs = [ModelJob("ts", t, (t,), TRAIN_IMAGES) for t in TASKS]
    counter = iter(range(10**6))

    def train(n_jobs):
        def fn():
            out = Path(runs) / f"run{next(counter)}"
            config = TrainConfig(out=str(out), epochs=EPOCHS, bootstrap=0, progress=False, jobs=n_jobs).validate()
            context = StudyContext(config, data.train, data.val, specs, {}, torch.device("cpu"), out)
            results = list(train_models(context, jobs, n_jobs))
            assert len(results) == len(TASKS)
        return fn

    case = f"study {len(TASKS)} TS models x {EPOCHS} epochs"
    measure_peers(case, {"one after another": train(1), f"{cpu_cores()} side by side": train(cpu_cores())},
                  rounds=2, warmup=0)
    timings = RESULTS[case]
    images = len(TASKS) * TRAIN_IMAGES * EPOCHS
    for m in timings.values():
        m.items = images
    speedup = timings["one after another"].seconds / timings[f"{cpu_cores()} side by side"].seconds
    assert speedup >= MIN_SPEEDUP, f"side by side only {speedup:.2f}x one after another"
