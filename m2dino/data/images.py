"""Reading image and mask files: what every other part of m2dino decodes pixels with."""
from __future__ import annotations

import numpy as np
from PIL import Image


def image_size(path) -> tuple[int, int]:
    """(H, W) from the header only."""
    with Image.open(path) as im:
        return im.size[1], im.size[0]


def load_mask_array(path) -> np.ndarray:
    """Class-index mask [H, W] (int64). An RGB mask is accepted only when its channels agree."""
    with Image.open(path) as im:
        if im.mode in ("L", "P", "1"):
            a = np.asarray(im.convert("L") if im.mode == "1" else im)
        elif im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im)
        else:
            rgb = np.asarray(im.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ValueError(f"mask is {im.mode} with differing channels, not a class-index image")
            a = rgb[..., 0]
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError("mask has non-integer values")
    return a.astype(np.int64)


def to_pil_image(path) -> Image.Image:
    """Open an image as PIL "L" (grayscale) or "RGB", fully decoded."""
    with Image.open(path) as im:
        im.load()
        if im.mode == "L":
            return im.copy()
        if im.mode == "RGB":
            # grayscale stored as RGB (common in ultrasound exports): keep one channel, 3x less work
            a = np.asarray(im)
            if np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]):
                return Image.fromarray(np.ascontiguousarray(a[..., 0]), "L")
            return im.copy()
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float32)
            top = float(a.max()) or 1.0
            return Image.fromarray(np.clip(a / top * 255.0, 0, 255).astype(np.uint8), "L")
        if im.mode in ("1", "LA"):
            return im.convert("L")
        return im.convert("RGB")
