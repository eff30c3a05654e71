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
"""
from m2dino.data.dataset import FMUIADataset, collate, raw_target
from m2dino.data.fmuia import DataValidationError, FMUIAData, load_fmuia
from m2dino.data.reader import Problem, Record, Scan, read_csvs
from m2dino.data.sampler import MultiTaskBatchSampler
from m2dino.data.splits import apply_split, make_split, read_split, write_split
from m2dino.data.synthetic import DIFFICULTY, ensure_synthetic, task_sizes, write_suite
from m2dino.data.transforms import IMAGE_MEAN, IMAGE_STD, Augment, SampleTransform, denormalize
from m2dino.data.validate import scan_dataset

__all__ = [
    "Augment", "DataValidationError", "DIFFICULTY", "FMUIAData", "FMUIADataset", "IMAGE_MEAN", "IMAGE_STD",
    "MultiTaskBatchSampler", "Problem", "Record", "SampleTransform", "Scan", "apply_split", "collate",
    "denormalize", "ensure_synthetic", "load_fmuia", "make_split", "raw_target", "read_csvs", "read_split",
    "scan_dataset", "task_sizes", "write_split", "write_suite",
]
