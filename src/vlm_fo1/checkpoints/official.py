"""Load the official VLM-FO1 release (``omchat_qwen2_5_vl`` layout) into ``FO1ForConditionalGeneration``.

The release's ``config.json`` is a flat (transformers 4.50-style) Qwen2.5-VL config plus ``mm_*`` /
``aux_*`` keys; its weights are sharded safetensors with the prefixes of official-release.md §1.2.
The region-encoder options are inferred from tensor names and shapes and cross-checked against
the config (§1.5 "decision rule"); every tensor is mapped to our names, and loading fails with a
list of unmapped, missing or mis-shaped tensors. Nothing of the release's code is used.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from timm.models.davit import checkpoint_filter_fn
from transformers.initialization import no_init_weights

from vlm_fo1.config import FO1Config
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.prompting import tokens as T
from vlm_fo1.tokenization import fo1_token_ids

logger = logging.getLogger(__name__)

OFFICIAL_MODEL_TYPE = "omchat_qwen2_5_vl"
AUX_PREFIX = "model.vision_tower_aux.image_tower."
FO1_PREFIX = "model.object_vp_extractor."
# Built by the release but never used in its forward pass (official-release.md §1.2).
DEAD_PREFIXES = (FO1_PREFIX + "vision_tower_region_feature_projector.",)
PREFIX_MAP = (
    ("model.embed_tokens.", "vlm.model.language_model.embed_tokens."),
    ("model.layers.", "vlm.model.language_model.layers."),
    ("model.norm.", "vlm.model.language_model.norm."),
    ("lm_head.", "vlm.lm_head."),
    ("model.vision_tower.image_tower.", "vlm.model.visual."),
    (FO1_PREFIX + "simple_fpn.", "region_encoder.simple_fpn."),
    (FO1_PREFIX + "aux_region_norm.", "region_encoder.aux_region_norm."),
    (FO1_PREFIX + "vt_region_norm.", "region_encoder.vt_region_norm."),
    ("model.mm_projector_aux.", "connector."),
)
FLORENCE_HEAD_DIM = 32  # every released Florence-2 DaViT has 32 channels per head / group


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]


def is_official_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local directory in the release's layout."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == OFFICIAL_MODEL_TYPE
    except json.JSONDecodeError:
        return False


def _require_official(path: str | Path) -> Path:
    if not is_official_checkpoint(path):
        raise ValueError(
            f"expected a local directory in the official release's layout (config.json with model_type "
            f"{OFFICIAL_MODEL_TYPE!r}), got {str(path)!r}"
        )
    return Path(path)


def read_tensor_index(path: str | Path) -> dict[str, TensorInfo]:
    """Name → (file, shape) of every tensor in the directory's safetensors shards (no data loaded)."""
    path = Path(path)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted({path / f for f in json.loads(index_file.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights found in {str(path)!r}")
    index: dict[str, TensorInfo] = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                index[key] = TensorInfo(file, tuple(handle.get_slice(key).get_shape()))
    return index


def florence_to_timm(keys: list[str]) -> dict[str, str]:
    """Florence-2 DaViT tensor names (``convs.0.proj.weight`` …) → timm ``features_only`` names.

    Uses timm's own Florence-2 converter, which recognises the format by ``convs.0.proj.weight``.
    """
    if "convs.0.proj.weight" not in keys:
        raise ValueError("auxiliary tower: missing tensor convs.0.proj.weight (not a Florence-2 DaViT)")
    renamed = checkpoint_filter_fn({"vision_tower." + k: k for k in keys}, None)
    return {old: re.sub(r"^stages\.(\d+)\.", r"stages_\1.", new) for new, old in renamed.items()}


def map_official_keys(keys: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Release tensor names → ours: ``(mapping, ignored, unmapped)``.

    ``ignored`` are tensors the release never uses; ``unmapped`` belong to no known module.
    """
    mapping: dict[str, str] = {}
    ignored: list[str] = []
    unmapped: list[str] = []
    aux_keys = [k[len(AUX_PREFIX) :] for k in keys if k.startswith(AUX_PREFIX)]
    if aux_keys:
        mapping.update(
            {AUX_PREFIX + old: "aux_encoder." + new for old, new in florence_to_timm(aux_keys).items()}
        )
    for key in keys:
        if key.startswith(AUX_PREFIX):
            if key not in mapping:
                unmapped.append(key)
        elif key.startswith(DEAD_PREFIXES):
            ignored.append(key)
        else:
            target = next((t + key[len(s) :] for s, t in PREFIX_MAP if key.startswith(s)), None)
            if target is None:
                unmapped.append(key)
            else:
                mapping[key] = target
    return mapping, ignored, unmapped


# -- config inference ------------------------------------------------------------------------------------
def _base_config(official: dict[str, Any]) -> dict[str, Any]:
    base = {
        k: v for k, v in official.items() if not k.startswith(("mm_", "aux_")) and k not in _NOT_BASE_KEYS
    }
    base["model_type"] = "qwen2_5_vl"  # the flat 4.50 layout; text keys move into text_config
    return base


_NOT_BASE_KEYS = {
    "architectures",
    "model_type",
    "delay_load",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "tune_mm_mlp_adapter",
    "rotary_type",
    "multi_scale_im",
    "vision_tower_aux",
    "auto_map",
    "_name_or_path",
    "transformers_version",
}


def _aux_encoder(index: dict[str, TensorInfo]) -> tuple[str, dict[str, Any]]:
    dims, depths = [], []
    for stage in range(4):
        conv = index.get(f"{AUX_PREFIX}convs.{stage}.proj.weight")
        if conv is None:
            raise ValueError(f"auxiliary tower: missing tensor {AUX_PREFIX}convs.{stage}.proj.weight")
        dims.append(conv.shape[0])
        blocks = {
            int(m.group(1))
            for k in index
            if (m := re.match(rf"{re.escape(AUX_PREFIX)}blocks\.{stage}\.(\d+)\.", k))
        }
        depths.append(len(blocks))
    if any(d % FLORENCE_HEAD_DIM for d in dims):
        raise ValueError(f"auxiliary DaViT widths must be multiples of {FLORENCE_HEAD_DIM}, got {dims}")
    name = "davit_huge_fl" if dims == [256, 512, 1024, 2048] else "davit_base_fl"
    kwargs = {"embed_dims": dims, "depths": depths, "num_heads": [d // FLORENCE_HEAD_DIM for d in dims]}
    return name, kwargs


def _connector(index: dict[str, TensorInfo]) -> tuple[str, int]:
    if "model.mm_projector_aux.0.weight" in index and "model.mm_projector_aux.2.weight" in index:
        return "mlp2x_gelu", index["model.mm_projector_aux.0.weight"].shape[1]
    if "model.mm_projector_aux.weight" in index:
        return "linear", index["model.mm_projector_aux.weight"].shape[1]
    raise ValueError(
        "region connector: expected model.mm_projector_aux.{0,2}.weight or .weight, found neither"
    )


def infer_config(official: dict[str, Any], index: dict[str, TensorInfo]) -> FO1Config:
    """Our ``FO1Config`` for a release config.json and its tensors; ValueError on any inconsistency."""
    if official.get("model_type") != OFFICIAL_MODEL_TYPE:
        raise ValueError(f"expected model_type {OFFICIAL_MODEL_TYPE!r}, got {official.get('model_type')!r}")
    if any(k.startswith("model.mm_projector.") for k in index):
        raise ValueError(
            "the checkpoint has an image projector (model.mm_projector.*); only identity is supported"
        )
    strategy = official.get("mm_pos_embedding_strategy", "bbox_based")
    if strategy != "bbox_based":
        raise ValueError(f"mm_pos_embedding_strategy {strategy!r} is not supported (only 'bbox_based')")
    combination = official.get("mm_region_feature_combination", "concat")
    if combination not in ("concat", "concat_aux_pos"):
        raise ValueError(f"mm_region_feature_combination {combination!r} is not supported (concat only)")
    if "aux_image_aspect_ratio" not in official:
        raise ValueError("config.json lacks aux_image_aspect_ratio (the release requires it)")
    has_aux = any(k.startswith(AUX_PREFIX) for k in index)
    use_vit = bool(official.get("mm_use_vision_tower_region_feature", False))
    vit_only = bool(official.get("mm_use_vt_region_feature_only", False))
    source = "vit" if vit_only else ("hybrid" if use_vit and has_aux else "aux")
    fpn = any(k.startswith(FO1_PREFIX + "simple_fpn.") for k in index)
    norms = any(
        k.startswith((FO1_PREFIX + "aux_region_norm.", FO1_PREFIX + "vt_region_norm.")) for k in index
    )
    connector, width = _connector(index)
    aux_name, aux_kwargs = _aux_encoder(index) if has_aux else ("davit_huge_fl", {})
    base = _base_config(official)
    fullatt = list(base.get("vision_config", {}).get("fullatt_block_indexes", [7, 15, 23, 31]))
    config = FO1Config(
        base_config=base,
        aux_encoder_name=aux_name,
        aux_encoder_kwargs=aux_kwargs,
        aux_image_size=768,  # the release's DaViT processor is fixed at 768 (official-release.md §2.3)
        aux_resize_mode=official["aux_image_aspect_ratio"],
        vit_feature_blocks=fullatt[-1:] if fpn else fullatt,
        use_simple_fpn=fpn,
        fpn_channels=index[FO1_PREFIX + "simple_fpn.simfp_3.0.weight"].shape[0] if fpn else 512,
        roi_output_size=int(official.get("mm_roi_output_size", 7)),
        region_source=source,
        use_position_embedding=bool(official.get("mm_apply_position_embedding", True)),
        region_layer_norm=norms,
        connector_type=connector,
        max_regions=T.DEFAULT_MAX_REGIONS,
    )
    _check_region_width(config, official, width, aux_kwargs)
    return config


def _check_region_width(
    config: FO1Config, official: dict[str, Any], width: int, aux_kwargs: dict[str, Any]
) -> None:
    aux = sum(aux_kwargs.get("embed_dims", [])) if config.uses_aux_regions else 0
    vit_hidden = int(config.vit_config.hidden_size) * len(config.feature_blocks)
    vit = (config.fpn_channels * 4 if config.use_simple_fpn else vit_hidden) if config.uses_vit_regions else 0
    declared = official.get("mm_region_hidden_size")
    if aux + vit != width or (declared is not None and int(declared) != width):
        raise ValueError(
            f"region width mismatch: connector input {width}, mm_region_hidden_size {declared}, "
            f"inferred aux {aux} + ViT {vit} = {aux + vit}"
        )


# -- loading ---------------------------------------------------------------------------------------------
def _plan(model: torch.nn.Module, index: dict[str, TensorInfo]) -> dict[str, str]:
    """Release name → our name for every tensor; ValueError listing unmapped/missing/mis-shaped ones."""
    params = dict(model.state_dict())
    mapping, ignored, unmapped = map_official_keys(list(index))
    plan, wrong = {}, []
    for key, target in mapping.items():
        if target not in params:
            unmapped.append(f"{key} -> {target}")
        elif tuple(params[target].shape) != index[key].shape:
            wrong.append(f"{key}: checkpoint {list(index[key].shape)} vs model {list(params[target].shape)}")
        else:
            plan[key] = target
    missing = sorted(set(params) - set(plan.values()) - set(_tied_targets(model)))
    if unmapped or missing or wrong:
        raise ValueError(
            "the checkpoint does not match the model built from its config:\n"
            + _problems("unmapped checkpoint tensors", unmapped)
            + _problems("missing model tensors", missing)
            + _problems("shape mismatches", wrong)
        )
    if ignored:
        logger.info("ignored %d tensors the release never uses (%s…)", len(ignored), ignored[0])
    return plan


def _tied_targets(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "all_tied_weights_keys", {}) or {})


def _problems(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "\n  ".join(items[:20]) + (f"\n  … and {len(items) - 20} more" if len(items) > 20 else "")
    return f"{title} ({len(items)}):\n  {shown}\n"


def load_official(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> FO1ForConditionalGeneration:
    """Build an FO1 model from a release directory and load every tensor (streamed, shard by shard).

    Args:
        path: local directory with the release's config.json and safetensors shards.
        dtype: parameter dtype (default: the checkpoint's ``torch_dtype``, else float32).
        device: where the model ends up.
    """
    path = _require_official(path)
    official = json.loads((path / "config.json").read_text())
    index = read_tensor_index(path)
    config = infer_config(official, index)
    _set_token_ids(config, official_tokenizer(path, config.max_regions))
    dtype = dtype or getattr(torch, str(official.get("torch_dtype", "float32")), torch.float32)
    with no_init_weights():
        model = FO1ForConditionalGeneration._from_config(config, dtype=dtype)
    plan = _plan(model, index)
    params = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for key in plan:
        by_file.setdefault(index[key].file, []).append(key)
    with torch.no_grad():
        for file, keys in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for key in keys:
                    params[plan[key]].copy_(handle.get_tensor(key))
    model.tie_weights()
    return model.to(device).eval()


def official_tokenizer(path: str | Path, max_regions: int = T.DEFAULT_MAX_REGIONS) -> Any:
    """The release directory's tokenizer, with ``<regionfeat>`` added when it is missing.

    The release splices region features at a placeholder that is not a token (id -300); we need
    a real placeholder id, so one is added (it fits the embedding table's unused rows; its
    embedding is always replaced). ``<region0>``… must already be single tokens: the model was
    trained on them, and new embeddings would mean nothing to it.
    """
    from transformers import Qwen2Tokenizer  # local: only loading needs a tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(path)
    vocab = tokenizer.get_vocab()
    missing = [n for n in T.region_tokens(max_regions) if n not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer in {str(path)!r} lacks {len(missing)} region tokens (e.g. {missing[0]!r}); "
            "FO1 needs <region0>…<region99> as single tokens"
        )
    if T.REGION_FEATURE_TOKEN not in vocab:
        tokenizer.add_tokens([T.REGION_FEATURE_TOKEN])
    return tokenizer


def _set_token_ids(config: FO1Config, tokenizer: Any) -> None:
    rows = int(config.text_config.vocab_size)
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the embedding table only {rows} rows")
    for name, value in fo1_token_ids(tokenizer, config.max_regions).items():
        setattr(config, name, value)


def load_official_processor(path: str | Path) -> Any:
    """An ``FO1Processor`` for a release directory (tokenizer, Qwen image processor, DaViT input)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlm_fo1.processing import FO1Processor  # local: processing may import this module lazily

    path = _require_official(path)
    official = json.loads((path / "config.json").read_text())
    if "aux_image_aspect_ratio" not in official:
        raise ValueError("config.json lacks aux_image_aspect_ratio (the release requires it)")
    return FO1Processor(
        official_tokenizer(path),
        Qwen2VLImageProcessorPil.from_pretrained(path),
        max_regions=T.DEFAULT_MAX_REGIONS,
        aux_image_size=768,
        aux_resize_mode=official["aux_image_aspect_ratio"],
    )


def convert_official(
    source: str | Path, destination: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Rewrite a release directory as an FO1 checkpoint (``from_pretrained``-ready) at ``destination``."""
    model = load_official(source, dtype=dtype)
    processor = load_official_processor(source)
    destination = Path(destination)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    return destination
