"""One model's training (one TS task, one CG group, or the AU model), assembled from its parts.

`ModelTrainer(config, name, tasks, train_records, val_records, model_dir, ...).run()` builds the
model and its data, then trains with AdamW (optimizer.py: backbone lr, heads lr x head_lr_mult;
no decay on biases, norms and tokens), the learning-rate schedule (schedule.py: linear warmup
then cosine decay; warmup-stable-decay for a converged model), gradient clipping, bf16/fp16
autocast on GPU, optional gradient checkpointing and frozen backbone, for as long as its
stopping rule says (stopping.py); the loop itself is loop.py. It validates on the challenge
metrics (scoring.py), keeps the best checkpoint by the primary metrics with its eval.json
(artifacts.py; with --eval-every, or for a converged model, the best is chosen on an inner split
of its training rows, scoring.inner_split, held out of training: never on the reported
validation images), logs to metrics.jsonl (metrics_log.py), and writes `last/` training
checkpoints atomically (checkpoint.py) so that `--resume` continues exactly.

Guarantees:
- a non-finite loss or gradient norm skips the step (loop.py); `max_bad_steps` in a row end
  the run with `TrainingDiverged` after a checkpoint of the last good state;
- out of memory ends with `TrainingOOM` suggesting --batch-size / --grad-checkpointing; the
  checkpoint on disk is the last complete one (nothing is written after the failure);
- data-parallel under torchrun (DDP, or FSDP2 with --fsdp; m2dino.training.distributed): the
  loss is normalised by the GLOBAL number of samples of each task, so averaged gradients equal
  those of one process with the whole global batch.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from m2dino import io
from m2dino.data import FMUIADataset, MultiTaskBatchSampler, collate
from m2dino.evaluation.baselines import training_mean
from m2dino.evaluation.ground_truth import ground_truth_from_record
from m2dino.models.capacity import parameter_counts
from m2dino.models.m2dino import M2DINO, SPATIAL_TYPES
from m2dino.tasks import TaskSpec, TaskType
from m2dino.training import checkpoint as ckpt
from m2dino.training import distributed as dist_utils
from m2dino.training.artifacts import EVAL_FILE, write_best
from m2dino.training.compile import compile_blocks
from m2dino.training.config import TrainConfig, weights_file
from m2dino.training.ema import ModelEMA
from m2dino.training.loop import (
    LoopSettings,
    Progress,
    StepCallback,
    TrainData,
    TrainingDiverged,
    TrainingError,
    TrainingLoop,
    TrainingOOM,
    to_device,
)
from m2dino.training.losses import accumulation_scales, total_loss
from m2dino.training.metrics_log import MetricsLog
from m2dino.training.optimizer import build_optimizer
from m2dino.training.rundir import RESUMABLE
from m2dino.training.schedule import StepSchedule, lr_factor
from m2dino.training.scoring import Validator, inner_split, intervals, primary_score
from m2dino.training.stopping import STOP_PLATEAU, StoppingRule, stopping_rule

__all__ = ["ModelTrainer", "Progress", "TrainingDiverged", "TrainingError", "TrainingOOM"]

# Decoded training images kept in memory after their first epoch (with --workers 0, where
# decoding is part of every step's time): what the default run's whole suite needs, many times.
TRAIN_CACHE_BYTES = 512 * 2**20


class ModelTrainer:
    """Train, validate and checkpoint one model on `tasks` (list of TaskSpec).

    `step_callbacks`: functions called after every training step with a loop.StepEvent (see
    m2dino.training.loop); they may also be appended to `self.step_callbacks` before `run`.
    `until_plateau`: a converged model (--budget converged, or the TS* control): it trains until
    its inner-split loss plateaus (stopping.InnerSplitPlateau)."""

    def __init__(self, config: TrainConfig, name: str, tasks: list[TaskSpec], train_records, val_records,
                 model_dir, device: torch.device, baselines: dict[str, dict[str, float]] | None = None,
                 step_callbacks: list[StepCallback] | None = None, until_plateau: bool = False):
        if not tasks:
            raise ValueError(f"model {name!r}: no tasks to train")
        self.config = config
        self.img_size = config.model.resolved().img_size  # the model's input size: the data is resized to it
        self.name = name
        self.tasks = list(tasks)
        self.task_table = {t.task_id: t for t in self.tasks}
        # a fixed order (the sampler's indices) whatever order the reader returned
        order = lambda r: (r.task_id, r.csv, r.row)  # noqa: E731
        # every task of the study: its models' FLOPs are counted once, on the all-task model
        self.study_tasks = sorted({r.task_id for r in train_records} | set(self.task_table))
        self.train_records = sorted((r for r in train_records if r.task_id in self.task_table), key=order)
        # the inner split: held out of training to choose the best checkpoint and to see a plateau
        self.inner_records = []
        if until_plateau or config.eval_every:
            split_seed = config.seed if config.split_seed is None else config.split_seed
            self.train_records, self.inner_records = inner_split(self.train_records, split_seed)
        self.val_records = sorted((r for r in val_records if r.task_id in self.task_table), key=order)
        empty = sorted(t for t in self.task_table if not any(r.task_id == t for r in self.train_records))
        if empty:
            raise ValueError(f"model {name!r}: task(s) {empty} have no training samples")
        self.model_dir = Path(model_dir)
        self.device = device
        self.baselines = baselines or {}
        self.is_main = dist_utils.is_main()
        self.log = MetricsLog(self.model_dir, self.is_main)
        self.validator = Validator(self.val_records, self.task_table, self.img_size, config.batch_size,
                                   config.workers)
        self.inner_validator = Validator(self.inner_records, self.task_table, self.img_size, config.batch_size,
                                         config.workers) if self.inner_records else None
        self.step_callbacks: list[StepCallback] = list(step_callbacks or [])
        self.until_plateau = until_plateau
        self.last_save = -math.inf  # perf_counter of the last checkpoint write (--checkpoint-seconds)
        # set by run(): the M2DINO, what steps run through (it, or its DDP/FSDP wrapper), the optimizer
        self.model: M2DINO | None = None
        self.train_model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ema: ModelEMA | None = None  # --ema: the averaged weights, validated and kept as best
        self.sampler: MultiTaskBatchSampler | None = None

    # ------------------------------------------------------------------ building

    def build_model(self) -> M2DINO:
        c = self.config
        torch.manual_seed(c.seed)  # the same initial weights in every paradigm and on every rank
        model = M2DINO(c.model, self.tasks, pretrained=weights_file(c), drop_path_rate=c.drop_path,
                       drop_path_schedule=c.drop_path_schedule)
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

    def build_data(self) -> TrainData:
        c = self.config
        dataset = FMUIADataset(self.train_records, self.task_table, image_size=self.img_size, train=True, seed=c.seed,
                               cache_bytes=TRAIN_CACHE_BYTES if c.workers == 0 else 0)
        sampler = MultiTaskBatchSampler(dataset.task_of_index, batch_size=c.batch_size, alpha=c.task_alpha,
                                        mixed=c.batching == "mixed", seed=c.seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=c.workers,
                            pin_memory=self.device.type == "cuda")
        return TrainData(dataset, sampler, loader)

    def stopping(self, sampler) -> StoppingRule:
        """This model's stopping rule (its budget from the batches per epoch)."""
        return stopping_rule(self.config, len(sampler), self.inner_loss if self.until_plateau else None)

    @torch.no_grad()
    def inner_loss(self) -> float:
        """The model's mean training loss over the inner split (eval mode, no augmentation; every
        rank computes it on the same rows, and rank 0's value decides)."""
        forward = self.train_model if dist_utils.is_sharded(self.train_model) else self.model
        was_training = forward.training
        forward.eval()
        dataset = FMUIADataset(self.inner_records, self.task_table, image_size=self.img_size, train=False)
        loader = DataLoader(dataset, batch_size=max(1, self.config.batch_size), shuffle=False, collate_fn=collate,
                            num_workers=self.config.workers)
        total, count = 0.0, 0
        for batch in loader:
            images = batch["images"].to(self.device)
            batch = {**batch, "targets": to_device(batch["targets"], self.device)}
            with self.autocast():
                outputs = forward(images, self.model.task_index(batch["tasks"]))
                loss, _ = self.compute_loss(forward, outputs, batch)
            total += float(loss) * len(batch["tasks"])
            count += len(batch["tasks"])
        forward.train(was_training)
        return float(dist_utils.broadcast_object(total / max(1, count)))

    # ------------------------------------------------------------------ the loss

    def compute_loss(self, model, outputs, batch, step_tasks=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss (m2dino.training.losses.total_loss), each task normalised by its
        GLOBAL sample count over the step (see the module docstring), and its parts (detached
        tensors). `step_tasks`: the whole step's task ids on this rank when `batch` is one of
        its --grad-accum micro-batches (losses.accumulation_scales)."""
        c = self.config
        step_tasks = batch["tasks"] if step_tasks is None else step_tasks
        local = torch.tensor([float(sum(1 for s in step_tasks if s == t)) for t in self.task_table],
                             dtype=torch.float64)
        global_counts = (dist_utils.all_reduce_sum(local.to(self.device)).cpu() if dist_utils.is_distributed()
                         else local)
        counts = {t: float(global_counts[i]) for i, t in enumerate(self.task_table)}
        scales = accumulation_scales([batch["tasks"]], counts, dist_utils.world_size())[0].task_scales
        # the unused-head anchor: heads absent from this batch get zero gradients, so every
        # parameter is in every step's graph on every rank (DDP without find_unused_parameters)
        return total_loss(outputs, batch["targets"], self.tasks, loss_weights=c.loss_weights,
                          aux_weights=c.aux_weights, task_scales=scales, anchor_unused=True,
                          aux_scale=len(batch["tasks"]) / len(step_tasks))

    # ------------------------------------------------------------------ checkpoints

    def train_state(self, optimizer_state: dict, progress: Progress) -> dict[str, Any]:
        return {
            "format": 1,
            "model_name": self.name,
            "tasks": [t.task_id for t in self.tasks],
            "optimizer": optimizer_state,
            "sampler": self.sampler.state_dict(batches_done=progress.batches_done),
            "rng": ckpt.rng_state(),
            "progress": dict(progress.__dict__),
            "world_size": dist_utils.world_size(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    def save_last(self, progress: Progress) -> None:
        """Write last/ (rank 0); under FSDP every rank takes part in gathering the state."""
        self.last_save = time.perf_counter()
        model_state, optimizer_state = dist_utils.full_state_dicts(self.train_model, self.optimizer)
        if self.is_main:
            ckpt.save_checkpoint(self.model_dir, self.model, self.train_state(optimizer_state, progress),
                                 model_state=model_state)
        dist_utils.barrier()

    def epoch_checkpoint_due(self) -> bool:
        """Whether this epoch's end saves (--checkpoint-seconds): a short epoch does not pay
        a checkpoint write each time. Rank 0's clock decides for every rank."""
        due = time.perf_counter() - self.last_save >= self.config.checkpoint_seconds
        return bool(dist_utils.broadcast_object(due))

    def restore(self) -> Progress | None:
        """Load the model directory's last checkpoint when there is one (else None)."""
        found = ckpt.find_checkpoint(self.model_dir)
        if found is None:
            return None
        tensors, state = ckpt.read_checkpoint(found, self.model)
        if state.get("tasks") != [t.task_id for t in self.tasks]:
            raise ckpt.CheckpointError(f"{found}: trained on tasks {state.get('tasks')}, this model has "
                                       f"{[t.task_id for t in self.tasks]}")
        dist_utils.load_full_state_dicts(self.train_model, self.optimizer, tensors, state["optimizer"])
        try:
            self.sampler.load_state_dict(state["sampler"])
            if self.ema is not None and "ema" in state:  # --ema turned on at resume starts afresh
                self.ema.load_state_dict(state["ema"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"{found}: {e}") from None
        ckpt.set_rng_state(state["rng"])
        return Progress(**state["progress"])

    # ------------------------------------------------------------------ validation and the best checkpoint

    def autocast(self):
        c = self.config
        if self.device.type != "cuda" or c.amp == "off":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if c.amp == "bf16" else torch.float16)

    def evaluate_and_keep_best(self, progress: Progress) -> None:
        # A sharded model needs every rank in its forward: then all ranks validate (the same
        # rows) and rank 0 keeps the numbers; otherwise rank 0 validates alone.
        sharded = dist_utils.is_sharded(self.train_model)
        improved, score, validation = False, None, None
        validated = self.model if self.ema is None else self.ema.module  # --ema: the average is what is kept
        forward = self.train_model if sharded else validated
        if self.is_main or sharded:
            # the choice is made on the inner split when there is one; the validation images are
            # scored for the checkpoint kept, never to choose it
            chooser = self.inner_validator or self.validator
            choice = chooser.validate(forward, validated, self.device, self.autocast)
            score = primary_score(choice.metrics, self.task_table, self.baselines)
            improved = score > progress.best_score or progress.best_step < 0
            validation = choice if chooser is self.validator else None
        improved, score = dist_utils.broadcast_object((improved, score) if self.is_main else None)
        model_state = dist_utils.full_state_dicts(self.train_model, self.optimizer)[0] if improved and sharded else None
        if improved and validation is None and (self.is_main or sharded):
            validation = self.validator.validate(forward, validated, self.device, self.autocast)
        if self.is_main:
            self.log.write("eval", step=progress.step, epoch=progress.epoch, score=score, improved=improved,
                           chosen_on="inner split" if self.inner_validator else "validation",
                           **({"tasks": validation.metrics} if validation is not None else {}))
            if improved:
                write_best(self.model_dir, validated, validation,
                           intervals(validation.values, self.task_table, self.config.bootstrap), progress.step,
                           score, self.config.bootstrap, list(self.task_table), self.config.model.num_experts,
                           model_state=model_state)
        if improved:
            progress.best_score, progress.best_step = score, progress.step

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        """Train (or resume); returns the best checkpoint's validation {"tasks": {task_id:
        {metric: value}}, "ci": {task_id: {metric: [low, high]}}, "best_step": int,
        "training": training_length()}."""
        c = self.config
        self.model = self.build_model()
        # the EMA copies the model before compilation wraps its blocks; compiled blocks before DDP/FSDP
        self.ema = ModelEMA(self.model, c.ema, warmup=True) if c.ema is not None else None
        if c.compile:
            compile_blocks(self.model)
        self.train_model = dist_utils.parallelize(self.model, self.device, fsdp=c.fsdp)
        try:
            self.optimizer = build_optimizer(self.model, c)
        except ValueError as e:
            raise ValueError(f"model {self.name!r}: {e}") from None
        data = self.build_data()
        self.sampler = data.sampler
        stopping = self.stopping(data.sampler)
        schedule = StepSchedule(self.optimizer, lr_factor(c, stopping))
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and c.amp == "fp16")

        progress = self.restore() if c.resume else None
        fresh = progress is None
        progress = progress or Progress()
        stopping.bind(progress)
        total = stopping.total_steps
        if fresh:
            self.log.clear()
            self.log.write("start", model=self.name, tasks=list(self.task_table), total_steps=total,
                           train_size=len(self.train_records), val_size=len(self.val_records),
                           inner_size=len(self.inner_records),
                           world_size=dist_utils.world_size(), config=c.to_dict())
            # a loadable checkpoint exists from the first step on (a kill at any moment can resume)
            self.save_last(progress)
        else:
            changes = self._resume_changes()
            if progress.finished and progress.step < total and progress.stopped != STOP_PLATEAU:
                progress.finished, progress.stopped = False, ""  # --epochs (or --steps, --min-steps) extended: train on
            self.log.write("resume", step=progress.step, epoch=progress.epoch, batches_done=progress.batches_done,
                           total_steps=total, changes=changes, config=c.to_dict())

        if not progress.finished:
            loop = TrainingLoop(
                name=self.name, model=self.model, forward=self.train_model, optimizer=self.optimizer,
                schedule=schedule, scaler=scaler, stopping=stopping, loss_fn=self.compute_loss, device=self.device,
                autocast=self.autocast, settings=LoopSettings.from_config(c), log=self.log, save=self.save_last,
                evaluate=self.evaluate_and_keep_best, checkpoint_due=self.epoch_checkpoint_due,
                diverged_advice=(f"The last good state is saved in {self.model_dir / ckpt.LAST}. Try a lower --lr, "
                                 f"--amp off, or check the data (python -m m2dino.data.check)."),
                step_callbacks=self.step_callbacks, ema=self.ema)
            try:
                loop.run(progress, data)
            except torch.OutOfMemoryError as e:
                self.log.write("oom", step=progress.step, error=str(e)[:500])
                raise TrainingOOM(
                    f"model {self.name!r}: out of memory at step {progress.step} with --batch-size {c.batch_size} "
                    f"at --img-size {self.img_size}: try a smaller --batch-size or --grad-checkpointing "
                    f"(or --amp bf16 on GPU). The last complete checkpoint in {self.model_dir / ckpt.LAST} is "
                    f"intact; --resume continues from it.") from e
        return self._final_eval(progress, schedule)

    def _resume_changes(self) -> dict[str, list]:
        """{option: [before, now]} between the config this model last started or resumed with
        (its metrics.jsonl) and this run's, for the options that may change on resume."""
        before = self.log.last_config()
        now = self.config.to_dict()
        if before is None:
            return {}
        return {k: [before.get(k), now[k]] for k in RESUMABLE if before.get(k) != now[k]}

    def _final_eval(self, progress: Progress, schedule: StepSchedule) -> dict[str, Any]:
        result = io.read_json(self.model_dir / EVAL_FILE) if self.is_main else {}
        result = dist_utils.broadcast_object(result)
        self.log.close()
        return {"tasks": result.get("tasks", {}), "ci": result.get("ci", {}), "best_step": progress.best_step,
                "training": self.training_length(progress, schedule)}

    def training_length(self, progress: Progress, schedule: StepSchedule) -> dict[str, Any]:
        """How much training this model had: what tells transfer from training length apart;
        why it stopped, its last learning rate, and its capacity (parameters, and training FLOPs
        of the images it saw: the plan's FLOP counter, m2dino.training.flops)."""
        images = len(self.train_records)
        counts = parameter_counts(self.model)
        return {"train_images": images, "inner_images": len(self.inner_records),
                "epochs": round(progress.samples_seen / max(1, images), 3),
                "steps": progress.step, "samples_seen": progress.samples_seen,
                "seconds": round(progress.train_seconds, 1), "stop_reason": progress.stopped or None,
                "final_lr": schedule.lr_at(max(0, progress.step - 1)),
                "capacity": {"params_total": counts["total"], "params_active_per_token": counts["active_per_token"],
                             "train_flops": self.train_flops(progress.samples_seen)}}

    def train_flops(self, samples_seen: int) -> float:
        """Forward + backward FLOPs of `samples_seen` training images, each task's share of them
        as its share of the training rows (the plan's count, m2dino.training.flops)."""
        from m2dino.training.flops import image_flops, study_shapes  # fake tensors: only when a model is done

        task_ids = list(self.task_table)
        sizes = {t: sum(r.task_id == t for r in self.train_records) for t in task_ids}
        spatial = any(spec.task_type in SPATIAL_TYPES for spec in self.tasks)
        per_image = image_flops(study_shapes(self.config, self.study_tasks), task_ids, sizes, spatial)
        return float(per_image * samples_seen)
