"""Stage presets: which parameters train in stage 0, 1 and 2 (one training path, three settings).

- stage 0 (miniature world only): the whole base VLM trains on captions and VQA, standing in
  for a pretrained base;
- stage 1: the base VLM is frozen; the auxiliary encoder, the region encoder and the connector
  train, plus the embedding and output rows of the FO1 tokens (``<regionN>``, ``<regionfeat>``,
  grounding tags), which a base VLM has never seen;
- stage 2: the LLM (all of it, or LoRA adapters on it) and the whole region side train; the
  primary ViT stays frozen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.prompting import tokens as T

logger = logging.getLogger(__name__)

REGION_SIDE = (
    "aux_encoder",
    "region_encoder",
    "connector",
    "region_pointer",
    "region_match",
    "region_label_gate",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainableSummary:
    """What trains: parameter counts per top-level group and the row-masked tensors."""

    stage: int
    trainable: dict[str, int] = field(default_factory=dict)
    frozen: int = 0
    row_masked: list[str] = field(default_factory=list)
    lora: bool = False

    @property
    def total_trainable(self) -> int:
        return sum(self.trainable.values())

    def describe(self) -> str:
        groups = ", ".join(f"{k} {v:,}" for k, v in sorted(self.trainable.items()))
        rows = f"; FO1-token rows of {', '.join(self.row_masked)}" if self.row_masked else ""
        return (
            f"stage {self.stage}: trainable {self.total_trainable:,} ({groups}){rows}; frozen {self.frozen:,}"
        )


def fo1_token_ids(model: FO1ForConditionalGeneration, tokenizer) -> list[int]:
    """Ids of every FO1 token the tokenizer has (placeholder, region names, tags)."""
    vocab = tokenizer.get_vocab()
    names = [
        T.REGION_FEATURE_TOKEN,
        *T.region_tokens(model.config.max_regions),
        *T.GROUNDING_TAGS,
        *T.REASONING_TAGS,
    ]
    return sorted(vocab[n] for n in names if n in vocab)


def _row_mask_hook(rows: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * rows.to(grad.device, grad.dtype)[:, None]

    return hook


def _train_rows(weight: nn.Parameter, ids: list[int]) -> None:
    """Let only rows ``ids`` of ``weight`` learn (a gradient mask; no weight decay may touch it)."""
    rows = torch.zeros(weight.shape[0])
    rows[ids] = 1.0
    weight.requires_grad_(True)
    weight.register_hook(_row_mask_hook(rows))
    weight._fo1_row_masked = True  # read by the trainer to exclude it from weight decay


def inject_lora(model: FO1ForConditionalGeneration, rank: int) -> None:
    """LoRA adapters on the LLM's linear layers, injected in place (the model stays an FO1 model)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    inject_adapter_in_model(config, model.vlm.model.language_model)


def merge_lora(model: FO1ForConditionalGeneration) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns the count."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
            merged += 1
    return merged


def configure_trainable(
    model: FO1ForConditionalGeneration,
    stage: int,
    tokenizer,
    *,
    lora: bool = False,
    lora_rank: int = 16,
    freeze: Sequence[str] = (),
) -> TrainableSummary:
    """Freeze everything, unfreeze the stage's groups, then re-freeze names starting with any of
    ``freeze``; returns what trains."""
    model.requires_grad_(False)
    summary = TrainableSummary(stage=stage, lora=lora)
    vlm = model.vlm
    if stage == 0:
        vlm.requires_grad_(True)
    else:
        for name in REGION_SIDE:
            module = getattr(model, name)
            if module is not None:
                module.requires_grad_(True)
    if stage == 2:
        if lora:
            inject_lora(model, lora_rank)  # adapters are created trainable
        else:
            vlm.model.language_model.requires_grad_(True)
            vlm.lm_head.requires_grad_(True)
    if stage == 1 or (stage == 2 and lora):
        ids = fo1_token_ids(model, tokenizer)
        for label, weight in (
            ("input embeddings", vlm.get_input_embeddings().weight),
            ("LM head", vlm.lm_head.weight),
        ):
            if not getattr(weight, "_fo1_row_masked", False):
                _train_rows(weight, ids)
                summary.row_masked.append(label)
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in freeze):
            param.requires_grad_(False)
    for name, param in model.named_parameters():
        parts = name.split(".")
        group = ".".join(
            parts[:3] if name.startswith("vlm.model.") else parts[:2] if parts[0] == "vlm" else parts[:1]
        )
        if param.requires_grad:
            summary.trainable[group] = summary.trainable.get(group, 0) + param.numel()
        else:
            summary.frozen += param.numel()
    logger.info(summary.describe())
    return summary
