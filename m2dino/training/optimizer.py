"""The optimizer of one model: its parameter groups (`param_groups`, the one place that decides
each parameter's rate and weight decay) and AdamW over them (`build_optimizer`).

Parameter groups: learning rate by layer (layer-wise decay), weight decay by kind.

`param_groups(model, lr, weight_decay, head_lr_mult, layer_decay, freeze_backbone)` sorts every
trainable parameter of an M2DINO into exactly one group, by the module it belongs to:

- layer-wise learning-rate decay, DINOv3's rule (dinov3/train/param_groups.py): the backbone's
  layers are numbered 0 = the embeddings (patch embedding, class/storage/mask tokens, RoPE),
  i + 1 = block i, depth + 1 = the final norm, and layer l learns at lr * R^(depth + 1 - l): block
  i at lr * R^(depth - i), the embeddings lowest at lr * R^(depth + 1), the final norm at lr. A
  block's task-conditioned MoE (its experts and routers) is part of the block and decays with it.
- the neck and the task heads learn at lr * head_lr_mult, undecayed (they start from scratch).
- no weight decay on 1-d parameters (biases, norms, LayerScale), the learned tokens and RoPE
  periods: the trainer's rule. The MoE's stacked biases ([E, H], [T, E]) are 2-d and so are
  decayed, as they always were.
- freeze_backbone freezes the dense backbone (requires_grad False); the MoE layers keep training.

layer_decay = 1 gives the four groups training always had (backbone, backbone_no_decay, head,
head_no_decay), in that order: the optimizer's state keeps its layout, a run without the option
its results. R < 1 splits the backbone into a group per (layer, decay kind), named
"backbone.layer<l>" and "backbone.layer<l>_no_decay", in layer order, then the head groups.
Each group carries its own "lr", which a scheduler scales as it scales any group's.
"""
from __future__ import annotations

import torch
from torch import nn

from m2dino.models.moe import TaskMoE

# backbone modules of layer 0 (learn at the lowest rate): the embeddings, as DINOv3 numbers them
EMBEDDING_NAMES = ("cls_token", "storage_tokens", "mask_token", "patch_embed", "rope_embed")


def backbone_layer_ids(backbone: nn.Module) -> dict[int, int]:
    """{id(parameter): layer} over the backbone: 0 the embeddings, i + 1 block i (its MoE
    included), depth + 1 everything after the blocks (the final norm)."""
    depth = len(backbone.blocks)
    layers = {}
    for name, child in backbone.named_children():
        if name == "blocks":
            for index, block in enumerate(child):
                layers.update({id(p): index + 1 for p in block.parameters()})
        else:
            layer = 0 if name in EMBEDDING_NAMES else depth + 1
            layers.update({id(p): layer for p in child.parameters()})
    for name, param in backbone.named_parameters(recurse=False):  # the tokens
        layers[id(param)] = 0 if name in EMBEDDING_NAMES else depth + 1
    return layers


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and LayerScale (1-d), the learned tokens and RoPE periods take no weight decay."""
    return param.ndim <= 1 or "token" in name or name.endswith("periods")


def layer_lr_scale(layer: int, depth: int, layer_decay: float) -> float:
    """R^(depth + 1 - layer): 1 for the final norm, R for the last block, R^(depth+1) for the embeddings."""
    return layer_decay ** (depth + 1 - layer)


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0,
                 layer_decay: float = 1.0, freeze_backbone: bool = False) -> list[dict]:
    """AdamW parameter groups of an M2DINO (anything with a `backbone` holding `blocks`); see
    the module doc. Each group: {"params", "lr", "weight_decay", "name"}."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
    backbone = model.backbone
    depth = len(backbone.blocks)
    layers = backbone_layer_ids(backbone)
    moe = {id(p) for m in backbone.modules() if isinstance(m, TaskMoE) for p in m.parameters()}
    decaying = layer_decay != 1.0
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        in_backbone = id(param) in layers
        if freeze_backbone and in_backbone and id(param) not in moe:
            param.requires_grad_(False)
        if not param.requires_grad:
            continue
        no_decay = no_weight_decay(name, param)
        suffix = "_no_decay" if no_decay else ""
        if not in_backbone:
            key, group_lr, group_name = (True, 0, no_decay), lr * head_lr_mult, f"head{suffix}"
        elif decaying:
            layer = layers[id(param)]
            key = (False, layer, no_decay)
            group_lr = lr * layer_lr_scale(layer, depth, layer_decay)
            group_name = f"backbone.layer{layer:02d}{suffix}"
        else:
            key, group_lr, group_name = (False, 0, no_decay), lr, f"backbone{suffix}"
        if key not in groups:
            groups[key] = {"params": [], "lr": group_lr, "weight_decay": 0.0 if no_decay else weight_decay,
                           "name": group_name}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError("no trainable parameters")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model, config) -> torch.optim.AdamW:
    """AdamW over `param_groups` with the config's lr, weight_decay, head_lr_mult, layer_decay
    and freeze_backbone; ValueError when nothing is trainable."""
    groups = param_groups(model, config.lr, config.weight_decay, config.head_lr_mult,
                          config.layer_decay, config.freeze_backbone)
    # fused: one kernel over all parameters. The default per-parameter loop, and even foreach,
    # cost a large share of a small model's step on a CPU.
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)
