"""Conversation records from a scene and its proposals, in the release's prompt and answer formats.

User turns are built with :mod:`vlm_fo1.prompting.templates` (content items of ``Prompt.content()``);
assistant turns are plain strings in this grammar (no spaces, no newlines)::

    segment  = "<ground>" LABEL "</ground><objects>" {"<region" N ">"} "</objects>"
    detect   = segment for the one class          (regions in increasing order; none: negative)
    multi    = segment per queried class with matched regions, in query order; when none has any, the empty
               segment of the first queried class
    count    = segment with the plural label, then the number: "<ground>circles</ground>…</objects>2"
    refer    = segment whose label is the expression itself, with the referent's one region
    caption  = object phrase ("small red circle", "blue word CAT")
    ocr      = the word ("CAT")
    similar  = segment with the reference's class label and the *other* objects of that class
    vqa      = short closed answer ("3", "red", "yes", "circle", "CAT"); caption = one sentence

A region stands for an object when :func:`match_proposals` pairs them (IoU >= ``iou_threshold``);
objects without a matching proposal are left out of grounded answers. The count is always the
true number of objects, also when some have no proposal. Negatives (``negative_ratio`` of the
detection, multi-detection, counting and visual-prompt samples, held there by
:class:`NegativeBalance`) have an empty ``<objects></objects>``: (multi-)detection asks only for
classes without a matched object (absent, or every object of the class lacks a proposal),
counting for an absent class (count ``0``), visual-prompt detection points at an object with no
other matched object of its class.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vlm_fo1.data.records import ConversationRecord
from vlm_fo1.prompting import templates as T
from vlm_fo1.prompting.tokens import GROUND_CLOSE, GROUND_OPEN, OBJECTS_CLOSE, OBJECTS_OPEN, region_token
from vlm_fo1.synthetic.language import (
    CAPTION_QUESTION,
    image_caption,
    label_of,
    object_phrase,
    plural,
    referring_expressions,
    vqa_questions,
)
from vlm_fo1.synthetic.proposals import Proposals, match_proposals
from vlm_fo1.synthetic.scenes import Scene

logger = logging.getLogger(__name__)

REGION_TASKS = (
    "detection",
    "multi_detection",
    "counting",
    "referring",
    "region_caption",
    "region_ocr",
    "visual_prompt",
)
GENERAL_TASKS = ("vqa", "caption")
NEGATIVE_TASKS = ("detection", "multi_detection", "counting", "visual_prompt")
TASK_NAMES = REGION_TASKS + GENERAL_TASKS


@dataclass(frozen=True)
class TaskMix:
    """Relative weights of the tasks, the negative share and the records drawn per scene."""

    detection: float = 3.0
    multi_detection: float = 1.0
    counting: float = 1.5
    referring: float = 2.0
    region_caption: float = 1.0
    region_ocr: float = 0.5
    visual_prompt: float = 1.0
    vqa: float = 1.0
    caption: float = 0.5
    negative_ratio: float = 0.2
    records_per_scene: int = 4
    iou_threshold: float = 0.5

    def __post_init__(self) -> None:
        weights = self.weights()
        if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
            raise ValueError(f"task weights must be >= 0 with at least one > 0, got {weights}")
        if not 0.0 <= self.negative_ratio <= 1.0:
            raise ValueError(f"negative_ratio must be in [0, 1], got {self.negative_ratio!r}")
        if self.records_per_scene < 1:
            raise ValueError(f"records_per_scene must be >= 1, got {self.records_per_scene!r}")

    def weights(self) -> dict[str, float]:
        """``{task name: weight}`` in :data:`TASK_NAMES` order."""
        return {name: float(getattr(self, name)) for name in TASK_NAMES}

    @classmethod
    def only(cls, *names: str, **settings: Any) -> TaskMix:
        """A mix of just ``names`` (equal weights); e.g. ``TaskMix.only("vqa", "caption")`` for stage 0."""
        unknown = sorted(set(names) - set(TASK_NAMES))
        if unknown or not names:
            raise ValueError(f"task names must be some of {TASK_NAMES}, got {names!r}")
        return cls(**{n: (1.0 if n in names else 0.0) for n in TASK_NAMES}, **settings)

    @classmethod
    def general(cls, **settings: Any) -> TaskMix:
        """Stage-0 data: plain VQA and image captions without regions."""
        return cls.only(*GENERAL_TASKS, **settings)


@dataclass
class NegativeBalance:
    """Keeps each task's share of negatives at ``ratio`` over many scenes (error feedback).

    A plain coin flip would not: a scene often cannot supply a positive of a task (no second
    object of a kind for visual-prompt detection) while a negative is almost always possible, so
    redrawn samples drift towards negatives. Here a draw is negative with probability
    ``ratio + gain * (ratio * produced - negatives)`` (clipped to [0, 1]), and only samples that
    were actually produced are counted. Share one instance across the scenes of a split.
    """

    ratio: float
    gain: float = 0.5
    counts: dict[str, list[int]] = field(default_factory=dict)  # task -> [negatives, produced]

    def draw(self, task: str, rng: random.Random) -> bool:
        """Whether the next sample of ``task`` should be a negative."""
        negatives, produced = self.counts.get(task, (0, 0))
        probability = self.ratio + self.gain * (self.ratio * produced - negatives)
        return rng.random() < min(max(probability, 0.0), 1.0)

    def record(self, task: str, negative: bool) -> None:
        """Count one produced sample."""
        counts = self.counts.setdefault(task, [0, 0])
        counts[0] += int(negative)
        counts[1] += 1

    def share(self, task: str) -> float | None:
        """The share of negatives produced so far for ``task`` (None before the first)."""
        negatives, produced = self.counts.get(task, (0, 0))
        return negatives / produced if produced else None


@dataclass(frozen=True)
class _Sample:
    prompt: T.Prompt
    answer: str
    meta: dict[str, Any]
    uses_regions: bool = True


@dataclass(frozen=True)
class _Context:
    """A scene, its proposals and which proposal stands for which object."""

    scene: Scene
    proposals: Proposals
    matches: tuple[int | None, ...]

    def objects_of(self, label: str) -> list[int]:
        return [i for i, o in enumerate(self.scene.objects) if label_of(o) == label]

    def regions_of(self, label: str, exclude: int | None = None) -> list[int]:
        """Sorted regions of the objects of ``label`` that have one (except object ``exclude``)."""
        found = (self.matches[i] for i in self.objects_of(label) if i != exclude)
        return sorted(r for r in found if r is not None)

    def truth(self, labels: list[str], exclude: int | None = None) -> dict[str, Any]:
        """True boxes (original pixels) and target regions per label, for evaluation."""
        return {
            "gt_boxes": {
                label: [list(self.scene.objects[i].box) for i in self.objects_of(label) if i != exclude]
                for label in labels
            },
            "target_regions": {label: self.regions_of(label, exclude) for label in labels},
        }

    def split_classes(self) -> tuple[list[str], list[str]]:
        """``(classes with at least one region, classes without any)``."""
        classes = list(self.scene.config.classes)
        with_regions = [c for c in classes if self.regions_of(c)]
        return with_regions, [c for c in classes if c not in with_regions]


def grounding_answer(segments: list[tuple[str, list[int]]]) -> str:
    """``<ground>label</ground><objects><regionA>…</objects>`` for each ``(label, regions)``."""
    return "".join(
        f"{GROUND_OPEN}{label}{GROUND_CLOSE}{OBJECTS_OPEN}{''.join(region_token(r) for r in regions)}{OBJECTS_CLOSE}"
        for label, regions in segments
    )


def _detection(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    positives, negatives = ctx.split_classes()
    pool = negatives if negative else positives
    if not pool:
        return None
    label = rng.choice(pool)
    answer = grounding_answer([(label, ctx.regions_of(label))])
    return _Sample(T.detect(label), answer, {"classes": [label], "negative": negative, **ctx.truth([label])})


def _multi_detection(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    positives, negatives = ctx.split_classes()
    k = rng.randint(2, 3)
    if negative:
        if len(negatives) < k:
            return None
        chosen = rng.sample(negatives, k)
    else:
        if not positives:
            return None
        n_pos = rng.randint(1, min(k, len(positives)))
        chosen = rng.sample(positives, n_pos) + rng.sample(negatives, min(k - n_pos, len(negatives)))
        if len(chosen) < 2:
            return None
        rng.shuffle(chosen)
    # Every asked class in the question's order, an empty group for an absent one: the model
    # copies the next label and decides about each class on its own (docs/training.md).
    segments = [(c, ctx.regions_of(c)) for c in chosen]
    meta = {"classes": chosen, "negative": negative, **ctx.truth(chosen)}
    return _Sample(T.detect(chosen), grounding_answer(segments), meta)


def _counting(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    classes = ctx.scene.config.classes
    pool = [c for c in classes if bool(ctx.objects_of(c)) != negative]
    if not pool:
        return None
    kind = rng.choice(pool)
    label, number = plural(kind), len(ctx.objects_of(kind))
    answer = grounding_answer([(label, ctx.regions_of(kind))]) + str(number)
    truth = ctx.truth([kind])
    meta = {"kind": kind, "label": label, "count": number, "negative": negative}
    meta |= {"gt_boxes": truth["gt_boxes"][kind], "target_regions": truth["target_regions"][kind]}
    return _Sample(T.count(label), answer, meta)


def _referring(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    usable = [e for e in referring_expressions(ctx.scene.objects) if ctx.matches[e[2]] is not None]
    if not usable:
        return None
    form = rng.choice(sorted({e[0] for e in usable}))
    _, text, index = rng.choice([e for e in usable if e[0] == form])
    region = ctx.matches[index]
    assert region is not None
    meta = {"expression": text, "form": form, "object": index, "gt_box": list(ctx.scene.objects[index].box)}
    meta["target_region"] = region
    return _Sample(T.refer(text), grounding_answer([(text, [region])]), meta)


def _pick_matched(ctx: _Context, rng: random.Random, keep: Callable[[int], bool]) -> tuple[int, int] | None:
    """A random ``(object index, region)`` among matched objects that pass ``keep``."""
    pool = [(i, r) for i, r in enumerate(ctx.matches) if r is not None and keep(i)]
    return rng.choice(pool) if pool else None


def _region_caption(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    picked = _pick_matched(ctx, rng, lambda i: True)
    if picked is None:
        return None
    index, region = picked
    obj = ctx.scene.objects[index]
    meta = {"region": region, "object": index, "gt_box": list(obj.box)}
    return _Sample(T.describe_region(region), object_phrase(obj), meta)


def _region_ocr(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    picked = _pick_matched(ctx, rng, lambda i: ctx.scene.objects[i].is_word)
    if picked is None:
        return None
    index, region = picked
    obj = ctx.scene.objects[index]
    meta = {"region": region, "object": index, "gt_box": list(obj.box)}
    return _Sample(T.region_ocr(region), str(obj.text), meta)


def _visual_prompt(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    objects = ctx.scene.objects
    picked = _pick_matched(
        ctx, rng, lambda i: bool(ctx.regions_of(label_of(objects[i]), exclude=i)) != negative
    )
    if picked is None:
        return None
    index, region = picked
    label = label_of(objects[index])
    truth = ctx.truth([label], exclude=index)
    meta = {"reference_region": region, "object": index, "kind": label, "negative": negative}
    meta |= {"gt_boxes": truth["gt_boxes"][label], "target_regions": truth["target_regions"][label]}
    answer = grounding_answer([(label, ctx.regions_of(label, exclude=index))])
    return _Sample(T.find_similar(region), answer, meta)


def _vqa(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    questions = vqa_questions(ctx.scene.objects, ctx.scene.config, rng)
    kind = rng.choice(sorted({q[0] for q in questions}))
    _, question, answer = rng.choice([q for q in questions if q[0] == kind])
    return _Sample(T.ask(question), answer, {"question_type": kind}, uses_regions=False)


def _caption(ctx: _Context, rng: random.Random, negative: bool) -> _Sample | None:
    return _Sample(T.ask(CAPTION_QUESTION), image_caption(ctx.scene.objects), {}, uses_regions=False)


_BUILDERS: dict[str, Callable[[_Context, random.Random, bool], _Sample | None]] = {
    "detection": _detection,
    "multi_detection": _multi_detection,
    "counting": _counting,
    "referring": _referring,
    "region_caption": _region_caption,
    "region_ocr": _region_ocr,
    "visual_prompt": _visual_prompt,
    "vqa": _vqa,
    "caption": _caption,
}
assert set(_BUILDERS) == set(TASK_NAMES) <= {f.name for f in fields(TaskMix)}


def _record(
    ctx: _Context, name: str, sample: _Sample, image: str | None, record_id: str
) -> ConversationRecord:
    scene = ctx.scene
    meta = {"task": name, "answer": sample.answer, "scene_seed": scene.seed, "image_size": list(scene.size)}
    return ConversationRecord(
        messages=[
            {"role": "user", "content": sample.prompt.content()},
            {"role": "assistant", "content": sample.answer},
        ],
        image=image,
        boxes=ctx.proposals.box_lists() if sample.uses_regions else [],
        scores=list(ctx.proposals.scores) if sample.uses_regions else None,
        id=record_id,
        task=sample.prompt.task.value,
        meta=meta | sample.meta,
    )


def make_records(
    scene: Scene,
    proposals: Proposals,
    mix: TaskMix,
    rng: random.Random,
    image_path: str | Path | None,
    id_prefix: str | None = None,
    balance: NegativeBalance | None = None,
) -> list[ConversationRecord]:
    """Up to ``mix.records_per_scene`` distinct records about one scene.

    Tasks are drawn by weight; a task that does not apply to the scene (no word to read, no
    unique expression, no positive left…) is redrawn, at most ``4 × records_per_scene`` draws in
    all. Pass one ``balance`` for all scenes of a split to hold the negative share at
    ``mix.negative_ratio`` (:func:`generate_dataset` does); without it a fresh one is used.
    ``record.task`` is the prompt's :class:`~vlm_fo1.prompting.templates.Task` value (``"free"``
    for VQA and captions); ``meta["task"]`` is the task name of :data:`TASK_NAMES`. Region-free
    tasks (VQA, caption) have ``boxes == []`` and ``scores is None``.

    Raises:
        ValueError: when ``balance.ratio`` differs from ``mix.negative_ratio``.
    """
    balance = balance if balance is not None else NegativeBalance(mix.negative_ratio)
    if balance.ratio != mix.negative_ratio:
        raise ValueError(
            f"balance.ratio must equal mix.negative_ratio {mix.negative_ratio}, got {balance.ratio}"
        )
    boxes = [o.box for o in scene.objects]
    ctx = _Context(scene, proposals, tuple(match_proposals(proposals.boxes, boxes, mix.iou_threshold)))
    weights = {name: w for name, w in mix.weights().items() if w > 0}
    image = None if image_path is None else Path(image_path).as_posix()
    prefix = id_prefix or (Path(image_path).stem if image_path is not None else f"scene-{scene.seed}")
    records: list[ConversationRecord] = []
    seen: set[tuple[str, str]] = set()
    for _ in range(4 * mix.records_per_scene):
        if len(records) >= mix.records_per_scene:
            break
        name = rng.choices(list(weights), list(weights.values()))[0]
        negative = name in NEGATIVE_TASKS and balance.draw(name, rng)
        sample = _BUILDERS[name](ctx, rng, negative)
        if sample is None or (sample.prompt.text, sample.answer) in seen:
            continue
        seen.add((sample.prompt.text, sample.answer))
        if name in NEGATIVE_TASKS:
            balance.record(name, negative)
        records.append(_record(ctx, name, sample, image, f"{prefix}/{name}-{len(records)}"))
    return records
