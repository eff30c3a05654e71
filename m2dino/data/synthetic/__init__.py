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

The names are imported on first use (PEP 562), so that the command line's --help answers at once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from m2dino._lazy import lazy_exports

if TYPE_CHECKING:
    from m2dino.data.synthetic.scenes import DIFFICULTY, build
    from m2dino.data.synthetic.suite import (
        DEFAULT_SCALE,
        DEFAULT_SEED,
        GENERATOR_VERSION,
        MIN_TRAIN,
        MIN_VAL,
        SIZE_EXPONENT,
        VAL_FRACTION,
        default_cache_root,
        ensure_synthetic,
        task_sizes,
        write_suite,
    )

_SOURCES = {
    "DIFFICULTY": "m2dino.data.synthetic.scenes",
    "build": "m2dino.data.synthetic.scenes",
    "DEFAULT_SCALE": "m2dino.data.synthetic.suite",
    "DEFAULT_SEED": "m2dino.data.synthetic.suite",
    "GENERATOR_VERSION": "m2dino.data.synthetic.suite",
    "MIN_TRAIN": "m2dino.data.synthetic.suite",
    "SIZE_EXPONENT": "m2dino.data.synthetic.suite",
    "MIN_VAL": "m2dino.data.synthetic.suite",
    "VAL_FRACTION": "m2dino.data.synthetic.suite",
    "default_cache_root": "m2dino.data.synthetic.suite",
    "ensure_synthetic": "m2dino.data.synthetic.suite",
    "task_sizes": "m2dino.data.synthetic.suite",
    "write_suite": "m2dino.data.synthetic.suite",
}
__all__ = [
    "DEFAULT_SCALE",
    "DEFAULT_SEED",
    "DIFFICULTY",
    "GENERATOR_VERSION",
    "MIN_TRAIN",
    "MIN_VAL",
    "SIZE_EXPONENT",
    "VAL_FRACTION",
    "build",
    "default_cache_root",
    "ensure_synthetic",
    "task_sizes",
    "write_suite",
]
__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

