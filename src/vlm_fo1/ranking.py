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

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from vlm_fo1.prompting.tokens import GROUND_CLOSE, GROUND_OPEN, OBJECTS_OPEN


def _label_ids(tokenizer: Any, label: str) -> list[int]:
    """Token ids of ``label``; refuses labels that spell an added (FO1 or chat) token."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a label must be non-empty text, got {label!r}")
    ids = tokenizer.encode(label.strip(), add_special_tokens=False)
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    smuggled = [tokenizer.convert_ids_to_tokens(i) for i in ids if i in added]
    if smuggled:
        raise ValueError(f"a label must be plain text, got {label!r} with special tokens {smuggled}")
    return ids


def rank_regions(
    model: Any,
    processor: Any,
    conversation: list[dict[str, Any]],
    image: str | Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
) -> dict[str, list[float]]:
    """``{label: [p_rank(N | label) for N in range(len(boxes))]}`` for one image and prompt.

    Args:
        model: an ``FO1ForConditionalGeneration`` in eval mode.
        processor: its ``FO1Processor``.
        conversation: the user turn(s) the answer follows (as for generation).
        image / boxes: the image (path or PIL) and its candidate boxes (original pixels, xyxy).
        labels: the labels to rank the regions for (one forward pass each).

    Raises:
        ValueError: no boxes, a label that is empty or spells a special token.
    """
    if not boxes:
        raise ValueError("ranking needs at least one candidate box, got none")
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of strings, got the string {labels!r}")
    tokenizer = processor.tokenizer
    label_ids = {label: _label_ids(tokenizer, label) for label in labels}
    batch = processor([conversation], images=[image], boxes=[list(boxes)])
    count = int(batch["region_counts"][0])
    device = next(model.parameters()).device
    batch = batch.to(device)
    length = batch["input_ids"].shape[1]
    region_ids = torch.tensor(processor.region_token_ids[:count], device=device)
    out: dict[str, list[float]] = {}
    for label, ids in label_ids.items():
        prefix = torch.tensor(
            [
                tokenizer.encode(GROUND_OPEN, add_special_tokens=False)
                + ids
                + tokenizer.encode(GROUND_CLOSE + OBJECTS_OPEN, add_special_tokens=False)
            ],
            device=device,
        )  # (1, P)
        inputs = dict(batch)
        for key, value in batch.items():  # every per-token tensor grows by the prefix
            if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, length):
                fill = {"input_ids": prefix, "attention_mask": torch.ones_like(prefix)}.get(
                    key, torch.zeros_like(prefix)
                )
                inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()  # (V,)
        out[label] = logits.softmax(-1)[region_ids].tolist()
    return out
