"""What a run checks before it writes anything or touches a GPU (study.preflight), for the dry
run and the real run alike: the output directory's rules (without acting on them), the weights
file (from its header), the data; an official preset needs --pretrained or --from-scratch. Then
what a run records for the next steps: the resolved data root in config.yaml, the provenance of
its weights in every checkpoint, and the predict / evaluate / export commands it ends with."""
import hashlib
import json

import pytest
import yaml
from safetensors.torch import save_file

from m2dino.models.pretrained import OFFICIAL_FILES, RELEASE_PAGE
from m2dino.models.weights import build_backbone
from m2dino.train import main
from m2dino.training.config import parse_command, read_config, save_config

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
TINY = ["--paradigm", "au", "--img-size", "32", "--batch-size", "4", "--no-progress", "--bootstrap", "0",
        "--seeds", "0"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """dinov3_tiny backbone weights as a user would pass them (the tiny preset has no Meta release)."""
    path = tmp_path_factory.mktemp("weights") / "tiny_backbone.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone("dinov3_tiny").state_dict().items()}, str(path))
    return path


def run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-run"])
def test_a_missing_weights_file_stops_before_anything_is_written(suite, tmp_path, capsys, dry_run):
    out = tmp_path / "run"
    rc, _, err = run_main(["--data", suite, "--out", out, *TINY, "--steps", "1", "--pretrained", tmp_path / "W.pth",
                           *(["--dry-run"] if dry_run else [])], capsys)
    assert rc == 2 and "W.pth does not exist" in err, err
    assert not out.exists()  # no plan.json, config.yaml, split.json or tensorboard/


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-run"])
def test_a_recipe_of_an_official_preset_needs_its_weights_or_from_scratch(suite, tmp_path, capsys, dry_run):
    out = tmp_path / "run"
    argv = ["--config", "m2dino_vits16_fmuia", "--data", suite, "--out", out, "--paradigm", "au",
            *(["--dry-run"] if dry_run else [])]
    rc, _, err = run_main(argv, capsys)
    assert rc == 2 and not out.exists()
    # where the official weights are published and which file fits
    assert "--pretrained" in err and "--from-scratch" in err and RELEASE_PAGE in err, err
    assert OFFICIAL_FILES["dinov3_vits16"] in err
    rc, _, err = run_main(argv + ["--pretrained", tmp_path / "W.pth"], capsys)  # the README's command, no file yet
    assert rc == 2 and "W.pth does not exist" in err and OFFICIAL_FILES["dinov3_vits16"] in err and not out.exists()
    rc, _, err = run_main(argv + ["--from-scratch", "--pretrained", tmp_path / "W.pth"], capsys)
    assert rc == 2 and "choose one" in err
    if dry_run:
        rc, printed, err = run_main(argv + ["--from-scratch"], capsys)
        assert rc == 0 and "au/all" in printed and (out / "plan.json").is_file(), err


def test_a_weights_file_of_another_preset_is_refused_by_the_dry_run(suite, tmp_path, capsys, tiny_weights):
    out = tmp_path / "run"
    rc, _, err = run_main(["--config", "m2dino_vits16_fmuia", "--data", suite, "--out", out, "--paradigm", "au",
                           "--pretrained", tiny_weights, "--dry-run"], capsys)
    assert rc == 2 and not out.exists()
    assert "does not fit --model dinov3_vits16" in err and "fits preset(s) dinov3_tiny" in err, err
    assert OFFICIAL_FILES["dinov3_vits16"] in err


def test_the_dry_run_applies_the_run_directory_rules_without_acting(suite, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "au" / "all").mkdir(parents=True)
    (out / "au" / "all" / "best.safetensors").write_bytes(b"a trained model")  # a run's checkpoint
    argv = ["--data", suite, "--out", out, *TINY, "--dry-run"]
    save_config(parse_command([str(a) for a in argv])[0], out / "config.yaml")  # and its config
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    rc, _, err = run_main(argv, capsys)
    assert rc == 2 and "--resume" in err and "--overwrite" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # not even plan.json
    rc, _, err = run_main(argv + ["--overwrite"], capsys)  # the real run would move it aside: the plan does not
    assert rc == 0, err
    assert (out / "au" / "all" / "best.safetensors").read_bytes() == b"a trained model"
    assert not list(tmp_path.glob("run.old-*")) and (out / "plan.json").is_file()
    rc, _, err = run_main(argv + ["--overwrite", "--resume"], capsys)
    assert rc == 2 and "choose one" in err


def test_bad_data_stops_the_real_run_before_it_writes(tiny_suite, tmp_path, capsys):
    """The images are decoded and checked before config.yaml is written."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_suite(**SUITE), root)
    image = next((root / "train").rglob("*.bmp"))
    image.write_bytes(image.read_bytes()[:40])  # truncated
    out = tmp_path / "run"
    rc, _, err = run_main(["--data", root, "--out", out, *TINY, "--steps", "1"], capsys)
    assert rc == 2 and image.name in err, err
    assert not out.exists() or not any(out.iterdir())


def test_the_run_records_its_data_root_and_weights_and_ends_with_the_next_commands(suite, tmp_path, capsys,
                                                                                     tiny_weights):
    out = tmp_path / "run"
    rc, printed, err = run_main(["--data", suite, "--out", out, *TINY, "--steps", "2", "--pretrained",
                                 tiny_weights], capsys)
    assert rc == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert list(saved)[:2] == ["data", "data_root"] and saved["data_root"] == str(suite.resolve())
    assert read_config(out / "config.yaml").pretrained == str(tiny_weights)  # the record reads back as a config
    record = json.loads((out / "au" / "all" / "best.json").read_text())["pretrained"]
    assert record == {"file": tiny_weights.name, "sha256": hashlib.sha256(tiny_weights.read_bytes()).hexdigest(),
                      "preset": "dinov3_tiny"}
    last = json.loads((out / "au" / "all" / "last" / "model.json").read_text())["pretrained"]
    assert last == record
    checkpoint = out / "au" / "all" / "best.safetensors"
    lines = printed.splitlines()[-3:]
    assert lines == [f"  python -m m2dino.predict --checkpoint {checkpoint} --data-root {suite.resolve()} "
                     f"--out {out / 'submission'}",
                     f"  python -m m2dino.evaluate --data-root {suite.resolve()} --predictions {out / 'submission'}",
                     f"  python -m m2dino.export --checkpoint {checkpoint} --out {out / 'fmuia-entry'}"]
    # the first two run as printed (the export's own tests build its wheel); predict says which split it took
    from m2dino import evaluate, predict

    assert predict.main(lines[0].split()[3:]) == 0
    assert f"predicting {suite.resolve() / 'val'}" in capsys.readouterr().err
    assert evaluate.main(lines[1].split()[3:]) == 0
    assert "breast_2cls" in capsys.readouterr().out


def test_a_run_from_random_weights_records_none(suite, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run_main(["--data", suite, "--out", out, *TINY, "--steps", "1", "--from-scratch"], capsys)
    assert rc == 0, err
    assert json.loads((out / "au" / "all" / "best.json").read_text())["pretrained"] == "none"


def test_the_default_start_is_the_shipped_synthetic_backbone(suite, tmp_path, capsys):
    """No --pretrained: dinov3_tiny starts from the backbone m2dino ships (the same path a file given
    with --pretrained takes), recorded with its hash; --pretrained with a file and --from-scratch refuse."""
    import hashlib

    from m2dino.data.synthetic import PRETRAINED_WEIGHTS

    out = tmp_path / "run"
    rc, _, err = run_main(["--data", suite, "--out", out, *TINY, "--steps", "1"], capsys)
    assert rc == 0, err
    record = json.loads((out / "au" / "all" / "best.json").read_text())["pretrained"]
    assert record["file"] == PRETRAINED_WEIGHTS.name and record["preset"] == "dinov3_tiny"
    assert record["sha256"] == hashlib.sha256(PRETRAINED_WEIGHTS.read_bytes()).hexdigest()
    rc, _, err = run_main(["--data", suite, "--out", tmp_path / "both", *TINY, "--steps", "1", "--from-scratch",
                           "--pretrained", PRETRAINED_WEIGHTS], capsys)
    assert rc == 2 and "--from-scratch" in err and not (tmp_path / "both").exists()
