"""Reading image and mask files: what every other part of m2dino decodes pixels with.

Every image is opened the same way (`open_image`): a regular file only (never a FIFO), its
size read from the header and refused above PIL's decompression-bomb limit
(`PIL.Image.MAX_IMAGE_PIXELS`) before a pixel is decoded, and whatever PIL raises on a file it
cannot decode turned into one ImageError naming the file. The machine's faults (a permission,
an I/O error) stay OSErrors.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from PIL import Image

from m2dino import io
from m2dino.errors import InputError, is_environment_fault


class ImageError(InputError):
    """An image or mask file that cannot be decoded (or is too large to); names the file."""


@contextmanager
def open_image(path):
    """PIL's Image.open(path) as a context manager, for a regular file of at most
    Image.MAX_IMAGE_PIXELS pixels; anything PIL raises inside the block on an undecodable file
    becomes ImageError naming it."""
    try:
        with io.open_regular(path, "rb") as handle, Image.open(handle) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.size[0] * im.size[1] > limit:
                raise ImageError(f"{path}: {im.size[0]}x{im.size[1]} pixels, over PIL's decompression-bomb limit "
                                 f"of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); not decoded")
            yield im
    except ImageError:
        raise
    except OSError as e:
        if is_environment_fault(e) or isinstance(e, FileNotFoundError):
            raise
        raise ImageError(f"{path}: cannot be decoded as an image ({e})") from e
    except InputError as e:  # not a regular file
        raise ImageError(str(e)) from e
    except Exception as e:  # noqa: BLE001 -- PIL raises SyntaxError, ValueError, struct.error, zlib.error, bomb errors...
        raise ImageError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from e


def image_size(path) -> tuple[int, int]:
    """(H, W) from the header only."""
    with open_image(path) as im:
        return im.size[1], im.size[0]


def load_mask_array(path) -> np.ndarray:
    """Class-index mask [H, W] (int64). An RGB mask is accepted only when its channels agree."""
    with open_image(path) as im:
        if im.mode in ("L", "P", "1"):
            a = np.asarray(im.convert("L") if im.mode == "1" else im)
        elif im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im)
        else:
            rgb = np.asarray(im.convert("RGB"))
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                raise ImageError(f"{path}: mask is {im.mode} with differing channels, not a class-index image")
            a = rgb[..., 0]
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ImageError(f"{path}: mask has non-integer values")
    return a.astype(np.int64)


def to_pil_image(path) -> Image.Image:
    """Open an image as PIL "L" (grayscale) or "RGB", fully decoded."""
    with open_image(path) as im:
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


def decoded_size(path) -> tuple[int, int]:
    """(W, H) of an image decoded in full (a truncated file raises ImageError here)."""
    with open_image(path) as im:
        im.load()
        return im.size
