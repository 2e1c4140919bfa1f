"""Conversation records: the on-disk format of training and evaluation data (JSONL).

One JSON object per line::

    {"id": "scene-17/detect-0", "image": "images/17.png",
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Please detect "}, …]},
                  {"role": "assistant", "content": "<ground>circle</ground><objects><region3></objects>"}],
     "boxes": [[x1, y1, x2, y2], …], "scores": [0.93, …], "task": "detection", "meta": {…}}

``image`` is relative to the file's folder (or absolute); ``boxes`` are xyxy in the image's
pixels and ``<regionN>`` in the conversation names ``boxes[N]``; ``scores`` (optional) are
proposal scores. A record may instead describe its regions in words (``"region_texts":
["circle", "empty", …]``, no image, no boxes): the listing then reads
``<region0>circle<region1>empty…`` where an image's listing has region features, so a language
model can learn region retrieval from text alone (``synthetic.described``; training only, the
evaluation runner refuses them). Message content may also be a plain string: in a *data file*
(trusted, unlike user input at run time) ``<regionN>`` tags in user text are read as region references.

The release's processed evaluation files are read too (official-release.md §7): COCO JSONL lines
with ``conversations`` / ``bbox_list`` / ``score_list``, and the CountBench / PixMo-Count JSON
lists with ``question`` / ``answer`` / ``bboxes`` / ``scores``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm_fo1.prompting.tokens import REGION_TOKEN_PATTERN

_IMAGE_PLACEHOLDER = "<image>"
_BAD_DATA = (KeyError, TypeError, ValueError, AttributeError)  # json.JSONDecodeError is a ValueError


@dataclass
class ConversationRecord:
    """One training or evaluation conversation about one image (see module docstring)."""

    messages: list[dict[str, Any]]
    image: str | None = None
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] | None = None
    id: str | int | None = None
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    region_texts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.region_texts is not None:
            if self.image is not None or self.boxes:
                raise ValueError(
                    f"record {self.id!r}: region_texts replace the image and its boxes, "
                    f"got image {self.image!r} and {len(self.boxes)} boxes"
                )
            bad = [t for t in self.region_texts if not isinstance(t, str) or not t.strip()]
            if bad:
                raise ValueError(
                    f"record {self.id!r}: region_texts must be non-empty strings, got {bad[:3]!r}"
                )
        if self.scores is not None and len(self.scores) != len(self.boxes):
            raise ValueError(f"record {self.id!r}: {len(self.scores)} scores for {len(self.boxes)} boxes")
        for i, box in enumerate(self.boxes):
            if len(box) != 4:
                raise ValueError(f"record {self.id!r}: box {i} must have 4 numbers, got {box!r}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "image": self.image,
            "messages": self.messages,
            "boxes": self.boxes,
        }
        if self.scores is not None:
            data["scores"] = self.scores
        if self.task is not None:
            data["task"] = self.task
        if self.meta:
            data["meta"] = self.meta
        if self.region_texts is not None:
            data["region_texts"] = self.region_texts
        return data

    @property
    def num_regions(self) -> int:
        """How many regions the conversation may name (boxes, or described regions)."""
        return len(self.region_texts) if self.region_texts is not None else len(self.boxes)

    def image_path(self, root: str | Path | None) -> Path | None:
        """The image path, resolved against ``root`` when relative."""
        if self.image is None:
            return None
        path = Path(self.image)
        return path if path.is_absolute() or root is None else Path(root) / path

    def prompt_messages(self) -> list[dict[str, Any]]:
        """The conversation up to (not including) the last assistant turn: what the model is asked."""
        end = len(self.messages)
        while end and self.messages[end - 1]["role"] == "assistant":
            end -= 1
        return [_trusted_message(m) for m in self.messages[:end]]

    def target(self) -> str:
        """The last assistant turn's text ('' when there is none)."""
        last = self.messages[-1] if self.messages else None
        if last is None or last["role"] != "assistant":
            return ""
        content = last["content"]
        return content if isinstance(content, str) else "".join(i.get("text", "") for i in content)

    def training_messages(self) -> list[dict[str, Any]]:
        """All turns, with ``<regionN>`` tags in user text read as region references."""
        return [_trusted_message(m) for m in self.messages]


def pack_conversations(records: Iterable[ConversationRecord], max_turns: int) -> list[ConversationRecord]:
    """Merge records about the same image and box list into multi-turn conversations.

    Training on several question/answer turns per image encodes the image and the region
    listing once for all of them. Records are grouped by ``(image, boxes)`` in their order;
    each group is cut into conversations of at most ``max_turns`` turns. System turns are
    dropped except the first record's. ``meta["packed_ids"]`` lists the merged record ids.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be >= 1, got {max_turns}")
    groups: dict[tuple[Any, ...], list[ConversationRecord]] = {}
    for record in records:
        key = (record.image, tuple(tuple(b) for b in record.boxes), tuple(record.region_texts or ()))
        groups.setdefault(key, []).append(record)
    packed = []
    for group in groups.values():
        for start in range(0, len(group), max_turns):
            chunk = group[start : start + max_turns]
            messages = list(chunk[0].messages)
            for record in chunk[1:]:
                messages += [m for m in record.messages if m["role"] != "system"]
            first = chunk[0]
            packed.append(
                ConversationRecord(
                    messages=messages,
                    image=first.image,
                    boxes=first.boxes,
                    scores=first.scores,
                    id=first.id if len(chunk) == 1 else f"{first.id}+{len(chunk) - 1}",
                    task=first.task if len(chunk) == 1 else "packed",
                    meta={**first.meta, "packed_ids": [r.id for r in chunk]},
                    region_texts=first.region_texts,
                )
            )
    return packed


REGION_META_KEYS = ("target_regions", "target_region", "region", "reference_region")
"""``meta`` fields that hold region indexes (an int, a list, or ``{label: [index, …]}``)."""


def permute_regions(record: ConversationRecord, order: Sequence[int]) -> ConversationRecord:
    """The same record with its boxes listed in another order, every region index remapped.

    ``order[i]`` is the old index of the box placed at position ``i``. ``<regionN>`` tags in text,
    typed region references in content lists and the region fields of ``meta``
    (:data:`REGION_META_KEYS`) are renumbered, so the record means exactly what it meant before.
    Used to stop a model from learning the listing order (proposals arrive sorted by score)
    instead of the regions' content.

    Raises:
        ValueError: when ``order`` is not a permutation of the record's box indexes.
    """
    count = record.num_regions
    if sorted(order) != list(range(count)):
        raise ValueError(
            f"record {record.id!r}: order must be a permutation of 0..{count - 1}, got {list(order)}"
        )
    new_index = {old: new for new, old in enumerate(order)}

    def remap(value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int):
            return new_index.get(value, value)
        if isinstance(value, list):
            return [remap(v) for v in value]
        if isinstance(value, dict):
            return {k: remap(v) for k, v in value.items()}
        return value

    def text(value: str) -> str:
        return REGION_TOKEN_PATTERN.sub(
            lambda m: f"<region{new_index.get(int(m.group(1)), int(m.group(1)))}>", value
        )

    def content(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        items = []
        for item in value:
            if item.get("type") == "region":
                item = {**item, "index": remap(int(item["index"]))}
            elif isinstance(item.get("text"), str):
                item = {**item, "text": text(item["text"])}
            items.append(item)
        return items

    meta = {k: remap(v) if k in REGION_META_KEYS else v for k, v in record.meta.items()}
    return ConversationRecord(
        messages=[{**m, "content": content(m["content"])} for m in record.messages],
        image=record.image,
        boxes=[record.boxes[i] for i in order] if record.boxes else [],
        scores=None if record.scores is None else [record.scores[i] for i in order],
        id=record.id,
        task=record.task,
        meta=meta,
        region_texts=None if record.region_texts is None else [record.region_texts[i] for i in order],
    )


def text_to_items(text: str) -> list[dict[str, Any]]:
    """Trusted data text → content items, ``<regionN>`` tags becoming region references."""
    items: list[dict[str, Any]] = []
    last = 0
    for match in REGION_TOKEN_PATTERN.finditer(text):
        if match.start() > last:
            items.append({"type": "text", "text": text[last : match.start()]})
        items.append({"type": "region", "index": int(match.group(1))})
        last = match.end()
    if last < len(text):
        items.append({"type": "text", "text": text[last:]})
    return items


def _trusted_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if message["role"] == "user" and isinstance(content, str):
        return {"role": "user", "content": text_to_items(content)}
    return message


def _from_official_line(line: dict[str, Any]) -> ConversationRecord:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in line["conversations"]:
        if turn["from"] not in roles:
            raise ValueError(f"expected a turn 'from' one of {sorted(roles)}, got {turn['from']!r}")
        content = turn["value"]
        if not isinstance(content, str):
            raise ValueError(f"expected a turn 'value' string, got {type(content).__name__}")
        if turn["from"] == "human" and content.startswith(_IMAGE_PLACEHOLDER):
            content = content[len(_IMAGE_PLACEHOLDER) :].lstrip("\n")  # LLaVA-style image slot
        messages.append({"role": roles[turn["from"]], "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # the release leaves an empty answer slot
    return ConversationRecord(
        messages=messages,
        image=line.get("image"),
        boxes=[list(map(float, b)) for b in line.get("bbox_list", [])],
        scores=[float(s) for s in line["score_list"]] if "score_list" in line else None,
        id=line.get("id"),
        task="detection",
    )


def _from_count_item(index: int, item: dict[str, Any]) -> ConversationRecord:
    return ConversationRecord(
        messages=[{"role": "user", "content": item["question"]}],
        image=item.get("image"),
        boxes=[list(map(float, b)) for b in item.get("bboxes", [])],
        scores=[float(s) for s in item["scores"]] if "scores" in item else None,
        id=item.get("id", index),
        task="counting",
        meta={"answer": int(item["answer"])},
    )


def _parse_line(data: dict[str, Any]) -> ConversationRecord:
    if "conversations" in data:
        return _from_official_line(data)
    return ConversationRecord(
        messages=data["messages"],
        image=data.get("image"),
        boxes=data.get("boxes", []),
        scores=data.get("scores"),
        id=data.get("id"),
        task=data.get("task"),
        meta=data.get("meta", {}),
        region_texts=data.get("region_texts"),
    )


def read_records(path: str | Path) -> Iterator[ConversationRecord]:
    """Records from our JSONL, the release's COCO JSONL, or a CountBench/PixMo JSON list.

    The format is told by the first non-blank character: ``[`` starts a JSON list of counting
    items, anything else is JSONL (blank lines skipped). In the release's COCO lines a leading
    ``<image>`` placeholder in the human turn is dropped (the image slot is implied) and the empty
    ``gpt`` answer slot is removed.

    Raises:
        ValueError: on a malformed line or item, naming the file and the line number (JSONL) or
            the item index (JSON list).
    """
    path = Path(path)
    with path.open(encoding="utf-8-sig") as handle:
        while (first := handle.read(1)) and first.isspace():
            pass
        handle.seek(0)
        if first == "[":
            yield from _read_count_list(path, handle.read())
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                record = _parse_line(data)
            except _BAD_DATA as err:
                raise ValueError(f"{path}:{number}: not a conversation record: {_describe(err)}") from err
            yield record


def _read_count_list(path: Path, text: str) -> Iterator[ConversationRecord]:
    """The CountBench / PixMo-Count JSON list (official-release.md §7.2)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON list of counting items: {err}") from err
    for index, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise ValueError(f"expected a JSON object, got {type(item).__name__}")
            record = _from_count_item(index, item)
        except _BAD_DATA as err:
            raise ValueError(f"{path}: item {index}: not a counting item: {_describe(err)}") from err
        yield record


def _describe(err: Exception) -> str:
    return f"missing key {err}" if isinstance(err, KeyError) else str(err)


def write_records(path: str | Path, records: Iterable[ConversationRecord]) -> int:
    """Write records as JSONL (atomically: a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count
