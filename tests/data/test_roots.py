"""`--data-root synthetic` (predict, evaluate, data.check) names the cached synthetic suite: the
one the run of the checkpoint or predictions trained on (its config.yaml's data_root, or its
scale), else the default run's."""
from pathlib import Path

import yaml

from m2dino.data import check as check_cli
from m2dino.data import resolve_data_root, write_suite
from m2dino.data.roots import TRAINING_SCALE, TRAINING_SEED
from m2dino.data.synthetic import default_cache_root


def cached_suite(cache: Path, monkeypatch, scale: float) -> Path:
    """A small suite in the cache, where ensure_synthetic(scale) finds it (two tasks: quick)."""
    monkeypatch.setenv("M2DINO_CACHE", str(cache))
    root = default_cache_root(scale, TRAINING_SEED)
    write_suite(root, scale=scale, seed=TRAINING_SEED, tasks=["breast_2cls", "lung"], min_train=2, min_val=2,
                workers=1)
    return root


def run_dir(tmp_path: Path, **config) -> Path:
    """A run directory with its config.yaml and a checkpoint's folder."""
    out = tmp_path / "runs" / "x"
    (out / "au" / "all").mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def test_a_path_is_itself(tmp_path):
    assert resolve_data_root(str(tmp_path / "FM_UIA")) == tmp_path / "FM_UIA"


def test_synthetic_is_the_default_runs_suite_without_a_run(tmp_path, monkeypatch, capsys):
    root = cached_suite(tmp_path / "cache", monkeypatch, TRAINING_SCALE)
    assert resolve_data_root("synthetic") == root
    assert resolve_data_root("synthetic", near=tmp_path / "elsewhere" / "best.safetensors") == root
    assert check_cli.main(["synthetic", "--no-decode"]) == 0
    assert str(root) in capsys.readouterr().out


def test_synthetic_is_the_suite_the_run_trained_on(tmp_path, monkeypatch):
    root = cached_suite(tmp_path / "cache", monkeypatch, 0.001)
    out = run_dir(tmp_path, data="synthetic", synthetic_scale=0.001)  # a run without the recorded path
    checkpoint = out / "au" / "all" / "best.safetensors"
    assert resolve_data_root("synthetic", near=checkpoint) == root
    elsewhere = tmp_path / "moved-suite"  # the recorded path wins while it exists
    elsewhere.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"data": "synthetic", "data_root": str(elsewhere),
                                                     "synthetic_scale": 0.001}))
    assert resolve_data_root("synthetic", near=checkpoint) == elsewhere
    assert resolve_data_root("synthetic", near=out / "submission") == elsewhere  # a prediction folder in the run
