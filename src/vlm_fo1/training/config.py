"""Run configs: typed dataclasses loaded from small YAML files (values only, no code).

Example (``configs/miniature/stage2.yaml``)::

    stage: 2
    seed: 0
    model:
      init: runs/miniature/stage1        # an FO1 checkpoint (model + processor)
    data:
      train:
        - {path: data/miniature/train.jsonl, weight: 1.0}
        - {path: data/miniature/general.jsonl, weight: 0.3}
      exclude_negatives: false
    optim: {steps: 600, batch_size: 16, lr: 5.0e-4}
    output: {dir: runs/miniature/stage2, save_steps: 200}

Relative paths are resolved against the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = (0, 1, 2)


@dataclass
class ModelSpec:
    """Where the model comes from.

    Attributes:
        init: an FO1 checkpoint directory to start from, or None to build ``preset`` from scratch.
        preset: architecture preset for a model built from scratch (``mini``, ``tiny``).
        keep: with ``init``: ``all`` loads every weight; ``vlm`` copies only the base VLM (the
            region side starts fresh, e.g. a stage-1 arm with another region encoder).
        overrides: ``FO1Config`` fields to change (e.g. ``{region_source: vit}``).
        lora: stage 2 only: train LoRA adapters on the LLM instead of all its weights.
        lora_rank: LoRA rank.
        freeze: parameter-name prefixes kept frozen on top of the stage preset (e.g.
            ``[aux_encoder]``).
    """

    init: str | None = None
    preset: str = "mini"
    keep: str = "all"
    overrides: dict[str, Any] = field(default_factory=dict)
    lora: bool = False
    lora_rank: int = 16
    freeze: list[str] = field(default_factory=list)


@dataclass
class DataSource:
    """One JSONL file of records with a sampling weight (and optional task filter)."""

    path: str
    weight: float = 1.0
    tasks: list[str] | None = None


@dataclass
class DataSpec:
    """Training data.

    Attributes:
        train: the sources, mixed by weight.
        exclude_negatives: drop records whose ``meta["negative"]`` is true (the no-negatives arm).
        max_length: raise on longer samples (no silent truncation).
        pack_turns: merge up to this many records about the same image into one multi-turn
            conversation (the image and region listing are then encoded once for all of them).
        shuffle_regions: the share of drawn records whose boxes are listed in a random order
            (indexes in prompts, answers and meta renumbered), so that the listing order, which
            follows the proposal score, cannot stand in for the regions' content; ``true`` is 1,
            ``false`` 0. Between 0 and 1, the model must read the regions and may still use the
            score order where it is kept (it is kept at inference).
    """

    train: list[DataSource] = field(default_factory=list)
    exclude_negatives: bool = False
    max_length: int | None = None
    pack_turns: int = 1
    shuffle_regions: float = 0.0


@dataclass
class OptimSpec:
    """Optimisation (AdamW, cosine schedule to ``min_lr_ratio`` after a linear warm-up).

    Attributes:
        steps / batch_size / grad_accum: optimizer steps, conversations per device batch,
            batches per step.
        region_lr_scale: learning-rate factor of the region side (region encoder, auxiliary
            encoder, connector), which starts from scratch.
        region_loss_weight: weight of each ``<regionN>`` answer token in the loss (1: the plain
            mean over answer tokens).
        region_set_loss: train each ``<regionN>`` target on the set of regions still to be named
            in its ``<objects>`` list, not on the one listed next (``training.losses``; not in the
            release).
        close_loss_weight: weight of each ``</objects>`` answer token (the decision to stop
            naming regions; a negative's one grounded choice; ``training.losses``).
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_workers: int = 0
    region_lr_scale: float = 1.0
    region_loss_weight: float = 1.0
    region_set_loss: bool = False
    close_loss_weight: float = 1.0


@dataclass
class OutputSpec:
    dir: str = "runs/run"
    save_steps: int = 100
    keep: int = 2
    logging_steps: int = 10
    resume: bool = True


@dataclass
class RunConfig:
    """A whole training run: stage, model, data, optimisation and output."""

    stage: int
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"RunConfig.stage must be one of {list(STAGES)}, got {self.stage!r}")
        if self.model.keep not in ("all", "vlm"):
            raise ValueError(f"model.keep must be 'all' or 'vlm', got {self.model.keep!r}")
        if self.model.lora and self.stage != 2:
            raise ValueError(f"model.lora applies to stage 2 only, got stage {self.stage}")
        if not self.data.train:
            raise ValueError("data.train must list at least one JSONL source")
        for name in ("steps", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            spec = self.optim if hasattr(self.optim, name) else self.output
            value = getattr(spec, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "region_lr_scale", "region_loss_weight", "close_loss_weight"):
            value = getattr(self.optim, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"optim.{name} must be a positive number, got {value!r}")
        if not isinstance(self.optim.region_set_loss, bool):
            raise ValueError(f"optim.region_set_loss must be a bool, got {self.optim.region_set_loss!r}")
        share = self.data.shuffle_regions
        if not isinstance(share, (bool, int, float)) or not 0 <= share <= 1:
            raise ValueError(f"data.shuffle_regions must be a share in [0, 1] or a bool, got {share!r}")
        if self.stage > 0 and self.model.init is None:
            raise ValueError(f"stage {self.stage} starts from a checkpoint: set model.init")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown}; expected some of {sorted(known)}")
    return cls(**data)


def run_config_from_dict(data: dict[str, Any], base_dir: str | Path | None = None) -> RunConfig:
    """Validate a parsed YAML mapping; relative paths are resolved against ``base_dir``."""
    if not isinstance(data, dict) or "stage" not in data:
        raise ValueError("a run config must be a mapping with at least 'stage'")
    base = Path(base_dir) if base_dir is not None else None

    def resolve(path: str | None) -> str | None:
        if path is None or base is None or Path(path).is_absolute():
            return path
        return str(base / path)

    model = _build(ModelSpec, data.get("model"), "model")
    model.init = resolve(model.init)
    data_spec = dict(data.get("data") or {})
    sources = [_build(DataSource, s, "data.train[]") for s in data_spec.pop("train", [])]
    for source in sources:
        source.path = resolve(source.path)
    data_obj = _build(DataSpec, {**data_spec, "train": sources}, "data")
    output = _build(OutputSpec, data.get("output"), "output")
    output.dir = resolve(output.dir)
    extra = sorted(set(data) - {"stage", "seed", "model", "data", "optim", "output"})
    if extra:
        raise ValueError(f"unknown top-level keys in run config: {extra}")
    return RunConfig(
        stage=data["stage"],
        seed=int(data.get("seed", 0)),
        model=model,
        data=data_obj,
        optim=_build(OptimSpec, data.get("optim"), "optim"),
        output=output,
    )


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML run config; ``overrides`` (nested dict) are merged in before validation."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return run_config_from_dict(data, base_dir=path.parent)
