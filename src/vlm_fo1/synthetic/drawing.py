"""Binary masks of the world's shapes and words (no anti-aliasing, so boxes and colours are exact)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPE_KINDS = ("circle", "square", "triangle", "star", "diamond", "hexagon")


def _polygon(kind: str, s: int) -> list[tuple[float, float]]:
    """Vertices of a polygon kind inside the square ``[0, s - 1]²``."""
    m = s - 1
    if kind == "square":
        return [(0, 0), (m, 0), (m, m), (0, m)]
    if kind == "triangle":
        return [(m / 2, 0), (m, m), (0, m)]
    if kind == "diamond":
        return [(m / 2, 0), (m, m / 2), (m / 2, m), (0, m / 2)]
    if kind == "hexagon":
        return [
            (m / 2 + m / 2 * math.cos(a), m / 2 + m / 2 * math.sin(a)) for a in np.arange(6) * math.pi / 3
        ]
    if kind == "star":
        points = []
        for i in range(10):
            radius = m / 2 if i % 2 == 0 else m / 2 * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((m / 2 + radius * math.cos(angle), m / 2 + radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape kind: expected one of {SHAPE_KINDS}, got {kind!r}")


def _crop(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    out = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
    out.flags.writeable = False
    return out


@lru_cache(maxsize=512)
def shape_mask(kind: str, extent: int) -> np.ndarray:
    """Tight binary mask ``(h, w)`` of a shape whose bounding square has side ``extent`` (read-only)."""
    canvas = Image.new("L", (extent, extent), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse((0, 0, extent - 1, extent - 1), fill=255)
    else:
        draw.polygon(_polygon(kind, extent), fill=255)
    return _crop(np.asarray(canvas) > 0)


@lru_cache(maxsize=256)
def word_mask(text: str, font_size: int) -> np.ndarray:
    """Tight binary mask ``(h, w)`` of ``text`` in PIL's default font at ``font_size`` (read-only)."""
    font = ImageFont.load_default(size=font_size)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # binary glyphs: exact colour and an exact box
    draw.text((2 - left, 2 - top), text, font=font, fill=255)
    return _crop(np.asarray(canvas) > 0)
