"""Tiny random FO1 models for tests, docs and users: the whole path, offline, in well under a second.

>>> from vlm_fo1.testing import tiny_model_and_processor
>>> model, processor = tiny_model_and_processor()
>>> batch = processor("Please detect cat in this image.", images=image, boxes=[[0, 0, 20, 20]])
>>> out = model.generate(**batch, max_new_tokens=8)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from vlm_fo1.config import FO1Config
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.processing import FO1Processor
from vlm_fo1.prompting import tokens as T
from vlm_fo1.tokenization import build_tiny_tokenizer, fo1_token_ids

TINY_MAX_REGIONS = 32


def tiny_tokenizer(max_regions: int = TINY_MAX_REGIONS, extra_corpus: Iterable[str] = ()) -> Any:
    """The offline Qwen2 tokenizer with FO1 tokens (see ``vlm_fo1.tokenization``)."""
    return build_tiny_tokenizer(extra_corpus, max_regions=max_regions)


def tiny_base_config(tokenizer: Any, **text_overrides: Any) -> dict[str, Any]:
    """A small Qwen2.5-VL config (dict) whose special ids come from ``tokenizer``."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=ids(T.END_OF_TEXT),
        eos_token_id=ids(T.IM_END),
        pad_token_id=ids(T.END_OF_TEXT),
    )
    text.update(text_overrides)
    return dict(
        model_type="qwen2_5_vl",
        text_config=text,
        vision_config=dict(
            depth=4,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[1, 3],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids(T.IMAGE_PAD),
        video_token_id=ids(T.VIDEO_PAD),
        vision_start_token_id=ids(T.VISION_START),
        vision_end_token_id=ids(T.VISION_END),
    )


TINY_DAVIT_KWARGS = dict(embed_dims=(16, 32, 48, 64), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1))


def tiny_config(tokenizer: Any | None = None, **overrides: Any) -> FO1Config:
    """A tiny ``FO1Config`` (Qwen2.5-VL + Florence-style DaViT) wired to ``tokenizer``'s ids."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    settings: dict[str, Any] = dict(
        base_config=tiny_base_config(tokenizer),
        aux_encoder_name="davit_huge_fl",
        aux_encoder_kwargs=dict(TINY_DAVIT_KWARGS),
        aux_image_size=64,
        fpn_channels=16,
        roi_output_size=4,
        max_regions=TINY_MAX_REGIONS,
        **fo1_token_ids(tokenizer, overrides.get("max_regions", TINY_MAX_REGIONS)),
    )
    settings.update(overrides)
    return FO1Config(**settings)


def full_size_config(tokenizer: Any | None = None, **overrides: Any) -> FO1Config:
    """The released 3B architecture (Qwen2.5-VL-3B + Florence-2-large DaViT, FPN, 100 regions) for
    random-weight timing; special ids come from ``tokenizer`` (default: the tiny one, 100 regions)."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer(max_regions=T.DEFAULT_MAX_REGIONS)
    base = tiny_base_config(
        tokenizer,
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    )
    base["vision_config"].update(
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=3420,
        out_hidden_size=2048,
        fullatt_block_indexes=[7, 15, 23, 31],
    )
    settings: dict[str, Any] = dict(
        base_config=base,
        aux_encoder_name="davit_huge_fl",
        vit_feature_blocks=[31],
        use_simple_fpn=True,
        fpn_channels=512,
        roi_output_size=7,
        max_regions=T.DEFAULT_MAX_REGIONS,
        **fo1_token_ids(tokenizer, T.DEFAULT_MAX_REGIONS),
    )
    settings.update(overrides)
    return FO1Config(**settings)


def tiny_processor(
    tokenizer: Any | None = None, config: FO1Config | None = None, **kwargs: Any
) -> FO1Processor:
    """An ``FO1Processor`` for ``tiny_config`` (small images stay small: min 56×56 pixels)."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    config = config if config is not None else tiny_config(tokenizer)
    kwargs.setdefault("max_pixels", 448 * 448)
    return FO1Processor.from_config(tokenizer, config, **kwargs)


def tiny_model(
    config: FO1Config | None = None, seed: int = 0, **config_overrides: Any
) -> FO1ForConditionalGeneration:
    """A tiny random ``FO1ForConditionalGeneration`` in eval mode (seeded, so reproducible)."""
    config = config if config is not None else tiny_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FO1ForConditionalGeneration(config)
    return model.eval()


def tiny_model_and_processor(
    seed: int = 0, **config_overrides: Any
) -> tuple[FO1ForConditionalGeneration, FO1Processor]:
    """Model and processor that agree on tokenizer, special ids and image geometry."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, **config_overrides)
    return tiny_model(config, seed=seed), tiny_processor(tokenizer, config)


@contextmanager
def bias_after_token(model: FO1ForConditionalGeneration, token_id: int, bias: torch.Tensor) -> Iterator[None]:
    """Within the block, add ``bias`` ``(V,)`` to the next-token logits of the rows whose newest
    input token is ``token_id`` (cached generation: one new token per row and step)."""
    newest: list[torch.Tensor] = []

    def remember(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        newest[:] = [kwargs["input_ids"][:, -1]]

    def add(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        rows = (newest[0] == token_id).to(out.dtype)[:, None, None]
        return out + rows * bias.to(out.device, out.dtype)

    hooks = [
        model.register_forward_pre_hook(remember, with_kwargs=True),
        model.get_output_embeddings().register_forward_hook(add),
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
