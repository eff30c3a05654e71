"""Regional compilation: torch.compile on each transformer block of the backbone, in place.

    compile_blocks(model)        # before the first forward (and before DDP wraps the model)

The blocks are where the time goes and they repeat, so compiling them one by one (as torchtitan
does) gets most of a whole-model compile's speed-up for a bounded compile time: the dense blocks
share one compiled graph, the MoE blocks another (`torch.compile` reuses a graph across modules
of the same code whose parameters it treats as inputs), whatever the depth; the neck and the
heads, whose batch rows change with the batch's task mix, stay eager. `nn.Module.compile` keeps
the module and its state-dict names as they are: checkpoints, EMA, DDP and gradient checkpointing
see the same model. The MoE's custom ops have fake (meta) implementations, so the blocks compile
whole (`fullgraph=True`: a graph break would be an error, not a silent slowdown).
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, fullgraph: bool = True, dynamic: bool | None = None,
                   mode: str | None = None) -> int:
    """Compile every block of `model.backbone.blocks` (or `model.blocks`) in place with
    torch.compile(fullgraph, dynamic, mode); returns how many. The first forward (and backward)
    of each distinct block pays the compile time."""
    backbone = getattr(model, "backbone", model)
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise TypeError(f"compile_blocks needs a model with backbone.blocks (or blocks), got {type(model).__name__}")
    for block in blocks:
        block.compile(fullgraph=fullgraph, dynamic=dynamic, mode=mode)
    return len(blocks)
