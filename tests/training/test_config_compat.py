"""Every flag, YAML key (both spellings), recipe and config.yaml of the code before the options
were declared by section resolves to the same config, field by field, and an old run directory
resumes. The reference (tests/training/data/resolved_before_sections.json) was captured from
that code (main at 69cd758): for each case its command line (or YAML mapping) and the values of
the resolved config that differ from the default's."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from m2dino.training.config import RUN_CONFIG_HEADER, build_parser, parse_command, read_config
from m2dino.training.rundir import RunDirError, check_run_dir

DATA = Path(__file__).parent / "data"
BEFORE = json.loads((DATA / "resolved_before_sections.json").read_text())
DEFAULT = BEFORE["default"]["changes"]  # the default, whole
# The one value read differently, on purpose: --split-seed was kept as the string it was typed as
# ("3"), now it is the integer its type says (the split's hash reads both alike)
FIXED = {"split_seed": {"split_seed": 3}}
# Added since the capture, default off: the global (all-token) balance loss's weight
ADDED_AUX = {"global_load_balance": 0.0}
# Options added since the capture, off by default: compared as absent at their default
ADDED_OPTIONS = {"grad_accum": 1, "layer_decay": 1.0, "drop_path": 0.0, "drop_path_schedule": "uniform",
                 "ema": None, "compile": False,
                 "affinity_steps": 0,
                 # AG, the affinity-grouping paradigm, and its null
                 "num_groups": None, "with_ag": False, "random_groupings": 0,
                 # the training budget (equal exposure) and the report's multiplicity correction
                 "budget": "equal-exposure", "correction": "bh"}

# Defaults changed on purpose since the capture (old, new): every study trains three seeds, and
# starts from the shipped synthetic pretrained backbone (random weights: --from-scratch). A value
# at its new default is compared as the old one; a config.yaml saved before still reads as it was.
CHANGED_DEFAULTS = {"seeds": (None, [0, 1, 2]), "pretrained": (None, "synthetic"), "lr": (1.5e-3, 1e-3),
                    "head_lr_mult": (3.0, 10.0)}
# ... and the demo model's image size (48 px, to fit the three seeds in the default run's 15 minutes)
CHANGED_DEMO_MODEL = {"img_size": (64, 48)}

# The fine-tuning options the paper recipes took since the capture (their sources in the recipes)
RECIPE_ADDED = {f"m2dino_{size}_fmuia": {"layer_decay": 0.9, "drop_path": drop_path, "ema": 0.999}
                for size, drop_path in (("vits16", 0.1), ("vitb16", 0.1), ("vitl16", 0.2))}
PAPER_RECIPES = set(RECIPE_ADDED)
# The demo's own changes since (the default run's three seeds in 15 minutes from the pretrained start)
RECIPE_ADDED["demo_cpu"] = {"seeds": [0, 1, 2], "pretrained": "synthetic", "lr": 1e-3, "head_lr_mult": 10.0,
                            "model": {"img_size": 48}}


def expected(case: dict, name: str | None = None) -> dict:
    values = {**DEFAULT, **{k: v for k, v in case["changes"].items() if k != "model"}}
    values["model"] = {**DEFAULT["model"], **case["changes"].get("model", {})}
    return {**values, **FIXED.get(name, {})}


def resolved(config, case: dict) -> dict:
    values = json.loads(json.dumps(config.to_dict()))
    weights = values.get("aux_weights") or {}
    for key, default in ADDED_AUX.items():  # at its default it changes nothing: compared as absent
        if weights.get(key) == default:
            weights.pop(key)
    for key, default in ADDED_OPTIONS.items():
        if key in values and values[key] == default:
            values.pop(key)
    for key, (before, now) in CHANGED_DEFAULTS.items():
        if case["changes"].get(key, before) == before and values.get(key) == now:
            values[key] = before
    model, asked = values.get("model", {}), case["changes"].get("model", {})
    for key, (before, now) in CHANGED_DEMO_MODEL.items():
        if model.get("name") == "dinov3_tiny" and asked.get(key, before) == before and model.get(key) == now:
            model[key] = before
    return values


def assert_same(config, case, name=None):
    got, want = resolved(config, case), expected(case, name)
    assert list(got) and set(got) == set(want)
    for key in want:  # field by field, so that a failure names the field
        assert got[key] == want[key], key


def test_the_default_is_unchanged():
    config, run_options, given = parse_command([])
    assert_same(config, BEFORE["default"])
    assert run_options == {} and given == set()


def test_every_flag_that_was_still_exists():
    flags = {s for a in build_parser()._actions for s in a.option_strings}
    assert set(BEFORE["flags"]) <= flags, sorted(set(BEFORE["flags"]) - flags)


@pytest.mark.parametrize("name", sorted(BEFORE["cli"]))
def test_every_flag_alone_resolves_as_before(name):
    case = BEFORE["cli"][name]
    config, run_options, given = parse_command(case["argv"])
    assert_same(config, case, name)
    assert sorted(given) == case["given"] and run_options == case["run_options"]


@pytest.mark.parametrize("key", sorted(BEFORE["yaml"]))
def test_every_yaml_key_in_both_spellings_resolves_as_before(key, tmp_path):
    case = BEFORE["yaml"][key]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(case["yaml"]))
    config, _, given = parse_command(["--config", str(f)])
    assert_same(config, case, key.replace("-", "_"))
    assert sorted(given) == case["given"]


@pytest.mark.parametrize("name", sorted(BEFORE["run"]))
def test_every_run_option_reads_as_before(name):
    case = BEFORE["run"][name]
    config, run_options, given = parse_command(case["argv"])
    assert_same(config, case)
    assert run_options == case["run_options"] and sorted(given) == case["given"]


@pytest.mark.parametrize("name", sorted(BEFORE["recipes"]))
def test_every_recipe_resolves_as_before(name):
    case = BEFORE["recipes"][name]
    recipe = name.split(".yaml")[0]
    added = RECIPE_ADDED.get(recipe, {})
    changes = {**case["changes"], **added}
    if "model" in added:
        changes["model"] = {**case["changes"].get("model", {}), **added["model"]}
    given = {*case["given"], *(k for k in added if k != "model"), *(("compile",) if recipe in PAPER_RECIPES else ())}
    case = {**case, "changes": changes, "given": sorted(given) if added else case["given"]}
    argv = case["argv"]
    if argv[1].startswith("configs/"):  # by its path
        argv = ["--config", str(Path(__file__).resolve().parents[2] / argv[1])]
    config, _, given = parse_command(argv)
    assert_same(config, case)
    assert sorted(given) == case["given"]


def test_a_config_yaml_written_before_reads_as_it_did():
    saved = DATA / BEFORE["saved_config"]["file"]
    assert saved.read_text().startswith(RUN_CONFIG_HEADER)
    assert_same(read_config(saved), BEFORE["saved_config"])


@pytest.fixture
def old_run(tmp_path):
    """A run directory as the earlier code left it: its config.yaml and a model's checkpoint."""
    out = tmp_path / "old"
    (out / "au" / "all" / "last").mkdir(parents=True)
    (out / "config.yaml").write_bytes((DATA / BEFORE["saved_config"]["file"]).read_bytes())
    save_file({"w": np.zeros(2, dtype="float32")}, str(out / "au" / "all" / "last" / "model.safetensors"))
    return out


def test_an_old_run_directory_resumes_with_its_own_config(old_run):
    config, _, given = parse_command(["--out", str(old_run), "--resume"])
    plan = check_run_dir(config, given)
    assert_same(plan.config, {"changes": {**BEFORE["saved_config"]["changes"], "out": str(old_run),
                                          "resume": True}})
    # a resumable option may change
    config, _, given = parse_command(["--out", str(old_run), "--resume", "--epochs", "9", "--no-progress"])
    plan = check_run_dir(config, given)
    assert (plan.config.epochs, plan.config.progress, plan.config.img_size) == (9, False, 32)


@pytest.mark.parametrize("argv, flag", [(["--lr", "1.0"], "--lr 1.0 (the run has 0.0015)"),
                                        (["--img-size", "48"], "--img-size 48 (the run has 32)"),
                                        (["--tasks", "lung"], "--tasks")])
def test_an_old_run_refuses_a_change_that_may_not_and_names_the_flag(old_run, argv, flag):
    config, _, given = parse_command(["--out", str(old_run), "--resume", *argv])
    with pytest.raises(RunDirError, match="only --control, --epochs") as refusal:
        check_run_dir(config, given)
    assert flag in str(refusal.value)
