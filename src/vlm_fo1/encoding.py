"""Chat messages → token ids in the release's prompt layout, with a trainable-token mask.

Layout (official-release.md §4), for an image with N boxes::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>…<|vision_end|>\\n<region0><regionfeat>…<region{N-1}><regionfeat>\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n

With no boxes the listing line is left out (``<|vision_end|>\\n{text}``). A system turn is added
unless the conversation starts with one. Regions described in words instead of an image
(``region_texts``, see ``data.records``) open the first user turn as
``<region0>circle<region1>empty…\\n{text}``, each text tokenized as user text.

Safety: text written by a user (user and system turns) can never produce a control token: every
occurrence of an added-token string (``<|im_end|>``, ``<|image_pad|>``, ``<region3>``,
``<regionfeat>``…) in it is broken up and tokenized as plain characters. Region references come
only from typed ``{"type": "region", "index": i}`` items. Assistant text (training targets, chat
history) may contain region names and grounding tags, but no chat/vision control tokens and no
``<regionfeat>``.

Messages: ``{"role": "system" | "user" | "assistant", "content": str | Prompt | list[item]}`` with
items ``{"type": "text", "text": str}``, ``{"type": "image"}``, ``{"type": "region", "index": int}``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vlm_fo1.prompting import tokens as T
from vlm_fo1.tokenization import check_fo1_tokens

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageSlot:
    """The image of a conversation as the prompt sees it: its token count and its box count."""

    num_image_tokens: int
    num_regions: int


@dataclass(frozen=True)
class EncodedChat:
    """Token ids of one conversation and, per token, whether it is a training target."""

    input_ids: list[int]
    trainable: list[bool]


@dataclass(frozen=True)
class _Piece:
    text: str | None  # text to tokenize, or None for literal ids
    ids: tuple[int, ...]
    forbidden: frozenset[str]  # added-token strings that this text must not produce
    trainable: bool


def _content_items(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if hasattr(content, "content") and callable(content.content):  # a templates.Prompt
        return list(content.content())
    if isinstance(content, Sequence):
        items = list(content)
        for item in items:
            if not isinstance(item, dict) or item.get("type") not in ("text", "image", "region"):
                raise ValueError(f"expected content items of type 'text', 'image' or 'region', got {item!r}")
        return items
    raise ValueError(
        f"expected message content as str, Prompt or list of items, got {type(content).__name__}"
    )


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a conversation; returns messages with ``content`` as a list of items."""
    if isinstance(messages, dict):
        messages = [messages]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ValueError(f"expected a non-empty list of chat messages, got {messages!r}")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i}: expected a dict with role in {list(ROLES)}, got {message!r}")
        result.append({"role": message["role"], "content": _content_items(message.get("content", ""))})
    if not any(m["role"] == "user" for m in result):
        raise ValueError("expected at least one user message, got none")
    for i, message in enumerate(result):
        if message["role"] == "user" and not any(
            item["type"] == "region" or (item["type"] == "text" and item.get("text", "").strip())
            for item in message["content"]
        ):
            raise ValueError(f"message {i}: empty prompt (a user turn needs text or a region reference)")
    return result


class ChatEncoder:
    """Encodes conversations for one tokenizer (see the module docstring for the layout)."""

    def __init__(self, tokenizer: Any, max_regions: int, system_prompt: str | None = T.DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.max_regions = max_regions
        self.system_prompt = system_prompt
        self.ids = check_fo1_tokens(tokenizer, max_regions)
        added = frozenset(tokenizer.get_added_vocab())
        allowed_for_assistant = {*T.region_tokens(max_regions), *T.GROUNDING_TAGS, *T.REASONING_TAGS}
        self._added = sorted(added, key=len, reverse=True)
        self._forbid_user = added
        self._forbid_assistant = frozenset(added - allowed_for_assistant)

    # -- low level ------------------------------------------------------------------------------------------
    def encode_text(self, spans: Sequence[tuple[str, frozenset[str]]]) -> list[int]:
        """Tokenize the concatenation of ``spans``; an added-token string overlapping a span that
        forbids it is cut after its first character, so it becomes plain text."""
        text = "".join(s for s, _ in spans)
        bounds, offset = [], 0
        for span, forbidden in spans:
            bounds.append((offset, offset + len(span), forbidden))
            offset += len(span)
        cuts: set[int] = set()
        for token in self._added:
            start = text.find(token)
            while start != -1:
                end = start + len(token)
                if any(s < end and start < e and token in f for s, e, f in bounds):
                    cuts.add(start + 1)
                start = text.find(token, start + 1)
        ids: list[int] = []
        edges = [0, *sorted(cuts), len(text)]
        for a, b in itertools.pairwise(edges):
            if b > a:
                ids.extend(self.tokenizer.encode(text[a:b], add_special_tokens=False))
        return ids

    def _region_id(self, index: Any, num_regions: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_regions:
            raise ValueError(f"region reference must be an int in [0, {num_regions}), got {index!r}")
        return self.ids[T.region_token(index)]

    # -- conversation ---------------------------------------------------------------------------------------
    def _image_block(self, slot: ImageSlot) -> list[_Piece]:
        ids = self.ids
        block = [ids[T.VISION_START], *[ids[T.IMAGE_PAD]] * slot.num_image_tokens, ids[T.VISION_END]]
        pieces = [_Piece(None, tuple(block), frozenset(), False), _Piece("\n", (), frozenset(), False)]
        if slot.num_regions:
            listing: list[int] = []
            for i in range(slot.num_regions):
                listing += [ids[T.region_token(i)], ids[T.REGION_FEATURE_TOKEN]]
            pieces += [_Piece(None, tuple(listing), frozenset(), False), _Piece("\n", (), frozenset(), False)]
        return pieces

    def _message_pieces(
        self, message: dict[str, Any], slot: ImageSlot | None, num_regions: int
    ) -> list[_Piece]:
        role = message["role"]
        trainable = role == "assistant"
        forbidden = self._forbid_assistant if trainable else self._forbid_user
        pieces = [_Piece(f"{T.IM_START}{role}\n", (), frozenset(), False)]
        for item in message["content"]:
            if item["type"] == "text":
                pieces.append(_Piece(str(item.get("text", "")), (), forbidden, trainable))
            elif item["type"] == "region":
                pieces.append(
                    _Piece(None, (self._region_id(item.get("index"), num_regions),), frozenset(), trainable)
                )
            else:
                if slot is None:
                    raise ValueError("the conversation has an image item but no image was given")
                pieces.extend(self._image_block(slot))
        pieces.append(_Piece(T.IM_END, (), frozenset(), trainable))
        pieces.append(_Piece("\n", (), frozenset(), False))
        return pieces

    def _place_image(self, messages: list[dict[str, Any]], slot: ImageSlot | None) -> list[dict[str, Any]]:
        images = [
            (i, j)
            for i, m in enumerate(messages)
            for j, item in enumerate(m["content"])
            if item["type"] == "image"
        ]
        if len(images) > 1:
            raise ValueError(f"expected at most one image per conversation, got {len(images)}")
        if images and messages[images[0][0]]["role"] != "user":
            raise ValueError("the image must be part of a user message")
        if slot is None or images:
            return messages
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        placed = [dict(m) for m in messages]
        placed[first_user]["content"] = [{"type": "image"}, *placed[first_user]["content"]]
        return placed

    def _described_block(self, texts: Sequence[str]) -> list[_Piece]:
        pieces = []
        for i, text in enumerate(texts):
            pieces += [_Piece(None, (self.ids[T.region_token(i)],), frozenset(), False)]
            pieces += [_Piece(text, (), self._forbid_user, False)]
        return [*pieces, _Piece("\n", (), frozenset(), False)]

    def encode(
        self,
        messages: Any,
        image: ImageSlot | None = None,
        *,
        add_generation_prompt: bool = True,
        region_texts: Sequence[str] | None = None,
    ) -> EncodedChat:
        """Token ids and trainable mask of a conversation (see module docstring); ``region_texts``:
        regions described in words (no image)."""
        normalized = self._place_image(normalize_messages(messages), image)
        if region_texts is not None and image is not None:
            raise ValueError("region_texts describe the regions of a conversation without an image, got both")
        num_regions = image.num_regions if image is not None else len(region_texts or ())
        if num_regions > self.max_regions:
            raise ValueError(f"expected at most {self.max_regions} boxes, got {num_regions}")
        pieces: list[_Piece] = []
        if normalized[0]["role"] != "system" and self.system_prompt is not None:
            system = {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}
            pieces += self._message_pieces(system, None, 0)
        first_user = next(i for i, m in enumerate(normalized) if m["role"] == "user")
        for i, message in enumerate(normalized):
            message_pieces = self._message_pieces(message, image, num_regions)
            if i == first_user and region_texts:  # after the turn's header
                message_pieces[1:1] = self._described_block(region_texts)
            pieces += message_pieces
        if add_generation_prompt and normalized[-1]["role"] != "assistant":
            pieces.append(_Piece(f"{T.IM_START}assistant\n", (), frozenset(), False))
        return self._assemble(pieces)

    def _assemble(self, pieces: list[_Piece]) -> EncodedChat:
        input_ids: list[int] = []
        trainable: list[bool] = []
        run: list[_Piece] = []

        def flush() -> None:
            if run:
                ids = self.encode_text([(p.text or "", p.forbidden) for p in run])
                input_ids.extend(ids)
                trainable.extend([run[0].trainable] * len(ids))
                run.clear()

        for piece in pieces:
            if piece.text is None:
                flush()
                input_ids.extend(piece.ids)
                trainable.extend([piece.trainable] * len(piece.ids))
            else:
                if run and run[0].trainable != piece.trainable:
                    flush()
                run.append(piece)
        flush()
        return EncodedChat(input_ids=input_ids, trainable=trainable)
