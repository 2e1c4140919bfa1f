"""Does a base that learnt region retrieval from words retrieve regions from region tokens?

    python benchmarks/described_base.py                     # base 3000 steps, hybrid seed 0 (~15 min)

The paper's stage 1 aligns region tokens to a pretrained language model that already knows how
to find things in a list; the miniature base does not (docs/training.md, "Where it fails"). This
experiment gives the stage-0 base that skill in text: besides the captions and VQA of the
recipe it trains on described-region records (``synthetic.described``: the detection,
multi-detection and counting records of the easy, medium and full splits with the listing
``<region0>circle<region1>empty…`` instead of an image; listings shuffled), then runs the
recipe's hybrid arm on it unchanged. It prints the base's text retrieval accuracy (first region
named after ``<ground>label</ground><objects>`` among the targets, shuffled held-out described
records) after stage 0, stage 1 and stage 2, and the arm's held-out metrics next to the
benchmark's hybrid seed 0 (from ``RUN/hybrid-s0``, when present). Needs the world and the
benchmark's run folder of ``benchmarks/miniature.py``. Results: docs/training.md ("A base that
already retrieves in text does not help").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("detection/mAP50", "detection/mAP50@ranked", "detection/fp_rate", "referring/acc50")


def text_retrieval_accuracy(model_dir: Path, records_path: Path, limit: int = 200) -> tuple[float, float]:
    """(accuracy, chance) of the first region named for the positive described detection records
    (listing shuffled with a fixed seed); chance is the target share of the listing."""
    import torch

    from vlm_fo1.data.collate import FO1Collator
    from vlm_fo1.data.records import permute_regions, read_records
    from vlm_fo1.model import FO1ForConditionalGeneration
    from vlm_fo1.processing import FO1Processor

    model = FO1ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = FO1Processor.from_pretrained(model_dir)
    collate = FO1Collator(processor)
    rng = random.Random(0)
    records = [
        r for r in read_records(records_path) if r.meta["task"] == "detection" and not r.meta["negative"]
    ]
    records = [permute_regions(r, rng.sample(range(r.num_regions), r.num_regions)) for r in records[:limit]]
    region_ids = torch.tensor(processor.region_token_ids)
    hits = chance = 0.0
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        batch = collate(chunk)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, record in enumerate(chunk):
            first = int(torch.isin(batch["labels"][row], region_ids).nonzero()[0])  # the first named region
            pick = int(logits[row, first - 1, region_ids[: record.num_regions]].argmax())
            targets = next(iter(record.meta["target_regions"].values()))
            hits += pick in targets
            chance += len(targets) / record.num_regions
    return hits / len(records), chance / len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", default=str(ROOT / "runs" / "miniature"), help="a benchmarks/miniature.py --out"
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "described"))
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from vlm_fo1.synthetic import write_described
    from vlm_fo1.training.miniature import Recipe, _stage, evaluate_checkpoint, make_world, train_fo1

    torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    if not (run / "data" / "val.jsonl").is_file():
        raise SystemExit(f"{run / 'data'} holds no world: run python benchmarks/miniature.py first")
    world = make_world(run / "data")
    out.mkdir(parents=True, exist_ok=True)
    described = {
        name: write_described(path, out / f"{name}_described.jsonl")
        for name, path in (
            ("easy", world.easy),
            ("medium", world.medium),
            ("full", world.full),
            ("val", world.val),
        )
    }
    recipe = Recipe()
    sources = [(world.general, 1.0, None)] + [(described[n], 1.0, None) for n in ("easy", "medium", "full")]
    base = _stage(0, out / "base", None, sources, args.base_steps, recipe, 0)
    arm = train_fo1(world, base, out / "hybrid-s0", recipe, seed=0)
    for name, model_dir in (("stage 0", base), ("stage 1", arm.parent / "stage1"), ("stage 2", arm)):
        accuracy, chance = text_retrieval_accuracy(model_dir, described["val"])
        print(f"text retrieval after {name}: {accuracy:.3f} (chance {chance:.3f})")
    results = {
        "described base": {
            "val": evaluate_checkpoint(arm, world.val, constrained=True, ranked=True),
            "val_easy": evaluate_checkpoint(arm, world.val_easy, constrained=True, ranked=True),
            "general": evaluate_checkpoint(arm, world.val_general),
        }
    }
    reference = run / "hybrid-s0" / "stage2"
    if (reference / "config.json").is_file():
        results["benchmark base"] = {
            "val": evaluate_checkpoint(reference, world.val, constrained=True, ranked=True),
            "val_easy": evaluate_checkpoint(reference, world.val_easy, constrained=True, ranked=True),
            "general": evaluate_checkpoint(reference, world.val_general),
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| hybrid seed 0, constrained | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for split, metrics in (("val", METRICS), ("val_easy", METRICS), ("general", ("vqa/accuracy",))):
        for metric in metrics:
            values = " | ".join(f"{r[split].get(metric, float('nan')):.3f}" for r in results.values())
            print(f"| {split} {metric} | {values} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
