"""An image is the file its path resolves to: another spelling of it is a duplicate, the split
keeps every spelling on one side (and today's split of ordinary paths is unchanged), the same
image in train/ and val/ is a leak; CSV discovery reads regular files only; a path that cannot
even be looked at (a NUL byte, a symlink loop, a name too long) or an image over PIL's bomb
limit is a row's problem, never a traceback or a hang."""
import hashlib
import json
import os
import signal

import numpy as np
import pytest
from hand_data import hand_root, save, write_csv
from PIL import Image

from m2dino.data import check as check_cli
from m2dino.data import load_fmuia, make_split, read_csvs, scan_dataset
from m2dino.data.splits import _hash_unit, apply_split

HEAD = "Cls-Eight_1.Head_Position.csv"


@pytest.fixture
def alarm():
    """Fail instead of hanging: SIGALRM raises in the main thread after `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("hung: the command did not return")

    previous = signal.signal(signal.SIGALRM, handler)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def add_rows(csv_file, rows):
    with open(csv_file, newline="") as f:
        import csv
        existing = list(csv.DictReader(f))
    write_csv(csv_file, existing + rows)


def cls_row(image_path, label=0):
    return {"image_path": image_path, "task_id": "fetal_head_pos_cls", "task_name": "classification",
            "num_classes": 8, "mask": label}


def test_another_spelling_of_an_image_is_a_duplicate(tmp_path):
    hand_root(tmp_path, n=3)
    add_rows(tmp_path / "csv_files" / HEAD, [cls_row("../Classification/./Eight/Head_Position/0/h0.jpg"),
                                             cls_row("../Classification/Eight/../Eight/Head_Position/1/h1.jpg", 1)])
    scan = scan_dataset(tmp_path)
    problems = {p.row: p.problem for p in scan.problems}
    assert set(problems) == {3, 4}
    assert "duplicated row: same task and image as csv_files/" + HEAD + " row 0" in problems[3]
    assert "spelled '../Classification/Eight/Head_Position/0/h0.jpg' there" in problems[3]


def test_a_symlinked_spelling_is_the_same_image(tmp_path):
    hand_root(tmp_path, n=2)
    os.symlink("Head_Position", tmp_path / "Classification" / "Eight" / "alias")
    add_rows(tmp_path / "csv_files" / HEAD, [cls_row("../Classification/Eight/alias/0/h0.jpg")])
    assert [(p.row, "duplicated row" in p.problem) for p in scan_dataset(tmp_path).problems] == [(2, True)]


def test_the_split_key_is_the_resolved_file_and_every_spelling_lands_together(tmp_path):
    hand_root(tmp_path, n=30)
    # one row per image, a third spelled the long way round: the same files, other strings
    csv_file = tmp_path / "csv_files" / HEAD
    text = csv_file.read_text().splitlines()
    text = [line.replace("../Classification/Eight/", "../Classification/./Eight/") if i % 3 == 1 else line
            for i, line in enumerate(text)]
    csv_file.write_text("\n".join(text) + "\n")
    plain = {r.image_key: r for r in read_csvs(tmp_path).records if r.task_id == "fetal_head_pos_cls"}
    assert all(not k.startswith("../Classification/./") for k in plain)
    hand_root(tmp_path / "ordinary", n=30)
    ordinary = [r for r in read_csvs(tmp_path / "ordinary").records if r.task_id == "fetal_head_pos_cls"]
    for seed in (0, 3):
        assert make_split(list(plain.values()), 0.3, seed=seed)["val"] == make_split(ordinary, 0.3, seed=seed)["val"]


def test_the_split_of_ordinary_paths_is_what_it_was(tmp_path):
    """For paths spelled as the release spells them the key is the CSV string itself: the split is
    the one the verbatim string gave (the rule before the key was the resolved file), and the hash
    is the same sha1 of (seed, task, path) it always was."""
    assert _hash_unit(0, "lung", "../Segmentation/Two/lung/images/a.png") == 0.5708569266114893
    assert _hash_unit(7, "fetal_head_pos_cls", "../Classification/Eight/Head_Position/0/h0.jpg") \
        == 0.3411380490859822
    hand_root(tmp_path, n=40)
    records = read_csvs(tmp_path).records
    assert all(r.image_key == r.image_path for r in records)
    for seed, fraction in ((0, 0.2), (5, 0.5)):
        old = {}
        for r in records:  # the rule as it was: the verbatim image_path hashed
            digest = hashlib.sha1(f"{seed}\0{r.task_id}\0{r.image_path}".encode()).digest()
            if int.from_bytes(digest[:8], "big") / 2**64 < fraction:
                old.setdefault(r.task_id, []).append(r.image_path)
        new = make_split(records, fraction, seed=seed)["val"]
        assert {t: sorted(v) for t, v in old.items()} == {t: v for t, v in new.items() if v}


def test_a_stored_split_json_is_honoured_by_either_spelling(tmp_path):
    hand_root(tmp_path / "data", n=6)
    csv_file = tmp_path / "data" / "csv_files" / HEAD
    csv_file.write_text(csv_file.read_text().replace("../Classification/Eight/", "../Classification/./Eight/"))
    records = [r for r in read_csvs(tmp_path / "data").records if r.task_id == "fetal_head_pos_cls"]
    verbatim = {"seed": 0, "val_fraction": 0.2, "val": {"fetal_head_pos_cls": [records[0].image_path]}}
    resolved = {"seed": 0, "val_fraction": 0.2, "val": {"fetal_head_pos_cls": [records[1].image_key]}}
    assert [r.split for r in apply_split(records, verbatim)] == ["val"] + ["train"] * 5
    assert [r.split for r in apply_split(records, resolved)] == ["train", "val"] + ["train"] * 4
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "split.json").write_text(json.dumps(verbatim))
    data = load_fmuia(tmp_path / "data", run_dir=tmp_path / "run", tasks=["fetal_head_pos_cls"])
    assert records[0].image_path in [r.image_path for r in data.val]


def test_the_same_image_in_train_and_val_is_a_leak(tmp_path):
    hand_root(tmp_path / "train", n=3)
    hand_root(tmp_path / "val", n=2, seed=1)
    # a val row that reaches a train image, through the release's shared parent
    add_rows(tmp_path / "val" / "csv_files" / HEAD,
             [cls_row("../../train/Classification/Eight/Head_Position/2/h2.jpg", 2)])
    problems = [p for p in scan_dataset(tmp_path).problems]
    assert len(problems) == 1 and problems[0].csv == "val/csv_files/" + HEAD and problems[0].row == 2
    assert "also in train/ (train/csv_files/" + HEAD + " row 2)" in problems[0].problem
    assert "leaks" in problems[0].problem


def test_a_fifo_or_folder_named_csv_is_skipped_and_said_without_a_hang(tmp_path, alarm, capsys):
    hand_root(tmp_path, n=2)
    os.mkfifo(tmp_path / "csv_files" / "Cls-Zeta.pipe.csv")
    (tmp_path / "csv_files" / "Old.folder.csv").mkdir()
    alarm(60)
    scan = read_csvs(tmp_path)
    assert {p.csv: p.problem for p in scan.problems} == {
        "csv_files/Cls-Zeta.pipe.csv": "csv file is a FIFO (named pipe), not a regular file; not read",
        "csv_files/Old.folder.csv": "csv file is a folder, not a regular file; not read"}
    assert len(scan.records) == 8
    assert check_cli.main([str(tmp_path), "--no-decode"]) == 1
    assert "FIFO" in capsys.readouterr().out


def test_paths_that_cannot_be_looked_at_are_row_problems(tmp_path, alarm, capsys):
    hand_root(tmp_path, n=1)
    loop = tmp_path / "Classification" / "loop"
    os.symlink("loop2", loop)
    os.symlink("loop", tmp_path / "Classification" / "loop2")
    add_rows(tmp_path / "csv_files" / HEAD, [
        cls_row("../Classification/loop/x.jpg"),
        cls_row("../Classification/" + "x" * 300 + ".jpg"),
        cls_row("../Classification/a\0b.jpg"),
    ])
    alarm(60)
    problems = {p.row: p.problem for p in scan_dataset(tmp_path).problems}
    assert "symlink loop" in problems[1] or "Too many levels of symbolic links" in problems[1], problems
    assert "File name too long" in problems[2] and "NUL byte" in problems[3], problems
    assert check_cli.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "row 3" in out and "Traceback" not in out + err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_bomb_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    hand_root(tmp_path, n=2)
    save(tmp_path, "Classification/Eight/Head_Position/7/big.jpg", np.zeros((40, 60, 3), np.uint8))
    add_rows(tmp_path / "csv_files" / HEAD, [cls_row("../Classification/Eight/Head_Position/7/big.jpg", 7)])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 60 - 1)  # 1x-2x: PIL would only warn
    problems = {(p.csv, p.row): p.problem for p in scan_dataset(tmp_path).problems}
    assert "over PIL's decompression-bomb limit" in problems[("csv_files/" + HEAD, 2)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # over 2x: PIL raises its own error
    problems = [p.problem for p in scan_dataset(tmp_path).problems]
    assert len(problems) == 9 and all("cannot be decoded" in p and "decompression bomb" in p for p in problems)


def test_a_csv_not_in_utf8_is_named(tmp_path, capsys):
    hand_root(tmp_path, n=1)
    (tmp_path / "csv_files" / "Cls-Latin.csv").write_bytes(
        "image_path,task_id,task_name,num_classes,mask\n../Classification/caf\xe9.jpg,x,classification,2,0\n"
        .encode("latin-1"))
    (problem,) = read_csvs(tmp_path).problems
    assert problem.csv == "csv_files/Cls-Latin.csv" and "not UTF-8 text (byte 0xe9" in problem.problem


def test_csv_values_that_would_blow_up_are_row_problems(tmp_path):
    hand_root(tmp_path, n=1)
    save(tmp_path, "Classification/mystery/a.png", np.zeros((8, 8), np.uint8))
    write_csv(tmp_path / "csv_files" / "Cls-Mystery.csv", [
        {"image_path": "../Classification/mystery/a.png", "task_id": "mystery", "task_name": "classification",
         "num_classes": "1e9", "mask": 0}])
    add_rows(tmp_path / "csv_files" / "Reg-Three_26.IUGC.csv", [
        {"image_path": "../Regression/Three/IUGC/r0.png", "task_id": "IUGC", "task_name": "Regression",
         "num_classes": 3, "point_1_xy": "[" * 100_000, "point_2_xy": "[1, 1]", "point_3_xy": "[2, 2]"}])
    problems = {}
    for p in read_csvs(tmp_path).problems:
        problems.setdefault((p.csv, p.row), []).append(p.problem)
    assert any("num_classes 1000000000 is more than 65536" in p for p in problems[("csv_files/Cls-Mystery.csv", 0)])
    assert any("is not a JSON [x, y] pair" in p for p in problems[("csv_files/Reg-Three_26.IUGC.csv", 1)])
