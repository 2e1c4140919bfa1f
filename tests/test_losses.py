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


def _named_before(labels: torch.Tensor, b: int, k: int) -> list[int]:
    """The regions of the run of consecutive region labels that ends just before ``labels[b, k]``."""
    named = []
    while k > 0 and int(labels[b, k - 1]) in REGIONS:
        named.append(int(labels[b, k - 1]))
        k -= 1
    return named


def _reference(
    logits: torch.Tensor, labels: torch.Tensor, weight: float, close_weight: float = 1.0
) -> torch.Tensor:
    """Loop form: a region target's loss is -log of the summed probability of it and the region
    targets after it in the same run of consecutive region targets, with the run's regions before
    it out of the softmax (and all of them at the position after the run)."""
    total, norm = 0.0, 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            scores = logits[b, t].clone()
            scores[_named_before(labels, b, t + 1)] = float("-inf")
            log_p = scores.log_softmax(-1)
            if target in REGIONS:
                members = []
                k = t + 1
                while k < labels.shape[1] and int(labels[b, k]) in REGIONS:
                    members.append(int(labels[b, k]))
                    k += 1
                loss, w = -torch.logsumexp(log_p[members], 0), weight
            else:
                loss, w = -log_p[target], close_weight if target == CLOSE else 1.0
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
    logits[0, 1, 11] = math.log(15.0)  # second position: p(11) = 15 / 30, or 15 / 29 without 13
    logits[0, 1, 13] = math.log(2.0)
    set_loss = region_token_loss(logits, labels, REGIONS, set_targets=True)
    torch.testing.assert_close(set_loss, torch.tensor((-math.log(0.5) - math.log(15 / 29)) / 2))
    plain = region_token_loss(logits, labels, REGIONS)
    torch.testing.assert_close(plain, torch.tensor((-math.log(0.25) - math.log(15 / 31)) / 2))


def test_set_loss_does_not_depend_on_the_listing_order_at_the_first_position():
    logits = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2))
    first_set = -logits[0, 0].log_softmax(-1)[[13, 11]].logsumexp(0)  # regions 3 and 1, either order
    for order in ([13, 11], [11, 13]):
        loss = region_token_loss(logits, torch.tensor([[-100, *order]]), REGIONS, set_targets=True)
        second = logits[0, 1].clone()
        second[order[0]] = float("-inf")  # named first: out of the second position's softmax
        last = -second.log_softmax(-1)[order[1]]  # the one left
        torch.testing.assert_close(2 * loss - last, first_set)


def test_without_lists_of_two_or_more_the_set_loss_is_the_plain_loss_with_the_region_out_at_the_close():
    logits, labels = _batch(1)
    single = labels.clone()
    single[0, 2] = TEXT  # every run now has one region: 13 at 0, 14 at 4, 12 at 2 (row 1)
    masked = logits.clone()
    masked[0, 1, 13] = masked[0, 5, 14] = masked[1, 3, 12] = float("-inf")  # the closing positions
    torch.testing.assert_close(
        region_token_loss(logits, single, REGIONS, 3.0, set_targets=True),
        region_token_loss(masked, single, REGIONS, 3.0),
    )


def test_set_loss_leaves_named_regions_out_at_the_close_and_keeps_a_repeated_target_finite():
    logits, labels = torch.zeros(1, 4, 16), torch.tensor([[-100, 13, 11, CLOSE]])
    logits[0, 2, 13] = logits[0, 2, 11] = 50.0  # both named already: out of the close's softmax
    loss = region_token_loss(logits, labels, REGIONS, set_targets=True)
    close_loss = -math.log(1 / 14)  # 16 tokens, two left out, all the others equal
    first, second = -math.log(2 / 16), -math.log(1 / 15)
    torch.testing.assert_close(loss, torch.tensor((first + second + close_loss) / 3))
    repeated = region_token_loss(
        torch.randn(1, 3, 16), torch.tensor([[-100, 13, 13]]), REGIONS, set_targets=True
    )
    assert torch.isfinite(repeated)


def test_set_loss_is_finite_and_differentiable_with_no_region_targets():
    logits = torch.randn(1, 4, 16, requires_grad=True)
    labels = torch.tensor([[-100, TEXT, CLOSE, TEXT]])
    loss = region_token_loss(logits, labels, REGIONS, 5.0, set_targets=True)
    (grad,) = torch.autograd.grad(loss, logits)
    plain = region_token_loss(logits, labels, REGIONS, 5.0)  # no region: the set loss is the plain one
    (plain_grad,) = torch.autograd.grad(plain, logits)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(grad, plain_grad)


def test_close_targets_count_close_weight_times_with_and_without_the_set_loss():
    logits, labels = _batch(3)
    for set_targets in (True, False):
        weighted = region_token_loss(
            logits, labels, REGIONS, 5.0, set_targets=set_targets, close_id=CLOSE, close_weight=5.0
        )
        if set_targets:
            torch.testing.assert_close(weighted, _reference(logits, labels, 5.0, close_weight=5.0))
        unweighted = region_token_loss(logits, labels, REGIONS, 5.0, set_targets=set_targets)
        assert not torch.isclose(weighted, unweighted)
    # a negative's answer (the close right after <objects>, no region) is weighted too
    negative = torch.tensor([[-100, TEXT, CLOSE]])
    row = logits[:1, :3]
    log_p = row[0].log_softmax(-1)
    expected = (-log_p[0, TEXT] - 4.0 * log_p[1, CLOSE]) / 5.0
    got = region_token_loss(row, negative, REGIONS, 5.0, set_targets=True, close_id=CLOSE, close_weight=4.0)
    torch.testing.assert_close(got, expected)
