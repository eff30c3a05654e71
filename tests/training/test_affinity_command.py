"""`python -m m2dino.affinity` on a tiny suite: its outputs (the matrix printed, affinity.json,
the heatmap, grouping.json, a groups file --groups reads) and its errors (bad --data, a
--num-groups above the number of tasks, an existing output file kept)."""
import json

import pytest
import yaml
from locks import hold_lock

from m2dino.affinity import main
from m2dino.evaluation.affinity import read_affinity
from m2dino.tasks import load_groups

TASKS = ["breast_2cls", "lung", "thyroid_nodule"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"img_size": 32, "batch_size": 4}))
    return path


@pytest.mark.slow
def test_the_probe_writes_the_matrix_the_groups_and_their_confidence(suite, recipe, tmp_path, capsys):
    out = tmp_path / "affinity"
    rc = main(["--data", str(suite), "--config", str(recipe), "--steps", "3", "--num-groups", "2",
               "--resamples", "5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "lookahead affinity over 3 measured steps" in printed and "recommended groups (2" in printed
    assert "confidence over 5 bootstrap resamples" in printed

    record = read_affinity(out / "affinity.json")
    assert record.tasks == TASKS and record.steps == [0, 1, 2]
    assert record.measured["every"] == 1 and record.measured["until"] == 3 and record.measured["seconds"] > 0
    assert (out / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    groups = load_groups(out / "groups.yaml")
    assert len(groups) == 2 and sorted(t for members in groups.values() for t in members) == TASKS
    grouping = json.loads((out / "grouping.json").read_text())
    assert grouping["groups"] == groups and grouping["num_groups"] == 2 and grouping["measure"] == "lookahead"
    assert grouping["confidence"]["resamples"] == 5 and 0 <= grouping["confidence"]["identical_share"] <= 1


def test_a_missing_data_root_is_a_clear_error(tmp_path, capsys):
    rc = main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_out_inside_the_data_is_refused_and_writes_nothing(suite, recipe, capsys):
    before = sorted(p.relative_to(suite) for p in suite.rglob("*"))
    rc = main(["--data", str(suite), "--config", str(recipe), "--out", str(suite / "affinity")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--out" in err and "inside the data root" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(suite) for p in suite.rglob("*")) == before


@pytest.mark.slow
def test_a_second_copy_writing_the_same_out_stops_and_changes_nothing(suite, recipe, tmp_path, capsys):
    out = tmp_path / "affinity"
    holder = hold_lock(out)  # another m2dino command is writing there
    try:
        rc = main(["--data", str(suite), "--config", str(recipe), "--steps", "2", "--resamples", "2",
                   "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2
    err = capsys.readouterr().err
    assert str(out) in err and "a test holder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [".m2dino.lock"]


def test_more_groups_than_tasks_is_refused_before_training(suite, recipe, tmp_path, capsys):
    rc = main(["--data", str(suite), "--config", str(recipe), "--num-groups", "4", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--num-groups 4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_an_existing_groups_file_is_kept_without_overwrite(suite, recipe, tmp_path, capsys):
    out = tmp_path / "affinity"
    out.mkdir()
    mine = out / "groups.yaml"
    mine.write_text("mine: [lung]\n")
    rc = main(["--data", str(suite), "--config", str(recipe), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(mine) in err and "--overwrite" in err
    assert mine.read_text() == "mine: [lung]\n" and sorted(p.name for p in out.iterdir()) == ["groups.yaml"]


def test_overwrite_moves_the_old_outputs_aside(tmp_path):
    from m2dino.affinity import clear_outputs, outputs

    paths = outputs(tmp_path)
    paths["groups.yaml"].write_text("mine: [lung]\n")
    clear_outputs(paths, overwrite=True)
    assert not paths["groups.yaml"].exists()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("groups.yaml.old-")]
    assert len(kept) == 1 and kept[0].read_text() == "mine: [lung]\n"
