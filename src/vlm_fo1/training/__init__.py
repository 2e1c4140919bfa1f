"""Training: run configs, stage presets and one training path on the transformers Trainer."""

from vlm_fo1.training.config import RunConfig, load_run_config, run_config_from_dict
from vlm_fo1.training.stages import TrainableSummary, configure_trainable, merge_lora
from vlm_fo1.training.trainer import TrainResult, train

__all__ = [
    "RunConfig",
    "TrainResult",
    "TrainableSummary",
    "configure_trainable",
    "load_run_config",
    "merge_lora",
    "run_config_from_dict",
    "train",
]
