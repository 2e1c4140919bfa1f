"""Does a trained model's region choice follow the asked label? (docs/training.md, the diagnosis.)

    python benchmarks/label_reading.py runs/bench_final/hybrid-s0/stage2 runs/bench_final/data/val.jsonl

For every positive single-class detection question, the first-region ranking
(``vlm_fo1.ranking``) is read twice: asked for the true class, and with the prompt and the answer
prefix naming another kind instead (``ranking.label_reading``). The mass on the true class's
regions should fall in the second reading if the model reads the question; a model that only
tells objects from distractors gives the same number twice.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlm_fo1.synthetic.drawing import SHAPE_KINDS

CLASSES = (*SHAPE_KINDS, "word")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="FO1 checkpoint directories")
    parser.add_argument("records", help="a miniature-world record file (e.g. DATA/val.jsonl)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from vlm_fo1.data.records import read_records
    from vlm_fo1.model import FO1ForConditionalGeneration
    from vlm_fo1.processing import FO1Processor
    from vlm_fo1.ranking import label_reading

    torch.set_num_threads(args.threads)
    records_path = Path(args.records)
    records = list(read_records(records_path))
    print("| model | questions | mass on the true regions, asked | the same, another kind asked | uniform |")
    print("|---|---:|---:|---:|---:|")
    for path in args.models:
        model = FO1ForConditionalGeneration.from_pretrained(path).eval()
        processor = FO1Processor.from_pretrained(path)
        with torch.no_grad():
            r = label_reading(model, processor, records, records_path.parent, CLASSES, seed=args.seed)
        print(f"| {path} | {r.questions} | {r.asked:.3f} | {r.swapped:.3f} | {r.uniform:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
