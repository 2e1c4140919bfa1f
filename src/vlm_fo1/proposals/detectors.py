"""Open-vocabulary detectors from transformers as proposal networks.

Registered names: ``omdet-turbo`` (``OmDetTurboForObjectDetection``, the detector the paper's OPN
is built on), ``grounding-dino`` (``GroundingDinoForObjectDetection``) and ``owlv2``
(``Owlv2ForObjectDetection``). Each adapter runs the model on one image with the query's object
words (or a generic word list when the query has none), converts the output with the processor's
own post-processing (``target_sizes`` = the original ``(height, width)``, so boxes come back in
original image pixels), then applies :func:`vlm_fo1.proposals.base.postprocess`.

``model`` is a local directory, a hub id (downloaded only when the hub is reachable; with
``HF_HUB_OFFLINE`` set only the local cache is used) or a ready model object, in which case a
ready ``processor`` is needed too. A source that cannot be loaded raises ``ValueError`` at once,
never after minutes of retries against an unreachable hub.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import torch
from PIL import Image

from vlm_fo1.images import load_image
from vlm_fo1.proposals.base import (
    DEFAULT_NMS_IOU,
    DEFAULT_SCORE_THRESHOLD,
    DEFAULT_TOP_K,
    FilteredProposer,
    ProposalSet,
    register_proposer,
)

logger = logging.getLogger(__name__)

DEFAULT_LABELS: tuple[str, ...] = (
    "person",
    "animal",
    "vehicle",
    "car",
    "bicycle",
    "dog",
    "cat",
    "bird",
    "chair",
    "table",
    "bottle",
    "cup",
    "bag",
    "book",
    "phone",
    "screen",
    "plant",
    "sign",
    "ball",
    "box",
    "food",
    "building",
    "window",
    "door",
)
"""Object words queried when a request names none (class-agnostic proposals)."""

_HUB_PROBE_TIMEOUT_S = 3.0


def transformers_class(name: str) -> Any:
    """``transformers.<name>``, imported lazily: the one place the detector classes are imported.

    Raises:
        ImportError: when the installed transformers lacks the class.
    """
    import transformers

    found = getattr(transformers, name, None)
    if found is None:
        raise ImportError(f"transformers {transformers.__version__} has no {name}; a newer release is needed")
    return found


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained(cls: Any, source: str | Path) -> Any:
    """``cls.from_pretrained(source)`` that fails fast without network.

    A directory is read as it is. Anything else is first looked up in the local cache
    (``local_files_only=True``); only when that fails, ``HF_HUB_OFFLINE`` is unset and the hub
    answers is it downloaded.

    Raises:
        ValueError: when ``source`` cannot be loaded; the message says to pass a local directory.
    """
    from huggingface_hub import constants

    path = Path(source).expanduser()
    what = f"{cls.__name__} from {str(source)!r}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot load {what}: expected a model directory or a hub id, got a file")
    if path.is_dir():
        try:
            return cls.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load {what}: {err}") from err
    try:
        return cls.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as err:
        cache_error = err
    offline = constants.is_offline_mode()
    if offline or not _hub_reachable():
        reason = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable"
        raise ValueError(
            f"cannot load {what}: it is not a local directory, not in the local cache, and {reason}; "
            f"pass a local directory holding the downloaded model and processor files ({cache_error})"
        ) from cache_error
    try:
        return cls.from_pretrained(str(source))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load {what}: {err}; pass a local directory instead") from err


def _check_labels(labels: Sequence[str], name: str) -> tuple[str, ...]:
    """Non-empty, stripped, de-duplicated object words (order kept)."""
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise ValueError(f"{name} must be a sequence of strings, got {type(labels).__name__}")
    words = [label.strip() if isinstance(label, str) else label for label in labels]
    bad = [label for label in words if not isinstance(label, str) or not label]
    if bad or not words:
        raise ValueError(f"{name} must be non-empty strings (at least one), got {list(labels)!r}")
    return tuple(dict.fromkeys(words))


class TransformersDetector(FilteredProposer):
    """Shared adapter logic; subclasses encode the query and decode the processor's output.

    Args:
        model: a local directory or hub id, or a ready model object (then ``processor`` is needed).
        processor: a ready processor, a directory or hub id; default: loaded from ``model``.
        device: where to run (default: where the model already is; loaded models start on CPU).
        dtype: optional model dtype (e.g. ``torch.bfloat16`` on GPU).
        labels: generic object words, queried when a request brings none.
        score_threshold / nms_iou / top_k: the filter of :func:`postprocess` (the release's values).
    """

    name: ClassVar[str]
    model_class: ClassVar[str]
    processor_class: ClassVar[str]

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        labels: Sequence[str] = DEFAULT_LABELS,
        score_threshold: float | None = DEFAULT_SCORE_THRESHOLD,
        nms_iou: float | None = DEFAULT_NMS_IOU,
        top_k: int | None = DEFAULT_TOP_K,
    ) -> None:
        self._set_filter(score_threshold, nms_iou, top_k)
        self.model, self.processor = self._resolve(model, processor)
        if dtype is not None or device is not None:
            self.model.to(device=device, dtype=dtype)
        self.model.eval()
        self.labels = _check_labels(labels, "labels")

    def _resolve(self, model: Any, processor: Any) -> tuple[Any, Any]:
        """The model and processor objects, loading those given as paths or hub ids."""
        if isinstance(model, str | Path):
            processor = model if processor is None else processor
            model = load_pretrained(transformers_class(self.model_class), model)
        elif not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"model must be a directory, a hub id or a {self.model_class}, got {type(model).__name__}"
            )
        if processor is None:
            raise ValueError(
                f"a ready model object needs a ready processor ({self.processor_class}), got None"
            )
        if isinstance(processor, str | Path):
            processor = load_pretrained(transformers_class(self.processor_class), processor)
        return model, processor

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (pixel values are cast to it)."""
        return next(self.model.parameters()).dtype

    @property
    def _threshold(self) -> float:
        """Threshold handed to the processor's own post-processing (ours decides in the end)."""
        return 0.0 if self.score_threshold is None else float(self.score_threshold)

    def queries(self, labels: Sequence[str] | None) -> tuple[str, ...]:
        """The object words to detect: ``labels`` when given and non-empty, else the generic set."""
        if labels is None or len(labels) == 0:
            return self.labels
        return _check_labels(labels, "labels")

    def propose(self, image: Image.Image, labels: Sequence[str] | None = None) -> ProposalSet:
        """Detect ``labels`` (or the generic words) in ``image``; ``(N, 4)`` boxes in its pixels."""
        image = load_image(image)
        words = self.queries(labels)
        inputs = self._encode(image, words).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        result = self._decode(outputs, inputs, words, [(image.height, image.width)])
        raw = ProposalSet(result["boxes"], result["scores"], tuple(result["text_labels"]))
        logger.debug("%s: %d raw detections for %d words", self.name, len(raw), len(words))
        return self._filter(raw, image.size)

    def _encode(self, image: Image.Image, words: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def _decode(self, outputs: Any, inputs: Any, words: tuple[str, ...], sizes: list[tuple[int, int]]) -> Any:
        """The processor's post-processed result for the one image: boxes, scores, text_labels."""
        raise NotImplementedError


@register_proposer("omdet-turbo")
class OmDetTurboProposer(TransformersDetector):
    """OmDet-Turbo (e.g. ``omlab/omdet-turbo-swin-tiny-hf``); its class-wise NMS uses ``nms_iou``."""

    name = "omdet-turbo"
    model_class = "OmDetTurboForObjectDetection"
    processor_class = "OmDetTurboProcessor"

    def _encode(self, image: Image.Image, words: tuple[str, ...]) -> Any:
        return self.processor(images=image, text=list(words), return_tensors="pt")

    def _decode(self, outputs: Any, inputs: Any, words: tuple[str, ...], sizes: list[tuple[int, int]]) -> Any:
        return self.processor.post_process_grounded_object_detection(
            outputs,
            text_labels=[list(words)],
            threshold=self._threshold,
            nms_threshold=1.0 if self.nms_iou is None else float(self.nms_iou),
            target_sizes=sizes,
        )[0]


@register_proposer("grounding-dino")
class GroundingDinoProposer(TransformersDetector):
    """Grounding DINO (e.g. ``IDEA-Research/grounding-dino-tiny``).

    Args:
        text_threshold: least token probability for a word to enter a box's label.
        **kwargs: as for :class:`TransformersDetector`.
    """

    name = "grounding-dino"
    model_class = "GroundingDinoForObjectDetection"
    processor_class = "GroundingDinoProcessor"

    def __init__(self, model: Any, processor: Any = None, *, text_threshold: float = 0.25, **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        self.text_threshold = float(text_threshold)

    def _encode(self, image: Image.Image, words: tuple[str, ...]) -> Any:
        # "a cat. a dog." (lower case, one period after each phrase), built here so that a word
        # holding a period cannot split the prompt.
        text = " ".join(word.lower().replace(".", " ").strip() + "." for word in words)
        return self.processor(images=image, text=text, return_tensors="pt")

    def _decode(self, outputs: Any, inputs: Any, words: tuple[str, ...], sizes: list[tuple[int, int]]) -> Any:
        return self.processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self._threshold,
            text_threshold=self.text_threshold,
            target_sizes=sizes,
        )[0]


@register_proposer("owlv2")
class Owlv2Proposer(TransformersDetector):
    """OWLv2 (e.g. ``google/owlv2-base-patch16-ensemble``).

    The processor pads the image to a square before resizing; its post-processing scales boxes
    by the long side accordingly, and :func:`postprocess` clips what falls on the padding.
    """

    name = "owlv2"
    model_class = "Owlv2ForObjectDetection"
    processor_class = "Owlv2Processor"

    def _encode(self, image: Image.Image, words: tuple[str, ...]) -> Any:
        return self.processor(images=image, text=[list(words)], return_tensors="pt")

    def _decode(self, outputs: Any, inputs: Any, words: tuple[str, ...], sizes: list[tuple[int, int]]) -> Any:
        return self.processor.post_process_grounded_object_detection(
            outputs, threshold=self._threshold, target_sizes=sizes, text_labels=[list(words)]
        )[0]
