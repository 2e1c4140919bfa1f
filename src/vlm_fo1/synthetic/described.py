"""Described-region records: the miniature world's region tasks with the regions given in words.

A pretrained language model already knows how to find an item in a list by what it says and
name it; the tiny stage-0 base of the miniature world does not, and learning that retrieval
from region features alone is slow (docs/training.md). These records teach it in text: the same
questions and answers as the image records, but instead of an image and region features the
listing reads ``<region0>circle<region1>empty<region2>square…`` (``ConversationRecord.region_texts``).
A region's word is the class of the object it stands for (the proposal that
:func:`~vlm_fo1.synthetic.proposals.match_proposals` pairs with the object, as in the answers)
or :data:`EMPTY_WORD` for every other proposal (background, parts, duplicates).

The hope was a stage 1 that aligns region tokens to a frozen language model that already
retrieves by content, as the paper's stage 1 does with a pretrained Qwen2.5-VL. Measured in
``benchmarks/described_base.py`` (docs/training.md): the tiny base learns this retrieval only in
part and the FO1 arm built on it retrieves worse than the recipe's, so the recipe does not use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlm_fo1.data.records import ConversationRecord, read_records, write_records
from vlm_fo1.synthetic.proposals import match_proposals

logger = logging.getLogger(__name__)

DESCRIBED_TASKS = ("detection", "multi_detection", "counting")
"""Tasks whose answer depends only on each region's class (the text a region is given)."""
EMPTY_WORD = "empty"
"""The word of a proposal that stands for no object (a word of the world's vocabulary)."""


def region_words(truth: dict[str, Any], iou_threshold: float = 0.5) -> list[str]:
    """One word per proposal of a scene-truth line (``{split}_scenes.jsonl``): its object's class
    when it is that object's matched proposal, else :data:`EMPTY_WORD`."""
    objects = truth["objects"]
    boxes = truth["proposals"]["boxes"]
    words = [EMPTY_WORD] * len(boxes)
    for index, region in enumerate(match_proposals(boxes, [o["box"] for o in objects], iou_threshold)):
        if region is not None:
            words[region] = objects[index]["kind"]
    return words


def describe(record: ConversationRecord, words: Sequence[str]) -> ConversationRecord:
    """``record`` with its image and boxes replaced by the described listing ``words``.

    Raises:
        ValueError: when ``words`` does not give one word per box.
    """
    if len(words) != len(record.boxes):
        raise ValueError(f"record {record.id!r}: expected {len(record.boxes)} region words, got {len(words)}")
    return ConversationRecord(
        messages=record.messages,
        id=f"{record.id}/described",
        task=record.task,
        meta={**record.meta, "described": True},
        region_texts=list(words),
    )


def write_described(
    records: str | Path,
    out: str | Path,
    *,
    tasks: Sequence[str] = DESCRIBED_TASKS,
    iou_threshold: float = 0.5,
) -> Path:
    """Described copies of the ``tasks`` records of a generated split (``{split}.jsonl`` next to
    its ``{split}_scenes.jsonl``) written to ``out``; returns ``out``.

    Raises:
        ValueError: when the split's scene truth is missing or does not cover a record's image.
    """
    records = Path(records)
    truth_path = records.with_name(f"{records.stem}_scenes.jsonl")
    if not truth_path.is_file():
        raise ValueError(f"expected the scene truth {truth_path} next to {records}, found none")
    with truth_path.open(encoding="utf-8") as handle:
        words = {
            (line := json.loads(text))["image"]: region_words(line, iou_threshold)
            for text in handle
            if text.strip()
        }

    def described() -> Iterator[ConversationRecord]:
        for record in read_records(records):
            if record.meta.get("task") not in tasks:
                continue
            if record.image not in words:
                raise ValueError(f"record {record.id!r}: image {record.image!r} is not in {truth_path}")
            yield describe(record, words[record.image])

    count = write_records(out, described())
    logger.info("wrote %d described-region records to %s", count, out)
    return Path(out)
