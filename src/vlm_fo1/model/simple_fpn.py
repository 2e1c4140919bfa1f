"""A ViTDet-style simple feature pyramid over one single-scale ViT map.

Four levels at 4×, 2×, 1× and 0.5× the input resolution. Module names and layer order follow the
release (``simfp_1``…``simfp_4``, official-release.md §2.4) so its weights load as they are.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

# Resolution factor of each level relative to the input map.
LEVEL_FACTORS = (4.0, 2.0, 1.0, 0.5)


class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by a channel LayerNorm (weights ``.weight``, ``.norm.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, eps: float = 1e-6) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = LayerNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


def _head(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [ConvNorm(in_channels, out_channels, 1), ConvNorm(out_channels, out_channels, 3)]


class SimpleFeaturePyramid(nn.Module):
    """``(B, C, H, W)`` → ``[(B, O, 4H, 4W), (B, O, 2H, 2W), (B, O, H, W), (B, O, H/2, W/2)]``."""

    def __init__(self, in_channels: int, out_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        half, quarter = in_channels // 2, in_channels // 4
        if quarter == 0:
            raise ValueError(f"SimpleFeaturePyramid needs in_channels >= 4, got {in_channels}")
        self.simfp_1 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, half, 2, stride=2),
            LayerNorm2d(half, eps=eps),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, 2, stride=2),
            *_head(quarter, out_channels),
        )
        self.simfp_2 = nn.Sequential(
            nn.ConvTranspose2d(in_channels, half, 2, stride=2), *_head(half, out_channels)
        )
        self.simfp_3 = nn.Sequential(*_head(in_channels, out_channels))
        self.simfp_4 = nn.Sequential(nn.MaxPool2d(2, stride=2), *_head(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.simfp_1(x), self.simfp_2(x), self.simfp_3(x), self.simfp_4(x)]
