"""The training loop of one model: epochs of steps until its stopping rule ends them.

A step (`TrainingLoop.step`) sets the step's learning rate, runs the forward and backward of
its batch (`backward`), and then applies the gradients or skips the step (`apply_gradients`):
a non-finite loss or gradient norm skips it (no update, optimizer state untouched), is counted
and logged, and `max_bad_steps` in a row end the run with `TrainingDiverged` after a checkpoint
of the last good state.

Extension points:
- per-step callbacks: `TrainingLoop.step_callbacks` (a list; ModelTrainer's `step_callbacks`
  argument fills it) are called after every step, skipped or not, with a `StepEvent` (the
  step count, its batch, its `StepResult`, the loop: model, optimizer...). The study's progress
  bar counts images through one; tests inject faults through one.
- gradient accumulation (`LoopSettings.grad_accum` N > 1): `backward` cuts the step's batch
  into N micro-batches (losses.split_batch), forwards and backpropagates each with the loss
  function told the whole step's tasks (`loss_fn(forward, outputs, micro_batch, step_tasks)`,
  which normalises each task by its count over the step), the gradients adding up; under
  DDP/FSDP2 only the last micro-batch's backward synchronises them (`gradient_sync`). The
  step's loss is the micro-batches' sum, its logged parts merged (losses.merge_logged).
- an EMA of the weights (`ema`, a training.ema.ModelEMA): updated after every taken step.

Host reads: a step reads its loss and gradient norm back once (whether to apply the step), and
the per-task losses only when it logs (every --log-every steps and at the end of an epoch)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from m2dino.training import distributed as dist_utils
from m2dino.training.losses import merge_logged, split_batch
from m2dino.training.metrics_log import MetricsLog, finite_or_none
from m2dino.training.schedule import StepSchedule
from m2dino.training.stopping import StoppingRule


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    pass


class TrainingOOM(TrainingError):
    pass


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of scalar tensors on the host, in one device-to-host read: the training
    loop's only way of looking at device numbers."""
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()


def total_norm(grads: list, device) -> torch.Tensor:
    """The global gradient norm as a (replicated) tensor; sharded gradients give the norm of
    the whole."""
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@contextlib.contextmanager
def gradient_sync(forward, enabled: bool):
    """Whether the backward passes inside synchronise gradients across ranks: DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync`; a model that is not distributed always "syncs"."""
    if enabled:
        yield
    elif hasattr(forward, "no_sync"):
        with forward.no_sync():
            yield
    elif hasattr(forward, "set_requires_gradient_sync"):
        forward.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            forward.set_requires_gradient_sync(True)
    else:
        yield


def to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    return value


@dataclass
class Progress:
    """Where training is; saved in every checkpoint (its fields are the checkpoint's "progress")."""
    step: int = 0
    epoch: int = 0
    batches_done: int = 0          # batches trained in the current epoch
    bad_in_row: int = 0
    bad_total: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    finished: bool = False
    samples_seen: int = 0          # training samples over all ranks (batch size x world size per step)
    train_seconds: float = 0.0     # wall time of the training loop, validations included, over resumes
    recent_losses: list = field(default_factory=list)  # the last training losses a stopping rule keeps
    stopped: str = ""              # why training ended (m2dino.training.stopping's reasons); "" before
    decay_start: int = -1          # the step a converged model's learning-rate decay began at (-1: not yet)


@dataclass
class StepResult:
    """What one training step did. `loss`: this rank's loss (None when not finite);
    `local_loss`: the same on the device; `bad`: why the step was skipped (None when taken),
    with the skip counters then; `parts`: the loss's parts (device tensors) of a taken step."""
    loss: float | None
    local_loss: torch.Tensor
    grad_norm: float | None = None
    parts: dict[str, torch.Tensor] | None = None
    bad: str | None = None
    bad_in_row: int = 0
    bad_total: int = 0

    def log_fields(self) -> dict[str, Any]:
        """The step's fields of a "train" log line: the loss averaged over ranks, the parts read."""
        if self.bad is not None:
            fields = {"bad": self.bad, "bad_in_row": self.bad_in_row, "bad_total": self.bad_total, "loss": self.loss}
        else:
            fields = {"loss": self.loss, "grad_norm": self.grad_norm}
        if dist_utils.is_distributed():
            total = dist_utils.all_reduce_sum(self.local_loss.reshape(1).double())
            fields["loss"] = finite_or_none(host_values(total)[0] / dist_utils.world_size())
        if self.parts is not None:
            names = list(self.parts)
            fields["losses"] = dict(zip(names, host_values(*self.parts.values()))) if names else {}
        return fields


@dataclass
class StepEvent:
    """What a step callback sees, after the step's counters moved on: `step` steps are done,
    the last on `batch` (its `images` on this rank), with `result`; `loop` gives the model
    (`loop.model`, `loop.forward`), the optimizer and the schedule."""
    step: int
    epoch: int
    images: int
    batch: dict
    result: StepResult
    loop: TrainingLoop


StepCallback = Callable[[StepEvent], None]


@dataclass
class TrainData:
    """The training rows as the loop reads them."""
    dataset: Any   # FMUIADataset: set_epoch
    sampler: Any   # MultiTaskBatchSampler: set_epoch, len = batches per epoch, state_dict
    loader: Any    # the DataLoader over both


@dataclass
class Pace:
    """The wall clock of a training session: images per second, and the seconds to add to
    Progress.train_seconds at each step (resumed runs add theirs)."""
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0
    images: int = 0

    def __post_init__(self):
        self.last = self.start

    def tick(self, images: int) -> tuple[float, float]:
        """(seconds since the last tick, images per second over all ranks so far)."""
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        self.images += images
        return elapsed, self.images * dist_utils.world_size() / max(1e-9, now - self.start)


@dataclass
class LoopSettings:
    """The options the loop reads (from TrainConfig)."""
    grad_clip: float
    log_every: int
    max_bad_steps: int
    checkpoint_every: int
    eval_every: int
    progress_bar: bool
    grad_accum: int = 1

    @classmethod
    def from_config(cls, config) -> LoopSettings:
        return cls(config.grad_clip, config.log_every, config.max_bad_steps, config.checkpoint_every,
                   config.eval_every, config.progress, config.grad_accum)


class TrainingLoop:
    """Steps and epochs of one model. The trainer gives it the model (`model`, the M2DINO;
    `forward`, what steps run through: it or its DDP/FSDP wrapper), the optimizer parts, the
    loss (`loss_fn(forward, outputs, batch) -> (loss, parts)`), and what it does at epoch ends
    and on failure: `save(progress)` a training checkpoint, `evaluate(progress)` validate and
    keep the best, `checkpoint_due()` whether an epoch end saves."""

    def __init__(self, *, name: str, model, forward, optimizer: torch.optim.Optimizer, schedule: StepSchedule,
                 scaler, stopping: StoppingRule, loss_fn, device: torch.device, autocast, settings: LoopSettings,
                 log: MetricsLog, save: Callable[[Progress], None], evaluate: Callable[[Progress], None],
                 checkpoint_due: Callable[[], bool], diverged_advice: str,
                 step_callbacks: list[StepCallback] | None = None, ema=None):
        self.name = name
        self.model = model
        self.forward = forward
        self.optimizer = optimizer
        self.schedule = schedule
        self.scaler = scaler
        self.stopping = stopping
        self.loss_fn = loss_fn
        self.device = device
        self.autocast = autocast
        self.settings = settings
        self.log = log
        self.save = save
        self.evaluate = evaluate
        self.checkpoint_due = checkpoint_due
        self.diverged_advice = diverged_advice
        self.step_callbacks: list[StepCallback] = list(step_callbacks or [])
        self.ema = ema
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ epochs

    def run(self, progress: Progress, data: TrainData) -> None:
        """Train from `progress` until the stopping rule ends training, then validate a last
        time, mark it finished and checkpoint."""
        self.forward.train()
        self.stopping.bind(progress)
        pace = Pace()
        with self._progress_bar(progress) as bar:
            while progress.step < self.stopping.total_steps:
                if not self._train_epoch(progress, data, pace, bar):
                    break  # the last step came inside the epoch
                progress.stopped = self._end_epoch(progress) or ""
                if progress.stopped:
                    break
        progress.stopped = progress.stopped or self.stopping.ran_out()
        self.evaluate(progress)
        progress.finished = True
        self.save(progress)
        self.log.write("finished", step=progress.step, bad_steps=progress.bad_total, best_step=progress.best_step,
                       best_score=finite_or_none(progress.best_score), stopped=progress.stopped,
                       final_lr=self.schedule.lr_at(max(0, progress.step - 1)))

    def _train_epoch(self, progress: Progress, data: TrainData, pace: Pace, bar) -> bool:
        """The rest of the current epoch; False when the last step came before its end."""
        data.sampler.set_epoch(progress.epoch)
        data.dataset.set_epoch(progress.epoch)
        batches = len(data.sampler)
        for batch in data.loader:
            if progress.step >= self.stopping.total_steps:
                return False
            result = self.step(batch, progress)
            self._account(batch, result, progress, pace, bar, epoch_ends=progress.batches_done + 1 >= batches)
        return True

    def _end_epoch(self, progress: Progress) -> str | None:
        """Validation when due, the stopping rule's word (a reason to stop, or None), and the
        epoch-end checkpoint when due."""
        progress.epoch += 1
        progress.batches_done = 0
        more = progress.step < self.stopping.total_steps
        if self.settings.eval_every and progress.epoch % self.settings.eval_every == 0 and more:
            self.evaluate(progress)
        reason = self.stopping.stop_now(progress)
        if reason is None and more and self.checkpoint_due():
            self.save(progress)
        return reason

    def _account(self, batch, result: StepResult, progress: Progress, pace: Pace, bar, epoch_ends: bool) -> None:
        """A step's counters, callbacks, log line, divergence check and periodic checkpoint."""
        images = len(batch["tasks"])
        progress.step += 1
        progress.batches_done += 1
        progress.samples_seen += images * dist_utils.world_size()
        self.stopping.observe(progress, result.loss)
        elapsed, rate = pace.tick(images)
        progress.train_seconds += elapsed
        event = StepEvent(progress.step, progress.epoch, images, batch, result, self)
        for callback in self.step_callbacks:
            callback(event)
        if bar is not None:
            bar.update(1)
            if result.loss is not None:
                bar.set_postfix(loss=f"{result.loss:.4f}", img_s=f"{rate:.0f}")
        s = self.settings
        last = progress.step >= self.stopping.total_steps
        if progress.step % s.log_every == 0 or result.bad is not None or epoch_ends or last:
            self.log.write("train", step=progress.step, epoch=progress.epoch, images_per_s=round(rate, 2),
                           lr=self.schedule.lr_at(progress.step - 1), **result.log_fields())
        if result.bad is not None and progress.bad_in_row >= s.max_bad_steps:
            self.save(progress)
            raise TrainingDiverged(
                f"model {self.name!r}: {progress.bad_in_row} training steps in a row had a non-finite "
                f"loss or gradient (last at step {progress.step}; {progress.bad_total} in all); stopped. "
                f"{self.diverged_advice}")
        if s.checkpoint_every and progress.step % s.checkpoint_every == 0 and not last:
            self.save(progress)

    @contextlib.contextmanager
    def _progress_bar(self, progress: Progress):
        if not (dist_utils.is_main() and self.settings.progress_bar):
            yield None
            return
        from tqdm import tqdm
        bar = tqdm(total=self.stopping.total_steps, initial=progress.step, desc=self.name, leave=False,
                   dynamic_ncols=True)
        try:
            yield bar
        finally:
            bar.close()

    # ------------------------------------------------------------------ one step

    def step(self, batch: dict, progress: Progress) -> StepResult:
        """One optimizer step, or a skipped one when the loss or the gradient is not finite."""
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.apply(progress.step)  # this step's rate, whether the step is taken or skipped
        loss, parts = self.backward(batch)
        return self.apply_gradients(loss, parts, progress)

    def backward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of the step's batch, in --grad-accum micro-batches (at most one
        per image): its loss and the loss's parts."""
        micro_batches = split_batch(batch, min(self.settings.grad_accum, len(batch["tasks"])))
        if len(micro_batches) == 1:
            return self._backward(batch)
        losses, logged = [], []
        for m, micro_batch in enumerate(micro_batches):
            with gradient_sync(self.forward, enabled=m == len(micro_batches) - 1):
                loss, parts = self._backward(micro_batch, step_tasks=batch["tasks"])
            losses.append(loss.detach())
            logged.append(parts)
        return torch.stack(losses).sum(), merge_logged(logged, [b["tasks"] for b in micro_batches])

    def _backward(self, batch: dict, step_tasks=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"].to(self.device, non_blocking=True)
        batch = {**batch, "targets": to_device(batch["targets"], self.device)}
        with self.autocast():
            outputs = self.forward(images, self.model.task_index(batch["tasks"]))
            if step_tasks is None:
                loss, parts = self.loss_fn(self.forward, outputs, batch)
            else:
                loss, parts = self.loss_fn(self.forward, outputs, batch, step_tasks)
        # A non-finite loss gives non-finite gradients, which every rank then sees after the
        # all-reduce: the skip decision agrees across ranks without another collective.
        self.scaler.scale(loss).backward()
        return loss, parts

    def apply_gradients(self, loss: torch.Tensor, parts: dict, progress: Progress) -> StepResult:
        """The skip rule, clipping and the optimizer step. The loss and the gradient norm come
        back to the host in one read; the parts stay on the device until a log line wants them."""
        self.scaler.unscale_(self.optimizer)
        with_grad = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        grad_norm = total_norm(grads, self.device)
        loss_value, norm_value = host_values(loss, grad_norm)
        bad = ("non-finite loss" if not math.isfinite(loss_value) else
               "non-finite gradient" if not math.isfinite(norm_value) else None)
        if bad is not None:
            if self.scaler.is_enabled():
                self.scaler.update()  # fp16: lower the scale, as GradScaler does for inf/NaN
            self.optimizer.zero_grad(set_to_none=True)
            progress.bad_in_row += 1
            progress.bad_total += 1
            return StepResult(finite_or_none(loss_value), loss.detach(), bad=bad, bad_in_row=progress.bad_in_row,
                              bad_total=progress.bad_total)
        if self.settings.grad_clip > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.settings.grad_clip, grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        progress.bad_in_row = 0
        return StepResult(loss_value, loss.detach(), grad_norm=norm_value, parts=parts)
