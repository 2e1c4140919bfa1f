"""Tests for vlm_fo1.boxes: conversions, sanitising, frame changes, IoU and NMS."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision

from vlm_fo1.boxes import (
    BoxReport,
    as_box_tensor,
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    denormalize_boxes,
    match_boxes,
    nms_keep,
    normalize_boxes,
    sanitize_boxes,
    scale_boxes,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def _random_boxes(n: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> torch.Tensor:
    """Valid xyxy boxes inside an image of ``size``."""
    gen = torch.Generator().manual_seed(seed)
    width, height = size
    xy = torch.rand((n, 2), generator=gen) * torch.tensor([width * 0.8, height * 0.8])
    wh = torch.rand((n, 2), generator=gen) * torch.tensor([width * 0.2, height * 0.2]) + 1
    return torch.cat((xy, xy + wh), dim=1)


# --- as_box_tensor -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        [[1, 2, 3, 4], [5, 6, 7, 8]],
        ((1, 2, 3, 4), (5, 6, 7, 8)),
        np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64),
        torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.float64),
    ],
)
def test_as_box_tensor_accepts_common_inputs(value: object) -> None:
    out = as_box_tensor(value)
    assert out.dtype == torch.float32
    assert out.shape == (2, 4)
    assert out.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.mark.parametrize("empty", [[], (), np.zeros((0,)), np.zeros((0, 4)), torch.zeros((0, 4))])
def test_as_box_tensor_empty(empty: object) -> None:
    out = as_box_tensor(empty)
    assert out.shape == (0, 4)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([1, 2, 3, 4], r"shape \(N, 4\), got \(4,\)"),
        ([[1, 2, 3]], r"shape \(N, 4\), got \(1, 3\)"),
        (torch.zeros(2, 4, 1), r"shape \(N, 4\), got \(2, 4, 1\)"),
        ([[1, 2, 3, 4], [1, 2]], r"numeric with shape \(N, 4\)"),
        ([["a", "b", "c", "d"]], r"numeric with shape \(N, 4\)"),
    ],
)
def test_as_box_tensor_rejects_bad_shapes(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        as_box_tensor(value)


def test_as_box_tensor_does_not_alias_numpy_input() -> None:
    array = np.array([[1, 2, 3, 4]], dtype=np.float32)
    out = as_box_tensor(array)
    out[0, 0] = 100
    assert array[0, 0] == 1


# --- sanitize_boxes ------------------------------------------------------------------------


def test_sanitize_valid_boxes_unchanged() -> None:
    boxes = _random_boxes(20)
    out, report = sanitize_boxes(boxes, (640, 480), max_regions=100)
    assert torch.equal(out, boxes)
    assert report == BoxReport(num_boxes=20, image_size=(640.0, 480.0))
    assert not report.changed


def test_sanitize_clips_partly_outside_and_keeps_order(caplog: pytest.LogCaptureFixture) -> None:
    boxes = torch.tensor([[10.0, 10, 50, 50], [-5, 20, 30, 40], [600, 400, 700, 500], [1, 1, 2, 2]])
    original = boxes.clone()
    with caplog.at_level(logging.WARNING, logger="vlm_fo1.boxes"):
        out, report = sanitize_boxes(boxes, (640, 480), max_regions=None)
    assert torch.equal(boxes, original), "input must not be mutated"
    assert out.tolist() == [[10, 10, 50, 50], [0, 20, 30, 40], [600, 400, 640, 480], [1, 1, 2, 2]]
    assert report.clipped == (1, 2)
    assert report.zero_area == ()
    assert report.changed
    assert "clipped boxes [1, 2]" in caplog.text


def test_sanitize_zero_area_kept_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    boxes = [[5, 5, 5, 20], [0, 0, 10, 10], [-10, 7, 20, 7], [640, 10, 640, 20]]
    with caplog.at_level(logging.WARNING, logger="vlm_fo1.boxes"):
        out, report = sanitize_boxes(boxes, (640, 480), max_regions=10)
    assert out.tolist() == [[5, 5, 5, 20], [0, 0, 10, 10], [0, 7, 20, 7], [640, 10, 640, 20]]
    assert report.zero_area == (0, 2, 3)
    assert report.clipped == (2,)
    assert "zero area" in caplog.text


def test_sanitize_does_not_mutate_float32_tensor_input() -> None:
    boxes = torch.tensor([[-10.0, -10, 700, 500]])
    original = boxes.clone()
    out, _ = sanitize_boxes(boxes, (640, 480), max_regions=1)
    assert torch.equal(boxes, original)
    assert out.tolist() == [[0, 0, 640, 480]]


def test_sanitize_empty() -> None:
    out, report = sanitize_boxes([], (10, 10), max_regions=100)
    assert out.shape == (0, 4)
    assert report.num_boxes == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_sanitize_rejects_non_finite(bad: float) -> None:
    boxes = [[0, 0, 1, 1], [0, bad, 1, 1], [0, 0, 1, 1], [bad, 0, 1, 1]]
    with pytest.raises(ValueError, match=r"boxes \[1, 3\] have NaN or infinite"):
        sanitize_boxes(boxes, (10, 10), max_regions=None)


def test_sanitize_rejects_inverted() -> None:
    boxes = [[0, 0, 1, 1], [5, 0, 4, 1], [0, 6, 1, 5]]
    with pytest.raises(ValueError, match=r"boxes \[1, 2\] are inverted; expected x1 <= x2 and y1 <= y2"):
        sanitize_boxes(boxes, (10, 10), max_regions=None)


@pytest.mark.parametrize(
    "outside",
    [
        [20, 0, 30, 5],  # right of the image
        [-5, -5, -1, -1],  # above-left
        [10, 0, 15, 5],  # shares only the right edge
        [0, 10, 5, 12],  # shares only the bottom edge
        [3, 11, 3, 12],  # degenerate, below the image
    ],
)
def test_sanitize_rejects_wholly_outside(outside: list[float]) -> None:
    boxes = [[0, 0, 1, 1], outside]
    with pytest.raises(ValueError, match=r"boxes \[1\] lie wholly outside the image of size"):
        sanitize_boxes(boxes, (10, 10), max_regions=None)


def test_sanitize_lists_many_indexes_compactly() -> None:
    boxes = [[50, 50, 60, 60]] * 30
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, …\] \(30 in total\)"):
        sanitize_boxes(boxes, (10, 10), max_regions=None)


def test_sanitize_rejects_too_many() -> None:
    with pytest.raises(ValueError, match=r"got 101 boxes, expected at most max_regions=100"):
        sanitize_boxes(_random_boxes(101), (640, 480), max_regions=100)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10,), "ab", (float("nan"), 3)])
def test_sanitize_rejects_bad_image_size(size: object) -> None:
    with pytest.raises(ValueError, match="image_size"):
        sanitize_boxes([[0, 0, 1, 1]], size, max_regions=None)  # type: ignore[arg-type]


def test_sanitize_rejects_bad_max_regions() -> None:
    with pytest.raises(ValueError, match="max_regions must be a non-negative int or None, got -1"):
        sanitize_boxes([[0, 0, 1, 1]], (10, 10), max_regions=-1)


# --- clipping, scaling, area, IoU ----------------------------------------------------------


def test_clip_boxes() -> None:
    boxes = torch.tensor([[-1.0, -2, 11, 5], [2, 3, 4, 50]])
    original = boxes.clone()
    assert clip_boxes(boxes, (10, 20)).tolist() == [[0, 0, 10, 5], [2, 3, 4, 20]]
    assert torch.equal(boxes, original)
    assert torch.equal(clip_boxes(boxes, (10, 20)), torchvision.ops.clip_boxes_to_image(boxes, (20, 10))), (
        "torchvision takes (height, width)"
    )


def test_scale_boxes_one_frame_change_and_round_trip() -> None:
    boxes = torch.tensor([[10.0, 20, 30, 40]])
    out = scale_boxes(boxes, (100, 200), (50, 400))
    assert out.tolist() == [[5, 40, 15, 80]]
    back = scale_boxes(out, (50, 400), (100, 200))
    torch.testing.assert_close(back, boxes)


def test_scale_boxes_keeps_float64() -> None:
    boxes = torch.tensor([[1.0, 2, 3, 4]], dtype=torch.float64)
    assert scale_boxes(boxes, (1, 1), (2, 2)).dtype == torch.float64


def test_box_area_matches_torchvision() -> None:
    boxes = _random_boxes(50)
    expected = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    torch.testing.assert_close(box_area(boxes), expected)
    torch.testing.assert_close(box_area(boxes), torchvision.ops.box_area(boxes))
    assert box_area([[0, 0, 2, 3]]).tolist() == [6]


def test_box_iou_pairwise() -> None:
    a = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    torch.testing.assert_close(iou[0], torch.tensor([1 / 7, 1.0, 0.0]))
    torch.testing.assert_close(iou[1], torch.tensor([0.0, 0.25, 0.0]))
    torch.testing.assert_close(
        box_iou(_random_boxes(8), _random_boxes(5, seed=1)),
        torchvision.ops.box_iou(_random_boxes(8), _random_boxes(5, seed=1)),
    )


# --- format conversions --------------------------------------------------------------------


def test_format_conversions_known_values() -> None:
    boxes = torch.tensor([[10.0, 20, 30, 60]])
    assert xyxy_to_xywh(boxes).tolist() == [[10, 20, 20, 40]]
    assert xywh_to_xyxy([[10, 20, 20, 40]]).tolist() == [[10, 20, 30, 60]]
    assert xyxy_to_cxcywh(boxes).tolist() == [[20, 40, 20, 40]]
    assert cxcywh_to_xyxy([[20, 40, 20, 40]]).tolist() == [[10, 20, 30, 60]]


@pytest.mark.parametrize(
    ("forward", "backward", "fmt"),
    [(xyxy_to_xywh, xywh_to_xyxy, "xywh"), (xyxy_to_cxcywh, cxcywh_to_xyxy, "cxcywh")],
)
def test_format_conversions_round_trip_and_torchvision(
    forward: Callable[[torch.Tensor], torch.Tensor],
    backward: Callable[[torch.Tensor], torch.Tensor],
    fmt: str,
) -> None:
    boxes = _random_boxes(64)
    converted = forward(boxes)
    torch.testing.assert_close(converted, torchvision.ops.box_convert(boxes, "xyxy", fmt))
    torch.testing.assert_close(backward(converted), boxes)


def test_normalize_and_denormalize() -> None:
    boxes = torch.tensor([[0.0, 0, 640, 480], [64, 48, 320, 240]])
    norm = normalize_boxes(boxes, (640, 480))
    torch.testing.assert_close(norm, torch.tensor([[0.0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]]))
    torch.testing.assert_close(denormalize_boxes(norm, (640, 480)), boxes)


def test_conversions_do_not_mutate_and_accept_empty() -> None:
    boxes = _random_boxes(4)
    original = boxes.clone()
    for fn in (xyxy_to_xywh, xywh_to_xyxy, xyxy_to_cxcywh, cxcywh_to_xyxy, box_area):
        fn(boxes)
        assert fn([]).shape[0] == 0
    normalize_boxes(boxes, (640, 480))
    scale_boxes(boxes, (640, 480), (1, 1))
    clip_boxes(boxes, (10, 10))
    assert torch.equal(boxes, original)


def test_geometry_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(N, 4\), got \(3, 2\)"):
        xyxy_to_xywh(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"size must be a \(width, height\) pair"):
        normalize_boxes([[0, 0, 1, 1]], (1, 2, 3))  # type: ignore[arg-type]


# --- NMS -----------------------------------------------------------------------------------


def test_nms_keep_matches_torchvision_and_sorts_by_score() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.1])
    keep = nms_keep(boxes, scores, 0.5)
    assert keep.tolist() == [1, 2]
    assert keep.dtype == torch.int64
    random_boxes, random_scores = (
        _random_boxes(60),
        torch.rand(60, generator=torch.Generator().manual_seed(3)),
    )
    expected = torchvision.ops.nms(random_boxes, random_scores, 0.3)
    got = nms_keep(random_boxes, random_scores.tolist(), 0.3)
    assert torch.equal(got, expected)
    assert torch.all(random_scores[got][:-1] >= random_scores[got][1:])


def test_nms_keep_validates() -> None:
    with pytest.raises(ValueError, match=r"scores must have shape \(2,\) to match the boxes, got \(3,\)"):
        nms_keep([[0, 0, 1, 1], [0, 0, 2, 2]], [0.1, 0.2, 0.3], 0.5)
    with pytest.raises(ValueError, match=r"iou_threshold must be in \[0, 1\], got 1.5"):
        nms_keep([[0, 0, 1, 1]], [0.1], 1.5)
    assert nms_keep([], [], 0.5).shape == (0,)


# --- match_boxes ---------------------------------------------------------------------------


def test_match_boxes_greedy_by_descending_iou() -> None:
    targets = [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]
    candidates = [[1, 0, 11, 10], [0, 0, 10, 12], [100, 100, 110, 110]]
    # target 1 takes candidate 0 (IoU 1.0) first; target 0 falls back to candidate 1; target 2 has none
    assert match_boxes(candidates, targets) == [1, 0, None]
    assert match_boxes(torch.tensor(candidates, dtype=torch.float64), np.array(targets)) == [1, 0, None]
    assert match_boxes([[1, 0, 11, 10]], targets) == [None, 0, None]


def test_match_boxes_threshold_is_inclusive_and_ties_prefer_lower_indexes() -> None:
    target = [[0, 0, 10, 10]]
    half = [[0, 0, 10, 20]]  # IoU exactly 0.5
    assert match_boxes(half, target) == [0]
    assert match_boxes(half, target, iou_threshold=0.51) == [None]
    # two identical candidates: the lower index wins; two identical targets: the lower target first
    assert match_boxes([[0, 0, 10, 10], [0, 0, 10, 10]], target) == [0]
    assert match_boxes([[0, 0, 10, 10]], [[0, 0, 10, 10], [0, 0, 10, 10]]) == [0, None]
    assert match_boxes([[0, 0, 10, 10]] * 2, [[0, 0, 10, 10]] * 2) == [0, 1]


def test_match_boxes_empty_and_validation() -> None:
    assert match_boxes([], [[0, 0, 1, 1], [2, 2, 3, 3]]) == [None, None]
    assert match_boxes([[0, 0, 1, 1]], []) == []
    assert match_boxes(torch.zeros(0, 4), torch.zeros(0, 4)) == []
    for bad in (0.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\]"):
            match_boxes([[0, 0, 1, 1]], [[0, 0, 1, 1]], iou_threshold=bad)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        match_boxes([[0, 0, 1]], [[0, 0, 1, 1]])


def test_match_boxes_is_one_to_one_and_maximal_on_random_sets() -> None:
    for seed in range(30):
        candidates, targets = _random_boxes(12, seed=seed), _random_boxes(9, seed=seed + 100)
        targets[:4] = candidates[:4] + 2.0  # some near-duplicates so matches exist
        matched = match_boxes(candidates, targets, iou_threshold=0.3)
        used = [m for m in matched if m is not None]
        assert len(used) == len(set(used))
        iou = box_iou(targets, candidates)
        for t, c in enumerate(matched):
            if c is not None:
                assert iou[t, c] >= 0.3
            else:  # greedy leaves no unmatched target with a free candidate above the threshold
                free = [j for j in range(len(candidates)) if j not in used]
                assert all(iou[t, j] < 0.3 for j in free)


def test_match_boxes_in_candidate_order_prefers_the_first_good_candidate():
    target = [[0, 0, 10, 10]]
    candidates = [[0, 0, 9, 9], [0, 0, 10, 10], [50, 50, 60, 60]]  # IoU 0.81 first, 1.0 second
    assert match_boxes(candidates, target) == [1]
    assert match_boxes(candidates, target, order="candidates") == [0]
    # A candidate claims the target it overlaps most, like COCO evaluation.
    two = [[0, 0, 10, 10], [8, 0, 18, 10]]
    assert match_boxes([[6, 0, 16, 10], [0, 0, 10, 10]], two, order="candidates") == [1, 0]
    with pytest.raises(ValueError, match="order must be"):
        match_boxes(candidates, target, order="score")
