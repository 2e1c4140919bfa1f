"""Draw detections on a copy of an image: a box, a label and a confidence, one colour per label.

>>> annotated = draw_detections(image, result.detections)   # result from the Predictor
>>> annotated.save("annotated.png")

Detections may be any objects with ``label``, ``box`` (xyxy, original pixels) and optionally
``score`` attributes, or dicts with those keys. The colour of a label is fixed (a hash of its
text into a palette), so the same class has the same colour across images. PIL's default font is
used; nothing is downloaded.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vlm_fo1.images import load_image

# Tableau-like palette: distinct, readable on photos.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (255, 187, 120),
    (152, 223, 138),
)


def label_color(label: str) -> tuple[int, int, int]:
    """The palette colour of ``label`` (stable across runs and images)."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _fields(detection: Any) -> tuple[str, tuple[float, float, float, float], float | None]:
    if isinstance(detection, Mapping):
        label, box, score = detection.get("label", ""), detection["box"], detection.get("score")
    else:
        label, box, score = getattr(detection, "label", ""), detection.box, getattr(detection, "score", None)
    values = tuple(float(v) for v in box)
    if len(values) != 4:
        raise ValueError(f"a detection box must be 4 numbers (x1, y1, x2, y2), got {box!r}")
    return str(label), (values[0], values[1], values[2], values[3]), None if score is None else float(score)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def draw_detections(image: Any, detections: Iterable[Any], *, line_width: int | None = None) -> Image.Image:
    """A copy of ``image`` (path, PIL or array) with every detection drawn on it.

    Args:
        image: the original image (boxes are in its pixels).
        detections: objects or dicts with ``label``, ``box`` and optional ``score``.
        line_width: box outline width in pixels (default: about 0.4 % of the short side, at least 1).
    """
    canvas = load_image(image).copy()
    width, height = canvas.size
    thickness = line_width if line_width is not None else max(1, round(min(width, height) / 250))
    font = _font(max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)
    for detection in detections:
        label, (x1, y1, x2, y2), score = _fields(detection)
        color = label_color(label)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=thickness)
        text = label if score is None else f"{label} {score:.2f}"
        if not text:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        y = y1 - text_h - 4 if y1 - text_h - 4 >= 0 else y1  # above the box, else inside it
        x = min(max(0.0, x1), max(0.0, width - text_w - 4))
        draw.rectangle((x, y, x + text_w + 4, y + text_h + 4), fill=color)
        draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)
    return canvas
