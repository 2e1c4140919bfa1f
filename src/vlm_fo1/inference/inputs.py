"""Inputs of the predictor: proposals in any reasonable form, labels, devices, dtypes and image lists.

Proposals (``Predictor.set_image(image, proposals=…)``) may be
- a ``vlm_fo1.proposals.ProposalSet`` (or anything with ``boxes`` and ``scores`` attributes);
- a list of ``[x1, y1, x2, y2]`` boxes, an ``(N, 4)`` tensor or array (scores 1.0);
- a pair ``(boxes, scores)``;
- a dict ``{"boxes": [...], "scores": [...], "labels": [...]}`` (``scores``, ``labels`` optional).
Boxes are xyxy in original image pixels. Box *files* are read by
``vlm_fo1.proposals.GivenProposer`` (plain lists, per-image mappings, COCO results, the release's
JSONL).

Image lists (``vlm-fo1 predict SOURCE``): a folder (its image files, sorted, not recursive), a
text file with one path per line (``#`` comments), or a COCO JSON with an ``images`` list
(``file_name`` and ``id`` kept). Relative paths start from ``image_root`` (default: the list's folder).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlm_fo1.proposals.base import ProposalSet, as_proposal_set

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _is_box_list(value: Any) -> bool:
    """True for an ``(N, 4)`` tensor/array or a sequence of 4-sequences (N may be 0)."""
    if hasattr(value, "shape"):
        return len(value.shape) == 2 or (len(value.shape) == 1 and value.shape[0] == 0)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(isinstance(v, Sequence) or hasattr(v, "shape") for v in value)
    return False


def as_proposals(value: Any) -> ProposalSet:
    """Normalise any accepted proposal form (module docstring) to a ``ProposalSet``.

    Raises:
        ValueError: when the form is not recognised or the counts of boxes, scores and labels differ.
    """
    if isinstance(value, ProposalSet):
        return value
    if hasattr(value, "boxes") and hasattr(value, "scores"):
        return as_proposal_set(value.boxes, value.scores, getattr(value, "labels", None))
    if isinstance(value, Mapping):
        return ProposalSet.from_json(value)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and _is_box_list(value[0])
        and not _is_box_list(value[1])
    ):
        return as_proposal_set(value[0], value[1])
    if _is_box_list(value):
        return as_proposal_set(torch.as_tensor(value, dtype=torch.float32).reshape(-1, 4))
    raise ValueError(
        "proposals must be a ProposalSet, a list of [x1, y1, x2, y2] boxes, a (boxes, scores) pair "
        f"or a dict with 'boxes', got {type(value).__name__}"
    )


def cap_proposals(proposals: ProposalSet, max_regions: int) -> ProposalSet:
    """At most ``max_regions`` proposals: the highest-scored ones, kept in their given order."""
    if len(proposals) <= max_regions:
        return proposals
    logger.info("keeping %d of %d proposals (the model's max_regions)", max_regions, len(proposals))
    keep = torch.topk(proposals.scores, max_regions).indices.sort().values  # (max_regions,)
    return proposals.select(keep)


def resolve_device(device: str | torch.device | None, model: torch.nn.Module) -> torch.device:
    """``None``: where the model is; ``"auto"``: CUDA when available; else ``torch.device(device)``."""
    if device is None:
        return next(model.parameters()).device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` → ``torch.bfloat16`` (None stays None); ValueError for other names."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as 'bfloat16', got {dtype!r}")
    return value


def split_labels(labels: str | Sequence[str]) -> list[str]:
    """``"cat, dog"`` or ``["cat", "dog"]`` → ``["cat", "dog"]`` (blank entries dropped)."""
    items = labels.split(",") if isinstance(labels, str) else list(labels)
    names = [str(item).strip() for item in items if str(item).strip()]
    if not names:
        raise ValueError(f"expected at least one non-empty label, got {labels!r}")
    return names


def drop_invalid(proposals: ProposalSet, size: tuple[int, int]) -> ProposalSet:
    """Proposer output without boxes that are non-finite, inverted or wholly outside the image."""
    b = proposals.boxes
    width, height = size
    finite = torch.isfinite(b).all(dim=1)
    ordered = (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])
    inside = (b[:, 0] < width) & (b[:, 1] < height) & (b[:, 2] > 0) & (b[:, 3] > 0)
    keep = finite & ordered & inside
    if bool(keep.all()):
        return proposals
    logger.warning("dropped %d invalid proposals of %d", int((~keep).sum()), len(proposals))
    return proposals.select(keep.nonzero().flatten())


def propose(proposer: Any, image: Any, labels: Sequence[str] | None, keys: Sequence[Any] = ()) -> ProposalSet:
    """``proposer.propose(image, labels)`` as a ``ProposalSet``; a ``GivenProposer`` holding boxes
    per image is looked up by ``keys`` (image id, listed path, file name) in turn.

    Raises:
        ValueError: when a per-image box file has no entry for any of ``keys``.
    """
    from vlm_fo1.proposals import GivenProposer

    if not (isinstance(proposer, GivenProposer) and proposer.image_keys and keys):
        return as_proposals(proposer.propose(image, labels))
    error: ValueError | None = None
    for key in keys:
        try:
            return proposer.propose(image, labels, image_id=key)
        except ValueError as err:
            error = err
    raise ValueError(f"the box file has no boxes for this image: {error}")


DETECTOR_MODELS = {  # the detectors' public checkpoints, used when no detector model is named
    "omdet-turbo": "omlab/omdet-turbo-swin-tiny-hf",
    "grounding-dino": "IDEA-Research/grounding-dino-tiny",
    "owlv2": "google/owlv2-base-patch16-ensemble",
}


def make_proposer(
    name: str, *, model: str | None = None, boxes: str | Path | None = None, device: str | None = None
) -> Any:
    """A proposal network by registry name (``vlm_fo1.proposals``), with this package's defaults.

    ``given`` reads ``boxes`` (a box file; None: no proposer, the caller passes boxes); the
    transformers detectors load ``model`` (default: :data:`DETECTOR_MODELS`), failing fast offline.

    Raises:
        ValueError: for an unknown name, ``boxes`` with another proposer, or a proposer that
            needs more than these options (e.g. ``synthetic`` needs its scenes).
    """
    from vlm_fo1.proposals import GivenProposer, build_proposer  # optional detectors load lazily

    if name == "given":
        return None if boxes is None else GivenProposer.from_file(boxes)
    if boxes is not None:
        raise ValueError(f"a box file is only read by the 'given' proposer, got proposer {name!r}")
    if name in DETECTOR_MODELS:
        return build_proposer(name, model=model or DETECTOR_MODELS[name], device=device)
    try:
        return build_proposer(name)
    except TypeError as err:
        raise ValueError(f"proposer {name!r} cannot be built from a name alone: {err}") from None


@dataclass(frozen=True)
class ImageEntry:
    """One image of a prediction run: its path, its id in the results, and its listed name."""

    path: Path
    image_id: int
    file_name: str


def list_images(source: str | Path, image_root: str | Path | None = None) -> list[ImageEntry]:
    """The images of a folder, a text list or a COCO JSON (module docstring); ids from 1 unless given.

    ``image_root``: where relative paths of a list or COCO JSON start (default: the file's folder).

    Raises:
        ValueError: when ``source`` does not exist or holds no image.
    """
    source = Path(source)
    root = source.parent if image_root is None else Path(image_root)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        entries = [ImageEntry(p, i, p.name) for i, p in enumerate(files, start=1)]
    elif source.is_file() and source.suffix.lower() == ".json":
        try:
            images = json.loads(source.read_text())["images"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"expected a COCO JSON with an 'images' list in {str(source)!r}: {err}") from err
        entries = [ImageEntry(root / im["file_name"], int(im["id"]), im["file_name"]) for im in images]
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        names = [line for line in lines if line and not line.startswith("#")]
        entries = [ImageEntry(root / n, i, n) for i, n in enumerate(names, start=1)]
    else:
        raise ValueError(f"expected a folder, a text list or a COCO JSON, but {str(source)!r} does not exist")
    if not entries:
        raise ValueError(f"no images found in {str(source)!r}")
    return entries
