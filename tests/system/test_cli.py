"""The command lines: --help answers fast and without torch, every option has help, --tasks
takes commas or spaces everywhere, impossible values stop before any data is read naming the
option and the valid values, and the defaults the fast parsers spell out equal the code's."""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parsers import parser_of

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("m2dino.train", "m2dino.predict", "m2dino.evaluate", "m2dino.report", "m2dino.export",
            "m2dino.data.check", "m2dino.data.synthetic", "m2dino.affinity")
HELP_SECONDS = 3.0  # generous: importing torch alone takes longer than this on a small VM


HELP_AND_NO_TORCH = """
import runpy, sys
sys.argv = [{command!r}, "--help"]
try:
    runpy.run_module({command!r}, run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
assert "torch" not in sys.modules, "torch was imported before --help answered"
"""


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_fast_and_without_torch(command):
    """argparse formats every help string only for --help: a stray % breaks it there alone."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and "usage:" in result.stdout, (command, result.stderr[-500:])
    assert "examples:" in result.stdout, command
    assert seconds < HELP_SECONDS, f"{command} --help took {seconds:.2f} s"
    check = subprocess.run([sys.executable, "-c", HELP_AND_NO_TORCH.format(command=command)], capture_output=True,
                           text=True, timeout=120, cwd=ROOT)
    assert check.returncode == 0, (command, check.stderr[-800:])


def test_the_training_config_imports_without_torch():
    code = "import sys, m2dino.training.config, m2dino.models.configs; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_one_default(command):
    parser = parser_of(command)
    for action in parser._actions:
        assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings)
        assert action.help.count("default:") <= 1, (command, action.option_strings, action.help)


def test_train_options_are_grouped_like_the_config_with_choices():
    parser = parser_of("m2dino.train")
    groups = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
    assert {"data", "study", "model", "schedule and optimizer", "numerics and hardware",
            "output, resume and evaluation"} <= set(groups)
    assert {"data", "tasks"} <= groups["data"] and {"model", "num_experts"} <= groups["model"]
    assert {"epochs", "lr"} <= groups["schedule and optimizer"] and "resume" in groups["output, resume and evaluation"]
    text = parser.format_help()
    assert "--paradigm {ts,cg,au,ag,all}" in text and "--amp {bf16,fp16,off}" in text and "dinov3_vitb16" in text


def test_tasks_take_commas_or_spaces_in_every_command():
    from m2dino.data.synthetic.__main__ import _tasks
    from m2dino.predict import task_list
    from m2dino.training.config import parse_args

    assert parse_args(["--tasks", "fetal_head,IUGC", "lung"]).tasks == ["fetal_head", "IUGC", "lung"]
    for command in ("m2dino.predict", "m2dino.evaluate"):
        args = parser_of(command).parse_args(["--data-root", "r", "--out", "o", "--checkpoint", "c",
                                              "--tasks", "fetal_head,IUGC", "lung"]
                                             if command == "m2dino.predict" else
                                             ["--data-root", "r", "--tasks", "fetal_head, IUGC", "lung"])
        assert task_list(args.tasks) == ["fetal_head", "IUGC", "lung"], command
    args = parser_of("m2dino.data.synthetic").parse_args(["--out", "o", "--tasks", "fetal_head,IUGC", "lung"])
    assert _tasks(args.tasks) == ["fetal_head", "IUGC", "lung"]


IMPOSSIBLE = [
    (["--model", "dinov3_vitx"], "--model", "dinov3_vitb16"),
    (["--loss-weights", "fetal_hed=2"], "--loss-weights", "fetal_head"),
    (["--loss-weights", "segmentaton=2"], "--loss-weights", "segmentation"),
    (["--paradigm", "tss"], "--paradigm", "ts, cg, au, ag, all"),
    (["--amp", "fp8"], "--amp", "bf16"),
    (["--top-k", "9"], "--top-k", "num_experts"),
]


@pytest.mark.parametrize("argv, option, valid", IMPOSSIBLE)
def test_impossible_values_stop_before_any_data_is_read(tmp_path, capsys, argv, option, valid):
    from m2dino.train import main

    missing = tmp_path / "no-such-root"  # reading the data would fail with another message
    assert main([*argv, "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert option in err and valid in err and "no-such-root" not in err, err
    assert not (tmp_path / "run").exists()


def test_task_types_weigh_the_loss_as_the_help_says():
    from m2dino.tasks import get_task
    from m2dino.training.config import parse_args
    from m2dino.training.losses import task_weight

    weights = parse_args(["--loss-weights", "segmentation=2,fetal_head=3"]).loss_weights
    assert task_weight(get_task("lung"), weights) == 2.0        # by its type
    assert task_weight(get_task("fetal_head"), weights) == 3.0  # its id wins
    assert task_weight(get_task("IUGC"), weights) == 1.0


def test_defaults_spelt_in_the_fast_parsers_equal_the_code():
    import m2dino.data.synthetic.__main__ as synthetic_cli
    from m2dino.data.synthetic import suite
    from m2dino.evaluation.predict import AMP_DTYPES
    from m2dino.evaluation.report import DEFAULT_NEGATIVE_THRESHOLD
    from m2dino.export.options import AMP_CHOICES
    from m2dino.models.configs import DEFAULT_AUX_WEIGHTS
    from m2dino.models.moe import AUX_NAMES
    from m2dino.predict import AMP_CHOICES as PREDICT_AMP
    from m2dino.report import DEFAULT_NEGATIVE_THRESHOLD as REPORT_THRESHOLD

    assert set(PREDICT_AMP) == set(AMP_CHOICES) == set(AMP_DTYPES)
    assert REPORT_THRESHOLD == DEFAULT_NEGATIVE_THRESHOLD
    assert set(DEFAULT_AUX_WEIGHTS) == set(AUX_NAMES)
    for name in ("DEFAULT_SCALE", "DEFAULT_SEED", "MIN_TRAIN", "MIN_VAL"):
        assert getattr(synthetic_cli, name) == getattr(suite, name), name
