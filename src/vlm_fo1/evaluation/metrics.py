"""Metric functions on typed inputs (no model, no text parsing).

Boxes are xyxy in the original image's pixels. Every function returns ``nan`` when its metric
is undefined (no queries, no ground truth), never a made-up 0 or 1; ``EvalReport`` writes ``nan``
as JSON ``null``.

- :func:`coco_map`: COCO box mAP through pycocotools' own ``COCO`` / ``COCOeval``; each query is
  its own COCO image whose ground truth holds only the classes that query asked about.
- :func:`counting_accuracy`: exact matches, a missing number counting as 0 (the release's rule,
  official-release.md §7.2).
- :func:`rec_accuracy`: a referring expression is right when its predicted box has IoU >= 0.5
  with the true box.
- :func:`exact_match_accuracy`: after :func:`normalize_answer` (strip, lower-case, collapse
  spaces, drop one trailing period).
- :func:`false_positive_rate`: share of negative queries (the class is absent) for which the
  model named at least one region.
- :func:`precision_recall`: micro-averaged box precision / recall with one-to-one IoU matching.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_fo1.boxes import box_iou

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
NAN = float("nan")
COCO_KEYS = ("mAP", "mAP50", "mAP75", "AR100")
_STAT_INDEX = {"mAP": 0, "mAP50": 1, "mAP75": 2, "AR100": 8}  # positions in COCOeval.stats


@dataclass(frozen=True)
class DetectionTruth:
    """The ground truth of one detection query (one COCO "image").

    Attributes:
        image_id: unique id of the query.
        boxes: ``{class: [box, …]}`` for every class the query asked about (an empty list for an
            absent class); classes not asked about are simply not keys.
        crowd: ``{class: [box, …]}`` COCO crowd regions (``iscrowd=1``): a prediction inside one
            is neither a hit nor a false positive.
    """

    image_id: int
    boxes: Mapping[str, Sequence[Sequence[float]]]
    crowd: Mapping[str, Sequence[Sequence[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoredDetection:
    """One predicted box with its class and confidence."""

    image_id: int
    label: str
    box: Sequence[float]
    score: float


def _xywh(box: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in box]
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
    x1, y1, x2, y2 = values
    return [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]


def _coco_datasets(
    gt: Sequence[DetectionTruth], predictions: Sequence[ScoredDetection], categories: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ground-truth and result datasets in the COCO annotation format."""
    cat_ids = {name: i + 1 for i, name in enumerate(dict.fromkeys(categories))}
    image_ids = [truth.image_id for truth in gt]
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(
            f"image ids must be unique, got {len(image_ids)} ids, {len(set(image_ids))} distinct"
        )
    known = set(image_ids)
    images = [{"id": i} for i in image_ids]
    cats = [{"id": i, "name": name} for name, i in cat_ids.items()]
    gt_anns: list[dict[str, Any]] = []
    for truth in gt:
        for crowd, groups in ((0, truth.boxes), (1, truth.crowd)):
            for label, boxes in groups.items():
                if label not in cat_ids:
                    raise ValueError(
                        f"ground-truth class {label!r} is not one of the categories {list(cat_ids)}"
                    )
                for box in boxes:
                    xywh = _xywh(box, f"ground-truth box of image {truth.image_id}")
                    ann = _annotation(len(gt_anns) + 1, truth.image_id, cat_ids[label], xywh)
                    gt_anns.append(ann | {"iscrowd": crowd})
    dt_anns: list[dict[str, Any]] = []
    for det in predictions:
        if det.label not in cat_ids or det.image_id not in known:
            raise ValueError(
                f"prediction for image {det.image_id} class {det.label!r}: expected a known image id "
                f"and one of the categories {list(cat_ids)}"
            )
        xywh = _xywh(det.box, f"predicted box of image {det.image_id}")
        ann = _annotation(len(dt_anns) + 1, det.image_id, cat_ids[det.label], xywh)
        dt_anns.append(ann | {"score": float(det.score)})
    return (
        {"images": images, "categories": cats, "annotations": gt_anns},
        {"images": images, "categories": cats, "annotations": dt_anns},
    )


def _annotation(ann_id: int, image_id: int, category_id: int, xywh: list[float]) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": xywh,
        "area": xywh[2] * xywh[3],
        "iscrowd": 0,
    }


def coco_map(
    gt: Sequence[DetectionTruth], predictions: Sequence[ScoredDetection], categories: Sequence[str]
) -> dict[str, float]:
    """COCO box metrics with pycocotools: ``mAP`` (@[.5:.95]), ``mAP50``, ``mAP75``, ``AR100``.

    Classes without any ground truth are left out of the means (COCO's rule), images without
    ground truth still turn their predictions into false positives, and no predictions at all
    give 0. With no ground-truth box anywhere every value is ``nan``.

    Raises:
        ValueError: duplicate image ids, an unknown class or image id, a non-finite box.
    """
    gt_data, dt_data = _coco_datasets(gt, predictions, categories)
    if not any(ann["iscrowd"] == 0 for ann in gt_data["annotations"]):
        return dict.fromkeys(COCO_KEYS, NAN)
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:  # pragma: no cover - the "eval" extra
        raise ImportError("coco_map needs pycocotools: pip install 'vlm-fo1[eval]'") from err
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset, coco_dt.dataset = gt_data, dt_data
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {key: (float(stats[i]) if stats[i] >= 0 else NAN) for key, i in _STAT_INDEX.items()}


def _mean(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else NAN


def _check_lengths(predicted: Sequence[Any], truth: Sequence[Any]) -> None:
    if len(predicted) != len(truth):
        raise ValueError(
            f"expected one prediction per truth: {len(truth)} truths, {len(predicted)} predictions"
        )


def counting_accuracy(predicted: Sequence[int | None], truth: Sequence[int]) -> float:
    """Share of exact counts; a prediction without a number (None) counts as 0 (release rule)."""
    _check_lengths(predicted, truth)
    return _mean([(0 if p is None else int(p)) == int(t) for p, t in zip(predicted, truth, strict=True)])


def iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU of two xyxy boxes."""
    return float(box_iou([list(box_a)], [list(box_b)])[0, 0])


def rec_accuracy(
    predicted: Sequence[Sequence[float] | None], truth: Sequence[Sequence[float]], iou_threshold: float = 0.5
) -> float:
    """Share of expressions whose predicted box (None: no box) has IoU >= ``iou_threshold`` with the truth."""
    _check_lengths(predicted, truth)
    return _mean(
        [p is not None and iou(p, t) >= iou_threshold for p, t in zip(predicted, truth, strict=True)]
    )


def normalize_answer(text: str) -> str:
    """Strip, lower-case, collapse whitespace and drop one trailing period."""
    normal = " ".join(text.lower().split())
    return normal[:-1].rstrip() if normal.endswith(".") else normal


def exact_match_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Share of answers equal to the truth after :func:`normalize_answer`."""
    _check_lengths(predicted, truth)
    return _mean([normalize_answer(p) == normalize_answer(t) for p, t in zip(predicted, truth, strict=True)])


def false_positive_rate(named_regions: Sequence[int]) -> float:
    """Share of negative queries for which the model named >= 1 region (one count per query)."""
    return _mean([n >= 1 for n in named_regions])


def match_count(
    predicted: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], iou_threshold: float = 0.5
) -> int:
    """True positives of a one-to-one matching: each prediction, in order, takes the free true box
    it overlaps most, when that IoU is >= ``iou_threshold``."""
    if not predicted or not truth:
        return 0
    overlaps = box_iou([list(b) for b in predicted], [list(b) for b in truth])  # (P, T)
    free = [True] * len(truth)
    matched = 0
    for row in overlaps.tolist():
        best = max((v, j) for j, v in enumerate(row) if free[j]) if any(free) else (0.0, -1)
        if best[1] >= 0 and best[0] >= iou_threshold:
            free[best[1]] = False
            matched += 1
    return matched


def precision_recall(
    predicted: Sequence[Sequence[Sequence[float]]],
    truth: Sequence[Sequence[Sequence[float]]],
    iou_threshold: float = 0.5,
) -> tuple[float, float]:
    """Micro-averaged ``(precision, recall)`` over queries (each a list of boxes), by :func:`match_count`.

    Precision is ``nan`` when nothing was predicted, recall when there is no true box.
    """
    _check_lengths(predicted, truth)
    hits = sum(match_count(p, t, iou_threshold) for p, t in zip(predicted, truth, strict=True))
    n_pred = sum(len(p) for p in predicted)
    n_true = sum(len(t) for t in truth)
    return (hits / n_pred if n_pred else NAN, hits / n_true if n_true else NAN)
