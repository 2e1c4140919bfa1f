"""Procedural scenes of the miniature world: coloured shapes and short words on light backgrounds.

A scene is drawn from one integer seed and is byte-identical for the same seed and config. Every
drawn object is ground truth: its box is the tight box of its *visible* pixels (xyxy, image
pixels, pixel ``i`` covering ``[i, i + 1)``), and placement rejects any layout that would hide more
than ``1 - min_visible_fraction`` of an object, so no half-hidden object is drawn unlabelled.
Words are never overlapped and never overlap anything, so they always stay readable.

Objects are painted with binary masks (no anti-aliasing, text drawn with ``fontmode = "1"``), so
an object's pixels have exactly its colour. Clutter (thin grey lines and dots) is drawn under the
objects and is never ground truth.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from vlm_fo1.synthetic.drawing import SHAPE_KINDS, shape_mask, word_mask

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
RGB = tuple[int, int, int]

WORD_KIND = "word"
COLOURS: tuple[tuple[str, RGB], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 165, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (235, 195, 20)),
    ("purple", (140, 55, 180)),
    ("orange", (245, 125, 25)),
)
SIZES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("small", (14, 18)),
    ("medium", (22, 28)),
    ("large", (32, 40)),
)
WORD_FONT_SIZES: tuple[tuple[str, tuple[int, int]], ...] = (
    ("small", (12, 13)),
    ("medium", (15, 16)),
    ("large", (18, 20)),
)
WORDS = ("CAT", "DOG", "SUN", "BOX", "KEY", "CUP", "MAP", "HAT", "FISH", "BIRD", "TREE", "LAMP")
BACKGROUNDS: tuple[RGB, ...] = (
    (250, 250, 250),
    (238, 238, 228),
    (228, 236, 246),
    (246, 236, 226),
    (232, 244, 232),
    (242, 232, 242),
)


def _check_range(name: str, value: tuple[int, int], low: int = 0) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {value!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn (all ranges inclusive; sizes in pixels).

    Attributes:
        width_range / height_range: image side lengths (non-square images are normal).
        objects_range: objects per scene (fewer when placement fails for lack of room).
        kinds: shape kinds; words are added with ``word_probability`` per object.
        colours: ``(name, rgb)`` pairs, well separated and saturated.
        sizes: ``(name, (min, max))`` extent of a shape's bounding square per size class.
        word_font_sizes: ``(name, (min, max))`` font size per size class of a word.
        words: the word vocabulary (short, uppercase).
        repeat_kind_probability: chance an object reuses a kind already placed (more counting
            and relation material).
        max_overlap: the largest share of the smaller of two shape boxes that may overlap.
        min_visible_fraction: every object keeps at least this share of its pixels visible.
        colour_jitter: per-channel jitter of an object's colour (pixels within stay uniform).
        clutter_range: number of grey marks (lines and dots) under the objects.
        gradient_probability / noise_probability: background variations.
        max_attempts: placement tries per object.
    """

    width_range: tuple[int, int] = (112, 168)
    height_range: tuple[int, int] = (112, 168)
    objects_range: tuple[int, int] = (1, 6)
    kinds: tuple[str, ...] = SHAPE_KINDS
    colours: tuple[tuple[str, RGB], ...] = COLOURS
    sizes: tuple[tuple[str, tuple[int, int]], ...] = SIZES
    word_font_sizes: tuple[tuple[str, tuple[int, int]], ...] = WORD_FONT_SIZES
    words: tuple[str, ...] = WORDS
    word_probability: float = 0.15
    repeat_kind_probability: float = 0.35
    max_overlap: float = 0.3
    min_visible_fraction: float = 0.7
    colour_jitter: int = 12
    clutter_range: tuple[int, int] = (0, 4)
    backgrounds: tuple[RGB, ...] = BACKGROUNDS
    gradient_probability: float = 0.4
    noise_probability: float = 0.4
    max_attempts: int = 40

    def __post_init__(self) -> None:
        _check_range("width_range", self.width_range, 32)
        _check_range("height_range", self.height_range, 32)
        _check_range("objects_range", self.objects_range, 1)
        _check_range("clutter_range", self.clutter_range)
        for name, value in (
            ("word_probability", self.word_probability),
            ("repeat_kind_probability", self.repeat_kind_probability),
            ("max_overlap", self.max_overlap),
            ("min_visible_fraction", self.min_visible_fraction),
            ("gradient_probability", self.gradient_probability),
            ("noise_probability", self.noise_probability),
        ):
            _check_probability(name, value)
        unknown = sorted(set(self.kinds) - set(SHAPE_KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {SHAPE_KINDS}, got {self.kinds!r}")
        if self.word_probability > 0 and not self.words:
            raise ValueError("word_probability > 0 needs a non-empty word vocabulary, got words=()")
        if [n for n, _ in self.sizes] != [n for n, _ in self.word_font_sizes]:
            raise ValueError(
                f"sizes and word_font_sizes must name the same classes, got "
                f"{[n for n, _ in self.sizes]} and {[n for n, _ in self.word_font_sizes]}"
            )
        for name, extent in (*self.sizes, *self.word_font_sizes):
            _check_range(f"size {name!r}", extent, 4)
        largest = max(hi for _, (_, hi) in self.sizes)
        smallest_side = min(self.width_range[0], self.height_range[0])
        if largest + 4 > smallest_side:
            raise ValueError(
                f"largest shape ({largest} px) must fit the smallest image side ({smallest_side} px)"
            )

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)

    @property
    def size_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.sizes)

    @property
    def classes(self) -> tuple[str, ...]:
        """Detection classes: the shape kinds, then ``"word"`` when words can appear."""
        return (*self.kinds, WORD_KIND) if self.word_probability > 0 else self.kinds


@dataclass(frozen=True)
class SceneObject:
    """One ground-truth object.

    Attributes:
        kind: a shape kind (``"circle"``…) or ``"word"``.
        colour / size: names from the config.
        text: the word for ``kind == "word"``, else None.
        box: tight xyxy box of the visible pixels, floats in image pixels.
        area: pixel count of the whole drawn shape, before occlusion.
        z: drawing order (higher is drawn later, on top).
        visible_fraction: share of ``area`` left visible by the objects above.
    """

    kind: str
    colour: str
    size: str
    text: str | None
    box: Box
    area: float
    z: int
    visible_fraction: float

    @property
    def is_word(self) -> bool:
        return self.kind == WORD_KIND

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "colour": self.colour,
            "size": self.size,
            "text": self.text,
            "box": list(self.box),
            "area": self.area,
            "z": self.z,
            "visible_fraction": round(self.visible_fraction, 4),
        }


@dataclass(frozen=True)
class Scene:
    """A rendered scene: the image, its objects (in z order), ``size = (width, height)``, its seed;
    ``object_map`` ``(H, W)`` int16: the index of the object each pixel shows, -1 for none."""

    image: Image.Image = field(compare=False)
    objects: tuple[SceneObject, ...]
    size: tuple[int, int]
    seed: int
    clutter_boxes: tuple[Box, ...] = ()
    config: SceneConfig = field(default_factory=SceneConfig, repr=False, compare=False)
    object_map: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class _Placed:
    kind: str
    colour: str
    size: str
    text: str | None
    rgb: RGB
    mask: np.ndarray  # (H, W) bool, the whole shape
    visible: np.ndarray  # (H, W) bool, what the objects above leave
    box: Box  # full (unoccluded) box


def _background(config: SceneConfig, rng: random.Random, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, 3)`` float background: a light colour, maybe a gradient, maybe noise."""
    width, height = size
    base = np.array(rng.choice(config.backgrounds), dtype=np.float32)
    canvas = np.broadcast_to(base, (height, width, 3)).copy()
    if rng.random() < config.gradient_probability:
        angle = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(8, 20)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
        canvas -= (amplitude * (ramp + 0.5))[..., None]
    if rng.random() < config.noise_probability:
        noise_rng = np.random.default_rng(rng.getrandbits(64))
        canvas += noise_rng.normal(0.0, rng.uniform(2, 5), size=canvas.shape).astype(np.float32)
    return canvas


def _draw_clutter(image: Image.Image, config: SceneConfig, rng: random.Random) -> tuple[Box, ...]:
    """Thin grey lines and dots; returns their boxes."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    boxes: list[Box] = []
    for _ in range(rng.randint(*config.clutter_range)):
        grey = rng.randint(90, 170)
        x, y = rng.uniform(2, width - 3), rng.uniform(2, height - 3)
        if rng.random() < 0.6:
            length, angle = rng.uniform(6, 22), rng.uniform(0, math.pi)
            x2 = min(max(x + length * math.cos(angle), 0), width - 1)
            y2 = min(max(y + length * math.sin(angle), 0), height - 1)
            draw.line((x, y, x2, y2), fill=(grey, grey, grey), width=1)
            boxes.append((min(x, x2), min(y, y2), max(x, x2) + 1, max(y, y2) + 1))
        else:
            radius = rng.uniform(1, 2.5)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(grey, grey, grey))
            boxes.append((x - radius, y - radius, x + radius + 1, y + radius + 1))
    return tuple(boxes)


def _overlap_share(a: Box, b: Box, margin: float = 0.0) -> float:
    """Intersection of two boxes (``a`` grown by ``margin``) over the smaller box's area."""
    w = min(a[2] + margin, b[2]) - max(a[0] - margin, b[0])
    h = min(a[3] + margin, b[3]) - max(a[1] - margin, b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller


def _pick_object(
    config: SceneConfig, rng: random.Random, placed: list[_Placed]
) -> tuple[str, str, str | None]:
    """``(kind, size name, text)`` of the next object."""
    size = rng.choice(config.size_names)
    if rng.random() < config.word_probability:
        return WORD_KIND, size, rng.choice(config.words)
    shapes = [p.kind for p in placed if p.kind != WORD_KIND]
    if shapes and rng.random() < config.repeat_kind_probability:
        return rng.choice(shapes), size, None
    return rng.choice(config.kinds), size, None


def _object_mask(
    config: SceneConfig, rng: random.Random, kind: str, size: str, text: str | None
) -> np.ndarray:
    if kind == WORD_KIND:
        assert text is not None
        low, high = dict(config.word_font_sizes)[size]
        return word_mask(text, rng.randint(low, high))
    low, high = dict(config.sizes)[size]
    return shape_mask(kind, rng.randint(low, high))


def _box_fits(box: Box, kind: str, placed: list[_Placed], config: SceneConfig) -> bool:
    """Overlap rules: words touch nothing; shapes overlap at most ``max_overlap`` of the smaller box."""
    for other in placed:
        words = WORD_KIND in (kind, other.kind)
        share = _overlap_share(box, other.box, margin=2.0 if words else 0.0)
        if (words and share > 0) or share > config.max_overlap:
            return False
    return True


def _keeps_visible(mask: np.ndarray, placed: list[_Placed], config: SceneConfig) -> bool:
    """True when every object under ``mask`` keeps ``min_visible_fraction`` of its pixels."""
    for other in placed:
        left = np.count_nonzero(other.visible & ~mask)
        if left < config.min_visible_fraction * np.count_nonzero(other.mask):
            return False
    return True


def _try_place(
    config: SceneConfig, rng: random.Random, size: tuple[int, int], placed: list[_Placed]
) -> _Placed | None:
    """One new object on top of ``placed``, or None when no position works."""
    width, height = size
    kind, size_name, text = _pick_object(config, rng, placed)
    colour, base = rng.choice(config.colours)
    jitter = config.colour_jitter
    r, g, b = (min(255, max(0, c + rng.randint(-jitter, jitter))) for c in base)
    local = _object_mask(config, rng, kind, size_name, text)
    h, w = local.shape
    for _ in range(config.max_attempts):
        x, y = rng.randint(2, width - w - 2), rng.randint(2, height - h - 2)
        box = (float(x), float(y), float(x + w), float(y + h))
        if not _box_fits(box, kind, placed, config):
            continue
        mask = np.zeros((height, width), dtype=bool)
        mask[y : y + h, x : x + w] = local
        if _keeps_visible(mask, placed, config):
            return _Placed(kind, colour, size_name, text, (r, g, b), mask, mask.copy(), box)
    return None


def _visible_box(visible: np.ndarray) -> Box:
    ys, xs = np.nonzero(visible)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def render_scene(config: SceneConfig, rng: random.Random | int) -> Scene:
    """Draw one scene.

    Args:
        config: what scenes look like.
        rng: a ``random.Random`` (one 63-bit seed is drawn from it) or the scene seed itself;
            ``render_scene(config, scene.seed)`` redraws ``scene`` exactly.
    """
    seed = rng if isinstance(rng, int) else rng.getrandbits(63)
    local = random.Random(seed)
    size = (local.randint(*config.width_range), local.randint(*config.height_range))
    canvas = _background(config, local, size)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    clutter = _draw_clutter(image, config, local)
    placed: list[_Placed] = []
    for _ in range(local.randint(*config.objects_range)):
        new = _try_place(config, local, size, placed)
        if new is None:
            logger.debug("scene %d: no room for object %d; drawing fewer", seed, len(placed))
            continue
        for other in placed:
            other.visible &= ~new.mask
        placed.append(new)
    pixels = np.array(image)
    object_map = np.full((size[1], size[0]), -1, dtype=np.int16)
    for index, item in enumerate(placed):
        pixels[item.mask] = item.rgb
        object_map[item.visible] = index  # visible masks are disjoint: each pixel shows one object
    objects = tuple(
        SceneObject(
            kind=p.kind,
            colour=p.colour,
            size=p.size,
            text=p.text,
            box=_visible_box(p.visible),
            area=float(np.count_nonzero(p.mask)),
            z=z,
            visible_fraction=float(np.count_nonzero(p.visible) / np.count_nonzero(p.mask)),
        )
        for z, p in enumerate(placed)
    )
    return Scene(Image.fromarray(pixels, "RGB"), objects, size, seed, clutter, config, object_map)
