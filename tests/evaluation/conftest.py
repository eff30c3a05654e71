"""Simulated studies for the report's statistics: `simulate(rng, ...)` (a fixture) draws a study's
per-image values and gives them as the report reads them, in memory (`runs()`, `task_runs()`) or
written as run directories (`write(root)`).

The model of a per-image value (a latent quality q in (0, 1), Dice / IoU = q, MRE = 30 (1 - q)
pixels): q = mu_task + difficulty_image + offset(model, seed) + effect(paradigm, task) + noise.
The images' difficulty is shared by every paradigm and seed (they score the same images); the
model offset is one draw per model and seed (a TS model per task, a CG model per group, one AU
model: seed variance); the noise is per image, model and seed. With `effect` 0 every paradigm's
values come from one distribution: the null.
"""
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hand_predictions import write_hand_root, write_suite_and_checkpoint

from m2dino.evaluation import metrics as M
from m2dino.evaluation.bootstrap import resample_indices, task_seed
from m2dino.evaluation.report.change import TaskRuns
from m2dino.evaluation.report.runs import Runs

PARADIGMS = ("ts", "cg", "au")
TYPES = (("segmentation", "dice", 2), ("detection", "iou", 1), ("regression", "mre", 1))


def per_image_values(task_type: str, q: np.ndarray, paths: list[str]) -> dict:
    if task_type == "segmentation":
        return {"dice": [[float(v)] for v in q], "hd": [[float(20 * (1 - v))] for v in q], "image_path": paths}
    if task_type == "detection":
        return {"iou": [float(v) for v in q], "image_path": paths}
    return {"errors": [[float(30 * (1 - v))] for v in q], "image_path": paths}


def primary_from_quality(metric: str, q: np.ndarray, axis=-1) -> np.ndarray:
    """The primary metric of per-image qualities (the mean over images), vectorised."""
    return 30 * (1 - q).mean(axis=axis) if metric == "mre" else q.mean(axis=axis)


@dataclass
class Task:
    task_id: str
    task_type: str
    metric: str
    num_classes: int
    group: str
    train_size: int
    baseline: float
    quality: dict = field(default_factory=dict)   # (paradigm, seed) -> q [n images]

    @property
    def paths(self):
        n = len(next(iter(self.quality.values())))
        return [f"../{self.task_type}/{self.task_id}/{i:03d}.png" for i in range(n)]


@dataclass
class Study:
    tasks: list
    seeds: list

    def model(self, paradigm: str, task: Task) -> str:
        return {"ts": task.task_id, "cg": task.group, "au": "all"}[paradigm]

    def runs(self) -> Runs:
        """What load_runs would read from the written study."""
        results = {p: {} for p in PARADIGMS}
        for task in self.tasks:
            for paradigm in PARADIGMS:
                results[paradigm][task.task_id] = {
                    f"seed-{s}": {**self.entry(paradigm, task, s), "values": self.values(paradigm, task, s)}
                    for s in self.seeds}
        return Runs(results, {}, {}, {}, {f"seed-{s}": {"seed": s} for s in self.seeds})

    def values(self, paradigm: str, task: Task, seed: int) -> dict:
        return per_image_values(task.task_type, task.quality[paradigm, seed], task.paths)

    def entry(self, paradigm: str, task: Task, seed: int) -> dict:
        metrics = M.metrics_from_values(task.task_type, task.num_classes, self.values(paradigm, task, seed))
        return {"task_type": task.task_type, "group": task.group, "train_size": task.train_size,
                "primary_metric": task.metric, "num_classes": task.num_classes, "model": self.model(paradigm, task),
                "metrics": metrics, "baseline": {task.metric: task.baseline}}

    def task_runs(self, n_resamples: int = 0) -> dict:
        """{task_id: TaskRuns} of the primary metric, computed directly (vectorised); with
        n_resamples, the bootstrap distributions over images too (the task's seed, as the report)
        and the per-image values (for the permutation tests of one seed)."""
        out = {}
        for task in self.tasks:
            values = {p: {f"seed-{s}": {task.metric: float(primary_from_quality(task.metric, task.quality[p, s]))}
                          for s in self.seeds} for p in PARADIGMS}
            scored, images = {}, {}
            if n_resamples:
                images = {p: {f"seed-{s}": self.values(p, task, s) for s in self.seeds} for p in PARADIGMS}
                index = resample_indices(len(task.paths), n_resamples, task_seed(0, task.task_id))
                scored = {p: {f"seed-{s}": {task.metric: {"distribution": primary_from_quality(
                    task.metric, task.quality[p, s][index])}} for s in self.seeds} for p in PARADIGMS}
            out[task.task_id] = TaskRuns(task.task_id, task.metric, task.baseline, values, scored, images,
                                         task.task_type, task.num_classes)
        return out

    def write(self, root, config=None, training=None) -> list:
        """Run directories root/seed-N (config.yaml, <paradigm>/metrics.json, per-image values);
        training(paradigm, model, seed) -> the model's training entry (default: a plain one)."""
        run_dirs = []
        for s in self.seeds:
            run_dir = root / f"seed-{s}"
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text(json.dumps({"seed": s, "epochs": 7, **(config or {})}))
            for paradigm in PARADIGMS:
                entries, models, per_image = {}, {}, {}
                for task in self.tasks:
                    model = self.model(paradigm, task)
                    entries[task.task_id] = self.entry(paradigm, task, s)
                    models.setdefault(model, []).append(task.task_id)
                    per_image.setdefault(model, {})[task.task_id] = self.values(paradigm, task, s)
                for model, tasks in per_image.items():
                    (run_dir / paradigm / model).mkdir(parents=True)
                    (run_dir / paradigm / model / "eval_per_image.json").write_text(json.dumps({"tasks": tasks}))
                lengths = {m: (training(paradigm, m, s) if training else
                               {"train_images": 10, "epochs": 7.0, "steps": 5, "samples_seen": 70, "seconds": 1.0})
                           for m in models}
                (run_dir / paradigm / "metrics.json").write_text(json.dumps(
                    {"paradigm": paradigm, "models": models, "training": lengths, "tasks": entries}))
            run_dirs.append(run_dir)
        return run_dirs


def simulate_study(rng, n_tasks=12, n_groups=4, seeds=(0, 1, 2), effect=None, sigma_seed=0.02, sigma_noise=0.12,
                   images=(16, 40), chance_tasks=()) -> Study:
    """A study of n_tasks tasks (types cycling through segmentation, detection, regression; groups
    G0..), training sizes log-uniform in [15, 250]. effect(paradigm, task_index, train_size, task_type)
    -> shift of the latent quality (default 0: the null). chance_tasks: task indices whose
    quality sits at the trivial baseline (TS at chance)."""
    effect = effect or (lambda paradigm, i, size, task_type: 0.0)
    sizes = np.exp(rng.uniform(math.log(15), math.log(250), n_tasks)).astype(int)
    offsets, tasks = {}, []
    for i in range(n_tasks):
        task_type, metric, num_classes = TYPES[i % len(TYPES)]
        n_images = int(rng.integers(*images))
        mu = rng.uniform(0.45, 0.8)
        base_quality = mu if i in chance_tasks else mu - 0.25
        baseline = float(primary_from_quality(metric, np.array([base_quality])))
        task = Task(f"t{i:02d}", task_type, metric, num_classes, f"G{i % n_groups}", int(sizes[i]), baseline)
        difficulty = rng.normal(0, 0.1, n_images)
        for paradigm in PARADIGMS:
            model = {"ts": task.task_id, "cg": task.group, "au": "all"}[paradigm]
            for s in seeds:
                offset = offsets.setdefault((model, paradigm, s), rng.normal(0, sigma_seed))
                q = mu + difficulty + offset + effect(paradigm, i, int(sizes[i]), task_type)
                task.quality[paradigm, s] = np.clip(q + rng.normal(0, sigma_noise, n_images), 0.001, 0.999)
        tasks.append(task)
    return Study(tasks, list(seeds))


@pytest.fixture(scope="session")
def simulate():
    return simulate_study


@pytest.fixture
def hand_root(tmp_path):
    """hand_predictions.write_hand_root in a fresh folder."""
    return write_hand_root(tmp_path / "data")


@pytest.fixture(scope="module")
def suite_and_checkpoint(tmp_path_factory):
    """(data root, checkpoint) of hand_predictions.write_suite_and_checkpoint, once per module."""
    return write_suite_and_checkpoint(tmp_path_factory.mktemp("suite"))
