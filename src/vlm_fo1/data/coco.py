"""COCO-style instance annotations plus class-agnostic proposals → conversation records.

Two products:

- :func:`coco_to_records`: training conversations in the miniature world's conventions
  (:mod:`vlm_fo1.synthetic.tasks`): one detection query per present category (or per group of
  up to ``max_classes_per_query`` categories), negatives about absent categories, and counting
  queries. A true instance is pointed at through the proposal that :func:`~vlm_fo1.boxes.match_boxes`
  pairs with it (greedy one-to-one over all instances of the image, ``IoU >= iou_threshold``);
  instances without a matching proposal are left out of the answer. Regions are listed in
  increasing order.
- :func:`coco_eval_records`: the release's evaluation style (official-release.md §7.1): one
  query per image naming every category (``templates.coco_detect``), no answer, and all true
  boxes per category in ``meta`` for mAP.

Proposals (class-agnostic candidate boxes with scores) come from any source that
:func:`vlm_fo1.data.proposal_sources.load_proposals` reads (the release's processed COCO JSONL, a
COCO results JSON list, a mapping ``image_id → (boxes, scores)``) and are prepared per image by
``select_proposals`` (clip, score threshold, class-agnostic NMS, top ``max_regions`` by score).
Images without proposals are skipped and counted in the log.

Crowd annotations (``iscrowd=1``) are skipped by default (``skip_crowd``): a crowd box covers
many objects, so it is no instance to point at and gives no count. A category present only as
crowd is neither a positive nor a negative of that image, and no counting query asks for a
category that has a crowd box. With ``skip_crowd=False`` crowd boxes are ordinary instances.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_fo1.boxes import match_boxes
from vlm_fo1.data.proposal_sources import (
    ImageKey,
    ImageProposals,
    ProposalSource,
    image_key,
    load_proposals,
    select_proposals,
    xywh_box,
)
from vlm_fo1.data.records import ConversationRecord, write_records
from vlm_fo1.prompting import templates as T
from vlm_fo1.prompting.tokens import GROUND_CLOSE, GROUND_OPEN, OBJECTS_CLOSE, OBJECTS_OPEN, region_token

logger = logging.getLogger(__name__)

TASKS = ("detection", "counting")


@dataclass(frozen=True)
class CocoImage:
    """One image: ``boxes`` / ``crowd`` map a category id to its xyxy instance boxes."""

    id: ImageKey
    file_name: str
    size: tuple[float, float] | None
    boxes: dict[int, list[list[float]]] = field(default_factory=dict)
    crowd: dict[int, list[list[float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class CocoAnnotations:
    """Categories (id → name, by ascending id) and images (in file order)."""

    categories: dict[int, str]
    images: list[CocoImage]


# -- annotations ---------------------------------------------------------------------------------------


def read_coco(annotations: str | Path | Mapping[str, Any], *, skip_crowd: bool = True) -> CocoAnnotations:
    """Categories and per-image instance boxes (xywh → xyxy) of a COCO instances file or dict.

    Raises:
        ValueError: on missing keys, duplicate category names, unknown category or image ids.
    """
    data = annotations
    if isinstance(annotations, str | Path):
        with Path(annotations).open(encoding="utf-8") as handle:
            data = json.load(handle)
    if not isinstance(data, Mapping) or not {"images", "annotations", "categories"} <= set(data):
        got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"expected a COCO dict with images, annotations and categories, got {got}")
    try:
        ordered = sorted(data["categories"], key=lambda c: int(c["id"]))
        categories = {int(c["id"]): str(c["name"]).strip() for c in ordered}
        images: dict[ImageKey, CocoImage] = {}
        for item in data["images"]:
            has_size = "width" in item and "height" in item
            size = (item["width"], item["height"]) if has_size else None  # numbers as written
            if size is not None and not all(float(v) > 0 for v in size):
                raise ValueError(f"image {item['id']!r}: expected positive width and height, got {size}")
            images[image_key(item["id"])] = CocoImage(image_key(item["id"]), str(item["file_name"]), size)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"expected categories with id/name and images with id/file_name: {err!r}") from err
    names = list(categories.values())
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"expected unique non-empty category names, got {names}")
    for index, ann in enumerate(data["annotations"]):
        _add_annotation(index, ann, images, categories, skip_crowd)
    return CocoAnnotations(categories, list(images.values()))


def _add_annotation(
    index: int, ann: Any, images: dict[ImageKey, CocoImage], categories: dict[int, str], skip_crowd: bool
) -> None:
    try:
        image, category = images.get(image_key(ann["image_id"])), int(ann["category_id"])
        box = xywh_box(ann["bbox"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"annotation {index}: expected image_id, category_id and bbox [x, y, w, h]: {err!r}"
        ) from err
    if image is None or category not in categories:
        raise ValueError(
            f"annotation {index} (id {ann.get('id')!r}): expected a known image and category, "
            f"got image_id={ann['image_id']!r}, category_id={category}"
        )
    target = image.crowd if ann.get("iscrowd", 0) and skip_crowd else image.boxes
    target.setdefault(category, []).append(box)


# -- records -------------------------------------------------------------------------------------------


def _segment(label: str, regions: Sequence[int]) -> str:
    return f"{GROUND_OPEN}{label}{GROUND_CLOSE}{OBJECTS_OPEN}{''.join(map(region_token, regions))}{OBJECTS_CLOSE}"


@dataclass
class _Balance:
    """Holds negatives at ``ratio`` of all queries over the whole data set (error feedback)."""

    ratio: float
    positives: int = 0
    negatives: int = 0

    def wanted(self, new_positives: int) -> int:
        self.positives += new_positives
        target = math.floor(self.ratio / (1.0 - self.ratio) * self.positives + 0.5)
        return max(0, target - self.negatives)


@dataclass(frozen=True)
class _Image:
    """One image with its selected proposals and the regions that stand for its instances."""

    coco: CocoImage
    proposals: ImageProposals
    regions: dict[int, list[int]]  # category id -> sorted matched regions
    image: str

    @classmethod
    def build(cls, coco: CocoImage, proposals: ImageProposals, prefix: str, iou: float) -> _Image:
        flat = [(c, box) for c, boxes in coco.boxes.items() for box in boxes]
        matches = match_boxes(proposals.boxes, [box for _, box in flat], iou, order="candidates")
        regions: dict[int, list[int]] = {c: [] for c in coco.boxes}
        for (c, _), region in zip(flat, matches, strict=True):
            if region is not None:
                regions[c].append(region)
        image = f"{prefix.rstrip('/')}/{coco.file_name}" if prefix else coco.file_name
        return cls(coco, proposals, {c: sorted(r) for c, r in regions.items()}, image)

    def record(
        self, prompt: T.Prompt, answer: str | None, meta: dict[str, Any], number: int
    ) -> ConversationRecord:
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt.content()}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
            meta = {"answer": answer} | meta
        size = list(self.coco.size) if self.coco.size is not None else None
        return ConversationRecord(
            messages=messages,
            image=self.image,
            boxes=[list(b) for b in self.proposals.boxes],
            scores=list(self.proposals.scores),
            id=f"{self.coco.id}/{meta['task']}-{number}",
            task=prompt.task.value,
            meta=copy.deepcopy({"task": meta["task"], "image_id": self.coco.id, "image_size": size} | meta),
        )


def _detection(
    img: _Image, names: dict[int, str], query: list[int], negative: bool
) -> tuple[T.Prompt, str, dict]:
    labels = [names[c] for c in query]
    found = [(names[c], img.regions[c]) for c in query if img.regions.get(c)]
    answer = "".join(_segment(label, regions) for label, regions in found) or _segment(labels[0], [])
    meta = {
        "task": "detection" if len(query) == 1 else "multi_detection",
        "classes": labels,
        "category_ids": list(query),
        "negative": negative,
        "gt_boxes": {names[c]: img.coco.boxes.get(c, []) for c in query},
        "target_regions": {names[c]: img.regions.get(c, []) for c in query},
    }
    return T.detect(labels), answer, meta


def _counting(
    img: _Image, names: dict[int, str], category: int, negative: bool
) -> tuple[T.Prompt, str, dict]:
    label, boxes, regions = names[category], img.coco.boxes.get(category, []), img.regions.get(category, [])
    meta = {
        "task": "counting",
        "kind": label,
        "label": label,
        "count": len(boxes),
        "classes": [label],
        "category_ids": [category],
        "negative": negative,
        "gt_boxes": boxes,
        "target_regions": regions,
    }
    return T.count(label), _segment(label, regions) + str(len(boxes)), meta


def _queries(
    positives: list[int], absent: list[int], k: int, rng: random.Random, balance: _Balance
) -> list[tuple[list[int], bool]]:
    """``(category ids, negative)`` per query: positives in groups of ``k``, then balanced negatives."""
    if k > 1:
        positives = positives.copy()
        rng.shuffle(positives)
    queries = [(positives[i : i + k], False) for i in range(0, len(positives), k)]
    wanted = min(balance.wanted(len(queries)), math.ceil(len(absent) / k))
    chosen = rng.sample(absent, min(wanted * k, len(absent)))
    negatives = [(chosen[i : i + k], True) for i in range(0, len(chosen), k)]
    balance.negatives += len(negatives)
    return queries + negatives


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class _Options:
    image_dir_prefix: str = ""
    max_regions: int = 100
    score_threshold: float | None = None
    nms_iou: float | None = None
    iou_threshold: float = 0.5
    skip_crowd: bool = True

    def __post_init__(self) -> None:
        _check_count("max_regions", self.max_regions)
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold!r}")
        if self.nms_iou is not None and not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1] or None, got {self.nms_iou!r}")


def _prepared_images(
    annotations: Any, proposals: ProposalSource, options: _Options
) -> tuple[CocoAnnotations, list[_Image]]:
    coco = read_coco(annotations, skip_crowd=options.skip_crowd)
    raw = load_proposals(proposals)
    images, skipped = [], 0
    for item in coco.images:
        found = raw.get(item.id, raw.get(item.file_name))
        selected = None
        if found is not None:
            selected = select_proposals(
                found,
                image_size=item.size,
                max_regions=options.max_regions,
                score_threshold=options.score_threshold,
                nms_iou=options.nms_iou,
            )
        if selected is None or not selected.boxes:
            skipped += 1
            continue
        images.append(_Image.build(item, selected, options.image_dir_prefix, options.iou_threshold))
    if skipped:
        logger.info("skipped %d of %d images without proposals", skipped, len(coco.images))
    return coco, images


def coco_to_records(
    annotations_path_or_dict: str | Path | Mapping[str, Any],
    proposals: ProposalSource,
    *,
    image_dir_prefix: str = "",
    negative_ratio: float = 0.2,
    max_classes_per_query: int = 1,
    iou_threshold: float = 0.5,
    seed: int = 0,
    skip_crowd: bool = True,
    tasks: Sequence[str] = TASKS,
    max_regions: int = 100,
    score_threshold: float | None = None,
    nms_iou: float | None = None,
) -> list[ConversationRecord]:
    """Training conversations from COCO annotations and proposals (see the module docstring).

    Per image (in file order, one ``random.Random(seed)`` for the whole set): one detection
    query per present category, or per group of up to ``max_classes_per_query`` of them
    (shuffled); the answer names the matched regions of each queried class in query order (the
    empty segment of the first class when none has any). Negatives ask for categories absent
    from the image (answer ``<ground>name</ground><objects></objects>``), as many as keep them
    near ``negative_ratio`` of all detection queries so far. Counting asks, with ``templates.count``,
    for each present category without crowd boxes (answer ``…</objects>{n}``, ``n`` the true
    instance count, also when some lack a proposal), with negatives (``…</objects>0``) balanced
    the same way. Record ids are ``"{image_id}/{meta task}-{k}"``.

    Meta (the miniature world's keys): ``task`` (``detection``, ``multi_detection``,
    ``counting``), ``answer``, ``image_id``, ``image_size``, ``classes``, ``category_ids``,
    ``negative``, ``gt_boxes`` and ``target_regions`` (per class for detection; a plain list for
    counting, with ``kind``, ``label`` and ``count``).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"tasks must be some of {TASKS}, got {tuple(tasks)!r}")
    if not 0.0 <= negative_ratio < 1.0:
        raise ValueError(f"negative_ratio must be in [0, 1), got {negative_ratio!r}")
    _check_count("max_classes_per_query", max_classes_per_query)
    options = _Options(image_dir_prefix, max_regions, score_threshold, nms_iou, iou_threshold, skip_crowd)
    coco, images = _prepared_images(annotations_path_or_dict, proposals, options)
    names, order = coco.categories, list(coco.categories)
    rng = random.Random(seed)
    detection, counting = _Balance(negative_ratio), _Balance(negative_ratio)
    records: list[ConversationRecord] = []
    for img in images:
        boxes, crowd = img.coco.boxes, img.coco.crowd
        absent = [c for c in order if c not in boxes and c not in crowd]
        samples = []
        if "detection" in tasks:
            present = [c for c in order if c in boxes]
            for query, negative in _queries(present, absent, max_classes_per_query, rng, detection):
                samples.append(_detection(img, names, query, negative))
        if "counting" in tasks:
            countable = [c for c in order if c in boxes and c not in crowd]
            for query, negative in _queries(countable, absent, 1, rng, counting):
                samples.append(_counting(img, names, query[0], negative))
        records += [img.record(prompt, answer, meta, k) for k, (prompt, answer, meta) in enumerate(samples)]
    logger.info("built %d records from %d images", len(records), len(images))
    return records


def coco_eval_records(
    annotations_path_or_dict: str | Path | Mapping[str, Any],
    proposals: ProposalSource,
    *,
    image_dir_prefix: str = "",
    skip_crowd: bool = True,
    iou_threshold: float = 0.5,
    max_regions: int = 100,
    score_threshold: float | None = None,
    nms_iou: float | None = None,
) -> list[ConversationRecord]:
    """The release's COCO evaluation queries: one per image, every category, no answer.

    The query is ``templates.coco_detect`` over all category names in id order. Meta:
    ``task="multi_detection"``, ``image_id``, ``image_size``, ``classes`` and ``category_ids``
    (all categories), ``negative`` (no instance at all), ``gt_boxes`` and ``target_regions`` per
    class name (empty lists for absent classes) and ``crowd_boxes`` per class (the regions COCO
    ignores when scoring). Record ids are ``"{image_id}/multi_detection-0"``.
    """
    options = _Options(image_dir_prefix, max_regions, score_threshold, nms_iou, iou_threshold, skip_crowd)
    coco, images = _prepared_images(annotations_path_or_dict, proposals, options)
    names = coco.categories
    prompt = T.coco_detect(list(names.values()))
    records = []
    for img in images:
        meta = {
            "task": "multi_detection",
            "classes": list(names.values()),
            "category_ids": list(names),
            "negative": not img.coco.boxes,
            "gt_boxes": {name: img.coco.boxes.get(c, []) for c, name in names.items()},
            "target_regions": {name: img.regions.get(c, []) for c, name in names.items()},
            "crowd_boxes": {name: img.coco.crowd.get(c, []) for c, name in names.items()},
        }
        records.append(img.record(prompt, None, meta, 0))
    logger.info("built %d evaluation records", len(records))
    return records


def convert_coco(
    annotations: str | Path | Mapping[str, Any],
    proposals: ProposalSource,
    out_path: str | Path,
    *,
    evaluation: bool = False,
    **options: Any,
) -> int:
    """Write :func:`coco_to_records` (or, with ``evaluation``, :func:`coco_eval_records`) as JSONL.

    ``options`` are the keyword arguments of the chosen function. Returns the number of records.
    """
    build = coco_eval_records if evaluation else coco_to_records
    count = write_records(out_path, build(annotations, proposals, **options))
    logger.info("wrote %d records to %s", count, out_path)
    return count
