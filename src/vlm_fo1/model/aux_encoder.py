"""The auxiliary high-resolution encoder: a timm backbone (DaViT in the release) as a feature pyramid."""

from __future__ import annotations

import timm
import torch
from torch import nn

from vlm_fo1.config import FO1Config


def build_aux_encoder(config: FO1Config) -> nn.Module:
    """A timm ``features_only`` model; never downloads weights.

    The returned module maps ``(B, 3, H, W)`` to a list of ``(B, C_i, H / r_i, W / r_i)`` maps,
    with ``C_i`` and ``r_i`` in ``module.feature_info.channels()`` / ``.reduction()``.
    """
    try:
        return timm.create_model(
            config.aux_encoder_name, pretrained=False, features_only=True, **config.aux_encoder_kwargs
        )
    except RuntimeError as err:  # timm raises RuntimeError for unknown model names
        raise ValueError(f"FO1Config.aux_encoder_name {config.aux_encoder_name!r}: {err}") from err


def aux_feature_geometry(encoder: nn.Module) -> tuple[list[int], list[float]]:
    """``(channels, strides)`` of each level, read from timm's ``feature_info``."""
    info = encoder.feature_info
    return [int(c) for c in info.channels()], [float(r) for r in info.reduction()]


def encode_aux(encoder: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """``(B, 3, H, W)`` normalised images → one ``(B, C_i, H_i, W_i)`` map per level, finest first."""
    dtype = next(encoder.parameters()).dtype
    return list(encoder(pixel_values.to(dtype)))
