"""Config: defaults < YAML < command line, validation naming the option, saved config round trip."""
import dataclasses
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from m2dino.models.backbone import M2DINOConfig
from m2dino.options import options_of
from m2dino.paradigms import CONTROL_PARADIGM, plateau_rule_text
from m2dino.training import rundir
from m2dino.training.config import (
    RESUMABLE,
    PlanOptions,
    TrainConfig,
    build_parser,
    config_from_dict,
    option_table,
    parse_args,
    parse_weights,
    read_config,
    save_config,
)

# The no-argument run's every option as the flat TrainConfig held them before the model had its
# own config: the demo (model, data, schedule) must not change by a single value.
DEMO_RUN = dict(
    data="synthetic", synthetic_scale=0.03, on_bad_sample="error", val_fraction=0.2, split_seed=None, tasks=None,
    groups=None, paradigm="all", control="none", model="dinov3_tiny", pretrained="synthetic", from_scratch=False,
    num_experts=4, top_k=2,
    moe_layers=2,
    img_size=48, neck_channels=64, epochs=7, steps=None, min_steps=0, batch_size=16, lr=1e-3, head_lr_mult=10.0,
    weight_decay=0.05, warmup=0.05, grad_clip=1.0, batching="mixed", task_alpha=1.0, loss_weights={},
    aux_weights={"load_balance": 0.01, "z_loss": 0.001, "mutual_information": 0.0, "global_load_balance": 0.0},
    amp="bf16",
    grad_checkpointing=False, freeze_backbone=False, fsdp=False, seed=0, seeds=[0, 1, 2],
    affinity_steps=0, num_groups=None, with_ag=False, random_groupings=0, device="auto", workers=0,
    jobs=0, max_bad_steps=5, out="runs/default", resume=False, eval_every=0, log_every=10, checkpoint_every=0,
    checkpoint_seconds=60.0, bootstrap=1000, progress=True, budget="equal-exposure", correction="bh",
    # the fine-tuning options, added off
    grad_accum=1, layer_decay=1.0, drop_path=0.0, drop_path_schedule="uniform", ema=None, compile=False)


def test_no_arguments_is_the_embedded_default():
    c = parse_args([])
    assert c == TrainConfig()
    assert c.model == M2DINOConfig(name="dinov3_tiny", num_experts=4, top_k=2, moe_layers=2, img_size=48,
                                   neck_channels=64)
    assert c.paradigm == "all" and c.data == "synthetic" and c.task_alpha == 1.0 and c.steps is None


def test_no_argument_run_equals_the_demo_field_by_field():
    resolved = parse_args([]).to_dict()
    model = resolved.pop("model")
    flat = {**resolved, "model": model.pop("name"), **{k: model.pop(k) for k in
                                                      ("num_experts", "top_k", "moe_layers", "img_size",
                                                       "neck_channels")}}
    assert flat == DEMO_RUN
    # the model fields training could not set before keep the values the model used then
    assert model == {"neck_layers": None, "router_init_std": 0.02, "rope_rescale_coords": None,
                     "backbone_overrides": {}}
    assert parse_args([]).model.resolved().neck_layers == (0, 2, 3, 5)
    assert config_from_dict(DEMO_RUN) == parse_args([])  # a config.yaml of the flat form still reads


def test_every_model_field_is_reachable_from_yaml_and_the_command_line(tmp_path):
    wanted = dict(name="dinov3_vits16", num_experts=6, top_k=3, moe_layers=4, img_size=96, neck_channels=32,
                  neck_layers=[1, 3, 5, 11], router_init_std=0.01, rope_rescale_coords=2.0,
                  backbone_overrides={"layerscale_init": 1e-4})
    f = tmp_path / "nested.yaml"
    f.write_text(yaml.safe_dump({"model": wanted}))
    assert parse_args(["--config", str(f)]).model == M2DINOConfig(**wanted)
    flat = {("model" if k == "name" else k): v for k, v in wanted.items()}
    f.write_text(yaml.safe_dump(flat))
    assert parse_args(["--config", str(f)]).model == M2DINOConfig(**wanted)
    cli = parse_args(["--model", "dinov3_vits16", "--num-experts", "6", "--top-k", "3", "--moe-layers", "4",
                      "--img-size", "96", "--neck-channels", "32", "--neck-layers", "1,3,5,11",
                      "--router-init-std", "0.01", "--rope-rescale-coords", "2", "--backbone-overrides",
                      "layerscale_init=1e-4"])
    assert cli.model == M2DINOConfig(**wanted)
    assert set(f.name for f in dataclasses.fields(M2DINOConfig)) == set(wanted)  # no field left out


@pytest.mark.parametrize("argv, needle", [
    (["--moe-layers", "7"], "--moe-layers"),
    (["--neck-layers", "1,2,3"], "--neck-layers"),
    (["--neck-layers", "a,b"], "--neck-layers"),
    (["--backbone-overrides", "depht=4"], "--backbone-overrides"),
    (["--model", "dinov3_huge"], "--model"),
    (["--img-size", "0"], "--img-size"),
])
def test_bad_model_values_name_the_option(argv, needle):
    with pytest.raises(ValueError, match=needle):
        parse_args(argv)


def test_yaml_model_mapping_errors_name_the_file(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model:\n  name: dinov3_tiny\n  experts: 3\n")
    with pytest.raises(ValueError, match=r"m\.yaml.*experts"):
        parse_args(["--config", str(f)])


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
    assert c.model == TrainConfig().model  # untouched default


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


# ------------------------------------------------------------------ options declared once

ROOT = Path(__file__).resolve().parents[2]
TABLE_START = "<!-- option table: generated by m2dino.training.config.option_table(), do not edit by hand -->\n"
TABLE_END = "<!-- end of the option table -->\n"


def test_the_docs_option_table_is_the_declarations():
    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    assert table == option_table(), ("docs/training.md's option table differs from the declarations: paste "
                                     "m2dino.training.config.option_table() between its markers")
    flags = {s for a in build_parser()._actions for s in a.option_strings} - {"-h", "--help", "--config"}
    assert {f for f in flags if f"`{f}" in table} == flags  # every flag has its row


def test_help_shows_each_default_once_from_the_declaration():
    text = " ".join(build_parser().format_help().split())
    assert text.count("(default: 7)") == 1 and "(default: 4)" in text  # --epochs; the demo's --num-experts
    for opt in options_of(PlanOptions):  # the plan's defaults, no longer retyped in its help
        assert opt.help.count("default") == 0
    assert "(default: 300.0)" in text and "(default: 80.0)" in text


def test_study_names_come_from_paradigms():
    """Help and code spell the paradigms, the control and the plateau rule through m2dino.paradigms."""
    assert plateau_rule_text() in " ".join(build_parser().format_help().split())
    assert f"OUT/{CONTROL_PARADIGM}/" in option_table()
    retyped = re.compile(r"[\"'](ts_converged|ts-converged)[\"']|\(\"ts\", \"cg\", \"au\"\)|\b(PLATEAU_\w+) = ")
    for path in (ROOT / "m2dino").rglob("*.py"):
        if path.name != "paradigms.py":
            found = retyped.search(path.read_text())
            assert found is None, f"{path.relative_to(ROOT)} retypes {found.group(0)}: import it from m2dino.paradigms"


# One line added to the schedule section of config.py, as a contributor would add an option
THROWAWAY = '    throwaway_knob: int = option(3, "a test-only option", resumable=True)\n'


@pytest.fixture
def probe(monkeypatch):
    """m2dino.training.config with one option added by one declaration, as its own module."""
    source = (ROOT / "m2dino" / "training" / "config.py").read_text()
    anchor = "    freeze_backbone: bool = option("
    assert source.count(anchor) == 1
    module = types.ModuleType("m2dino_config_probe")
    module.__file__ = str(ROOT / "m2dino" / "training" / "config.py")  # its recipes are the real ones
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source.replace(anchor, THROWAWAY + anchor), "config_probe.py", "exec"), module.__dict__)
    return module


def test_one_declaration_adds_an_option_everywhere(probe, tmp_path):
    # the command line, flat reads and the section
    flags = {s for a in probe.build_parser()._actions for s in a.option_strings}
    assert "--throwaway-knob" in flags
    config = probe.parse_args(["--throwaway-knob", "5"])
    assert config.throwaway_knob == 5 == config.schedule.throwaway_knob
    assert probe.TrainConfig().throwaway_knob == 3 and probe.TrainConfig(throwaway_knob=4).schedule.throwaway_knob == 4
    assert dataclasses.replace(config, throwaway_knob=6).throwaway_knob == 6
    with pytest.raises(ValueError, match="--throwaway-knob"):
        probe.parse_args(["--throwaway-knob", "x"])
    # YAML, both spellings, and the saved config's round trip
    for key in ("throwaway_knob", "throwaway-knob"):
        f = tmp_path / f"{key}.yaml"
        f.write_text(f"{key}: 8\n")
        assert probe.parse_args(["--config", str(f)]).throwaway_knob == 8
    saved = probe.save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load(saved.read_text())["throwaway_knob"] == 5 and probe.read_config(saved) == config
    # the resume rule and the docs' table
    assert "throwaway_knob" in probe.RESUMABLE
    row = "| `--throwaway-knob THROWAWAY_KNOB` | a test-only option (default: 3) | may change |"
    assert row in probe.option_table()


def test_the_resume_rule_is_the_declarations():
    assert rundir.RESUMABLE is RESUMABLE
    assert set(RESUMABLE) == {"epochs", "min_steps", "control", "workers", "jobs", "device", "progress",
                              "checkpoint_every", "checkpoint_seconds", "grad_accum", "drop_path",
                              "drop_path_schedule", "ema", "compile"}


def test_flat_reads_and_writes_reach_the_sections():
    c = TrainConfig(epochs=2, img_size=32, data="/d", model="dinov3_vits16")
    assert (c.schedule.epochs, c.model.img_size, c.dataset.data, c.model.name) == (2, 32, "/d", "dinov3_vits16")
    assert c.model.num_experts == 8  # a preset's defaults, then the options over them
    d = dataclasses.replace(c, epochs=3, top_k=1)
    assert (d.epochs, d.top_k, c.epochs, c.top_k) == (3, 1, 2, 2)  # a copy: the original is untouched
    d.resume = True
    d.img_size = 48
    assert (d.output.resume, d.model.img_size, c.resume, c.img_size) == (True, 48, False, 32)
    with pytest.raises(TypeError, match="epochz"):
        TrainConfig(epochz=3)
    with pytest.raises(AttributeError, match="epochz"):
        c.epochz  # noqa: B018
    assert pickle.loads(pickle.dumps(c)) == c


def test_help_answers_without_torch_and_fast():
    code = ("import sys, time; t = time.perf_counter(); from m2dino.train import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules; print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 3
