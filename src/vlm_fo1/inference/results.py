"""Typed, frozen results of the :class:`~vlm_fo1.inference.Predictor`, with a stable JSON form.

JSON schema (``to_dict()`` / ``to_json()``; also what ``vlm-fo1 <task> --json`` prints)::

    {
      "task": "detection" | "referring" | "counting" | "visual_prompt_detection"
              | "region_caption_brief" | "region_caption_detailed" | "region_ocr"
              | "region_reasoning" | "free",
      "image_size": [width, height],          # original image pixels
      "num_proposals": 12,                    # candidate boxes the model saw
      "text": "<ground>cat</ground><objects><region2></objects>",   # raw generated text ("" for rank)
      "answer": "cat",                        # readable answer (tags removed)
      "detections": [                         # grounded regions, in answer order
        {"label": "cat", "box": [x1, y1, x2, y2],   # xyxy, original image pixels
         "score": 0.71,                       # the confidence (see below), in [0, 1]
         "region_index": 2,                   # N of <regionN>: index into the proposals
         "model_probability": 0.88,           # the model's probability of <regionN>
         "proposal_score": 0.81}              # the proposal network's score (null: none)
      ],
      "issues": [],                           # anything the parser skipped or repaired
      "count": 3,                             # counting only: the number
      "count_source": "text" | "regions",     # counting only: written by the model, or len(detections)
      "reasoning": "…" | null,                # reasoning / free answers only: the <think> text
      "mentioned_regions": [{"region_index": 4, "box": [x1, y1, x2, y2]}]  # idem: regions named
    }

``Predictor.rank`` (``vlm-fo1 detect --ranked K``) returns the same form with every proposal (or
the K best) as detections, best first, ``model_probability`` being the probability of naming the
region first (``vlm_fo1.ranking``), and empty ``text`` and ``answer``.

``score`` follows the predictor's ``confidence`` mode: ``"product"`` (default) =
``model_probability × proposal_score``, ``"model"`` = ``model_probability``, ``"proposal"`` =
``proposal_score`` (a missing proposal score counts as 1.0). ``model_probability`` is the
probability of the emitted region token under the distribution the answer was decoded from (after
the grammar constraint, i.e. renormalised over the allowed tokens; see ``vlm_fo1.decoding``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_fo1.evaluation.confidence import RegionTokenProb, detection_confidence, detection_probabilities
from vlm_fo1.prompting import ParsedOutput

Box = tuple[float, float, float, float]


def _box_json(box: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in box]


@dataclass(frozen=True)
class RegionDetection:
    """One grounded region: its label, box (xyxy, original pixels) and confidence in [0, 1]."""

    label: str
    box: Box
    score: float
    region_index: int
    model_probability: float
    proposal_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "box": _box_json(self.box),
            "score": round(self.score, 6),
            "region_index": self.region_index,
            "model_probability": round(self.model_probability, 6),
            "proposal_score": None if self.proposal_score is None else round(self.proposal_score, 6),
        }


@dataclass(frozen=True)
class RegionMention:
    """A region named in a free answer (outside grounding segments)."""

    region_index: int
    box: Box

    def to_dict(self) -> dict[str, Any]:
        return {"region_index": self.region_index, "box": _box_json(self.box)}


@dataclass(frozen=True)
class Prediction:
    """What every question returns (see the module docstring for the JSON form).

    Attributes:
        task: the task of the prompt (``vlm_fo1.prompting.Task`` value).
        text: the raw generated text (region names and tags kept).
        answer: the readable answer (grounding segments reduced to their phrase).
        detections: grounded regions in answer order, boxes in original image pixels.
        image_size: ``(width, height)`` of the original image.
        num_proposals: how many candidate boxes the model saw.
        issues: what the parser skipped or repaired (empty for well-formed answers).
    """

    task: str
    text: str
    answer: str
    detections: tuple[RegionDetection, ...]
    image_size: tuple[int, int]
    num_proposals: int
    issues: tuple[str, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the detections, in order of first appearance."""
        return tuple(dict.fromkeys(d.label for d in self.detections))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (schema in the module docstring)."""
        return {
            "task": self.task,
            "image_size": list(self.image_size),
            "num_proposals": self.num_proposals,
            "text": self.text,
            "answer": self.answer,
            "detections": [d.to_dict() for d in self.detections],
            "issues": list(self.issues),
        }

    def to_json(self, indent: int | None = None) -> str:
        """``to_dict()`` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def summary(self) -> str:
        """A short human-readable report (what the CLI prints without ``--json``)."""
        width, height = self.image_size
        lines = [
            f"{self.task}: {len(self.detections)} detection(s) among {self.num_proposals} "
            f"candidate boxes ({width}x{height} image)"
        ]
        for d in self.detections:
            box = ", ".join(f"{v:.1f}" for v in d.box)
            lines.append(f"  {d.label or '-'}  score {d.score:.3f}  box [{box}]  <region{d.region_index}>")
        if self.answer:
            lines.append(f"answer: {self.answer}")
        if self.issues:
            lines.append(f"issues: {'; '.join(self.issues)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class DetectionResult(Prediction):
    """Detection, referring expression or visual-prompt detection."""


@dataclass(frozen=True)
class CountResult(Prediction):
    """Counting: ``count`` is the number the model wrote (the release's rule), or when it wrote
    none, the number of grounded regions (``count_source`` says which)."""

    count: int = 0
    count_source: str = "regions"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "count": self.count, "count_source": self.count_source}

    def summary(self) -> str:
        return f"count: {self.count} (from the {self.count_source})\n{super().summary()}"


@dataclass(frozen=True)
class AnswerResult(Prediction):
    """A text answer (region caption, region OCR, reasoning, free question)."""

    reasoning: str | None = None
    mentioned_regions: tuple[RegionMention, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "reasoning": self.reasoning,
            "mentioned_regions": [m.to_dict() for m in self.mentioned_regions],
        }

    def summary(self) -> str:
        head = super().summary()
        if self.reasoning:
            head += f"\nreasoning: {self.reasoning}"
        if self.mentioned_regions:
            head += "\nmentioned regions: " + ", ".join(
                f"<region{m.region_index}>" for m in self.mentioned_regions
            )
        return head


def scored_detections(
    parsed: ParsedOutput,
    emitted: Sequence[RegionTokenProb] | None,
    proposal_scores: Sequence[float] | None,
    mode: str,
) -> tuple[RegionDetection, ...]:
    """Detections of ``parsed`` with their confidences (``mode``: product / model / proposal)."""
    probabilities = detection_probabilities(parsed.raw, emitted)
    result = []
    for d in parsed.detections:
        p = probabilities.get((d.label, d.region_index), 1.0)
        s = None if proposal_scores is None else float(proposal_scores[d.region_index])
        score = min(1.0, max(0.0, detection_confidence(mode, p, s)))
        result.append(RegionDetection(d.label, tuple(d.box), score, d.region_index, p, s))
    return tuple(result)
