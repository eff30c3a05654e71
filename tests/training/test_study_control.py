"""The training-length options of the study: --min-steps (every model at least N steps, whole
epochs repeated) and --control ts-converged (TS models trained until their loss plateaus)."""
import json
import math

import pytest

from m2dino.paradigms import PLATEAU_CAP_FACTOR
from m2dino.train import main
from m2dino.training.config import TrainConfig

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
# 8 images per task at batch 4: a TS model has 2 steps an epoch, the AU model 4
OPTIONS = ["--img-size", "32", "--batch-size", "4", "--epochs", "1", "--no-progress", "--bootstrap", "50",
           "--jobs", "1", "--seeds", "0"]


def _training(out, paradigm):
    return json.loads((out / paradigm / "metrics.json").read_text())["training"]


def test_min_steps_gives_every_model_at_least_n_steps(suite, tmp_path):
    plain, longer = tmp_path / "plain", tmp_path / "longer"
    assert main(["--data", str(suite), "--out", str(plain), *OPTIONS]) == 0
    assert main(["--data", str(suite), "--out", str(longer), *OPTIONS, "--min-steps", "6"]) == 0
    for paradigm in ("ts", "cg", "au"):
        for model, length in _training(longer, paradigm).items():
            assert length["steps"] >= 6, (paradigm, model, length)
            assert length["steps"] % (length["steps"] / length["epochs"]) == 0  # whole epochs
    assert {m: t["steps"] for m, t in _training(plain, "ts").items()} == {"breast_2cls": 2, "lung": 2}
    assert {m: t["steps"] for m, t in _training(longer, "ts").items()} == {"breast_2cls": 6, "lung": 6}
    assert _training(longer, "au")["all"]["steps"] == 8 and _training(longer, "au")["all"]["epochs"] == 2
    report = json.loads((longer / "report" / "report.json").read_text())
    assert report["training"]["ts"]["lung"]["steps"] == 6


def test_min_steps_zero_is_todays_run(suite, tmp_path):
    """--min-steps 0 (the default) trains exactly what a run without the option trains."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--data", str(suite), "--out", str(a), *OPTIONS, "--paradigm", "ts"]) == 0
    assert main(["--data", str(suite), "--out", str(b), *OPTIONS, "--paradigm", "ts", "--min-steps", "0"]) == 0
    for model in TASKS:
        weights = [(d / "ts" / model / "best.safetensors").read_bytes() for d in (a, b)]
        assert weights[0] == weights[1]
        ea, eb = (json.loads((d / "ts" / model / "eval.json").read_text()) for d in (a, b))
        assert ea == eb


def test_control_trains_ts_until_plateau_or_cap_and_reports_ts_star(suite, tmp_path):
    out = tmp_path / "run"
    assert main(["--data", str(suite), "--out", str(out), *OPTIONS, "--control", "ts-converged"]) == 0
    ts, star = _training(out, "ts"), _training(out, "ts_converged")
    assert set(star) == set(ts) == set(TASKS)
    for model in TASKS:
        # never shorter than TS, at most the cap; 2 steps an epoch never fill the rule's two windows: the cap
        assert ts[model]["steps"] <= star[model]["steps"] <= PLATEAU_CAP_FACTOR * ts[model]["steps"]
        assert star[model]["stop_reason"] == "cap" and star[model]["steps"] == PLATEAU_CAP_FACTOR * ts[model]["steps"]
        assert ts[model]["stop_reason"] == "epochs"
        # the control holds out its inner split (one of 8 rows); equal exposure without --eval-every does not
        assert star[model]["inner_images"] == 1 and ts[model]["inner_images"] == 0
        assert star[model]["train_images"] == ts[model]["train_images"] - 1
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["control"]["reference"] == "ts_converged"
    for task in TASKS:
        for paradigm in ("cg", "au"):
            entry = report["control"]["tasks"][task][paradigm]
            assert set(entry) >= {"change_vs_ts", "change_ci", "transfer"}
    text = (out / "report" / "report.md").read_text()
    assert "TS*" in text and "control" in text.splitlines()[2].lower()
    # the run directory rules hold with the extra models: resuming the finished run retrains nothing
    before = (out / "ts_converged" / "lung" / "best.safetensors").read_bytes()
    assert main(["--data", str(suite), "--out", str(out), *OPTIONS, "--control", "ts-converged", "--resume"]) == 0
    assert (out / "ts_converged" / "lung" / "best.safetensors").read_bytes() == before


def test_control_options_are_checked():
    with pytest.raises(ValueError, match="--control"):
        TrainConfig(control="converged").validate()
    with pytest.raises(ValueError, match="--control"):
        TrainConfig(control="ts-converged", paradigm="ts").validate()
    with pytest.raises(ValueError, match="--min-steps"):
        TrainConfig(min_steps=-1).validate()


@pytest.mark.slow
def test_converged_budget_trains_every_model_to_its_inner_split_plateau(suite, tmp_path):
    """--budget converged: TS, CG and AU models all train past their equal-exposure steps until
    their inner-split loss plateaus (a learning rate of 1e-12 keeps it flat), then decay and stop;
    each model's metrics.json entry says why, its last rate and its capacity; the report reads them
    and the --correction it was given."""
    out = tmp_path / "run"
    options = [o if o != "1" or i != OPTIONS.index("--epochs") + 1 else "3" for i, o in enumerate(OPTIONS)]
    assert main(["--data", str(suite), "--out", str(out), *options, "--budget", "converged", "--lr", "1e-12",
                 "--correction", "holm"]) == 0
    for paradigm in ("ts", "cg", "au"):
        for model, length in _training(out, paradigm).items():
            assert length["stop_reason"] == "plateau", (paradigm, model, length)
            per_epoch = math.ceil(length["train_images"] / 4)
            assert length["steps"] > 3 * per_epoch  # past its equal-exposure budget
            assert 0 < length["final_lr"] < 1e-12
            capacity = length["capacity"]
            assert capacity["params_total"] >= capacity["params_active_per_token"] > 0 and capacity["train_flops"] > 0
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["budget"] == "converged" and report["correction"] == "holm"
    assert report["training"]["au"]["all"]["stop_reason"] == "plateau"
    assert report["capacity"]["au"]["train_flops"] == _training(out, "au")["all"]["capacity"]["train_flops"]
