"""A synthetic FM_UIA suite: the 27 tasks, the exact on-disk layout, B-mode-like images.

    python -m m2dino.data.synthetic --out DIR [--scale 0.06] [--seed 0]

Why: nobody can download the challenge data here, yet every code path that reads real data,
and the TS / CG / AU comparison, must run. So this writes `train/` and `val/` roots with
`csv_files/` (paths relative to it, starting with `../`), the real task ids, `task_name`
spellings (`Regression`), class and point counts, png/jpg/bmp images and index-PNG masks.

- canvas.py: how a B-mode-like image is drawn (probe geometry, shapes, painting, rendering)
- scenes.py: what is drawn: the organ scenes, and `build`, one image and label of a task
- suite.py: the suite on disk: task sizes, the layout, `write_suite`, the cache `ensure_synthetic`
- __main__.py: the command line
"""
from m2dino.data.synthetic.scenes import DIFFICULTY, build
from m2dino.data.synthetic.suite import (
    DEFAULT_SCALE,
    DEFAULT_SEED,
    GENERATOR_VERSION,
    MIN_TRAIN,
    SIZE_EXPONENT,
    MIN_VAL,
    VAL_FRACTION,
    default_cache_root,
    ensure_synthetic,
    task_sizes,
    write_suite,
)

__all__ = [
    "DEFAULT_SCALE", "DEFAULT_SEED", "DIFFICULTY", "GENERATOR_VERSION", "MIN_TRAIN", "SIZE_EXPONENT",
    "MIN_VAL", "VAL_FRACTION", "build", "default_cache_root", "ensure_synthetic", "task_sizes",
    "write_suite",
]

