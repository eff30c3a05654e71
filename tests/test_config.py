"""Config: defaults < YAML < command line, validation naming the option, saved config round trip."""
import pytest
import yaml

from m2dino.training.config import TrainConfig, build_parser, parse_args, parse_weights, read_config, save_config


def test_no_arguments_is_the_embedded_default():
    c = parse_args([])
    assert c == TrainConfig()
    assert (c.model, c.img_size, c.num_experts, c.top_k, c.moe_layers) == ("dinov3_tiny", 64, 4, 2, 2)
    assert c.paradigm == "all" and c.data == "synthetic" and c.task_alpha == 1.0 and c.steps is None


def test_every_issue_option_exists_with_its_exact_name():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    for name in ("--data", "--paradigm", "--tasks", "--groups", "--model", "--pretrained", "--num-experts",
                 "--top-k", "--moe-layers", "--img-size", "--epochs", "--steps", "--batch-size", "--lr",
                 "--head-lr-mult", "--weight-decay", "--warmup", "--batching", "--task-alpha", "--loss-weights",
                 "--aux-weights", "--amp", "--grad-checkpointing", "--freeze-backbone", "--seed", "--device",
                 "--workers", "--out", "--resume", "--eval-every", "--config", "--max-bad-steps",
                 "--on-bad-sample"):
        assert name in flags, name


def test_cli_values_are_typed():
    c = parse_args(["--tasks", "lung,fetal_head", "organ_cls", "--epochs", "3", "--lr", "2e-4", "--steps", "7",
                    "--grad-checkpointing", "--no-progress", "--loss-weights", "lung=2,organ_cls=0.5",
                    "--aux-weights", "load_balance=0.1", "--batching", "single", "--amp", "off"])
    assert c.tasks == ["lung", "fetal_head", "organ_cls"]
    assert c.epochs == 3 and c.steps == 7 and c.lr == 2e-4
    assert c.grad_checkpointing is True and c.progress is False
    assert c.loss_weights == {"lung": 2.0, "organ_cls": 0.5}
    assert c.aux_weights == {"load_balance": 0.1}
    assert (c.batching, c.amp) == ("single", "off")


def test_yaml_config_then_command_line_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"epochs": 5, "batch-size": 4, "lr": 0.01, "tasks": ["lung"],
                                 "loss_weights": {"lung": 3}, "freeze_backbone": True}))
    c = parse_args(["--config", str(f), "--epochs", "9"])
    assert c.epochs == 9  # the command line beats the file
    assert c.batch_size == 4 and c.lr == 0.01 and c.tasks == ["lung"]
    assert c.loss_weights == {"lung": 3.0} and c.freeze_backbone is True
    assert c.img_size == TrainConfig().img_size  # untouched default


@pytest.mark.parametrize("argv, needle", [
    (["--paradigm", "xx"], "--paradigm"),
    (["--batch-size", "0"], "--batch-size"),
    (["--top-k", "5", "--num-experts", "4"], "--top-k"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "abc"], "--lr"),
    (["--epochs", "1.5"], "--epochs"),
    (["--aux-weights", "foo=1"], "--aux-weights"),
    (["--loss-weights", "lung"], "--loss-weights"),
    (["--loss-weights", "lung=x"], "--loss-weights"),
    (["--amp", "fp8"], "--amp"),
    (["--on-bad-sample", "ignore"], "--on-bad-sample"),
])
def test_bad_values_name_the_option(argv, needle):
    with pytest.raises(ValueError, match=needle):
        parse_args(argv)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*epochz"):
        parse_args(["--config", str(f)])
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(["--config", str(f)])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trip(tmp_path):
    c = parse_args(["--tasks", "lung", "--steps", "3", "--loss-weights", "lung=2"])
    path = save_config(c, tmp_path / "run" / "config.yaml")
    saved = yaml.safe_load(path.read_text())
    assert set(saved) == set(TrainConfig().to_dict())  # every option is written
    assert read_config(path) == c
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_parse_weights():
    assert parse_weights("a=1, b=0.5,", "x") == {"a": 1.0, "b": 0.5}
    assert parse_weights({"a": 2}, "x") == {"a": 2.0}
    assert parse_weights(None, "x") == {}


def test_every_command_line_prints_its_help():
    """argparse formats every help string only for --help: a stray % breaks it there alone."""
    import subprocess
    import sys

    for module in ("m2dino.train", "m2dino.predict", "m2dino.evaluate", "m2dino.report", "m2dino.export",
                   "m2dino.data.check", "m2dino.data.synthetic"):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, (module, result.stderr[-500:])
