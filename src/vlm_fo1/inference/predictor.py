"""``Predictor``: load once, ``set_image`` once, then ask many questions about that image.

>>> predictor = Predictor.from_pretrained("path/to/checkpoint", proposer="omdet-turbo")
>>> predictor.set_image("photo.jpg", labels=["cat", "dog"])   # proposals + both encoders, once
>>> predictor.detect(["cat", "dog"]).detections               # boxes in original pixels
>>> predictor.count("cat").count
>>> predictor.describe(3).answer                              # region 3 of the proposals

``set_image`` runs the proposal network (unless proposals are given), caps the proposals at the
model's ``max_regions`` (highest scores kept), and caches the prepared image, the ViT encoding
and the region tokens. Every question then only runs the language model: it builds the task
prompt, generates greedily under :class:`vlm_fo1.decoding.GroundingConstraint` (unless
``constrained=False``), parses the answer and returns a frozen result (``inference.results``).

Errors: a question before ``set_image`` raises :class:`NoImageError` (a ``RuntimeError``); bad
arguments (unknown region index, empty labels, bad boxes) raise ``ValueError``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessorList

from vlm_fo1.decoding import GrammarVocabulary, GroundingConstraint, check_close_bias, check_suppress_overlap
from vlm_fo1.evaluation.confidence import (
    check_mode,
    detection_confidence,
    join_answers,
    region_token_probabilities,
)
from vlm_fo1.images import load_image
from vlm_fo1.inference.inputs import (
    as_proposals,
    cap_proposals,
    drop_invalid,
    make_proposer,
    propose,
    resolve_device,
    resolve_dtype,
    split_labels,
)
from vlm_fo1.inference.results import (
    AnswerResult,
    CountResult,
    DetectionResult,
    Prediction,
    RegionDetection,
    RegionMention,
    scored_detections,
)
from vlm_fo1.processing import FO1Batch, FO1Processor, PreparedImage
from vlm_fo1.prompting import Prompt, RegionRef, Task, parse
from vlm_fo1.prompting import templates as P
from vlm_fo1.proposals.base import ProposalSet
from vlm_fo1.ranking import ENCODER_INPUTS, rank_batch

logger = logging.getLogger(__name__)

_FREE_MENTION_TASKS = frozenset({Task.FREE, Task.REGION_REASONING, Task.GROUNDED_CAPTION})
_DETECTION_TASKS = frozenset({Task.DETECTION, Task.REFERRING, Task.VISUAL_PROMPT_DETECTION})
_SAME_BOX_TOLERANCE = 0.5  # pixels: a given box this close to a proposal is that proposal


class NoImageError(RuntimeError):
    """A question was asked before :meth:`Predictor.set_image`."""


@dataclass(frozen=True)
class ImageState:
    """What ``set_image`` caches: the image made ready, its proposals and both encodings."""

    prepared: PreparedImage
    proposals: ProposalSet  # boxes clipped to the image, as the model sees them
    image_encoding: Any
    region_tokens: torch.Tensor | None  # (N, D_llm), None without proposals


class Predictor:
    """Ask many questions about one image; see the module docstring.

    Args:
        model: an ``FO1ForConditionalGeneration``.
        processor: the matching ``FO1Processor``.
        proposer: a ``vlm_fo1.proposals.ProposalNetwork`` (``propose(image, labels)``), used by
            ``set_image`` when no proposals are given; None: no proposer (pass proposals).
        device / dtype: where and in which precision to run (None: as the model is).
        max_new_tokens: generation budget of each answer.
        confidence: ``"product"`` (model probability × proposal score), ``"model"`` or ``"proposal"``.
        constrained: decode under the grounding grammar (only existing regions, well-formed tags).
        stop_by_mass: under the grammar, go on naming regions while they together hold more
            probability than ``</objects>`` (``vlm_fo1.decoding``; not in the release).
        suppress_overlap: under the grammar, once a box is named, the boxes overlapping it by more
            than this IoU are not offered in the same answer group (``vlm_fo1.decoding``; not in
            the release; None: off).
        close_bias: under the grammar, added to the logit of ``</objects>`` inside an answer
            group: another region is named only while it is ``e^close_bias`` times as likely as
            closing (``vlm_fo1.decoding``; not in the release; 0: off; > 0: fewer false positives,
            fewer regions). The model probabilities of the detections then include it.
        unique_labels: under the grammar, each label asked in ``detect`` / ``count`` opens at
            most one ``<ground>`` segment of an answer (``vlm_fo1.decoding``; not in the release).
        count_from_list: under the grammar, a number written right after ``</objects>`` (the
            count of a ``count`` answer) is the number of distinct regions the answer named
            (``vlm_fo1.decoding``; not in the release).
    """

    def __init__(
        self,
        model: Any,
        processor: FO1Processor,
        proposer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_new_tokens: int = 128,
        confidence: str = "product",
        constrained: bool = True,
        stop_by_mass: bool = False,
        suppress_overlap: float | None = None,
        close_bias: float = 0.0,
        unique_labels: bool = False,
        count_from_list: bool = False,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.confidence = check_mode(confidence)
        self.device = resolve_device(device, model)
        torch_dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=torch_dtype).eval()
        self.processor = processor
        self.proposer = proposer
        self.max_new_tokens = max_new_tokens
        self.constrained = constrained
        self.stop_by_mass = stop_by_mass
        self.suppress_overlap = check_suppress_overlap(suppress_overlap)
        self.close_bias = check_close_bias(close_bias)
        self.unique_labels = unique_labels
        self.count_from_list = count_from_list
        self.vocabulary = GrammarVocabulary.from_processor(processor)
        self._state: ImageState | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        proposer: Any = None,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """Load model and processor from a local directory (or a Hub id, fetched or cached).

        ``proposer`` may be a registry name (see ``inputs.make_proposer``: detectors load their
        default checkpoint) or a ready object; ``kwargs`` go to the constructor. Raises
        ``ModelNotFoundError`` (a ``ValueError``) at once when a Hub id cannot be reached.
        """
        from vlm_fo1.inference.hub import resolve_model_path
        from vlm_fo1.model import FO1ForConditionalGeneration

        path = resolve_model_path(path_or_hub_id)
        torch_dtype = resolve_dtype(dtype)
        model = FO1ForConditionalGeneration.from_pretrained(
            path, **({"dtype": torch_dtype} if torch_dtype else {})
        )
        processor = FO1Processor.from_pretrained(path)
        if isinstance(proposer, str):
            proposer = make_proposer(proposer)
        return cls(model, processor, proposer, device=device, dtype=torch_dtype, **kwargs)

    # -- the image ---------------------------------------------------------------------------------------
    @property
    def image_state(self) -> ImageState:
        """The cached state of the current image; :class:`NoImageError` before ``set_image``."""
        if self._state is None:
            raise NoImageError("no image is set: call Predictor.set_image(image) before asking questions")
        return self._state

    @property
    def proposals(self) -> ProposalSet:
        """The current image's candidate boxes (index i is ``<region{i}>``)."""
        return self.image_state.proposals

    @property
    def image_size(self) -> tuple[int, int]:
        return self.image_state.prepared.original_size

    def reset_image(self) -> None:
        """Forget the current image and its encodings."""
        self._state = None

    def _proposals_for(
        self, image: Any, proposals: Any, labels: Sequence[str] | None, source: Any = None
    ) -> ProposalSet:
        """Given proposals normalised, or the proposer's (invalid boxes dropped), capped at max_regions.

        ``source``: what the image was loaded from; a path is the key of per-image box files.
        """
        if proposals is not None:
            result = as_proposals(proposals)
        elif self.proposer is not None:
            keys = [str(source)] if isinstance(source, str | Path) else []
            result = drop_invalid(propose(self.proposer, image, labels, keys), image.size)
        else:
            logger.warning("no proposals and no proposer: the model sees no candidate boxes")
            result = ProposalSet.empty()
        return cap_proposals(result, self.processor.max_regions)

    def set_image(
        self, image: Any, proposals: Any = None, *, labels: Sequence[str] | None = None
    ) -> ProposalSet:
        """Load ``image`` (path, PIL or array), get its proposals and cache both encoders' outputs.

        Args:
            image: the image.
            proposals: candidate boxes (xyxy, original pixels) in any form of ``inference.inputs``;
                None: ask the proposer (with ``labels``, for text-conditioned detectors).
            labels: class names handed to the proposer.

        Returns:
            The proposals the model will see (clipped to the image, at most ``max_regions``).
        """
        self._state = None
        rgb = load_image(image)
        chosen = self._proposals_for(rgb, proposals, labels, image)
        prepared = self.processor.prepare_image(rgb)
        self._state = self._encode(prepared, chosen)
        logger.info("image %sx%s set with %d proposals", *prepared.original_size, len(chosen))
        return self._state.proposals

    def _encode(self, prepared: PreparedImage, proposals: ProposalSet, encoding: Any = None) -> ImageState:
        """Run the ViT (unless its ``encoding`` is given) and the region encoder for ``proposals``."""
        batch = self.processor(P.ask("."), images=prepared, boxes=proposals.boxes).to(self.device)
        clipped = ProposalSet(batch.samples[0].boxes, proposals.scores, proposals.labels)
        with torch.no_grad():
            encoding, tokens = self.model.encode_sample(batch, encoding)  # tokens: (N, D_llm) or None
        return ImageState(prepared, clipped, encoding, tokens)

    def _region_index(self, region: int | Sequence[float]) -> int:
        """A region index of the current image; a box not among the proposals is added to them."""
        state = self.image_state
        count = len(state.proposals)
        if isinstance(region, int) and not isinstance(region, bool):
            if not 0 <= region < count:
                raise ValueError(
                    f"region index must be in [0, {count - 1}] for {count} proposals, got {region}"
                )
            return region
        box = as_proposals([list(region)]).boxes
        if count:
            distance = (state.proposals.boxes - box).abs().amax(dim=1)  # (N,)
            nearest = int(distance.argmin())
            if float(distance[nearest]) <= _SAME_BOX_TOLERANCE:
                return nearest
        if count >= self.processor.max_regions:
            raise ValueError(
                f"cannot add a box: already {count} proposals, max_regions={self.processor.max_regions}"
            )
        old = state.proposals
        scores = torch.cat([old.scores, torch.ones(1)])  # a user's box scores 1.0
        labels = None if old.labels is None else (*old.labels, "")
        logger.info("adding box %s as <region%d> (region encoder runs again)", box.tolist()[0], count)
        grown = ProposalSet(torch.cat([old.boxes, box]), scores, labels)
        self._state = self._encode(state.prepared, grown, state.image_encoding)
        return count

    # -- generation --------------------------------------------------------------------------------------
    def _generate(
        self, batch: FO1Batch, task: Task, labels: Sequence[str] | None = None, **encodings: Any
    ) -> tuple[list[str], list[Any]]:
        """Greedy generation with scores; returns the decoded texts and the emitted region probabilities.

        ``labels``: under the constraint, the only label spellings allowed in ``<ground>``.
        """
        processors = None
        if self.constrained:
            counts = batch["region_counts"].tolist() if "region_counts" in batch else [0] * len(batch.samples)
            constraint = GroundingConstraint.from_processor(
                self.processor,
                counts,
                vocabulary=self.vocabulary,
                labels=labels,
                free_region_mentions=task in _FREE_MENTION_TASKS,
                max_new_tokens=self.max_new_tokens,
                stop_by_mass=self.stop_by_mass,
                suppress_overlap=self.suppress_overlap,
                close_bias=self.close_bias,
                unique_labels=self.unique_labels,
                count_from_list=self.count_from_list,
                boxes=[sample.boxes for sample in batch.samples],
            )
            processors = LogitsProcessorList([constraint])
        inputs = {k: v for k, v in batch.items() if not (encodings and k in ENCODER_INPUTS)}
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                **encodings,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                logits_processor=processors,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, T)
        probs = region_token_probabilities(new_tokens, out.scores, self.processor.region_token_ids)
        return [self.processor.decode(row) for row in new_tokens], probs

    def _result(
        self, task: Task, text: str, emitted: Any, proposals: ProposalSet, size: tuple[int, int]
    ) -> Prediction:
        parsed = parse(text, proposals.boxes)
        detections = scored_detections(parsed, emitted, proposals.scores.tolist(), self.confidence)
        common = dict(
            task=str(task),
            text=text,
            answer=parsed.answer,
            detections=detections,
            image_size=tuple(size),
            num_proposals=len(proposals),
            issues=parsed.issues,
        )
        if task == Task.COUNTING:
            written = parsed.count is not None
            count = parsed.count if written else len({d.region_index for d in detections})
            return CountResult(**common, count=count, count_source="text" if written else "regions")
        if task in _DETECTION_TASKS:
            return DetectionResult(**common)
        mentioned = tuple(
            RegionMention(i, tuple(proposals.boxes[i].tolist())) for i in parsed.mentioned_indexes
        )
        return AnswerResult(**common, reasoning=parsed.reasoning, mentioned_regions=mentioned)

    def _generate_one(self, prompt: Prompt, labels: Sequence[str] | None = None) -> tuple[str, Any]:
        """The answer text to one prompt about the current image, and its emitted region tokens."""
        state = self.image_state
        batch = self.processor(prompt, images=state.prepared, boxes=state.proposals.boxes).to(self.device)
        texts, probs = self._generate(
            batch, prompt.task, labels, image_encoding=state.image_encoding, region_tokens=state.region_tokens
        )
        return texts[0], probs[0]

    def _answer(self, prompt: Prompt, labels: Sequence[str] | None = None) -> Prediction:
        state = self.image_state
        text, probs = self._generate_one(prompt, labels)
        return self._result(prompt.task, text, probs, state.proposals, state.prepared.original_size)

    # -- questions ---------------------------------------------------------------------------------------
    def detect(self, labels: str | Sequence[str], *, per_class: bool = False) -> DetectionResult:
        """Detect one or more classes (a list, or one string; ``"cat, dog"`` is split on commas).

        Under the constraint, the model may only write these labels in ``<ground>`` tags.
        ``per_class`` (not in the release, which asks every class at once): ask each class on its
        own with the single-class prompt and join the answers in class order (``text`` holds one
        segment per class); the image is encoded once, each class costs one generation. A model
        that has to pick which of several asked classes are present may skip present ones; asked
        one at a time it decides about each (docs/training.md).
        """
        state = self.image_state
        if len(state.proposals) == 0:
            logger.warning("detect() on an image without proposals: nothing can be found")
        names = split_labels(labels)
        if not per_class or len(names) < 2:
            return self._answer(P.detect(names), names)  # type: ignore[return-value]
        text, probs = join_answers([self._generate_one(P.detect(name), [name]) for name in names])
        return self._result(Task.DETECTION, text, probs, state.proposals, state.prepared.original_size)  # type: ignore[return-value]

    def rank(self, labels: str | Sequence[str], top: int | None = None) -> DetectionResult:
        """Every proposal scored for each label, best first (``vlm_fo1.ranking``); ``top`` keeps
        the ``top`` best (None: all).

        One forward pass per label over its detection prompt and ``<ground>label</ground><objects>``
        gives the probability that the model names each region first (``model_probability``);
        ``score`` combines it with the proposal score by the predictor's ``confidence`` mode. No
        text is generated (``text`` and ``answer`` are empty): a complete ranking for
        precision/recall trade-offs or mAP, where :meth:`detect` returns only the regions the model
        writes out.

        Raises:
            ValueError: ``top`` < 1, or a label that is empty or spells a special token.
        """
        if top is not None and top < 1:
            raise ValueError(f"top must be >= 1 or None, got {top}")
        state = self.image_state
        names = split_labels(labels)
        if len(state.proposals) == 0:
            logger.warning("rank() on an image without proposals: nothing to rank")
            names = []
        found = []
        scores = state.proposals.scores.tolist()
        for name in names:
            batch = self.processor(P.detect(name), images=state.prepared, boxes=state.proposals.boxes)
            ranked = rank_batch(
                self.model,
                self.processor,
                batch.to(self.device),
                [name],
                image_encoding=state.image_encoding,
                region_tokens=state.region_tokens,
            )[name]
            for index, probability in enumerate(ranked):
                found.append(
                    RegionDetection(
                        label=name,
                        box=tuple(state.proposals.boxes[index].tolist()),
                        score=detection_confidence(self.confidence, probability, scores[index]),
                        region_index=index,
                        model_probability=probability,
                        proposal_score=scores[index],
                    )
                )
        found.sort(key=lambda d: -d.score)
        return DetectionResult(
            task=str(Task.DETECTION),
            text="",
            answer="",
            detections=tuple(found[:top]),
            image_size=tuple(state.prepared.original_size),
            num_proposals=len(state.proposals),
            issues=(),
        )

    def ground(self, expression: str) -> DetectionResult:
        """The regions a referring expression (``"the red cup on the left"``) points at; under the
        grammar the answer's ``<ground>`` label is the expression itself (as evaluation decodes)."""
        return self._answer(P.refer(expression), [expression])  # type: ignore[return-value]

    def count(self, label: str) -> CountResult:
        """Count the instances of ``label`` (the number, and the regions the model grounded)."""
        return self._answer(P.count(label), [label])  # type: ignore[return-value]

    def describe(self, region: int | Sequence[float], detailed: bool = False) -> AnswerResult:
        """Caption one region: a proposal index, or a box ``(x1, y1, x2, y2)`` (added when new)."""
        return self._answer(P.describe_region(self._region_index(region), detailed=detailed))  # type: ignore[return-value]

    def ocr(self, region: int | Sequence[float]) -> AnswerResult:
        """Read the text in one region (index or box, as for :meth:`describe`)."""
        return self._answer(P.region_ocr(self._region_index(region)))  # type: ignore[return-value]

    def find_similar(self, region: int | Sequence[float]) -> DetectionResult:
        """Find the other objects of the same category as ``region`` (index or box)."""
        return self._answer(P.find_similar(self._region_index(region)))  # type: ignore[return-value]

    def reason(self, question: str | Prompt) -> AnswerResult:
        """Region reasoning (``<think>…</think><answer>…</answer>``); regions may be named freely."""
        return self._answer(P.reason(question))  # type: ignore[return-value]

    def ask(self, prompt: str | Sequence[str | RegionRef]) -> AnswerResult:
        """A free question; parts may mix text and ``RegionRef`` (region names allowed in the answer)."""
        return self._answer(P.ask(prompt))  # type: ignore[return-value]

    # -- several images ----------------------------------------------------------------------------------
    def predict_batch(
        self,
        images: Sequence[Any],
        labels: str | Sequence[str],
        proposals: Sequence[Any] | None = None,
        batch_size: int = 8,
    ) -> list[DetectionResult]:
        """Detect ``labels`` in each image, ``batch_size`` images per generation (no caching).

        ``proposals``: one entry per image (any form of ``inference.inputs``, or None to use the
        proposer for that image). The current ``set_image`` state is left untouched.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(
                f"expected one proposal entry per image: {len(images)} images, {len(proposals)} entries"
            )
        names = split_labels(labels)
        prompt = P.detect(names)
        results: list[DetectionResult] = []
        for start in range(0, len(images), batch_size):
            sources = images[start : start + batch_size]
            chunk = [load_image(image) for image in sources]
            given = [None] * len(chunk) if proposals is None else list(proposals[start : start + batch_size])
            chosen = [
                self._proposals_for(im, p, names, src)
                for im, p, src in zip(chunk, given, sources, strict=True)
            ]
            prepared = [self.processor.prepare_image(im) for im in chunk]
            batch = self.processor(
                [[{"role": "user", "content": prompt}] for _ in chunk],
                images=prepared,
                boxes=[p.boxes for p in chosen],
            ).to(self.device)
            texts, probs = self._generate(batch, prompt.task, names)
            for i, (text, prep) in enumerate(zip(texts, prepared, strict=True)):
                seen = ProposalSet(batch.samples[i].boxes, chosen[i].scores, chosen[i].labels)
                results.append(self._result(prompt.task, text, probs[i], seen, prep.original_size))  # type: ignore[arg-type]
        return results


__all__ = ["ImageState", "NoImageError", "Predictor"]
