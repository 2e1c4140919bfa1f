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
tokens (as :mod:`vlm_fo1.model.label_spans` forms the asked label). Each (region, word) pair is a
binary question - is this region's object of that kind (or its plural), colour, size or text? -
trained with a logistic loss, both spellings (``"circle"`` and ``" circle"``, which are different
tokens) included. A question's words then already point at the regions they describe when stage 1
starts.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
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


def _object_attributes(obj: dict[str, Any]) -> dict[str, str]:
    attributes = {
        "kind": "word" if obj.get("text") else obj["kind"],
        "colour": obj["colour"],
        "size": obj["size"],
    }
    return attributes | ({"text": obj["text"]} if obj.get("text") else {})


def read_scene_regions(
    path: str | Path, *, min_iou: float = 0.5
) -> list[tuple[str, list[list[float]], list[dict[str, str]]]]:
    """``(image, proposal boxes, attributes per box)`` of every scene in a ``*_scenes.jsonl`` file.

    Attributes are ``kind``, ``colour``, ``size`` and, for words, ``text``. A proposal whose IoU
    with its object is below ``min_iou`` (or that covers none) is labelled ``background`` for
    ``kind``, ``colour`` and ``size``.
    """
    scenes = []
    with Path(path).open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            truth = json.loads(line)
            proposals = truth.get("proposals")
            if not isinstance(proposals, dict) or "boxes" not in proposals:
                raise ValueError(
                    f"{path}:{line_number}: expected scene truth with proposals, got {sorted(truth)}"
                )
            labels = []
            for matched, overlap in zip(proposals["matched_object"], proposals["iou"], strict=True):
                if matched >= 0 and overlap >= min_iou:
                    labels.append(_object_attributes(truth["objects"][matched]))
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


def _match_words(per_box: Iterable[dict[str, str]]) -> list[str]:
    """Every word a region can be asked about (sorted): kinds and their plurals, colours, sizes,
    texts."""
    words = set()
    for labels in per_box:
        if labels["kind"] != BACKGROUND:
            words |= _positive_words(labels)
    return sorted(words)


def _positive_words(labels: dict[str, str]) -> set[str]:
    """The words that describe a region's object (none for background)."""
    if labels["kind"] == BACKGROUND:
        return set()
    words = {labels["kind"], plural(labels["kind"]), labels["colour"], labels["size"]}
    return words | ({labels["text"]} if "text" in labels else set())


class _WordMatch(nn.Module):
    """The model's label-region match (``ê_w · U r_N / sqrt(D)``) for a fixed list of words, each in
    both spellings, plus a learnt logit offset (the perception loss's own; not saved)."""

    def __init__(self, model: FO1ForConditionalGeneration, processor: FO1Processor, words: list[str]) -> None:
        super().__init__()
        if model.region_match is None:
            raise ValueError("match_weight > 0 needs a model with region_pointer_match=True, got False")
        table = model.get_input_embeddings().weight.detach().float()
        tokenizer = processor.tokenizer
        spellings = [(w, s) for w in words for s in (w, " " + w)]
        vectors = [table[tokenizer(s, add_special_tokens=False)["input_ids"]].mean(0) for _, s in spellings]
        self.words = words
        self.register_buffer("word_index", torch.tensor([words.index(w) for w, _ in spellings]))
        self.register_buffer("labels", unit_rms(torch.stack(vectors)))  # (2W, D)
        self.offset = nn.Parameter(torch.zeros(()))
        self.scale = model.config.text_config.hidden_size**0.5

    def forward(
        self, model: FO1ForConditionalGeneration, features: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """``(2W, ΣN)`` match logits of region-encoder outputs ``features`` ``(ΣN, width)``."""
        tokens = model.connector(features.to(model.connector_dtype))
        tokens = model._finish_region_tokens(tokens, torch.tensor(counts))  # (ΣN, D), as spliced in
        keys = model.region_match(tokens).float()
        return self.labels @ keys.T / self.scale + self.offset  # (2W, ΣN)

    def targets(self, per_box: list[dict[str, str]]) -> torch.Tensor:
        """``(2W, ΣN)`` 1 where the spelling's word describes the box."""
        wanted = torch.zeros(len(self.words), len(per_box))
        for j, labels in enumerate(per_box):
            for word in _positive_words(labels):
                wanted[self.words.index(word), j] = 1.0
        return wanted[self.word_index]


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
            ``match`` accuracy is the share of proposals whose best kind word (bare spelling) is
            their kind, or that no kind word claims (logit < 0) when they are background.

    Raises:
        ValueError: for non-positive sizes or a file without usable scenes.
    """
    start = time.perf_counter()
    root = Path(image_root) if image_root is not None else Path(scenes_path).parent
    scenes = read_scene_regions(scenes_path)
    if held_out is None:
        held_out = min(64, max(1, len(scenes) // 10))
    if steps < 1 or batch_size < 1 or held_out < 1:
        raise ValueError(
            f"steps, batch_size and held_out must be >= 1, got {steps}, {batch_size}, {held_out}"
        )
    if len(scenes) <= held_out:
        raise ValueError(f"need more than held_out={held_out} scenes, got {len(scenes)}")
    train_scenes, test_scenes = scenes[:-held_out], scenes[-held_out:]
    classes = {
        name: sorted({labels[name] for _, _, per_box in scenes for labels in per_box}) for name in ATTRIBUTES
    }
    heads = _Heads(model.region_encoder.output_dim, classes)
    match = None
    if match_weight > 0:
        match = _WordMatch(model, processor, _match_words(b for _, _, per_box in scenes for b in per_box))
    kinds = [k for k in classes["kind"] if k != BACKGROUND]
    model.requires_grad_(False)
    trainable = [*model.region_encoder.parameters()]
    if align_weight > 0 or match is not None:
        trainable += [*model.connector.parameters()]
    if match is not None:
        trainable += [*model.region_match.parameters(), match.offset]
    if model.aux_encoder is not None:
        trainable += [*model.aux_encoder.parameters()]
    for param in trainable:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW([*trainable, *heads.parameters()], lr=lr, weight_decay=0.0)
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

    model.train()
    bar = tqdm(range(steps), desc="region perception", disable=not progress)
    for step in bar:
        images, boxes, targets = load(rng.sample(train_scenes, min(batch_size, len(train_scenes))))
        counts, features = _region_features(model, processor, images, boxes)
        logits = heads(features)
        loss = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES)
        if align_weight > 0:
            loss = loss + align_weight * _alignment_loss(model, features, counts, targets, classes, vectors)
        if match is not None:
            scores = match(model, features, counts)
            wanted = match.targets(targets["boxes"])
            loss = loss + match_weight * F.binary_cross_entropy_with_logits(scores, wanted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
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
                scores = match(model, features, counts)
                correct["match"] += _match_correct(match, scores, targets["boxes"], kinds)
            total += len(targets["kind"])
    model.requires_grad_(True)
    accuracy = {name: hits / total for name, hits in correct.items()}
    logger.info("region perception after %d steps: held-out accuracy %s", steps, accuracy)
    return PerceptionResult(accuracy, steps, time.perf_counter() - start, heads)


def _match_correct(
    match: _WordMatch, scores: torch.Tensor, per_box: list[dict[str, str]], kinds: list[str]
) -> int:
    """Boxes whose best bare kind word is their kind (logit > 0), or background with every kind
    word's logit < 0; ``scores`` ``(2W, ΣN)``, ``kinds`` the kind words."""
    rows = torch.tensor([2 * match.words.index(k) for k in kinds])  # the bare spelling of each kind
    best, index = scores[rows].max(dim=0)  # (ΣN,)
    hits = 0
    for j, labels in enumerate(per_box):
        if labels["kind"] == BACKGROUND:
            hits += int(best[j] < 0)
        else:
            hits += int(best[j] > 0 and kinds[int(index[j])] == labels["kind"])
    return hits


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
