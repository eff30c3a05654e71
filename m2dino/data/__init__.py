"""FM_UIA data: reading and validating a challenge root, the split, transforms, the dataset,
the multi-task batch sampler, and a synthetic suite in the same format.

Typical use:

    from m2dino.data import ensure_synthetic, load_fmuia, FMUIADataset, MultiTaskBatchSampler, collate
    root = ensure_synthetic()                      # or the challenge release on disk
    data = load_fmuia(root, policy="error")        # or "skip" (+ run_dir for the list)
    train = FMUIADataset(data.train, data.tasks, image_size=224, train=True)
    sampler = MultiTaskBatchSampler(train.task_of_index, batch_size=16, alpha=1.0)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=2)

The data layer knows tasks (m2dino.tasks) and never imports the model or the training code.

The names are imported on first use (PEP 562): `python -m m2dino.data.check` and the synthetic
suite's command line, which need no torch, answer without importing it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from m2dino._lazy import lazy_exports

if TYPE_CHECKING:
    from m2dino.data.dataset import FMUIADataset, collate, raw_target
    from m2dino.data.fmuia import DataValidationError, FMUIAData, load_fmuia
    from m2dino.data.reader import Problem, Record, Scan, read_csvs
    from m2dino.data.roots import resolve_data_root
    from m2dino.data.sampler import MultiTaskBatchSampler
    from m2dino.data.splits import apply_split, make_split, read_split, write_split
    from m2dino.data.synthetic import DIFFICULTY, ensure_synthetic, task_sizes, write_suite
    from m2dino.data.transforms import IMAGE_MEAN, IMAGE_STD, Augment, SampleTransform, denormalize
    from m2dino.data.validate import scan_dataset

_SOURCES = {
    "FMUIADataset": "m2dino.data.dataset",
    "collate": "m2dino.data.dataset",
    "raw_target": "m2dino.data.dataset",
    "DataValidationError": "m2dino.data.fmuia",
    "FMUIAData": "m2dino.data.fmuia",
    "load_fmuia": "m2dino.data.fmuia",
    "Problem": "m2dino.data.reader",
    "Record": "m2dino.data.reader",
    "Scan": "m2dino.data.reader",
    "read_csvs": "m2dino.data.reader",
    "resolve_data_root": "m2dino.data.roots",
    "MultiTaskBatchSampler": "m2dino.data.sampler",
    "apply_split": "m2dino.data.splits",
    "make_split": "m2dino.data.splits",
    "read_split": "m2dino.data.splits",
    "write_split": "m2dino.data.splits",
    "DIFFICULTY": "m2dino.data.synthetic",
    "ensure_synthetic": "m2dino.data.synthetic",
    "task_sizes": "m2dino.data.synthetic",
    "write_suite": "m2dino.data.synthetic",
    "IMAGE_MEAN": "m2dino.data.transforms",
    "IMAGE_STD": "m2dino.data.transforms",
    "Augment": "m2dino.data.transforms",
    "SampleTransform": "m2dino.data.transforms",
    "denormalize": "m2dino.data.transforms",
    "scan_dataset": "m2dino.data.validate",
}
__all__ = [
    "Augment",
    "DIFFICULTY",
    "DataValidationError",
    "FMUIAData",
    "FMUIADataset",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "MultiTaskBatchSampler",
    "Problem",
    "Record",
    "SampleTransform",
    "Scan",
    "apply_split",
    "collate",
    "denormalize",
    "ensure_synthetic",
    "load_fmuia",
    "make_split",
    "raw_target",
    "read_csvs",
    "read_split",
    "resolve_data_root",
    "scan_dataset",
    "task_sizes",
    "write_split",
    "write_suite",
]
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

