"""Inter-task affinity on the shared parameters, measured at one training step (the probe).

Two measures per ordered task pair (i, j), on ONE batch that holds both tasks' images (the
trainer's mixed batch), at the model's current parameters theta:
- lookahead affinity (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task Groupings for
  Multi-Task Learning", TAG): Z[i, j] = 1 - L_j(theta_s - lr * g_i) / L_j(theta_s), where g_i
  is the gradient of task i's loss on the shared parameters theta_s and lr the backbone's
  current learning rate. An SGD step, as in the paper, whatever the optimizer: the measure is
  of the gradients' effect, not of AdamW's preconditioning. Z > 0: a step on i lowers j's
  loss (i helps j); Z < 0: it raises it. Row i is the task that steps, column j the one served.
  The diagonal is each task's own lookahead (how much its step lowers its own loss).
- gradient cosine: cos(g_i, g_j) on the shared parameters, symmetric, 1 on the diagonal.

The lookahead losses come from `torch.func.functional_call` with the stepped shared parameters:
the model's parameters and buffers are never modified. Every forward of one measurement runs
under the same random state (dropout draws the same masks), so Z measures the step, not noise.
L_t is the task's loss as training weighs it (lambda_t x L_t, m2dino.training.losses), without
the MoE aux terms (they belong to no task).

Shared parameters are found by module type (`SHARED_MODULE_TYPES`, the ViT backbone with its
MoE experts and routers; the heads are each one task's, the neck serves only the dense tasks),
trainable ones only. A task's router row gets gradient from that task alone, which is part of
what the measures see.

Cost of one measurement with n tasks in the batch: one forward with graph, n backward passes
(each task's gradient, retain_graph), n forwards without graph (the lookaheads), and n x P
floats of memory for the flattened gradients (P shared parameters). docs/study.md gives the
measured time against a training step. `AffinityProbe` measures every `every`-th step and
accumulates (m2dino.evaluation.affinity.AffinityAccumulator) for affinity.json.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from m2dino.evaluation.affinity import AFFINITY_FILE, AffinityAccumulator, StepAffinity, write_affinity
from m2dino.models.backbone import DinoV3ViT
from m2dino.training import distributed as dist_utils
from m2dino.training.loop import to_device
from m2dino.training.losses import task_loss, task_weight

SHARED_MODULE_TYPES: tuple[type[nn.Module], ...] = (DinoV3ViT,)

TaskLosses = Callable[[dict], Mapping[str, Tensor]]


def shared_parameters(model: nn.Module, types: Sequence[type[nn.Module]] = SHARED_MODULE_TYPES) -> dict[str, Tensor]:
    """{name in model: parameter} of the trainable parameters inside modules of `types` (the
    outermost such module; its descendants are not visited twice). Raises if there are none."""
    types = tuple(types)
    found: dict[str, Tensor] = {}
    outer: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, types) and not any(prefix.startswith(p + ".") for p in outer):
            outer.append(prefix)
            for name, param in module.named_parameters(prefix=prefix):
                if param.requires_grad:
                    found[name] = param
    if not found:
        raise ValueError(f"{type(model).__name__} has no trainable parameter inside a "
                         f"{' / '.join(t.__name__ for t in types)} module: nothing is shared between tasks to measure")
    return found


def trainer_task_losses(tasks, targets: list, loss_weights: Mapping | None = None,
                        label_smoothing: float = 0.0) -> TaskLosses:
    """outputs -> {task_id: lambda_t x L_t} for the tasks present in a forward's outputs, as
    m2dino.training.losses.total_loss weighs them (without its aux terms and DDP scales)."""
    specs = {t.task_id: t for t in tasks}

    def losses(outputs: dict) -> dict[str, Tensor]:
        return {task_id: task_weight(specs[task_id], loss_weights)
                * task_loss(specs[task_id], head_outputs, targets, label_smoothing).float()
                for task_id, head_outputs in outputs["tasks"].items()}
    return losses


def measure_step(model: nn.Module, inputs: tuple, task_losses: TaskLosses, shared: Mapping[str, Tensor],
                 lr: float, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                 ) -> StepAffinity:
    """Lookahead affinity and gradient cosine between the tasks of one batch (module docstring).

    model(*inputs) is the forward (M2DINO: (images, task_ids)); task_losses(outputs) gives
    {task_id: loss} (trainer_task_losses); shared: shared_parameters(model); lr: the shared
    parameters' current learning rate; autocast: the context the trainer's forward runs in.
    Tasks whose loss is not finite are left out of the result. The model's parameters,
    buffers and gradients are left untouched."""
    if not lr > 0:
        raise ValueError(f"the learning rate of the lookahead step must be > 0, got {lr!r}")
    names, params = list(shared), list(shared.values())
    device = params[0].device
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore_rng():
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)

    # every forward draws the same dropout masks; the caller's random state is left as found
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast():
            base = task_losses(model(*inputs))
        base = {t: v for t, v in base.items() if bool(torch.isfinite(v))}
        tasks = sorted(base)
        grads = []
        for task in tasks:
            g = torch.autograd.grad(base[task], params, retain_graph=True, allow_unused=True)
            grads.append([torch.zeros_like(p) if gi is None else gi.detach() for p, gi in zip(params, g)])
        base_values = torch.stack([base[t].detach() for t in tasks]).double().cpu().numpy()
        del base
        flat = torch.stack([torch.cat([gi.reshape(-1).float() for gi in g]) for g in grads]) if tasks else None
        lookahead = np.full((len(tasks), len(tasks)), np.nan)
        with torch.no_grad():
            for i, g in enumerate(grads):
                stepped = {name: p.detach() - lr * gi.to(p.dtype) for name, p, gi in zip(names, params, g)}
                restore_rng()
                with autocast():
                    after = task_losses(torch.func.functional_call(model, stepped, inputs, strict=False))
                for j, task in enumerate(tasks):
                    lookahead[i, j] = 1.0 - float(after[task].double()) / base_values[j]
    cosine = _cosine(flat) if tasks else np.zeros((0, 0))
    return StepAffinity(tasks=tasks, lookahead=lookahead, cosine=cosine, losses=base_values)


def _cosine(flat: Tensor) -> np.ndarray:
    """Pairwise cosine of the rows (NaN for a pair with a zero-norm row)."""
    flat = flat.double()
    norms = flat.norm(dim=1)
    gram = (flat @ flat.T).cpu().numpy()
    outer = (norms[:, None] * norms[None, :]).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(outer > 0, gram / np.where(outer > 0, outer, 1.0), np.nan)


@dataclass
class AffinityProbe:
    """Measure every `every`-th step of a run (from step `start`, until `stop` steps are
    measured or `until` is reached) and accumulate: what the AU run calls after its forward
    data is ready, before its optimizer step.

        probe = AffinityProbe(tasks=[t.task_id for t in model_tasks], every=10, until=200)
        ...
        if probe.due(step):
            probe.measure(step, model, (images, task_ids),
                          trainer_task_losses(model_tasks, batch["targets"], loss_weights), lr, autocast)
        ...
        write_affinity(model_dir / AFFINITY_FILE, probe.accumulator.record(how=probe.how()))
    """
    tasks: Sequence[str]
    every: int = 10
    until: int | None = None
    start: int = 0
    shared_types: Sequence[type[nn.Module]] = SHARED_MODULE_TYPES

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"the probe's interval must be >= 1 step, got every={self.every}")
        self.accumulator = AffinityAccumulator(self.tasks)
        self.seconds = 0.0
        self.shared_count = 0

    def due(self, step: int) -> bool:
        within = step >= self.start and (self.until is None or step < self.until)
        return within and (step - self.start) % self.every == 0

    def measure(self, step: int, model: nn.Module, inputs: tuple, task_losses: TaskLosses, lr: float,
                autocast=contextlib.nullcontext) -> StepAffinity:
        shared = shared_parameters(model, self.shared_types)
        self.shared_count = sum(p.numel() for p in shared.values())
        t0 = time.perf_counter()
        result = measure_step(model, inputs, task_losses, shared, lr, autocast)
        self.seconds += time.perf_counter() - t0
        self.accumulator.add(step, result, lr)
        return result

    def how(self) -> dict:
        """The "measured" block of affinity.json."""
        return {"method": "lookahead: SGD step of lr x the task's gradient on the shared parameters, same batch "
                          "(Fifty et al. 2021); cosine of the tasks' gradients on the shared parameters",
                "shared_modules": [t.__name__ for t in self.shared_types],
                "shared_parameters": self.shared_count, "every": self.every, "start": self.start,
                "until": self.until, "seconds": round(self.seconds, 3)}


class ProbeCallback:
    """The probe as a training loop step callback (m2dino.training.loop.StepEvent): after a
    taken step whose index (0-based) the probe finds due, it measures on that step's batch at
    the model's new parameters, with the rate the next step takes. A skipped (non-finite)
    step is not measured, nor one after which the rate is 0 (the schedule's end).
    `loss_weights`: the run's --loss-weights (the losses as trained).
    With `path`, the record is written there (affinity.json) after the probe's last due step,
    or at the run's last step when that comes first; on the main rank only (it alone measures).
    A run resumed inside the probe's window records the steps measured after the restart."""

    def __init__(self, probe: AffinityProbe, loss_weights: Mapping | None = None, path=None):
        self.probe = probe
        self.loss_weights = loss_weights
        self.path = path
        self.written = False

    def __call__(self, event) -> None:
        if not dist_utils.is_main():
            return
        index = event.step - 1
        loop = event.loop
        lr = loop.schedule.lr_at(event.step)  # 0 after the schedule's last step: no lookahead step to take
        if event.result.bad is None and self.probe.due(index) and lr > 0:
            model = loop.model
            images = event.batch["images"].to(loop.device)
            targets = to_device(event.batch["targets"], loop.device)
            losses = trainer_task_losses(model.tasks, targets, self.loss_weights)
            self.probe.measure(index, model, (images, model.task_index(event.batch["tasks"])), losses, lr,
                               loop.autocast)
        window_ends = self.probe.until is not None and index == self.probe.until - 1
        if self.path is not None and (window_ends or event.step >= event.loop.stopping.total_steps) \
                and self.probe.accumulator.steps and not self.written:
            write_affinity(self.path, self.probe.accumulator.record(self.probe.how()))
            self.written = True


# The study's AU run measures every PROBE_EVERY-th step from its first, --affinity-steps times
PROBE_EVERY = 10


def study_probe(config, paradigm: str, task_ids: Sequence[str], model_dir) -> list[ProbeCallback]:
    """The step callback that records the AU model's affinity.json in `model_dir` (the first
    config.affinity_steps x PROBE_EVERY steps, every PROBE_EVERY-th measured); none for
    another paradigm, a single task or --affinity-steps 0."""
    steps = config.affinity_steps
    if paradigm != "au" or steps == 0 or len(task_ids) < 2:
        return []
    probe = AffinityProbe(tasks=list(task_ids), every=PROBE_EVERY, until=PROBE_EVERY * (steps - 1) + 1)
    return [ProbeCallback(probe, config.loss_weights, Path(model_dir) / AFFINITY_FILE)]
