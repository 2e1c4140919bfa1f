"""The hybrid fine-grained region encoder (HFRE): one vector per candidate box.

For each box: RoIAlign over the auxiliary encoder's multi-level maps (all levels resized to the
finest, concatenated on channels) and over the primary ViT's maps (directly, or through a simple
feature pyramid), each mean-pooled over the RoI bins; the two are concatenated (aux first), and a
sine-cosine embedding of the box is added. Official-release.md §2.5 gives the release's numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_fo1.model.simple_fpn import LEVEL_FACTORS, SimpleFeaturePyramid


def _axis_weights(
    start: torch.Tensor,
    end: torch.Tensor,
    size: int,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``(N, size)``: along one axis, the mean bilinear weight of each cell over RoIAlign's sample
    points of each box (its ``output_size`` bins, ``sampling_ratio`` points per bin, or
    ``ceil(extent / output_size)`` when it is -1), with torchvision's CPU rules at the borders:
    a point beyond ``[-1, size]`` adds nothing, one below 0 reads cell 0, one at or beyond the last
    cell reads the last cell. ``start`` / ``end``: ``(N,)`` box sides in cells."""
    extent = end - start
    if not aligned:
        extent = extent.clamp(min=1.0)
    bin_size = extent / output_size  # (N,)
    grid = (
        torch.full_like(extent, float(sampling_ratio))
        if sampling_ratio > 0
        else torch.ceil(extent / output_size)
    )  # (N,) points per bin along this axis
    most = max(int(grid.max()), 1) if grid.numel() else 1
    step = torch.arange(most, dtype=extent.dtype, device=extent.device)  # (G,)
    bins = torch.arange(output_size, dtype=extent.dtype, device=extent.device)  # (S,)
    g = grid.clamp(min=1.0)[:, None, None]
    points = (
        start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + (step[None, None, :] + 0.5) * bin_size[:, None, None] / g
    )  # (N, S, G)
    used = (step[None, None, :] < grid[:, None, None]) & (points >= -1.0) & (points <= size)
    p = points.clamp(min=0.0)
    low = p.floor().clamp(max=size - 1)
    at_end = low >= size - 1
    p = torch.where(at_end, low, p)
    high = torch.where(at_end, low, low + 1)
    frac = p - low
    weights = points.new_zeros(points.shape[0], size)
    flat = (points.shape[0], -1)
    used = used.to(points.dtype)
    weights.scatter_add_(1, low.long().reshape(flat), ((1 - frac) * used).reshape(flat))
    weights.scatter_add_(1, high.long().reshape(flat), (frac * used).reshape(flat))
    return weights / (output_size * grid.clamp(min=1.0))[:, None]


def _resize_matrix(source: int, target: int, device: torch.device) -> torch.Tensor:
    """``(target, source)``: ``F.interpolate(..., mode="bilinear", align_corners=False)`` along one
    axis as a matrix (bilinear resizing is separable)."""
    eye = torch.eye(source, device=device)[None, :, :, None]  # (1, source, source, 1)
    return F.interpolate(eye, size=(target, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T


def pool_regions(
    features: torch.Tensor | Sequence[torch.Tensor],
    boxes: torch.Tensor | Sequence[torch.Tensor],
    spatial_scale: float,
    output_size: int,
    sampling_ratio: int = -1,
    aligned: bool = False,
    resize_to: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Mean of RoIAlign bins, in float32: ``torchvision.ops.roi_align(...).mean((2, 3))``.

    RoIAlign's sample points form a grid that is the product of its row and column positions, and
    bilinear weights factor the same way, so the mean over every point of every bin is
    ``Σ_hw a_h F[:, h, w] b_w`` with one weight vector per axis (:func:`_axis_weights`). That is
    the same number as torchvision's (its tests check it), with a backward pass that is two small
    matrix products instead of a scatter over every sample point.

    Args:
        features: ``(C, H, W)`` one map, ``(B, C, H, W)`` a batch of maps, or a list of batches
            (levels, ``(B, C_i, H_i, W_i)``) pooled with the same weights and concatenated on
            channels; levels of another size than ``resize_to`` are pooled as if first resized
            to it by ``F.interpolate(mode="bilinear", align_corners=False)`` (never built).
        boxes: ``(N, 4)`` xyxy for one map, or one ``(N_b, 4)`` tensor per map of the batch.
        spatial_scale: box pixels to feature cells (1 / stride), in the frame of ``resize_to``.
        resize_to: ``(H', W')``; default: the size of the (first) map.

    Returns:
        ``(ΣN, ΣC)``: the boxes of map 0, then map 1, …
    """
    if torch.is_tensor(features):
        if features.dim() == 3:
            features, boxes = features[None], [boxes]
        features = [features]
    levels = [level.float() for level in features]
    target = resize_to or tuple(levels[0].shape[-2:])
    resize = [
        None
        if tuple(level.shape[-2:]) == tuple(target)
        else (
            _resize_matrix(level.shape[-2], target[0], level.device),
            _resize_matrix(level.shape[-1], target[1], level.device),
        )
        for level in levels
    ]
    pooled = []
    for index, box in enumerate(boxes):
        if not len(box):
            continue
        box = box.float() * spatial_scale - (0.5 if aligned else 0.0)
        a = _axis_weights(box[:, 1], box[:, 3], target[0], output_size, sampling_ratio, aligned)  # (N, H')
        b = _axis_weights(box[:, 0], box[:, 2], target[1], output_size, sampling_ratio, aligned)  # (N, W')
        parts = []
        for level, matrices in zip(levels, resize, strict=True):
            a_l, b_l = (a, b) if matrices is None else (a @ matrices[0], b @ matrices[1])  # on the map itself
            rows = torch.einsum("nh,chw->ncw", a_l, level[index])  # (N, C, W)
            parts.append(torch.einsum("ncw,nw->nc", rows, b_l))
        pooled.append(torch.cat(parts, dim=1))
    channels = sum(level.shape[1] for level in levels)
    return torch.cat(pooled) if pooled else levels[0].new_zeros(0, channels)


def box_sine_embedding(boxes: torch.Tensor, frame_size: tuple[int, int], dim: int) -> torch.Tensor:
    """Sine-cosine embedding of boxes: ``(N, 4)`` xyxy pixels → ``(N, dim)``.

    Boxes are normalised by ``frame_size = (width, height)`` into (cx, cy, w, h). Each scalar
    ``s`` gets ``D = dim / 4`` components ``sin(2π s / f_i)`` at even ``i`` and ``cos`` at odd
    ``i``, with ``f_i = 10000 ** (2 * (i // 2) / D)``; blocks are concatenated in the order
    cy, cx, w, h (the release's order).
    """
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    width, height = frame_size
    b = boxes.float()
    cx = (b[:, 0] + b[:, 2]) / 2 / width
    cy = (b[:, 1] + b[:, 3]) / 2 / height
    w = (b[:, 2] - b[:, 0]) / width
    h = (b[:, 3] - b[:, 1]) / height
    quarter = dim // 4
    i = torch.arange(quarter, device=b.device, dtype=torch.float32)
    freq = 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / quarter)  # (D,)
    even = (torch.arange(quarter, device=b.device) % 2) == 0

    def embed(s: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, D)
        angle = 2 * math.pi * s[:, None] / freq
        return torch.where(even, angle.sin(), angle.cos())

    return torch.cat([embed(cy), embed(cx), embed(w), embed(h)], dim=1)


class HybridRegionEncoder(nn.Module):
    """Pools one feature vector per box from the ViT and auxiliary feature maps.

    Args:
        vit_channels: channels of the ViT feature map (hidden size × number of blocks), or 0
            when ViT features are not used.
        aux_channels: channels of each auxiliary level (empty when not used).
        aux_strides: input pixels per cell of each auxiliary level.
        use_simple_fpn / fpn_channels: pyramid on the ViT map.
        roi_output_size, roi_sampling_ratio, roi_aligned: RoIAlign options.
        use_position_embedding: add ``box_sine_embedding`` of the ViT-frame boxes.
        region_layer_norm: LayerNorm each branch's pooled vector.
    """

    def __init__(
        self,
        *,
        vit_channels: int,
        aux_channels: Sequence[int],
        aux_strides: Sequence[float],
        use_simple_fpn: bool,
        fpn_channels: int,
        roi_output_size: int,
        roi_sampling_ratio: int,
        roi_aligned: bool,
        use_position_embedding: bool,
        region_layer_norm: bool,
    ) -> None:
        super().__init__()
        if len(aux_channels) != len(aux_strides):
            raise ValueError(f"got {len(aux_channels)} aux channel counts but {len(aux_strides)} strides")
        self.aux_strides = [float(s) for s in aux_strides]
        self.roi_output_size = roi_output_size
        self.roi_sampling_ratio = roi_sampling_ratio
        self.roi_aligned = roi_aligned
        self.use_position_embedding = use_position_embedding
        self.simple_fpn = (
            SimpleFeaturePyramid(vit_channels, fpn_channels) if vit_channels and use_simple_fpn else None
        )
        self.aux_dim = int(sum(aux_channels))
        if not vit_channels:
            self.vit_dim = 0
        else:
            self.vit_dim = fpn_channels * len(LEVEL_FACTORS) if self.simple_fpn is not None else vit_channels
        if self.aux_dim + self.vit_dim == 0:
            raise ValueError("the region encoder needs ViT features, auxiliary features or both")
        if use_position_embedding and self.output_dim % 4:
            raise ValueError(
                f"the box position embedding needs a region width divisible by 4, got {self.output_dim} "
                f"(aux {self.aux_dim} + ViT {self.vit_dim})"
            )
        self.aux_region_norm = nn.LayerNorm(self.aux_dim) if region_layer_norm and self.aux_dim else None
        self.vt_region_norm = nn.LayerNorm(self.vit_dim) if region_layer_norm and self.vit_dim else None

    @property
    def output_dim(self) -> int:
        """Width of each region vector (aux + ViT branch)."""
        return self.aux_dim + self.vit_dim

    def _pool(
        self, features: Any, boxes: Any, stride: float, resize_to: tuple[int, int] | None = None
    ) -> torch.Tensor:
        return pool_regions(
            features,
            boxes,
            1.0 / stride,
            self.roi_output_size,
            self.roi_sampling_ratio,
            self.roi_aligned,
            resize_to,
        )

    def aux_branch(self, levels: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """Auxiliary features of every box of a batch: ``(ΣN, ΣC_i)``.

        Args:
            levels: one ``(B, C_i, H_i, W_i)`` map per level, finest first.
            boxes: one ``(N_b, 4)`` tensor of aux-input-pixel boxes per image (may be empty).

        Every level is bilinearly resized to the finest level's size and pooled at its stride (the
        resize folded into the pooling weights); pooling level by level gives the same numbers as
        pooling their channel concatenation.
        """
        out = self._pool(list(levels), boxes, self.aux_strides[0], tuple(levels[0].shape[-2:]))
        return self.aux_region_norm(out) if self.aux_region_norm is not None else out

    def vit_branch(
        self, features: Sequence[torch.Tensor], stride: float, boxes: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """ViT features of every box of a batch: ``(ΣN, vit_dim)``, images in order.

        Args:
            features: one ``(C, H_b, W_b)`` map per image at ``stride`` (sizes may differ).
            boxes: one ``(N_b, 4)`` tensor of ViT-input-pixel boxes per image (may be empty).

        Images whose maps have the same size go through the feature pyramid as one batch (the
        same numbers as one image at a time, within float tolerance); images without boxes skip it.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (f, b) in enumerate(zip(features, boxes, strict=True)):
            if len(b):
                groups.setdefault(tuple(f.shape), []).append(i)
        pooled: dict[int, torch.Tensor] = {}
        for members in groups.values():
            maps = torch.stack([features[i] for i in members])  # (G, C, H, W)
            group_boxes = [boxes[i] for i in members]
            if self.simple_fpn is None:
                out = self._pool(maps, group_boxes, stride)
            else:
                levels = self.simple_fpn(maps.to(next(self.simple_fpn.parameters()).dtype))
                out = torch.cat(
                    [
                        self._pool(lv, group_boxes, stride / f)
                        for lv, f in zip(levels, LEVEL_FACTORS, strict=True)
                    ],
                    dim=1,
                )
            pooled.update(zip(members, out.split([len(b) for b in group_boxes]), strict=True))
        if pooled:
            out = torch.cat([pooled[i] for i in sorted(pooled)])
        else:
            device = features[0].device if len(features) else None
            out = torch.zeros(0, self.vit_dim, device=device)
        return self.vt_region_norm(out) if self.vt_region_norm is not None else out

    def forward(
        self,
        *,
        vit_features: Sequence[torch.Tensor] | None,
        vit_stride: float,
        vit_frames: Sequence[tuple[int, int]],
        vit_boxes: Sequence[torch.Tensor],
        aux_levels: Sequence[torch.Tensor] | None,
        aux_boxes: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Region vectors of every box of a batch of images: ``(ΣN, output_dim)`` in float32.

        Args:
            vit_features: one ``(C, H, W)`` ViT map per image (needed when ``vit_dim > 0``).
            vit_stride: ViT-input pixels per cell.
            vit_frames: ``(width, height)`` of each image's ViT input, for the position embedding.
            vit_boxes: one ``(N_b, 4)`` xyxy tensor per image in ViT-input pixels.
            aux_levels: the auxiliary maps, one ``(B, C_i, H_i, W_i)`` per level, finest first.
            aux_boxes: one ``(N_b, 4)`` xyxy tensor per image in auxiliary-input pixels.
        """
        parts = []
        if self.aux_dim:
            if aux_levels is None or aux_boxes is None:
                raise ValueError("this region encoder uses auxiliary features, but none were given")
            parts.append(self.aux_branch(aux_levels, aux_boxes))
        if self.vit_dim:
            if vit_features is None:
                raise ValueError("this region encoder uses ViT features, but none were given")
            parts.append(self.vit_branch(vit_features, vit_stride, vit_boxes))
        regions = torch.cat(parts, dim=1).float()
        if self.use_position_embedding:
            embedding = [
                box_sine_embedding(b, frame, regions.shape[1])
                for b, frame in zip(vit_boxes, vit_frames, strict=True)
            ]
            regions = regions + torch.cat(embedding)
        return regions


def build_connector(connector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """Region-to-LLM connector: ``mlp2x_gelu`` = Linear-GELU-Linear (keys ``0``, ``2``) or ``linear``."""
    if connector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if connector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"connector_type must be 'linear' or 'mlp2x_gelu', got {connector_type!r}")
