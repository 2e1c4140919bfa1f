"""The coordinate baseline: boxes written as text, the way Qwen2.5-VL grounds objects.

VLM-FO1's claim is that *retrieving* a proposal (``<regionN>``) beats *writing* its coordinates.
To measure that on the same data, a detection / counting / referring record can be rewritten
for a model that sees no proposals and writes boxes itself. The format (ours; one ``<box>`` per
object, integers in the **original image's pixels**, xyxy, no spaces)::

    <ground>circle</ground><box>12,30,40,56</box><box>70,8,95,33</box>
    <ground>circle</ground>                                   (absent class: no boxes)
    <ground>circles</ground><box>12,30,40,56</box>2           (counting: the number follows)
    <ground>the small square</ground><box>87,67,101,81</box>  (referring expression)

Several classes are several segments in query order, classes without objects left out; when no
asked class has an object, the empty segment of the first one is written (the grammar of the
region answers, synthetic/tasks.py). ``<box>`` is plain text to the tokenizer (not a special
token), like the digits inside it.

:func:`to_coordinate_record` sets ``meta["format"] = "coords"``; the evaluation runner reads such
records with :func:`parse_box_text` instead of :func:`vlm_fo1.prompting.parse`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.prompting.parse import count_from_text
from vlm_fo1.prompting.tokens import END_OF_TEXT, GROUND_CLOSE, GROUND_OPEN, IM_END

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
BOX_OPEN, BOX_CLOSE = "<box>", "</box>"
COORDS_FORMAT = "coords"
COORDINATE_TASKS = ("detection", "multi_detection", "counting", "referring")
"""Fine task names (``meta["task"]``) that :func:`to_coordinate_record` converts."""

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(rf"{re.escape(BOX_OPEN)}([^<>]*?){re.escape(BOX_CLOSE)}")
_BOX_BODY_RE = re.compile(rf"^{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}$")
_SEGMENT_RE = re.compile(
    rf"{re.escape(GROUND_OPEN)}([^<>]*?){re.escape(GROUND_CLOSE)}"
    rf"((?:\s*{re.escape(BOX_OPEN)}[^<>]*?{re.escape(BOX_CLOSE)})*)"
)


def boxes_to_text(label: str, boxes: Sequence[Sequence[float]]) -> str:
    """``<ground>label</ground><box>x1,y1,x2,y2</box>…`` with coordinates rounded to integers.

    Raises:
        ValueError: for a box that is not 4 finite numbers.
    """
    parts = [f"{GROUND_OPEN}{label}{GROUND_CLOSE}"]
    for i, box in enumerate(boxes):
        values = [float(v) for v in box]
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {i} of {label!r} must be 4 finite numbers, got {box!r}")
        parts.append(f"{BOX_OPEN}{','.join(str(round(v)) for v in values)}{BOX_CLOSE}")
    return "".join(parts)


def _read_box(body: str) -> Box | None:
    match = _BOX_BODY_RE.match(body)
    if match is None:
        return None
    x1, y1, x2, y2 = (float(v) for v in match.groups())
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        return None
    return (x1, y1, x2, y2)


def parse_box_text(text: Any) -> list[tuple[str, Box]]:
    """Every well-formed ``(label, box)`` of a coordinate answer, in order; never raises.

    Text after ``<|im_end|>`` is ignored; a box that is not four numbers or is inverted
    (x2 < x1 or y2 < y1) is skipped (logged at DEBUG), as is a ``<box>`` outside a segment.
    """
    if not isinstance(text, str):
        logger.debug("parse_box_text got %s, not str", type(text).__name__)
        return []
    for stop in (IM_END, END_OF_TEXT):
        text = text.split(stop, 1)[0]
    result: list[tuple[str, Box]] = []
    for segment in _SEGMENT_RE.finditer(text):
        label = segment.group(1).strip()
        for box_match in _BOX_RE.finditer(segment.group(2)):
            box = _read_box(box_match.group(1))
            if box is None:
                logger.debug("skipped malformed box %r", box_match.group(0)[:60])
            else:
                result.append((label, box))
    return result


def count_from_box_text(text: str) -> int | None:
    """The release's counting rule on a coordinate answer: boxes removed first, then the first integer."""
    return count_from_text(_BOX_RE.sub("", text)) if isinstance(text, str) else None


def _has_region_reference(messages: list[dict[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(item.get("type") == "region" for item in content):
            return True
    return False


def _coordinate_answer(task: str, meta: dict[str, Any]) -> str:
    if task in ("detection", "multi_detection"):
        classes = list(meta.get("classes") or meta["gt_boxes"])
        segments = [boxes_to_text(c, meta["gt_boxes"][c]) for c in classes if meta["gt_boxes"].get(c)]
        return "".join(segments) or boxes_to_text(classes[0], [])
    if task == "counting":
        return boxes_to_text(meta["label"], meta["gt_boxes"]) + str(int(meta["count"]))
    return boxes_to_text(meta["expression"], [meta["gt_box"]])


def to_coordinate_record(record: ConversationRecord) -> ConversationRecord:
    """The same question without proposals (``boxes=[]``), answered with true boxes as coordinates.

    Works on miniature-world records of :data:`COORDINATE_TASKS` (their prompts name no region).
    The result's ``id`` gets a ``/coords`` suffix, ``meta`` gains ``format = "coords"`` and the new
    ``answer``, loses ``target_regions`` (no proposals, no regions), and ``negative`` becomes "no
    true box" (every object is answered here, also those the proposals missed).

    Raises:
        ValueError: for another task, a prompt that references a region, or missing truth in meta.
    """
    task = record.meta.get("task")
    if task not in COORDINATE_TASKS:
        raise ValueError(
            f"record {record.id!r}: expected meta['task'] in {list(COORDINATE_TASKS)}, got {task!r}"
        )
    prompt = record.prompt_messages()
    if _has_region_reference(prompt):
        raise ValueError(f"record {record.id!r}: its prompt references a region, which needs proposal boxes")
    try:
        answer = _coordinate_answer(task, record.meta)
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(
            f"record {record.id!r}: meta lacks the ground truth of a {task} record: {err!r}"
        ) from err
    meta = {k: v for k, v in record.meta.items() if k != "target_regions"}
    meta |= {"format": COORDS_FORMAT, "answer": answer}
    if "negative" in meta:  # a class whose objects all lack a proposal is a positive here
        meta["negative"] = not parse_box_text(answer)
    return ConversationRecord(
        messages=[*prompt, {"role": "assistant", "content": answer}],
        image=record.image,
        boxes=[],
        scores=None,
        id=None if record.id is None else f"{record.id}/{COORDS_FORMAT}",
        task=record.task,
        meta=meta,
    )
