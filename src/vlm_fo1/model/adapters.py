"""The seam between FO1 and its base VLM: everything that knows Qwen2.5-VL internals lives here.

FO1 needs four things from a base vision-language model: its token embeddings, its image
encoding (the tokens the LLM sees *and* intermediate ViT feature maps for region pooling), a
forward pass that accepts ready-made input embeddings plus the pre-encoded image, and the
position ids it wants for generation. A second base VLM is added by writing one more
``VLMAdapter`` and registering it under its ``model_type``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index


@dataclass
class VisionFeatureMap:
    """One image's intermediate ViT features as a raster map.

    Attributes:
        features: ``(C, H, W)``, the chosen blocks' hidden states concatenated on channels.
        stride: ViT-input pixels per feature cell (the patch size).
    """

    features: torch.Tensor
    stride: float


@dataclass
class ImageEncoding:
    """What the base VLM's vision tower produced for a batch of images.

    Attributes:
        outputs: the stock encoder output, handed back to the base forward as pre-encoded input.
        frames: ``(width, height)`` of each image's ViT input in pixels.
        feature_maps: one ``VisionFeatureMap`` per image (empty when no blocks were requested).
    """

    outputs: Any
    frames: list[tuple[int, int]]
    feature_maps: list[VisionFeatureMap]


class VLMAdapter(Protocol):
    """What FO1 needs from a base VLM."""

    def build(self, config: PreTrainedConfig) -> PreTrainedModel: ...

    def vit_hidden_size(self, config: PreTrainedConfig) -> int: ...

    def vit_patch_size(self, config: PreTrainedConfig) -> int: ...

    def image_token_id(self, config: PreTrainedConfig) -> int: ...

    def encode_images(
        self,
        vlm: PreTrainedModel,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        blocks: Sequence[int],
    ) -> ImageEncoding: ...

    def forward(self, vlm: PreTrainedModel, encoding: ImageEncoding | None, **kwargs: Any) -> Any: ...

    def final_norm(self, vlm: PreTrainedModel) -> nn.Module: ...

    def prepare_position_ids_for_generation(
        self, vlm: PreTrainedModel, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]
    ) -> torch.Tensor: ...


@contextlib.contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record each module's forward output (in the order given) while the context is open."""
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def make_hook(slot: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            captured[slot] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def unpermute_vit_states(
    hidden: torch.Tensor, window_index: torch.Tensor, grid_thw: torch.Tensor, merge_size: int
) -> list[torch.Tensor]:
    """Put Qwen2.5-VL ViT hidden states back from window order into raster maps.

    Inside the ViT, tokens are ordered by attention window, in units of ``merge_size²`` patches
    (``window_index`` gives, for each position in that order, the unit's original index). Within
    each image the original order is unit-major: units in raster order, each holding its
    ``merge_size × merge_size`` patches in raster order.

    Args:
        hidden: ``(S, C)`` states of all images, window-permuted, ``S = sum(t*h*w)``.
        window_index: ``(S / merge_size²,)`` from ``get_vision_window_index``.
        grid_thw: ``(num_images, 3)`` patch grids.
        merge_size: spatial merge size (2 for Qwen2.5-VL).

    Returns:
        One ``(C, h, w)`` map per image.
    """
    unit = merge_size * merge_size
    seq, channels = hidden.shape
    units = hidden.reshape(seq // unit, unit, channels)
    original = torch.empty_like(units)
    original[window_index] = units  # (S/unit, unit, C) in unit-major order
    maps = []
    offset = 0
    for t, h, w in grid_thw.tolist():
        if t != 1:
            raise ValueError(f"expected still images with grid t=1, got grid (t, h, w)=({t}, {h}, {w})")
        n_units = h * w // unit
        x = original[offset : offset + n_units]
        offset += n_units
        x = x.reshape(h // merge_size, w // merge_size, merge_size, merge_size, channels)
        x = x.permute(4, 0, 2, 1, 3).reshape(channels, h, w)  # (C, h, w)
        maps.append(x)
    return maps


class Qwen2_5_VLAdapter:
    """Adapter for the stock transformers ``Qwen2_5_VLForConditionalGeneration``."""

    model_type = "qwen2_5_vl"

    def build(self, config: PreTrainedConfig) -> PreTrainedModel:
        return Qwen2_5_VLForConditionalGeneration._from_config(config)

    def vit_hidden_size(self, config: PreTrainedConfig) -> int:
        return int(config.vision_config.hidden_size)

    def vit_patch_size(self, config: PreTrainedConfig) -> int:
        return int(config.vision_config.patch_size)

    def image_token_id(self, config: PreTrainedConfig) -> int:
        return int(config.image_token_id)

    def encode_images(
        self,
        vlm: PreTrainedModel,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        blocks: Sequence[int],
    ) -> ImageEncoding:
        """Run the ViT once; return the LLM image tokens and the requested blocks as raster maps.

        Args:
            pixel_values: ``(S, 3 * temporal * patch²)`` flattened patches of all images.
            image_grid_thw: ``(num_images, 3)``.
            blocks: indexes of ViT blocks whose outputs are returned as feature maps.
        """
        visual = vlm.model.visual
        cfg = visual.config
        patch = int(cfg.patch_size)
        with capture_outputs([visual.blocks[b] for b in blocks]) as captured:
            outputs = vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        frames = [(int(w) * patch, int(h) * patch) for _, h, w in image_grid_thw.tolist()]
        if not blocks:
            return ImageEncoding(outputs=outputs, frames=frames, feature_maps=[])
        window_index, _ = get_vision_window_index(
            image_grid_thw,
            spatial_merge_size=cfg.spatial_merge_size,
            window_size=cfg.window_size,
            patch_size=cfg.patch_size,
        )
        hidden = torch.cat(captured, dim=-1)  # (S, C * len(blocks)), window order
        maps = unpermute_vit_states(
            hidden, window_index.to(hidden.device), image_grid_thw, cfg.spatial_merge_size
        )
        feature_maps = [VisionFeatureMap(features=m, stride=float(patch)) for m in maps]
        return ImageEncoding(outputs=outputs, frames=frames, feature_maps=feature_maps)

    def forward(self, vlm: PreTrainedModel, encoding: ImageEncoding | None, **kwargs: Any) -> Any:
        """The stock forward on ready input embeddings and the pre-encoded image."""
        input_ids = kwargs.get("input_ids")
        if (
            kwargs.get("mm_token_type_ids") is None
            and input_ids is not None
            and kwargs.get("image_grid_thw") is not None
        ):
            # Without token types the stock model silently falls back to 1-D positions for image tokens.
            kwargs["mm_token_type_ids"] = (input_ids == vlm.config.image_token_id).int()
        if encoding is not None:
            kwargs["mm_encoder_outputs"] = {"image": encoding.outputs}
        return vlm(**kwargs)

    def final_norm(self, vlm: PreTrainedModel) -> nn.Module:
        """The language model's last norm (its output is what the LM head reads)."""
        return vlm.model.language_model.norm

    def prepare_position_ids_for_generation(
        self, vlm: PreTrainedModel, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """M-RoPE position ids (text row + 3 vision rows) computed by the stock model."""
        return vlm._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)


ADAPTERS: dict[str, VLMAdapter] = {Qwen2_5_VLAdapter.model_type: Qwen2_5_VLAdapter()}


def get_adapter(model_type: str) -> VLMAdapter:
    """The adapter registered for a base VLM ``model_type``."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no FO1 adapter for base model_type {model_type!r}; supported: {sorted(ADAPTERS)}"
        ) from None
