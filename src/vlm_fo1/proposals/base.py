"""The proposal-network protocol, its result type, the release's filter and a registry.

A *proposal network* hands VLM-FO1 its candidate boxes: up to 100 class-agnostic boxes per image,
row ``i`` becoming ``<region{i}>``. Every proposer here returns a :class:`ProposalSet` whose boxes
are ``(N, 4)`` float32 xyxy in **original image pixels**, sorted by descending score.

:func:`postprocess` is the release's filter (official-release.md §6, UPN): keep ``score >= 0.3``,
class-agnostic NMS at IoU ``0.8``, sort by score, keep the first ``100``; given the image size it
also clips the boxes to the image and drops those left without area.

Proposers are built by name (``build_proposer("omdet-turbo", model=...)``) from factories that
register themselves with :func:`register_proposer`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor

from vlm_fo1.boxes import BoxesLike, ImageSize, as_box_tensor, clip_boxes, nms_keep

logger = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.8
DEFAULT_TOP_K = 100


@dataclass(frozen=True, eq=False)
class ProposalSet:
    """Candidate boxes of one image.

    Attributes:
        boxes: ``(N, 4)`` float32 xyxy boxes in pixels of the original image (CPU).
        scores: ``(N,)`` float32 scores, one per box.
        labels: one text label per box (what an open-vocabulary detector named it; ``""`` for
            unknown), or None for class-agnostic sources.

    Inputs are coerced on construction (lists, numpy arrays, tensors of any float dtype or
    device); a shape or length mismatch raises ``ValueError``.
    """

    boxes: Tensor
    scores: Tensor
    labels: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        boxes = as_box_tensor(self.boxes).detach().to("cpu", torch.float32)  # (N, 4)
        scores = torch.as_tensor(self.scores).detach().to("cpu", torch.float32).reshape(-1)  # (N,)
        if scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"expected one score per box ({boxes.shape[0]}), got {scores.shape[0]} scores")
        labels = self.labels
        if labels is not None:
            labels = tuple(str(label) for label in labels)
            if len(labels) != boxes.shape[0]:
                raise ValueError(f"expected one label per box ({boxes.shape[0]}), got {len(labels)} labels")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, with_labels: bool = False) -> ProposalSet:
        """A set without boxes (``(0, 4)`` boxes, ``(0,)`` scores)."""
        return cls(torch.zeros((0, 4)), torch.zeros((0,)), () if with_labels else None)

    def select(self, indexes: Tensor | Sequence[int]) -> ProposalSet:
        """The rows ``indexes`` (in that order) as a new set."""
        index = torch.as_tensor(indexes, dtype=torch.long).reshape(-1)  # (K,)
        labels = None if self.labels is None else tuple(self.labels[i] for i in index.tolist())
        return ProposalSet(self.boxes[index], self.scores[index], labels)

    def to_json(self) -> dict[str, Any]:
        """``{"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "labels": [...] | None}``."""
        return {
            "boxes": self.boxes.tolist(),
            "scores": self.scores.tolist(),
            "labels": None if self.labels is None else list(self.labels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> ProposalSet:
        """Inverse of :meth:`to_json` (a mapping or its JSON text); ``scores`` default to 1.0."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, Mapping) or "boxes" not in data:
            raise ValueError(f"expected a mapping with 'boxes' (and 'scores', 'labels'), got {data!r:.200}")
        boxes = as_box_tensor(data["boxes"])
        scores = data.get("scores")
        if scores is None:
            scores = torch.ones(boxes.shape[0])
        return cls(boxes, torch.as_tensor(scores, dtype=torch.float32), data.get("labels"))


@runtime_checkable
class ProposalNetwork(Protocol):
    """Anything that proposes candidate boxes for an image.

    ``propose`` returns boxes in the pixels of ``image`` as given (its original frame). ``labels``
    are the object words of the query, for detectors that use text; class-agnostic proposers
    ignore them.
    """

    name: str

    def propose(self, image: Image.Image, labels: Sequence[str] | None = None) -> ProposalSet: ...


def check_filter(score_threshold: float | None, nms_iou: float | None, top_k: int | None) -> None:
    """Validate the arguments of :func:`postprocess` (each may be None: step skipped).

    Raises:
        ValueError: when a threshold is outside ``[0, 1]`` or ``top_k`` is not an int >= 1.
    """
    for name, value in (("score_threshold", score_threshold), ("nms_iou", nms_iou)):
        if value is not None and (isinstance(value, bool) or not 0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1] or None, got {value!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")


def postprocess(
    proposals: ProposalSet,
    *,
    score_threshold: float | None = DEFAULT_SCORE_THRESHOLD,
    nms_iou: float | None = DEFAULT_NMS_IOU,
    top_k: int | None = DEFAULT_TOP_K,
    image_size: ImageSize | None = None,
) -> ProposalSet:
    """The release's proposal filter (official-release.md §6).

    Steps, each skipped when its argument is None: clip to ``image_size`` ``(width, height)`` and
    drop boxes without area (NaN boxes are dropped too); keep ``score >= score_threshold``;
    class-agnostic NMS at IoU ``nms_iou``; sort by descending score (ties keep the input order);
    keep the first ``top_k``.

    Args:
        proposals: ``N`` raw boxes in original image pixels.

    Returns:
        A new :class:`ProposalSet` of ``K <= N`` rows (``(K, 4)`` boxes, ``(K,)`` scores).

    Raises:
        ValueError: when ``top_k`` is not an int >= 1 or a threshold is outside ``[0, 1]``.
    """
    check_filter(score_threshold, nms_iou, top_k)
    boxes, scores = proposals.boxes, proposals.scores  # (N, 4), (N,)
    if image_size is not None:
        boxes = clip_boxes(boxes, image_size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # (N,); False for NaN
    keep &= torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    if int((~keep).sum()):
        logger.debug("dropped %d proposals without area inside the image", int((~keep).sum()))
    if score_threshold is not None:
        keep &= scores >= float(score_threshold)
    index = keep.nonzero().flatten()  # (M,)
    if nms_iou is not None and index.numel():
        kept = nms_keep(boxes[index], scores[index], float(nms_iou))
        index = index[kept.sort().values]
    order = torch.sort(scores[index], descending=True, stable=True).indices  # (M,)
    index = index[order][:top_k]
    clipped = ProposalSet(boxes, scores, proposals.labels)
    return clipped.select(index)


class FilteredProposer:
    """Mixin for proposers: keeps the ``score_threshold`` / ``nms_iou`` / ``top_k`` filter
    settings (validated once) and applies :func:`postprocess` with them."""

    score_threshold: float | None
    nms_iou: float | None
    top_k: int | None

    def _set_filter(self, score_threshold: float | None, nms_iou: float | None, top_k: int | None) -> None:
        check_filter(score_threshold, nms_iou, top_k)
        self.score_threshold, self.nms_iou, self.top_k = score_threshold, nms_iou, top_k

    def _filter(self, raw: ProposalSet, image_size: tuple[int, int]) -> ProposalSet:
        """``raw`` clipped to ``image_size`` (width, height) and filtered by this proposer's settings."""
        return postprocess(
            raw,
            score_threshold=self.score_threshold,
            nms_iou=self.nms_iou,
            top_k=self.top_k,
            image_size=image_size,
        )


ProposerFactory = Callable[..., ProposalNetwork]
_REGISTRY: dict[str, ProposerFactory] = {}


def register_proposer(name: str) -> Callable[[ProposerFactory], ProposerFactory]:
    """Decorator filing a proposer factory (a class or function) under ``name``.

    Raises:
        ValueError: when ``name`` is empty or already taken by another factory.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a proposer name must be a non-empty string, got {name!r}")

    def decorate(factory: ProposerFactory) -> ProposerFactory:
        known = _REGISTRY.get(name)
        if known is not None and known is not factory:
            raise ValueError(f"proposer name {name!r} is already registered to {known!r}")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_proposers() -> tuple[str, ...]:
    """The registered proposer names, sorted."""
    return tuple(sorted(_REGISTRY))


def build_proposer(name: str, **kwargs: Any) -> ProposalNetwork:
    """Build the proposer registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown proposer {name!r}; expected one of {list(available_proposers())}")
    return factory(**kwargs)


class UnionProposer(FilteredProposer):
    """Several proposers at once: their boxes are pooled, then :func:`postprocess` ed together.

    Labels: when at least one source gives labels, sources without them contribute ``""``.

    Args:
        proposers: the sources (at least one).
        score_threshold / nms_iou / top_k: the filter applied to the pooled boxes.
    """

    def __init__(
        self,
        proposers: Sequence[ProposalNetwork],
        *,
        score_threshold: float | None = DEFAULT_SCORE_THRESHOLD,
        nms_iou: float | None = DEFAULT_NMS_IOU,
        top_k: int | None = DEFAULT_TOP_K,
    ) -> None:
        if not proposers:
            raise ValueError("UnionProposer needs at least one proposer, got none")
        self._set_filter(score_threshold, nms_iou, top_k)
        self.proposers = tuple(proposers)
        self.name = "union(" + "+".join(p.name for p in self.proposers) + ")"

    def propose(self, image: Image.Image, labels: Sequence[str] | None = None) -> ProposalSet:
        """Pool every source's boxes for ``image`` and filter them (boxes in ``image`` pixels)."""
        parts = [proposer.propose(image, labels) for proposer in self.proposers]
        return self._filter(merge_proposals(parts), image.size)


def merge_proposals(parts: Sequence[ProposalSet]) -> ProposalSet:
    """Concatenate sets in order (``(sum N_i, 4)`` boxes); no filtering."""
    if not parts:
        return ProposalSet.empty()
    labels: tuple[str, ...] | None = None
    if any(part.labels is not None for part in parts):
        labels = tuple(
            label
            for part in parts
            for label in (part.labels if part.labels is not None else [""] * len(part))
        )
    boxes = torch.cat([part.boxes for part in parts])  # (N, 4)
    scores = torch.cat([part.scores for part in parts])  # (N,)
    return ProposalSet(boxes, scores, labels)


def as_proposal_set(boxes: BoxesLike, scores: Any = None, labels: Sequence[str] | None = None) -> ProposalSet:
    """A :class:`ProposalSet` from boxes and optional scores (default 1.0) and labels."""
    tensor = as_box_tensor(boxes)
    score_tensor = torch.ones(tensor.shape[0]) if scores is None else torch.as_tensor(scores)
    return ProposalSet(tensor, score_tensor, None if labels is None else tuple(labels))
