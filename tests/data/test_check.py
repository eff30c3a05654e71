"""`python -m m2dino.data.check`: counts, problems, exit codes, --json."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from m2dino.data import check as check_cli
from m2dino.data.synthetic import write_suite

TASKS = ["lung", "organ_cls", "spinal_cord_injury_loc", "fetal_femur"]


def suite(path):
    write_suite(path, tasks=TASKS, scale=1e-4, min_train=3, min_val=2, workers=1)
    return path


def test_clean_suite_exits_zero_with_counts(tmp_path, capsys):
    root = suite(tmp_path / "d")
    assert check_cli.main([str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"tasks": {t: 5 for t in sorted(TASKS)}, "problems": []}
    assert check_cli.main([str(root)]) == 0
    text = capsys.readouterr().out
    assert "no problems found" in text and "fetal_femur" in text and "regression, 2" in text


def test_one_bad_mask_exits_one_naming_csv_and_row(tmp_path, capsys):
    root = suite(tmp_path / "d")
    csv_file = root / "val" / "csv_files" / "Seg-Two_10.lung.csv"
    row1 = csv_file.read_text().splitlines()[2].split(",")
    mask_file = (csv_file.parent / row1[4]).resolve()
    m = np.asarray(Image.open(mask_file)).copy()
    m[0, 0] = 2  # lung has 2 classes: 0 and 1
    Image.fromarray(m).save(mask_file)
    assert check_cli.main([str(root), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == [{"csv": "val/csv_files/Seg-Two_10.lung.csv", "row": 1,
                                "problem": "mask value 2 >= num_classes 2"}]
    assert out["tasks"]["lung"] == 5  # counts are rows, bad ones included
    # without decoding the pixel check cannot see it
    assert check_cli.main([str(root), "--no-decode", "--json"]) == 0
    capsys.readouterr()


def test_missing_root_is_a_usage_error(tmp_path, capsys):
    assert check_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert check_cli.main([str(tmp_path / "empty")]) == 2
    assert "no csv_files/" in capsys.readouterr().err


def test_runs_as_a_module(tmp_path):
    root = suite(tmp_path / "d")
    (root / "train" / "csv_files" / "Det_22.spinal_cord_injury_loc.csv").write_text(
        "image_path,task_id,task_name,num_classes,x_min,y_min,x_max,y_max\n"
        "../Detection/nothing.png,spinal_cord_injury_loc,detection,1,1,1,5,5\n")
    r = subprocess.run([sys.executable, "-m", "m2dino.data.check", str(root), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    problems = json.loads(r.stdout)["problems"]
    assert problems == [{"csv": "train/csv_files/Det_22.spinal_cord_injury_loc.csv", "row": 0,
                         "problem": "image file missing: '../Detection/nothing.png'"}]
