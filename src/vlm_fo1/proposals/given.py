"""Boxes the user supplies, as a proposal network (registered as ``given``).

Sources (:class:`GivenProposer`'s ``boxes`` argument):

- Python boxes: a list / numpy array / tensor ``(N, 4)`` (xyxy, or COCO ``xywh`` with
  ``box_format="xywh"``), with optional ``scores`` (default 1.0) and ``labels``; or a
  :class:`~vlm_fo1.proposals.base.ProposalSet`. The same boxes serve every image.
- A mapping ``image id or file name -> boxes`` (values as above, or ``(boxes, scores)`` pairs,
  or ``{"boxes", "scores", "labels"}`` dicts): one list per image.
- A JSON file holding a list of boxes, a list of ``{"bbox": [...], "score": ..., "label": ...}``
  (``box_format`` applies), a :meth:`ProposalSet.to_json` object, a mapping as above, a COCO
  results list (``image_id``, ``bbox`` xywh, ``score``) or the release's proposal JSONL
  (``id``, ``image``, ``bbox_list``, ``score_list``); the last two are read by
  :func:`vlm_fo1.data.proposal_sources.load_proposals` and are keyed by image id / file name.

Given boxes are kept as they are by default: no score threshold, no NMS; they are clipped to the
image, sorted by descending score (ties keep the given order) and capped at ``top_k``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_fo1.boxes import as_box_tensor, xywh_to_xyxy
from vlm_fo1.data.proposal_sources import ImageKey, ImageProposals, image_key, load_proposals
from vlm_fo1.proposals.base import (
    DEFAULT_TOP_K,
    FilteredProposer,
    ProposalSet,
    as_proposal_set,
    register_proposer,
)

logger = logging.getLogger(__name__)

BOX_FORMATS = ("xyxy", "xywh")
_MAX_KEYS_SHOWN = 10


def _check_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")


def _checked(proposals: ProposalSet, where: str) -> ProposalSet:
    """``proposals`` when every box is finite and not inverted, else ``ValueError``."""
    boxes = proposals.boxes  # (N, 4)
    bad = (~torch.isfinite(boxes).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{where}: boxes {bad[:10]} have NaN or infinite coordinates")
    bad = ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{where}: boxes {bad[:10]} are inverted; expected x1 <= x2 and y1 <= y2, got "
            f"{boxes[bad[0]].tolist()} at index {bad[0]} (COCO [x, y, w, h] boxes need box_format='xywh')"
        )
    return proposals


def _plain_set(boxes: Any, scores: Any, labels: Any, box_format: str) -> ProposalSet:
    """Python boxes (``(N, 4)`` in ``box_format``) with optional scores and labels."""
    tensor = as_box_tensor(boxes)  # (N, 4)
    return as_proposal_set(xywh_to_xyxy(tensor) if box_format == "xywh" else tensor, scores, labels)


def _from_items(items: Sequence[Any], box_format: str, where: str) -> ProposalSet:
    """A JSON list: ``[[x1, y1, x2, y2], ...]`` or ``[{"bbox": [...], "score"?, "label"?}, ...]``."""
    if not items or not isinstance(items[0], Mapping):
        return _plain_set(items, None, None, box_format)
    boxes, scores, labels = [], [], []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping) or "bbox" not in item:
            raise ValueError(f"{where}: item {index}: expected a dict with 'bbox', got {item!r:.200}")
        boxes.append(item["bbox"])
        scores.append(float(item.get("score", 1.0)))
        labels.append(item.get("label"))
    has_labels = any(label is not None for label in labels)
    names = [("" if label is None else str(label)) for label in labels] if has_labels else None
    return _plain_set(boxes, scores, names, box_format)


def _from_value(value: Any, box_format: str, where: str) -> ProposalSet:
    """One image's proposals from any accepted in-memory form."""
    if isinstance(value, ProposalSet):
        return value
    if isinstance(value, ImageProposals):
        return ProposalSet(as_box_tensor(value.boxes), torch.tensor(value.scores), None)
    if isinstance(value, Mapping):
        return ProposalSet.from_json(value)
    if isinstance(value, tuple) and len(value) == 2 and not _is_box(value[0]):
        return _plain_set(value[0], value[1], None, box_format)
    if isinstance(value, list) and value and isinstance(value[0], Mapping):
        return _from_items(value, box_format, where)
    return _plain_set(value, None, None, box_format)


def _is_box(value: Any) -> bool:
    """True for one box (4 numbers) rather than a list of boxes."""
    return isinstance(value, Sequence) and len(value) == 4 and all(isinstance(v, int | float) for v in value)


def _keyed(source: Mapping[Any, Any], box_format: str) -> dict[ImageKey, ProposalSet]:
    return {
        image_key(key): _checked(_from_value(value, box_format, f"image {key!r}"), f"image {key!r}")
        for key, value in source.items()
    }


def read_given_file(path: str | Path, box_format: str = "xyxy") -> ProposalSet | dict[ImageKey, ProposalSet]:
    """Read a boxes file (see the module docstring): one set for all images, or one per image key.

    Raises:
        ValueError: on an unreadable or malformed file, naming it.
    """
    _check_format(box_format)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise ValueError(f"cannot read proposals file {str(path)!r}: {err}") from err
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: expected JSON boxes, got an empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if stripped[0] == "[":
            raise ValueError(f"{path}: expected a JSON list: {err}") from err
        data = None  # several JSON lines: the release's JSONL
    if isinstance(data, list):
        if data and isinstance(data[0], Mapping) and "image_id" in data[0]:
            return _keyed(load_proposals(data), "xyxy")
        return _checked(_from_items(data, box_format, str(path)), str(path))
    if isinstance(data, Mapping) and "boxes" in data:
        return _checked(ProposalSet.from_json(data), str(path))
    if isinstance(data, Mapping) and "bbox_list" not in data:
        return _keyed(data, box_format)
    return _keyed(load_proposals(path), "xyxy")


def _candidate_keys(image: Image.Image | None, image_id: Any) -> list[ImageKey]:
    """Keys to try: ``image_id``, else the file name ``image`` was opened from (full, base, stem)."""
    value = image_id if image_id is not None else getattr(image, "filename", None)
    if value is None or value == "":
        return []
    if isinstance(value, Path):
        value = str(value)
    keys = [image_key(value)]
    if isinstance(value, str):
        name = Path(value).name
        keys += [image_key(name), image_key(Path(name).stem)]
    return list(dict.fromkeys(keys))


@register_proposer("given")
class GivenProposer(FilteredProposer):
    """User-supplied candidate boxes as a :class:`~vlm_fo1.proposals.base.ProposalNetwork`.

    Args:
        boxes: Python boxes, a ``ProposalSet``, a mapping image key -> boxes, or a file path
            (see the module docstring).
        scores: ``(N,)`` scores for Python boxes (default 1.0 each).
        labels: ``N`` labels for Python boxes (default None).
        box_format: ``"xyxy"`` or ``"xywh"`` (COCO) for Python boxes and plain JSON lists.
        score_threshold / nms_iou / top_k: the filter of :func:`postprocess` (defaults keep every box).

    Raises:
        ValueError: on malformed, non-finite or inverted boxes, naming where.
    """

    name = "given"

    def __init__(
        self,
        boxes: Any,
        scores: Any = None,
        labels: Sequence[str] | None = None,
        *,
        box_format: str = "xyxy",
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        top_k: int | None = DEFAULT_TOP_K,
    ) -> None:
        _check_format(box_format)
        self._set_filter(score_threshold, nms_iou, top_k)
        source: ProposalSet | dict[ImageKey, ProposalSet]
        if isinstance(boxes, str | Path):
            source = read_given_file(boxes, box_format)
        elif isinstance(boxes, Mapping):
            source = _keyed(boxes, box_format)
        elif scores is None and labels is None:
            source = _checked(_from_value(boxes, box_format, "boxes"), "boxes")
        else:
            source = _checked(_plain_set(boxes, scores, labels, box_format), "boxes")
        self._fixed = source if isinstance(source, ProposalSet) else None
        self._by_image = source if isinstance(source, dict) else {}

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> GivenProposer:
        """A proposer reading ``path`` (see :func:`read_given_file`); ``kwargs`` as for the constructor."""
        return cls(Path(path), **kwargs)

    @property
    def image_keys(self) -> tuple[ImageKey, ...]:
        """Keys of the per-image lists (empty when the same boxes serve every image)."""
        return tuple(self._by_image)

    def lookup(self, image: Image.Image | None = None, image_id: Any = None) -> ProposalSet:
        """The raw (unfiltered) boxes for an image, by ``image_id`` or the image's file name.

        Raises:
            ValueError: when the proposals are per image and no key matches.
        """
        if self._fixed is not None:
            return self._fixed
        keys = _candidate_keys(image, image_id)
        for key in keys:
            if key in self._by_image:
                return self._by_image[key]
        known = list(self._by_image)[:_MAX_KEYS_SHOWN]
        raise ValueError(
            f"no given proposals for image keys {keys}; pass image_id= one of {known}"
            f"{' …' if len(self._by_image) > _MAX_KEYS_SHOWN else ''} ({len(self._by_image)} images)"
        )

    def propose(
        self, image: Image.Image, labels: Sequence[str] | None = None, *, image_id: Any = None
    ) -> ProposalSet:
        """The given boxes for ``image`` (``labels`` are ignored), clipped, sorted and capped.

        Args:
            image: the image the boxes refer to (its size clips them).
            labels: unused (given boxes are class-agnostic unless they carry labels).
            image_id: which per-image list to use (default: the file name the image was opened from).
        """
        del labels
        return self._filter(self.lookup(image, image_id), image.size)
