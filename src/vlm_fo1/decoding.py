"""Constrained decoding: the model may only name boxes that exist, in a well-formed answer.

:class:`GroundingConstraint` is a transformers ``LogitsProcessor``. At every generation step it
sets the logits of forbidden tokens to ``-inf``, per sample, following a small state machine over
the answer grammar ``… <ground>LABEL</ground><objects><regionA><regionB>…</objects> …``:

- *outside* a segment: any text token, the end of turn, ``<ground>``; region tokens only with
  ``free_region_mentions`` (reasoning, free questions);
- *in* ``<ground>``: text tokens, and ``</ground>`` once the label holds a non-blank token; with
  ``labels`` (detection, counting) only a continuation of one of the given label spellings, and
  ``</ground>`` once a whole label is spelled;
- *after* ``</ground>``: ``<objects>`` only;
- *in* ``<objects>``: ``<regionN>`` with ``N <`` this sample's box count (each at most once per
  group), or ``</objects>``; with ``suppress_overlap``, not a box whose IoU with a box already
  named in the group exceeds it (see below); with ``stop_by_mass``, one side only: ``</objects>``
  or the regions, whichever holds more probability in total (see below); ``close_bias`` is added
  to the logit of ``</objects>`` here (see below);
- *finished* (the sample emitted its end-of-turn token): anything (generate pads the row).

Always forbidden: ``<regionfeat>``, chat control tokens other than the end-of-turn tokens, ids
the tokenizer does not know (padding rows of the embedding matrix), and ``<regionN>`` with ``N``
at or beyond the sample's box count. When ``max_new_tokens`` is given, an open segment is closed
in time: no ``<ground>`` is opened without room for ``LABEL</ground><objects></objects>``, and the
closing tags are forced when the budget runs out, so every answer parses without issues.

Greedy decoding compares ``</objects>`` with the single most likely region. A model that is unsure
*which* of several boxes comes next spreads the probability of "another region" over all of them,
so each loses to ``</objects>`` and the answer stops after one region even when most of the mass
says it should go on (the miniature models answer every count with 1 this way).
``stop_by_mass=True`` (not in the release) makes that decision on totals: another region when the
allowed regions' probabilities sum to more than that of ``</objects>`` (then the most likely
region, as before), otherwise ``</objects>``.

A proposal network gives several boxes for one object (jittered duplicates that the release's
NMS at IoU 0.8 leaves in), and an answer names each object once: the other boxes of the object
are wrong answers that differ from the right one by a few pixels. ``suppress_overlap=t`` (not in
the release; needs each sample's ``boxes``) applies to the answer what NMS does to detections:
once a box is named, the boxes overlapping it by IoU > t are no longer offered in that group.

Each ``<objects>`` position chooses between naming one more region and ``</objects>``, which is
where a detector's score threshold sits. ``close_bias=b`` (not in the release; 0: off) adds ``b``
to the logit of ``</objects>`` there, so greedy decoding names another region only while it is
``e^b`` times as likely as closing (``b > 0``: fewer, surer regions - fewer false positives on
absent objects and fewer duplicates; ``b < 0``: more regions). With ``stop_by_mass`` the biased
logit enters the comparison of totals. Evaluation scores the emitted regions with the raw
logits (``output_logits``), so its model probabilities do not include the bias.

An answer grounds each asked label in one segment (the release's parser unions repeated labels,
so a second segment of a label adds nothing but its regions). ``unique_labels=True`` (not in the
release; only with ``labels``) keeps a label that a closed ``</ground>`` already spelled out of
later ``<ground>`` segments of the answer, and no ``<ground>`` opens once every label is used: a
multi-class answer that would write one label twice must write another or end.

A counting answer lists the objects and then writes their number
(``<ground>stars</ground><objects><region0><region3></objects>2``), and a model can write a number
other than the length of its own list. ``count_from_list=True`` (not in the release) makes a
number written right after ``</objects>`` spell the count of distinct regions the answer has
named so far: digit tokens there may only continue that count's decimal spelling, and once a
digit is written the count must be finished. Nothing else changes (the answer may still write no
number, or text).

When the tokenizer does not hold the four grounding tags as single tokens, the grammar part is
switched off (with a warning) and only the region-range and placeholder rules apply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vlm_fo1.boxes import box_iou
from vlm_fo1.prompting import tokens as T

logger = logging.getLogger(__name__)

# Byte-level BPE (Qwen) spells the whitespace bytes 9-13 and 32 as chr(256 + byte); "▁" is SentencePiece's space.
_BLANK_CHARS = frozenset(chr(256 + b) for b in (9, 10, 11, 12, 13, 32)) | frozenset(" \t\n\r\x0b\x0c▁")
_DIGITS = frozenset("0123456789")

OUTSIDE, IN_GROUND, AFTER_GROUND, IN_OBJECTS, FINISHED = range(5)
# Tokens still needed to close a segment from each state: `LABEL </ground> <objects> </objects>`.
_TO_CLOSE_EMPTY_LABEL = 4
_TO_CLOSE_LABEL = 3


@dataclass(frozen=True)
class GrammarVocabulary:
    """The token ids the constraint needs, read once from a processor's tokenizer.

    Attributes:
        region_ids: id of ``<region{i}>`` at position i.
        region_feature_id: id of ``<regionfeat>``.
        tags: ids of ``<ground>``, ``</ground>``, ``<objects>``, ``</objects>``; None when any of
            them is not a single token (grammar off).
        end_ids: end-of-turn ids (``<|im_end|>``, ``<|endoftext|>``).
        banned_ids: chat control ids that may never be generated.
        other_special_ids: ``<think>``-style tags, allowed outside segments but not in labels.
        blank_ids: tokens that spell only whitespace (they do not make a label non-empty).
        vocab_size: ids at or above this are never allowed.
        digit_ids: ``(id, digits)`` of every token that spells only ASCII digits.
    """

    region_ids: tuple[int, ...]
    region_feature_id: int
    tags: tuple[int, int, int, int] | None
    end_ids: tuple[int, ...]
    banned_ids: tuple[int, ...]
    other_special_ids: tuple[int, ...]
    blank_ids: frozenset[int]
    vocab_size: int
    digit_ids: tuple[tuple[int, str], ...] = ()

    @classmethod
    def from_processor(cls, processor: Any) -> GrammarVocabulary:
        """Read the ids from an ``FO1Processor`` (its tokenizer and region token ids)."""
        tokenizer = processor.tokenizer
        vocab: dict[str, int] = tokenizer.get_vocab()
        tag_ids = [vocab.get(tag) for tag in T.GROUNDING_TAGS]
        tags = None
        if any(i is None for i in tag_ids):
            missing = [tag for tag, i in zip(T.GROUNDING_TAGS, tag_ids, strict=True) if i is None]
            logger.warning(
                "grounding tags %s are not single tokens: only region ranges are constrained", missing
            )
        else:
            tags = (int(tag_ids[0]), int(tag_ids[1]), int(tag_ids[2]), int(tag_ids[3]))
        end_ids = tuple(vocab[t] for t in (T.IM_END, T.END_OF_TEXT) if t in vocab)
        banned = tuple(vocab[t] for t in T.CHAT_CONTROL_TOKENS if t in vocab and vocab[t] not in end_ids)
        other = tuple(vocab[t] for t in T.REASONING_TAGS if t in vocab)
        blank = frozenset(i for token, i in vocab.items() if token and set(token) <= _BLANK_CHARS)
        digits = tuple(sorted((i, token) for token, i in vocab.items() if token and set(token) <= _DIGITS))
        return cls(
            region_ids=tuple(int(i) for i in processor.region_token_ids),
            region_feature_id=int(processor.region_feature_token_id),
            tags=tags,
            end_ids=end_ids,
            banned_ids=banned,
            other_special_ids=other,
            blank_ids=blank,
            vocab_size=len(tokenizer),
            digit_ids=digits,
        )


@dataclass
class _Row:
    """Grammar state of one sample."""

    state: int = OUTSIDE
    label: list[int] = field(default_factory=list)  # token ids of the label so far
    label_started: bool = False  # a non-blank label token was emitted
    used: set[int] = field(default_factory=set)
    grounded: set[tuple[int, ...]] = field(default_factory=set)  # labels closed by </ground> so far
    named: set[int] = field(default_factory=set)  # regions named in the answer so far (every group)
    number: str | None = None  # digits written right after the latest </objects> (None: not there)


class GroundingConstraint(LogitsProcessor):
    """Mask the logits so that each sample names only its own boxes, in a well-formed answer.

    Args:
        vocabulary: ids from :meth:`GrammarVocabulary.from_processor`.
        region_counts: number of candidate boxes of each sample, ``(B,)``; ``<regionN>`` is
            allowed only for ``N < region_counts[b]``.
        free_region_mentions: allow region tokens outside ``<objects>`` (reasoning, free text).
        max_new_tokens: the generation budget; when given, open segments are closed in time.
        unique_regions: forbid naming the same region twice in one ``<objects>`` group.
        labels: token-id spellings of the allowed labels (``from_processor`` takes strings);
            None: any label text.
        row_labels: per sample, its own allowed spellings (None for a sample: any label text);
            instead of ``labels``, for a batch whose samples ask about different things.
        stop_by_mass: choose between ``</objects>`` and the regions on total probability.
        suppress_overlap: IoU above which a box is no longer offered once a box it overlaps is
            named in the group (module docstring); needs ``boxes``. None: off.
        close_bias: added to the logit of ``</objects>`` inside ``<objects>`` (module docstring).
        unique_labels: with ``labels`` / ``row_labels``, each label may open one ``<ground>``
            segment per answer (module docstring); no effect on free label text.
        count_from_list: a number written right after ``</objects>`` is the count of distinct
            regions named so far (module docstring).
        boxes: per sample, its ``(N_b, 4)`` xyxy boxes (any one coordinate frame), ``N_b`` its
            region count.

    Each step reads every row's state again from its generated tokens (only the prompt length is
    kept), so beam search (rows = samples × beams) works; a call with a sequence no longer than
    the previous one starts a new generation, so one instance may serve several ``generate`` calls.
    """

    def __init__(
        self,
        vocabulary: GrammarVocabulary,
        region_counts: Sequence[int] | torch.Tensor,
        *,
        free_region_mentions: bool = False,
        max_new_tokens: int | None = None,
        unique_regions: bool = True,
        labels: Sequence[Sequence[int]] | None = None,
        row_labels: Sequence[Sequence[Sequence[int]] | None] | None = None,
        stop_by_mass: bool = False,
        suppress_overlap: float | None = None,
        close_bias: float = 0.0,
        unique_labels: bool = False,
        count_from_list: bool = False,
        boxes: Sequence[Any] | None = None,
    ) -> None:
        counts = region_counts.tolist() if isinstance(region_counts, torch.Tensor) else list(region_counts)
        limit = len(vocabulary.region_ids)
        bad = [c for c in counts if not isinstance(c, int) or c < 0 or c > limit]
        if bad:
            raise ValueError(f"region counts must be ints in [0, {limit}], got {counts}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        self.vocabulary = vocabulary
        self.region_counts = counts
        self.free_region_mentions = free_region_mentions
        self.max_new_tokens = max_new_tokens
        self.unique_regions = unique_regions
        self.stop_by_mass = stop_by_mass
        self.unique_labels = unique_labels
        self.count_from_list = count_from_list
        self._digits = dict(vocabulary.digit_ids)
        self.close_bias = check_close_bias(close_bias)
        if labels is not None and row_labels is not None:
            raise ValueError(
                "give labels (one set for every sample) or row_labels (one per sample), not both"
            )
        if row_labels is not None and len(row_labels) != len(counts):
            raise ValueError(
                f"row_labels must have one entry per sample ({len(counts)}), got {len(row_labels)}"
            )
        self._overlaps = _overlap_sets(counts, suppress_overlap, boxes)
        per_sample = [labels] * len(counts) if row_labels is None else list(row_labels)
        self._sample_labels = [_spellings(x) for x in per_sample]
        self._region_index = {token: i for i, token in enumerate(vocabulary.region_ids)}
        self._masks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._start = 0  # prompt length of the current generation
        self._seen: int | None = None  # sequence length at the previous call

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        region_counts: Sequence[int] | torch.Tensor,
        *,
        labels: Sequence[str] | None = None,
        row_labels: Sequence[Sequence[str] | None] | None = None,
        vocabulary: GrammarVocabulary | None = None,
        **kwargs: Any,
    ) -> GroundingConstraint:
        """Build from an ``FO1Processor``, the batch's ``region_counts`` and optional label strings
        (``labels`` for every sample, or ``row_labels`` per sample)."""
        vocabulary = vocabulary if vocabulary is not None else GrammarVocabulary.from_processor(processor)
        tokenizer = processor.tokenizer
        spellings = None if labels is None else label_spellings(tokenizer, labels)
        per_row = (
            None
            if row_labels is None
            else [None if x is None else label_spellings(tokenizer, x) for x in row_labels]
        )
        return cls(vocabulary, region_counts, labels=spellings, row_labels=per_row, **kwargs)

    # -- masks -------------------------------------------------------------------------------------------
    def _base_masks(
        self, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample-independent masks ``(V,)``: allowed ``outside`` segments, ``label`` text tokens,
        and the non-blank label tokens."""
        key = (width, str(device))
        if key not in self._masks:
            v = self.vocabulary
            valid = torch.zeros(width, dtype=torch.bool, device=device)
            valid[: min(width, v.vocab_size)] = True
            never = [v.region_feature_id, *v.banned_ids, *v.region_ids]
            valid[[i for i in never if i < width]] = False
            outside, label = valid.clone(), valid.clone()
            if v.tags is not None:
                outside[[i for i in v.tags[1:] if i < width]] = False
                label[[i for i in (*v.tags, *v.end_ids, *v.other_special_ids) if i < width]] = False
            nonblank = label.clone()
            nonblank[[i for i in v.blank_ids if i < width]] = False
            self._masks[key] = (outside, label, nonblank)
        return self._masks[key]

    def _regions(self, count: int, exclude: set[int]) -> list[int]:
        ids = self.vocabulary.region_ids[:count]
        return [token for i, token in enumerate(ids) if i not in exclude]

    @staticmethod
    def _needed_after_open(labels: tuple[tuple[int, ...], ...] | None) -> int:
        """Tokens needed after ``<ground>`` to close the segment: a label, then three tags."""
        shortest = 1 if labels is None else min(len(x) for x in labels)
        return shortest + _TO_CLOSE_LABEL

    def _allowed(
        self,
        count: int,
        state: _Row,
        room: int | None,
        width: int,
        device: torch.device,
        labels: tuple[tuple[int, ...], ...] | None = None,
        overlaps: list[frozenset[int]] | None = None,
    ) -> Any:
        """Bool mask ``(V,)`` of the tokens allowed next for a row in ``state`` with ``count`` boxes
        and allowed label spellings ``labels`` (None: no constraint on labels; the returned None:
        no constraint at all); ``overlaps[i]``: the boxes suppressed once box i is named.

        ``room``: generation steps left after this one (None: no budget).
        """
        if state.state == FINISHED:
            return None
        outside, label, nonblank = self._base_masks(width, device)
        tags = self.vocabulary.tags
        if state.state == OUTSIDE or tags is None:
            allowed = outside.clone()
            if self.free_region_mentions or tags is None:
                allowed[self._regions(count, set())] = True
            if tags is not None and (
                labels == () or (room is not None and room < self._needed_after_open(labels))
            ):
                allowed[tags[0]] = False
            return allowed
        allowed = torch.zeros(width, dtype=torch.bool, device=device)
        if state.state == IN_GROUND and labels is not None:
            allowed[_label_continuations(labels, state.label, room)] = True
            if tuple(state.label) in labels:
                allowed[tags[1]] = True
        elif state.state == IN_GROUND:
            if state.label_started:
                allowed[tags[1]] = True
                if room is None or room >= _TO_CLOSE_LABEL:
                    allowed |= label
            elif room is None or room >= _TO_CLOSE_EMPTY_LABEL:
                allowed |= label  # a blank token still leaves room for a label and the closing tags
            else:
                allowed |= nonblank
        elif state.state == AFTER_GROUND:
            allowed[tags[2]] = True
        else:  # IN_OBJECTS
            if room is None or room >= 1:
                excluded = state.used if self.unique_regions else set()
                if overlaps is not None:
                    excluded = excluded.union(*(overlaps[i] for i in state.used))
                allowed[self._regions(count, excluded)] = True
            allowed[tags[3]] = True
        return allowed

    # -- state -------------------------------------------------------------------------------------------
    def _advance(self, row: _Row, token: int) -> None:
        v = self.vocabulary
        if row.state == FINISHED:
            return
        if token in v.end_ids:
            row.state = FINISHED
            return
        if v.tags is None:
            return
        ground_open, ground_close, objects_open, objects_close = v.tags
        if row.state == OUTSIDE:
            digits = self._digits.get(token)
            row.number = None if row.number is None or digits is None else row.number + digits
        if row.state == OUTSIDE and token == ground_open:
            row.state, row.label, row.label_started = IN_GROUND, [], False
        elif row.state == IN_GROUND:
            if token == ground_close:
                row.state = AFTER_GROUND
                row.grounded.add(tuple(row.label))
            else:
                row.label.append(token)
                row.label_started = row.label_started or token not in v.blank_ids
        elif row.state == AFTER_GROUND and token == objects_open:
            row.state, row.used = IN_OBJECTS, set()
        elif row.state == IN_OBJECTS:
            if token == objects_close:
                row.state, row.number = OUTSIDE, ""
            elif token in self._region_index:
                row.used.add(self._region_index[token])
                row.named.add(self._region_index[token])

    def _row_samples(self, rows: int) -> list[int]:
        """Sample index of each row; beam search repeats each sample's row ``rows / B`` times."""
        samples = len(self.region_counts)
        if rows % samples:
            raise ValueError(
                f"expected {samples} sequences (one per region count) or a multiple of that for beams, got {rows}"
            )
        return [sample for sample in range(samples) for _ in range(rows // samples)]

    def _states(self, input_ids: torch.Tensor) -> list[_Row]:
        """Grammar state of every row, read again from its generated tokens.

        Nothing is carried between steps but the prompt length, so beam search may reorder rows;
        a call with a sequence no longer than the previous one starts a new generation.
        """
        length = int(input_ids.shape[1])
        if self._seen is None or length <= self._seen:
            self._start = length
        self._seen = length
        states = []
        for tokens in input_ids[:, self._start :].tolist():
            row = _Row()
            for token in tokens:
                self._advance(row, token)
            states.append(row)
        return states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores`` ``(B, V)`` with forbidden tokens set to ``-inf`` (a new tensor)."""
        samples = self._row_samples(int(input_ids.shape[0]))
        states = self._states(input_ids)
        generated = int(input_ids.shape[1]) - self._start
        room = None if self.max_new_tokens is None else max(0, self.max_new_tokens - generated - 1)
        width = int(scores.shape[-1])
        out = scores.clone()
        for b, row in enumerate(states):
            sample = samples[b]
            labels = self._sample_labels[sample]
            if self.unique_labels and labels is not None and row.grounded:
                labels = tuple(x for x in labels if x not in row.grounded)
            allowed = self._allowed(
                self.region_counts[sample], row, room, width, scores.device, labels, self._overlaps[sample]
            )
            if allowed is not None:
                if row.state == IN_OBJECTS and self.vocabulary.tags is not None:
                    if self.close_bias:
                        out[b, self.vocabulary.tags[3]] += self.close_bias
                    if self.stop_by_mass:
                        allowed = self._by_mass(out[b], allowed)
                if self.count_from_list and row.state == OUTSIDE and row.number is not None:
                    allowed = self._count_digits(allowed, row)
                out[b] = out[b].masked_fill(~allowed, float("-inf"))
        return out

    def _count_digits(self, allowed: torch.Tensor, row: _Row) -> torch.Tensor:
        """``allowed`` ``(V,)`` with the digit tokens that do not continue the spelling of the
        row's count removed, and only those left while a started count is unfinished."""
        count, written = str(len(row.named)), row.number or ""
        digit_ids = [token for token in self._digits if token < allowed.shape[0]]
        fitting = [token for token in digit_ids if count.startswith(written + self._digits[token])]
        if written and written != count and count.startswith(written):
            finish = torch.zeros_like(allowed)
            finish[fitting] = True
            return finish
        allowed = allowed.clone()
        allowed[digit_ids] = False
        allowed[fitting] = True
        return allowed

    def _by_mass(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """``allowed`` ``(V,)`` narrowed to ``</objects>`` or to the regions, whichever side's
        probabilities (softmax of ``scores`` ``(V,)``) sum higher."""
        close = self.vocabulary.tags[3]
        regions = allowed.clone()
        regions[close] = False
        if not regions.any():
            return allowed
        if torch.logsumexp(scores[regions].float(), 0) > scores[close].float():
            return regions
        only_close = torch.zeros_like(allowed)
        only_close[close] = True
        return only_close


def constrained_processors(
    processor: Any, region_counts: Sequence[int] | torch.Tensor, **kwargs: Any
) -> LogitsProcessorList:
    """A ``LogitsProcessorList`` holding one :class:`GroundingConstraint` (pass to ``generate``).

    ``kwargs`` go to :meth:`GroundingConstraint.from_processor` (``labels``, ``free_region_mentions``,
    ``max_new_tokens``, a prebuilt ``vocabulary`` …).
    """
    return LogitsProcessorList([GroundingConstraint.from_processor(processor, region_counts, **kwargs)])


def check_suppress_overlap(value: Any) -> float | None:
    """``value`` when it is None or an IoU in [0, 1]; ValueError otherwise."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1
    ):
        raise ValueError(f"suppress_overlap must be an IoU in [0, 1] or None, got {value!r}")
    return value


def check_close_bias(value: Any) -> float:
    """``value`` as a float when it is a finite number; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"close_bias must be a finite number (a logit offset), got {value!r}")
    return float(value)


def _overlap_sets(
    counts: list[int], threshold: float | None, boxes: Sequence[Any] | None
) -> list[list[frozenset[int]] | None]:
    """Per sample, per box: the other boxes with IoU above ``threshold`` (all None when off).

    Raises:
        ValueError: a threshold outside [0, 1], no boxes for it, or box lists that do not match
            the region counts.
    """
    if check_suppress_overlap(threshold) is None:
        return [None] * len(counts)
    if boxes is None or len(boxes) != len(counts):
        raise ValueError(
            f"suppress_overlap needs one box list per sample ({len(counts)}), got "
            f"{'none' if boxes is None else len(boxes)}"
        )
    result = []
    for count, sample in zip(counts, boxes, strict=True):
        tensor = torch.as_tensor(sample, dtype=torch.float32).reshape(-1, 4)
        if tensor.shape[0] != count:
            raise ValueError(
                f"expected {count} boxes for a sample with {count} regions, got {tensor.shape[0]}"
            )
        close = box_iou(tensor, tensor) > threshold if count else torch.zeros(0, 0, dtype=torch.bool)
        close.fill_diagonal_(False)
        result.append([frozenset(row.nonzero().flatten().tolist()) for row in close])
    return result


def _spellings(labels: Sequence[Sequence[int]] | None) -> tuple[tuple[int, ...], ...] | None:
    """Distinct label spellings as tuples (None stays None); each must be a non-empty sequence."""
    if labels is None:
        return None
    spellings = tuple(dict.fromkeys(tuple(int(t) for t in x) for x in labels))
    if not spellings or not all(spellings):
        raise ValueError(f"labels must be non-empty token sequences, got {labels!r}")
    return spellings


def _label_continuations(
    labels: tuple[tuple[int, ...], ...], prefix: list[int], room: int | None
) -> list[int]:
    """Next tokens of the allowed ``labels`` that start with ``prefix`` and still fit the budget."""
    k = len(prefix)
    result = set()
    for spelling in labels:
        fits = room is None or len(spelling) - k - 1 + _TO_CLOSE_LABEL <= room
        if fits and len(spelling) > k and list(spelling[:k]) == prefix:
            result.add(spelling[k])
    return sorted(result)


def label_spellings(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label as the model writes it after ``<ground>`` (stripped, no special tokens)."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of strings, got the string {labels!r}")
    result = [tokenizer.encode(label.strip(), add_special_tokens=False) for label in labels]
    empty = [label for label, ids in zip(labels, result, strict=True) if not ids]
    if empty:
        raise ValueError(f"labels must be non-empty text, got {empty!r}")
    return result


def region_counts_of(batch: Any) -> list[int]:
    """Boxes per sample of a processor batch (zeros when the batch has no region inputs)."""
    counts = batch.get("region_counts") if hasattr(batch, "get") else None
    if counts is None:
        return [0] * int(batch["input_ids"].shape[0])
    return [int(c) for c in counts.tolist()]
