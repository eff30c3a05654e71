"""A run directory is never lost: a second run over a finished one stops unless told how to go
on (--resume continues with the run's own config, --overwrite moves it aside)."""
import hashlib
import json

import pytest
import yaml

from m2dino.train import main
from m2dino.training.config import TrainConfig, save_config
from m2dino.training.rundir import RunDirError, prepare_run_dir

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
EPOCHS = 1


def argv(suite, out, *extra, epochs=EPOCHS):
    return ["--data", str(suite), "--out", str(out), "--paradigm", "au", "--img-size", "32", "--batch-size", "4",
            "--epochs", str(epochs), "--bootstrap", "0", "--jobs", "1", "--log-every", "1", "--no-progress", *extra]


def checksums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "R"
    assert main(argv(suite, out)) == 0
    return out


def events(out):
    lines = (out / "au" / "all" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_rerun_without_flags_stops_and_changes_nothing(suite, finished, capsys):
    before = checksums(finished)
    assert main(argv(suite, finished)) == 2
    err = capsys.readouterr().err
    assert str(finished) in err and "--resume" in err and "--overwrite" in err
    assert checksums(finished) == before


def test_resume_with_a_different_value_names_it_and_changes_nothing(suite, finished, capsys):
    before = checksums(finished)
    assert main(argv(suite, finished, "--resume", "--lr", "1")) == 2
    err = capsys.readouterr().err
    assert "--lr 1.0 (the run has 0.0015)" in err and "--epochs" in err  # and what may change
    assert checksums(finished) == before
    assert main(argv(suite, finished, "--resume", "--top-k", "1")) == 2
    assert "--top-k 1 (the run has 2)" in capsys.readouterr().err


def test_resume_with_more_epochs_trains_on(suite, tmp_path, finished):
    out = tmp_path / "R"
    assert main(argv(suite, out)) == 0
    steps_before = events(out)[-1]["step"]
    assert main(argv(suite, out, "--resume", epochs=EPOCHS + 2)) == 0
    resumed = [e for e in events(out) if e["event"] == "resume"][-1]
    assert resumed["changes"] == {"epochs": [EPOCHS, EPOCHS + 2]}
    metrics = json.loads((out / "au" / "metrics.json").read_text())
    assert metrics["training"]["all"]["epochs"] == EPOCHS + 2
    assert events(out)[-1]["event"] == "finished" and events(out)[-1]["step"] == 3 * steps_before
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == EPOCHS + 2


def test_overwrite_moves_the_old_run_aside(suite, tmp_path, capsys):
    out = tmp_path / "R"
    assert main(argv(suite, out)) == 0
    before = checksums(out)
    assert main(argv(suite, out, "--overwrite")) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("R.old-")]
    assert len(moved) == 1 and checksums(moved[0]) == before
    assert (out / "au" / "all" / "best.safetensors").is_file()
    assert "moved the run" in capsys.readouterr().out


def test_a_torchrun_restart_resumes_without_the_flag(suite, finished, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    config = prepare_run_dir(TrainConfig(data=str(suite), out=str(finished)), given={"data", "out"})
    assert config.resume and config.epochs == EPOCHS and config.model.img_size == 32  # the run's own config


def test_the_demo_reruns_over_its_own_run_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = TrainConfig()
    run_dir = tmp_path / demo.out
    save_config(demo, run_dir / "config.yaml")
    (run_dir / "au" / "all").mkdir(parents=True)
    (run_dir / "au" / "all" / "best.safetensors").write_bytes(b"weights")
    assert prepare_run_dir(demo, given=set(), demo=True) == demo
    assert "earlier run of the no-argument demo" in capsys.readouterr().out
    save_config(TrainConfig(epochs=3), run_dir / "config.yaml")  # someone's own run in runs/default
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        prepare_run_dir(demo, given=set(), demo=True)
    with pytest.raises(RunDirError, match="choose one"):
        prepare_run_dir(TrainConfig(resume=True), given={"resume"}, overwrite=True)
