"""Write a split of the miniature world to disk: PNG images, conversation records, scene truth.

Layout of ``out_dir`` after :func:`generate_dataset` (``split = "train"``)::

    images/train-000000.png …       the scenes
    masks/train-000000.png …        8-bit object maps: pixel value k > 0 shows object k - 1
                                    of the scene's ``objects``, 0 none (``Scene.object_map``)
    train.jsonl                     ConversationRecords (``image`` relative to ``out_dir``)
    train_scenes.jsonl              one line per scene: seed, size, objects, proposals with
                                    their source object and IoU, the mask's path (for analysis
                                    and pretraining; evaluation needs only the records' ``meta``)

Every scene, proposal set and task choice has its own seed, derived from ``(seed, split_name,
scene index)`` by :func:`derive_seed`; different split names give unrelated scenes, so training
and evaluation data never share a scene even with the same base seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vlm_fo1.data.records import ConversationRecord, write_records
from vlm_fo1.synthetic.proposals import RELEASE_NMS_IOU, ProposalConfig, Proposals, simulate_proposals
from vlm_fo1.synthetic.scenes import Scene, SceneConfig, render_scene
from vlm_fo1.synthetic.tasks import NegativeBalance, TaskMix, make_records

logger = logging.getLogger(__name__)


def derive_seed(seed: int, *parts: str | int) -> int:
    """A 63-bit seed from ``seed`` and labels (stable across runs, platforms and Python versions)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def scene_truth(scene: Scene, proposals: Proposals, image: str, mask: str | None = None) -> dict[str, object]:
    """One line of ``{split}_scenes.jsonl`` (``mask``: the object map's path, when written)."""
    return {
        "seed": scene.seed,
        "image": image,
        **({"mask": mask} if mask is not None else {}),
        "size": list(scene.size),
        "objects": [o.to_json() for o in scene.objects],
        "proposals": {
            "boxes": proposals.box_lists(),
            "scores": list(proposals.scores),
            "matched_object": list(proposals.matched_object),
            "iou": list(proposals.iou),
        },
    }


def save_object_map(scene: Scene, path: Path) -> None:
    """The scene's object map as an 8-bit PNG: object index + 1, 0 where no object shows."""
    if scene.object_map is None:
        raise ValueError("the scene has no object map (render_scene draws one)")
    if len(scene.objects) > 255:
        raise ValueError(f"an 8-bit object map holds at most 255 objects, got {len(scene.objects)}")
    Image.fromarray((scene.object_map + 1).astype(np.uint8), "L").save(path, format="PNG")


def build_scene(
    seed: int, split_name: str, index: int, scene_config: SceneConfig, proposal_config: ProposalConfig
) -> tuple[Scene, Proposals]:
    """Scene ``index`` of a split and its proposals (what :func:`generate_dataset` draws)."""
    scene = render_scene(scene_config, derive_seed(seed, split_name, index, "scene"))
    proposals = simulate_proposals(
        scene, proposal_config, random.Random(derive_seed(seed, split_name, index, "boxes"))
    )
    return scene, proposals


DIFFICULTIES = ("easy", "medium", "full")


def difficulty_configs(
    difficulty: str,
    *,
    max_proposals: int = 100,
    recall: float = 0.95,
    nms_iou: float | None = RELEASE_NMS_IOU,
) -> tuple[SceneConfig, ProposalConfig]:
    """Scene and proposal settings of a curriculum level.

    Small models learn to pick region names from a few candidates long before they learn it from
    many (a curriculum breaks the plateau, see docs/training.md); ``easy`` scenes, which every
    stage trains on in part, have one or two objects whose single tight proposal is joined by at
    most one background box. ``medium`` has up to four objects with some duplicates, parts and
    distractors; ``full`` is the default world (:class:`SceneConfig` and :class:`ProposalConfig`
    defaults). ``nms_iou``: every level's proposals pass the release's NMS at this IoU
    (:class:`ProposalConfig`; None keeps every box).

    Raises:
        ValueError: for an unknown difficulty.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    if difficulty == "full":
        return SceneConfig(), ProposalConfig(max_proposals=max_proposals, recall=recall, nms_iou=nms_iou)
    easy = difficulty == "easy"
    scene = SceneConfig(objects_range=(1, 2) if easy else (1, 4))
    proposals = ProposalConfig(
        max_proposals=max_proposals,
        recall=recall,
        nms_iou=nms_iou,
        duplicates_range=(0, 0) if easy else (0, 1),
        loose_probability=0.0 if easy else 0.2,
        part_probability=0.0 if easy else 0.15,
        distractors_range=(0, 1) if easy else (1, 4),
        clutter_distractor_probability=0.0 if easy else 0.25,
    )
    return scene, proposals


def generate_dataset(
    out_dir: str | Path,
    num_scenes: int,
    seed: int,
    scene_config: SceneConfig | None = None,
    proposal_config: ProposalConfig | None = None,
    mix: TaskMix | None = None,
    split_name: str = "train",
) -> Path:
    """Render ``num_scenes`` scenes and write their images, records and truth; returns the JSONL path.

    Raises:
        ValueError: when ``num_scenes`` < 1 or ``split_name`` is not a plain file-name stem.
    """
    if num_scenes < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes!r}")
    if not split_name or not split_name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"split_name must be letters, digits, '-' or '_', got {split_name!r}")
    scene_config, proposal_config = scene_config or SceneConfig(), proposal_config or ProposalConfig()
    mix = mix or TaskMix()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    truth_path = out / f"{split_name}_scenes.jsonl"

    def records() -> Iterator[ConversationRecord]:
        balance = NegativeBalance(mix.negative_ratio)
        with truth_path.open("w", encoding="utf-8") as truth:
            progress = tqdm(range(num_scenes), desc=f"{split_name} scenes", disable=not sys.stderr.isatty())
            for index in progress:
                scene, proposals = build_scene(seed, split_name, index, scene_config, proposal_config)
                image, mask = f"images/{split_name}-{index:06d}.png", f"masks/{split_name}-{index:06d}.png"
                scene.image.save(out / image, format="PNG")
                save_object_map(scene, out / mask)
                truth.write(json.dumps(scene_truth(scene, proposals, image, mask)) + "\n")
                rng = random.Random(derive_seed(seed, split_name, index, "tasks"))
                yield from make_records(scene, proposals, mix, rng, image, balance=balance)

    path = out / f"{split_name}.jsonl"
    count = write_records(path, records())
    logger.info("wrote %d records about %d scenes to %s", count, num_scenes, path)
    return path
