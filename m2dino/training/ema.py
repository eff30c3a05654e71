"""An exponential moving average of a model's weights, for evaluation and for saving.

    ema = ModelEMA(model, decay=0.999)        # a frozen copy of the model, on its device
    ...optimizer.step(); ema.update(model)    # after every step that was taken
    validate(ema.module)                      # the averaged model (an M2DINO: save_model works)
    state = ema.state_dict(); ema.load_state_dict(state)   # exact resume

torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn does the averaging (one foreach
lerp per device and dtype): the first update copies the weights, every later one sets
ema = decay * ema + (1 - decay) * weights. Buffers are not averaged but copied from the model at
every update (`use_buffers=False`): M2DINO's are constants (RoPE periods, the qkv bias mask),
and it has no batch norm whose running statistics would want averaging.

The state (`state_dict`) holds the decay, the number of updates and the averaged weights under
the model's own state-dict names, all tensors or plain numbers (a weights_only torch.load reads
it back). Restoring it gives bit-for-bit the EMA that an uninterrupted run would have.

Data parallel: give `update` the unwrapped model (DDP's replicas are identical, so each rank
keeps the same EMA). A model sharded by FSDP2 is not supported: its parameters are DTensor
shards, which the full-size copy cannot be averaged with.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _graph_tensors(model: nn.Module) -> dict[int, None]:
    """A deepcopy memo leaving out the tensors that modules keep from their last forward with a
    graph attached (e.g. the MoE layers' aux losses): they are not weights, and a tensor with a
    graph cannot be deep-copied."""
    memo: dict[int, None] = {}
    for module in model.modules():
        for value in vars(module).values():
            for item in (value if isinstance(value, tuple) else (value,)):
                if isinstance(item, torch.Tensor) and item.grad_fn is not None:
                    memo[id(item)] = None
    return memo


class ModelEMA:
    """The exponential moving average of `model`'s weights with `decay` in (0, 1)."""

    def __init__(self, model: nn.Module, decay: float):
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if isinstance(model, AveragedModel):
            raise TypeError("ModelEMA takes the model itself, not an AveragedModel")
        self.decay = float(decay)
        copied = copy.deepcopy(model, memo=_graph_tensors(model))
        copied.requires_grad_(False)
        self._averaged = AveragedModel(copied, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False)
        self._averaged.eval()

    @property
    def module(self) -> nn.Module:
        """The averaged model (in eval mode; its parameters need no gradient)."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        return int(self._averaged.n_averaged)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights (the first update copies them)."""
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self._averaged.n_averaged.detach().clone(),
                "weights": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count (strictly: every name and shape
        must match). The decay stays this EMA's own: whether it may differ from the saved one
        (`state["decay"]`) is the caller's resume rule."""
        missing = {"updates", "weights"} - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)}")
        self.module.load_state_dict(state["weights"], strict=True)
        self._averaged.n_averaged.copy_(torch.as_tensor(state["updates"]))
