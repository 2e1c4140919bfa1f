"""FO1Config: validation of closed choices, derived values, serialisation."""

from __future__ import annotations

import pytest

from vlm_fo1.config import FO1Config
from vlm_fo1.testing import tiny_config


@pytest.mark.parametrize(
    "field, value",
    [
        ("aux_resize_mode", "stretch"),
        ("region_source", "both"),
        ("connector_type", "mlp3x"),
        ("max_regions", 0),
        ("roi_output_size", -1),
        ("roi_sampling_ratio", 0),
        ("aux_mean", [0.5, 0.5]),
        ("vit_feature_blocks", [99]),
        ("region_token_template", "<region>"),
    ],
)
def test_invalid_values_name_the_field(tokenizer, field, value):
    with pytest.raises(ValueError, match=rf"FO1Config\.{field}"):
        tiny_config(tokenizer, **{field: value})


def test_region_token_ids_must_cover_max_regions(tokenizer):
    with pytest.raises(ValueError, match="region_token_ids must have max_regions=32 ids, got 2"):
        tiny_config(tokenizer, region_token_ids=[1, 2])


def test_defaults_follow_the_release():
    config = FO1Config()
    assert config.feature_blocks == [7, 15, 23, 31]
    assert config.max_regions == 100
    assert config.aux_encoder_name == "davit_huge_fl"
    assert config.aux_image_size == 768 and config.aux_resize_mode == "squash"
    assert config.roi_aligned is False and config.roi_sampling_ratio == -1
    assert config.region_token(7) == "<region7>"


def test_round_trip(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = FO1Config.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.base_config.vision_config.depth == config.base_config.vision_config.depth
    assert loaded.get_text_config().hidden_size == config.text_config.hidden_size


def test_unknown_aux_encoder_is_reported(tokenizer):
    from vlm_fo1.testing import tiny_model

    with pytest.raises(ValueError, match="aux_encoder_name 'no_such_net'"):
        tiny_model(tiny_config(tokenizer, aux_encoder_name="no_such_net"))
