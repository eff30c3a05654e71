"""Transforms keep masks, boxes and points aligned with the image (checked numerically),
flip only where allowed, normalise as DINOv3 expects; the dataset item follows DESIGN.md."""
import numpy as np
import pytest
import torch
from PIL import Image

from m2dino.data.transforms import IMAGE_MEAN, IMAGE_STD, Augment, SampleTransform, denormalize

H, W, S = 90, 130, 64


def scene(cx=50.0, cy=40.0, r=14.0):
    """A bright disc on black: its mask, its box and its centre and top point, exactly."""
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    img = np.where(disc, 230, 0).astype(np.uint8)
    ys_, xs_ = np.nonzero(disc)
    box = (float(xs_.min()), float(ys_.min()), float(xs_.max() + 1), float(ys_.max() + 1))
    return Image.fromarray(img), disc.astype(np.uint8), box, [(cx, cy), (cx, cy - r)]


def bright(tensor):
    return denormalize(tensor)[0].numpy() > 0.45


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def test_plain_resize_scales_every_annotation_per_axis():
    img, mask, box, pts = scene()
    t = SampleTransform(S, train=False)
    x, tgt = t(img, {"mask": mask})
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    _, b = t(img, {"box": box})
    np.testing.assert_allclose(b["box"].numpy(), np.array(box) / [W, H, W, H], rtol=1e-6)
    _, p = t(img, {"points": pts})
    np.testing.assert_allclose(p["points"].numpy(), np.array(pts) / [W, H], rtol=1e-6)
    # nearest-neighbour mask agrees with the bilinear image and with the scaled centre
    m = tgt["mask"].numpy()
    assert set(np.unique(m)) == {0, 1} and tgt["mask"].dtype == torch.int64
    inter = (bright(x) & (m == 1)).sum() / ((bright(x) | (m == 1)).sum())
    assert inter > 0.9
    np.testing.assert_allclose(centroid(m), np.array(pts[0]) * [S / W, S / H], atol=0.6)


@pytest.mark.parametrize("seed", range(8))
def test_augmentation_moves_mask_box_points_and_image_together(seed):
    img, mask, box, pts = scene()
    aug = Augment(p_affine=1.0, rotate_deg=15, translate=0.08, scale=(0.85, 1.15), p_hflip=0.5,
                  speckle=0.0, brightness=0.0, contrast=0.0, gamma=None)
    t = SampleTransform(S, train=True, augment=aug)
    def rng():  # same draw for each call
        return np.random.default_rng(seed)
    x, tm = t(img, {"mask": mask}, rng())
    _, tp = t(img, {"points": pts}, rng())
    m = tm["mask"].numpy()
    # image and mask: the bright region is the mask
    inter = (bright(x) & (m == 1)).sum() / ((bright(x) | (m == 1)).sum())
    assert inter > 0.85
    # the disc centre lands on the mask's centroid; the top point on its boundary
    c = tp["points"].numpy() * S
    np.testing.assert_allclose(c[0], centroid(m), atol=0.8)
    edge = m.astype(bool) & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)).astype(bool)
    ys, xs = np.nonzero(edge)
    assert np.hypot(xs + 0.5 - c[1, 0], ys + 0.5 - c[1, 1]).min() < 1.0
    # detection: no rotation, the box stays the mask's box
    _, tb, = t(img, {"box": box}, rng(), rotate=True)
    _, tm2 = t(img, {"mask": mask}, rng(), rotate=False)
    ys, xs = np.nonzero(tm2["mask"].numpy())
    np.testing.assert_allclose(tb["box"].numpy() * S, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.2)


def test_flip_only_where_the_task_allows_it():
    img, mask, box, pts = scene(cx=30.0)
    aug = Augment(p_affine=0.0, p_hflip=1.0, speckle=0.0, brightness=0.0, contrast=0.0, gamma=None)
    t = SampleTransform(S, train=True, augment=aug)
    _, flipped = t(img, {"points": pts}, np.random.default_rng(0), hflip=True)
    _, kept = t(img, {"points": pts}, np.random.default_rng(0), hflip=False)
    np.testing.assert_allclose(flipped["points"][0].numpy(), [1 - 30.0 / W, 40.0 / H], atol=1e-6)
    np.testing.assert_allclose(kept["points"][0].numpy(), [30.0 / W, 40.0 / H], atol=1e-6)
    x, m = t(img, {"mask": mask}, np.random.default_rng(0), hflip=True)
    assert centroid(m["mask"].numpy())[0] > S / 2  # the disc moved right with the mask


def test_landmarks_never_leave_the_frame():
    img, _, _, _ = scene()
    pts = [(0.5, 0.5), (W - 0.5, H - 0.5)]  # corners: most affines would push them out
    aug = Augment(p_affine=1.0, rotate_deg=20, translate=0.1)
    t = SampleTransform(S, train=True, augment=aug)
    for seed in range(20):
        _, tp = t(img, {"points": pts}, np.random.default_rng(seed))
        p = tp["points"].numpy()
        assert p.min() >= 0 and p.max() <= 1


def test_grayscale_becomes_three_channels_with_dinov3_normalisation():
    img = Image.fromarray(np.full((20, 30), 128, np.uint8))
    x, _ = SampleTransform(16)(img, {"label": 1})
    expected = (128 / 255 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
    np.testing.assert_allclose(x[:, 5, 5].numpy(), expected, rtol=1e-5)
    rgb = Image.fromarray(np.stack([np.full((20, 30), v, np.uint8) for v in (10, 128, 250)], -1))
    x, _ = SampleTransform(16)(rgb, {"label": 0})
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (np.array([10, 128, 250]) / 255 - IMAGE_MEAN) / IMAGE_STD, rtol=1e-5)


def test_photometric_augmentation_changes_only_intensities():
    img, mask, _, _ = scene()
    aug = Augment(p_affine=0.0, p_hflip=0.0)
    a, ta = SampleTransform(S, train=True, augment=aug)(img, {"mask": mask}, np.random.default_rng(1))
    b, tb = SampleTransform(S, train=False)(img, {"mask": mask})
    assert not torch.allclose(a, b)
    assert torch.equal(ta["mask"], tb["mask"])
    assert torch.isfinite(a).all()


def test_dataset_item_and_collate_follow_the_contract(tmp_path):
    from m2dino.data import load_fmuia
    from m2dino.data.dataset import FMUIADataset, collate
    from m2dino.data.synthetic import write_suite

    tasks = ["fetal_head", "breast_2cls", "uterine_fibroid_det", "fetal_femur"]
    write_suite(tmp_path, tasks=tasks, scale=1e-4, min_train=3, min_val=1, workers=1)
    data = load_fmuia(tmp_path)
    ds = FMUIADataset(data.train, data.tasks, image_size=48, train=True, seed=3)
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert set(it) == {"image", "task", "target", "orig_size", "image_path", "mask_path"}
        assert it["image"].shape == (3, 48, 48)
        assert it["image_path"].startswith("../")
        kind = data.tasks[it["task"]].task_type
        tgt = it["target"]
        if kind == "segmentation":
            assert tgt["mask"].shape == (48, 48) and it["mask_path"].startswith("../")
        else:
            assert it["mask_path"] is None
        if kind == "detection":
            assert tgt["box"].shape == (4,) and 0 <= tgt["box"].min() and tgt["box"].max() <= 1
        if kind == "regression":
            assert tgt["points"].shape == (2, 2)
        if kind == "classification":
            assert tgt["label"].shape == () and tgt["label"].dtype == torch.int64
        h, w = it["orig_size"]
        assert 96 <= h <= 192 and 96 <= w <= 192
    # augmentation is a function of (seed, epoch, index)
    assert torch.equal(ds[0]["image"], items[0]["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], items[0]["image"])
    batch = collate(items[:5])
    assert batch["images"].shape == (5, 3, 48, 48)
    assert batch["tasks"] == [it["task"] for it in items[:5]]
    assert set(batch) == {"images", "tasks", "targets", "orig_sizes", "image_paths", "mask_paths"}


def test_dataset_cache_gives_the_same_items_and_keeps_to_its_budget(tmp_path):
    from m2dino.data import load_fmuia
    from m2dino.data.dataset import FMUIADataset
    from m2dino.data.synthetic import write_suite

    tasks = ["fetal_head", "breast_2cls", "uterine_fibroid_det", "fetal_femur"]
    write_suite(tmp_path, tasks=tasks, scale=1e-4, min_train=3, min_val=1, workers=1)
    data = load_fmuia(tmp_path)
    plain = FMUIADataset(data.train, data.tasks, image_size=48, train=True, seed=3)
    cached = FMUIADataset(data.train, data.tasks, image_size=48, train=True, seed=3, cache_bytes=2**30)
    for epoch in (0, 1, 2):  # epoch 0 fills the cache, later epochs read it
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["image"], b["image"]) and a["orig_size"] == b["orig_size"]
            assert a["target"].keys() == b["target"].keys()
            assert all(torch.equal(a["target"][k], b["target"][k]) for k in a["target"])
    assert len(cached._cache) == len(cached)
    small = FMUIADataset(data.train, data.tasks, image_size=48, train=True, cache_bytes=30_000)
    off = FMUIADataset(data.train, data.tasks, image_size=48, train=True)  # the default: no cache
    for i in range(len(small)):
        small[i], off[i]
    assert 0 < small._cached_bytes <= 30_000 and len(small._cache) < len(small)
    assert not off._cache
