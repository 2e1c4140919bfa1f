"""How much of the miniature world's detection the region tokens' content supports, without the LLM.

    python benchmarks/region_probe.py                        # hybrid, 200 and 600 perception steps
    python benchmarks/region_probe.py --sources hybrid vit aux --steps 200

Region perception pretraining (``training.perception``) teaches the region side, through linear
heads, the kind, colour and size of what each proposal covers. Used as a detector (each region
scored by the kind head's probability of the queried class, :func:`probe_detection`), those heads
give the detection mAP that the region tokens' content alone supports on the held-out full-world
validation split. Set against the FO1 arms of ``benchmarks/miniature.py`` (same data, same base,
200 perception steps), it tells whether the region encoder or the language model's retrieval is
the bottleneck. Needs the world and the stage-0 base of a ``benchmarks/miniature.py`` run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", default=str(ROOT / "runs" / "miniature"), help="a benchmarks/miniature.py --out"
    )
    parser.add_argument("--sources", nargs="+", default=["hybrid"], choices=["hybrid", "vit", "aux"])
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[200, 600], help="perception steps (cumulative)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from vlm_fo1.data.records import read_records
    from vlm_fo1.training.config import run_config_from_dict
    from vlm_fo1.training.miniature import FO1_OVERRIDES
    from vlm_fo1.training.perception import pretrain_region_perception, probe_detection
    from vlm_fo1.training.trainer import init_model

    torch.set_num_threads(args.threads)
    run, data = Path(args.run), Path(args.run) / "data"
    scenes, base = data / "train_scenes.jsonl", run / "base"
    for needed in (scenes, base / "config.json", data / "val.jsonl"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: run python benchmarks/miniature.py first")
    val = list(read_records(data / "val.jsonl"))
    rows = []
    for source in args.sources:
        overrides = {**FO1_OVERRIDES, "region_source": source}
        config = run_config_from_dict(
            {"stage": 1, "seed": args.seed, "model": {"init": str(base), "keep": "vlm", "overrides": overrides},
             "data": {"train": [{"path": str(scenes)}]}}
        )  # fmt: skip
        model, processor = init_model(config)
        done, start = 0, time.perf_counter()
        for steps in sorted(args.steps):
            # Continues the same region side (a fresh optimizer and head per call).
            result = pretrain_region_perception(
                model,
                processor,
                scenes,
                steps=steps - done,
                seed=args.seed + done,
                progress=sys.stderr.isatty(),
            )
            done = steps
            assert result.heads is not None
            metrics = probe_detection(model, processor, result.heads, val, data)
            rows.append((source, steps, result.accuracy, metrics, time.perf_counter() - start))
    print(f"run {run}, seed {args.seed}, {args.threads} threads; held-out val detection records\n")
    print("| region side | perception steps | kind acc | colour acc | probe mAP50 | probe mAP | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for source, steps, accuracy, metrics, seconds in rows:
        print(
            f"| {source} | {steps} | {accuracy['kind']:.3f} | {accuracy['colour']:.3f} | "
            f"{metrics['mAP50']:.3f} | {metrics['mAP']:.3f} | {seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
