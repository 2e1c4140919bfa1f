"""Run a model over conversation records and score its answers.

:func:`evaluate` groups the records by (format, task), batches them (left padding), generates
greedily while keeping each step's logits, decodes, reads every answer (``prompting.parse``, or
``coords.parse_box_text`` for coordinate records) and scores it with
:func:`vlm_fo1.evaluation.scoring.score_records`. A record that fails (unreadable image, too
many boxes, missing truth …) is listed in ``EvalReport.errors`` and skipped; the run goes on.

:func:`random_choice_map` is the floor a trained model must beat on detection.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.decoding import GroundingConstraint, check_close_bias, check_suppress_overlap
from vlm_fo1.evaluation.confidence import check_mode, join_answers, region_token_probabilities
from vlm_fo1.evaluation.metrics import DetectionTruth, ScoredDetection, coco_map
from vlm_fo1.evaluation.report import EvalReport
from vlm_fo1.evaluation.scoring import (
    TASK_GROUPS,
    GeneratedAnswer,
    error_entry,
    is_coordinate_record,
    score_records,
    task_of,
)
from vlm_fo1.prompting import templates as P
from vlm_fo1.ranking import RankQuery, rank_queries

logger = logging.getLogger(__name__)

__all__ = [
    "EvalReport",
    "evaluate",
    "generate_answers",
    "picked_counts",
    "proposal_ranking_map",
    "random_choice_map",
]


def query_labels(record: ConversationRecord) -> tuple[str, ...] | None:
    """The label spellings a constrained decoder allows in ``<ground>`` for this record: what its
    prompt asks for (detection classes, the counted label, the referring expression), as the
    ``Predictor`` passes them for ``detect``, ``count`` and ``ground``; None for other tasks
    (visual-prompt detection must name the reference's class itself)."""
    task, meta = task_of(record), record.meta
    if task in ("detection", "multi_detection") and meta.get("classes"):
        return tuple(meta["classes"])
    if task == "counting" and meta.get("label"):
        return (meta["label"],)
    if task == "referring" and meta.get("expression"):
        return (meta["expression"],)
    return None


def per_class_records(
    records: Sequence[ConversationRecord],
) -> tuple[list[ConversationRecord], list[list[int]]]:
    """The records with every multi-class detection question split into one question per class.

    A region-format detection record whose prompt asks for several classes (:func:`query_labels`)
    becomes one record per class, asked with the release's single-class detection template
    (``OD_template``: ``Please detect LABEL in this image. …``) in place of its last user turn
    (earlier turns, e.g. a system prompt, are kept) about the same image and boxes, its
    ``meta["classes"]`` that one class; every other record is kept as it is. Returns the new list
    and, for each input record, the indexes of its records in it (in class order), so that
    :func:`merge_answers` can put each record's answers back together.
    """
    expanded: list[ConversationRecord] = []
    owners: list[list[int]] = []
    for record in records:
        labels = query_labels(record) or ()
        splittable = (
            len(labels) > 1
            and not is_coordinate_record(record)
            and task_of(record) in ("detection", "multi_detection")
        )
        users = [i for i, m in enumerate(record.messages) if m.get("role") == "user"] if splittable else []
        if not users:
            owners.append([len(expanded)])
            expanded.append(record)
            continue
        owners.append(list(range(len(expanded), len(expanded) + len(labels))))
        last_user = users[-1]
        for label in labels:
            messages = [*record.messages[:last_user], {"role": "user", "content": P.detect(label).content()}]
            expanded.append(
                dataclasses.replace(
                    record, messages=messages, task="detection", meta={**record.meta, "classes": [label]}
                )
            )
    return expanded, owners


def merge_answers(parts: Sequence[GeneratedAnswer | None]) -> GeneratedAnswer | None:
    """One answer from the answers to a record's per-class questions (:func:`per_class_records`):
    their texts joined in class order (one ``<ground>…</objects>`` segment per class) and their
    emitted region tokens in the same order; None when any part is missing (it failed)."""
    done = [part for part in parts if part is not None]
    if len(done) < len(parts):
        return None
    if len(done) == 1:
        return done[0]
    text, probs = join_answers([(part.text, part.region_probs) for part in done])
    return dataclasses.replace(done[0], text=text, region_probs=probs)


def _plan_batches(records: Sequence[ConversationRecord], batch_size: int) -> list[list[int]]:
    """Indexes of ``records`` in batches of at most ``batch_size``, one (format, task) per batch."""
    groups: dict[tuple[bool, str], list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault((is_coordinate_record(record), str(task_of(record))), []).append(i)
    return [idx[s : s + batch_size] for idx in groups.values() for s in range(0, len(idx), batch_size)]


def generate_answers(
    model: Any,
    processor: Any,
    records: Sequence[ConversationRecord],
    image_root: str | Path | None,
    max_new_tokens: int,
    constrained: bool = False,
    stop_by_mass: bool = False,
    suppress_overlap: float | None = None,
    close_bias: float = 0.0,
    unique_labels: bool = False,
    count_from_list: bool = False,
) -> list[GeneratedAnswer]:
    """One batch: encode, generate greedily with logits, decode; raises on any failure.

    ``constrained``: decode region-format records under :class:`GroundingConstraint` (only this
    image's regions, well-formed segments, each record's labels from :func:`query_labels`), as
    the ``Predictor`` does; ``stop_by_mass``: the constraint's choice between another region and
    ``</objects>`` on total probabilities; ``suppress_overlap``: once a box is named, boxes
    overlapping it by more IoU are not offered in that group; ``close_bias``: added to the logit
    of ``</objects>`` inside ``<objects>``; ``unique_labels``: each asked label grounded in at most
    one segment of an answer; ``count_from_list``: a number written after ``</objects>`` is the
    count of the regions named (see ``vlm_fo1.decoding``).
    """
    conversations = [record.prompt_messages() for record in records]
    images = [record.image_path(image_root) for record in records]
    batch = processor(conversations, images=images, boxes=[record.boxes for record in records])
    samples = batch.samples
    device = next(model.parameters()).device
    batch = batch.to(device)
    processors = None
    if constrained and not any(is_coordinate_record(r) for r in records):
        counts = batch["region_counts"].tolist() if "region_counts" in batch else [0] * len(records)
        constraint = GroundingConstraint.from_processor(
            processor,
            counts,
            row_labels=[query_labels(r) for r in records],
            max_new_tokens=max_new_tokens,
            stop_by_mass=stop_by_mass,
            suppress_overlap=suppress_overlap,
            close_bias=close_bias,
            unique_labels=unique_labels,
            count_from_list=count_from_list,
            boxes=[sample.boxes for sample in samples],
        )
        processors = LogitsProcessorList([constraint])
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            logits_processor=processors,
            output_logits=True,  # raw logits of each step; (B, V) per step, kept until the batch is scored
            return_dict_in_generate=True,
        )
    new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]  # (B, T)
    steps = out.logits if out.logits is not None else out.scores
    probs = region_token_probabilities(new_tokens, steps, processor.region_token_ids)
    return [
        GeneratedAnswer(
            text=processor.decode(new_tokens[i]),
            boxes=samples[i].boxes.tolist(),
            region_probs=probs[i],
        )
        for i in range(len(records))
    ]


def _run_batch(
    run: Callable[[list[int]], list[GeneratedAnswer]],
    records: Sequence[ConversationRecord],
    indexes: list[int],
    answers: list[GeneratedAnswer | None],
    errors: list[dict[str, Any]],
    stage: str = "generation",
) -> None:
    """Set ``answers[i]`` for ``indexes`` from ``run(indexes)`` (generation, or ranking on top of
    the answers); when the batch fails, retry its records one by one to isolate the bad ones. A
    record that fails alone is reported in ``errors`` (with ``stage``) and its answer dropped."""
    try:
        results = run(indexes)
    except Exception as err:  # one bad record must not end the run: it is reported instead
        if len(indexes) > 1:
            logger.info(
                "a %s batch of %d failed (%r); retrying its records one by one", stage, len(indexes), err
            )
            for i in indexes:
                _run_batch(run, records, [i], answers, errors, stage)
            return
        logger.warning("record %r failed (%s): %r", records[indexes[0]].id, stage, err)
        errors.append(error_entry(records[indexes[0]], stage, err))
        answers[indexes[0]] = None
        return
    for i, result in zip(indexes, results, strict=True):
        answers[i] = result


def _rank_detections(
    model: Any,
    processor: Any,
    records: Sequence[ConversationRecord],
    image_root: str | Path | None,
    answers: list[GeneratedAnswer | None],
    errors: list[dict[str, Any]],
    batch_size: int,
    progress: bool,
) -> None:
    """Attach ranking scores (:func:`rank_queries`, ``batch_size`` records per forward pass) to the
    answers of (multi-)detection region records. When a batch fails its records are ranked one
    by one; a record whose ranking fails is reported in ``errors`` and dropped like a failed
    generation."""
    todo = [
        i
        for i, record in enumerate(records)
        if answers[i] is not None
        and record.boxes
        and not is_coordinate_record(record)
        and task_of(record) in ("detection", "multi_detection")
        and query_labels(record)
    ]

    def rank(indexes: list[int]) -> list[GeneratedAnswer]:
        queries = [
            RankQuery(records[i].prompt_messages(), records[i].image_path(image_root), records[i].boxes,
                      query_labels(records[i]))
            for i in indexes
        ]  # fmt: skip
        scores = rank_queries(model, processor, queries)
        return [dataclasses.replace(answers[i], ranked=s) for i, s in zip(indexes, scores, strict=True)]

    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    for indexes in tqdm(batches, desc="rank", disable=not progress):
        _run_batch(rank, records, indexes, answers, errors, "ranking")


def evaluate(
    model: Any,
    processor: Any,
    records: Iterable[ConversationRecord],
    image_root: str | Path | None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    confidence: str = "product",
    constrained: bool = False,
    stop_by_mass: bool = False,
    suppress_overlap: float | None = None,
    close_bias: float = 0.0,
    unique_labels: bool = False,
    count_from_list: bool = False,
    ranked: bool = False,
    per_class: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Generate an answer for every record and score them all.

    Args:
        model: an ``FO1ForConditionalGeneration`` (any model with ``generate`` and parameters).
        processor: the matching ``FO1Processor``.
        records: records with their truth in ``meta`` (see ``scoring``'s module docstring).
        image_root: folder that relative ``record.image`` paths start from.
        batch_size / max_new_tokens: generation settings (greedy decoding).
        confidence: the mode reported as ``detection/mAP`` (``proposal``, ``model``, ``product``);
            all three are reported as ``detection/mAP@<mode>`` anyway.
        constrained: decode under the grounding constraint, as the ``Predictor`` does (see
            :func:`generate_answers`); False: the raw model.
        stop_by_mass: under the constraint, go on naming regions while they hold more probability
            together than ``</objects>`` (``vlm_fo1.decoding``; not in the release).
        suppress_overlap: under the constraint, once a box is named, do not offer the boxes that
            overlap it by more than this IoU in the same group (``vlm_fo1.decoding``; not in the
            release; None: off).
        close_bias: under the constraint, added to the logit of ``</objects>`` inside
            ``<objects>`` (``vlm_fo1.decoding``; not in the release; 0: off; > 0: fewer regions).
        unique_labels: under the constraint, each asked label opens at most one ``<ground>``
            segment of an answer (``vlm_fo1.decoding``; not in the release).
        count_from_list: under the constraint, a number written right after ``</objects>`` is
            the count of distinct regions the answer named (``vlm_fo1.decoding``; not in the
            release).
        ranked: also rank every region of each (multi-)detection record for each asked label
            (:func:`vlm_fo1.ranking.rank_queries`, ``batch_size`` records at a time) and report the
            ranking's mAP as ``detection/mAP@ranked`` and ``detection/mAP@ranked_product``.
        per_class: ask each class of a multi-class detection record on its own, with the
            single-class detection prompt, and score the joined answers as the record's answer
            (:func:`per_class_records`; not in the release, which asks every class at once).
            Ranking is unchanged (it already scores one class at a time).
        progress: show a progress bar.

    Raises:
        ValueError: for an unknown ``confidence``, a ``suppress_overlap`` outside [0, 1], a
            ``close_bias`` that is not a finite number,
            non-positive sizes, or records that describe their regions in words
            (``region_texts``: no boxes to score).
    """
    check_mode(confidence)
    check_suppress_overlap(suppress_overlap)
    check_close_bias(close_bias)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    records = list(records)
    described = [r.id for r in records if r.region_texts is not None]
    if described:
        raise ValueError(
            f"expected records with an image and boxes, got {len(described)} with regions described "
            f"in words (region_texts), e.g. {described[0]!r}"
        )
    errors: list[dict[str, Any]] = []
    start = time.perf_counter()
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        generate = functools.partial(
            generate_answers,
            model,
            processor,
            image_root=image_root,
            max_new_tokens=max_new_tokens,
            constrained=constrained,
            stop_by_mass=stop_by_mass,
            suppress_overlap=suppress_overlap,
            close_bias=close_bias,
            unique_labels=unique_labels,
            count_from_list=count_from_list,
        )
        asked, owners = (
            per_class_records(records) if per_class else (records, [[i] for i in range(len(records))])
        )
        replies: list[GeneratedAnswer | None] = [None] * len(asked)
        for indexes in tqdm(_plan_batches(asked, batch_size), desc="evaluate", disable=not progress):
            _run_batch(lambda idx: generate([asked[i] for i in idx]), asked, indexes, replies, errors)
        answers = [merge_answers([replies[j] for j in own]) for own in owners]
        if ranked:
            _rank_detections(model, processor, records, image_root, answers, errors, batch_size, progress)
    finally:
        model.train(was_training)
    done = [(record, answer) for record, answer in zip(records, answers, strict=True) if answer is not None]
    report = score_records(
        [record for record, _ in done], [answer for _, answer in done], confidence=confidence, errors=errors
    )
    report.settings.update(
        records=len(records),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        constrained=constrained,
        stop_by_mass=stop_by_mass,
        suppress_overlap=suppress_overlap,
        close_bias=close_bias,
        unique_labels=unique_labels,
        count_from_list=count_from_list,
        ranked=ranked,
        per_class=per_class,
        seconds=round(time.perf_counter() - start, 3),
    )
    logger.info("evaluated %d records (%d errors)", len(done), len(errors))
    return report


def _detection_truths(
    records: Iterable[ConversationRecord],
) -> tuple[list[ConversationRecord], list[DetectionTruth], list[str]]:
    """The region-format detection records with ``meta["gt_boxes"]``, their truths, the classes."""
    usable = [
        r
        for r in records
        if TASK_GROUPS.get(task_of(r) or "") == "detection"
        and not is_coordinate_record(r)
        and "gt_boxes" in r.meta
    ]
    truths, categories = [], {}
    for image_id, record in enumerate(usable, start=1):
        classes = list(record.meta.get("classes") or record.meta["gt_boxes"])
        categories.update(dict.fromkeys(classes))
        truths.append(DetectionTruth(image_id, {c: record.meta["gt_boxes"].get(c, []) for c in classes}))
    return usable, truths, list(categories)


def _proposal_score(record: ConversationRecord, index: int) -> float:
    """The proposal score of box ``index`` (1.0 for records without scores)."""
    return record.scores[index] if record.scores else 1.0


def proposal_ranking_map(records: Iterable[ConversationRecord]) -> float:
    """COCO mAP@0.5 of the baseline that lists every proposal for every asked class, ranked by its
    proposal score alone (class-blind): the floor of ``detection/mAP50@ranked_product``.
    Same records as :func:`random_choice_map`; ``nan`` when there is none."""
    usable, truths, categories = _detection_truths(records)
    if not usable:
        return math.nan
    detections = [
        ScoredDetection(truth.image_id, label, box, _proposal_score(record, j))
        for truth, record in zip(truths, usable, strict=True)
        for label in truth.boxes
        for j, box in enumerate(record.boxes)
    ]
    return coco_map(truths, detections, categories)["mAP50"]


def random_choice_map(
    records: Iterable[ConversationRecord],
    *,
    draws: int = 5,
    seed: int = 0,
    counts: Mapping[Any, Mapping[str, int]] | None = None,
) -> float:
    """Expected COCO mAP@0.5 of a baseline that, for each asked class, picks proposals at random,
    scored by their proposal scores (1.0 without scores); the mean over ``draws`` seeded draws.

    How many it picks: as many as there are true objects (capped at the proposal count), or with
    ``counts`` (``{record id: {label: n}}``, e.g. :func:`picked_counts` of a model's report) as
    many as the model named, so that only *which* proposals were chosen differs from the model.

    Uses the region-format detection records (``detection``, ``multi_detection``) with
    ``meta["gt_boxes"]``; ``nan`` when there is none or no true box at all.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    usable, truths, categories = _detection_truths(records)
    if not usable:
        return math.nan
    values = []
    for draw in range(draws):
        rng = random.Random(seed * 1_000_003 + draw)
        detections = []
        for truth, record in zip(truths, usable, strict=True):
            for label, boxes in truth.boxes.items():
                wanted = len(boxes) if counts is None else counts.get(record.id, {}).get(label, 0)
                for j in rng.sample(range(len(record.boxes)), min(wanted, len(record.boxes))):
                    detections.append(
                        ScoredDetection(truth.image_id, label, record.boxes[j], _proposal_score(record, j))
                    )
        values.append(coco_map(truths, detections, categories)["mAP50"])
    return sum(values) / len(values)


def picked_counts(report: EvalReport) -> dict[Any, dict[str, int]]:
    """``{record id: {label: number of regions the model named}}`` from a report's predictions
    (the ``counts`` of :func:`random_choice_map`)."""
    return {
        p["id"]: {label: len(regions) for label, regions in (p.get("parsed") or {}).get("groups", {}).items()}
        for p in report.predictions
    }
