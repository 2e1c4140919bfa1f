"""Ranked retrieval: how likely the model is to name each candidate region first for a label.

A grounded answer about ``label`` starts ``<ground>label</ground><objects>``; the token after
that prefix is the first region the model names. Its probability for every ``<regionN>`` of the
image, read from one forward pass over the prompt plus that prefix (teacher-forced; nothing is
generated), scores *every* candidate box, not only the ones greedy decoding emits::

    p_rank(N | label) = softmax(logits after "<ground>label</ground><objects>")[<regionN>]

COCO AP rewards a complete ranking, so ``vlm-fo1 eval --ranked`` reports the detection mAP of
this ranking (``detection/mAP@ranked``; ``@ranked_product`` multiplies by the proposal score)
next to the mAP of the generated answers. The release has no such mode; it is an addition. The
mass for a class with several instances is shared among them, so the values rank boxes but are
not probabilities that a box holds the class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_fo1.decoding import label_spellings
from vlm_fo1.prompting import templates as P
from vlm_fo1.prompting.tokens import GROUND_CLOSE, GROUND_OPEN, OBJECTS_OPEN

ENCODER_INPUTS = ("pixel_values", "aux_pixel_values", "region_boxes_vit", "region_boxes_aux")
"""Batch keys that only the encoders read: cached encodings replace them (the rest still gives
positions and the placement of image and region tokens)."""


def _label_ids(tokenizer: Any, label: str) -> list[int]:
    """Token ids of ``label`` (:func:`label_spellings`); refuses labels that spell an added (FO1 or
    chat) token."""
    ids = label_spellings(tokenizer, [label])[0]
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    smuggled = [tokenizer.convert_ids_to_tokens(i) for i in ids if i in added]
    if smuggled:
        raise ValueError(f"a label must be plain text, got {label!r} with special tokens {smuggled}")
    return ids


def _check_query(labels: Sequence[str], boxes: int) -> None:
    """ValueError for labels given as one string or a query without candidate boxes."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of strings, got the string {labels!r}")
    if boxes == 0:
        raise ValueError("ranking needs at least one candidate box, got none")


def rank_batch(
    model: Any, processor: Any, batch: Any, labels: Sequence[str], **encodings: Any
) -> dict[str, list[float]]:
    """``{label: [p_rank(N | label) for each region N]}`` for a one-sample generation batch.

    Args:
        model: an ``FO1ForConditionalGeneration`` in eval mode.
        processor: its ``FO1Processor``.
        batch: ``processor(conversation, images=…, boxes=…)`` for one sample (on the model's
            device), ending with the assistant header.
        labels: the labels to rank the regions for (one forward pass of the language model each;
            the encoders run once).
        encodings: cached ``image_encoding`` / ``region_tokens`` (the ``Predictor``); without them
            they are computed from the batch (``encode_sample``) once for every label.

    Raises:
        ValueError: a batch of more than one sample or without regions, a label that is empty or
            spells a special token.
    """
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"ranking takes one sample, got a batch of {batch['input_ids'].shape[0]}")
    count = int(batch["region_counts"][0]) if "region_counts" in batch else 0
    _check_query(labels, count)
    tokenizer = processor.tokenizer
    label_ids = {label: _label_ids(tokenizer, label) for label in labels}
    device = batch["input_ids"].device
    length = batch["input_ids"].shape[1]
    region_ids = torch.tensor(processor.region_token_ids[:count], device=device)
    head = tokenizer.encode(GROUND_OPEN, add_special_tokens=False)
    tail = tokenizer.encode(GROUND_CLOSE + OBJECTS_OPEN, add_special_tokens=False)
    if not encodings:
        with torch.no_grad():
            image_encoding, region_tokens = model.encode_sample(batch)
        encodings = {"image_encoding": image_encoding, "region_tokens": region_tokens}
    base = {k: v for k, v in batch.items() if k not in ENCODER_INPUTS}
    out: dict[str, list[float]] = {}
    for label, ids in label_ids.items():
        prefix = torch.tensor([head + ids + tail], device=device)  # (1, P)
        inputs = dict(base)
        for key, value in base.items():  # every per-token tensor grows by the prefix
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length):
                fill = {"input_ids": prefix, "attention_mask": torch.ones_like(prefix)}.get(
                    key, torch.zeros_like(prefix)
                )
                inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        with torch.no_grad():
            logits = model(**inputs, **encodings).logits[0, -1].float()  # (V,)
        out[label] = logits.softmax(-1)[region_ids].tolist()
    return out


def rank_regions(
    model: Any,
    processor: Any,
    conversation: list[dict[str, Any]],
    image: str | Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
) -> dict[str, list[float]]:
    """:func:`rank_batch` for one image, its candidate boxes (original pixels, xyxy) and the user
    turn(s) the answer follows.

    Raises:
        ValueError: no boxes, or a bad label (see :func:`rank_batch`).
    """
    batch = processor([conversation], images=[image], boxes=[list(boxes)])
    return rank_batch(model, processor, batch.to(next(model.parameters()).device), labels)


@dataclass(frozen=True)
class RankQuery:
    """One image's question for :func:`rank_queries`: the user turn(s), the image, its candidate
    boxes (original pixels, xyxy) and the labels to rank them for."""

    conversation: list[dict[str, Any]]
    image: str | Path | Image.Image
    boxes: Sequence[Sequence[float]]
    labels: Sequence[str]


def rank_queries(model: Any, processor: Any, queries: Sequence[RankQuery]) -> list[dict[str, list[float]]]:
    """:func:`rank_regions` for many queries in one forward pass: one row per (query, label),
    each the prompt followed by its answer prefix, left-padded so that every row ends at the
    prefix's last token (only that position's logits are computed). The same numbers as one
    :func:`rank_regions` call per query, within float tolerance.

    Raises:
        ValueError: a query without boxes, or a bad label (see :func:`rank_batch`).
    """
    tokenizer = processor.tokenizer
    head = tokenizer.encode(GROUND_OPEN, add_special_tokens=False)
    tail = tokenizer.encode(GROUND_CLOSE + OBJECTS_OPEN, add_special_tokens=False)
    rows = []  # (query index, label, answer prefix ids)
    for i, query in enumerate(queries):
        _check_query(query.labels, len(query.boxes))
        rows += [(i, label, head + _label_ids(tokenizer, label) + tail) for label in query.labels]
    out: list[dict[str, list[float]]] = [{} for _ in queries]
    if not rows:
        return out
    batch = processor(
        [queries[i].conversation for i, _, _ in rows],
        images=[queries[i].image for i, _, _ in rows],
        boxes=[list(queries[i].boxes) for i, _, _ in rows],
    )  # left-padded: row r's tokens are its last lengths[r]
    device = next(model.parameters()).device
    length = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(1).tolist()
    width = max(n + len(prefix) for n, (_, _, prefix) in zip(lengths, rows, strict=True))
    inputs = dict(batch)
    for key, value in batch.items():  # every per-token tensor: re-padded with the prefix appended
        if key in ENCODER_INPUTS or not (torch.is_tensor(value) and value.shape == (len(rows), length)):
            continue
        pad = tokenizer.pad_token_id if key == "input_ids" else 0
        grown = value.new_full((value.shape[0], width), pad)
        for r, (n, (_, _, prefix)) in enumerate(zip(lengths, rows, strict=True)):
            fill = {"input_ids": prefix, "attention_mask": [1] * len(prefix)}.get(key, [0] * len(prefix))
            grown[r, width - n - len(prefix) :] = torch.cat([value[r, length - n :], value.new_tensor(fill)])
        inputs[key] = grown
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        probs = model(**inputs, logits_to_keep=1).logits[:, -1].float().softmax(-1)  # (R, V)
    counts = batch["region_counts"].tolist()
    for r, (i, label, _) in enumerate(rows):
        out[i][label] = probs[r, processor.region_token_ids[: counts[r]]].tolist()
    return out


@dataclass(frozen=True)
class LabelReading:
    """Whether a model's first-region ranking follows the asked label (see :func:`label_reading`).

    Attributes:
        questions: detection questions measured.
        asked: mean share of the ranking's mass on the asked label's true regions.
        swapped: the same share when prompt and answer prefix name another class instead.
        uniform: the share a uniform ranking gives (true regions / candidates).
    """

    questions: int
    asked: float
    swapped: float
    uniform: float


def label_reading(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    image_root: str | Path | None,
    classes: Sequence[str],
    *,
    seed: int = 0,
) -> LabelReading:
    """Rank each positive single-class detection record's regions twice: asked for its class
    (``P.detect(label)`` and ``<ground>label</ground>…``) and asked for another class drawn from
    ``classes`` (seeded); compare the mass on the asked class's true regions
    (``meta["target_regions"]``). A model that reads the question has ``asked > swapped``; one that
    scores regions without it has ``asked == swapped``.

    Raises:
        ValueError: fewer than two classes, or no record to measure.
    """
    if len(set(classes)) < 2:
        raise ValueError(f"expected at least two classes to swap between, got {list(classes)}")
    rng = random.Random(seed)
    asked, swapped, uniform = [], [], []
    for record in records:
        meta = record.meta
        if meta.get("task") != "detection" or meta.get("negative") or len(meta.get("classes", ())) != 1:
            continue
        label = meta["classes"][0]
        truth = meta.get("target_regions", {}).get(label)
        if not truth or len(record.boxes) < 2:
            continue
        other = rng.choice(sorted(set(classes) - {label}))
        image = record.image_path(image_root)
        device = next(model.parameters()).device
        encodings: dict[str, Any] = {}
        shares = []
        for name in (label, other):  # two prompts about one image: the encoders run once
            batch = processor(
                [[{"role": "user", "content": P.detect(name)}]], images=[image], boxes=[record.boxes]
            )
            batch = batch.to(device)
            if not encodings:
                image_encoding, region_tokens = model.encode_sample(batch)
                encodings = {"image_encoding": image_encoding, "region_tokens": region_tokens}
            ranks = rank_batch(model, processor, batch, [name], **encodings)[name]
            shares.append(sum(ranks[i] for i in truth) / max(sum(ranks), 1e-12))
        asked.append(shares[0])
        swapped.append(shares[1])
        uniform.append(len(truth) / len(record.boxes))
    if not asked:
        raise ValueError("no positive single-class detection record with target regions to measure")
    n = len(asked)
    return LabelReading(n, sum(asked) / n, sum(swapped) / n, sum(uniform) / n)
