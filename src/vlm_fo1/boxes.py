"""Pure box geometry on torch tensors.

Convention used by every function here (and by the whole package):

- boxes are ``(N, 4)`` floating tensors in **xyxy** order ``(x1, y1, x2, y2)``;
- coordinates are **absolute pixels of one stated frame** (the original image, the resized
  image, the auxiliary-encoder input, ...); a function that changes the frame is explicit about
  it (:func:`scale_boxes`, :func:`normalize_boxes`, :func:`denormalize_boxes`);
- image sizes are ``(width, height)`` tuples, like ``PIL.Image.size``;
- the row order of a box tensor is never changed by these functions: row ``i`` is the box the
  model calls ``<region{i}>``.

All functions are pure: inputs are never modified in place. Other box formats (``xywh``,
``cxcywh``, normalised ``[0, 1]``) exist only at the edges, through the conversion functions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor

logger = logging.getLogger(__name__)

BoxesLike = Tensor | np.ndarray | Sequence[Sequence[float]]
ImageSize = tuple[int, int] | tuple[float, float]

_MAX_LISTED = 10


@dataclass(frozen=True)
class BoxReport:
    """What :func:`sanitize_boxes` changed or noticed (indexes are region indexes).

    Attributes:
        num_boxes: number of boxes checked.
        image_size: the ``(width, height)`` frame the boxes were checked against.
        clipped: indexes of boxes that reached outside the image and were clipped to it.
        zero_area: indexes of boxes with zero width or height (after clipping), kept as they are.
    """

    num_boxes: int
    image_size: tuple[float, float]
    clipped: tuple[int, ...] = ()
    zero_area: tuple[int, ...] = ()

    @property
    def changed(self) -> bool:
        """True when at least one box was clipped."""
        return bool(self.clipped)


def _list_indexes(indexes: Sequence[int]) -> str:
    """``[1, 4, 7]`` or ``[0, 1, …] (25 in total)`` for error and log messages."""
    shown = ", ".join(str(i) for i in indexes[:_MAX_LISTED])
    if len(indexes) > _MAX_LISTED:
        return f"[{shown}, …] ({len(indexes)} in total)"
    return f"[{shown}]"


def _check_size(size: Any, name: str = "image_size") -> tuple[float, float]:
    """Validate a ``(width, height)`` pair of positive finite numbers."""
    if isinstance(size, Tensor):
        size = tuple(size.tolist())
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}")
    width, height = size
    for value in (width, height):
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ValueError(f"{name} must hold numbers, got {size!r}")
        if not math.isfinite(float(value)) or float(value) <= 0:
            raise ValueError(f"{name} must be positive and finite, got {size!r}")
    return float(width), float(height)


def as_box_tensor(boxes: BoxesLike) -> Tensor:
    """Convert boxes to a float32 tensor of shape ``(N, 4)``.

    Accepts a tensor, a numpy array or a (nested) list/tuple. An empty sequence gives a
    ``(0, 4)`` tensor. A tensor keeps its device. The result may share memory with a float32
    tensor input; callers that modify it must clone it first.

    Raises:
        ValueError: when the input is not ``(N, 4)`` shaped or not numeric.
    """
    if isinstance(boxes, Tensor):
        tensor = boxes
    else:
        try:
            array = np.asarray(boxes, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"boxes must be numeric with shape (N, 4), got {boxes!r:.200}") from err
        tensor = torch.from_numpy(array.copy())
    if tensor.numel() == 0 and tensor.dim() <= 2 and (tensor.dim() < 2 or tensor.shape[-1] in (0, 4)):
        return torch.zeros((0, 4), dtype=torch.float32, device=tensor.device)
    if tensor.dim() != 2 or tensor.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"boxes must be real numbers, got dtype {tensor.dtype}")
    return tensor.to(torch.float32)


def _coerce(boxes: BoxesLike) -> Tensor:
    """A floating ``(N, 4)`` tensor; floating tensors keep their dtype, the rest become float32."""
    if isinstance(boxes, Tensor) and boxes.is_floating_point():
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        return boxes
    return as_box_tensor(boxes)


def sanitize_boxes(
    boxes: BoxesLike, image_size: ImageSize, *, max_regions: int | None
) -> tuple[Tensor, BoxReport]:
    """Check candidate boxes against their image and clip the ones that reach outside.

    Args:
        boxes: ``(N, 4)`` xyxy boxes in pixels of the image whose size is ``image_size``.
        image_size: ``(width, height)`` of that image.
        max_regions: the most boxes allowed (the release caps at 100); ``None`` for no cap.

    Returns:
        A new float32 ``(N, 4)`` tensor in the same order (row ``i`` stays ``<region{i}>``) and a
        :class:`BoxReport` with the clipped and zero-area indexes.

    Raises:
        ValueError: on more than ``max_regions`` boxes, NaN/inf coordinates, inverted boxes
            (``x2 < x1`` or ``y2 < y1``), or boxes wholly outside the image (no overlap of
            positive area with ``[0, W] x [0, H]``; a degenerate box counts as inside when it
            touches the closed image rectangle). Messages name the offending indexes.
    """
    width, height = _check_size(image_size)
    tensor = as_box_tensor(boxes)
    num = tensor.shape[0]
    if max_regions is not None:
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 0:
            raise ValueError(f"max_regions must be a non-negative int or None, got {max_regions!r}")
        if num > max_regions:
            raise ValueError(f"got {num} boxes, expected at most max_regions={max_regions}")
    tensor = tensor.detach().clone()  # (N, 4); never touch the caller's tensor
    x1, y1, x2, y2 = tensor.unbind(dim=1)  # each (N,)

    bad = (~torch.isfinite(tensor).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"boxes {_list_indexes(bad)} have NaN or infinite coordinates; expected finite xyxy values"
        )
    bad = ((x2 < x1) | (y2 < y1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"boxes {_list_indexes(bad)} are inverted; expected x1 <= x2 and y1 <= y2, got "
            f"{tensor[bad[0]].tolist()} at index {bad[0]}"
        )

    clipped_boxes = clip_boxes(tensor, (width, height))  # (N, 4)
    clipped_w = clipped_boxes[:, 2] - clipped_boxes[:, 0]
    clipped_h = clipped_boxes[:, 3] - clipped_boxes[:, 1]
    disjoint = (x1 > width) | (x2 < 0) | (y1 > height) | (y2 < 0)
    edge_only = ((x2 > x1) & (clipped_w <= 0)) | ((y2 > y1) & (clipped_h <= 0))
    bad = (disjoint | edge_only).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"boxes {_list_indexes(bad)} lie wholly outside the image of size (width, height)="
            f"({width:g}, {height:g}); expected boxes overlapping [0, {width:g}] x [0, {height:g}], "
            f"got {tensor[bad[0]].tolist()} at index {bad[0]}"
        )

    clipped = (clipped_boxes != tensor).any(dim=1).nonzero().flatten().tolist()
    zero_area = ((clipped_w <= 0) | (clipped_h <= 0)).nonzero().flatten().tolist()
    if clipped:
        logger.warning("clipped boxes %s to the image of size %s", _list_indexes(clipped), (width, height))
    if zero_area:
        logger.warning("boxes %s have zero area; kept", _list_indexes(zero_area))
    report = BoxReport(
        num_boxes=num,
        image_size=(width, height),
        clipped=tuple(clipped),
        zero_area=tuple(zero_area),
    )
    return clipped_boxes, report


def clip_boxes(boxes: BoxesLike, image_size: ImageSize) -> Tensor:
    """Clamp x to ``[0, width]`` and y to ``[0, height]``; returns a new ``(N, 4)`` tensor."""
    width, height = _check_size(image_size)
    tensor = _coerce(boxes)
    x = tensor[:, 0::2].clamp(0.0, width)  # (N, 2): x1, x2
    y = tensor[:, 1::2].clamp(0.0, height)  # (N, 2): y1, y2
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def scale_boxes(boxes: BoxesLike, from_size: ImageSize, to_size: ImageSize) -> Tensor:
    """Move boxes from one pixel frame to another of a different size.

    x is multiplied by ``to_w / from_w`` and y by ``to_h / from_h`` (both frames show the same
    image, resized). Returns a new ``(N, 4)`` tensor.
    """
    from_w, from_h = _check_size(from_size, "from_size")
    to_w, to_h = _check_size(to_size, "to_size")
    tensor = _coerce(boxes)
    factors = tensor.new_tensor([to_w / from_w, to_h / from_h, to_w / from_w, to_h / from_h])  # (4,)
    return tensor * factors


def box_area(boxes: BoxesLike) -> Tensor:
    """Areas ``(x2 - x1) * (y2 - y1)`` of xyxy boxes, shape ``(N,)``."""
    return torchvision.ops.box_area(_coerce(boxes))


def box_iou(boxes_a: BoxesLike, boxes_b: BoxesLike) -> Tensor:
    """Pairwise IoU of two sets of xyxy boxes, shape ``(N, M)`` (torchvision.ops.box_iou)."""
    return torchvision.ops.box_iou(_coerce(boxes_a), _coerce(boxes_b))


def xyxy_to_xywh(boxes: BoxesLike) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(x1, y1, w, h)`` (the COCO annotation format)."""
    tensor = _coerce(boxes)
    return torch.cat((tensor[:, :2], tensor[:, 2:] - tensor[:, :2]), dim=1)


def xywh_to_xyxy(boxes: BoxesLike) -> Tensor:
    """``(x1, y1, w, h)`` -> ``(x1, y1, x2, y2)``."""
    tensor = _coerce(boxes)
    return torch.cat((tensor[:, :2], tensor[:, :2] + tensor[:, 2:]), dim=1)


def xyxy_to_cxcywh(boxes: BoxesLike) -> Tensor:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``."""
    tensor = _coerce(boxes)
    return torch.cat(((tensor[:, :2] + tensor[:, 2:]) / 2, tensor[:, 2:] - tensor[:, :2]), dim=1)


def cxcywh_to_xyxy(boxes: BoxesLike) -> Tensor:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``."""
    tensor = _coerce(boxes)
    half = tensor[:, 2:] / 2  # (N, 2)
    return torch.cat((tensor[:, :2] - half, tensor[:, :2] + half), dim=1)


def normalize_boxes(boxes: BoxesLike, size: ImageSize) -> Tensor:
    """Pixels of a ``(width, height)`` frame -> fractions in ``[0, 1]`` (x / width, y / height)."""
    width, height = _check_size(size, "size")
    tensor = _coerce(boxes)
    return tensor / tensor.new_tensor([width, height, width, height])


def denormalize_boxes(boxes: BoxesLike, size: ImageSize) -> Tensor:
    """Fractions in ``[0, 1]`` -> pixels of a ``(width, height)`` frame (inverse of normalize)."""
    width, height = _check_size(size, "size")
    tensor = _coerce(boxes)
    return tensor * tensor.new_tensor([width, height, width, height])


def nms_keep(boxes: BoxesLike, scores: Tensor | Sequence[float], iou_threshold: float) -> Tensor:
    """Indices of the boxes kept by non-maximum suppression, by descending score.

    Args:
        boxes: ``(N, 4)`` xyxy boxes.
        scores: ``(N,)`` scores.
        iou_threshold: boxes overlapping a higher-scored kept box with IoU above this are removed.

    Returns:
        An int64 tensor of kept indexes into ``boxes`` (torchvision.ops.nms).
    """
    tensor = _coerce(boxes)
    score_tensor = torch.as_tensor(scores, device=tensor.device).to(tensor.dtype)
    if score_tensor.dim() != 1 or score_tensor.shape[0] != tensor.shape[0]:
        raise ValueError(
            f"scores must have shape ({tensor.shape[0]},) to match the boxes, got {tuple(score_tensor.shape)}"
        )
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    return torchvision.ops.nms(tensor, score_tensor, float(iou_threshold))


def match_boxes(
    candidate_boxes: BoxesLike, target_boxes: BoxesLike, iou_threshold: float = 0.5, *, order: str = "iou"
) -> list[int | None]:
    """Greedy one-to-one matching of targets (e.g. true objects) to candidates (e.g. proposals).

    ``order="iou"``: pairs are taken by descending IoU (ties: lower target index, then lower
    candidate index first). ``order="candidates"``: candidates are taken in their order (sorted
    by score, as proposals are), each claiming the unmatched target it overlaps most, the rule
    of COCO evaluation; the highest-scored good box of each object wins. Each candidate and each
    target is used at most once, and only while ``IoU >= iou_threshold``.

    Args:
        candidate_boxes: ``(N, 4)`` xyxy boxes to choose from.
        target_boxes: ``(M, 4)`` xyxy boxes, in the same pixel frame.
        iou_threshold: the least IoU of a match, in ``(0, 1]``.
        order: ``"iou"`` or ``"candidates"``.

    Returns:
        For each target, the index of its matched candidate, or None (a list of length ``M``).

    Raises:
        ValueError: when ``iou_threshold`` is outside ``(0, 1]`` or the boxes are not ``(N, 4)``.
    """
    if isinstance(iou_threshold, bool) or not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold!r}")
    if order not in ("iou", "candidates"):
        raise ValueError(f"order must be 'iou' or 'candidates', got {order!r}")
    candidates, targets = _coerce(candidate_boxes), _coerce(target_boxes)
    result: list[int | None] = [None] * targets.shape[0]
    if not candidates.shape[0] or not targets.shape[0]:
        return result
    ious = box_iou(targets, candidates).tolist()  # (M, N)
    if order == "candidates":
        for c in range(candidates.shape[0]):
            free = [
                (ious[t][c], -t)
                for t in range(len(result))
                if result[t] is None and ious[t][c] >= iou_threshold
            ]
            if free:
                result[-max(free)[1]] = c
        return result
    pairs = sorted(
        ((iou, t, c) for t, row in enumerate(ious) for c, iou in enumerate(row) if iou >= iou_threshold),
        key=lambda pair: (-pair[0], pair[1], pair[2]),
    )
    used: set[int] = set()
    for _, t, c in pairs:
        if result[t] is None and c not in used:
            result[t] = c
            used.add(c)
    return result
