"""Class-agnostic proposals (candidate boxes with scores) per image, from files or memory.

Accepted sources (:func:`load_proposals`):

- the release's processed COCO JSONL (official-release.md §7.1): one line per image with ``id``
  (the COCO image id), ``image`` (file name), ``bbox_list`` (xyxy pixels) and ``score_list``;
- a COCO results JSON list: ``{"image_id", "bbox": [x, y, w, h], "score", "category_id"?}`` per
  detection (the category is ignored: proposals are class-agnostic; a detector that reports
  one box under several classes gives near-duplicates, which ``nms_iou`` merges);
- a mapping ``image_id → (boxes, scores)`` with xyxy boxes (or :class:`ImageProposals` values).

:func:`select_proposals` then prepares one image's list for a prompt: clip to the image, drop
boxes without area, score threshold, class-agnostic NMS, sort by descending score, top-k.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_fo1.boxes import nms_keep

logger = logging.getLogger(__name__)

ImageKey = int | str
ProposalSource = str | Path | Mapping[Any, Any] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class ImageProposals:
    """Candidate boxes of one image: xyxy pixels of the original image, row ``i`` is ``<region{i}>``."""

    boxes: list[list[float]]
    scores: list[float]

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.scores):
            raise ValueError(
                f"expected one score per box, got {len(self.scores)} scores for {len(self.boxes)} boxes"
            )
        for i, box in enumerate(self.boxes):
            if len(box) != 4:
                raise ValueError(f"box {i}: expected 4 numbers (x1, y1, x2, y2), got {box!r}")


def image_key(value: Any) -> ImageKey:
    """An image id as int when it is one (JSON object keys are strings), else the string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        return int(value) if value.strip().isdigit() else value
    raise ValueError(f"expected an image id (int or non-empty str), got {value!r}")


def xywh_box(box: Sequence[float]) -> list[float]:
    """One ``[x, y, w, h]`` box as an ``[x1, y1, x2, y2]`` list of floats (full precision)."""
    if isinstance(box, str) or len(box) != 4:
        raise ValueError(f"expected an [x, y, w, h] box, got {box!r}")
    x, y, w, h = (float(v) for v in box)
    return [x, y, x + w, y + h]


def _float_boxes(boxes: Any) -> list[list[float]]:
    if isinstance(boxes, torch.Tensor | np.ndarray):
        boxes = boxes.tolist()
    return [[float(v) for v in box] for box in boxes]


def _from_pair(key: Any, value: Any) -> ImageProposals:
    if isinstance(value, ImageProposals):
        return value
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"image {key!r}: expected (boxes, scores), got {type(value).__name__}")
    boxes, scores = value
    try:
        return ImageProposals(_float_boxes(boxes), [float(s) for s in scores])
    except (TypeError, ValueError) as err:
        raise ValueError(f"image {key!r}: expected xyxy boxes and one score each: {err}") from err


def _group_results(results: Sequence[Any], where: str) -> dict[ImageKey, ImageProposals]:
    """COCO results (``image_id``, ``bbox`` xywh, ``score``) grouped by image, in list order."""
    grouped: dict[ImageKey, tuple[list[list[float]], list[float]]] = {}
    for index, item in enumerate(results):
        try:
            box, score = xywh_box(item["bbox"]), float(item["score"])
            boxes, scores = grouped.setdefault(image_key(item["image_id"]), ([], []))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{where}: result {index}: expected image_id, bbox [x, y, w, h] and score: {err!r}"
            ) from err
        boxes.append(box)
        scores.append(score)
    return {key: ImageProposals(boxes, scores) for key, (boxes, scores) in grouped.items()}


def _read_release_jsonl(path: Path, lines: Any) -> dict[ImageKey, ImageProposals]:
    """The release's processed COCO JSONL; each image is filed under its ``id`` and its ``image``."""
    found: dict[ImageKey, ImageProposals] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            proposals = ImageProposals(
                _float_boxes(data["bbox_list"]), [float(s) for s in data["score_list"]]
            )
            keys = [image_key(data[name]) for name in ("id", "image") if name in data]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"{path}:{number}: expected a line with id/image, bbox_list and score_list: {err!r}"
            ) from err
        if not keys:
            raise ValueError(f"{path}:{number}: expected an 'id' or 'image' field, got keys {sorted(data)}")
        for key in keys:
            if key in found:
                raise ValueError(f"{path}:{number}: proposals for image {key!r} were given twice")
            found[key] = proposals
    return found


def load_proposals(source: ProposalSource) -> dict[ImageKey, ImageProposals]:
    """Raw proposals per image (see the module docstring for the accepted sources).

    A file whose first non-blank character is ``[`` is read as a COCO results list, any other
    file as the release's JSONL. Keys are image ids (ints where they look like ints); the release
    JSONL also files each image under its ``image`` file name.

    Raises:
        ValueError: on a malformed source, naming the file and line or item.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        with path.open(encoding="utf-8-sig") as handle:
            while (first := handle.read(1)) and first.isspace():
                pass
            handle.seek(0)
            if first != "[":
                return _read_release_jsonl(path, handle)
            try:
                results = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: expected a JSON list of COCO results: {err}") from err
        return _group_results(results, str(path))
    if isinstance(source, Mapping):
        return {image_key(key): _from_pair(key, value) for key, value in source.items()}
    if isinstance(source, Sequence):
        return _group_results(source, "results")
    raise ValueError(f"expected a path, a mapping or a list of COCO results, got {type(source).__name__}")


def select_proposals(
    proposals: ImageProposals,
    *,
    image_size: tuple[float, float] | None = None,
    max_regions: int = 100,
    score_threshold: float | None = None,
    nms_iou: float | None = None,
) -> ImageProposals:
    """One image's candidate list, ready for a prompt.

    Steps: clip to ``image_size`` ``(width, height)`` when given and drop boxes left without
    area (or with NaN coordinates); keep ``score >= score_threshold``; class-agnostic NMS at
    IoU ``nms_iou`` (:func:`vlm_fo1.boxes.nms_keep`); sort by descending score (ties keep the
    input order) and keep the first ``max_regions``.

    Raises:
        ValueError: when ``max_regions`` is not an int >= 1 or ``nms_iou`` is outside [0, 1].
    """
    if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
        raise ValueError(f"max_regions must be an int >= 1, got {max_regions!r}")
    boxes, scores = proposals.boxes, proposals.scores
    if image_size is not None:
        width, height = image_size
        boxes = [
            [
                min(max(x1, 0.0), width),
                min(max(y1, 0.0), height),
                min(max(x2, 0.0), width),
                min(max(y2, 0.0), height),
            ]
            for x1, y1, x2, y2 in boxes
        ]
    keep = [i for i, b in enumerate(boxes) if b[2] > b[0] and b[3] > b[1]]  # False for NaN too
    if len(keep) < len(boxes):
        logger.debug("dropped %d proposals without area inside the image", len(boxes) - len(keep))
    if score_threshold is not None:
        keep = [i for i in keep if scores[i] >= score_threshold]
    if nms_iou is not None and keep:
        kept = nms_keep([boxes[i] for i in keep], [scores[i] for i in keep], nms_iou).tolist()
        keep = [keep[k] for k in sorted(kept)]
    keep = sorted(keep, key=lambda i: -scores[i])[:max_regions]
    return ImageProposals([list(boxes[i]) for i in keep], [scores[i] for i in keep])
