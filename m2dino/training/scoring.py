"""Scoring a model on the validation rows: the challenge metrics per task (at each image's
original resolution), the routing counts, one number to keep the best checkpoint by
(`primary_score`), per-task bootstrap intervals over the validation images, and the inner split
(`inner_split`): the rows of a model's training data held out to choose its best checkpoint and
to see its loss plateau, so that neither choice looks at the reported validation images."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from m2dino.data import FMUIADataset, collate
from m2dino.evaluation.bootstrap import BOOTSTRAP_SEED, bootstrap_task, task_seed
from m2dino.evaluation.ground_truth import ground_truth_from_record
from m2dino.evaluation.metrics import higher_is_better, metrics_by_task, values_by_task
from m2dino.paradigms import INNER_FRACTION
from m2dino.tasks import TaskSpec


def inner_split(records: list, seed: int) -> tuple[list, list]:
    """(training rows, inner rows) of a model's training rows: INNER_FRACTION of each task's rows
    (rounded, at least one; none of a task with a single row), drawn from `seed` (the split seed)
    and the task id alone, so a task holds out the same rows in every paradigm and every training
    seed. Both lists keep the given order."""
    by_task: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_task.setdefault(record.task_id, []).append(i)
    held = set()
    for task_id, indices in by_task.items():
        if len(indices) < 2:
            continue
        n_inner = min(len(indices) - 1, max(1, round(INNER_FRACTION * len(indices))))
        order = sorted(indices, key=lambda i: (records[i].csv, records[i].row, records[i].image_path))
        chosen = np.random.default_rng(task_seed(seed, task_id)).permutation(len(order))[:n_inner]
        held.update(order[j] for j in chosen)
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


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


@dataclass
class Validation:
    """One validation: per-task metrics {task_id: {metric: value}}, the per-image values they
    come from {task_id: {...}}, routing counts {block index: [[count per expert] per task]}."""
    metrics: dict[str, dict[str, float]]
    values: dict[str, dict]
    routing: dict[int, list]


class Validator:
    """Validates models of one task set on fixed validation rows (their ground truth read once)."""

    def __init__(self, val_records: list, task_table: dict[str, TaskSpec], img_size: int, batch_size: int,
                 workers: int):
        self.val_records = val_records
        self.task_table = task_table
        self.img_size = img_size
        self.batch_size = max(1, batch_size)
        self.workers = workers
        self._truth = None

    def truth(self) -> list[dict]:
        if self._truth is None:
            self._truth = [ground_truth_from_record(r) for r in self.val_records]
        return self._truth

    @torch.no_grad()
    def validate(self, forward, model, device: torch.device, autocast) -> Validation:
        """Validate `model` (an M2DINO: its task ids, post-processing and routing counters) with
        `forward` (the model itself, or its sharded wrapper, which every rank must run)."""
        was_training = forward.training
        forward.eval()
        model.reset_expert_usage()
        dataset = FMUIADataset(self.val_records, self.task_table, image_size=self.img_size, train=False)
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate,
                            num_workers=self.workers)
        predictions = []
        for batch in loader:
            images = batch["images"].to(device)
            with autocast():
                outputs = forward(images, model.task_index(batch["tasks"]))
            predictions.extend(model.postprocess(outputs, batch["orig_sizes"]))
        routing = {int(k): v.cpu().tolist() for k, v in model.expert_usage().items()}
        forward.train(was_training)
        values = dict(sorted(values_by_task(predictions, self.truth(), self.task_table).items()))
        return Validation(metrics_by_task(values, self.task_table), values, routing)


def intervals(values: dict[str, dict], task_table: dict[str, TaskSpec], n_resamples: int) -> dict[str, dict]:
    """{task_id: {metric: 95% bootstrap interval over the validation images}} from a validation's
    per-image values (none with n_resamples 0). Each task resamples with a seed of its own id, so
    every paradigm and training seed scoring it draws the same images."""
    if not n_resamples:
        return {}
    out = {}
    for task_id, task_values in values.items():
        spec = task_table[task_id]
        result = bootstrap_task(spec.task_type, spec.num_classes, task_values, n_resamples=n_resamples,
                                seed=task_seed(BOOTSTRAP_SEED, task_id))
        out[task_id] = {metric: r["ci"] for metric, r in result.items()}
    return out
