"""A simulated proposal network for the miniature world.

It imitates what a class-agnostic detector such as UPN / OPN hands to VLM-FO1: for most objects a
few boxes close to the truth (jittered, duplicated, some loose), some part boxes, and background
distractors (random boxes and boxes around clutter), each with a score, sorted by descending score
and capped at ``max_proposals``. A missed object (probability ``1 - recall``) gets no box at all.

:func:`match_proposals` decides which proposal stands for which object (the positives of every
task): greedy one-to-one matching by descending IoU, at ``IoU >= 0.5`` by default.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from vlm_fo1.boxes import match_boxes
from vlm_fo1.synthetic.scenes import Box, Scene

logger = logging.getLogger(__name__)

_MIN_SIDE = 1.0
_DISTRACTOR_MAX_IOU = 0.3
RELEASE_NMS_IOU = 0.8
"""The release filters its proposal network's boxes with NMS at this IoU before the VLM sees them
(official-release.md §6); the simulated network does the same by default."""


@dataclass(frozen=True)
class ProposalConfig:
    """How the simulated proposal network behaves.

    Attributes:
        recall: chance that an object gets any proposal at all.
        jitter: std of each side's shift, as a share of the object's width / height, for the main
            proposal and the tight duplicates (0.03 keeps about 90 % of them at IoU >= 0.8).
        duplicates_range: number of extra tight copies per found object.
        loose_probability: chance of one extra loose copy with IoU in ``loose_iou``.
        part_probability: chance of one part box (a sub-box of the object).
        distractors_range: random background boxes per scene.
        clutter_distractor_probability: chance that a clutter mark gets a box around it.
        object_score / loose_score / part_score / distractor_score: ``(low, high)`` ranges; the
            object score grows with IoU inside its range, and ``score_noise`` is added to all.
        max_proposals: cap after sorting by score (the release uses 100).
        nms_iou: greedy class-agnostic non-maximum suppression at this IoU before the cap, as
            the release filters its detector's boxes (:data:`RELEASE_NMS_IOU`, the default): tight
            duplicates of one object go, looser copies (IoU below it), parts and distractors stay;
            None keeps every box.
    """

    recall: float = 0.95
    jitter: float = 0.03
    duplicates_range: tuple[int, int] = (0, 2)
    loose_probability: float = 0.4
    loose_iou: tuple[float, float] = (0.5, 0.8)
    part_probability: float = 0.3
    distractors_range: tuple[int, int] = (2, 8)
    clutter_distractor_probability: float = 0.5
    object_score: tuple[float, float] = (0.5, 0.95)
    loose_score: tuple[float, float] = (0.3, 0.7)
    part_score: tuple[float, float] = (0.15, 0.55)
    distractor_score: tuple[float, float] = (0.05, 0.6)
    score_noise: float = 0.04
    max_proposals: int = 100
    nms_iou: float | None = RELEASE_NMS_IOU

    def __post_init__(self) -> None:
        for name in ("recall", "loose_probability", "part_probability", "clutter_distractor_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None, got {self.nms_iou!r}")
        if self.max_proposals < 1:
            raise ValueError(f"max_proposals must be >= 1, got {self.max_proposals!r}")
        for name in ("duplicates_range", "distractors_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(low, high)!r}")
        for name in ("loose_iou", "object_score", "loose_score", "part_score", "distractor_score"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high < 1, got {(low, high)!r}")


@dataclass(frozen=True)
class Proposals:
    """Candidate boxes of one scene, sorted by descending score (row ``i`` is ``<region{i}>``).

    Attributes:
        boxes: xyxy pixel boxes, clipped to the image, each side >= 1 px (rounded to 0.01).
        scores: in ``(0, 1)``, non-increasing.
        matched_object: index into ``scene.objects`` of the object a proposal was made from, or -1.
        iou: IoU with that object (0.0 for -1).
    """

    boxes: tuple[Box, ...]
    scores: tuple[float, ...]
    matched_object: tuple[int, ...]
    iou: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.boxes)

    def box_lists(self) -> list[list[float]]:
        """Boxes as lists (the record format)."""
        return [list(box) for box in self.boxes]


def _iou(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _clip(box: Sequence[float], size: tuple[int, int]) -> Box | None:
    """Box clipped to the image and rounded, or None when a side is shorter than 1 px."""
    width, height = size
    x1, x2 = sorted((min(max(box[0], 0.0), width), min(max(box[2], 0.0), width)))
    y1, y2 = sorted((min(max(box[1], 0.0), height), min(max(box[3], 0.0), height)))
    rounded = (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2))
    if rounded[2] - rounded[0] < _MIN_SIDE or rounded[3] - rounded[1] < _MIN_SIDE:
        return None
    return rounded


def _jittered(box: Box, sigma: float, rng: random.Random) -> Box:
    w, h = box[2] - box[0], box[3] - box[1]
    return (
        box[0] + rng.gauss(0.0, sigma * w),
        box[1] + rng.gauss(0.0, sigma * h),
        box[2] + rng.gauss(0.0, sigma * w),
        box[3] + rng.gauss(0.0, sigma * h),
    )


def _loose(box: Box, config: ProposalConfig, rng: random.Random, size: tuple[int, int]) -> Box | None:
    """A copy whose IoU with ``box`` lies in ``config.loose_iou`` (None when not found quickly)."""
    low, high = config.loose_iou
    for _ in range(20):
        candidate = _clip(_jittered(box, 0.15, rng), size)
        if candidate is not None and low <= _iou(candidate, box) < high:
            return candidate
    return None


def _part(box: Box, rng: random.Random) -> Box:
    """A sub-box covering 30-60 % of each side of ``box``."""
    w, h = box[2] - box[0], box[3] - box[1]
    pw, ph = w * rng.uniform(0.3, 0.6), h * rng.uniform(0.3, 0.6)
    x, y = box[0] + rng.uniform(0, w - pw), box[1] + rng.uniform(0, h - ph)
    return (x, y, x + pw, y + ph)


def _score(low_high: tuple[float, float], quality: float, noise: float, rng: random.Random) -> float:
    """``low + quality * (high - low)`` plus Gaussian noise, kept inside ``(0, 1)``."""
    low, high = low_high
    value = low + min(max(quality, 0.0), 1.0) * (high - low) + rng.gauss(0.0, noise)
    return round(min(max(value, 0.01), 0.99), 4)


def _object_proposals(
    index: int, box: Box, config: ProposalConfig, rng: random.Random, size: tuple[int, int]
) -> list[tuple[Box, float, int, float]]:
    """``(box, score, object index, iou)`` for one found object."""
    found: list[tuple[Box, float, int, float]] = []
    for _ in range(1 + rng.randint(*config.duplicates_range)):
        candidate = _clip(_jittered(box, config.jitter, rng), size)
        if candidate is not None:
            iou = _iou(candidate, box)
            found.append(
                (
                    candidate,
                    _score(config.object_score, (iou - 0.5) / 0.5, config.score_noise, rng),
                    index,
                    iou,
                )
            )
    if rng.random() < config.loose_probability:
        candidate = _loose(box, config, rng, size)
        if candidate is not None:
            iou = _iou(candidate, box)
            found.append(
                (candidate, _score(config.loose_score, rng.random(), config.score_noise, rng), index, iou)
            )
    if rng.random() < config.part_probability:
        candidate = _clip(_part(box, rng), size)
        if candidate is not None:
            iou = _iou(candidate, box)
            found.append(
                (candidate, _score(config.part_score, rng.random(), config.score_noise, rng), index, iou)
            )
    return found


def _random_box(rng: random.Random, size: tuple[int, int]) -> Box:
    width, height = size
    w, h = rng.uniform(6, min(50, width / 2)), rng.uniform(6, min(50, height / 2))
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (x, y, x + w, y + h)


def _around(box: Box, rng: random.Random) -> Box:
    pad = [rng.uniform(1, 5) for _ in range(4)]
    return (box[0] - pad[0], box[1] - pad[1], box[2] + pad[2], box[3] + pad[3])


def _distractors(
    scene: Scene, config: ProposalConfig, rng: random.Random
) -> list[tuple[Box, float, int, float]]:
    """Background boxes (random and around clutter) that overlap no object at IoU > 0.3."""
    raw = [_random_box(rng, scene.size) for _ in range(rng.randint(*config.distractors_range))]
    raw += [
        _around(b, rng) for b in scene.clutter_boxes if rng.random() < config.clutter_distractor_probability
    ]
    kept = []
    for box in raw:
        candidate = _clip(box, scene.size)
        if candidate is None or any(_iou(candidate, o.box) > _DISTRACTOR_MAX_IOU for o in scene.objects):
            continue
        kept.append(
            (candidate, _score(config.distractor_score, rng.random(), config.score_noise, rng), -1, 0.0)
        )
    return kept


def simulate_proposals(scene: Scene, config: ProposalConfig, rng: random.Random) -> Proposals:
    """Candidate boxes for ``scene``, sorted by descending score and capped (see the module docstring)."""
    items: list[tuple[Box, float, int, float]] = []
    for index, obj in enumerate(scene.objects):
        if rng.random() < config.recall:
            items.extend(_object_proposals(index, obj.box, config, rng, scene.size))
    items.extend(_distractors(scene, config, rng))
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    if config.nms_iou is not None:
        kept: list[int] = []
        for i in order:
            if all(_iou(items[i][0], items[k][0]) <= config.nms_iou for k in kept):
                kept.append(i)
        order = kept
    order = order[: config.max_proposals]
    if len(items) > config.max_proposals:
        logger.debug("scene %d: %d proposals capped to %d", scene.seed, len(items), config.max_proposals)
    return Proposals(
        boxes=tuple(items[i][0] for i in order),
        scores=tuple(items[i][1] for i in order),
        matched_object=tuple(items[i][2] for i in order),
        iou=tuple(round(items[i][3], 4) for i in order),
    )


def match_proposals(
    proposal_boxes: Sequence[Sequence[float]],
    object_boxes: Sequence[Sequence[float]],
    iou_threshold: float = 0.5,
    order: str = "candidates",
) -> list[int | None]:
    """For each object, the proposal that stands for it, or None.

    Proposals come sorted by score; by default each, in that order, claims the unmatched object
    it overlaps most (IoU >= ``iou_threshold``), as COCO evaluation matches detections: an
    object's target is its highest-scored good proposal, a rule the model can see (region
    order), unlike small IoU differences between near-duplicates. ``order="iou"`` pairs by
    descending IoU instead (:func:`vlm_fo1.boxes.match_boxes`).
    """
    return match_boxes(proposal_boxes, object_boxes, iou_threshold, order=order)
