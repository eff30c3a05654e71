"""The training loop for one model (one TS task, one CG group, or the AU model).

`ModelTrainer(config, name, tasks, train_records, val_records, model_dir, ...).run()` trains
with AdamW (backbone lr, heads lr x head_lr_mult; no decay on biases, norms and tokens),
linear warmup then cosine decay, gradient clipping, bf16/fp16 autocast on GPU, optional
gradient checkpointing and frozen backbone; validates on the challenge metrics, keeps the
best checkpoint by the primary metrics, and writes `last/` training checkpoints atomically
(m2dino.training.checkpoint) so that `--resume` continues exactly.

Guarantees:
- a non-finite loss or gradient norm skips the step (no update, optimizer state untouched),
  is counted and logged; `max_bad_steps` in a row end the run with `TrainingDiverged` after a
  checkpoint of the last good state;
- out of memory ends with `TrainingOOM` suggesting --batch-size / --grad-checkpointing; the
  checkpoint on disk is the last complete one (nothing is written after the failure);
- data-parallel under torchrun (DDP, or FSDP2 with --fsdp; m2dino.training.distributed): the
  loss is normalised by the GLOBAL number of samples of each task, so averaged gradients equal
  those of one process with the whole global batch.

Host reads: a step reads its loss and gradient norm back once (whether to apply the step), and
the per-task losses only when it logs (every --log-every steps and at the end of an epoch);
the model reads nothing back from the device (its task ids come from the host).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from m2dino import io
from m2dino.data import FMUIADataset, MultiTaskBatchSampler, collate
from m2dino.evaluation.baselines import training_mean
from m2dino.evaluation.bootstrap import BOOTSTRAP_SEED, PER_IMAGE_FILE, bootstrap_settings, bootstrap_task, task_seed
from m2dino.evaluation.ground_truth import ground_truth_from_record
from m2dino.evaluation.metrics import higher_is_better, metrics_by_task, values_by_task
from m2dino.models.m2dino import M2DINO, save_model
from m2dino.paradigms import PLATEAU_CAP_FACTOR, PLATEAU_REL_TOL, PLATEAU_WINDOW
from m2dino.tasks import TaskSpec, TaskType
from m2dino.training import checkpoint as ckpt
from m2dino.training import distributed as dist_utils
from m2dino.training.config import TrainConfig
from m2dino.training.losses import total_loss
from m2dino.training.rundir import RESUMABLE

# Test hook for the crashed-rank test: "RANK:STEP" makes that rank os._exit(1) when it reaches
# STEP on the first torchrun attempt (TORCHELASTIC_RESTART_COUNT == 0) only.
CRASH_ENV = "M2DINO_TEST_CRASH_RANK_AT_STEP"
# Decoded training images kept in memory after their first epoch (with --workers 0, where
# decoding is part of every step's time): what the default run's whole suite needs, many times.
TRAIN_CACHE_BYTES = 512 * 2**20


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    pass


class TrainingOOM(TrainingError):
    pass


@dataclass
class Progress:
    """Where training is; saved in every checkpoint."""
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
    recent_losses: list = field(default_factory=list)  # the last 2 x PLATEAU_WINDOW training losses (plateau rule)
    stopped: str = ""              # why a until-plateau model stopped: "plateau" or "cap"




def plateaued(losses: list[float], window: int = PLATEAU_WINDOW, rel_tol: float = PLATEAU_REL_TOL) -> bool:
    """Whether a training-loss curve has plateaued: the mean of its last `window` values is
    less than `rel_tol` (relative) below the mean of the `window` before (False while the curve
    is shorter than 2 x window)."""
    if len(losses) < 2 * window:
        return False
    recent = sum(losses[-window:]) / window
    before = sum(losses[-2 * window:-window]) / window
    return (before - recent) < rel_tol * abs(before)


def primary_score(task_metrics: dict[str, dict[str, float]], tasks: dict[str, TaskSpec],
                  baselines: dict[str, dict[str, float]]) -> float:
    """One number to pick the best checkpoint: the mean over tasks of the primary metric
    (dice, f1_macro, iou as they are; for mre, the share of the training-mean baseline's
    error removed, 1 - mre / mre_baseline, so it is comparable with the others)."""
    values = []
    for task_id, spec in tasks.items():
        metric = spec.primary_metric
        value = task_metrics.get(task_id, {}).get(metric, float("nan"))
        if not higher_is_better(metric):
            base = baselines.get(task_id, {}).get(metric, float("nan"))
            value = 1.0 - value / base if base and math.isfinite(base) and base > 0 else -value
        values.append(value if math.isfinite(value) else 0.0)
    return float(np.mean(values)) if values else 0.0


def warmup_cosine(total_steps: int, warmup_steps: int):
    """lr factor: linear warmup from ~0 to 1, then cosine to 0 at total_steps."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class StepSchedule:
    """The learning rate of each training step as a function of its index (0-based), written
    into the optimizer's groups before the step: each group's own base rate x `factor(index)`.

    Not a torch LRScheduler, which advances by one call after each optimizer.step(): a step
    skipped for a non-finite loss or gradient has no optimizer step, yet keeps its place in the
    schedule (the schedule follows the step count), and advancing a scheduler for it is the
    "lr_scheduler.step() before optimizer.step()" misuse PyTorch warns about. Here each step's
    rate depends on its index alone: the same rates as LambdaLR stepped once per step, skipped
    or not, with nothing to keep in a checkpoint beyond the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor):
        self.optimizer = optimizer
        self.factor = factor
        # "initial_lr", as torch's schedulers keep it: a resumed optimizer's groups carry it
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]

    def lr_at(self, index: int) -> float:
        """The first group's (the backbone's) rate at step `index`."""
        return self.base_lrs[0] * self.factor(index)

    def apply(self, index: int) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(index)


def _to_device(value, device):
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


class MetricsLog:
    """metrics.jsonl (one JSON object per line, appended and flushed) + TensorBoard if installed."""

    def __init__(self, model_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = model_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            model_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(model_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.writer = None

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a") as fh:
            fh.write(io.dumps(record, indent=None) + "\n")
            fh.flush()
        if self.writer is not None and "step" in fields:
            for k, v in _flatten(fields).items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"{event}/{k}", v, fields["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _finite_or_none(value: float):
    return value if math.isfinite(value) else None


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of scalar tensors on the host, in one device-to-host read: the training
    loop's only way of looking at device numbers."""
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()


def _total_norm(grads: list, device) -> torch.Tensor:
    """The global gradient norm as a (replicated) tensor; sharded gradients give the norm of
    the whole."""
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class ModelTrainer:
    """Train, validate and checkpoint one model on `tasks` (list of TaskSpec)."""

    def __init__(self, config: TrainConfig, name: str, tasks: list[TaskSpec], train_records, val_records,
                 model_dir, device: torch.device, baselines: dict[str, dict[str, float]] | None = None,
                 on_step=None, until_plateau: bool = False):
        if not tasks:
            raise ValueError(f"model {name!r}: no tasks to train")
        self.config = config
        self.img_size = config.model.resolved().img_size  # the model's input size: the data is resized to it
        self.name = name
        self.tasks = list(tasks)
        self.task_table = {t.task_id: t for t in self.tasks}
        # a fixed order (the sampler's indices) whatever order the reader returned
        order = lambda r: (r.task_id, r.csv, r.row)  # noqa: E731
        self.train_records = sorted((r for r in train_records if r.task_id in self.task_table), key=order)
        self.val_records = sorted((r for r in val_records if r.task_id in self.task_table), key=order)
        empty = sorted(t for t in self.task_table if not any(r.task_id == t for r in self.train_records))
        if empty:
            raise ValueError(f"model {name!r}: task(s) {empty} have no training samples")
        self.model_dir = Path(model_dir)
        self.device = device
        self.baselines = baselines or {}
        self.is_main = dist_utils.is_main()
        self.log = MetricsLog(self.model_dir, self.is_main)
        self._val_truth = None
        self._last_save = -math.inf
        self.on_step = on_step  # called with the batch's image count after every training step
        self.until_plateau = until_plateau  # the converged-TS control: train on until the loss plateaus (plateaued)

    # ------------------------------------------------------------------ building

    def build_model(self):
        c = self.config
        torch.manual_seed(c.seed)  # the same initial weights in every paradigm and on every rank
        model = M2DINO(c.model, self.tasks, pretrained=c.pretrained)
        if c.grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        self.start_landmarks_at_training_mean(model)
        return model.to(self.device)

    def start_landmarks_at_training_mean(self, model) -> None:
        """Each landmark head starts at its task's training-mean points (a resumed run then
        loads its own prior); see LandmarkHead.set_point_prior."""
        for task_id, spec in self.task_table.items():
            if spec.task_type is TaskType.LANDMARKS:
                truth = [ground_truth_from_record(r, with_mask=False)
                         for r in self.train_records if r.task_id == task_id]
                model.heads[task_id].set_point_prior(training_mean(truth, "points"))

    def param_groups(self, model) -> list[dict]:
        """Backbone at lr, everything else (neck, heads) at lr x head_lr_mult; no weight decay
        on 1-d parameters (biases, norms, LayerScale) and tokens. --freeze-backbone freezes
        the dense backbone; the MoE layers (routers and experts) keep training."""
        c = self.config
        groups = {}
        for name, p in model.named_parameters():
            in_backbone = name.startswith("backbone.")
            is_moe = ".mlp." in name and any(k in name for k in ("gate_", "fc1_", "fc2_"))
            if c.freeze_backbone and in_backbone and not is_moe:
                p.requires_grad_(False)
            if not p.requires_grad:
                continue
            head = not in_backbone
            no_decay = p.ndim <= 1 or "token" in name or name.endswith("periods")
            key = (head, no_decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": c.lr * (c.head_lr_mult if head else 1.0),
                               "weight_decay": 0.0 if no_decay else c.weight_decay,
                               "name": f"{'head' if head else 'backbone'}{'_no_decay' if no_decay else ''}"}
            groups[key]["params"].append(p)
        if not groups:
            raise ValueError(f"model {self.name!r}: no trainable parameters")
        return [groups[k] for k in sorted(groups)]

    def build_data(self):
        c = self.config
        dataset = FMUIADataset(self.train_records, self.task_table, image_size=self.img_size, train=True, seed=c.seed,
                               cache_bytes=TRAIN_CACHE_BYTES if c.workers == 0 else 0)
        sampler = MultiTaskBatchSampler(dataset.task_of_index, batch_size=c.batch_size, alpha=c.task_alpha,
                                        mixed=c.batching == "mixed", seed=c.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=c.workers,
                            pin_memory=self.device.type == "cuda")
        return dataset, sampler, loader

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, outputs, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss (m2dino.training.losses.total_loss), each task normalised by its
        GLOBAL sample count (see the module docstring), and its parts (detached tensors)."""
        c = self.config
        local = torch.tensor([float(len(outputs["tasks"][t]["indices"])) if t in outputs["tasks"] else 0.0
                              for t in self.task_table], dtype=torch.float64)
        global_counts = (dist_utils.all_reduce_sum(local.to(self.device)).cpu() if dist_utils.is_distributed()
                         else local)
        world = dist_utils.world_size()
        scales = {t: float(local[i] / global_counts[i]) * world
                  for i, t in enumerate(self.task_table) if t in outputs["tasks"]}
        # the unused-head anchor: heads absent from this batch get zero gradients, so every
        # parameter is in every step's graph on every rank (DDP without find_unused_parameters)
        return total_loss(outputs, batch["targets"], self.tasks, loss_weights=c.loss_weights,
                          aux_weights=c.aux_weights, task_scales=scales, anchor_unused=True)

    # ------------------------------------------------------------------ state

    def train_state(self, optimizer_state: dict, sampler, progress: Progress) -> dict[str, Any]:
        return {
            "format": 1,
            "model_name": self.name,
            "tasks": [t.task_id for t in self.tasks],
            "optimizer": optimizer_state,
            "sampler": sampler.state_dict(batches_done=progress.batches_done),
            "rng": ckpt.rng_state(),
            "progress": dict(progress.__dict__),
            "world_size": dist_utils.world_size(),
        }

    def save_last(self, model, optimizer, sampler, progress: Progress) -> None:
        """Write last/ (rank 0); under FSDP every rank takes part in gathering the state."""
        self._last_save = time.perf_counter()
        model_state, optimizer_state = dist_utils.full_state_dicts(model, optimizer)
        if self.is_main:
            ckpt.save_checkpoint(self.model_dir, self.model, self.train_state(optimizer_state, sampler,
                                                                              progress), model_state=model_state)
        dist_utils.barrier()

    def _epoch_checkpoint_due(self) -> bool:
        """Whether this epoch's end saves (--checkpoint-seconds): a short epoch does not pay
        a checkpoint write each time. Rank 0's clock decides for every rank."""
        due = time.perf_counter() - self._last_save >= self.config.checkpoint_seconds
        return bool(dist_utils.broadcast_object(due))

    def restore(self, model, optimizer, sampler) -> Progress | None:
        """Load the model directory's last checkpoint when there is one (else None)."""
        found = ckpt.find_checkpoint(self.model_dir)
        if found is None:
            return None
        tensors, state = ckpt.read_checkpoint(found, self.model)
        if state.get("tasks") != [t.task_id for t in self.tasks]:
            raise ckpt.CheckpointError(f"{found}: trained on tasks {state.get('tasks')}, this model has "
                                       f"{[t.task_id for t in self.tasks]}")
        dist_utils.load_full_state_dicts(model, optimizer, tensors, state["optimizer"])
        try:
            sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{found}: {e}") from None
        ckpt.set_rng_state(state["rng"])
        return Progress(**state["progress"])

    # ------------------------------------------------------------------ validation

    def val_truth(self) -> list[dict]:
        if self._val_truth is None:
            self._val_truth = [ground_truth_from_record(r) for r in self.val_records]
        return self._val_truth

    @torch.no_grad()
    def validate(self, model) -> tuple[dict[str, dict[str, float]], dict[int, list]]:
        """Challenge metrics of `model` on the validation rows (original resolution), and the
        routing counts {block index: [[count per expert] per task]} on them. The per-image values
        the metrics are computed from stay in `self.last_values` for `uncertainty`."""
        c = self.config
        was_training = model.training
        model.eval()
        self.model.reset_expert_usage()
        dataset = FMUIADataset(self.val_records, self.task_table, image_size=self.img_size, train=False)
        loader = DataLoader(dataset, batch_size=max(1, c.batch_size), shuffle=False, collate_fn=collate,
                            num_workers=c.workers)
        predictions = []
        for batch in loader:
            images = batch["images"].to(self.device)
            with self.autocast():
                outputs = model(images, self.model.task_index(batch["tasks"]))
            predictions.extend(self.model.postprocess(outputs, batch["orig_sizes"]))
        routing = {int(k): v.cpu().tolist() for k, v in self.model.expert_usage().items()}
        model.train(was_training)
        # per-image values keyed by image_path
        self.last_values = dict(sorted(values_by_task(predictions, self.val_truth(), self.task_table).items()))
        return metrics_by_task(self.last_values, self.task_table), routing

    def uncertainty(self, values: dict[str, dict]) -> dict[str, dict[str, list]]:
        """{task_id: {metric: 95% bootstrap interval over the validation images}} from the
        per-image values of a validation (none with --bootstrap 0). Each task resamples with a
        seed of its own id, so every paradigm and training seed scoring it draws the same images."""
        if not self.config.bootstrap:
            return {}
        intervals = {}
        for task_id, task_values in values.items():
            spec = self.task_table[task_id]
            result = bootstrap_task(spec.task_type, spec.num_classes, task_values, n_resamples=self.config.bootstrap,
                                    seed=task_seed(BOOTSTRAP_SEED, task_id))
            intervals[task_id] = {metric: r["ci"] for metric, r in result.items()}
        return intervals

    # ------------------------------------------------------------------ helpers

    def autocast(self):
        c = self.config
        if self.device.type != "cuda" or c.amp == "off":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if c.amp == "bf16" else torch.float16)

    def equal_exposure_steps(self, sampler) -> int:
        """--steps, else --epochs epochs, repeated as whole epochs up to at least --min-steps."""
        c = self.config
        if c.steps is not None:
            return int(c.steps)
        per_epoch = len(sampler)
        return max(int(c.epochs), -(-int(c.min_steps) // max(1, per_epoch))) * per_epoch

    def total_steps(self, sampler) -> int:
        """The schedule's length: equal_exposure_steps, or for a until-plateau model its cap."""
        steps = self.equal_exposure_steps(sampler)
        return PLATEAU_CAP_FACTOR * steps if self.until_plateau else steps

    def _crash_hook(self, step: int) -> None:
        spec = os.environ.get(CRASH_ENV)
        if not spec or dist_utils.restart_count() > 0:
            return
        crash_rank, crash_step = (int(v) for v in spec.split(":"))
        if dist_utils.rank() == crash_rank and step == crash_step:
            os._exit(1)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train (or resume); returns the best checkpoint's validation {"tasks": {task_id:
        {metric: value}}, "ci": {task_id: {metric: [low, high]}}, "best_step": int,
        "training": training_length()}."""
        c = self.config
        self.model = self.build_model()  # the M2DINO itself (predictions, checkpoints, tests)
        # what training steps run through: DDP or FSDP2 under torchrun, the model otherwise
        model = self.train_model = dist_utils.parallelize(self.model, self.device, fsdp=c.fsdp)
        # fused: one kernel over all parameters. The default per-parameter loop, and even
        # foreach, cost a large share of a small model's step on a CPU.
        optimizer = self.optimizer = torch.optim.AdamW(self.param_groups(self.model), lr=c.lr,
                                                       weight_decay=c.weight_decay, fused=True)
        dataset, sampler, loader = self.build_data()
        total = self.total_steps(sampler)
        warmup = int(c.warmup * total) if c.warmup < 1 else int(c.warmup)
        scheduler = StepSchedule(optimizer, warmup_cosine(total, warmup))
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and c.amp == "fp16")

        progress = self.restore(model, optimizer, sampler) if c.resume else None
        if progress is None:
            progress = Progress()
            if self.is_main:
                for stale in ("metrics.jsonl",):
                    (self.model_dir / stale).unlink(missing_ok=True)
            self.log.write("start", model=self.name, tasks=list(self.task_table), total_steps=total,
                           train_size=len(self.train_records), val_size=len(self.val_records),
                           world_size=dist_utils.world_size(), config=c.to_dict())
            # a loadable checkpoint exists from the first step on (a kill at any moment can resume)
            self.save_last(model, optimizer, sampler, progress)
        else:
            changes = self._resume_changes()
            if progress.finished and progress.step < total and progress.stopped != "plateau":
                progress.finished = False  # --epochs (or --steps, --min-steps) extended: train on
            self.log.write("resume", step=progress.step, epoch=progress.epoch, batches_done=progress.batches_done,
                           total_steps=total, changes=changes, config=c.to_dict())

        if not progress.finished:
            try:
                self._train(model, optimizer, scheduler, scaler, dataset, sampler, loader, progress, total)
            except torch.OutOfMemoryError as e:
                self.log.write("oom", step=progress.step, error=str(e)[:500])
                raise TrainingOOM(
                    f"model {self.name!r}: out of memory at step {progress.step} with --batch-size {c.batch_size} "
                    f"at --img-size {self.img_size}: try a smaller --batch-size or --grad-checkpointing "
                    f"(or --amp bf16 on GPU). The last complete checkpoint in {self.model_dir / ckpt.LAST} is "
                    f"intact; --resume continues from it.") from e
        return self._final_eval(model, progress)

    def _resume_changes(self) -> dict[str, list]:
        """{option: [before, now]} between the config this model last started or resumed with
        (its metrics.jsonl) and this run's, for the options that may change on resume."""
        before = None
        if self.log.path.is_file():
            for line in self.log.path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if event.get("event") in ("start", "resume") and isinstance(event.get("config"), dict):
                    before = event["config"]
        now = self.config.to_dict()
        if before is None:
            return {}
        return {k: [before.get(k), now[k]] for k in RESUMABLE if before.get(k) != now[k]}

    def _train(self, model, optimizer, scheduler, scaler, dataset, sampler, loader, progress: Progress,
               total: int) -> None:
        c = self.config
        model.train()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        bar = None
        if self.is_main and c.progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=progress.step, desc=self.name, leave=False, dynamic_ncols=True)
        images_seen, t0 = 0, time.perf_counter()
        clock = t0
        plateau_from = self.equal_exposure_steps(sampler)
        while progress.step < total:
            sampler.set_epoch(progress.epoch)
            dataset.set_epoch(progress.epoch)
            last_in_epoch = len(sampler) - 1
            for batch in loader:
                if progress.step >= total:
                    break
                self._crash_hook(progress.step)
                outcome = self._step(model, optimizer, scheduler, scaler, params, batch, progress)
                progress.step += 1
                progress.batches_done += 1
                images_seen += len(batch["tasks"])
                if self.on_step is not None:
                    self.on_step(len(batch["tasks"]))
                progress.samples_seen += len(batch["tasks"]) * dist_utils.world_size()
                if self.until_plateau and outcome.get("loss") is not None:
                    progress.recent_losses = (progress.recent_losses + [outcome["loss"]])[-2 * PLATEAU_WINDOW:]
                now = time.perf_counter()
                progress.train_seconds += now - clock
                clock = now
                rate = images_seen * dist_utils.world_size() / max(1e-9, now - t0)
                if bar is not None:
                    bar.update(1)
                    if outcome.get("loss") is not None:
                        bar.set_postfix(loss=f"{outcome['loss']:.4f}", img_s=f"{rate:.0f}")
                epoch_ends = progress.batches_done > last_in_epoch or progress.step >= total
                if progress.step % c.log_every == 0 or "bad" in outcome or epoch_ends:
                    self.log.write("train", step=progress.step, epoch=progress.epoch, images_per_s=round(rate, 2),
                                   lr=scheduler.lr_at(progress.step - 1), **self._logged(outcome))
                if outcome.get("bad") and progress.bad_in_row >= c.max_bad_steps:
                    self.save_last(model, optimizer, sampler, progress)
                    if bar is not None:
                        bar.close()
                    raise TrainingDiverged(
                        f"model {self.name!r}: {progress.bad_in_row} training steps in a row had a non-finite "
                        f"loss or gradient (last at step {progress.step}; {progress.bad_total} in all); stopped. "
                        f"The last good state is saved in {self.model_dir / ckpt.LAST}. Try a lower --lr, "
                        f"--amp off, or check the data (python -m m2dino.data.check).")
                if c.checkpoint_every and progress.step % c.checkpoint_every == 0 and progress.step < total:
                    self.save_last(model, optimizer, sampler, progress)
            else:  # the epoch is complete
                progress.epoch += 1
                progress.batches_done = 0
                if c.eval_every and progress.epoch % c.eval_every == 0 and progress.step < total:
                    self._evaluate_and_keep_best(model, progress)
                if (self.until_plateau and progress.step >= plateau_from and progress.step < total
                        and plateaued(progress.recent_losses)):
                    progress.stopped = "plateau"
                    break
                if progress.step < total and self._epoch_checkpoint_due():
                    self.save_last(model, optimizer, sampler, progress)
                continue
            break  # --steps reached inside an epoch
        if bar is not None:
            bar.close()
        if self.until_plateau and not progress.stopped:
            progress.stopped = "cap"
        self._evaluate_and_keep_best(model, progress)
        progress.finished = True
        self.save_last(model, optimizer, sampler, progress)
        self.log.write("finished", step=progress.step, bad_steps=progress.bad_total, best_step=progress.best_step,
                       best_score=_finite_or_none(progress.best_score))

    def _step(self, model, optimizer, scheduler, scaler, params, batch, progress: Progress) -> dict[str, Any]:
        """One optimizer step, or a skipped one when the loss or the gradient is not finite.

        Returns {"loss": the local loss, "parts": {name: detached tensor}} and, for a skipped
        step, "bad" (the reason) with the counters. The loss and the gradient norm come back to
        the host in one read; the parts stay on the device until a log line wants them."""
        c = self.config
        images = batch["images"].to(self.device, non_blocking=True)
        batch = {**batch, "targets": _to_device(batch["targets"], self.device)}
        optimizer.zero_grad(set_to_none=True)
        scheduler.apply(progress.step)  # this step's rate, whether the step is taken or skipped
        with self.autocast():
            outputs = model(images, self.model.task_index(batch["tasks"]))
            loss, parts = self.compute_loss(model, outputs, batch)
        # A non-finite loss gives non-finite gradients, which every rank then sees after the
        # all-reduce: the skip decision below agrees across ranks without another collective.
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        grad_norm = _total_norm(grads, self.device)
        loss_value, norm_value = host_values(loss, grad_norm)
        bad_reason = None
        if not math.isfinite(loss_value):
            bad_reason = "non-finite loss"
        elif not math.isfinite(norm_value):
            bad_reason = "non-finite gradient"
        if bad_reason is not None:
            if scaler.is_enabled():
                scaler.update()  # fp16: lower the scale, as GradScaler does for inf/NaN
            optimizer.zero_grad(set_to_none=True)
            progress.bad_in_row += 1
            progress.bad_total += 1
            return {"bad": bad_reason, "bad_in_row": progress.bad_in_row, "bad_total": progress.bad_total,
                    "loss": _finite_or_none(loss_value), "local_loss": loss.detach()}
        if c.grad_clip > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(with_grad, c.grad_clip, grad_norm)
        scaler.step(optimizer)
        scaler.update()
        progress.bad_in_row = 0
        return {"loss": loss_value, "grad_norm": norm_value, "parts": parts, "local_loss": loss.detach()}

    def _logged(self, outcome: dict) -> dict[str, Any]:
        """The fields of a "train" log line: the loss averaged over ranks, the step's parts."""
        fields = {k: v for k, v in outcome.items() if k not in ("parts", "local_loss")}
        if dist_utils.is_distributed():
            total = dist_utils.all_reduce_sum(outcome["local_loss"].reshape(1).double())
            fields["loss"] = _finite_or_none(host_values(total)[0] / dist_utils.world_size())
        if "parts" in outcome:
            names = list(outcome["parts"])
            fields["losses"] = dict(zip(names, host_values(*outcome["parts"].values()))) if names else {}
        return fields

    # ------------------------------------------------------------------ best checkpoint and final eval

    def _evaluate_and_keep_best(self, model, progress: Progress) -> None:
        # A sharded model needs every rank in its forward: then all ranks validate (the same
        # rows) and rank 0 keeps the numbers; otherwise rank 0 validates alone.
        sharded = dist_utils.is_sharded(model)
        improved, score = False, None
        if self.is_main or sharded:
            metrics, routing = self.validate(model if sharded else self.model)
            score = primary_score(metrics, self.task_table, self.baselines)
            improved = score > progress.best_score or progress.best_step < 0
        improved, score = dist_utils.broadcast_object((improved, score) if self.is_main else None)
        model_state = dist_utils.full_state_dicts(model, self.optimizer)[0] if improved and sharded else None
        if self.is_main:
            self.log.write("eval", step=progress.step, epoch=progress.epoch, score=score, improved=improved,
                           tasks=metrics)
            if improved:
                save_model(self.model, self.model_dir / "best", state_dict=model_state)
                intervals = self.uncertainty(self.last_values)
                self._write_json(PER_IMAGE_FILE, {"tasks": self.last_values})
                self._write_json("eval.json", {"tasks": metrics, "ci": intervals, "step": progress.step,
                                               "score": score, "bootstrap": bootstrap_settings(self.config.bootstrap)})
                self._write_json("routing.json", {"tasks": list(self.task_table),
                                                  "num_experts": self.config.model.num_experts,
                                                  "layers": {str(k): v for k, v in routing.items()}})
        if improved:
            progress.best_score, progress.best_step = score, progress.step

    def _write_json(self, name: str, data) -> None:
        io.write_json(self.model_dir / name, data)

    def _final_eval(self, model, progress: Progress) -> dict[str, Any]:
        result = io.read_json(self.model_dir / "eval.json") if self.is_main else {}
        result = dist_utils.broadcast_object(result)
        self.log.close()
        return {"tasks": result.get("tasks", {}), "ci": result.get("ci", {}), "best_step": progress.best_step,
                "training": self.training_length(progress)}

    def training_length(self, progress: Progress) -> dict[str, Any]:
        """How much training this model had: what tells transfer from training length apart."""
        images = len(self.train_records)
        out = {"train_images": images, "epochs": round(progress.samples_seen / max(1, images), 3),
               "steps": progress.step, "samples_seen": progress.samples_seen,
               "seconds": round(progress.train_seconds, 1)}
        if self.until_plateau:
            out["stopped"] = progress.stopped
        return out
