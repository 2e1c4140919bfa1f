"""Answer losses of the region tokens: up-weighting, and the order-free set loss.

An answer names its boxes in increasing index order (``<objects><region2><region7></objects>``).
Plain next-token cross-entropy then trains "region 2, not region 7" at the first position and
"region 7, not region 2" at the second, although both are right answers to "which box next":
the order is a fact about the indexes, not about the boxes' content, and a content-based
pointer cannot follow it. :func:`region_token_loss` with ``set_targets=True`` trains each region
position on the set of boxes still to be named instead (the target and the regions after it in
the same run of region targets): ``-log Σ_{r ∈ remaining} p(r)``. Boxes already named in the
run are left out of the softmax there and at the position after the run (the ``</objects>``
target), as the constrained decoder forbids naming a box twice (``GroundingConstraint``): the
model is trained on the choices it will be offered, so it learns to name each matching box once,
in any order, and ``</objects>`` once none remains (what ``stop_by_mass`` decoding then reads).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def region_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    token_ids: Sequence[int],
    weight: float = 1.0,
    *,
    set_targets: bool = False,
    close_id: int | None = None,
    close_weight: float = 1.0,
) -> torch.Tensor:
    """Next-token cross-entropy where targets in ``token_ids`` count ``weight`` times (and
    ``close_id`` targets ``close_weight`` times).

    Args:
        logits: ``(B, L, V)``; position t predicts ``labels[:, t + 1]``.
        labels: ``(B, L)`` with -100 where nothing is trained.
        token_ids: the region token ids (``<regionN>``).
        weight: their weight (1: the usual mean over trained tokens).
        set_targets: train each region target on the set of regions still to be named in its
            run of consecutive region targets, with the regions named before it (and, at the
            position after the run, all of the run's) out of the softmax (module docstring),
            instead of the one listed next against every token.
        close_id / close_weight: the ``</objects>`` id and its targets' weight. Inside
            ``<objects>`` each position makes one choice, another region or ``</objects>``; with
            the regions up-weighted and the close not, the loss favours naming one more region
            (a negative's answer is the close alone).
    Returns:
        the weighted mean, a scalar (0 when no token is trained).
    """
    targets = labels[:, 1:].to(logits.device)  # (B, L-1)
    scores = logits[:, :-1].float()  # (B, L-1, V)
    special = torch.isin(targets, torch.tensor(list(token_ids), device=targets.device))
    losses = F.cross_entropy(scores.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    if set_targets and bool(special.any()):
        losses = losses.index_put(*_set_and_close_losses(scores, targets, special))
    weights = (targets != -100).float() * torch.where(special, float(weight), 1.0)
    if close_id is not None and close_weight != 1.0:
        weights = torch.where(targets == close_id, weights * float(close_weight), weights)
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def _runs(special: torch.Tensor) -> torch.Tensor:
    """``(B, L-1)`` id of the run of consecutive region targets each position belongs to."""
    previous = F.pad(special[:, :-1], (1, 0), value=False)
    return torch.cumsum((special & ~previous).flatten(), 0).view_as(special)


def _set_and_close_losses(
    scores: torch.Tensor, targets: torch.Tensor, special: torch.Tensor
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The losses that replace plain cross-entropy under ``set_targets``: ``((rows, cols), values)``.

    At each region target ``-log Σ p(r)`` over the regions still to be named in its run, and at
    the position after a run plain cross-entropy; both with the regions named earlier in the run
    at ``-inf``. Only those positions' score rows are copied (``(q, V)``), not the whole
    ``scores`` ``(B, L-1, V)``: at a real vocabulary that copy would double the loss's memory.
    """
    run = _runs(special)
    rows, cols = special.nonzero(as_tuple=True)  # (n,) the region targets, row-major
    runs, member = run[rows, cols], targets[rows, cols]  # their run, the region listed there
    last = special & ~F.pad(special[:, 1:], (0, 1), value=False)
    last_rows, last_cols = last.nonzero(as_tuple=True)
    inside = last_cols + 1 < special.shape[1]
    query_rows = torch.cat([rows, last_rows[inside]])  # (q,): n region targets, then the closes
    query_cols = torch.cat([cols, last_cols[inside] + 1])
    query_runs = torch.cat([runs, run[last_rows[inside], last_cols[inside]]])
    own = targets[query_rows, query_cols]  # a region listed twice is never masked where it is the target
    named = (query_runs[:, None] == runs[None, :]) & (cols[None, :] < query_cols[:, None])  # (q, n)
    named &= member[None, :] != own[:, None]
    query, earlier = named.nonzero(as_tuple=True)
    masked = scores[query_rows, query_cols].index_put(  # (q, V)
        (query, member[earlier]), scores.new_full(query.shape, float("-inf"))
    )
    n = rows.numel()
    log_probs = masked[:n].log_softmax(-1)  # (n, V)
    in_set = (runs[:, None] == runs[None, :]) & (cols[None, :] >= cols[:, None])  # later in the run
    picked = log_probs[:, member].masked_fill(~in_set, float("-inf"))  # (n, n): row i, member j
    close = F.cross_entropy(masked[n:], own[n:], ignore_index=-100, reduction="none")
    return (query_rows, query_cols), torch.cat([-torch.logsumexp(picked, dim=-1), close])
