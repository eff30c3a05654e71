"""Models trained side by side (--jobs): the same results as one after another, errors that
name the model, the choice of the job count, and no worker left training after the study
process is killed."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch

from m2dino.evaluation.bootstrap import PER_IMAGE_FILE
from m2dino.tasks import apply_groups, load_groups
from m2dino.training import study
from m2dino.training.config import TrainConfig
from m2dino.training.jobs import ModelJob, StudyContext, cpu_cores, resolve_jobs, threads_per_job, train_models
from m2dino.training.study import load_data, run
from m2dino.training.trainer import TrainingError

TASKS = ["breast_2cls", "fetal_femur", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
RUN = dict(paradigm="all", img_size=32, batch_size=4, epochs=2, log_every=1, progress=False, bootstrap=50,
           seeds=None)


def without_wall_times(summary: dict) -> dict:
    for entry in summary["training"].values():
        entry.pop("seconds")
    return summary


def test_side_by_side_gives_the_sequential_results_exactly(suite, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(2))  # what each of the two workers runs with
    try:
        run(TrainConfig(data=str(suite), out=str(tmp_path / "one"), jobs=1, **RUN).validate())
    finally:
        torch.set_num_threads(threads)
    run(TrainConfig(data=str(suite), out=str(tmp_path / "two"), jobs=2, **RUN).validate())
    for paradigm in ("ts", "cg", "au"):
        one = json.loads((tmp_path / "one" / paradigm / "metrics.json").read_text())
        two = json.loads((tmp_path / "two" / paradigm / "metrics.json").read_text())
        assert list(two["models"]) == list(one["models"])  # the plan's order, not the finishing order
        assert without_wall_times(two) == without_wall_times(one)
        for model in one["models"]:
            for name in ("eval.json", PER_IMAGE_FILE):
                a = (tmp_path / "one" / paradigm / model / name).read_text()
                b = (tmp_path / "two" / paradigm / model / name).read_text()
                assert a == b, f"{paradigm}/{model}/{name} differs"
    assert (tmp_path / "two" / "report" / "report.md").is_file()


def test_a_worker_that_dies_is_named_and_resume_finishes(suite, tmp_path, monkeypatch):
    out = tmp_path / "run"
    # every model's worker process exits after its step 3 (the callback travels with the context)
    with monkeypatch.context() as patched:
        patched.setattr(study, "StudyContext", functools.partial(
            StudyContext, step_callbacks=(functools.partial(faults.crash_at_step, 3),)))
        with pytest.raises(TrainingError, match=r"a worker process died.*--resume"):
            run(TrainConfig(data=str(suite), out=str(out), jobs=2, **RUN).validate())
    results = run(TrainConfig(data=str(suite), out=str(out), jobs=2, resume=True, **RUN).validate())
    assert set(results) == {"ts", "cg", "au"}
    resumed = 0
    for paradigm, summary in results.items():
        for model in summary["models"]:
            events = [json.loads(line)["event"] for line in
                      (out / paradigm / model / "metrics.jsonl").read_text().splitlines()]
            assert events[-1] == "finished"
            resumed += "resume" in events
    assert resumed >= 1  # the models that died continued from their checkpoints


def test_a_failing_model_is_named_with_its_error(suite, tmp_path):
    root, out = tmp_path / "suite", tmp_path / "run"
    shutil.copytree(suite, root)
    out.mkdir()
    config = TrainConfig(data=str(root), out=str(out), **RUN).validate()
    _, data = load_data(config, out)
    specs = {s.task_id: s for s in apply_groups(list(data.tasks.values()), load_groups())}
    Path(next(r for r in data.train if r.task_id == "lung").image_file).unlink()  # gone after validation
    context = StudyContext(config, data.train, data.val, specs, {}, torch.device("cpu"), out)
    models = [ModelJob("ts", t, (t,), 8) for t in TASKS]
    with pytest.raises(TrainingError, match=r"model ts/lung \(in a worker process\): RuntimeError: cannot load "
                                            r".*lung.* row \d+"):
        list(train_models(context, models, 2))
    assert (out / "ts" / "fetal_femur" / "eval.json").is_file()  # the others still finished


def test_job_count_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_jobs(0, cpu, 35) == min(cpu_cores(), 35)
    assert resolve_jobs(0, cpu, 1) == 1
    assert resolve_jobs(0, cuda, 35) == 1
    assert resolve_jobs(3, cpu, 2) == 2
    assert resolve_jobs(1, cuda, 35) == 1
    with pytest.raises(ValueError, match=r"--jobs 2: .*CPU only.*cuda"):
        resolve_jobs(2, cuda, 35)
    assert threads_per_job(cpu_cores()) == 1 and threads_per_job(1) == cpu_cores()
    with pytest.raises(ValueError, match="--jobs"):
        TrainConfig(jobs=-1).validate()


@pytest.mark.slow
def test_no_worker_trains_on_after_the_study_is_killed(suite, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "m2dino.train", "--data", str(suite), "--out", str(out), "--paradigm", "ts",
           "--img-size", "32", "--batch-size", "2", "--epochs", "30", "--jobs", "2", "--no-progress", "--seeds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    logs = [out / "ts" / t / "metrics.jsonl" for t in TASKS]

    def sizes():
        return [p.stat().st_size if p.exists() else 0 for p in logs]

    t0 = time.monotonic()
    while sum(1 for s in sizes() if s > 2000) < 2:  # two models are training
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() - t0 < 300, "training did not start"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # a worker notices at its next step
    before = sizes()
    time.sleep(3)
    assert sizes() == before, "a worker kept training after the study process was killed"
