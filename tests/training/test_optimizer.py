"""The parameter groups alone: rates and weight decay per group, the frozen backbone whose MoE
layers (found by module type, whatever they are called) keep training."""
from types import SimpleNamespace

import pytest
import torch

from m2dino.models.moe import TaskMoE
from m2dino.training.optimizer import build_optimizer, param_groups


class Block(torch.nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)
        self.mlp = TaskMoE(4, 8, num_tasks=2, num_experts=2, top_k=1) if moe else torch.nn.Linear(4, 4)


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.blocks = torch.nn.ModuleList([Block(moe=False), Block(moe=True)])


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = torch.nn.Linear(4, 3)


def config(**kw):
    return SimpleNamespace(**{"lr": 1e-3, "head_lr_mult": 10.0, "weight_decay": 0.05, "freeze_backbone": False,
                              "layer_decay": 1.0, **kw})


def groups_of(model, c):
    return param_groups(model, c.lr, c.weight_decay, c.head_lr_mult, c.layer_decay, c.freeze_backbone)


def test_groups_rates_and_decay():
    model = Model()
    groups = {g["name"]: g for g in groups_of(model, config())}
    assert list(groups) == ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    assert groups["backbone"]["lr"] == 1e-3 and groups["head"]["lr"] == pytest.approx(1e-2)
    assert groups["backbone"]["weight_decay"] == 0.05 and groups["head_no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert id(model.backbone.cls_token) in no_decay and id(model.backbone.blocks[0].norm.weight) in no_decay
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once


def test_a_frozen_backbone_keeps_its_moe_layers_training_by_module_type():
    model = Model()
    # the MoE's parameters are found by the module's type: a name of its own changes nothing
    model.backbone.blocks[1].add_module("experts_renamed", model.backbone.blocks[1].mlp)
    del model.backbone.blocks[1].mlp
    groups = groups_of(model, config(freeze_backbone=True))
    trained = {id(p) for g in groups for p in g["params"]}
    moe = model.backbone.blocks[1].experts_renamed
    assert trained == {id(p) for p in [*moe.parameters(), *model.head.parameters()]}
    assert not any(p.requires_grad for p in model.backbone.blocks[0].parameters())


def test_nothing_trainable_is_an_error():
    model = Model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, config())
