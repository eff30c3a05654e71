"""Parameter groups: layer-wise LR decay by module (DINOv3's rule), weight decay by kind,
every parameter in exactly one group, and layer_decay = 1 giving training's groups as they were."""
import pytest
import torch

from m2dino.models.m2dino import create_model
from m2dino.training.optimizer import param_groups

TASKS = ["breast_3cls", "IUGC", "cardiac_multi"]
LR, WD, HEAD_MULT = 1e-3, 0.05, 3.0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("dinov3_tiny", TASKS, num_experts=4, top_k=2, moe_layers=2, neck_channels=16)


def _expected_rate(name: str, layer_decay: float, depth: int = 6) -> float:
    """The rule from its definition, on parameter names (independent of the module walk)."""
    if not name.startswith("backbone."):
        return LR * HEAD_MULT
    local = name[len("backbone."):]
    if local.startswith(("cls_token", "storage_tokens", "mask_token", "patch_embed.", "rope_embed.")):
        return LR * layer_decay ** (depth + 1)
    if local.startswith("blocks."):
        return LR * layer_decay ** (depth - int(local.split(".")[1]))
    assert local.startswith("norm."), name
    return LR


def _where(groups) -> dict[int, list[dict]]:
    found = {}
    for group in groups:
        for p in group["params"]:
            found.setdefault(id(p), []).append(group)
    return found


@pytest.mark.parametrize("layer_decay", [0.65, 0.9])
def test_every_parameter_in_exactly_one_group_at_the_rate_the_rule_gives(model, layer_decay):
    groups = param_groups(model, LR, WD, head_lr_mult=HEAD_MULT, layer_decay=layer_decay)
    found = _where(groups)
    names = dict(model.named_parameters())
    assert set(found) == {id(p) for p in names.values()}
    assert all(len(g) == 1 for g in found.values())
    for name, p in names.items():
        group = found[id(p)][0]
        assert group["lr"] == pytest.approx(_expected_rate(name, layer_decay), rel=1e-12), name
        expected_wd = 0.0 if (p.ndim <= 1 or "token" in name) else WD
        assert group["weight_decay"] == expected_wd, name
    # the MoE's experts and routers decay with their block; the embeddings are the lowest
    by_name = {n: found[id(p)][0] for n, p in names.items()}
    assert by_name["backbone.blocks.5.mlp.gate_weight"]["lr"] == pytest.approx(LR * layer_decay)
    assert by_name["backbone.blocks.4.mlp.fc1_weight"]["lr"] == pytest.approx(LR * layer_decay ** 2)
    assert by_name["backbone.blocks.4.mlp.fc1_weight"] is by_name["backbone.blocks.4.attn.qkv.weight"]
    lowest = min(g["lr"] for g in groups)
    assert by_name["backbone.patch_embed.proj.weight"]["lr"] == lowest == by_name["backbone.cls_token"]["lr"]
    assert lowest == pytest.approx(LR * layer_decay ** 7)
    # one group per (layer, decay kind) in layer order, then the head groups; names say which
    assert [g["name"] for g in groups][:3] == ["backbone.layer00", "backbone.layer00_no_decay", "backbone.layer01"]
    assert [g["name"] for g in groups][-2:] == ["head", "head_no_decay"]
    torch.optim.AdamW(groups, lr=LR, weight_decay=WD)  # a valid optimizer input


def _training_groups_before(model, freeze_backbone=False):
    """Training's parameter groups as the trainer built them before layer decay existed."""
    groups = {}
    for name, p in model.named_parameters():
        in_backbone = name.startswith("backbone.")
        is_moe = ".mlp." in name and any(k in name for k in ("gate_", "fc1_", "fc2_"))
        if freeze_backbone and in_backbone and not is_moe:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        head = not in_backbone
        no_decay = p.ndim <= 1 or "token" in name or name.endswith("periods")
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": LR * (HEAD_MULT if head else 1.0),
                           "weight_decay": 0.0 if no_decay else WD,
                           "name": f"{'head' if head else 'backbone'}{'_no_decay' if no_decay else ''}"}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_layer_decay_one_gives_trainings_groups_as_they_were(freeze_backbone):
    built = []
    for build in (_training_groups_before, None):
        torch.manual_seed(0)
        model = create_model("dinov3_tiny", TASKS, num_experts=4, top_k=2, moe_layers=2, neck_channels=16)
        if build is None:
            groups = param_groups(model, LR, WD, head_lr_mult=HEAD_MULT, layer_decay=1.0,
                                  freeze_backbone=freeze_backbone)
        else:
            groups = build(model, freeze_backbone)
        names = {id(p): n for n, p in model.named_parameters()}
        built.append([(g["name"], g["lr"], g["weight_decay"], [names[id(p)] for p in g["params"]])
                      for g in groups])
        frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
        built[-1].append(frozen)
    assert built[1] == built[0]
    names = ["backbone", "head", "head_no_decay"] if freeze_backbone else \
        ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert [g[0] for g in built[1][:-1]] == names
    if freeze_backbone:  # the dense backbone frozen, its MoE layers (all 2-d or more) training
        assert "backbone.blocks.0.attn.qkv.weight" in built[1][-1]
        assert not any(".mlp.gate_" in n or ".mlp.fc1_" in n for n in built[1][-1])


def test_bad_layer_decay_and_nothing_to_train(model):
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
            param_groups(model, LR, WD, layer_decay=bad)
    frozen = create_model("dinov3_tiny", TASKS[:1], moe_layers=0, neck_channels=16)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, LR, WD)
