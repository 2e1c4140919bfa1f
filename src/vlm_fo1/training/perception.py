"""Region perception pretraining: the miniature world's stand-in for a pretrained DaViT.

The release starts its region side from encoders that already see: the base VLM's ViT and a
DaViT pretrained on large detection and captioning corpora. In the miniature world both start
from nothing, and a tiny VLM cannot learn *what* is in a region and *which* region a question
asks for at the same time (region tokens that carry no content leave retrieval nothing to learn
from, and without retrieval no useful gradient reaches the region encoder). This step supplies
the missing pretraining: the auxiliary encoder and the region encoder learn, through linear
heads, the kind, colour and size of the object each simulated proposal covers (or "background"),
from the scene truth the miniature world writes next to its records. The base VLM (ViT included)
stays frozen; the heads are thrown away. It is not in the paper and is off for real checkpoints.

With ``match_weight`` (a model with ``region_pointer_match``) the connector and the match
matrix ``U`` train too, on the exact score the model later adds to each ``<regionN>`` logit:
``ê_w · U r_N / sqrt(D)``, where ``r_N`` is the region token (after the optional normalisation
and name embedding) and ``ê_w`` the RMS-normalised mean input embedding of an attribute word's
tokens (as :mod:`vlm_fo1.model.label_spans` forms the asked label). Each region answers one
question per group - which kind (or its plural), colour, size or text is its object, or none? -
by a cross-entropy over the group's words and one learnt "none" logit (the stand-in for
``</objects>``), once per spelling (``"circle"`` and ``" circle"`` are different tokens). A
question's words then already point at the regions they describe when stage 1 starts.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.evaluation.metrics import DetectionTruth, ScoredDetection, coco_map
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.model.aux_encoder import encode_aux
from vlm_fo1.model.label_spans import unit_rms
from vlm_fo1.processing import FO1Processor
from vlm_fo1.prompting import templates as P
from vlm_fo1.synthetic.language import plural

logger = logging.getLogger(__name__)

BACKGROUND = "background"
ATTRIBUTES = ("kind", "colour", "size")


@dataclass(frozen=True)
class PerceptionResult:
    """Held-out accuracy of each head (on proposals of scenes not trained on) and the run's length;
    ``heads`` are the trained linear heads (for :func:`probe_detection`; not saved)."""

    accuracy: dict[str, float]
    steps: int
    seconds: float
    heads: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "steps": self.steps, "seconds": round(self.seconds, 1)}


def object_kind(obj: dict[str, Any]) -> str:
    """The kind of a scene-truth object as the perception heads learn it (a rendered word's is
    ``word``)."""
    return "word" if obj.get("text") else obj["kind"]


POSITION_GROUPS: dict[str, tuple[int, str, str]] = {
    "horizontal": (0, "leftmost", "rightmost"),
    "vertical": (1, "topmost", "bottommost"),
    "side": (0, "left", "right"),
    "level": (1, "above", "below"),
}
"""Position words of the word-match loss (``position_weight``), as ``(axis, first, second)``: the
first word describes an object whose centre lies in the left (axis 0) or top (axis 1) half of
the image, the second one in the other half."""


def _object_attributes(obj: dict[str, Any], image_size: tuple[float, float]) -> dict[str, str]:
    attributes = {
        "kind": object_kind(obj),
        "colour": obj["colour"],
        "size": obj["size"],
    }
    box = obj["box"]
    for group, (axis, first, second) in POSITION_GROUPS.items():  # centre < size / 2, doubled
        attributes[group] = first if box[axis] + box[axis + 2] < image_size[axis] else second
    return attributes | ({"text": obj["text"]} if obj.get("text") else {})


def read_scene_regions(
    path: str | Path, *, min_iou: float = 0.5
) -> list[tuple[str, list[list[float]], list[dict[str, str]]]]:
    """``(image, proposal boxes, attributes per box)`` of every scene in a ``*_scenes.jsonl`` file.

    Attributes are ``kind``, ``colour``, ``size``, the half of the image the object's centre lies
    in (:data:`POSITION_GROUPS`) and, for words, ``text``. A proposal whose IoU
    with its object is below ``min_iou`` (or that covers none) is labelled ``background`` for
    ``kind``, ``colour`` and ``size``.
    """
    scenes = []
    with Path(path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            truth = json.loads(line)
            proposals = truth.get("proposals")
            if not isinstance(proposals, dict) or "boxes" not in proposals or "size" not in truth:
                raise ValueError(
                    f"{path}:{line_number}: expected scene truth with proposals and the image size, "
                    f"got {sorted(truth)}"
                )
            labels = []
            for matched, overlap in zip(proposals["matched_object"], proposals["iou"], strict=True):
                if matched >= 0 and overlap >= min_iou:
                    labels.append(_object_attributes(truth["objects"][matched], truth["size"]))
                else:
                    labels.append(dict.fromkeys(ATTRIBUTES, BACKGROUND))
            if proposals["boxes"]:
                scenes.append((truth["image"], proposals["boxes"], labels))
    if not scenes:
        raise ValueError(f"{path}: no scene with proposals")
    return scenes


class _Heads(nn.Module):
    def __init__(self, width: int, classes: dict[str, list[str]]) -> None:
        super().__init__()
        self.classes = classes
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(values)) for name, values in classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


MATCH_GROUPS = ("kind", "plural", "colour", "size", "text")
"""What a region can be asked about: its kind, the kind's plural (counting labels), colour, size
and, for words, the text."""


def _group_value(labels: dict[str, str], group: str) -> str | None:
    """The word of ``group`` that describes a box's object (None: background, or no text)."""
    if labels["kind"] == BACKGROUND:
        return None
    if group == "plural":
        return plural(labels["kind"])
    return labels.get(group)


class _WordMatch(nn.Module):
    """The model's label-region match (``ê_w · U r_N / sqrt(D)``) for the words of each group
    (:data:`MATCH_GROUPS`), each word in both spellings, with one learnt "none of these" logit per
    group (the perception loss's own; not saved)."""

    def __init__(
        self,
        model: FO1ForConditionalGeneration,
        processor: FO1Processor,
        per_box: Iterable[dict[str, str]],
        groups: tuple[str, ...] = MATCH_GROUPS,
    ) -> None:
        super().__init__()
        if model.region_match is None:
            raise ValueError("match_weight > 0 needs a model with region_pointer_match=True, got False")
        per_box = list(per_box)
        self.vocabulary = {
            g: sorted({v for labels in per_box if (v := _group_value(labels, g)) is not None}) for g in groups
        }
        self.problems = [(g, spaced) for g in groups if self.vocabulary[g] for spaced in (False, True)]
        if not self.problems:
            raise ValueError(
                "the word-match loss needs proposals that cover an object; every one is background"
            )
        table = model.get_input_embeddings().weight.detach().float()
        vectors = []
        for group, spaced in self.problems:
            for word in self.vocabulary[group]:
                ids = processor.tokenizer((" " if spaced else "") + word, add_special_tokens=False)[
                    "input_ids"
                ]
                vectors.append(table[ids].mean(0))
        self.register_buffer("labels", unit_rms(torch.stack(vectors)))  # (R, D), problems in order
        self.none = nn.Parameter(torch.zeros(len(self.problems)))
        self.scale = model.config.text_config.hidden_size**0.5

    def row(self, group: str, word: str, spaced: bool = False) -> int:
        """Row of ``word`` (of ``group``, in that spelling) in :meth:`forward`'s scores."""
        first = 0
        for g, s in self.problems:
            if (g, s) == (group, spaced):
                return first + self.vocabulary[g].index(word)
            first += len(self.vocabulary[g])
        raise ValueError(f"no match problem {(group, spaced)}; have {self.problems}")

    def forward(
        self, model: FO1ForConditionalGeneration, features: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """``(R, ΣN)`` the model's match scores of every word spelling with every region, from the
        region-encoder outputs ``features`` ``(ΣN, width)``."""
        tokens = model.connector(features.to(model.connector_dtype))
        tokens = model._finish_region_tokens(tokens, torch.tensor(counts))  # (ΣN, D), as spliced in
        keys = model.region_match(tokens).float()
        return self.labels @ keys.T / self.scale

    def _logits(self, scores: torch.Tensor, per_box: list[dict[str, str]]):
        """Per problem: logits ``(ΣN, k + 1)`` (the group's words, then "none") and targets ``(ΣN,)``."""
        first = 0
        for i, (group, _) in enumerate(self.problems):
            words = self.vocabulary[group]
            rows = scores[first : first + len(words)].T  # (ΣN, k)
            none = self.none[i].expand(rows.shape[0], 1)
            values = [_group_value(labels, group) for labels in per_box]
            targets = torch.tensor([len(words) if v not in words else words.index(v) for v in values])
            yield group, torch.cat([rows, none], dim=1), targets
            first += len(words)

    def loss(
        self, scores: torch.Tensor, per_box: list[dict[str, str]], position_weight: float = 1.0
    ) -> torch.Tensor:
        """Mean cross-entropy over the problems (each box's word of the group, or "none"); the
        problems of :data:`POSITION_GROUPS` have a mean of their own, added ``position_weight``
        times (so that they do not dilute the others)."""
        losses: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        for group, logits, targets in self._logits(scores, per_box):
            losses[group in POSITION_GROUPS].append(F.cross_entropy(logits, targets))
        total = sum(losses[False]) / max(len(losses[False]), 1)
        if losses[True]:
            total = total + position_weight * sum(losses[True]) / len(losses[True])
        return total

    def correct(self, scores: torch.Tensor, per_box: list[dict[str, str]]) -> int:
        """Boxes whose kind (or "none" for background) wins the bare-spelling kind problem."""
        for group, logits, targets in self._logits(scores, per_box):
            if group == "kind":
                return int((logits.argmax(-1) == targets).sum())
        return 0


def _region_features(
    model: FO1ForConditionalGeneration, processor: FO1Processor, images: list[Image.Image], boxes: list[list]
) -> tuple[list[int], torch.Tensor]:
    """Boxes per image and region-encoder outputs ``(ΣN, width)`` (ViT frozen)."""
    prompt = [{"role": "user", "content": P.detect("object")}]
    batch = processor([prompt] * len(images), images=images, boxes=boxes)
    counts = batch["region_counts"].tolist()
    with torch.no_grad():
        encoding = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    maps = encoding.feature_maps
    aux = None
    if model.aux_encoder is not None:
        aux = encode_aux(model.aux_encoder, batch["aux_pixel_values"])
    return counts, model.region_encoder(
        vit_features=[m.features for m in maps] if maps else None,
        vit_stride=maps[0].stride if maps else 1.0,
        vit_frames=encoding.frames,
        vit_boxes=[batch["region_boxes_vit"][i, :n] for i, n in enumerate(counts)],
        aux_levels=aux,
        aux_boxes=[batch["region_boxes_aux"][i, :n] for i, n in enumerate(counts)],
    )


def _word_vectors(
    model: FO1ForConditionalGeneration, processor: FO1Processor, classes: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """``{attribute word: (D,) mean input embedding of its tokens}`` (the alignment targets)."""
    table = model.get_input_embeddings().weight.detach()
    words = sorted({v for values in classes.values() for v in values if v != BACKGROUND})
    return {
        w: table[processor.tokenizer(w, add_special_tokens=False)["input_ids"]].float().mean(0) for w in words
    }


def _alignment_loss(
    model: FO1ForConditionalGeneration,
    features: torch.Tensor,
    counts: list[int],
    targets: dict[str, torch.Tensor],
    classes: dict[str, list[str]],
    vectors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Mean ``1 - cos`` between object regions' tokens and their words' mean embedding."""
    tokens = model.connector(features.to(model.connector_dtype))
    tokens = model._finish_region_tokens(tokens, torch.tensor(counts), names=False).float()  # (ΣN, D)
    background = classes["kind"].index(BACKGROUND) if BACKGROUND in classes["kind"] else -1
    keep = targets["kind"] != background
    if not keep.any():
        return tokens.sum() * 0.0
    wanted = torch.stack(
        [
            sum(vectors[classes[name][int(targets[name][i])]] for name in ATTRIBUTES) / len(ATTRIBUTES)
            for i in keep.nonzero().flatten().tolist()
        ]
    )
    return (1 - F.cosine_similarity(tokens[keep], wanted, dim=-1)).mean()


def fit(
    optimizer: torch.optim.Optimizer,
    batch_loss: Callable[[], torch.Tensor],
    steps: int,
    *,
    desc: str,
    progress: bool,
) -> None:
    """``steps`` optimizer steps on ``batch_loss()`` (a fresh batch's scalar loss each call), with
    a progress bar showing the loss every 10 steps; the loop of both miniature pretrainings."""
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def split_held_out(scenes: list, held_out: int | None, steps: int, batch_size: int) -> tuple[list, list]:
    """``(train, held out)``: the last ``held_out`` scenes (default: a tenth, between 1 and 64)
    are kept out of training to score it.

    Raises:
        ValueError: for sizes below 1, or no scene left to train on.
    """
    if held_out is None:
        held_out = min(64, max(1, len(scenes) // 10))
    if steps < 1 or batch_size < 1 or held_out < 1:
        raise ValueError(
            f"steps, batch_size and held_out must be >= 1, got {steps}, {batch_size}, {held_out}"
        )
    if len(scenes) <= held_out:
        raise ValueError(f"need more than held_out={held_out} scenes, got {len(scenes)}")
    return scenes[:-held_out], scenes[-held_out:]


def pretrain_region_perception(
    model: FO1ForConditionalGeneration,
    processor: FO1Processor,
    scenes_path: str | Path,
    *,
    image_root: str | Path | None = None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    held_out: int | None = None,
    align_weight: float = 0.0,
    match_weight: float = 0.0,
    match_lr_scale: float = 1.0,
    position_weight: float = 0.0,
    aux_frozen: int = 0,
    progress: bool = True,
) -> PerceptionResult:
    """Train ``model``'s auxiliary encoder and region encoder in place (see the module docstring).

    Args:
        scenes_path: a miniature-world ``{split}_scenes.jsonl`` (scene truth with proposals).
        image_root: folder the scene image paths start from (default: the file's folder).
        steps / batch_size / lr: AdamW steps, scenes per step, learning rate.
        held_out: the last ``held_out`` scenes are not trained on and give the reported accuracy
            (default: a tenth of the scenes, between 1 and 64).
        align_weight: weight of the alignment loss, which also trains the connector: the region
            token of an object (before the optional name embedding) should point the way of the
            mean input embedding of its words (size, colour, kind), so that a question's words
            already match the regions they describe (default 0: heads only). In the miniature
            benchmark it made the LLM copy words out of the region tokens instead of the query
            (benchmarks/RESULTS.md), so it is off by default.
        match_weight: weight of the word-match loss (module docstring), which also trains the
            connector and ``region_match``; needs ``region_pointer_match``. The held-out
            ``match`` accuracy is the share of proposals whose kind word (bare spelling) wins the
            kind problem, or whose "none" logit wins it when they are background.
        match_lr_scale: learning-rate multiplier of the match's own parameters (``region_match``
            and the "none" logits). They start at zero and the kind words' embeddings are nearly
            parallel (cosine up to 0.9 in the miniature's base), so at the base rate the match
            lags the linear heads (held-out match accuracy after 200 steps: 0.68 at 1x, 0.81 at 10x,
            0.90 at 30x, the miniature recipe's).
        position_weight: with ``match_weight``, the word match also asks which half of the image
            each object lies in, with the words of :data:`POSITION_GROUPS` ("leftmost" /
            "rightmost" …), so that the match score of an expression such as "the leftmost star"
            grows towards its side; the mean of those problems' losses counts this many times
            beside the mean of the others (default 0: not asked).
        aux_frozen: the first ``aux_frozen`` child modules of the auxiliary encoder (timm's
            order: the stem, then the stages) stay as they came; the backward pass stops before
            them, which saves their share of it (0: the whole encoder trains; its number of
            children or more: none of it).

    Raises:
        ValueError: for non-positive sizes or a file without usable scenes, a non-positive
            ``match_lr_scale``, a negative ``position_weight`` or ``aux_frozen``.
    """
    if not match_lr_scale > 0:
        raise ValueError(f"match_lr_scale must be > 0, got {match_lr_scale!r}")
    if not 0 <= position_weight < math.inf:
        raise ValueError(f"position_weight must be a finite number >= 0, got {position_weight!r}")
    if not isinstance(aux_frozen, int) or isinstance(aux_frozen, bool) or aux_frozen < 0:
        raise ValueError(f"aux_frozen must be an int >= 0, got {aux_frozen!r}")
    start = time.perf_counter()
    root = Path(image_root) if image_root is not None else Path(scenes_path).parent
    scenes = read_scene_regions(scenes_path)
    train_scenes, test_scenes = split_held_out(scenes, held_out, steps, batch_size)
    classes = {
        name: sorted({labels[name] for _, _, per_box in scenes for labels in per_box}) for name in ATTRIBUTES
    }
    heads = _Heads(model.region_encoder.output_dim, classes)
    match = None
    if match_weight > 0:
        groups = (*MATCH_GROUPS, *POSITION_GROUPS) if position_weight > 0 else MATCH_GROUPS
        match = _WordMatch(model, processor, (b for _, _, per_box in scenes for b in per_box), groups)
    model.requires_grad_(False)
    trainable = [*model.region_encoder.parameters()]
    if align_weight > 0 or match is not None:
        trainable += [*model.connector.parameters()]
    if model.aux_encoder is not None:
        trainable += [p for child in [*model.aux_encoder.children()][aux_frozen:] for p in child.parameters()]
    groups = [{"params": [*trainable, *heads.parameters()], "lr": lr}]
    if match is not None:
        matching = [*model.region_match.parameters(), match.none]
        trainable += matching
        groups.append({"params": matching, "lr": lr * match_lr_scale})
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    vectors = _word_vectors(model, processor, classes) if align_weight > 0 else {}

    def load(chosen: list) -> tuple[list[Image.Image], list[list], dict[str, Any]]:
        images = [Image.open(root / image).convert("RGB") for image, _, _ in chosen]
        targets = {
            name: torch.tensor(
                [classes[name].index(lab[name]) for _, _, per_box in chosen for lab in per_box]
            )
            for name in ATTRIBUTES
        }
        targets["boxes"] = [lab for _, _, per_box in chosen for lab in per_box]
        return images, [boxes for _, boxes, _ in chosen], targets

    def batch_loss() -> torch.Tensor:
        images, boxes, targets = load(rng.sample(train_scenes, min(batch_size, len(train_scenes))))
        counts, features = _region_features(model, processor, images, boxes)
        logits = heads(features)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        if align_weight > 0:
            loss = loss + align_weight * _alignment_loss(model, features, counts, targets, classes, vectors)
        if match is not None:
            loss = loss + match_weight * match.loss(
                match(model, features, counts), targets["boxes"], position_weight
            )
        return loss

    model.train()
    fit(optimizer, batch_loss, steps, desc="region perception", progress=progress)
    model.eval()
    correct = dict.fromkeys([*ATTRIBUTES, *(["match"] if match is not None else [])], 0)
    total = 0
    with torch.no_grad():
        for first in range(0, len(test_scenes), batch_size):
            images, boxes, targets = load(test_scenes[first : first + batch_size])
            counts, features = _region_features(model, processor, images, boxes)
            logits = heads(features)
            for name in ATTRIBUTES:
                correct[name] += int((logits[name].argmax(-1) == targets[name]).sum())
            if match is not None:
                correct["match"] += match.correct(match(model, features, counts), targets["boxes"])
            total += len(targets["kind"])
    model.requires_grad_(True)
    accuracy = {name: hits / total for name, hits in correct.items()}
    logger.info("region perception after %d steps: held-out accuracy %s", steps, accuracy)
    return PerceptionResult(accuracy, steps, time.perf_counter() - start, heads)


def probe_detection(
    model: FO1ForConditionalGeneration,
    processor: FO1Processor,
    heads: nn.Module,
    records: Iterable[ConversationRecord],
    image_root: str | Path,
) -> dict[str, float]:
    """COCO box metrics (:func:`coco_map`) of the perception probe used as a detector.

    Every region of each single-class detection record whose class is a kind the ``kind`` head
    knows is scored with the head's probability of that class. No language model is involved:
    this is what the region tokens' content supports, to set against what the FO1 model reaches
    when it must also learn to retrieve the regions. Records of other tasks are skipped.

    Raises:
        ValueError: when no record is a usable detection record.
    """
    kinds = heads.classes["kind"]
    truth, predictions = [], []
    model.eval()
    with torch.no_grad():
        for record in records:
            classes = record.meta.get("classes") or []
            if record.meta.get("task") != "detection" or len(classes) != 1 or classes[0] not in kinds:
                continue
            label, image_id = classes[0], len(truth)
            truth.append(DetectionTruth(image_id, {label: record.meta["gt_boxes"][label]}))
            if not record.boxes:
                continue
            image = Image.open(Path(image_root) / record.image).convert("RGB")
            probability = heads(_region_features(model, processor, [image], [record.boxes])[1])["kind"]
            scores = probability.softmax(-1)[:, kinds.index(label)].tolist()
            predictions += [
                ScoredDetection(image_id, label, box, p) for box, p in zip(record.boxes, scores, strict=True)
            ]
    if not truth:
        raise ValueError(f"expected single-class detection records with classes among {kinds}, got none")
    return coco_map(truth, predictions, sorted(k for k in kinds if k != BACKGROUND))
