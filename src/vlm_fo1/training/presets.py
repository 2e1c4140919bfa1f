"""Architecture presets for models trained from scratch (the miniature world's stand-in base VLM)."""

from __future__ import annotations

from typing import Any

from vlm_fo1.config import FO1Config
from vlm_fo1.testing import tiny_base_config, tiny_config
from vlm_fo1.tokenization import build_tiny_tokenizer, fo1_token_ids

MINIATURE_MAX_REGIONS = 32
PRESETS = ("mini", "tiny")


def miniature_tokenizer(max_regions: int = MINIATURE_MAX_REGIONS) -> Any:
    """The miniature world's tokenizer: the tiny Qwen2 BPE trained on the world's vocabulary."""
    from vlm_fo1.synthetic import world_vocabulary

    words = world_vocabulary()
    return build_tiny_tokenizer([" ".join(words)] * 4 + words, vocab_size=1200, max_regions=max_regions)


def mini_config(tokenizer: Any, init_range: float = 0.02, **overrides: Any) -> FO1Config:
    """A small but capable FO1 for 112-168 px scenes: 4-layer 128-wide LLM, 4-block 64-wide ViT,
    a 4-stage Florence-style DaViT on 128 px inputs, 32 regions."""
    base = tiny_base_config(
        tokenizer,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
        initializer_range=init_range,
    )
    base["vision_config"].update(
        depth=4,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        out_hidden_size=128,
        initializer_range=init_range,
    )
    base["tie_word_embeddings"] = True  # as Qwen2.5-VL-3B; copying a region name needs no separate head row

    settings: dict[str, Any] = dict(
        base_config=base,
        aux_encoder_name="davit_base_fl",
        aux_encoder_kwargs=dict(embed_dims=[32, 64, 96, 128], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1]),
        aux_image_size=128,
        vit_feature_blocks=[1, 3],
        use_simple_fpn=True,
        fpn_channels=32,
        roi_output_size=4,
        max_regions=MINIATURE_MAX_REGIONS,
        **fo1_token_ids(tokenizer, MINIATURE_MAX_REGIONS),
    )
    settings.update(overrides)
    return FO1Config(**settings)


def preset_config(name: str, tokenizer: Any, **overrides: Any) -> FO1Config:
    """``mini`` (the miniature world's model) or ``tiny`` (the test model)."""
    if name == "mini":
        return mini_config(tokenizer, **overrides)
    if name == "tiny":
        return tiny_config(tokenizer, **overrides)
    raise ValueError(f"model.preset must be one of {list(PRESETS)}, got {name!r}")
