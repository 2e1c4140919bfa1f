"""One training path for every stage, on the transformers ``Trainer`` (so accelerate, DeepSpeed,
FSDP and multi-GPU work through ``TrainingArguments``, with no distributed code of ours).

``train(run_config)``: builds or loads the model, sets the stage's trainable parameters, mixes
the data sources, trains with a cosine schedule, writes checkpoints atomically (staged in a
hidden folder, then renamed), resumes from the last complete checkpoint of a killed run, and
saves the final model + processor in ``output.dir`` with ``train_summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from vlm_fo1.config import FO1Config
from vlm_fo1.data.collate import FO1Collator, RecordDataset
from vlm_fo1.data.records import ConversationRecord, pack_conversations, permute_regions, read_records
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.processing import FO1Processor
from vlm_fo1.tokenization import fo1_token_ids, objects_close_id
from vlm_fo1.training.config import DataSpec, RunConfig
from vlm_fo1.training.losses import region_token_loss
from vlm_fo1.training.presets import miniature_tokenizer, preset_config
from vlm_fo1.training.stages import REGION_SIDE, TrainableSummary, configure_trainable, merge_lora

logger = logging.getLogger(__name__)

STAGING = ".staging"
SUMMARY_NAME = "train_summary.json"
MAX_PIXELS = 448 * 448  # the miniature world's images are small; keeps ViT grids small too


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    seconds: float
    final_loss: float | None
    resumed_from: str | None
    trainable: TrainableSummary | None

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "final_loss": self.final_loss,
            "resumed_from": self.resumed_from,
            "trainable": self.trainable.trainable if self.trainable else None,
        }


class FO1Trainer(Trainer):
    """``Trainer`` with atomic checkpoints and no weight decay on row-masked embeddings."""

    def _get_output_dir(self, trial: Any) -> str:
        real = super()._get_output_dir(trial)
        return os.path.join(real, STAGING) if getattr(self, "_staging", False) else real

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        real = super()._get_output_dir(trial)
        staging = Path(real) / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.should_save:
            for folder in staging.iterdir():
                target = Path(real) / folder.name
                shutil.rmtree(target, ignore_errors=True)
                os.replace(folder, target)  # atomic on one filesystem
            shutil.rmtree(staging, ignore_errors=True)
            _rotate(Path(real), self.args.save_total_limit)

    region_lr_scale: float = 1.0
    region_loss_weight: float = 1.0
    region_set_loss: bool = False
    close_id: int | None = None
    close_loss_weight: float = 1.0

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """The model's loss, or with ``region_loss_weight != 1`` or ``region_set_loss`` the loss of
        ``training.losses.region_token_loss``: every ``<regionN>`` target counts
        ``region_loss_weight`` times (the choice of region is a few tokens of each answer; the rest
        is grammar and labels, learnt much sooner), and is trained on the set of regions still to
        be named with ``region_set_loss``; ``</objects>`` targets count ``close_loss_weight`` times."""
        if self.region_loss_weight == 1.0 and self.close_loss_weight == 1.0 and not self.region_set_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        ids = self.model.config.region_token_ids
        loss = region_token_loss(
            outputs.logits,
            labels,
            ids,
            self.region_loss_weight,
            set_targets=self.region_set_loss,
            close_id=self.close_id,
            close_weight=self.close_loss_weight,
        )
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: Any = None) -> Any:
        """AdamW over four groups: (decay or not) × (region side or not); the region side's
        learning rate is ``region_lr_scale`` times the base rate (it starts from scratch)."""
        if self.optimizer is not None:
            return self.optimizer
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in decay, name.split(".")[0] in REGION_SIDE), []).append(param)
        lr = self.args.learning_rate
        params = [
            {
                "params": ps,
                "weight_decay": self.args.weight_decay if d else 0.0,
                "lr": lr * (self.region_lr_scale if r else 1.0),
            }
            for (d, r), ps in groups.items()
        ]
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(params, lr=lr, **kwargs)
        return self.optimizer

    def get_decay_parameter_names(self, model: Any) -> list[str]:
        names = super().get_decay_parameter_names(model)
        masked = {n for n, p in model.named_parameters() if getattr(p, "_fo1_row_masked", False)}
        return [n for n in names if n not in masked]


def _rotate(run_dir: Path, limit: int | None) -> None:
    if not limit:
        return
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


class JsonlLogger(TrainerCallback):
    """Appends every log entry (loss, learning rate, step) to ``log.jsonl`` in the run folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs and state.is_world_process_zero:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# -- model and data --------------------------------------------------------------------------------------
def init_model(config: RunConfig) -> tuple[FO1ForConditionalGeneration, FO1Processor]:
    """Build (stage 0) or load the model and a processor that matches it."""
    spec = config.model
    if spec.init is None:
        tokenizer = miniature_tokenizer()
        fo1_config = preset_config(spec.preset, tokenizer, **spec.overrides)
        model = FO1ForConditionalGeneration(fo1_config)
        return model, FO1Processor.from_config(tokenizer, fo1_config, max_pixels=MAX_PIXELS)
    loaded = FO1Processor.from_pretrained(spec.init)
    if spec.keep == "all":
        model = FO1ForConditionalGeneration.from_pretrained(spec.init, **spec.overrides)
    else:
        source = FO1ForConditionalGeneration.from_pretrained(spec.init)
        regions = spec.overrides.get("max_regions", source.config.max_regions)
        ids = fo1_token_ids(loaded.tokenizer, regions)  # the tokenizer's, not an older config's
        fo1_config = FO1Config.from_dict({**source.config.to_dict(), **ids, **spec.overrides})
        model = FO1ForConditionalGeneration(fo1_config)
        model.vlm.load_state_dict(source.vlm.state_dict())
    settings = {**loaded.settings(), "max_regions": model.config.max_regions}
    for key in ("aux_image_size", "aux_resize_mode", "aux_mean", "aux_std"):
        settings[key] = getattr(model.config, key)
    return model, FO1Processor(loaded.tokenizer, loaded.image_processor, **settings)


def _keep(record: ConversationRecord, spec: DataSpec, tasks: list[str] | None) -> bool:
    if spec.exclude_negatives and record.meta.get("negative"):
        return False
    return tasks is None or record.meta.get("task", record.task) in tasks


def build_dataset(spec: DataSpec, num_samples: int, seed: int) -> RecordDataset:
    """``num_samples`` items drawn from the sources in proportion to their weights (seeded)."""
    rng = random.Random(seed)
    sources = []
    for source in spec.train:
        records = [r for r in read_records(source.path) if _keep(r, spec, source.tasks)]
        if spec.pack_turns > 1:
            records = pack_conversations(records, spec.pack_turns)
        if not records:
            raise ValueError(
                f"data source {source.path!r} has no records after filtering (tasks={source.tasks})"
            )
        sources.append((records, Path(source.path).parent, source.weight))
    total = sum(w for _, _, w in sources)
    items: list[tuple[ConversationRecord, Path]] = []
    for records, root, weight in sources:
        share = round(num_samples * weight / total)
        order = (
            [records[i % len(records)] for i in range(share)]
            if share > len(records)
            else rng.sample(records, share)
        )
        items.extend((r, root) for r in order)
    rng.shuffle(items)
    if spec.shuffle_regions:  # a fresh listing order per drawn item (repeats get different ones)
        share = float(spec.shuffle_regions)
        items = [
            (permute_regions(r, rng.sample(range(r.num_regions), r.num_regions)), root)
            if share >= 1.0 or rng.random() < share  # no draw at 1: the same stream as always shuffling
            else (r, root)
            for r, root in items
        ]
    return RecordDataset([r for r, _ in items], [root for _, root in items])


# -- the run -----------------------------------------------------------------------------------------------
def training_arguments(config: RunConfig, progress: bool) -> TrainingArguments:
    optim = config.optim
    return TrainingArguments(
        output_dir=config.output.dir,
        max_steps=optim.steps,
        per_device_train_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": optim.min_lr_ratio},
        warmup_steps=max(1, round(optim.warmup_ratio * optim.steps)),
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        logging_steps=config.output.logging_steps,
        save_strategy="steps",
        save_steps=config.output.save_steps,
        save_total_limit=config.output.keep,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        report_to=[],
        dataloader_num_workers=optim.num_workers,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        save_only_model=False,
    )


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """``{"optim.lr": …}``: everything that decides the weights (output settings do not)."""
    flat: dict[str, Any] = {}
    for section, value in config.items():
        if section == "output":
            continue
        if isinstance(value, dict):
            flat.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            flat[section] = value
    return flat


def _check_same_run(out: Path, config: RunConfig) -> None:
    """Refuse to resume checkpoints written under a different config (a silent mix-up otherwise)."""
    saved_file = out / "run_config.yaml"
    if not config.output.resume or not saved_file.is_file() or not any(out.glob("checkpoint-*")):
        return
    saved, current = _flat(yaml.safe_load(saved_file.read_text())), _flat(config.to_dict())
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
        raise ValueError(
            f"{out} holds checkpoints of a run with another config (changed: {', '.join(changed)}); "
            "use a new output.dir, or set output.resume=false to start over"
        )


def train(config: RunConfig, *, progress: bool = True) -> TrainResult:
    """Run one stage; resumes a killed run from its last complete checkpoint."""
    start = time.perf_counter()
    out = Path(config.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # a save that was killed half way
    _check_same_run(out, config)
    if not config.output.resume:
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old)
        (out / "log.jsonl").unlink(missing_ok=True)
    (out / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    set_seed(config.seed)
    model, processor = init_model(config)
    trainable = configure_trainable(
        model,
        config.stage,
        processor.tokenizer,
        lora=config.model.lora,
        lora_rank=config.model.lora_rank,
        freeze=config.model.freeze,
    )

    samples = config.optim.steps * config.optim.batch_size * config.optim.grad_accum  # conversations
    dataset = build_dataset(config.data, samples, config.seed)
    collator = FO1Collator(processor, max_length=config.data.max_length)
    trainer = FO1Trainer(
        model=model,
        args=training_arguments(config, progress),
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[JsonlLogger(out / "log.jsonl")],
    )
    trainer.region_lr_scale = config.optim.region_lr_scale
    trainer.region_loss_weight = config.optim.region_loss_weight
    trainer.region_set_loss = config.optim.region_set_loss
    trainer.close_loss_weight = config.optim.close_loss_weight
    if config.optim.close_loss_weight != 1.0:
        trainer.close_id = objects_close_id(processor.tokenizer)
    resume = get_last_checkpoint(str(out)) if config.output.resume and out.exists() else None
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    if config.model.lora:
        logger.info("merged %d LoRA adapters into the LLM", merge_lora(model))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = TrainResult(
        out,
        trainer.state.global_step,
        time.perf_counter() - start,
        losses[-1] if losses else None,
        resume,
        trainable,
    )
    tmp = out / (SUMMARY_NAME + ".tmp")
    tmp.write_text(json.dumps({**summary.to_json(), "train_loss": result.training_loss}, indent=2))
    os.replace(tmp, out / SUMMARY_NAME)
    return summary
