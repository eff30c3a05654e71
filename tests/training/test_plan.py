"""The dry run: FLOPs against closed-form counts, the MoE's active FLOPs, and the plan of a tiny
study (printed, written as plan.json, nothing else written; a model too large for the GPU stops it)."""
import json

import pytest
from torch.utils.flop_counter import FlopCounterMode

from m2dino.data import FMUIADataset, collate, load_fmuia
from m2dino.models.backbone import PRESETS, M2DINOConfig
from m2dino.models.configs import DEFAULT_AUX_WEIGHTS
from m2dino.models.m2dino import M2DINO
from m2dino.tasks import load_groups
from m2dino.train import main
from m2dino.training.config import TrainConfig
from m2dino.training.losses import total_loss
from m2dino.training.plan import PlanOptions, count_parts, count_step, fake_model, make_plan

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
SIZE = 224


def closed_form_backbone_flops(preset: str, size: int) -> float:
    """Forward + backward FLOPs of a dense GELU DINOv3 ViT per image: 2 x MACs of the linear
    layers and of attention's two matrix products, the patch conv's forward and weight grad;
    the backward pass costs twice the forward."""
    p = PRESETS[preset]
    d, depth, hidden = p.embed_dim, p.depth, int(p.embed_dim * p.mlp_ratio)
    patches = (size // p.patch_size) ** 2
    n = patches + 5
    linear = n * (3 * d * d + d * d + 2 * d * hidden)
    attention = 2 * n * n * d
    conv = patches * d * 3 * p.patch_size ** 2
    return 3 * 2 * depth * (linear + attention) + 2 * 2 * conv


def trunk_flops(model_config: M2DINOConfig, images: int = 2) -> float:
    """Per image: the whole step's FLOPs less the head's (one classification task: no neck)."""
    model, mode = fake_model(model_config, ["breast_2cls"])
    step = count_step(model, mode, [0] * images)
    _, heads = count_parts(model, mode)
    return step.flops / images - heads["breast_2cls"]


def test_dense_vits16_flops_equal_the_closed_form():
    measured = trunk_flops(M2DINOConfig(name="dinov3_vits16", moe_layers=0, img_size=SIZE))
    assert measured == pytest.approx(closed_form_backbone_flops("dinov3_vits16", SIZE), rel=0.02)


def test_moe_flops_count_the_experts_top_k_uses():
    num_experts, top_k, moe_layers = 8, 2, 6
    dense = trunk_flops(M2DINOConfig(name="dinov3_vits16", moe_layers=0, img_size=SIZE))
    moe = trunk_flops(M2DINOConfig(name="dinov3_vits16", num_experts=num_experts, top_k=top_k,
                                   moe_layers=moe_layers, img_size=SIZE))
    p = PRESETS["dinov3_vits16"]
    d, hidden, n = p.embed_dim, int(p.embed_dim * p.mlp_ratio), (SIZE // 16) ** 2 + 5
    mlp = 3 * 2 * n * 2 * d * hidden              # one MLP per token, forward + backward
    routing = 3 * 2 * n * d * num_experts         # each token against its task's router
    expected = dense + moe_layers * ((top_k - 1) * mlp + routing)
    assert moe == pytest.approx(expected, rel=0.02)
    assert moe > dense * 1.2  # the experts are counted, not skipped


MIXED = ["breast_2cls", "fetal_femur", "lung", "thyroid_nodule_det"]  # classification, landmarks, segmentation,
# detection: the TS models of breast_2cls (no neck) and lung (neck), and the AU model of all four
SMALL_MODELS = {"tiny-patch8": M2DINOConfig(name="dinov3_tiny", num_experts=4, top_k=2, moe_layers=2, img_size=64),
                "vits16-depth4": M2DINOConfig(name="dinov3_vits16", num_experts=4, top_k=2, moe_layers=2, img_size=64,
                                              backbone_overrides={"depth": 4})}


def counted_training_step(model_config: M2DINOConfig, tasks: list, batch: dict) -> float:
    """FlopCounterMode over one real training step (forward, the training loss, backward) of a
    model built for `tasks`, per image of `batch`."""
    model = M2DINO(model_config, tasks).train()
    counter = FlopCounterMode(display=False)
    with counter:
        outputs = model(batch["images"], model.task_index(batch["tasks"]))
        loss, _ = total_loss(outputs, batch["targets"], model.tasks, aux_weights=DEFAULT_AUX_WEIGHTS)
        loss.backward()
    return counter.get_total_flops() / len(batch["tasks"])


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_plan_flops_per_image_equal_a_counted_training_step(tiny_suite, name):
    """The plan's forward + backward per image for a classification-only, a segmentation and a
    mixed model against a direct count of a real step of that model: within 1%. (The neck is
    charged only to models with a spatial task.)"""
    model_config = SMALL_MODELS[name]
    data = load_fmuia(tiny_suite(MIXED, min_train=4, min_val=2))
    specs = dict(sorted(data.tasks.items()))
    dataset = FMUIADataset(data.train, specs, image_size=64, train=True)
    rows = {t: [i for i, r in enumerate(dataset.records) if r.task_id == t][:2] for t in specs}
    config = TrainConfig(model=model_config, batch_size=4)
    plan = make_plan(config, PlanOptions(), {t: len(rows[t]) for t in specs}, specs, load_groups())
    checked = {"ts/breast_2cls": ["breast_2cls"], "ts/lung": ["lung"], "au/all": MIXED}
    for model_name, tasks in checked.items():
        batch = collate([dataset[i] for t in tasks for i in rows[t]])
        counted = counted_training_step(model_config, [specs[t] for t in tasks], batch)
        assert plan["models"][model_name]["flops_per_image"] == pytest.approx(counted, rel=0.01), model_name
    no_neck, with_neck = plan["models"]["ts/breast_2cls"], plan["models"]["ts/lung"]
    assert with_neck["flops_per_image"] > no_neck["flops_per_image"] * 1.05


def test_dry_run_plans_the_study_and_writes_only_plan_json(suite, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--data", str(suite), "--out", str(out), "--dry-run", "--nproc", "2", "--assume-tflops", "100",
               "--batch-size", "4", "--epochs", "3", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "au/all" in printed and "ts/lung" in printed and "TFLOP/s" in printed
    assert sorted(p.name for p in out.iterdir()) == ["plan.json"]  # no model, checkpoint or config
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["models"]) == {"ts/breast_2cls", "ts/lung", "cg/Breast", "cg/Lung", "au/all"}
    au = plan["models"]["au/all"]
    assert au["tasks"] == sorted(TASKS) and au["images_per_step"] == 8
    assert au["steps"] == 3 * -(-au["train_images"] // 8)
    assert au["flops"] == pytest.approx(au["flops_per_image"] * au["steps"] * 8)
    assert au["parameters"]["active_per_token"] < au["parameters"]["total"]
    memory = au["memory_per_gpu"]
    assert memory["grad_checkpointing"]["activations_gib"] < memory["plain"]["activations_gib"]
    assert memory["fsdp"]["total_gib"] < memory["plain"]["total_gib"]
    assert plan["seeds"] == 3  # --seeds 0,1,2 by default: every model three times
    assert plan["total_flops"] == pytest.approx(3 * sum(m["flops"] for m in plan["models"].values()))
    assert plan["hours"] == pytest.approx(plan["total_flops"] / (100e12 * 2) / 3600)


def test_dry_run_stops_when_a_model_does_not_fit(suite, tmp_path, capsys):
    rc = main(["--data", str(suite), "--out", str(tmp_path / "run"), "--dry-run", "--paradigm", "au",
               "--gpu-memory-gb", "0.001"])
    assert rc == 1
    assert "au/all needs" in capsys.readouterr().err


def test_vitl16_recipe_plans_in_seconds_on_meta(suite, tmp_path):
    """The largest recipe: the whole plan comes from fake tensors (nothing allocated)."""
    rc = main(["--config", "m2dino_vitl16_fmuia", "--data", str(suite), "--out", str(tmp_path / "l"),
               "--dry-run", "--nproc", "8", "--paradigm", "au", "--from-scratch"])
    assert rc == 0
    plan = json.loads((tmp_path / "l" / "plan.json").read_text())
    assert plan["model"]["name"] == "dinov3_vitl16" and plan["models"]["au/all"]["parameters"]["total"] > 3e8


@pytest.mark.slow
def test_plan_counts_the_fine_tuning_options(suite, tmp_path, capsys):
    """--grad-accum keeps the step's images and cuts the activations to a micro-batch's; --ema
    adds an fp32 copy of the weights; --drop-path lowers the backbone's FLOPs (the kept samples);
    a study that does not fit is told the --grad-accum with which it would."""
    def plan_of(name, *flags):
        rc = main(["--data", str(suite), "--out", str(tmp_path / name), "--dry-run", "--paradigm", "au",
                   "--batch-size", "8", "--no-progress", *flags])
        assert rc == 0
        return json.loads((tmp_path / name / "plan.json").read_text())["models"]["au/all"]
    base = plan_of("base")
    accum = plan_of("accum", "--grad-accum", "4")
    assert accum["images_per_step"] == base["images_per_step"] == 8 and accum["micro_batch"] == 2
    assert accum["steps"] == base["steps"]
    plain, cut = base["memory_per_gpu"]["plain"], accum["memory_per_gpu"]["plain"]
    # a quarter of the images; the per-pass tensors (RoPE tables, routing plans) do not shrink
    assert plain["activations_gib"] / 4 < cut["activations_gib"] < plain["activations_gib"] / 2
    ema = plan_of("ema", "--ema", "0.999")["memory_per_gpu"]["plain"]
    assert ema["ema_gib"] == pytest.approx(4 * base["parameters"]["total"] / 2**30) and plain["ema_gib"] == 0
    assert ema["total_gib"] == pytest.approx(plain["total_gib"] + ema["ema_gib"])
    dropped = plan_of("drop", "--drop-path", "0.5")
    assert dropped["flops_per_image"] < 0.8 * base["flops_per_image"]
    assert "--drop-path 0.5" in capsys.readouterr().out
    # a limit between one micro-batch of 2 and the whole batch of 8: --grad-accum 4 fits it
    limit = (plain["total_gib"] - plain["activations_gib"] * 0.7) / 0.9
    rc = main(["--data", str(suite), "--out", str(tmp_path / "tight"), "--dry-run", "--paradigm", "au",
               "--batch-size", "8", "--gpu-memory-gb", str(limit), "--no-progress"])
    assert rc == 1
    assert "--grad-accum" in capsys.readouterr().err
