"""A run directory is never lost and never shared: a second run over a finished one stops
unless told how to go on (--resume continues with the run's own config, --overwrite moves it
aside), a folder of a user's files is never trained among, the data is never written, two runs
never write one directory at once, and a full or read-only disk is one line, not a traceback."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml
from faults import child_env, disk_full, read_only
from locks import hold_lock

from m2dino import io
from m2dino.errors import DiskFullError, format_bytes
from m2dino.train import main
from m2dino.training import checkpoint as ckpt
from m2dino.training.config import RUN_CONFIG_HEADER, TrainConfig, save_config
from m2dino.training.rundir import RunDirError, RunDirPlan, check_run_dir, prepare_run_dir, run_dir_lock

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
EPOCHS = 1


def argv(suite, out, *extra, epochs=EPOCHS):
    return ["--data", str(suite), "--out", str(out), "--seed", "0", "--paradigm", "au", "--img-size", "32",
            "--batch-size", "4",
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
    assert "--lr 1.0 (the run has 0.001)" in err and "--epochs" in err  # and what may change
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


# --------------------------------------------------------------- a user's files, the data, the inputs
def test_a_folder_of_a_users_files_is_refused_and_kept(suite, tmp_path, capsys):
    """The user's own config.yaml (no checkpoint, no header of ours) is never replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: 3  # my own notes\n")
    (out / "notes.txt").write_text("do not lose")
    before = checksums(out)
    for extra in ((), ("--resume",)):
        assert main(argv(suite, out, *extra)) == 2
        err = capsys.readouterr().err
        assert "config.yaml" in err and "notes.txt" in err and "--overwrite" in err and "not an m2dino run" in err
        assert checksums(out) == before and sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]
    assert main(argv(suite, out, "--overwrite")) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(moved) == 1 and checksums(moved[0]) == before  # moved aside whole, nothing added, nothing lost
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == EPOCHS
    assert (out / "config.yaml").read_text().startswith(RUN_CONFIG_HEADER)


def test_only_m2dino_traces_do_not_count_as_a_users_files(suite, tmp_path):
    out = tmp_path / "planned"
    out.mkdir()
    (out / "plan.json").write_text("{}")  # a --dry-run's
    (out / ".m2dino.lock").write_text("pid 1 on a killed run\n")  # a SIGKILLed run's lock file
    assert check_run_dir(TrainConfig(data=str(suite), out=str(out)), given={"out"}) == RunDirPlan(
        TrainConfig(data=str(suite), out=str(out)))


@pytest.mark.parametrize("where", ["the root", "inside", "holding"])
def test_out_and_the_data_never_overlap(suite, tmp_path, capsys, where):
    out = {"the root": suite, "inside": suite / "runs" / "r", "holding": suite.parent}[where]
    before = checksums(suite)
    assert main(argv(suite, out)) == 2
    assert "the data root" in capsys.readouterr().err
    assert checksums(suite) == before and not (suite / "runs").exists()


def test_overwrite_never_moves_an_input_aside(finished, tmp_path, capsys):
    weights = finished / "au" / "all" / "best.safetensors"
    config = TrainConfig(data="synthetic", out=str(finished), pretrained=str(weights))
    with pytest.raises(RunDirError, match="--pretrained .* lies inside --out"):
        check_run_dir(config, given={"out", "pretrained"}, overwrite=True)


def test_check_run_dir_decides_without_writing(suite, finished, tmp_path):
    before = checksums(finished)
    config = TrainConfig(data=str(suite), out=str(finished))
    assert check_run_dir(config, given={"out"}, overwrite=True).move_aside
    with pytest.raises(RunDirError, match="holds a trained run"):
        check_run_dir(config, given={"out"})
    resumed = check_run_dir(replace(config, resume=True), given={"out", "resume"})
    assert resumed.config.resume and resumed.config.model.img_size == 32 and not resumed.move_aside
    fresh = tmp_path / "not-yet"
    assert check_run_dir(replace(config, out=str(fresh)), given={"out"}).config.out == str(fresh)
    assert checksums(finished) == before and not fresh.exists() and not (finished / ".m2dino.lock").exists()


def test_a_damaged_config_yaml_is_named_on_resume(suite, tmp_path, capsys):
    out = tmp_path / "R"
    save_config(TrainConfig(data=str(suite), out=str(out)), out / "config.yaml")
    (out / "config.yaml").write_text(RUN_CONFIG_HEADER + "epochs: [unclosed\n")
    assert main(argv(suite, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "config.yaml: cannot be read back" in err and "Traceback" not in err


# --------------------------------------------------------------- one writer per run directory
def test_a_second_writer_stops_at_once_naming_the_directory_and_the_pid(suite, finished, capsys):
    before = checksums(finished)
    holder = hold_lock(finished)
    try:
        assert main(argv(suite, finished, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"{finished} is being written by another process (pid {holder.pid}" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    after = checksums(finished)
    assert after.pop(".m2dino.lock") and after == before  # the killed holder left its file, nothing else moved
    assert main(argv(suite, finished, "--resume")) == 0  # no stale lock: the kernel released it
    assert not (finished / ".m2dino.lock").exists()


@pytest.mark.slow
def test_two_trainings_started_into_one_out_never_mix(suite, tmp_path):
    out = tmp_path / "R"
    env = {**child_env(checkpoint_sleep=0.3), "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([sys.executable, "-m", "m2dino.train", *argv(suite, out, "--seed", str(seed))],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    assert "is being written by another process" in loser or "holds a trained run" in loser, loser
    assert "Traceback" not in loser
    winner = 1 + [rc for rc, _, _ in results].index(0)
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == winner
    log = events(out)
    assert [e["event"] for e in log].count("start") == 1 and log[-1]["event"] == "finished"
    steps = [e["step"] for e in log if e["event"] == "train"]
    assert steps == sorted(set(steps))  # one run's steps, once each
    assert not [p for p in (out / "au" / "all").iterdir() if p.name.startswith(".last.")]


def test_other_ranks_and_workers_never_take_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_dir_lock(tmp_path / "R"):
        assert not (tmp_path / "R").exists()  # rank 1 writes nothing of its own here: rank 0 holds the lock
    monkeypatch.setenv("RANK", "0")
    with run_dir_lock(tmp_path / "R"):
        assert (tmp_path / "R" / ".m2dino.lock").is_file()


def test_a_cleanup_removes_only_its_own_and_dead_writers_temporaries(tmp_path):
    host = socket.gethostname()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {"live": f".last.tmp-{host}-{alive.pid}-abc", "dead": f".last.tmp-{host}-{dead.pid}-abc",
                 "own": f".last.tmp-{host}-{os.getpid()}-abc", "remote": ".last.tmp-elsewhere-1-abc",
                 "legacy": ".last.tmp-abc12345"}
        for name in names.values():
            (tmp_path / name).mkdir()
        ckpt.cleanup_stale(tmp_path)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names["live"], names["remote"]}
    finally:
        alive.kill()
        alive.wait()


# --------------------------------------------------------------- the machine's faults
def test_a_full_disk_at_a_checkpoint_says_how_much_and_keeps_the_last_one(suite, tmp_path, monkeypatch, capsys):
    from m2dino.models.m2dino import create_model

    model = create_model("dinov3_tiny", TASKS, num_experts=2, top_k=1, moe_layers=1, img_size=32)
    model_dir = tmp_path / "m"
    ckpt.save_checkpoint(model_dir, model, {"step": 1})
    # torch.save's own words for a full disk, with (nearly) nothing free
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1984 vs 1878")))
    monkeypatch.setattr(io, "free_space", lambda folder: 1000)
    with pytest.raises(DiskFullError) as info:
        ckpt.save_checkpoint(model_dir, model, {"step": 2})
    message = str(info.value)
    size = format_bytes(sum(v.numel() * v.element_size() for v in model.state_dict().values()))
    assert f"the training checkpoint {model_dir / 'last'} needs about {size}" in message
    assert "1000 B are free" in message and "intact" in message and "--resume" in message
    assert ckpt.read_train_state(model_dir / "last") == {"step": 1}
    assert sorted(p.name for p in model_dir.iterdir()) == ["last"]


def test_train_on_a_full_disk_or_a_read_only_one_is_one_line_exit_1(suite, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    with monkeypatch.context() as patch:
        disk_full(patch, full, free=0)
        assert main(argv(suite, full / "R")) == 1
    err = capsys.readouterr().err
    assert "m2dino.train: error: the disk is full:" in err and "Traceback" not in err, err
    assert not [p for p in (full / "R").rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    locked = tmp_path / "ro"
    with monkeypatch.context() as patch:
        read_only(patch, locked)
        assert main(argv(suite, locked / "R")) == 1
    err = capsys.readouterr().err
    assert f"cannot write {locked / 'R'}: it is on a read-only file system" in err and err.count("\n") == 1


def test_a_config_file_that_is_not_text_is_named(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_bytes(b"\xff\xfe epochs: 3")
    assert main(["--config", str(config), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert f"--config {config}: not UTF-8 text" in err and not (tmp_path / "R").exists()
