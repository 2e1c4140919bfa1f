"""Per-group scorers: each reads one answer at a time and reports its group's metrics.

:class:`ReadAnswer` reads an answer once (``prompting.parse`` for region answers,
``coords.parse_box_text`` for coordinate records) into :class:`Prediction` s with their proposal
score and token probability; a :class:`Scorer` accumulates one metric group (``add`` returns
whether the record was answered correctly and checks everything before it changes any state).
See :mod:`vlm_fo1.evaluation.scoring` for the groups, the ``meta`` fields they read and the
metric names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.evaluation.confidence import (
    CONFIDENCE_MODES,
    RegionTokenProb,
    detection_confidence,
    detection_probabilities,
)
from vlm_fo1.evaluation.coords import COORDS_FORMAT, count_from_box_text, parse_box_text
from vlm_fo1.evaluation.metrics import (
    COCO_KEYS,
    DetectionTruth,
    ScoredDetection,
    coco_map,
    counting_accuracy,
    exact_match_accuracy,
    false_positive_rate,
    iou,
    match_count,
    normalize_answer,
    precision_recall,
)
from vlm_fo1.prompting.parse import ParsedOutput, parse

logger = logging.getLogger(__name__)

RANKED_MODES = {"ranked": "model", "ranked_product": "product"}
"""Scores of ranked detections (``vlm_fo1.ranking``) and the confidence mode that makes them:
``p_rank``, and ``p_rank`` x proposal score."""


@dataclass(frozen=True)
class GeneratedAnswer:
    """What a model said about one record.

    Attributes:
        text: the decoded answer.
        boxes: the candidate boxes the answer's ``<regionN>`` index (original pixels, after the
            processor's clipping); None: the record's own boxes.
        region_probs: the emitted region tokens with their probabilities; None: 1.0 each.
        ranked: ``{label: probability of naming each region first}`` (``vlm_fo1.ranking``), for
            detection records evaluated with ``ranked=True``; None otherwise.
    """

    text: str
    boxes: Sequence[Sequence[float]] | None = None
    region_probs: Sequence[RegionTokenProb] | None = None
    ranked: Mapping[str, Sequence[float]] | None = None


def task_of(record: ConversationRecord) -> str | None:
    """The fine task name: ``meta["task"]``, else ``record.task``."""
    return record.meta.get("task") or record.task


def is_coordinate_record(record: ConversationRecord) -> bool:
    """True for records made by ``coords.to_coordinate_record`` (``meta["format"] == "coords"``)."""
    return record.meta.get("format") == COORDS_FORMAT


@dataclass(frozen=True)
class Prediction:
    """One predicted box: its label, box, region (None for coordinates), proposal score and token probability."""

    label: str
    box: tuple[float, ...]
    region: int | None = None
    proposal: float | None = None
    probability: float | None = None


@dataclass
class ReadAnswer:
    """One record and its answer, read once."""

    record: ConversationRecord
    text: str
    coords: bool
    preds: list[Prediction]
    parsed: ParsedOutput | None
    ranked: list[Prediction] = field(default_factory=list)  # every region per label, probability = p_rank

    @classmethod
    def build(cls, record: ConversationRecord, answer: GeneratedAnswer) -> ReadAnswer:
        """Parse ``answer`` in the record's format; region answers get scores and probabilities."""
        if is_coordinate_record(record):
            preds = [Prediction(label, box) for label, box in parse_box_text(answer.text)]
            return cls(record, answer.text, True, preds, None)
        boxes = record.boxes if answer.boxes is None else answer.boxes
        parsed = parse(answer.text, [list(b) for b in boxes])
        probs = detection_probabilities(answer.text, answer.region_probs)
        scores = record.scores
        preds = [
            Prediction(
                d.label,
                d.box,
                d.region_index,
                scores[d.region_index] if scores else None,
                probs.get((d.label, d.region_index)),
            )
            for d in parsed.detections
        ]
        ranked = [
            Prediction(label, tuple(boxes[n]), n, scores[n] if scores else None, float(p))
            for label, probabilities in (answer.ranked or {}).items()
            for n, p in enumerate(probabilities)
        ]
        return cls(record, answer.text, False, preds, parsed, ranked)

    @property
    def meta(self) -> dict[str, Any]:
        """The record's ``meta`` (its ground truth)."""
        return self.record.meta

    def summary(self) -> dict[str, Any]:
        """What was read from the answer, for ``EvalReport.predictions``."""
        if self.parsed is None:
            return {
                "boxes": [[p.label, list(p.box)] for p in self.preds],
                "count": count_from_box_text(self.text),
            }
        return {
            "groups": {g.label: list(g.region_indexes) for g in self.parsed.groups},
            "answer": self.parsed.answer,
            "count": self.parsed.count,
            "issues": list(self.parsed.issues),
        }

    def regions_named(self) -> int:
        """How many distinct regions (or boxes) the answer grounded."""
        if self.parsed is None:
            return len(self.preds)
        return len(self.parsed.region_indexes)


def _norm_label(label: str) -> str:
    return " ".join(label.lower().split())


class Scorer:
    """Accumulates one metric group; ``add`` checks everything before it changes any state."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.correct: list[bool] = []

    def add(self, item: ReadAnswer) -> bool:
        """Score one answer; returns whether it was right. Raises KeyError/ValueError on bad truth."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """The group's metrics under their flat names (``prefix/metric``)."""
        raise NotImplementedError

    def name(self, metric: str) -> str:
        """``prefix/metric``."""
        return f"{self.prefix}/{metric}"


class DetectionScorer(Scorer):
    """COCO mAP (for every confidence mode), false-positive rate and whole-answer correctness."""

    def __init__(self, prefix: str, confidence: str) -> None:
        super().__init__(prefix)
        self.confidence = confidence
        self.truths: list[DetectionTruth] = []
        self.detections: dict[str, list[ScoredDetection]] = {m: [] for m in CONFIDENCE_MODES}
        self.categories: dict[str, None] = {}
        self.negatives: list[int] = []
        self.ranked: dict[str, list[ScoredDetection]] = {m: [] for m in RANKED_MODES}

    def add(self, item: ReadAnswer) -> bool:
        meta = item.meta
        classes = list(meta.get("classes") or meta["gt_boxes"])
        truth = DetectionTruth(
            len(self.truths) + 1,
            {c: [list(b) for b in meta["gt_boxes"].get(c, [])] for c in classes},
            {c: [list(b) for b in boxes] for c, boxes in (meta.get("crowd_boxes") or {}).items() if boxes},
        )
        by_class = self._predictions_by_class(item.preds, classes)
        absent = [c for c in classes if not truth.boxes[c] and c not in truth.crowd]
        targets = None if item.coords else meta.get("target_regions")
        if targets is not None:
            correct = all({p.region for p in by_class[c]} == set(targets[c]) for c in classes)
        else:
            correct = all(
                match_count([p.box for p in by_class[c]], truth.boxes[c])
                == len(by_class[c])
                == len(truth.boxes[c])
                for c in classes
            )
        self.truths.append(truth)
        self.categories.update(dict.fromkeys([*classes, *truth.crowd]))
        self.negatives.extend(len(by_class[c]) for c in absent)
        for label, predictions in by_class.items():
            for p in predictions:
                for mode in CONFIDENCE_MODES:
                    score = detection_confidence(mode, p.probability, p.proposal)
                    self.detections[mode].append(ScoredDetection(truth.image_id, label, p.box, score))
        for label, predictions in self._predictions_by_class(item.ranked, classes).items():
            for p in predictions:
                for name, mode in RANKED_MODES.items():
                    score = detection_confidence(mode, p.probability, p.proposal)
                    self.ranked[name].append(ScoredDetection(truth.image_id, label, p.box, score))
        self.correct.append(correct)
        return correct

    @staticmethod
    def _predictions_by_class(preds: list[Prediction], classes: list[str]) -> dict[str, list[Prediction]]:
        """Predictions whose label is an asked class (case and spacing ignored), one per (class, region)."""
        asked = {_norm_label(c): c for c in classes}
        by_class: dict[str, list[Prediction]] = {c: [] for c in classes}
        seen: set[tuple[str, int]] = set()
        for p in preds:
            label = asked.get(_norm_label(p.label))
            if label is None or (p.region is not None and (label, p.region) in seen):
                continue
            if p.region is not None:
                seen.add((label, p.region))
            by_class[label].append(p)
        return by_class

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {self.name("n"): len(self.truths)}
        categories = list(self.categories)
        coords = self.prefix.startswith(f"{COORDS_FORMAT}/")
        for mode in (self.confidence,) if coords else CONFIDENCE_MODES:
            result = coco_map(self.truths, self.detections[mode], categories)
            if mode == self.confidence:
                out.update({self.name(k): result[k] for k in COCO_KEYS})
            if not coords:
                out[self.name(f"mAP@{mode}")] = result["mAP"]
                out[self.name(f"mAP50@{mode}")] = result["mAP50"]
        for mode, detections in self.ranked.items():
            if detections:
                result = coco_map(self.truths, detections, categories)
                out[self.name(f"mAP@{mode}")] = result["mAP"]
                out[self.name(f"mAP50@{mode}")] = result["mAP50"]
        out[self.name("fp_rate")] = false_positive_rate(self.negatives)
        out[self.name("n_negative")] = len(self.negatives)
        out[self.name("exact_match")] = sum(self.correct) / len(self.correct)
        return out


class CountingScorer(Scorer):
    """Counting accuracy (release rule: the number written), mean absolute error, false-positive
    rate, and ``accuracy_regions``: the share of answers that ground as many distinct regions as
    there are objects (the count the ``Predictor`` falls back to; not the release's rule)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.predicted: list[int | None] = []
        self.truth: list[int] = []
        self.negatives: list[int] = []
        self.by_regions: list[bool] = []

    def add(self, item: ReadAnswer) -> bool:
        truth = int(item.meta["count"] if "count" in item.meta else item.meta["answer"])
        predicted = count_from_box_text(item.text) if item.parsed is None else item.parsed.count
        correct = (predicted or 0) == truth
        self.predicted.append(predicted)
        self.truth.append(truth)
        named = item.regions_named()
        if truth == 0:
            self.negatives.append(named)
        self.by_regions.append(named == truth)
        self.correct.append(correct)
        return correct

    def metrics(self) -> dict[str, float]:
        errors = [abs((p or 0) - t) for p, t in zip(self.predicted, self.truth, strict=True)]
        return {
            self.name("n"): len(self.truth),
            self.name("accuracy"): counting_accuracy(self.predicted, self.truth),
            self.name("mae"): sum(errors) / len(errors),
            self.name("accuracy_regions"): sum(self.by_regions) / len(self.by_regions),
            self.name("fp_rate"): false_positive_rate(self.negatives),
            self.name("n_negative"): len(self.negatives),
        }


class ReferringScorer(Scorer):
    """Accuracy at IoU 0.5 of the answer's first predicted box (whatever its label), and the mean IoU;
    with an expression ``form`` in the truth (the miniature world's), also the accuracy per form
    (``acc50_<form>``)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.ious: list[float] = []
        self.forms: dict[str, list[bool]] = {}

    def add(self, item: ReadAnswer) -> bool:
        truth = [float(v) for v in item.meta["gt_box"]]
        overlap = iou(item.preds[0].box, truth) if item.preds else 0.0
        self.ious.append(overlap)
        self.correct.append(overlap >= 0.5)
        if isinstance(form := item.meta.get("form"), str):
            self.forms.setdefault(form, []).append(overlap >= 0.5)
        return overlap >= 0.5

    def metrics(self) -> dict[str, float]:
        n = len(self.ious)
        out = {
            self.name("n"): n,
            self.name("acc50"): sum(self.correct) / n,
            self.name("mean_iou"): sum(self.ious) / n,
        }
        for form, hits in sorted(self.forms.items()):
            out[self.name(f"acc50_{form}")] = sum(hits) / len(hits)
        return out


class ExactMatchScorer(Scorer):
    """Exact match after normalisation (region captions, region OCR, VQA, captions)."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.predicted: list[str] = []
        self.truth: list[str] = []

    def add(self, item: ReadAnswer) -> bool:
        truth = item.meta.get("answer")
        truth = truth if isinstance(truth, str) else item.record.target()
        predicted = item.parsed.answer if item.parsed is not None else item.text
        self.predicted.append(predicted)
        self.truth.append(truth)
        self.correct.append(normalize_answer(predicted) == normalize_answer(truth))
        return self.correct[-1]

    def metrics(self) -> dict[str, float]:
        return {
            self.name("n"): len(self.truth),
            self.name("accuracy"): exact_match_accuracy(self.predicted, self.truth),
        }


class FindSimilarScorer(Scorer):
    """Box precision / recall (IoU 0.5, one-to-one) and false-positive rate on negatives."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.predicted: list[list[tuple[float, ...]]] = []
        self.truth: list[list[list[float]]] = []
        self.negatives: list[int] = []

    def add(self, item: ReadAnswer) -> bool:
        truth = [[float(v) for v in box] for box in item.meta["gt_boxes"]]
        boxes = list(
            {(p.region if p.region is not None else i): p.box for i, p in enumerate(item.preds)}.values()
        )
        correct = match_count(boxes, truth) == len(boxes) == len(truth)
        self.predicted.append(boxes)
        self.truth.append(truth)
        if not truth:
            self.negatives.append(len(boxes))
        self.correct.append(correct)
        return correct

    def metrics(self) -> dict[str, float]:
        precision, recall = precision_recall(self.predicted, self.truth)
        return {
            self.name("n"): len(self.truth),
            self.name("precision"): precision,
            self.name("recall"): recall,
            self.name("fp_rate"): false_positive_rate(self.negatives),
            self.name("n_negative"): len(self.negatives),
        }


def make_scorer(group: str, prefix: str, confidence: str) -> Scorer:
    """The scorer of a metric group (exact match for caption-like groups)."""
    if group == "detection":
        return DetectionScorer(prefix, confidence)
    if group == "counting":
        return CountingScorer(prefix)
    if group == "referring":
        return ReferringScorer(prefix)
    if group == "find_similar":
        return FindSimilarScorer(prefix)
    return ExactMatchScorer(prefix)
