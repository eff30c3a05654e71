"""torch Dataset over validated FM_UIA records, and `collate`.

An item is the dict DESIGN.md fixes: image [3,S,S] (resized, DINOv3-normalised), task,
target, orig_size (H, W), image_path (the CSV string), mask_path.

Augmentation randomness is a pure function of (seed, epoch, index): the same sample in the
same epoch gets the same augmentation whatever the worker count or the resume point. Call
`set_epoch` (or the sampler's) each epoch; with DataLoader workers that is seen by the
workers when they are created, i.e. with the default persistent_workers=False.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from m2dino.data.images import load_mask_array, to_pil_image
from m2dino.data.reader import Record
from m2dino.data.transforms import Augment, SampleTransform
from m2dino.tasks import TaskSpec, TaskTable, TaskType

# A record's annotation in original pixels, per task type (segmentation reads the mask file).
_RAW_TARGETS = TaskTable("raw targets", {
    TaskType.SEGMENTATION: lambda record: {"mask": load_mask_array(record.mask_file)},
    TaskType.CLASSIFICATION: lambda record: {"label": record.label},
    TaskType.DETECTION: lambda record: {"box": record.box},
    TaskType.LANDMARKS: lambda record: {"points": record.points},
})


def raw_target(record: Record) -> dict:
    """A record's annotation in original pixels (reads the mask file for segmentation)."""
    return _RAW_TARGETS[record.task_type](record)


class FMUIADataset(Dataset):
    """Records -> samples. `tasks` maps task_id -> TaskSpec (for hflip)."""

    def __init__(self, records, tasks: dict[str, TaskSpec], image_size: int = 224, train: bool = False,
                 augment: Augment | None = None, seed: int = 0, cache_bytes: int = 0):
        self.records = list(records)
        missing = sorted({r.task_id for r in self.records} - set(tasks))
        if missing:
            raise ValueError(f"FMUIADataset: no TaskSpec for task(s) {missing}")
        self.tasks = dict(tasks)
        self.transform = SampleTransform(image_size, train=train, augment=augment)
        self.train = bool(train)
        self.seed = int(seed)
        self.epoch = 0
        # decoded images and annotations kept for later epochs, up to cache_bytes (0: none);
        # per process, so it helps with the loading in the training process (workers=0)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, tuple] = {}
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def task_of_index(self) -> list[str]:
        """The task of every index (what MultiTaskBatchSampler needs)."""
        return [r.task_id for r in self.records]

    def __getitem__(self, key):
        # key: an index, or (index, salt) from a sampler that wants distinct draws
        index, salt = (key if isinstance(key, tuple) else (key, 0))
        rec = self.records[index]
        spec = self.tasks[rec.task_id]
        image, target = self._decoded(index, rec)
        rng = np.random.default_rng([self.seed, self.epoch, int(index), int(salt)]) if self.train else None
        image_tensor, tgt = self.transform(image, target, rng, hflip=spec.hflip)
        return {
            "image": image_tensor,
            "task": rec.task_id,
            "target": tgt,
            "orig_size": (image.size[1], image.size[0]),
            "image_path": rec.image_path,
            "mask_path": rec.mask_path,
        }

    def _decoded(self, index: int, rec: Record):
        """The record's decoded image and raw target, from the cache when it is there."""
        if index in self._cache:
            return self._cache[index]
        try:
            image = to_pil_image(rec.image_file)
            target = raw_target(rec)
        except Exception as e:
            raise RuntimeError(f"cannot load {rec.csv} row {rec.row} ({rec.image_path!r}): {e}") from e
        if "mask" in target and target["mask"].max(initial=0) < 256:
            target = {"mask": target["mask"].astype(np.uint8)}  # the transform resizes it as uint8 anyway
        size = image.width * image.height * len(image.getbands()) + getattr(target.get("mask"), "nbytes", 0)
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[index] = (image, target)
            self._cached_bytes += size
        return image, target


def collate(samples: list[dict]) -> dict:
    """Stack images; keep per-sample targets (their shapes differ across task types)."""
    if not samples:
        raise ValueError("collate: empty batch")
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "tasks": [s["task"] for s in samples],
        "targets": [s["target"] for s in samples],
        "orig_sizes": [tuple(s["orig_size"]) for s in samples],
        "image_paths": [s["image_path"] for s in samples],
        "mask_paths": [s["mask_path"] for s in samples],
    }
