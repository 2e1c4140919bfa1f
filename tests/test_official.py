"""Loading the official release layout: config inference, key mapping, strictness, equivalence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_fo1.checkpoints import (
    convert_official,
    infer_config,
    is_official_checkpoint,
    load_official,
    map_official_keys,
)
from vlm_fo1.checkpoints.official import read_tensor_index
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.processing import FO1Processor
from vlm_fo1.prompting import templates as P

from conftest import make_image
from official_fixture import DAVIT_DIMS, FPN_CHANNELS, ROI_SIZE, write_official_checkpoint

BOXES = [[0, 0, 50, 40], [20, 30, 140, 95], [100, 5, 149, 60]]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "VLM-FO1-tiny")


def _reference(parts, config) -> FO1ForConditionalGeneration:
    """Our model with each source module's weights loaded directly (no name mapping involved)."""
    model = FO1ForConditionalGeneration(config).eval()
    model.vlm.load_state_dict(parts.vlm.state_dict())
    model.aux_encoder.load_state_dict(parts.davit.state_dict())
    if parts.fpn is not None:
        model.region_encoder.simple_fpn.load_state_dict(parts.fpn.state_dict())
    if parts.aux_norm is not None:
        model.region_encoder.aux_region_norm.load_state_dict(parts.aux_norm.state_dict())
        model.region_encoder.vt_region_norm.load_state_dict(parts.vit_norm.state_dict())
    connector = parts.connector.state_dict()
    if isinstance(model.connector, torch.nn.Linear):
        connector = {k.split(".", 1)[1]: v for k, v in connector.items()}
    model.connector.load_state_dict(connector)
    return model


def test_detects_layout(official, tmp_path):
    assert is_official_checkpoint(official.path)
    assert not is_official_checkpoint(tmp_path)


def test_infers_region_encoder_options(official):
    config = infer_config(
        json.loads((official.path / "config.json").read_text()), read_tensor_index(official.path)
    )
    assert config.region_source == "hybrid"
    assert config.use_simple_fpn and config.fpn_channels == FPN_CHANNELS
    assert config.vit_feature_blocks == [3]  # FPN: the last full-attention block only
    assert config.region_layer_norm
    assert config.connector_type == "mlp2x_gelu"
    assert config.roi_output_size == ROI_SIZE
    assert config.aux_encoder_kwargs["embed_dims"] == list(DAVIT_DIMS)
    assert config.aux_encoder_kwargs["depths"] == [1, 1, 2, 1]
    assert config.aux_resize_mode == "squash" and config.aux_image_size == 768
    assert config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]


def test_florence_names_map_to_timm():
    keys = [
        "model.vision_tower_aux.image_tower.convs.0.proj.weight",
        "model.vision_tower_aux.image_tower.convs.2.norm.bias",
        "model.vision_tower_aux.image_tower.blocks.2.1.spatial_block.window_attn.fn.qkv.weight",
        "model.vision_tower_aux.image_tower.blocks.0.0.channel_block.conv2.fn.dw.weight",
        "model.vision_tower_aux.image_tower.blocks.3.0.channel_block.ffn.fn.net.fc2.bias",
        "model.vision_tower_aux.image_tower.blocks.1.0.spatial_block.ffn.norm.weight",
        "model.layers.3.self_attn.q_proj.bias",
        "model.vision_tower.image_tower.blocks.31.attn.qkv.weight",
        "model.object_vp_extractor.simple_fpn.simfp_1.4.norm.weight",
        "model.object_vp_extractor.vision_tower_region_feature_projector.0.weight",
        "model.mm_projector_aux.2.bias",
        "lm_head.weight",
        "model.something_else.weight",
    ]
    mapping, ignored, unmapped = map_official_keys(keys)
    assert mapping == {
        keys[0]: "aux_encoder.stem.conv.weight",
        keys[1]: "aux_encoder.stages_2.downsample.norm.bias",
        keys[2]: "aux_encoder.stages_2.blocks.1.spatial_block.attn.qkv.weight",
        keys[3]: "aux_encoder.stages_0.blocks.0.channel_block.cpe2.proj.weight",
        keys[4]: "aux_encoder.stages_3.blocks.0.channel_block.mlp.fc2.bias",
        keys[5]: "aux_encoder.stages_1.blocks.0.spatial_block.norm2.weight",
        keys[6]: "vlm.model.language_model.layers.3.self_attn.q_proj.bias",
        keys[7]: "vlm.model.visual.blocks.31.attn.qkv.weight",
        keys[8]: "region_encoder.simple_fpn.simfp_1.4.norm.weight",
        keys[10]: "connector.2.bias",
        keys[11]: "vlm.lm_head.weight",
    }
    assert ignored == [keys[9]]
    assert unmapped == [keys[12]]


def test_loaded_model_equals_reference_built_from_parts(official):
    model = load_official(official.path)
    reference = _reference(official, model.config)
    processor = FO1Processor.from_pretrained(official.path)
    batch = processor(P.detect("cat"), images=make_image(150, 100), boxes=BOXES)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    for key, value in official.tensors.items():  # spot check: every source tensor landed somewhere equal
        if key.startswith("model.vision_tower_aux.image_tower.convs.0.proj"):
            torch.testing.assert_close(
                model.aux_encoder.stem.conv.weight
                if key.endswith("weight")
                else model.aux_encoder.stem.conv.bias,
                value,
            )


def test_from_pretrained_dispatches_and_generates(official):
    model = FO1ForConditionalGeneration.from_pretrained(official.path, dtype=torch.float32)
    processor = FO1Processor.from_pretrained(official.path)
    assert processor.aux_resize_mode == "squash" and processor.aux_image_size == 768
    assert model.config.region_feature_token_id == processor.region_feature_token_id
    assert model.config.region_token_ids == processor.region_token_ids
    batch = processor(P.count("cats"), images=make_image(150, 100), boxes=BOXES)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


@pytest.mark.parametrize(
    "fpn, layer_norm, connector", [(False, False, "linear"), (False, True, "mlp2x_gelu")]
)
def test_other_release_variants(tmp_path, fpn, layer_norm, connector):
    parts = write_official_checkpoint(tmp_path / "ckpt", fpn=fpn, layer_norm=layer_norm, connector=connector)
    model = load_official(parts.path)
    assert model.config.use_simple_fpn == fpn and model.config.region_layer_norm == layer_norm
    assert model.config.connector_type == connector
    assert model.config.vit_feature_blocks == [1, 3]  # without FPN: all full-attention blocks
    reference = _reference(parts, model.config)
    batch = FO1Processor.from_pretrained(parts.path)(
        P.detect("cat"), images=make_image(150, 100), boxes=BOXES
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def _edit_shard(path, edit):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update(dict.fromkeys(tensors, shard.name))
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor_is_listed(tmp_path):
    parts = write_official_checkpoint(tmp_path / "ckpt")
    victim = "model.mm_projector_aux.0.bias"
    _edit_shard(parts.path, lambda t: t.pop(victim))
    with pytest.raises(ValueError, match=r"missing model tensors \(1\):\n  connector.0.bias"):
        load_official(parts.path)


def test_unexpected_tensor_is_listed(tmp_path):
    parts = write_official_checkpoint(tmp_path / "ckpt")
    _edit_shard(parts.path, lambda t: t.update({"model.mystery.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unmapped checkpoint tensors \(1\):\n  model.mystery.weight"):
        load_official(parts.path)


def test_shape_mismatch_is_listed(tmp_path):
    parts = write_official_checkpoint(tmp_path / "ckpt")
    _edit_shard(parts.path, lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"shape mismatches \(1\):\n  model.norm.weight: checkpoint \[3\]"):
        load_official(parts.path)


def test_inconsistent_config_is_rejected(tmp_path):
    parts = write_official_checkpoint(tmp_path / "ckpt")
    config = json.loads((parts.path / "config.json").read_text())
    index = read_tensor_index(parts.path)
    with pytest.raises(ValueError, match="region width mismatch"):
        infer_config({**config, "mm_region_hidden_size": 12345}, index)
    with pytest.raises(ValueError, match="aux_image_aspect_ratio"):
        infer_config({k: v for k, v in config.items() if k != "aux_image_aspect_ratio"}, index)
    with pytest.raises(ValueError, match="not supported"):
        infer_config({**config, "mm_pos_embedding_strategy": "hybrid"}, index)
    with pytest.raises(ValueError, match="image projector"):
        infer_config(config, {**index, "model.mm_projector.0.weight": index["model.norm.weight"]})


def test_convert_official_round_trip(official, tmp_path):
    converted = convert_official(official.path, tmp_path / "fo1")
    model = FO1ForConditionalGeneration.from_pretrained(converted)
    processor = FO1Processor.from_pretrained(converted)
    original = load_official(official.path)
    batch = processor(P.detect("cat"), images=make_image(150, 100), boxes=BOXES)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, rtol=0, atol=0)
