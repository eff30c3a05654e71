"""The recipes in configs/: each parses, validates and builds its model on the meta device with
the parameter count that the preset's shapes give; demo_cpu is the built-in default run."""
from pathlib import Path

import pytest
import torch

from m2dino.models.backbone import PRESETS, M2DINOConfig
from m2dino.models.m2dino import M2DINO
from m2dino.tasks import TASKS
from m2dino.training.config import (
    RECIPES_DIR,
    TrainConfig,
    find_config,
    parse_args,
    read_config,
    recipe_names,
    save_config,
)

ROOT = Path(__file__).resolve().parents[2]
PAPER_RECIPES = ["m2dino_vits16_fmuia", "m2dino_vitb16_fmuia", "m2dino_vitl16_fmuia"]


def expected_backbone_params(preset: str, num_tasks: int, num_experts: int, moe_layers: int) -> int:
    """Parameters of a GELU-MLP DINOv3 ViT whose last `moe_layers` MLPs are task-routed MoEs,
    counted from the preset's shapes alone: tokens, patch conv, blocks, final norm."""
    p = PRESETS[preset]
    d, depth, hidden = p.embed_dim, p.depth, int(p.embed_dim * p.mlp_ratio)
    assert p.ffn == "mlp"
    tokens = d + 4 * d + d                                   # cls, 4 storage, mask
    patch = 3 * p.patch_size ** 2 * d + d
    attention = (3 * d * d + 3 * d) + (d * d + d)            # qkv, proj
    norms_and_scales = 2 * (2 * d) + 2 * d                   # norm1, norm2, ls1, ls2
    mlp = (d * hidden + hidden) + (hidden * d + d)
    moe = num_experts * mlp + num_tasks * num_experts * (d + 1)  # experts + one router per task
    return (tokens + patch + depth * (attention + norms_and_scales) + (depth - moe_layers) * mlp
            + moe_layers * moe + 2 * d)


def test_the_recipes_are_shipped_and_found_by_name(tmp_path, monkeypatch):
    assert set(recipe_names()) >= {"demo_cpu", *PAPER_RECIPES}
    assert RECIPES_DIR.resolve() == (ROOT / "configs").resolve()  # the package's recipes are configs/ itself
    monkeypatch.chdir(tmp_path)  # found by name from anywhere, .yaml or not; a path works too
    assert find_config("m2dino_vitb16_fmuia") == find_config("m2dino_vitb16_fmuia.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("epochs: 3\n")
    assert parse_args(["--config", str(own)]).epochs == 3
    with pytest.raises(FileNotFoundError, match=r"m2dino_vitx16.*recipes: .*demo_cpu"):
        parse_args(["--config", "m2dino_vitx16"])


def test_demo_recipe_is_the_builtin_default_field_by_field():
    demo = parse_args(["--config", "demo_cpu"])
    assert demo.to_dict() == TrainConfig().to_dict() == parse_args([]).to_dict()


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_builds_its_model_on_meta(name, tmp_path):
    config = parse_args(["--config", name])
    model_config = config.model
    assert model_config.moe_layers == 6 and model_config.name == f"dinov3_{name.split('_')[1]}"
    assert config.amp == "bf16" and config.epochs > 1 and config.head_lr_mult > 1
    assert read_config(save_config(config, tmp_path / "config.yaml")) == config  # what the run saves reads back
    tasks = sorted(TASKS)  # every FM_UIA task: the AU model, the largest of the study
    with torch.device("meta"):
        model = M2DINO(model_config, tasks)
    assert all(p.device.type == "meta" for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert backbone == expected_backbone_params(model_config.name, len(tasks), model_config.num_experts, 6)
    depth = PRESETS[model_config.name].depth
    assert model.moe_layer_indices == list(range(depth - 6, depth))


def test_an_official_preset_without_a_recipe_gets_the_paper_architecture():
    assert parse_args(["--model", "dinov3_vitb16"]).model == parse_args(["--config", "m2dino_vitb16_fmuia"]).model
    assert parse_args(["--model", "dinov3_vitb16", "--top-k", "1"]).model.top_k == 1  # a flag still wins
    plain = parse_args(["--model", "dinov3_vith16plus"]).model  # no recipe: M2DINO's defaults
    assert plain == M2DINOConfig(name="dinov3_vith16plus") and plain.resolved().img_size == 224
    assert parse_args(["--model", "dinov3_tiny"]).model == TrainConfig().model  # the demo's


def test_every_recipe_says_what_it_is_for_and_needs():
    for name in recipe_names():
        header = [line for line in (RECIPES_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        text = " ".join(header).lower()
        assert header and header[0].startswith(f"# {name}:"), name
        assert "needs:" in text and "for" in text, name
    for name in PAPER_RECIPES:
        text = (RECIPES_DIR / f"{name}.yaml").read_text()
        assert "paper" in text and "ours" in text and "--pretrained" in text and "80 GB" in text


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_says_which_weights_it_needs_and_refuses_to_start_without_them(name):
    """The header names the official file of its preset and where Meta publishes it; the run's
    check stops without --pretrained unless --from-scratch, naming the same."""
    from m2dino.models.pretrained import OFFICIAL_FILES, RELEASE_PAGE
    from m2dino.training.study import check_pretrained

    config = parse_args(["--config", name])
    header = "".join(line for line in find_config(name).read_text().splitlines(keepends=True)
                     if line.startswith("#"))
    official = OFFICIAL_FILES[config.model.name]
    assert official in header and RELEASE_PAGE in header and "--from-scratch" in header
    with pytest.raises(ValueError, match=official) as err:
        check_pretrained(config)
    assert RELEASE_PAGE in str(err.value) and "--from-scratch" in str(err.value)
    check_pretrained(parse_args(["--config", name, "--from-scratch"]))  # random weights on purpose: allowed
    check_pretrained(parse_args([]))  # the demo's own preset has no release: nothing needed
