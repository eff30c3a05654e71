"""M2DINO end to end on the CPU preset: mixed batches, gradients, postprocess, save/load."""
import json

import numpy as np
import pytest
import torch

import m2dino
from m2dino.models.m2dino import create_model, load_model, save_model
from m2dino.tasks import TaskSpec
from m2dino.training import losses

TASK_IDS = ["cardiac_multi", "breast_3cls", "IUGC", "thyroid_nodule_det"]
SIZE = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dinov3_tiny", TASK_IDS, num_experts=4, top_k=2, moe_layers=3,
                        neck_channels=16)


def _batch(order=(0, 1, 2, 3, 0, 2)):
    images = torch.randn(len(order), 3, SIZE, SIZE)
    targets = []
    for i in order:
        if i == 0:
            targets.append({"mask": torch.randint(0, 4, (SIZE, SIZE))})
        elif i == 1:
            targets.append({"label": torch.tensor(2)})
        elif i == 2:
            targets.append({"points": torch.rand(3, 2)})
        else:
            targets.append({"box": torch.tensor([0.1, 0.2, 0.5, 0.7])})
    return images, torch.tensor(order), targets


def test_create_model_from_registry_ids_and_specs(model):
    assert [t.task_id for t in model.tasks] == TASK_IDS
    assert model.moe_layer_indices == [3, 4, 5]
    assert torch.equal(model.task_index(["IUGC", "cardiac_multi"]), torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"\['lung'\] are not tasks of this model"):
        model.task_index(["lung"])
    custom = create_model("dinov3_tiny", [TaskSpec("my_task", "classification", 5)],
                          moe_layers=1, num_experts=2)
    assert custom.heads["my_task"].linear.out_features == 5
    with pytest.raises(ValueError, match="listed twice"):
        create_model("dinov3_tiny", ["IUGC", "IUGC"])
    with pytest.raises(ValueError, match="unknown backbone preset"):
        create_model("dinov3_giant", TASK_IDS)


def test_mixed_batch_outputs_follow_design(model):
    images, task_ids, _ = _batch()
    model.eval()
    with torch.no_grad():
        out = model(images, task_ids)
    assert set(out) == {"tasks", "aux"}
    assert set(out["aux"]) == {"load_balance", "z_loss", "mutual_information", "global_load_balance"}
    seg, cls, reg, det = (out["tasks"][t] for t in TASK_IDS)
    assert torch.equal(seg["indices"], torch.tensor([0, 4]))
    assert seg["logits"].shape == (2, 4, SIZE, SIZE)
    assert cls["logits"].shape == (1, 3)
    assert reg["heatmaps"].shape == (2, 3, SIZE // 4, SIZE // 4)
    assert reg["points"].shape == (2, 3, 2)
    assert det["heatmap"].shape == (1, 1, 8, 8) and det["size"].shape == (1, 2, 8, 8)
    assert det["offset"].shape == (1, 2, 8, 8)
    assert det["boxes"].shape == (1, 4) and det["scores"].shape == (1,)
    # a mixed batch gives each sample what a batch of that sample alone gives
    with torch.no_grad():
        alone = model(images[4:5], task_ids[4:5])["tasks"]["cardiac_multi"]["logits"]
    torch.testing.assert_close(alone[0], seg["logits"][1], atol=1e-4, rtol=1e-4)
    features = model.forward_features(images, task_ids)
    assert features["x_norm_patchtokens"].shape == (6, 16, 96)


def test_mixed_batch_backward_reaches_every_parameter(model):
    images, task_ids, targets = _batch()
    model.train()
    model.zero_grad()
    out = model(images, task_ids)
    loss, logs = losses.total_loss(out, targets, model.tasks)
    assert torch.isfinite(loss)
    assert set(logs) == set(TASK_IDS) | {"aux/load_balance", "aux/z_loss",
                                         "aux/mutual_information", "aux/global_load_balance"}
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    # everything that influenced the loss has a non-zero gradient (mask_token only feeds
    # masked pretraining and is kept in the graph with weight 0)
    zero = [n for n, p in model.named_parameters()
            if not torch.count_nonzero(p.grad) and n != "backbone.mask_token"]
    assert zero == []


def test_absent_tasks_keep_ddp_happy(model):
    """A batch of one classification task: other heads and the neck get zero, not None."""
    images, task_ids, targets = _batch(order=(1, 1))
    model.train()
    model.zero_grad()
    out = model(images, task_ids)
    assert "unused_anchor" in out
    loss, _ = losses.total_loss(out, targets, model.tasks)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert torch.count_nonzero(model.heads["cardiac_multi"].classifier.weight.grad) == 0
    assert torch.count_nonzero(model.heads["breast_3cls"].linear.weight.grad) > 0


def test_postprocess_in_original_pixels(model):
    images, task_ids, _ = _batch()
    model.eval()
    with torch.no_grad():
        out = model(images, task_ids)
    sizes = [(50, 70), (40, 40), (100, 60), (80, 120), (33, 17), (64, 64)]
    preds = model.postprocess(out, sizes)
    assert len(preds) == 6
    assert preds[0]["mask"].shape == (50, 70) and preds[0]["mask"].dtype == np.uint8
    assert preds[4]["mask"].shape == (33, 17) and preds[4]["mask"].max() < 4
    assert preds[1]["probs"].shape == (3,)
    assert abs(preds[1]["probs"].sum() - 1) < 1e-5
    assert preds[1]["predicted_class"] == int(np.argmax(preds[1]["probs"]))
    box = np.array(preds[3]["bbox_normalized"])
    np.testing.assert_allclose(preds[3]["bbox_pixels"], box * [120, 80, 120, 80], rtol=1e-6)
    assert 0.0 <= preds[3]["score"] <= 1.0
    np.testing.assert_allclose(preds[2]["points_pixels"],
                               preds[2]["points_normalized"] * [60, 100], rtol=1e-6)
    assert preds[5]["points_pixels"].shape == (3, 2)
    with pytest.raises(ValueError, match="orig_sizes has 2 entries for a batch of 6"):
        model.postprocess(out, sizes[:2])


def test_expert_usage_accumulates_and_resets(model):
    images, task_ids, _ = _batch()
    model.eval()
    model.reset_expert_usage()
    with torch.no_grad():
        model(images, task_ids)
        model(images, task_ids)
    usage = model.expert_usage()
    assert sorted(usage) == [3, 4, 5]
    tokens = 5 + (SIZE // 8) ** 2
    for counts in usage.values():
        assert counts.shape == (4, 4)
        # 2 passes x images of each task x tokens x top_k
        torch.testing.assert_close(counts.sum(1), torch.tensor([2, 1, 2, 1]) * 2 * tokens * 2)
    model.reset_expert_usage()
    assert model.expert_usage() == {}


def test_save_load_round_trip(model, tmp_path):
    images, task_ids, _ = _batch()
    model.eval()
    with torch.no_grad():
        expected = model(images, task_ids)
    weights, config = save_model(model, tmp_path / "run" / "best")
    assert weights.name == "best.safetensors" and config.name == "best.json"
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.json", "best.safetensors"]
    assert json.loads(config.read_text())["tasks"][0]["task_id"] == "cardiac_multi"
    loaded = load_model(tmp_path / "run" / "best.safetensors").eval()
    assert [t.task_id for t in loaded.tasks] == TASK_IDS
    with torch.no_grad():
        got = loaded(images, task_ids)
    for task_id in TASK_IDS:
        for key, value in expected["tasks"][task_id].items():
            torch.testing.assert_close(got["tasks"][task_id][key], value, atol=0, rtol=0)


def test_load_errors_name_the_file(model, tmp_path):
    weights, config = save_model(model, tmp_path / "ckpt")
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(m2dino.WeightsError, match=r"ckpt\.safetensors.*truncated or corrupt"):
        load_model(tmp_path / "ckpt")
    save_model(model, tmp_path / "ckpt")
    cfg = json.loads(config.read_text())
    cfg["num_experts"] = 3
    config.write_text(json.dumps(cfg))
    with pytest.raises(m2dino.WeightsError, match=r"do not match its config.*gate_weight"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(m2dino.WeightsError, match="does not exist"):
        load_model(tmp_path / "nothing")


def test_pretrained_backbone_loads_before_upcycling(tmp_path):
    source = m2dino.dinov3_tiny()
    with torch.no_grad():
        source.blocks[5].mlp.fc1.weight.normal_()
    path = tmp_path / "dinov3_tiny_pretrain.pth"
    torch.save(source.state_dict(), path)
    model = create_model("dinov3_tiny", ["IUGC"], pretrained=path, num_experts=2, moe_layers=2)
    experts = model.backbone.blocks[5].mlp.fc1_weight
    for e in range(2):
        torch.testing.assert_close(experts[e], source.blocks[5].mlp.fc1.weight)
    torch.testing.assert_close(model.backbone.cls_token, source.cls_token)


@pytest.mark.slow
def test_mixed_batch_overfits():
    torch.manual_seed(0)
    net = create_model("dinov3_tiny", TASK_IDS, num_experts=4, moe_layers=3, neck_channels=16)
    images, task_ids, targets = _batch(order=(0, 1, 2, 3))
    targets[0] = {"mask": (torch.arange(SIZE)[None, :] >= 16).long().expand(SIZE, SIZE) * 2}
    optimiser = torch.optim.AdamW(net.parameters(), lr=4e-3)
    net.train()
    first = None
    for _ in range(20):
        loss, logs = losses.total_loss(net(images, task_ids), targets, net.tasks,
                                       aux_weights={})
        first = float(loss.detach()) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss) < 0.3 * first, (first, {k: float(v) for k, v in logs.items()})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    net = create_model("dinov3_tiny", TASK_IDS, num_experts=4, moe_layers=2, neck_channels=8)
    images, task_ids, targets = _batch(order=(0, 1, 2, 3))
    net.train()

    def gradients():
        net.zero_grad()
        net.reset_expert_usage()
        loss, _ = losses.total_loss(net(images, task_ids), targets, net.tasks)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    plain_loss, plain = gradients()
    plain_usage = net.expert_usage()
    net.backbone.set_grad_checkpointing(True)
    ckpt_loss, ckpt = gradients()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # recomputation in the backward pass does not count the tokens twice
    for index, counts in net.expert_usage().items():
        assert torch.equal(counts, plain_usage[index])


def test_bfloat16_model_close_to_fp32(model):
    images, task_ids, _ = _batch(order=(0, 1, 2, 3))
    model.eval()
    with torch.no_grad():
        reference = model(images, task_ids)
        low = create_model("dinov3_tiny", TASK_IDS, num_experts=4, top_k=2, moe_layers=3,
                           neck_channels=16)
        low.load_state_dict(model.state_dict())
        low = low.to(torch.bfloat16).eval()
        out = low(images.bfloat16(), task_ids)
    torch.testing.assert_close(out["tasks"]["breast_3cls"]["logits"].float(),
                               reference["tasks"]["breast_3cls"]["logits"], atol=0.05, rtol=0.05)
    torch.testing.assert_close(out["tasks"]["IUGC"]["points"].float(),
                               reference["tasks"]["IUGC"]["points"], atol=0.01, rtol=0)


def test_the_model_is_built_from_one_config(tmp_path):
    config = m2dino.M2DINOConfig(name="dinov3_tiny", num_experts=3, top_k=1, moe_layers=2, neck_channels=8,
                                 neck_layers=(1, 2, 4, 5), router_init_std=0.05, rope_rescale_coords=2.0,
                                 backbone_overrides={"layerscale_init": 1e-3})
    torch.manual_seed(0)
    direct = m2dino.M2DINO(config, ["fetal_head"])
    torch.manual_seed(0)
    made = create_model("dinov3_tiny", ["fetal_head"], num_experts=3, top_k=1, moe_layers=2, neck_channels=8,
                        neck_layers=[1, 2, 4, 5], router_init_std=0.05, rope_rescale_coords=2.0,
                        backbone_overrides={"layerscale_init": 1e-3})
    assert direct.config == made.config == m2dino.M2DINOConfig(**{**config.to_dict(), "img_size": 64})
    for (name, a), (_, b) in zip(direct.state_dict().items(), made.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert direct.backbone.blocks[0].ls1.gamma.flatten()[0].item() == pytest.approx(1e-3)
    assert direct.moe_layer_indices == [4, 5] and direct.neck_layers == [1, 2, 4, 5]
    save_model(direct, tmp_path / "m")
    saved = json.loads((tmp_path / "m.json").read_text())
    # the key layout of every checkpoint written before the config was a dataclass
    assert list(saved) == ["format_version", "name", "tasks", "num_experts", "top_k", "moe_layers", "img_size",
                           "neck_channels", "neck_layers", "router_init_std", "rope_rescale_coords",
                           "backbone_overrides", "pretrained"]  # then where the weights started
    assert load_model(tmp_path / "m").config == direct.config
    with pytest.raises(TypeError, match="neck_channel"):
        create_model("dinov3_tiny", ["fetal_head"], neck_channel=8)
    with pytest.raises(ValueError, match="moe_layers"):
        m2dino.M2DINO(m2dino.M2DINOConfig(moe_layers=9), ["fetal_head"])
    with pytest.raises(TypeError, match="M2DINOConfig"):
        m2dino.M2DINO("dinov3_tiny", ["fetal_head"])


def test_a_checkpoint_config_that_is_not_a_model_names_the_file(model, tmp_path):
    _, config = save_model(model, tmp_path / "ckpt")
    cfg = json.loads(config.read_text())
    cfg["backbone_overrides"] = {"depht": 4}
    config.write_text(json.dumps(cfg))
    with pytest.raises(m2dino.WeightsError, match=r"ckpt\.json does not describe a model.*depht"):
        load_model(tmp_path / "ckpt")
