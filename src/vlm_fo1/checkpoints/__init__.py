"""Checkpoint formats: loading and converting the official VLM-FO1 release."""

from vlm_fo1.checkpoints.official import (
    convert_official,
    infer_config,
    is_official_checkpoint,
    load_official,
    load_official_processor,
    map_official_keys,
)

__all__ = [
    "convert_official",
    "infer_config",
    "is_official_checkpoint",
    "load_official",
    "load_official_processor",
    "map_official_keys",
]
