"""Image input: load anything reasonable as an 8-bit RGB PIL image, and size it for the encoders.

Rules (each tested):
- paths, PIL images and numpy arrays (H×W, H×W×1/3/4; uint8, uint16 or float) are accepted;
- grayscale, palette, CMYK … are converted to RGB; images with alpha are composited onto white;
- 16-bit images (``I;16``/``I`` modes, uint16 arrays) are scaled to 8 bits (÷257), not clipped;
- float images in [0, 1] are scaled by 255, other float images are clipped to [0, 255];
- an empty image, an unreadable file or an aspect ratio above 200 raises ``ValueError``.
EXIF orientation is *not* applied: boxes refer to the stored pixel grid, as in COCO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_ASPECT_RATIO = 200.0
ImageInput = Image.Image | np.ndarray | str | Path


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(
            f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
        )
    if array.dtype == np.uint8:
        data = array
    elif array.dtype == np.uint16:
        data = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("image array contains NaN or inf values")
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        data = np.clip(array * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        data = np.clip(array.astype(np.int64) * (255 if array.dtype == np.bool_ else 1), 0, 255).astype(
            np.uint8
        )
    else:
        raise ValueError(f"unsupported image array dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(data))  # L, RGB or RGBA from the shape


def _high_depth_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image)
    if image.mode == "F":
        return _from_array(array.astype(np.float32))
    wide = array.astype(np.int64)
    # 16-bit data in a 32-bit container (PNG 16-bit greyscale loads as "I"): scale by 257.
    if wide.size and (image.mode.startswith("I;16") or wide.max() > 255):
        wide = np.clip(wide, 0, 65535).astype(np.float32) / 257.0
    return Image.fromarray(np.clip(np.round(wide), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB (alpha composited onto white, high bit depths scaled to 8 bits)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: Any) -> Image.Image:
    """Load ``source`` (path, PIL image or numpy array) as an RGB PIL image; never mutates it."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(f"cannot read image {str(source)!r}: {err}") from err
    elif isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    else:
        raise ValueError(f"expected an image path, PIL image or numpy array, got {type(source).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"expected a non-empty image, got size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"expected an aspect ratio of at most {MAX_ASPECT_RATIO:g}, got {ratio:.1f} ({width}x{height})"
        )
    return to_rgb(image)


def fit_for_encoders(image: Image.Image, *, max_side: int = 2048, min_side: int = 28) -> Image.Image:
    """Resize (bicubic) so the short side is at least ``min_side`` and the long side at most ``max_side``.

    This is the release's first step (official-release.md §5): big images are downscaled so the
    long side is 2048, tiny ones enlarged to 28 px. Returns the image itself when no resize is needed.
    """
    width, height = image.size
    scale = 1.0
    if min(width, height) < min_side:
        scale = min_side / min(width, height)
    if max(width, height) * scale > max_side:
        scale = max_side / max(width, height)
    if scale == 1.0:
        return image
    size = (max(min_side, int(width * scale)), max(min_side, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)
