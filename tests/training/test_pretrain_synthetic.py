"""The synthetic pretrained start: the shipped file loads through the real --pretrained path with
the preset's keys and shapes, its recorded recipe reproduces its first training step on this
code, and the command (a short run of the same code path) is deterministic and safe."""
import json

import numpy as np
import pytest
import torch

from m2dino.data.synthetic import GENERATOR_VERSION, PRETRAINED_WEIGHTS, pool_batch
from m2dino.models import M2DINOConfig
from m2dino.models.backbone import PRESETS
from m2dino.models.m2dino import M2DINO
from m2dino.models.weights import _expected_shapes, build_backbone, presets_fitting, read_state_dict
from m2dino.training.pretrain_synthetic import Recipe, epoch_order, main, read_provenance, start


def test_the_shipped_start_loads_through_the_real_loader():
    """Official DINOv3 keys and the dinov3_tiny shapes, a few MB, parameters in fp16 that the
    model casts on loading, and it goes through M2DINO's `pretrained` (what --pretrained calls)."""
    assert PRETRAINED_WEIGHTS.is_file() and PRETRAINED_WEIGHTS.stat().st_size < 4e6
    state = read_state_dict(PRETRAINED_WEIGHTS)
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_shapes(PRESETS["dinov3_tiny"])
    assert presets_fitting(state) == ["dinov3_tiny"]
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.float16
    assert state["rope_embed.periods"].dtype == torch.float32
    backbone = build_backbone("dinov3_tiny", weights=PRETRAINED_WEIGHTS)
    for key, value in backbone.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key].float()), key
    assert state["mask_token"].abs().sum() > 0  # trained by the masked-image objective
    config = M2DINOConfig(name="dinov3_tiny", num_experts=4, top_k=2, moe_layers=2, img_size=64)
    model = M2DINO(config, ["fetal_head", "breast_2cls"], pretrained=PRETRAINED_WEIGHTS).eval()
    assert torch.equal(model.backbone.patch_embed.proj.weight, backbone.patch_embed.proj.weight)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), model.task_index(["fetal_head", "breast_2cls"]))
    assert all(torch.isfinite(v).all() for task in out["tasks"].values() for k, v in task.items() if k != "indices")


def test_the_shipped_start_records_how_it_was_made():
    info = read_provenance(PRETRAINED_WEIGHTS)
    assert info == json.loads(PRETRAINED_WEIGHTS.with_suffix(".json").read_text())
    assert info["command"].startswith("python -m m2dino.training.pretrain_synthetic --out ")
    assert info["preset"] == "dinov3_tiny" and info["commit"] and info["threads"] >= 1
    # a generator change changes the pool: the shipped start must then be made again
    assert info["generator_version"] == GENERATOR_VERSION
    recipe = Recipe(**info["recipe"])
    assert recipe.problems() == [] and len(info["epoch_loss"]) == recipe.epochs
    assert info["epoch_loss"][-1] < 0.9 * info["epoch_loss"][0]  # it learnt


def test_the_recorded_recipe_reproduces_the_shipped_first_step():
    """The initialisation, the pool, the first batch's views and masks and the loss: the first
    step of the shipped run, recomputed here from its recipe, gives the loss it recorded."""
    info = read_provenance(PRETRAINED_WEIGHTS)
    recipe = Recipe(**info["recipe"])
    batch = torch.from_numpy(pool_batch(epoch_order(recipe, 0)[:recipe.batch_size].tolist(), recipe.seed,
                                        recipe.img_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(info["threads"])
    try:
        model, generator = start(recipe)
        with torch.no_grad():
            loss = model.loss(batch, generator).item()
    finally:
        torch.set_num_threads(threads)
    assert loss == pytest.approx(info["first_step_loss"], rel=1e-4)


SHORT = ["--images", "24", "--epochs", "2", "--batch-size", "8", "--workers", "1"]


def test_a_short_pretraining_is_deterministic_loads_and_never_overwrites(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["--out", str(a), *SHORT]) == 0 and main(["--out", str(b), *SHORT]) == 0
    first, second = read_state_dict(a), read_state_dict(b)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    build_backbone("dinov3_tiny", weights=a)
    info = read_provenance(a)
    assert info["recipe"]["images"] == 24 and info["steps"] == 6 and len(info["epoch_loss"]) == 2
    other = read_provenance(b)
    for key in ("recipe", "first_step_loss", "epoch_loss", "steps", "generator_version"):
        assert info[key] == other[key], key
    with pytest.raises(SystemExit):  # an existing file is refused ...
        main(["--out", str(a), *SHORT])
    assert "exists" in capsys.readouterr().err
    assert main(["--out", str(a), "--overwrite", *SHORT, "--seed", "1"]) == 0  # ... or moved aside
    kept = list(tmp_path.glob("a.old-*.safetensors"))
    assert len(kept) == 1 and kept[0].with_suffix(".json").is_file()
    assert all(torch.equal(read_state_dict(kept[0])[k], first[k]) for k in first)
    assert not torch.equal(read_state_dict(a)["patch_embed.proj.weight"], first["patch_embed.proj.weight"])


@pytest.mark.parametrize("argv, message", [
    (["--mask-ratio", "1.5"], "--mask-ratio"), (["--epochs", "0"], "--epochs"), (["--threads", "0"], "--threads")])
def test_impossible_recipes_are_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "w.safetensors"), *argv])
    assert message in capsys.readouterr().err and not (tmp_path / "w.safetensors").exists()


def test_masks_hide_the_recipes_share_in_blocks():
    from m2dino.training.pretrain_synthetic import block_masks

    recipe = Recipe(mask_ratio=0.5, mask_block=2)
    masks = block_masks(5, 8, recipe, torch.Generator().manual_seed(0))
    assert masks.shape == (5, 64) and (masks.sum(1) == 32).all()
    grid = masks.view(5, 4, 2, 4, 2)  # every 2x2 block all hidden or all shown
    assert ((grid.all(dim=(2, 4))) | (~grid.any(dim=(2, 4)))).all()
    assert np.unique(masks.numpy(), axis=0).shape[0] == 5
