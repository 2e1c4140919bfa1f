"""The asked label for the region pointer's query (``FO1Config.region_pointer_label``).

At every position the pointer may add the *label* of the latest closed ``<ground>…</ground>``
span before it: the mean input embedding of the span's tokens, RMS-normalised. A detection answer
``<ground>red circle</ground><objects><region3>…`` then points at regions with a query that holds
the words it was asked about, not only the hidden state that must carry them.

``track_label_spans`` reads a chunk of token ids with the state left by the chunks before it, so
a prompt read at once and the same tokens read one by one (cached decoding) give the same labels.
Spans do not nest: an opening tag inside a span restarts it; a closing tag outside a span and an
empty span leave the label unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LabelSpanState(NamedTuple):
    """What the tokens read so far leave for the next chunk, per sample.

    span_sum ``(B, D)`` / span_count ``(B,)``: embeddings summed / tokens counted since the
    opening tag of the span being read (zero outside a span); inside ``(B,)`` bool: a span is
    open; label ``(B, D)``: the latest closed span's label; has_label ``(B,)`` bool.
    """

    span_sum: torch.Tensor
    span_count: torch.Tensor
    inside: torch.Tensor
    label: torch.Tensor
    has_label: torch.Tensor

    @classmethod
    def empty(cls, batch: int, width: int, device: torch.device) -> LabelSpanState:
        """The state before any token (float32 sums)."""
        zeros = torch.zeros(batch, width, device=device)
        flags = torch.zeros(batch, dtype=torch.bool, device=device)
        return cls(zeros, torch.zeros(batch, device=device), flags, zeros.clone(), flags.clone())


def unit_rms(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` ``(..., D)`` scaled to root-mean-square 1 along the last axis (a label's form)."""
    return vectors * vectors.pow(2).mean(dim=-1, keepdim=True).clamp(min=1e-12).rsqrt()


def _latest(flags: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` index of the latest True at or before each position, -1 where none."""
    positions = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    return torch.where(flags, positions, -1).cummax(dim=1).values


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, T, ...)`` gathered at ``index`` ``(B, T)`` (indexes ≥ 0)."""
    index = index.clamp(min=0)
    if values.dim() == 2:
        return values.gather(1, index)
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def track_label_spans(
    input_ids: torch.Tensor,
    embeddings: torch.Tensor,
    open_id: int,
    close_id: int,
    state: LabelSpanState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, LabelSpanState]:
    """The label at every position of a chunk, and the state after it.

    Args:
        input_ids: ``(B, T)`` the chunk's token ids.
        embeddings: ``(B, T, D)`` their input embeddings.
        open_id / close_id: ids of ``<ground>`` and ``</ground>``.
        state: left by the previous chunk (None: the chunk starts the sequence).

    Returns:
        labels ``(B, T, D)`` float32 (zero where none), has_label ``(B, T)`` bool, the new state.
    """
    if input_ids.shape != embeddings.shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and embeddings {tuple(embeddings.shape)} "
            "must share (batch, length)"
        )
    batch, length, width = embeddings.shape
    if state is None:
        state = LabelSpanState.empty(batch, width, embeddings.device)
    opens, closes = input_ids == open_id, input_ids == close_id
    markers = opens | closes
    last_marker = _latest(markers)  # (B, T), at or before t
    marker_before = torch.cat([last_marker.new_full((batch, 1), -1), last_marker[:, :-1]], dim=1)
    inside_before = torch.where(  # a span is open just before t
        marker_before >= 0, _at(opens, marker_before), state.inside[:, None].expand(-1, length)
    )
    content = (inside_before & ~markers).float()[..., None]  # (B, T, 1)
    weighted = torch.cat([embeddings.float(), torch.ones_like(content)], dim=-1) * content
    cumulative = weighted.cumsum(dim=1)  # (B, T, D + 1): content embeddings summed, and counted
    carried = torch.cat([state.span_sum, state.span_count[:, None]], dim=-1)[:, None, :]
    last_open = _latest(opens)
    span = torch.where(  # the open span's totals up to t (opened in this chunk or before it)
        (last_open >= 0)[..., None], cumulative - _at(cumulative, last_open), carried + cumulative
    )
    span_sums, span_counts = span[..., :-1], span[..., -1]
    sets = closes & inside_before & (span_counts > 0)  # a non-empty span closes here
    means = unit_rms(span_sums / span_counts.clamp(min=1)[..., None])
    last_set = _latest(sets)
    found = (last_set >= 0)[..., None]
    labels = torch.where(found, _at(means, last_set), state.label[:, None, :])
    has_label = torch.where(found[..., 0], True, state.has_label[:, None].expand(-1, length))

    inside = torch.where(last_marker[:, -1] >= 0, _at(opens, last_marker)[:, -1], state.inside)
    keep = inside.float()
    new_state = LabelSpanState(
        span_sum=span_sums[:, -1] * keep[:, None],
        span_count=span_counts[:, -1] * keep,
        inside=inside,
        label=labels[:, -1],
        has_label=has_label[:, -1],
    )
    return labels * has_label[..., None], has_label, new_state
