"""Dense pretraining of the auxiliary encoder: the miniature world's stand-in for a pretrained DaViT.

The release's DaViT comes pretrained (Florence-2) and already tells shapes apart. In the miniature
world it starts from nothing, and region perception pretraining (``training.perception``) teaches
it through about ten proposals per image: after 400 steps it finds colour (0.97), words (0.95)
and objects against background (0.98), but the shape kinds of small objects only half the time
(hexagon against circle worst). Here every cell of the encoder's finest map is a label: the kind
and colour of the object the scene's object map shows at the cell's centre (or background), read
by 1x1 heads from all levels resized to the finest and concatenated, which is what the region
encoder pools. About a thousand labels per image instead of ten.

The result is shared like the stage-0 base: every FO1 arm that uses the auxiliary encoder starts
from it (the ViT-only arm has none, as in the paper). It is not in the release and is off for
real checkpoints, whose DaViT is pretrained already.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.model.aux_encoder import encode_aux
from vlm_fo1.processing import FO1Processor
from vlm_fo1.training.perception import BACKGROUND, fit, object_kind, split_held_out

logger = logging.getLogger(__name__)

DENSE_ATTRIBUTES = ("kind", "colour")


@dataclass(frozen=True)
class AuxPretrainResult:
    """Held-out per-cell accuracy of each head on object cells (``kind``, ``colour``) and on
    background cells (``background``), and the run's length."""

    accuracy: dict[str, float]
    steps: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "steps": self.steps, "seconds": round(self.seconds, 1)}


@dataclass(frozen=True)
class _Scene:
    image: Path
    mask: Path
    labels: dict[str, list[str]]  # attribute -> value of each object, in the scene's order


def read_mask_scenes(paths: Sequence[str | Path]) -> list[_Scene]:
    """Scenes with an object map from ``*_scenes.jsonl`` files (paths relative to each file).

    Raises:
        ValueError: a file whose scenes have no ``mask`` (written before object maps existed).
    """
    scenes = []
    for path in paths:
        root = Path(path).parent
        with Path(path).open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                truth = json.loads(line)
                if "mask" not in truth:
                    raise ValueError(
                        f"{path}:{line_number}: scene truth without an object map ('mask'); "
                        "regenerate the split with this version"
                    )
                objects = truth["objects"]
                labels = {
                    "kind": [object_kind(o) for o in objects],
                    "colour": [o["colour"] for o in objects],
                }
                scenes.append(_Scene(root / truth["image"], root / truth["mask"], labels))
    if not scenes:
        raise ValueError(f"no scenes in {[str(p) for p in paths]}")
    return scenes


def cell_targets(
    object_map: np.ndarray, values: Sequence[str], classes: Sequence[str], grid: tuple[int, int]
) -> torch.Tensor:
    """``(h, w)`` class index of the object shown at each cell centre of a ``grid = (h, w)`` map
    laid over the whole image (``object_map`` ``(H, W)``: object index or -1); ``values[k]`` is
    object k's class, ``classes`` the class list (``background`` first)."""
    height, width = object_map.shape
    rows = ((np.arange(grid[0]) + 0.5) * height / grid[0]).astype(int)
    cols = ((np.arange(grid[1]) + 0.5) * width / grid[1]).astype(int)
    shown = object_map[np.ix_(rows, cols)]  # (h, w)
    lookup = np.array([classes.index(BACKGROUND), *(classes.index(v) for v in values)])
    return torch.from_numpy(lookup[shown + 1])


def dense_features(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, ΣC_i, h_0, w_0)``: every level bilinearly resized to the finest and concatenated (the
    maps the region encoder's auxiliary branch pools)."""
    levels = encode_aux(encoder, pixel_values)
    size = levels[0].shape[-2:]
    resized = [
        lv if lv.shape[-2:] == size else F.interpolate(lv, size=size, mode="bilinear") for lv in levels
    ]
    return torch.cat(resized, dim=1)


def pretrain_aux_encoder(
    model: FO1ForConditionalGeneration,
    processor: FO1Processor,
    scenes_paths: Sequence[str | Path],
    *,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    background_weight: float = 0.2,
    seed: int = 0,
    held_out: int | None = None,
    progress: bool = True,
) -> AuxPretrainResult:
    """Train ``model.aux_encoder`` in place on per-cell kind and colour (module docstring).

    Args:
        scenes_paths: miniature-world ``{split}_scenes.jsonl`` files with object maps.
        steps / batch_size / lr: AdamW steps, images per step, learning rate.
        background_weight: weight of background cells in the cross-entropy (most cells are
            background).
        held_out: the last ``held_out`` scenes are not trained on and give the reported accuracy
            (default: a tenth of the scenes, between 1 and 64).

    Raises:
        ValueError: for a model without an auxiliary encoder, non-positive sizes, or too few scenes.
    """
    start = time.perf_counter()
    if model.aux_encoder is None:
        raise ValueError("auxiliary-encoder pretraining needs a model with one (region_source hybrid or aux)")
    if processor.aux_resize_mode != "squash":
        raise ValueError(
            "dense pretraining batches images at one auxiliary size; aux_resize_mode must be "
            f"'squash', got {processor.aux_resize_mode!r}"
        )
    scenes = read_mask_scenes(scenes_paths)
    train_scenes, test_scenes = split_held_out(scenes, held_out, steps, batch_size)
    classes = {
        name: [BACKGROUND, *sorted({v for s in scenes for v in s.labels[name]})] for name in DENSE_ATTRIBUTES
    }
    encoder = model.aux_encoder
    width = sum(encoder.feature_info.channels())
    heads = nn.ModuleDict({name: nn.Conv2d(width, len(values), 1) for name, values in classes.items()})
    encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr, weight_decay=0.0)
    rng = random.Random(seed)

    def step_outputs(chosen: list[_Scene]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Logits ``(B, K, h, w)`` and cell targets ``(B, h, w)`` of each head for ``chosen``."""
        pixels = torch.stack([processor.aux_pixel_values(s.image) for s in chosen])
        features = dense_features(encoder, pixels)
        grid = tuple(features.shape[-2:])
        maps = [np.asarray(Image.open(s.mask), dtype=np.int16) - 1 for s in chosen]
        targets = {
            name: torch.stack(
                [
                    cell_targets(m, s.labels[name], classes[name], grid)
                    for m, s in zip(maps, chosen, strict=True)
                ]
            )
            for name in DENSE_ATTRIBUTES
        }
        return {name: head(features) for name, head in heads.items()}, targets

    weights = {name: torch.ones(len(values)) for name, values in classes.items()}
    for name in DENSE_ATTRIBUTES:
        weights[name][0] = background_weight

    def batch_loss() -> torch.Tensor:
        out, targets = step_outputs(rng.sample(train_scenes, min(batch_size, len(train_scenes))))
        return sum(F.cross_entropy(out[n], targets[n], weight=weights[n]) for n in DENSE_ATTRIBUTES)

    encoder.train()
    fit(optimizer, batch_loss, steps, desc="aux encoder (dense)", progress=progress)
    encoder.eval()
    hits = dict.fromkeys([*DENSE_ATTRIBUTES, BACKGROUND], 0)
    counts = dict.fromkeys(["object", BACKGROUND], 0)
    with torch.no_grad():
        for first in range(0, len(test_scenes), batch_size):
            out, targets = step_outputs(test_scenes[first : first + batch_size])
            objects = targets["kind"] != 0
            for name in DENSE_ATTRIBUTES:
                hits[name] += int((out[name].argmax(1) == targets[name])[objects].sum())
            hits[BACKGROUND] += int((out["kind"].argmax(1) == 0)[~objects].sum())
            counts["object"] += int(objects.sum())
            counts[BACKGROUND] += int((~objects).sum())
    accuracy = {
        "kind": hits["kind"] / max(counts["object"], 1),
        "colour": hits["colour"] / max(counts["object"], 1),
        BACKGROUND: hits[BACKGROUND] / max(counts[BACKGROUND], 1),
    }
    logger.info("auxiliary encoder after %d dense steps: held-out cell accuracy %s", steps, accuracy)
    return AuxPretrainResult(accuracy, steps, time.perf_counter() - start)
