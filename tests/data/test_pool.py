"""The unlabeled pretraining pool: deterministic, drawn from every scene family and scanner,
and disjoint from every suite image: by its seed streams (for any seeds) and by its pixels."""
import hashlib

import numpy as np
from PIL import Image

from m2dino.data.synthetic import POOL_STREAM, pool_image, pool_images, write_suite
from m2dino.data.synthetic.pool import pool_seed_words
from m2dino.tasks import TASKS


def state(words) -> tuple:
    return tuple(np.random.SeedSequence(words).generate_state(4))


def test_pool_streams_never_meet_a_suite_stream():
    """NumPy pads seed entropy with zeros to 4 words, so [s, POOL_STREAM, i] is [s, POOL_STREAM,
    i, 0]: a suite image's [seed, task index, split, i] matches it only if a task index were
    POOL_STREAM. Checked on the seed states themselves for a grid of seeds and indices."""
    assert POOL_STREAM >= len(TASKS) and POOL_STREAM < 2**32  # one entropy word, no task index
    assert state([0, POOL_STREAM, 5]) == state([0, POOL_STREAM, 5, 0])  # the padding the argument uses
    pool = {state(pool_seed_words(i, seed)) for seed in range(3) for i in range(100)}
    suite = {state([seed, task, split, i]) for seed in range(3) for task in range(len(TASKS))
             for split in (0, 1) for i in range(100)}
    assert len(pool) == 300 and pool.isdisjoint(suite)


def test_no_pool_image_is_a_suite_image(tmp_path):
    """Pixels too: none of 120 pool images equals (or nearly equals, at 32 px) any image of a
    small suite of the same scene families."""
    tasks = ["breast_lesion", "fetal_head", "lung_2cls", "thyroid_nodule", "organ_cls"]
    write_suite(tmp_path, tasks=tasks, scale=1e-4, min_train=8, min_val=8, workers=1)
    suite = [np.asarray(Image.open(p).convert("L")) for p in tmp_path.rglob("*")
             if p.suffix in (".png", ".jpg", ".jpeg", ".bmp") and "masks" not in p.parts]
    pool = [pool_image(i) for i in range(120)]
    digests = {hashlib.sha256(a.tobytes()).hexdigest() for a in suite}
    assert not digests & {hashlib.sha256(a.tobytes()).hexdigest() for a in pool}

    def thumb(a):
        return np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR), np.float32)

    s, p = np.stack([thumb(a) for a in suite]), np.stack([thumb(a) for a in pool])
    distances = np.sqrt(((p[:, None] - s[None]) ** 2).mean(axis=(2, 3)))
    assert distances.min() > 5.0  # grey levels RMS: different speckle alone is ~30


def test_pool_is_deterministic_resized_and_varied():
    a = pool_images(12, seed=0, size=64, workers=1)
    b = pool_images(12, seed=0, size=64, workers=2)
    assert a.shape == (12, 64, 64) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, pool_images(12, seed=1, size=64, workers=1))
    assert np.array_equal(a[3], np.asarray(Image.fromarray(pool_image(3)).resize((64, 64), Image.BILINEAR)))
    assert len({x.tobytes() for x in a}) == 12 and min(x.std() for x in a) > 10
