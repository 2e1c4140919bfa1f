"""The region answer losses (``training.losses``) against per-position references."""

from __future__ import annotations

import math

import torch

from vlm_fo1.training.losses import region_token_loss

REGIONS = [10, 11, 12, 13, 14]  # token ids standing for <region0>…<region4>
CLOSE, TEXT = 3, 5


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows; row 0 lists regions 3 and 1, closes, then one more run (region 4) after text;
    row 1 lists region 2 alone. Position t's logits predict ``labels[t + 1]``."""
    labels = torch.tensor(
        [
            [-100, 13, 11, CLOSE, TEXT, 14, CLOSE],
            [-100, -100, TEXT, 12, CLOSE, -100, -100],
        ]
    )
    logits = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(seed))
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
    """Loop form: a region target's loss is -log of the summed probability of it and the region
    targets after it in the same run of consecutive region targets."""
    total, norm = 0.0, 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            log_p = logits[b, t].log_softmax(-1)
            if target in REGIONS:
                members = []
                k = t + 1
                while k < labels.shape[1] and int(labels[b, k]) in REGIONS:
                    members.append(int(labels[b, k]))
                    k += 1
                loss, w = -torch.logsumexp(log_p[members], 0), weight
            else:
                loss, w = -log_p[target], 1.0
            total, norm = total + w * loss, norm + w
    return total / norm


def test_set_loss_matches_the_loop_reference():
    logits, labels = _batch()
    for weight in (1.0, 5.0):
        got = region_token_loss(logits, labels, REGIONS, weight, set_targets=True)
        torch.testing.assert_close(got, _reference(logits, labels, weight))


def test_set_loss_of_the_first_of_two_regions_is_minus_log_of_their_summed_probability():
    logits, labels = torch.zeros(1, 3, 16), torch.tensor([[-100, 13, 11]])
    logits[0, 0, 13] = logits[0, 0, 11] = math.log(7.0)  # first position: p(13) = p(11) = 7 / 28
    logits[0, 1, 11] = math.log(15.0)  # second position: p(11) = 15 / 30
    set_loss = region_token_loss(logits, labels, REGIONS, set_targets=True)
    torch.testing.assert_close(set_loss, torch.tensor((-math.log(0.5) - math.log(0.5)) / 2))
    plain = region_token_loss(logits, labels, REGIONS)
    torch.testing.assert_close(plain, torch.tensor((-math.log(0.25) - math.log(0.5)) / 2))


def test_set_loss_does_not_depend_on_the_listing_order_at_the_first_position():
    logits = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    first_set = -logits[0, 0].log_softmax(-1)[[13, 11]].logsumexp(0)  # regions 3 and 1, either order
    for order in ([13, 11], [11, 13]):
        loss = region_token_loss(logits, torch.tensor([[-100, *order]]), REGIONS, set_targets=True)
        last = -logits[0, 1].log_softmax(-1)[order[1]]  # the second position: the one left
        torch.testing.assert_close(2 * loss - last, first_set)


def test_without_lists_of_two_or_more_the_set_loss_is_the_plain_loss():
    logits, labels = _batch(1)
    single = labels.clone()
    single[0, 2] = TEXT  # every run now has one region
    torch.testing.assert_close(
        region_token_loss(logits, single, REGIONS, 3.0, set_targets=True),
        region_token_loss(logits, single, REGIONS, 3.0),
    )


def test_set_loss_is_finite_and_differentiable_with_no_region_targets():
    logits = torch.randn(1, 4, 16, requires_grad=True)
    labels = torch.tensor([[-100, TEXT, CLOSE, TEXT]])
    loss = region_token_loss(logits, labels, REGIONS, 5.0, set_targets=True)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
