"""ViT un-permutation and the hybrid region encoder against slow plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from vlm_fo1.model.adapters import unpermute_vit_states
from vlm_fo1.model.region_encoder import HybridRegionEncoder, box_sine_embedding, pool_regions
from vlm_fo1.model.simple_fpn import SimpleFeaturePyramid
from vlm_fo1.prompting import templates as P

from conftest import make_image


# -- ViT window order ---------------------------------------------------------------------------------------
def _original_position(index: int, h: int, w: int, merge: int) -> tuple[int, int]:
    """Row/column of token ``index`` in Qwen's unit-major patch order (plain arithmetic)."""
    unit, within = divmod(index, merge * merge)
    unit_row, unit_col = divmod(unit, w // merge)
    dy, dx = divmod(within, merge)
    return unit_row * merge + dy, unit_col * merge + dx


@pytest.mark.parametrize("grids", [[(1, 8, 12)], [(1, 20, 6), (1, 4, 4), (1, 10, 14)]])
def test_unpermute_matches_plain_loop(grids):
    merge, window, patch = 2, 112, 14
    grid_thw = torch.tensor(grids)
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=window, patch_size=patch
    )
    # Hidden "states" that carry (image, row, col) of their original patch.
    rows = []
    for image, (_, h, w) in enumerate(grids):
        for i in range(h * w):
            r, c = _original_position(i, h, w, merge)
            rows.append([image, r, c])
    original = torch.tensor(rows, dtype=torch.float32)  # (S, 3), unit-major order
    # The ViT's own permutation (as in Qwen2_5_VisionTransformerPretrainedModel).
    units = original.reshape(-1, merge * merge, 3)[window_index].reshape(-1, 3)
    maps = unpermute_vit_states(units, window_index, grid_thw, merge)
    for image, (_, h, w) in enumerate(grids):
        assert maps[image].shape == (3, h, w)
        for r in range(h):
            for c in range(w):
                assert maps[image][:, r, c].tolist() == [image, r, c]


def test_unpermuted_last_block_reproduces_stock_merger(processor, model):
    """Merging the un-permuted final ViT map by hand, 2×2 cell by cell, gives the stock image tokens."""
    batch = processor(P.ask("hi"), images=make_image(150, 100), boxes=[])
    visual = model.vlm.model.visual
    last = visual.config.depth - 1
    with torch.no_grad():
        encoding = model.adapter.encode_images(
            model.vlm, batch["pixel_values"], batch["image_grid_thw"], [last]
        )
        stock_tokens = encoding.outputs.pooler_output[0]  # (h*w/4, D), raster order of 2×2 cells
        grid = encoding.feature_maps[0].features  # (C, h, w)
        _, h, w = grid.shape
        expected = []
        for i in range(h // 2):
            for j in range(w // 2):
                cell = [grid[:, 2 * i + dy, 2 * j + dx] for dy in range(2) for dx in range(2)]
                merged = visual.merger.mlp(visual.merger.ln_q(torch.stack(cell)).reshape(1, -1))
                expected.append(merged[0])
    torch.testing.assert_close(torch.stack(expected), stock_tokens, rtol=1e-5, atol=1e-5)


# -- RoIAlign ---------------------------------------------------------------------------------------------
def _bilinear(feature: torch.Tensor, y: float, x: float) -> torch.Tensor:
    _, height, width = feature.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(feature.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feature[:, y_low, x_low]
        + hy * lx * feature[:, y_low, x_high]
        + ly * hx * feature[:, y_high, x_low]
        + ly * lx * feature[:, y_high, x_high]
    )


def slow_roi_mean(
    feature: torch.Tensor, box, scale: float, size: int, sampling: int = -1, aligned: bool = False
):
    """Mean over the bins of RoIAlign for one box, written out with loops."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    grid_h = sampling if sampling > 0 else math.ceil(roi_h / size)
    grid_w = sampling if sampling > 0 else math.ceil(roi_w / size)
    total = torch.zeros(feature.shape[0], dtype=torch.float64)
    for ph in range(size):
        for pw in range(size):
            acc = torch.zeros(feature.shape[0], dtype=torch.float64)
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    acc += _bilinear(feature.double(), y, x)
            total += acc / max(grid_h * grid_w, 1)
    return (total / (size * size)).float()


BOXES = torch.tensor(
    [[3.0, 5.0, 40.0, 33.0], [0.0, 0.0, 63.0, 47.0], [20.5, 7.25, 21.0, 30.0], [50.0, 40.0, 70.0, 60.0]]
)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [-1, 2])
def test_pool_regions_matches_slow_loop(aligned, sampling):
    torch.manual_seed(0)
    feature = torch.randn(5, 12, 16)
    fast = pool_regions(feature, BOXES, 0.25, 3, sampling, aligned)
    slow = torch.stack([slow_roi_mean(feature, b, 0.25, 3, sampling, aligned) for b in BOXES])
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling", [-1, 1, 3])
def test_pool_regions_equals_torchvision_roi_align_forward_and_backward(aligned, sampling):
    """The separable form gives torchvision's numbers and gradients, boxes partly or wholly outside
    the map, tiny and huge boxes included; ``resize_to`` equals resizing the map first."""
    from torchvision.ops import roi_align

    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 11, 17, generator=generator, requires_grad=True)
    corners = torch.rand(2, 9, 2, generator=generator) * torch.tensor([90.0, 60.0]) - 10
    sizes = torch.rand(2, 9, 2, generator=generator) * torch.tensor([70.0, 50.0])
    boxes = torch.cat([corners, corners + sizes], dim=-1)  # (2, 9, 4) some beyond the map
    boxes[0, 0] = torch.tensor([30.0, 20.0, 30.2, 20.1])  # under one cell
    boxes[1, 1] = torch.tensor([-50.0, -50.0, 400.0, 300.0])  # the whole map and more
    boxes[1, 2] = torch.tensor([100.0, 70.0, 130.0, 90.0])  # wholly outside
    weights = torch.randn(18, 6, generator=generator)
    for resize in (None, (22, 30)):
        source = features if resize is None else F.interpolate(features, size=resize, mode="bilinear")
        expected = roi_align(source, list(boxes), 3, 0.25, sampling, aligned).mean(dim=(2, 3))
        (grad_expected,) = torch.autograd.grad((expected * weights).sum(), features)
        got = pool_regions(features, list(boxes), 0.25, 3, sampling, aligned, resize_to=resize)
        (grad_got,) = torch.autograd.grad((got * weights).sum(), features)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)
    assert pool_regions(features[0], boxes[0][:0], 0.25, 3).shape == (0, 6)
    # Several levels (the aux branch): one up-, one downsampled to resize_to, channels concatenated.
    large = torch.randn(2, 4, 30, 41, generator=generator, requires_grad=True)
    levels = [features, large]
    expected = torch.cat(
        [
            roi_align(
                F.interpolate(lv, size=(22, 30), mode="bilinear"), list(boxes), 3, 0.25, sampling, aligned
            ).mean(dim=(2, 3))
            for lv in levels
        ],
        dim=1,
    )  # (ΣN, 6 + 4)
    got = pool_regions(levels, list(boxes), 0.25, 3, sampling, aligned, resize_to=(22, 30))
    weights = torch.randn(18, 10, generator=generator)
    grads_expected = torch.autograd.grad((expected * weights).sum(), levels)
    grads_got = torch.autograd.grad((got * weights).sum(), levels)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for grad_got, grad_expected in zip(grads_got, grads_expected, strict=True):
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)


def slow_sine(boxes: torch.Tensor, frame: tuple[int, int], dim: int) -> torch.Tensor:
    width, height = frame
    quarter = dim // 4
    rows = []
    for x1, y1, x2, y2 in boxes.tolist():
        values = [(y1 + y2) / 2 / height, (x1 + x2) / 2 / width, (x2 - x1) / width, (y2 - y1) / height]
        row = []
        for s in values:  # order cy, cx, w, h
            for i in range(quarter):
                freq = 10000 ** (2 * (i // 2) / quarter)
                angle = 2 * math.pi * s / freq
                row.append(math.sin(angle) if i % 2 == 0 else math.cos(angle))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("dim", [8, 24, 64])
def test_box_sine_embedding_matches_loop(dim):
    torch.testing.assert_close(
        box_sine_embedding(BOXES, (64, 48), dim), slow_sine(BOXES, (64, 48), dim), rtol=1e-5, atol=1e-5
    )


def test_box_sine_embedding_needs_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4, got 10"):
        box_sine_embedding(BOXES, (64, 48), 10)


@pytest.mark.parametrize("fpn", [True, False])
def test_hybrid_region_encoder_matches_slow_reference(fpn):
    torch.manual_seed(0)
    aux_channels, aux_strides = [4, 8, 8], [4.0, 8.0, 16.0]
    encoder = HybridRegionEncoder(
        vit_channels=8,
        aux_channels=aux_channels,
        aux_strides=aux_strides,
        use_simple_fpn=fpn,
        fpn_channels=4,
        roi_output_size=3,
        roi_sampling_ratio=-1,
        roi_aligned=False,
        use_position_embedding=True,
        region_layer_norm=True,
    ).eval()
    for norm in (encoder.aux_region_norm, encoder.vt_region_norm):
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    aux_levels = [
        torch.randn(c, 64 // int(s), 96 // int(s)) for c, s in zip(aux_channels, aux_strides, strict=True)
    ]
    vit = torch.randn(8, 6, 8)  # stride 14 → ViT frame 112 × 84
    vit_boxes = BOXES * torch.tensor([112 / 80, 84 / 60, 112 / 80, 84 / 60])
    aux_boxes = BOXES * torch.tensor([96 / 80, 64 / 60, 96 / 80, 64 / 60])
    with torch.no_grad():
        fast = encoder(
            vit_features=[vit],
            vit_stride=14.0,
            vit_frames=[(112, 84)],
            vit_boxes=[vit_boxes],
            aux_levels=[lv[None] for lv in aux_levels],
            aux_boxes=[aux_boxes],
        )
        # Reference: aux levels resized to the finest one, concatenated, pooled with loops.
        size = aux_levels[0].shape[-2:]
        aux_map = torch.cat(
            [F.interpolate(lv[None], size=size, mode="bilinear", align_corners=False)[0] for lv in aux_levels]
        )
        aux_part = torch.stack([slow_roi_mean(aux_map, b, 1 / 4, 3) for b in aux_boxes])
        if fpn:
            levels = SimpleFeaturePyramid.forward(encoder.simple_fpn, vit[None])
            strides = [14 / 4, 14 / 2, 14, 28]
            vit_part = torch.cat(
                [
                    torch.stack([slow_roi_mean(lv[0], b, 1 / s, 3) for b in vit_boxes])
                    for lv, s in zip(levels, strides, strict=True)
                ],
                dim=1,
            )
        else:
            vit_part = torch.stack([slow_roi_mean(vit, b, 1 / 14, 3) for b in vit_boxes])
        combined = torch.cat([encoder.aux_region_norm(aux_part), encoder.vt_region_norm(vit_part)], dim=1)
        expected = combined + slow_sine(vit_boxes, (112, 84), combined.shape[1])
    assert fast.shape == (4, sum(aux_channels) + (16 if fpn else 8))
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-4)


def test_batched_encoder_equals_one_image_at_a_time():
    torch.manual_seed(1)
    encoder = HybridRegionEncoder(
        vit_channels=8,
        aux_channels=[4, 8],
        aux_strides=[4.0, 8.0],
        use_simple_fpn=True,
        fpn_channels=4,
        roi_output_size=2,
        roi_sampling_ratio=-1,
        roi_aligned=False,
        use_position_embedding=True,
        region_layer_norm=False,
    ).eval()
    levels = [torch.randn(5, 4, 16, 16), torch.randn(5, 8, 8, 8)]
    # Maps of one size (images 0, 2 and 4) go through the pyramid together, the others apart.
    vits = [torch.randn(8, *hw) for hw in ((4, 6), (6, 4), (4, 6), (4, 4), (4, 6))]
    frames = [(84, 56), (56, 84), (84, 56), (56, 56), (84, 56)]
    boxes = [BOXES[:2] / 2, BOXES[:0], BOXES[1:] / 2, BOXES[:3] / 2, BOXES[2:] / 2]  # image 1: no boxes
    with torch.no_grad():
        batched = encoder(
            vit_features=vits,
            vit_stride=14.0,
            vit_frames=frames,
            vit_boxes=boxes,
            aux_levels=levels,
            aux_boxes=boxes,
        )
        single = torch.cat(
            [
                encoder(
                    vit_features=[vits[i]],
                    vit_stride=14.0,
                    vit_frames=[frames[i]],
                    vit_boxes=[boxes[i]],
                    aux_levels=[lv[i : i + 1] for lv in levels],
                    aux_boxes=[boxes[i]],
                )
                for i in range(5)
            ]
        )
    assert batched.shape == (2 + 3 + 3 + 2, 12 + 16)
    torch.testing.assert_close(batched, single)


def test_region_width_must_suit_position_embedding():
    with pytest.raises(ValueError, match="divisible by 4, got 18"):
        HybridRegionEncoder(
            vit_channels=0,
            aux_channels=[4, 6, 8],
            aux_strides=[4, 8, 16],
            use_simple_fpn=False,
            fpn_channels=4,
            roi_output_size=2,
            roi_sampling_ratio=-1,
            roi_aligned=False,
            use_position_embedding=True,
            region_layer_norm=False,
        )


def test_simple_fpn_level_shapes_and_release_names():
    fpn = SimpleFeaturePyramid(32, 8)
    levels = fpn(torch.randn(1, 32, 6, 10))
    assert [tuple(lv.shape[-2:]) for lv in levels] == [(24, 40), (12, 20), (6, 10), (3, 5)]
    names = set(fpn.state_dict())
    # official-release.md §2.4: ConvT, LN, GELU, ConvT, conv+norm, conv+norm in simfp_1, etc.
    for name in [
        "simfp_1.0.weight",
        "simfp_1.0.bias",
        "simfp_1.1.weight",
        "simfp_1.3.weight",
        "simfp_1.4.weight",
        "simfp_1.4.norm.weight",
        "simfp_1.5.norm.bias",
        "simfp_2.0.bias",
        "simfp_2.1.norm.weight",
        "simfp_3.0.weight",
        "simfp_3.1.norm.weight",
        "simfp_4.1.weight",
        "simfp_4.2.norm.bias",
    ]:
        assert name in names, name
    assert "simfp_1.4.bias" not in names  # plain convs are bias-free
