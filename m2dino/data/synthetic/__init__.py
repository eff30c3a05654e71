"""A synthetic FM_UIA suite: the 27 tasks, the exact on-disk layout, B-mode-like images.

    python -m m2dino.data.synthetic --out DIR [--scale 0.06] [--seed 0]

Why: nobody can download the challenge data here, yet every code path that reads real data,
and the TS / CG / AU comparison, must run. So this writes `train/` and `val/` roots with
`csv_files/` (paths relative to it, starting with `../`), the real task ids, `task_name`
spellings (`Regression`), class and point counts, png/jpg/bmp images and index-PNG masks.

Transfer between the tasks is designed, not incidental: each scene is drawn from named latent
factors that several tasks of a clinical group read (designed positive transfer), the Breast
group's two classifiers read one clinical variable from two independent cues (a designed
conflict), and each group's images come from its own scanner (domain shift). The design ships
with the suite as design.json; `load_design(root)` reads it (schema: docs/data.md).

- acquisition.py: each clinical group's scanner (point-spread, speckle grain, time-gain, overlays)
- canvas.py: how a B-mode-like image is drawn (probe geometry, shapes, painting, rendering)
- scenes.py: what is drawn: scene families from latent factors, each task's recipe, `draw`/`build`
- design.py: the transfer design the recipes imply, design.json, `load_design`
- suite.py: the suite on disk: task sizes, the layout, `write_suite`, the cache `ensure_synthetic`
- pool.py: the unlabeled pretraining pool, disjoint from every suite image
- __main__.py: the command line

`PRETRAINED_WEIGHTS` is the `dinov3_tiny` backbone pretrained on the pool (shipped with the
package; rebuilt by `python -m m2dino.training.pretrain_synthetic`), for `--pretrained`.

The names are imported on first use (PEP 562), so that the command line's --help answers at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from m2dino._lazy import lazy_exports

# The backbone pretrained on the pool (official DINOv3 keys, fp16): a path, so that reading it
# costs nothing until a run loads it.
PRETRAINED_WEIGHTS = Path(__file__).resolve().with_name("dinov3_tiny_synthetic.safetensors")

if TYPE_CHECKING:
    from m2dino.data.synthetic.acquisition import ACQUISITIONS, Acquisition
    from m2dino.data.synthetic.design import (
        DESIGN_FILE,
        Design,
        find_design,
        load_design,
        transfer_design,
        write_design,
    )
    from m2dino.data.synthetic.pool import POOL_STREAM, pool_batch, pool_image, pool_images
    from m2dino.data.synthetic.scenes import DIFFICULTY, FAMILIES, RECIPES, build, draw
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
    "ACQUISITIONS": "m2dino.data.synthetic.acquisition",
    "Acquisition": "m2dino.data.synthetic.acquisition",
    "DESIGN_FILE": "m2dino.data.synthetic.design",
    "Design": "m2dino.data.synthetic.design",
    "transfer_design": "m2dino.data.synthetic.design",
    "find_design": "m2dino.data.synthetic.design",
    "load_design": "m2dino.data.synthetic.design",
    "write_design": "m2dino.data.synthetic.design",
    "POOL_STREAM": "m2dino.data.synthetic.pool",
    "pool_batch": "m2dino.data.synthetic.pool",
    "pool_image": "m2dino.data.synthetic.pool",
    "pool_images": "m2dino.data.synthetic.pool",
    "DIFFICULTY": "m2dino.data.synthetic.scenes",
    "FAMILIES": "m2dino.data.synthetic.scenes",
    "RECIPES": "m2dino.data.synthetic.scenes",
    "build": "m2dino.data.synthetic.scenes",
    "draw": "m2dino.data.synthetic.scenes",
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
    "ACQUISITIONS",
    "Acquisition",
    "DESIGN_FILE",
    "Design",
    "FAMILIES",
    "POOL_STREAM",
    "PRETRAINED_WEIGHTS",
    "RECIPES",
    "transfer_design",
    "draw",
    "find_design",
    "load_design",
    "pool_batch",
    "pool_image",
    "pool_images",
    "write_design",
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

