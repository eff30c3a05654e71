"""The unlabeled pretraining pool: synthetic B-mode images that are none of the suite's images.

The pool is what the shipped `dinov3_tiny` start (m2dino.training.pretrain_synthetic) learnt
from, as DINOv3 learnt from unlabeled images before anyone fine-tuned it. Each pool image draws
a scene family uniformly (every organ and plane the suite has, `FAMILIES`) with its factors,
and a scanner uniformly (every group's `Acquisition`, so every family is seen through every
scanner); no label is computed or kept.

Disjoint by construction: pool image i of seed s is drawn from the seed sequence
(s, POOL_STREAM, i), a suite image from (seed, task index, split, i) with a task index below 27.
NumPy's SeedSequence pads entropy with zero words, so a pool sequence equals a suite one only
if POOL_STREAM equalled a task index: it is 0x706F6F6C ("pool"), so the streams never meet, for
any suite seed and any pool seed (tests/data/test_pool.py checks it, and the pixels too).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from m2dino.data.synthetic.acquisition import ACQUISITIONS
from m2dino.data.synthetic.canvas import Canvas, render
from m2dino.data.synthetic.scenes import FAMILIES
from m2dino.data.synthetic.suite import image_size

POOL_STREAM = 0x706F6F6C  # one 32-bit word, far above any task index (< 27)


def pool_seed_words(index: int, seed: int = 0) -> list[int]:
    """The seed sequence entropy of pool image `index` (the suite's: [seed, task index, split, i])."""
    return [seed, POOL_STREAM, index]


def pool_image(index: int, seed: int = 0) -> np.ndarray:
    """Pool image `index`: uint8 [H, W] at its drawn size (96-192 px sides, as the suite's)."""
    rng = np.random.default_rng(pool_seed_words(index, seed))
    names = sorted(FAMILIES)
    family = FAMILIES[names[int(rng.integers(len(names)))]]
    acquisition = ACQUISITIONS[sorted(ACQUISITIONS)[int(rng.integers(len(ACQUISITIONS)))]]
    h, w = image_size(rng)
    cv = Canvas(h, w, family.probe, rng)
    z = family.sample(cv, np.random.default_rng(int(rng.integers(2**63))), {})
    sc, _ = family.paint(cv, rng, z)
    return render(sc, rng, acquisition)


def pool_batch(indices, seed: int = 0, size: int = 64) -> np.ndarray:
    """Pool images `indices` resized to size x size as the training transform resizes an image
    (per axis, PIL bilinear): uint8 [len(indices), size, size]."""
    return np.stack([np.asarray(Image.fromarray(pool_image(int(i), seed)).resize((size, size), Image.BILINEAR))
                     for i in indices])


def _chunk(args) -> np.ndarray:
    start, stop, seed, size = args
    return pool_batch(range(start, stop), seed, size)


def pool_images(count: int, seed: int = 0, size: int = 64, workers: int | None = None) -> np.ndarray:
    """Pool images 0..count-1 resized to size x size: uint8 [count, size, size]."""
    if count < 1:
        raise ValueError(f"the pool needs at least one image, got count={count}")
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    chunk = max(1, min(256, -(-count // max(1, workers))))
    jobs = [(start, min(count, start + chunk), seed, size) for start in range(0, count, chunk)]
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            return np.concatenate(list(pool.map(_chunk, jobs)))
    return np.concatenate([_chunk(job) for job in jobs])
