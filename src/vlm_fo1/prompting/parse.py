"""Read VLM-FO1 answers into typed results.

The model answers by naming candidate regions (``shared/docs/official-release.md`` §4):
``<ground>LABEL</ground><objects><regionA><regionB>…</objects>``, one segment per label, possibly
embedded in prose (grounded captions), wrapped in ``<think>``/``<answer>`` blocks (region
reasoning) or followed by a number (counting). :func:`parse` turns such text into a
:class:`ParsedOutput`. It never raises on malformed text: whatever it had to skip or repair is
described in ``ParsedOutput.issues``.

Differences from the release's parsers, on purpose: whitespace is allowed between ``</ground>``
and ``<objects>``; repeated labels are merged keeping the order of first appearance (the release
uses a set); region indexes outside the caller's box list are dropped and reported instead of
raising ``IndexError``; when an ``<answer>`` block exists, groups are read from it only.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_fo1.prompting.tokens import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    END_OF_TEXT,
    GROUND_CLOSE,
    GROUND_OPEN,
    GROUNDING_TAGS,
    IM_END,
    OBJECTS_CLOSE,
    OBJECTS_OPEN,
    REASONING_TAGS,
    REGION_FEATURE_TOKEN,
    REGION_TOKEN_PATTERN,
    THINK_CLOSE,
    THINK_OPEN,
)

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

_CONTROL_RE = re.compile(r"<\|[^<>|\s]{1,40}\|>")
_TAG_STOP = "|".join(re.escape(tag) for tag in GROUNDING_TAGS)
_SEGMENT_RE = re.compile(
    rf"{re.escape(GROUND_OPEN)}((?:(?!{_TAG_STOP}).)*?){re.escape(GROUND_CLOSE)}"
    rf"\s*{re.escape(OBJECTS_OPEN)}((?:(?!{_TAG_STOP}).)*?){re.escape(OBJECTS_CLOSE)}",
    re.DOTALL,
)
_BAD_REGION_RE = re.compile(r"<region(?!\d+>)(?!feat>)[^<>]{0,32}>")
_ANY_REGION_RE = re.compile(rf"\s*(?:{REGION_TOKEN_PATTERN.pattern}|{_BAD_REGION_RE.pattern})")
_LEFTOVER_TAG_RE = re.compile("|".join(re.escape(t) for t in (*GROUNDING_TAGS, *REASONING_TAGS)))
_COUNT_TAG_RE = re.compile(r"<region\d+>")
_COUNT_NUMBER_RE = re.compile(r"(?<!region)\d+")
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:!?])")
_MAX_INDEX_DIGITS = 9


@dataclass(frozen=True)
class GroundedGroup:
    """One label and the regions the model grounded it to (order of first mention)."""

    label: str
    region_indexes: tuple[int, ...]


@dataclass(frozen=True)
class Detection:
    """One ``(label, region)`` pair with the region's box (xyxy, original image pixels)."""

    label: str
    region_index: int
    box: Box


@dataclass(frozen=True)
class ParsedOutput:
    """Everything read from one model answer.

    Attributes:
        raw: the text as given.
        answer: readable answer text: the ``<answer>`` block if present, else the text outside
            ``<think>``; grounding segments reduced to their phrase, tags and control tokens removed,
            whitespace collapsed.
        groups: grounded labels with their valid region indexes (repeated labels merged).
        detections: one per ``(label, valid index)``; empty when no boxes were given.
        count: the release's counting rule applied to ``raw`` (see :func:`count_from_text`).
        reasoning: the ``<think>`` content, or None.
        dropped_indexes: region indexes that were out of range for the given boxes.
        issues: notes on everything malformed, skipped or repaired.
        mentioned_indexes: valid region indexes named in the answer outside grounding segments
            (e.g. ``<answer>the man <region3></answer>``).
    """

    raw: str
    answer: str
    groups: tuple[GroundedGroup, ...]
    detections: tuple[Detection, ...]
    count: int | None
    reasoning: str | None
    dropped_indexes: tuple[int, ...]
    issues: tuple[str, ...]
    mentioned_indexes: tuple[int, ...] = ()

    def by_label(self) -> dict[str, list[Detection]]:
        """Detections grouped by label, labels in order of first appearance."""
        result: dict[str, list[Detection]] = {}
        for detection in self.detections:
            result.setdefault(detection.label, []).append(detection)
        return result

    @property
    def labels(self) -> tuple[str, ...]:
        """Grounded labels in order of first appearance."""
        return tuple(group.label for group in self.groups)

    @property
    def region_indexes(self) -> tuple[int, ...]:
        """All valid grounded region indexes, in order of first appearance, without repeats."""
        return tuple(dict.fromkeys(i for group in self.groups for i in group.region_indexes))

    @property
    def ok(self) -> bool:
        """True when nothing had to be skipped or repaired."""
        return not self.issues


def region_indexes_in(text: str) -> list[int]:
    """Indexes of every well-formed ``<regionN>`` tag in ``text``, in order, repeats kept."""
    result = []
    for match in REGION_TOKEN_PATTERN.finditer(text):
        index = _safe_int(match.group(1))
        if index is not None:
            result.append(index)
    return result


def count_from_text(text: str) -> int | None:
    """The release's counting rule (§7.2): drop ``<regionN>`` tags, take the first integer.

    Returns None when no integer is left (the evaluation scores that as 0).
    """
    match = _COUNT_NUMBER_RE.search(_COUNT_TAG_RE.sub("", text))
    return None if match is None else _safe_int(match.group(0), max_digits=4000)


def parse(text: str, boxes: Any = None) -> ParsedOutput:
    """Parse one model answer; never raises on malformed text.

    Args:
        text: the decoded answer (special tokens may be included).
        boxes: optional candidate boxes, ``(N, 4)`` xyxy in original image pixels (a sequence of
            4-sequences, a tensor or an array). When given, indexes ``>= N`` are dropped and
            reported, and detections carry their boxes.

    Raises:
        TypeError: when ``text`` is not a str.
        ValueError: when ``boxes`` is not a list of 4 numbers per box.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    box_list = _box_list(boxes)
    issues: list[str] = []
    body = _strip_control(text, issues)
    reasoning, section = _split_reasoning(body, issues)

    if REGION_FEATURE_TOKEN in body:
        issues.append(f"output contains the placeholder {REGION_FEATURE_TOKEN!r}; removed")
    bad_tags = _BAD_REGION_RE.findall(body)
    if bad_tags:
        issues.append(f"malformed region tags ignored: {_preview(bad_tags)}")

    raw_groups, residual = _read_segments(section, issues)
    dropped: dict[int, None] = {}
    groups = tuple(GroundedGroup(label, _valid(indexes, box_list, dropped)) for label, indexes in raw_groups)
    mentioned = tuple(dict.fromkeys(_valid(region_indexes_in(residual), box_list, dropped)))
    if dropped:
        issues.append(
            f"region indexes {sorted(dropped)} are out of range for {len(box_list or ())} boxes "
            f"(expected 0..{len(box_list or ()) - 1}); dropped"
        )
    detections: tuple[Detection, ...] = ()
    if box_list is not None:
        detections = tuple(
            Detection(group.label, index, box_list[index])
            for group in groups
            for index in group.region_indexes
        )
    result = ParsedOutput(
        raw=text,
        answer=_answer_text(section),
        groups=groups,
        detections=detections,
        count=count_from_text(text),
        reasoning=reasoning,
        dropped_indexes=tuple(dropped),
        issues=tuple(issues),
        mentioned_indexes=mentioned,
    )
    if issues:
        logger.debug("parse issues for %r: %s", text[:200], issues)
    return result


def _safe_int(digits: str, max_digits: int = _MAX_INDEX_DIGITS) -> int | None:
    """``int(digits)``, or None when it has more significant digits than ``max_digits``."""
    significant = digits.lstrip("0")
    if len(significant) > max_digits:
        return None
    return int(digits)


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(item[:40]) for item in items[:limit])
    return shown + (f", … ({len(items)} in total)" if len(items) > limit else "")


def _box_list(boxes: Any) -> list[Box] | None:
    """Caller's boxes as a list of 4-tuples of floats (original order)."""
    if boxes is None:
        return None
    if hasattr(boxes, "tolist"):
        boxes = boxes.tolist()
    if isinstance(boxes, str) or not isinstance(boxes, Sequence):
        raise ValueError(f"boxes must be a sequence of (x1, y1, x2, y2), got {type(boxes).__name__}")
    result: list[Box] = []
    for i, box in enumerate(boxes):
        try:
            values = tuple(float(v) for v in box)
        except (TypeError, ValueError) as err:
            raise ValueError(f"box {i} must be 4 numbers (x1, y1, x2, y2), got {box!r}") from err
        if len(values) != 4 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {i} must be 4 finite numbers (x1, y1, x2, y2), got {box!r}")
        result.append((values[0], values[1], values[2], values[3]))
    return result


def _strip_control(text: str, issues: list[str]) -> str:
    """Cut at the first end-of-turn token and remove other ``<|…|>`` control strings."""
    ends = [pos for pos in (text.find(IM_END), text.find(END_OF_TEXT)) if pos >= 0]
    body = text
    if ends:
        body, tail = text[: min(ends)], text[min(ends) :]
        extra = _CONTROL_RE.sub("", tail).strip()
        if extra:
            issues.append(f"ignored text after the end-of-turn token: {extra[:60]!r}")
    controls = _CONTROL_RE.findall(body)
    if controls:
        issues.append(f"removed chat control strings: {_preview(controls)}")
        body = _CONTROL_RE.sub("", body)
    return body


def _split_reasoning(body: str, issues: list[str]) -> tuple[str | None, str]:
    """``(think content or None, answer section)``.

    The answer section is the first ``<answer>`` block if there is one, else the text outside
    ``<think>``. Unclosed blocks run to the next block or to the end of the text.
    """
    reasoning: str | None = None
    outside = body
    start = body.find(THINK_OPEN)
    if start >= 0:
        content_start = start + len(THINK_OPEN)
        end = body.find(THINK_CLOSE, content_start)
        if end >= 0:
            reasoning = body[content_start:end]
            outside = body[:start] + body[end + len(THINK_CLOSE) :]
        else:
            issues.append(f"unclosed {THINK_OPEN}")
            answer_at = body.find(ANSWER_OPEN, content_start)
            stop = answer_at if answer_at >= 0 else len(body)
            reasoning = body[content_start:stop]
            outside = body[:start] + body[stop:]
    elif THINK_CLOSE in body:
        issues.append(f"{THINK_CLOSE} without {THINK_OPEN}; the text before it is taken as reasoning")
        end = body.find(THINK_CLOSE)
        reasoning, outside = body[:end], body[end + len(THINK_CLOSE) :]

    section = outside
    start = outside.find(ANSWER_OPEN)
    if start >= 0:
        content_start = start + len(ANSWER_OPEN)
        end = outside.find(ANSWER_CLOSE, content_start)
        if end >= 0:
            section = outside[content_start:end]
            if ANSWER_OPEN in outside[end:]:
                issues.append(f"several {ANSWER_OPEN} blocks; only the first is read")
        else:
            issues.append(f"unclosed {ANSWER_OPEN}")
            section = outside[content_start:]
    elif ANSWER_CLOSE in outside:
        issues.append(f"{ANSWER_CLOSE} without {ANSWER_OPEN}")
    return (None if reasoning is None else reasoning.strip()), section


def _read_segments(section: str, issues: list[str]) -> tuple[list[tuple[str, list[int]]], str]:
    """Grounding segments of ``section`` merged by label, and the text left outside them."""
    merged: dict[str, dict[int, None]] = {}
    for match in _SEGMENT_RE.finditer(section):
        label, objects = match.group(1).strip(), match.group(2)
        if not label:
            issues.append("empty label in a grounding segment")
        indexes = merged.setdefault(label, {})
        for tag in REGION_TOKEN_PATTERN.finditer(objects):
            index = _safe_int(tag.group(1))
            if index is None:
                issues.append(f"region index too large: {tag.group(0)[:40]!r}; ignored")
            else:
                indexes[index] = None
        leftover = _ANY_REGION_RE.sub("", objects).strip()
        if leftover:
            issues.append(f"unexpected text in the objects of {label!r}: {leftover[:40]!r}; ignored")
    residual = _SEGMENT_RE.sub(" ", section)
    for tag in GROUNDING_TAGS:
        found = residual.count(tag)
        if found:
            issues.append(f"{found} unmatched {tag} tag(s) outside complete grounding segments")
    return [(label, list(indexes)) for label, indexes in merged.items()], residual


def _valid(indexes: Sequence[int], box_list: list[Box] | None, dropped: dict[int, None]) -> tuple[int, ...]:
    """``indexes`` that exist in ``box_list`` (all of them when no boxes); others go to ``dropped``."""
    if box_list is None:
        return tuple(indexes)
    kept = []
    for index in indexes:
        if index < len(box_list):
            kept.append(index)
        else:
            dropped[index] = None
    return tuple(kept)


def _answer_text(section: str) -> str:
    """Readable answer: segments become their phrase; tags and placeholders are removed."""

    def phrase(match: re.Match[str]) -> str:
        text = match.group(1).strip()
        before = section[match.start() - 1] if match.start() > 0 else ""
        after = section[match.end()] if match.end() < len(section) else ""
        if before.isalnum() or before == ">":
            text = " " + text
        if after.isalnum() or after == "<":
            text = text + " "
        return text

    text = _SEGMENT_RE.sub(phrase, section)
    for _ in range(8):  # removing a tag may join the pieces of another one
        cleaned = _ANY_REGION_RE.sub("", text).replace(REGION_FEATURE_TOKEN, "")
        cleaned = _LEFTOVER_TAG_RE.sub(" ", cleaned)
        if cleaned == text:
            break
        text = cleaned
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
