"""An exponential moving average of a model's weights, for evaluation and for saving.

    ema = ModelEMA(model, decay=0.999, warmup=True)   # a frozen copy of the model, on its device
    ...optimizer.step(); ema.update(model)    # after every step that was taken
    validate(ema.module)                      # the averaged model (an M2DINO: save_model works)
    state = ema.state_dict(); ema.load_state_dict(state)   # exact resume

torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn does the averaging (one foreach
lerp per device and dtype): the first update copies the weights, every later one sets
ema = decay * ema + (1 - decay) * weights. With `warmup=True` the decay of update n (counting
from 0) is min(decay, (1 + n) / (10 + n)), tf.train.ExponentialMovingAverage's num_updates rule:
the average then spans about a tenth of the steps so far until that reaches 1 / (1 - decay), so
that one decay suits the study's short single-task runs as well as its long all-task ones (a
fixed 0.999 spans 1000 steps, longer than a small task's whole run). Buffers are not averaged
but copied from the model at every update (`use_buffers=False`): M2DINO's are constants (RoPE
periods, the qkv bias mask), and it has no batch norm whose running statistics would want
averaging.

The state (`state_dict`) holds the decay, the warmup flag, the number of updates and the
averaged weights under the model's own state-dict names, all tensors or plain values (a
weights_only torch.load reads it back). Restoring it gives bit-for-bit the EMA that an
uninterrupted run would have.

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

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 < decay < 1.0):
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        if isinstance(model, AveragedModel):
            raise TypeError("ModelEMA takes the model itself, not an AveragedModel")
        self.decay, self.warmup = float(decay), bool(warmup)
        self._updates = 0  # on the host: the decay of the next update needs no device read
        copied = copy.deepcopy(model, memo=_graph_tensors(model))
        copied.requires_grad_(False)
        self._averaged = AveragedModel(copied, multi_avg_fn=self._average, use_buffers=False)
        self._averaged.eval()

    def decay_at(self, update: int) -> float:
        """The decay applied by update number `update` (0 = the first, which copies)."""
        return min(self.decay, (1 + update) / (10 + update)) if self.warmup else self.decay

    def _average(self, ema_params, model_params, n_averaged) -> None:
        get_ema_multi_avg_fn(self.decay_at(self._updates))(ema_params, model_params, n_averaged)

    @property
    def module(self) -> nn.Module:
        """The averaged model (in eval mode; its parameters need no gradient)."""
        return self._averaged.module

    @property
    def updates(self) -> int:
        return self._updates

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights (the first update copies them)."""
        self._averaged.update_parameters(model)
        self._updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self._updates,
                "weights": {k: v.detach().clone() for k, v in self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights and the update count (strictly: every name and shape
        must match). The decay and warmup stay this EMA's own: whether they may differ from the
        saved ones (`state["decay"]`, `state["warmup"]`) is the caller's resume rule."""
        missing = {"updates", "weights"} - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)}")
        updates = int(state["updates"])
        self.module.load_state_dict(state["weights"], strict=True)
        self._averaged.n_averaged.fill_(updates)
        self._updates = updates
