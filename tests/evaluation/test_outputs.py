"""predict and evaluate never write into or over their inputs, replace only files they wrote
themselves, hold one writer per output folder, and answer bad files and a full or read-only disk
with one line (exit 2 for the input, 1 for the machine), never a traceback or a hang."""
import hashlib
import json
import os
import signal

import pytest
from faults import disk_full, read_only
from hand_predictions import write_hand_predictions
from locks import hold_lock
from PIL import Image

from m2dino import evaluate as evaluate_cli
from m2dino import predict as predict_cli
from m2dino.evaluation.predict import PREDICTIONS_MARKER


def checksums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def predict(checkpoint, root, out, *extra):
    return predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(root), "--out", str(out),
                             "--split", "val", "--device", "cpu", "--tasks", "cervix_multi", "fetal_femur", *extra])


@pytest.mark.parametrize("where", ["the root", "its split", "inside", "holding"])
def test_predict_never_writes_into_the_data(suite_and_checkpoint, capsys, where):
    root, checkpoint = suite_and_checkpoint
    out = {"the root": root, "its split": root / "val", "inside": root / "val" / "preds",
           "holding": root.parent}[where]
    before = checksums(root)
    assert predict(checkpoint, root, out) == 2
    err = capsys.readouterr().err
    assert "the data root" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert checksums(root) == before


def test_predict_replaces_only_its_own_files(suite_and_checkpoint, tmp_path, capsys):
    root, checkpoint = suite_and_checkpoint
    out = tmp_path / "preds"
    assert predict(checkpoint, root, out) == 0
    marker = json.loads((out / PREDICTIONS_MARKER).read_text())
    assert marker["written_by"] == "m2dino.predict" and "regression_predictions.json" in marker["files"]
    assert not (out / ".m2dino.lock").exists()
    assert predict(checkpoint, root, out) == 0  # its own folder: predicted again, no flag needed
    (out / "notes.txt").write_text("mine")  # a file predict does not write: left alone
    assert predict(checkpoint, root, out) == 0 and (out / "notes.txt").read_text() == "mine"

    theirs = tmp_path / "theirs"
    (theirs / "Segmentation").mkdir(parents=True)
    (theirs / "regression_predictions.json").write_text("[] # another tool's")
    capsys.readouterr()
    assert predict(checkpoint, root, theirs) == 2
    err = capsys.readouterr().err
    assert "regression_predictions.json" in err and "did not write" in err and "--overwrite" in err
    assert (theirs / "regression_predictions.json").read_text() == "[] # another tool's"
    assert predict(checkpoint, root, theirs, "--overwrite") == 0
    (aside,) = tmp_path.glob("theirs.old-*")
    assert (aside / "regression_predictions.json").read_text() == "[] # another tool's"
    assert json.loads((theirs / "regression_predictions.json").read_text())


def test_predict_never_follows_a_symlink_out_of_its_folder(suite_and_checkpoint, tmp_path, capsys):
    root, checkpoint = suite_and_checkpoint
    out = tmp_path / "preds"
    out.mkdir()
    os.symlink(root / "val" / "Segmentation", out / "Segmentation")  # predictions would land on the masks
    before = checksums(root)
    assert predict(checkpoint, root, out) == 2
    assert "through a symlink out of the folder" in capsys.readouterr().err
    assert checksums(root) == before


def test_a_second_predict_into_one_folder_stops_naming_the_holder(suite_and_checkpoint, tmp_path, capsys):
    root, checkpoint = suite_and_checkpoint
    out = tmp_path / "preds"
    holder = hold_lock(out)
    try:
        assert predict(checkpoint, root, out) == 2
        assert f"is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == [".m2dino.lock"]


def test_predict_on_a_read_only_or_full_disk(suite_and_checkpoint, tmp_path, monkeypatch, capsys):
    root, checkpoint = suite_and_checkpoint
    with monkeypatch.context() as patch:
        read_only(patch, tmp_path / "ro")
        assert predict(checkpoint, root, tmp_path / "ro" / "preds") == 1
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'ro'}" in err and "read-only file system" in err and err.count("\n") == 1
    full = tmp_path / "full"
    with monkeypatch.context() as patch:
        disk_full(patch, full, free=0)
        assert predict(checkpoint, root, full) == 1
    err = capsys.readouterr().err
    assert "m2dino.predict: error: the disk is full:" in err and "needs about" in err and "Traceback" not in err
    assert not full.exists()  # the folder it made for nothing is gone again: nothing half-written


def test_predict_names_a_latin1_csv_and_skips_a_fifo(suite_and_checkpoint, tmp_path, capsys):
    import shutil

    root, checkpoint = suite_and_checkpoint
    data = tmp_path / "data"
    shutil.copytree(root / "val", data)
    os.mkfifo(data / "csv_files" / "Zeta.pipe.csv")
    signal.alarm(120)  # a blocking open of the FIFO would hang here
    try:
        assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(data), "--out",
                                 str(tmp_path / "p"), "--device", "cpu", "--tasks", "fetal_femur"]) == 0
        assert "Zeta.pipe.csv: csv file is a FIFO (named pipe), not a regular file; skipped" in capsys.readouterr().err
        csv_file = next((data / "csv_files").glob("*femur*.csv"))
        csv_file.write_bytes(csv_file.read_bytes().replace(b"fetal_femur", "f\xe9tal_femur".encode("latin-1"), 1))
        assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(data), "--out",
                                 str(tmp_path / "q"), "--device", "cpu", "--tasks", "fetal_femur"]) == 2
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err
    assert f"{csv_file.name}: cannot read csv: not UTF-8 text (byte 0xe9" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_bomb_limit_stops_predict_and_evaluate(hand_root, suite_and_checkpoint, tmp_path,
                                                                 monkeypatch, capsys):
    root, checkpoint = suite_and_checkpoint
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    assert predict(checkpoint, root, tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "decompression" in err and "Traceback" not in err
    out = tmp_path / "pred"
    write_hand_predictions(out)
    assert evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mask" in err and "decompression" in err and "Traceback" not in err


def test_evaluate_json_never_lands_on_an_input_or_a_users_file(hand_root, tmp_path, capsys):
    out = tmp_path / "pred"
    write_hand_predictions(out)
    before, predicted = checksums(hand_root), checksums(out)

    def evaluate(json_path, *extra):
        return evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out), "--json",
                                  str(json_path), *extra])

    for target in (hand_root / "Segmentation/Two/lung/masks/a.png", hand_root / "scores.json",
                   out / "classification_predictions.json", out / "scores.json"):
        assert evaluate(target) == 2
        err = capsys.readouterr().err
        assert "lies inside the" in err and "Traceback" not in err, err
    assert checksums(hand_root) == before and checksums(out) == predicted

    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    assert evaluate(mine) == 2
    assert "not a results file written by m2dino.evaluate" in capsys.readouterr().err
    assert evaluate(mine, "--overwrite") == 0
    (aside,) = tmp_path.glob("notes.json.old-*")
    assert json.loads(aside.read_text()) == {"my": "notes"} and "tasks" in json.loads(mine.read_text())
    assert evaluate(mine) == 0  # its own results: replaced without a flag
    assert len(list(tmp_path.glob("notes.json.old-*"))) == 1


@pytest.mark.parametrize("entry, words", [
    ({"predicted_class": 2 ** 70}, "predicted_class must be a class of the task, in [0, 2), got 11805916207174"),
    ({"predicted_class": -1}, "in [0, 2), got -1"),
    ({"predicted_probs": [10 ** 400, 0]}, "predicted_probs"),
    ({"task_id": ["lung_2cls"]}, "task_id and image_path must be strings"),
])
def test_evaluate_refuses_numbers_out_of_range(hand_root, tmp_path, capsys, entry, words):
    out = tmp_path / "pred"
    write_hand_predictions(out)
    path = out / "classification_predictions.json"
    entries = json.loads(path.read_text())
    entries[1].update(entry)
    path.write_text(json.dumps(entries))
    assert evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_evaluate_json_on_a_read_only_disk(hand_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pred"
    write_hand_predictions(out)
    read_only(monkeypatch, tmp_path / "ro")
    assert evaluate_cli.main(["--data-root", str(hand_root), "--predictions", str(out), "--json",
                              str(tmp_path / "ro" / "scores.json")]) == 1
    err = capsys.readouterr().err
    assert "read-only file system" in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("config, words", [
    (b"[1, 2, 3]", "expected a JSON object, got list"),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not UTF-8 text"),
    (b"[" * 50_000, "nested more than"),
    (None, "task 0: task_type must be a str, got 7"),
])
def test_predict_names_a_damaged_checkpoint_config(suite_and_checkpoint, tmp_path, capsys, config,
                                                   words):
    import shutil

    root, checkpoint = suite_and_checkpoint
    stem = tmp_path / "ckpt"
    shutil.copy(checkpoint, stem.with_suffix(".safetensors"))
    if config is None:
        data = json.loads(checkpoint.with_suffix(".json").read_text())
        data["tasks"][0]["task_type"] = 7
        config = json.dumps(data).encode()
    stem.with_suffix(".json").write_bytes(config)
    assert predict(stem.with_suffix(".safetensors"), root, tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "ckpt.json" in err and words in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()



@pytest.mark.parametrize("image_path, words", [
    ("../loop/x.png", "symlink loop"),
    ("../" + "x" * 300 + ".png", "missing or not an image file"),
])
def test_predict_names_a_path_it_cannot_look_at(suite_and_checkpoint, tmp_path, capsys, image_path,
                                                words):
    import csv
    import shutil

    root, checkpoint = suite_and_checkpoint
    data = tmp_path / "data"
    shutil.copytree(root / "val", data)
    os.symlink("loop2", data / "loop")
    os.symlink("loop", data / "loop2")
    csv_file = next((data / "csv_files").glob("*femur*.csv"))
    with open(csv_file, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[1]["image_path"] = image_path
    with open(csv_file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(data), "--out", str(tmp_path / "p"),
                             "--device", "cpu", "--tasks", "fetal_femur"]) == 2
    err = capsys.readouterr().err
    assert f"{csv_file.name} row 1" in err and words in err and "Traceback" not in err, err
