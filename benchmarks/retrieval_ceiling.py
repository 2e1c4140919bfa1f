"""What retrieval among the simulated proposals can reach at best, with and without the release's NMS.

    python benchmarks/retrieval_ceiling.py            # 150 held-out full-world scenes, seed 1000

A retrieval model can only name boxes it is given. This script scores three rankings of every
proposal on the single-class detection questions of freshly generated validation splits (same
scenes, the proposals with and without the release's NMS at IoU 0.8), with pycocotools:

- ``targets``: the answer's own regions first (the ceiling of any retrieval model);
- ``kind oracle``: every proposal whose object (IoU >= 0.5) is of the asked kind first, ties by
  proposal score - a perfect classifier of each box that cannot tell which of an object's boxes
  the answer names;
- ``proposal score``: every proposal by its score alone (class-blind).

Without NMS an object keeps up to three tight duplicates with near-equal scores, and even the
kind oracle names them all: every duplicate after the first is a false positive.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vlm_fo1.data.records import read_records
from vlm_fo1.evaluation.metrics import DetectionTruth, ScoredDetection, coco_map
from vlm_fo1.synthetic import RELEASE_NMS_IOU, difficulty_configs, generate_dataset


def rankings(split: Path) -> dict[str, dict[str, float]]:
    """COCO metrics of the three rankings on ``split``'s single-class detection records."""
    truth_by_image = {}
    with split.with_name(f"{split.stem}_scenes.jsonl").open() as handle:
        for line in handle:
            scene = json.loads(line)
            truth_by_image[scene["image"]] = scene
    records = [r for r in read_records(split) if r.meta.get("task") == "detection"]
    classes = sorted({c for r in records for c in r.meta["classes"]})
    truths = []
    scored: dict[str, list[ScoredDetection]] = {"targets": [], "kind oracle": [], "proposal score": []}
    for image_id, record in enumerate(records):
        label = record.meta["classes"][0]
        truths.append(DetectionTruth(image_id, {label: record.meta["gt_boxes"][label]}))
        scene = truth_by_image[record.image]
        proposals, targets = scene["proposals"], set(record.meta["target_regions"][label])
        for k, (box, score) in enumerate(zip(record.boxes, record.scores, strict=True)):
            matched, overlap = proposals["matched_object"][k], proposals["iou"][k]
            kind_hit = matched >= 0 and overlap >= 0.5 and scene["objects"][matched]["kind"] == label
            values = {
                "targets": float(k in targets) + 0.01 * score,
                "kind oracle": float(kind_hit) + 0.01 * score,
                "proposal score": score,
            }
            for name, value in values.items():
                scored[name].append(ScoredDetection(image_id, label, box, value))
    return {name: coco_map(truths, predictions, classes) for name, predictions in scored.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-proposals", type=int, default=32)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, nms in (("no NMS", None), (f"NMS {RELEASE_NMS_IOU}", RELEASE_NMS_IOU)):
            scene_config, proposal_config = difficulty_configs(
                "full", max_proposals=args.max_proposals, nms_iou=nms
            )
            split = generate_dataset(
                Path(tmp) / name.replace(" ", "_"), args.scenes, args.seed,
                scene_config=scene_config, proposal_config=proposal_config, split_name="val",
            )  # fmt: skip
            boxes = [len(r.boxes) for r in read_records(split) if r.meta.get("task") == "detection"]
            for ranking, metrics in rankings(split).items():
                rows.append((name, sum(boxes) / len(boxes), ranking, metrics["mAP50"], metrics["mAP"]))
    print(f"{args.scenes} full-world scenes, seed {args.seed}, single-class detection questions\n")
    print("| proposals | boxes per question | ranking | mAP50 | mAP |\n|---|---:|---|---:|---:|")
    for name, boxes, ranking, map50, map_ in rows:
        print(f"| {name} | {boxes:.1f} | {ranking} | {map50:.3f} | {map_:.3f} |")


if __name__ == "__main__":
    main()
