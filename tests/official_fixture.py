"""Write a tiny checkpoint in the official release's layout (official-release.md §1, §9).

Independent of the loader under test: it names tensors by its own explicit rules (the release's
4.50-era Qwen names and Florence-2 DaViT names), and returns the source modules so a test can
assemble a reference model directly from them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlm_fo1.model.simple_fpn import SimpleFeaturePyramid
from vlm_fo1.testing import tiny_base_config, tiny_tokenizer

DAVIT_DIMS = (32, 64, 96, 128)
DAVIT_DEPTHS = (1, 1, 2, 1)
FPN_CHANNELS = 16
ROI_SIZE = 5


@dataclass
class OfficialParts:
    path: Path
    vlm: Qwen2_5_VLForConditionalGeneration
    davit: nn.Module
    fpn: SimpleFeaturePyramid | None
    aux_norm: nn.LayerNorm | None
    vit_norm: nn.LayerNorm | None
    connector: nn.Sequential
    tensors: dict[str, torch.Tensor]


def qwen_450_name(key: str) -> str:
    """transformers-5 Qwen2.5-VL name → the release's (4.50 + wrapper) name."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return "model.vision_tower.image_tower." + key[len("model.visual.") :]
    assert key == "lm_head.weight", key
    return key


_FLORENCE_RULES = (
    (r"^stem\.conv\.", "convs.0.proj."),
    (r"^stem\.norm\.", "convs.0.norm."),
    (r"^stages_(\d+)\.downsample\.conv\.", r"convs.\1.proj."),
    (r"^stages_(\d+)\.downsample\.norm\.", r"convs.\1.norm."),
    (r"^stages_(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2."),
    (r"\.cpe1\.proj\.", ".conv1.fn.dw."),
    (r"\.cpe2\.proj\.", ".conv2.fn.dw."),
    (r"spatial_block\.norm1\.", "spatial_block.window_attn.norm."),
    (r"spatial_block\.attn\.", "spatial_block.window_attn.fn."),
    (r"channel_block\.norm1\.", "channel_block.channel_attn.norm."),
    (r"channel_block\.attn\.", "channel_block.channel_attn.fn."),
    (r"\.norm2\.", ".ffn.norm."),
    (r"\.mlp\.", ".ffn.fn.net."),
)


def florence_name(timm_key: str) -> str:
    """timm ``features_only`` DaViT name → Florence-2 DaViT name."""
    key = timm_key
    for pattern, replacement in _FLORENCE_RULES:
        key = re.sub(pattern, replacement, key)
    return key


def write_official_checkpoint(
    path: Path, *, fpn: bool = True, layer_norm: bool = True, connector: str = "mlp2x_gelu", seed: int = 0
) -> OfficialParts:
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(max_regions=100)
    tokenizer.add_tokens([])  # the release's tokenizer: region names yes, <regionfeat> no
    base = Qwen2_5_VLConfig(**tiny_base_config(tokenizer, vocab_size=len(tokenizer) + 8))
    vlm = Qwen2_5_VLForConditionalGeneration(base).eval()
    davit = timm.create_model(
        "davit_base_fl",
        features_only=True,
        embed_dims=DAVIT_DIMS,
        depths=DAVIT_DEPTHS,
        num_heads=[d // 32 for d in DAVIT_DIMS],
    ).eval()
    vit_hidden = base.vision_config.hidden_size
    fpn_module = SimpleFeaturePyramid(vit_hidden, FPN_CHANNELS).eval() if fpn else None
    vit_dim = 4 * FPN_CHANNELS if fpn else vit_hidden * len(base.vision_config.fullatt_block_indexes)
    aux_dim = sum(DAVIT_DIMS)
    width = aux_dim + vit_dim
    aux_norm = nn.LayerNorm(aux_dim) if layer_norm else None
    vit_norm = nn.LayerNorm(vit_dim) if layer_norm else None
    hidden = base.text_config.hidden_size
    connector_module = (
        nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if connector == "mlp2x_gelu"
        else nn.Sequential(nn.Linear(width, hidden))
    )
    for module in (aux_norm, vit_norm):
        if module is not None:  # not the identity init, so a mix-up would show
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)

    tensors: dict[str, torch.Tensor] = {}
    for key, value in vlm.state_dict().items():
        tensors[qwen_450_name(key)] = value
    for key, value in davit.state_dict().items():
        tensors["model.vision_tower_aux.image_tower." + florence_name(key)] = value
    prefix = "model.object_vp_extractor."
    if fpn_module is not None:
        for key, value in fpn_module.state_dict().items():
            tensors[prefix + "simple_fpn." + key] = value
    if aux_norm is not None:
        tensors[prefix + "aux_region_norm.weight"] = aux_norm.weight.detach()
        tensors[prefix + "aux_region_norm.bias"] = aux_norm.bias.detach()
        tensors[prefix + "vt_region_norm.weight"] = vit_norm.weight.detach()
        tensors[prefix + "vt_region_norm.bias"] = vit_norm.bias.detach()
    tensors[prefix + "vision_tower_region_feature_projector.0.weight"] = torch.randn(
        8, 8
    )  # dead in the release
    for key, value in connector_module.state_dict().items():
        name = key if connector == "mlp2x_gelu" else key.split(".", 1)[1]
        tensors["model.mm_projector_aux." + name] = value

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    text = base.text_config
    vision = base.vision_config
    official = {
        "architectures": ["OmChatQwen25VLForCausalLM"],
        "model_type": "omchat_qwen2_5_vl",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "rms_norm_eps": text.rms_norm_eps,
        "max_position_embeddings": text.max_position_embeddings,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(text.rope_parameters["mrope_section"])},
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "image_token_id": base.image_token_id,
        "video_token_id": base.video_token_id,
        "vision_start_token_id": base.vision_start_token_id,
        "vision_end_token_id": base.vision_end_token_id,
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vision.depth,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size,
            "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "window_size": vision.window_size,
            "patch_size": vision.patch_size,
            "spatial_merge_size": vision.spatial_merge_size,
            "temporal_patch_size": vision.temporal_patch_size,
            "tokens_per_second": 2,
            "in_chans": 3,
        },
        "mm_vision_tower": "resources/Qwen2.5-VL-3B-Instruct-Vision_Tower",
        "mm_vision_tower_aux": "resources/davit-large.pth",
        "mm_projector_type": "identity",
        "mm_projector_aux_type": connector,
        "mm_region_hidden_size": width,
        "mm_hidden_size": vision.out_hidden_size,
        "mm_roi_output_size": ROI_SIZE,
        "mm_use_region_index_token": True,
        "mm_use_vision_tower_region_feature": True,
        "mm_region_feature_combination": "concat",
        "mm_apply_region_layer_norm": layer_norm,
        "mm_use_simpleFPN_for_vt": fpn,
        "mm_apply_position_embedding": True,
        "mm_pos_embedding_strategy": "bbox_based",
        "aux_image_size": 768,
        "aux_image_aspect_ratio": "squash",
        "delay_load": True,
    }
    (path / "config.json").write_text(json.dumps(official, indent=2))
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=448 * 448).save_pretrained(path)
    return OfficialParts(path, vlm, davit, fpn_module, aux_norm, vit_norm, connector_module, tensors)
