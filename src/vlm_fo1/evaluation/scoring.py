"""Score model answers against records: per-task scorers and :func:`score_records`.

:func:`score_records` is the runner's scoring step, usable on its own (e.g. with the true
answers, or with answers produced elsewhere). Records are grouped by task into metric groups
(:data:`TASK_GROUPS`); coordinate-format records (``meta["format"] == "coords"``) get their
own groups, prefixed ``coords/``. What each group reads from ``record.meta`` (boxes are xyxy in
the original image's pixels):

=================  ===========================================================================
group              meta
=================  ===========================================================================
detection          ``classes`` (else the keys of ``gt_boxes``), ``gt_boxes`` {class: [box…]},
                   optional ``target_regions`` {class: [region…]} (exact-match flag) and
                   ``crowd_boxes`` {class: [box…]} (COCO ``iscrowd`` regions)
counting           ``count`` (else ``answer`` as an int)
referring          ``gt_box``
region_caption,    ``answer`` (else the record's assistant turn)
region_ocr, vqa,
caption
find_similar       ``gt_boxes`` [box…] (the *other* objects like the reference)
=================  ===========================================================================

Negative queries: a detection class without any true box (nor COCO crowd region), a counting
query whose count is 0, a find-similar query without other objects. The false-positive rate is
the share of them for which the model named at least one region (or box). (A class whose
objects all lack a proposal has an empty expected answer but is not counted as negative: the
object is there.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.evaluation.confidence import check_mode
from vlm_fo1.evaluation.coords import COORDS_FORMAT
from vlm_fo1.evaluation.report import EvalReport
from vlm_fo1.evaluation.scorers import (
    GeneratedAnswer,
    ReadAnswer,
    Scorer,
    is_coordinate_record,
    make_scorer,
    task_of,
)

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_GROUPS",
    "GeneratedAnswer",
    "error_entry",
    "is_coordinate_record",
    "score_records",
    "task_of",
]

TASK_GROUPS: dict[str, str] = {
    "detection": "detection",
    "multi_detection": "detection",
    "counting": "counting",
    "referring": "referring",
    "region_caption": "region_caption",
    "region_caption_brief": "region_caption",
    "region_caption_detailed": "region_caption",
    "region_ocr": "region_ocr",
    "visual_prompt": "find_similar",
    "visual_prompt_detection": "find_similar",
    "vqa": "vqa",
    "free": "vqa",
    "caption": "caption",
}
"""Fine task (``meta["task"]``, else ``record.task``) → metric group; other tasks are not scored."""


@dataclass
class _Run:
    confidence: str
    scorers: dict[str, Scorer] = field(default_factory=dict)
    unscored: int = 0

    def score(
        self, record: ConversationRecord, answer: GeneratedAnswer
    ) -> tuple[str | None, bool | None, dict]:
        """``(metric group or None, correct or None, parsed summary)`` for one record."""
        item = ReadAnswer.build(record, answer)
        group = TASK_GROUPS.get(task_of(record) or "")
        if group is None:
            self.unscored += 1
            return None, None, item.summary()
        prefix = f"{COORDS_FORMAT}/{group}" if item.coords else group
        scorer = self.scorers.get(prefix) or make_scorer(group, prefix, self.confidence)
        correct = scorer.add(item)
        self.scorers[prefix] = scorer
        return prefix, correct, item.summary()


def score_records(
    records: Sequence[ConversationRecord],
    answers: Sequence[GeneratedAnswer],
    *,
    confidence: str = "product",
    errors: Sequence[dict[str, Any]] = (),
) -> EvalReport:
    """Score one answer per record; a record whose truth cannot be read goes to ``errors``.

    Raises:
        ValueError: for an unknown ``confidence`` or when the two lengths differ.
    """
    check_mode(confidence)
    if len(records) != len(answers):
        raise ValueError(f"expected one answer per record: {len(records)} records, {len(answers)} answers")
    run = _Run(confidence)
    report = EvalReport(metrics={}, errors=list(errors), settings={"confidence": confidence})
    for record, answer in zip(records, answers, strict=True):
        try:
            group, correct, summary = run.score(record, answer)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            logger.warning("could not score record %r: %r", record.id, err)
            report.errors.append(error_entry(record, "scoring", err))
            continue
        report.predictions.append(
            {
                "id": record.id,
                "task": task_of(record),
                "group": group,
                "text": answer.text,
                "target": record.target(),
                "parsed": summary,
                "correct": correct,
            }
        )
    for prefix in sorted(run.scorers):
        report.metrics.update(run.scorers[prefix].metrics())
    if run.unscored:
        report.metrics["unscored/n"] = run.unscored
    report.metrics["errors/n"] = len(report.errors)
    return report


def error_entry(record: ConversationRecord, stage: str, err: BaseException) -> dict[str, Any]:
    """An ``EvalReport.errors`` entry: record id, task, stage and the error's type and message."""
    return {"id": record.id, "task": task_of(record), "stage": stage, "error": f"{type(err).__name__}: {err}"}
