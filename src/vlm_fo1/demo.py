"""The embedded default: the shipped miniature-world checkpoint on a freshly generated scene.

``vlm-fo1 demo`` renders a scene of the miniature world (design.md §6) that no training split
contains, takes the simulated proposal network's boxes for it, and asks the demo checkpoint to
detect every class, count the most frequent one and ground a referring expression. It prints the
answers next to the scene's ground truth and writes an annotated PNG. Nothing is downloaded.
Detection asks about every class in one question, as the release does, with three decoder options
that are not in the release: each asked label grounded once (``unique_labels``), the duplicate
boxes of a named object not offered again (``suppress_overlap=0.5``) and a count that is the
length of the listed regions (``count_from_list``); the miniature benchmark measures them
(benchmarks/RESULTS.md).

The checkpoint (``vlm_fo1/assets/demo``, under 20 MB) was trained by the commands in
``configs/miniature/README.md``; :func:`demo_checkpoint` says how to rebuild it when it is missing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_fo1.boxes import box_iou
from vlm_fo1.drawing import draw_detections
from vlm_fo1.inference.predictor import Predictor
from vlm_fo1.inference.results import CountResult, DetectionResult
from vlm_fo1.proposals.synthetic import SyntheticProposer
from vlm_fo1.synthetic import DIFFICULTIES, build_scene, difficulty_configs, plural, referring_expressions
from vlm_fo1.synthetic.language import label_of, object_phrase

logger = logging.getLogger(__name__)

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo"
DEMO_SPLIT = "demo"  # a split name no training config uses, so the scene is never a training scene
DEMO_MAX_PROPOSALS = 32
DEMO_SUPPRESS_OVERLAP = 0.5  # IoU above which a named box's overlapping boxes are not offered again
DRAW_SCALE = 4  # miniature scenes are ~140 px; the annotated PNG is enlarged so labels stay legible


def demo_checkpoint(path: str | Path | None = None) -> Path:
    """The demo checkpoint directory (``path`` or the one shipped in the package).

    Raises:
        FileNotFoundError: when the directory has no ``config.json``, with the command that
            rebuilds it.
    """
    folder = Path(path) if path is not None else DEMO_CHECKPOINT
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no FO1 checkpoint in {folder} (expected config.json there); rebuild the demo checkpoint "
            "with `python benchmarks/miniature.py --demo-only` (see configs/miniature/README.md) "
            "or pass --model DIR"
        )
    return folder


@dataclass(frozen=True)
class DemoResult:
    """What the demo asked and what the model answered.

    Attributes:
        seed / difficulty: the generated scene.
        truth: ``(label, phrase, box)`` of every object in the scene.
        detection: the answer to "detect every class" (one query listing all classes present).
        count_label / true_count / count: the counting question and its answer.
        expression / expression_box: a referring expression and its true box (None when the
            scene has no unambiguous one).
        grounding: the answer to it.
        annotated: where the annotated PNG was written (None when not asked).
        seconds: wall time, loading included.
    """

    seed: int
    difficulty: str
    truth: tuple[tuple[str, str, tuple[float, float, float, float]], ...]
    detection: DetectionResult
    count_label: str
    true_count: int
    count: CountResult
    expression: str | None
    expression_box: tuple[float, float, float, float] | None
    grounding: DetectionResult | None
    annotated: Path | None
    seconds: float

    def _nearest(self) -> list[tuple[str, float]]:
        """For each detection: the phrase of the true object it overlaps most, and that IoU."""
        truth = [box for _, _, box in self.truth]
        found = [d.box for d in self.detection.detections]
        if not truth or not found:
            return [("-", 0.0)] * len(found)
        best = box_iou(found, truth).max(dim=1)
        return [(self.truth[int(i)][1], float(v)) for v, i in zip(best.values, best.indices, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``vlm-fo1 demo --json``)."""
        return {
            "seed": self.seed,
            "difficulty": self.difficulty,
            "truth": [
                {"label": label, "phrase": phrase, "box": list(box)} for label, phrase, box in self.truth
            ],
            "detect": self.detection.to_dict(),
            "count": {"label": self.count_label, "truth": self.true_count, **self.count.to_dict()},
            "ground": None
            if self.grounding is None
            else {
                "expression": self.expression,
                "truth": list(self.expression_box or ()),
                **self.grounding.to_dict(),
            },
            "annotated": None if self.annotated is None else str(self.annotated),
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        """The report ``vlm-fo1 demo`` prints."""
        lines = [f"scene: seed {self.seed}, {self.difficulty} difficulty, {len(self.truth)} objects"]
        lines += [
            f"  {phrase:<28} box [{', '.join(f'{v:.0f}' for v in box)}]" for _, phrase, box in self.truth
        ]
        labels = ", ".join(sorted({label for label, _, _ in self.truth}))
        lines.append(f"\ndetect {labels}  ({self.detection.num_proposals} proposals):")
        for d, (phrase, best) in zip(self.detection.detections, self._nearest(), strict=True):
            box = ", ".join(f"{v:.0f}" for v in d.box)
            lines.append(
                f"  {d.label:<10} score {d.score:.2f}  box [{box}]  <region{d.region_index}>  "
                f"best overlap: {phrase} (IoU {best:.2f})"
            )
        if not self.detection.detections:
            lines.append("  (nothing detected)")
        lines.append(f"\ncount {self.count_label}: model says {self.count.count}, truth {self.true_count}")
        if self.expression is not None and self.grounding is not None:
            found = self.grounding.detections
            if found and self.expression_box is not None:
                score = float(box_iou([found[0].box], [self.expression_box])[0, 0])
                lines.append(
                    f'\nground "{self.expression}": <region{found[0].region_index}>, IoU {score:.2f}'
                )
            else:
                lines.append(f'\nground "{self.expression}": nothing grounded')
        if self.annotated is not None:
            lines.append(f"\nannotated image: {self.annotated}")
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)


def _enlarged(image: Image.Image, result: DetectionResult) -> Image.Image:
    big = image.resize((image.width * DRAW_SCALE, image.height * DRAW_SCALE), Image.Resampling.NEAREST)
    boxes = [
        {"label": d.label, "box": [v * DRAW_SCALE for v in d.box], "score": d.score}
        for d in result.detections
    ]
    return draw_detections(big, boxes)


def run_demo(
    model: str | Path | None = None,
    *,
    seed: int = 1,
    difficulty: str = "easy",
    save: str | Path | None = "fo1_demo.png",
    device: str = "cpu",
) -> DemoResult:
    """Generate scene ``seed`` and ask the demo checkpoint about it (see the module docstring).

    Args:
        model: an FO1 checkpoint directory (default: the shipped demo checkpoint).
        seed: which scene (any int; the demo split is disjoint from training splits).
        difficulty: the scene's curriculum level (``easy``, ``medium``, ``full``).
        save: where to write the annotated PNG (None: do not write one).
        device: ``cpu``, ``cuda`` or ``auto``.

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: for an unknown difficulty.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    start = time.perf_counter()
    folder = demo_checkpoint(model)
    scene_config, proposal_config = difficulty_configs(difficulty, max_proposals=DEMO_MAX_PROPOSALS)
    scene, proposals = build_scene(seed, DEMO_SPLIT, 0, scene_config, proposal_config)
    proposer = SyntheticProposer([scene], proposal_config, proposals=[proposals])
    predictor = Predictor.from_pretrained(
        folder,
        proposer,
        device=device,
        unique_labels=True,
        suppress_overlap=DEMO_SUPPRESS_OVERLAP,
        count_from_list=True,
    )
    predictor.set_image(scene.image)

    objects = scene.objects
    truth = tuple((label_of(o), object_phrase(o), tuple(float(v) for v in o.box)) for o in objects)
    counts = Counter(label for label, _, _ in truth)
    labels = sorted(counts)
    detection = predictor.detect(labels)
    count_label, true_count = counts.most_common(1)[0]
    count = predictor.count(plural(count_label))
    expressions = referring_expressions(objects)
    expression, expression_box, grounding = None, None, None
    if expressions:
        _, expression, referent = expressions[seed % len(expressions)]
        expression_box = tuple(float(v) for v in objects[referent].box)
        grounding = predictor.ground(expression)

    annotated = None
    if save is not None:
        annotated = Path(save)
        annotated.parent.mkdir(parents=True, exist_ok=True)
        _enlarged(scene.image, detection).save(annotated)
    return DemoResult(
        seed=seed,
        difficulty=difficulty,
        truth=truth,
        detection=detection,
        count_label=plural(count_label),
        true_count=true_count,
        count=count,
        expression=expression,
        expression_box=expression_box,
        grounding=grounding,
        annotated=annotated,
        seconds=time.perf_counter() - start,
    )
