"""A confidence for every detection, from the model itself and from the proposal network.

The release scores a detection ``(label, <regionN>)`` with the proposal score of box N alone
(official-release.md §7.1); the model's own belief is thrown away. Here the belief is kept: at the
generation step t that emitted the region token r_N,

    p_model = softmax(logits_t)[r_N]

the probability the model gave that very token: the raw logits of the step, before any logits
processor (``generate(..., output_logits=True, return_dict_in_generate=True)``; the processed
``output_scores`` are used when only those are kept, identical for plain greedy decoding).
Three modes turn it into the detection's score:

    "proposal":  score = s_N                 (the release's rule; s_N = 1.0 without proposal scores)
    "model":     score = p_model
    "product":   score = p_model * s_N

Only the *ranking* of detections matters to AP, so no calibration is attempted. When a region
tag of the text has no emitted token to pair with (it was spelled out of ordinary tokens, or no
probabilities were kept), ``p_model = 1.0``, so "product" falls back to "proposal".

Pairing text with tokens: the k-th ``<regionN>`` tag of the decoded text is paired with the next
emitted region token (in generation order) that names the same N, and takes the label of the
``<ground>LABEL</ground><objects>…</objects>`` segment it sits in. A ``(label, N)`` pair named
twice keeps the probability of its first emission.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_fo1.prompting.tokens import (
    GROUND_CLOSE,
    GROUND_OPEN,
    OBJECTS_CLOSE,
    OBJECTS_OPEN,
    REGION_TOKEN_PATTERN,
)

logger = logging.getLogger(__name__)

CONFIDENCE_MODES = ("proposal", "model", "product")
_SEGMENT_RE = re.compile(
    rf"{re.escape(GROUND_OPEN)}(.*?){re.escape(GROUND_CLOSE)}\s*"
    rf"{re.escape(OBJECTS_OPEN)}(.*?){re.escape(OBJECTS_CLOSE)}",
    re.DOTALL,
)


@dataclass(frozen=True)
class RegionTokenProb:
    """One emitted region token: generation step, region index N of ``<regionN>``, its probability."""

    position: int
    region_index: int
    probability: float


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CONFIDENCE_MODES`, else ``ValueError``."""
    if mode not in CONFIDENCE_MODES:
        raise ValueError(f"confidence must be one of {list(CONFIDENCE_MODES)}, got {mode!r}")
    return mode


def region_token_probabilities(
    generated_ids: torch.Tensor, step_scores: Sequence[torch.Tensor], region_token_ids: Sequence[int]
) -> list[list[RegionTokenProb]]:
    """Per sample, every emitted region token with its probability.

    Args:
        generated_ids: ``(B, T)`` new tokens only (prompt removed).
        step_scores: T tensors ``(B, V)``: the logits of each generation step.
        region_token_ids: token id of ``<region{i}>`` at position i.

    Returns:
        ``B`` lists of :class:`RegionTokenProb` in generation order.

    Raises:
        ValueError: when the number of steps or the batch size disagree.
    """
    if generated_ids.dim() != 2:
        raise ValueError(f"generated_ids must be (B, T), got shape {tuple(generated_ids.shape)}")
    batch, steps = generated_ids.shape
    if len(step_scores) != steps:
        raise ValueError(
            f"expected one score tensor per generated token: {steps} tokens, {len(step_scores)} steps"
        )
    index_of = {int(token): i for i, token in enumerate(region_token_ids)}
    result: list[list[RegionTokenProb]] = [[] for _ in range(batch)]
    if not steps:
        return result
    ids = generated_ids.to(step_scores[0].device)
    probs = []
    for t, logits in enumerate(step_scores):  # (B, V) each; one step at a time keeps memory small
        if logits.shape[0] != batch:
            raise ValueError(
                f"step {t}: expected scores for {batch} samples, got shape {tuple(logits.shape)}"
            )
        step = torch.softmax(logits.float(), dim=-1).gather(1, ids[:, t : t + 1])  # (B, 1)
        probs.append(step)
    table = torch.cat(probs, dim=1).cpu()  # (B, T)
    for row, token_row in enumerate(generated_ids.tolist()):
        for t, token in enumerate(token_row):
            if token in index_of:
                result[row].append(RegionTokenProb(t, index_of[token], float(table[row, t])))
    return result


def detection_probabilities(
    text: str, emitted: Sequence[RegionTokenProb] | None
) -> dict[tuple[str, int], float]:
    """``{(label, N): p_model}`` for the grounded regions of ``text`` (see the module docstring).

    ``label`` is the segment's label stripped of surrounding space, as
    :func:`vlm_fo1.prompting.parse` reads it. Pairs without an emitted token are left out (the
    caller uses 1.0).
    """
    if not emitted:
        return {}
    tags = [(m.start(), int(m.group(1))) for m in REGION_TOKEN_PATTERN.finditer(text)]
    paired: dict[int, float] = {}  # text position -> probability
    cursor = 0
    for position, index in tags:
        for j in range(cursor, len(emitted)):
            if emitted[j].region_index == index:
                paired[position] = emitted[j].probability
                cursor = j + 1
                break
    result: dict[tuple[str, int], float] = {}
    for segment in _SEGMENT_RE.finditer(text):
        label = segment.group(1).strip()
        start, end = segment.span(2)
        for position, index in tags:
            if start <= position < end and position in paired:
                result.setdefault((label, index), paired[position])
    return result


def join_answers(
    parts: Sequence[tuple[str, Sequence[RegionTokenProb] | None]],
) -> tuple[str, list[RegionTokenProb]]:
    """Answers to separate questions as one answer: ``(text, emitted region tokens)`` pairs joined
    in order. :func:`detection_probabilities` pairs tags with tokens in order, so every tag of the
    joined text keeps the probability it had in its own answer (missing tokens: none)."""
    text = "".join(part_text for part_text, _ in parts)
    return text, [p for _, emitted in parts for p in (emitted or ())]


def detection_confidence(mode: str, model_probability: float | None, proposal_score: float | None) -> float:
    """The score of one detection under ``mode`` (None inputs count as 1.0)."""
    p = 1.0 if model_probability is None else float(model_probability)
    s = 1.0 if proposal_score is None else float(proposal_score)
    check_mode(mode)
    if mode == "proposal":
        return s
    if mode == "model":
        return p
    return p * s
