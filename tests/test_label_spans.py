"""model.label_spans: the asked label at every position, against a token-by-token reference."""

from __future__ import annotations

import pytest
import torch

from vlm_fo1.model.label_spans import LabelSpanState, track_label_spans

OPEN, CLOSE = 1, 2


def _reference(ids: list[int], embeddings: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """Token by token: the label is the RMS-normalised mean of the latest non-empty closed span."""
    labels, has = torch.zeros_like(embeddings), []
    inside, span, current = False, [], None
    for t, token in enumerate(ids):
        if token == OPEN:
            inside, span = True, []
        elif token == CLOSE:
            if inside and span:
                mean = torch.stack(span).mean(0)
                current = mean / mean.pow(2).mean().sqrt()
            inside, span = False, []
        elif inside:
            span.append(embeddings[t])
        if current is not None:
            labels[t] = current
        has.append(current is not None)
    return labels, has


def test_hand_written_sequence():
    # <g> a b </g> x <g> </g> y </g> <g> c      (an empty span and a stray close change nothing)
    ids = torch.tensor([[OPEN, 10, 11, CLOSE, 12, OPEN, CLOSE, 13, CLOSE, OPEN, 14]])
    emb = torch.randn(1, ids.shape[1], 6, generator=torch.Generator().manual_seed(0))
    labels, has, state = track_label_spans(ids, emb, OPEN, CLOSE)
    mean = emb[0, 1:3].mean(0)
    expected = mean / mean.pow(2).mean().sqrt()
    assert has[0].tolist() == [False] * 3 + [True] * 8
    torch.testing.assert_close(labels[0, 3:], expected.expand(8, -1))
    assert labels[0, :3].abs().sum() == 0
    assert state.inside.tolist() == [True] and state.span_count.tolist() == [1.0]
    torch.testing.assert_close(state.span_sum[0], emb[0, 10])
    torch.testing.assert_close(state.label[0], expected)


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_read_whole_or_in_chunks_match_the_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, length, width = 3, 40, 5
    ids = torch.randint(0, 7, (batch, length), generator=generator)  # 1 and 2 are the tags
    emb = torch.randn(batch, length, width, generator=generator)
    labels, has, _ = track_label_spans(ids, emb, OPEN, CLOSE)
    for b in range(batch):
        expected, expected_has = _reference(ids[b].tolist(), emb[b])
        assert has[b].tolist() == expected_has
        torch.testing.assert_close(labels[b], expected, rtol=1e-5, atol=1e-5)
    # The same tokens in chunks of random sizes (1 = cached decoding), the state carried between.
    cuts = sorted(torch.randperm(length - 1, generator=generator)[:8].add(1).tolist())
    state, pieces = None, []
    for start, stop in zip([0, *cuts], [*cuts, length], strict=True):
        chunk_labels, _, state = track_label_spans(ids[:, start:stop], emb[:, start:stop], OPEN, CLOSE, state)
        pieces.append(chunk_labels)
    torch.testing.assert_close(torch.cat(pieces, dim=1), labels, rtol=1e-5, atol=1e-5)


def test_state_starts_empty_and_shapes_are_checked():
    state = LabelSpanState.empty(2, 4, torch.device("cpu"))
    assert not state.inside.any() and not state.has_label.any() and state.label.shape == (2, 4)
    with pytest.raises(ValueError, match="must share"):
        track_label_spans(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, 5), OPEN, CLOSE)
