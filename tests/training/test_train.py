"""`python -m m2dino.train` end to end on a tiny suite: the run-directory contract, the three
paradigms' model plans, the report, and the bad-sample policy."""
import csv
import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml

from m2dino.data import DataValidationError, write_suite
from m2dino.train import main
from m2dino.training.config import TrainConfig
from m2dino.training.study import plan_models, run

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)


def test_plans_hold_every_task_exactly_once():
    groups = {"A": ["t1", "t3", "zz"], "B": ["t2"]}
    tasks = ["t1", "t2", "t3", "t4"]
    assert plan_models("ts", tasks, groups) == {"t1": ["t1"], "t2": ["t2"], "t3": ["t3"], "t4": ["t4"]}
    assert plan_models("cg", tasks, groups) == {"A": ["t1", "t3"], "B": ["t2"], "Other": ["t4"]}
    assert plan_models("au", tasks, groups) == {"all": tasks}


def test_paradigm_all_writes_the_run_directory_contract(suite, tmp_path, capsys):
    groups = tmp_path / "groups.yaml"
    groups.write_text(yaml.safe_dump({"Chest": ["breast_2cls", "lung"]}))
    out = tmp_path / "run"
    rc = main(["--data", str(suite), "--out", str(out), "--paradigm", "all", "--groups", str(groups),
               "--img-size", "32", "--batch-size", "4", "--steps", "2", "--log-every", "1", "--no-progress",
               "--seeds", "0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "every task beats its trivial baseline" in printed and "report:" in printed

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["steps"] == 2 and config["groups"] == str(groups) and config["paradigm"] == "all"
    expected_models = {"ts": {"breast_2cls", "lung"}, "cg": {"Chest"}, "au": {"all"}}
    for paradigm, models in expected_models.items():
        summary = json.loads((out / paradigm / "metrics.json").read_text())
        assert summary["paradigm"] == paradigm and set(summary["models"]) == models
        assert set(summary["tasks"]) == set(TASKS)
        for entry in summary["tasks"].values():
            assert {"task_type", "group", "train_size", "model", "metrics", "baseline"} <= set(entry)
            assert entry["train_size"] == 8 and entry["group"] == "Chest"  # explicit min_train is exact
        assert set(summary["tasks"]["lung"]["metrics"]) >= {"dice", "hd"}
        assert set(summary["tasks"]["breast_2cls"]["metrics"]) >= {"accuracy", "auc", "f1_macro", "f1_weighted", "mcc"}
        # the trivial baselines: empty mask has Dice 0, a majority-class predictor has AUC 0.5
        assert summary["tasks"]["lung"]["baseline"]["dice"] == 0.0
        assert summary["tasks"]["breast_2cls"]["baseline"]["auc"] == 0.5
        for model in models:
            d = out / paradigm / model
            for name in ("best.safetensors", "best.json", "metrics.jsonl", "eval.json", "routing.json",
                         "last/model.safetensors", "last/model.json", "last/train_state.pt"):
                assert (d / name).is_file(), d / name
            routing = json.loads((d / "routing.json").read_text())
            assert routing["num_experts"] == 4 and set(routing["layers"]) == {"4", "5"}  # last 2 of 6 blocks
            for counts in routing["layers"].values():
                assert len(counts) == len(routing["tasks"]) and all(len(row) == 4 for row in counts)
            ev = json.loads((d / "eval.json").read_text())
            assert set(ev["tasks"]) == set(summary["models"][model])
            # intervals for every metric, the per-image values they come from beside eval.json
            assert ev["bootstrap"]["n_resamples"] == 1000
            for task_id, metrics in ev["tasks"].items():
                assert set(ev["ci"][task_id]) == set(metrics)
                for metric, (low, high) in ev["ci"][task_id].items():
                    assert low <= metrics[metric] + 1e-9 and metrics[metric] <= high + 1e-9, (task_id, metric)
            per_image = json.loads((d / "eval_per_image.json").read_text())["tasks"]
            assert set(per_image) == set(ev["tasks"])
            for task_id, values in per_image.items():  # one entry per validation image (3 per task here)
                assert {len(v) for v in values.values()} == {3}, (task_id, values)
            # how much training each model had
            length = summary["training"][model]
            assert length["epochs"] == pytest.approx(length["samples_seen"] / length["train_images"])
            assert length["steps"] == 2 and length["seconds"] > 0
    # the same metrics reach metrics.json and eval.json
    au = json.loads((out / "au" / "metrics.json").read_text())
    au_eval = json.loads((out / "au" / "all" / "eval.json").read_text())
    assert au["tasks"]["lung"]["metrics"] == au_eval["tasks"]["lung"]
    assert au["tasks"]["lung"]["ci"] == au_eval["ci"]["lung"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["tasks"]["lung"]["paradigms"]["au"]["ci"]["dice"] == pytest.approx(au_eval["ci"]["lung"]["dice"])
    assert set(report["answers"]) == {"RQ1", "RQ2", "RQ3", "RQ4", "RQ5"}
    assert (out / "split.json").is_file() is False  # the suite has train/ and val/: no split made
    for name in ("report.md", "report.csv", "report.json"):
        assert (out / "report" / name).is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # TensorBoard events beside the JSON lines
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        events = EventAccumulator(str(out / "au" / "all" / "tensorboard"))
        events.Reload()
        scalars = events.Tags()["scalars"]
        assert "train/loss" in scalars and "eval/score" in scalars, scalars
        losses = [e.value for e in events.Scalars("train/loss")]
        jsonl = [json.loads(line) for line in (out / "au" / "all" / "metrics.jsonl").read_text().splitlines()]
        assert losses == pytest.approx([r["loss"] for r in jsonl if r["event"] == "train"])


def _break_suite(root):
    """A truncated image and an out-of-range label in the training CSVs."""
    csv_dir = root / "train" / "csv_files"
    cls_csv = next(csv_dir.glob("*breast_2cls.csv"))
    rows = list(csv.reader(cls_csv.open()))
    rows[3][4] = "7"  # data row 2: label 7 of a 2-class task
    with cls_csv.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    seg_csv = next(csv_dir.glob("*lung.csv"))
    image_rel = list(csv.reader(seg_csv.open()))[1][0]
    image = (csv_dir / image_rel).resolve()
    image.write_bytes(image.read_bytes()[:100])  # data row 0: truncated image


def test_bad_sample_policy(tmp_path):
    root = tmp_path / "bad"
    write_suite(root, scale=0.001, tasks=TASKS, min_train=8, min_val=3, workers=1)
    _break_suite(root)
    base = dict(data=str(root), paradigm="au", img_size=32, batch_size=4, steps=1, progress=False, seeds=None)
    with pytest.raises(DataValidationError) as info:
        run(TrainConfig(out=str(tmp_path / "refused"), **base).validate())
    message = str(info.value)
    assert "breast_2cls.csv row 2" in message and "lung.csv row 0" in message
    assert not (tmp_path / "refused" / "au").exists()  # nothing trained

    out = tmp_path / "skipped"
    result = run(TrainConfig(out=str(out), on_bad_sample="skip", **base).validate())
    excluded = json.loads((out / "excluded_rows.json").read_text())
    assert sorted((p["csv"].split(".")[-2], p["row"]) for p in excluded) == [("breast_2cls", 2), ("lung", 0)]
    assert result["au"]["tasks"]["lung"]["train_size"] == 7
    assert result["au"]["tasks"]["breast_2cls"]["train_size"] == 7


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    rc = main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("GC", [False, True])
def test_options_freeze_checkpointing_single_batching(suite, tmp_path, GC):
    """--freeze-backbone trains only MoE layers, neck and heads; --grad-checkpointing and
    single-task batches run through the same loop."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    # the default kernel backend (cpp when built): a frozen backbone hands the MoE an x that
    # needs no grad while the experts do, which once broke the extension
    # from random weights (--from-scratch): the initial weights are rebuilt below from the seed
    run(TrainConfig(data=str(suite), out=str(out), paradigm="au", img_size=32, batch_size=4, steps=2, seeds=None,
                    from_scratch=True, progress=False, freeze_backbone=True, grad_checkpointing=GC, batching="single",
                    task_alpha=0.5, warmup=0, checkpoint_every=1).validate())
    model_dir = out / "au" / "all"
    # the trainer builds the model after torch.manual_seed(seed): rebuild the initial weights
    from m2dino.models.m2dino import create_model
    from m2dino.tasks import get_task
    torch.manual_seed(0)
    fresh = create_model("dinov3_tiny", [get_task(t) for t in sorted(TASKS)], num_experts=4, top_k=2,
                         moe_layers=2, img_size=32).state_dict()
    trained = load_file(str(model_dir / "last" / "model.safetensors"))
    changed = {k for k in fresh if not torch.equal(fresh[k], trained[k])}
    assert any(k.startswith("heads.") for k in changed)
    assert any(".mlp.gate_weight" in k or ".mlp.fc1_weight" in k for k in changed)  # MoE layers train
    is_moe = lambda k: ".mlp." in k and any(s in k for s in ("gate_", "fc1_", "fc2_"))  # noqa: E731
    frozen = [k for k in changed if k.startswith("backbone.") and not is_moe(k)]
    assert not frozen, f"frozen backbone tensors changed: {frozen[:5]}"


def test_landmark_heads_start_at_the_training_mean_points(tmp_path, tiny_suite):
    from PIL import Image

    from m2dino.training.study import load_data
    from m2dino.training.trainer import ModelTrainer

    root = tiny_suite(["fetal_femur"], min_train=6, min_val=2)
    config = TrainConfig(data=str(root), out=str(tmp_path / "run"), paradigm="au", img_size=32,
                         progress=False).validate()
    _, data = load_data(config, tmp_path / "run")
    specs = list(data.tasks.values())
    trainer = ModelTrainer(config, "all", specs, data.train, data.val, tmp_path / "run" / "au" / "all",
                           torch.device("cpu"))
    model = trainer.build_model()
    sizes = [Image.open(r.image_file).size for r in trainer.train_records]
    mean = np.mean([np.asarray(r.points) / size for r, size in zip(trainer.train_records, sizes)], axis=0)
    prior = model.heads["fetal_femur"].prior.detach()
    grid = prior.shape[-1]
    for k in range(2):  # the prior peaks at the grid cell holding the mean point
        row, col = divmod(prior[k].flatten().argmax().item(), grid)
        assert (col, row) == tuple(np.floor(mean[k] * grid).astype(int)), (k, mean[k])


def test_the_pooled_baseline_check_reads_the_mean_over_the_seeds():
    from m2dino.training.study import baseline_table, mean_over_seeds

    def summary(dice, mre):
        return {"tasks": {"lung": {"primary_metric": "dice", "task_type": "segmentation", "metrics": {"dice": dice},
                                   "baseline": {"dice": 0.0}},
                          "IUGC": {"primary_metric": "mre", "task_type": "regression", "metrics": {"mre": mre},
                                   "baseline": {"mre": 10.0}}}}
    pooled = mean_over_seeds([summary(0.5, 9.0), summary(0.7, 12.0)])
    assert pooled["tasks"]["lung"]["metrics"]["dice"] == pytest.approx(0.6)
    assert pooled["tasks"]["IUGC"]["metrics"]["mre"] == pytest.approx(10.5)
    table, all_beat = baseline_table(pooled)
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines()[1:]}
    assert not all_beat and rows == {"lung": "yes", "IUGC": "NO"}  # IUGC: 10.5 px is worse than the baseline's 10


@pytest.mark.slow
def test_seeds_train_every_paradigm_per_seed_and_pool_them(suite, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--data", str(suite), "--out", str(out), "--seeds", "0,1", "--img-size", "32", "--batch-size", "4",
               "--steps", "1", "--bootstrap", "200", "--no-progress"])
    assert rc == 0
    # the closing check is the pooled value's: the mean over the seeds against the baseline
    printed = capsys.readouterr().out
    assert "AU model vs trivial baselines, the mean over seeds [0, 1]" in printed
    assert "every task beats its trivial baseline (mean over the seeds):" in printed
    for seed in (0, 1):
        config = yaml.safe_load((out / f"seed-{seed}" / "config.yaml").read_text())
        assert config["seed"] == seed and config["seeds"] is None
        for paradigm in ("ts", "cg", "au"):
            assert (out / f"seed-{seed}" / paradigm / "metrics.json").is_file()
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["replicates"] == ["seed-0", "seed-1"]
    au = report["tasks"]["lung"]["paradigms"]["au"]
    per_seed = [json.loads((out / f"seed-{s}" / "au" / "metrics.json").read_text())["tasks"]["lung"]["metrics"]["dice"]
                for s in (0, 1)]
    assert au["runs"] == 2 and au["metrics"]["dice"] == pytest.approx(np.mean(per_seed))
    # different seeds train differently: the models are not copies of each other
    a = (out / "seed-0" / "au" / "all" / "best.safetensors").read_bytes()
    assert a != (out / "seed-1" / "au" / "all" / "best.safetensors").read_bytes()
