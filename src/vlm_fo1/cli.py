"""``vlm-fo1``: a thin command line over the library (each sub-command calls one library function)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger("vlm_fo1")


def _cmd_convert_official(args: argparse.Namespace) -> int:
    import torch

    from vlm_fo1.checkpoints import convert_official

    dtype = getattr(torch, args.dtype) if args.dtype else None
    destination = convert_official(args.source, args.destination, dtype=dtype)
    print(f"wrote an FO1 checkpoint to {destination}")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    from vlm_fo1.smoke import run_smoke

    result = run_smoke(num_boxes=args.boxes, seed=args.seed)
    print(result.summary())
    return 0


def _parse_overrides(pairs: Sequence[str]) -> dict:
    """``optim.steps=100`` style overrides → a nested dict (values parsed as YAML scalars)."""
    import yaml

    result: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE (e.g. optim.steps=100), got {pair!r}")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return result


def _cmd_train(args: argparse.Namespace) -> int:
    from vlm_fo1.training import load_run_config, train

    config = load_run_config(args.config, _parse_overrides(args.set))
    result = train(config, progress=not args.no_progress)
    print(
        f"trained stage {config.stage} for {result.steps} steps in {result.seconds:.0f} s; model in {result.output_dir}"
    )
    if result.resumed_from:
        print(f"(resumed from {result.resumed_from})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlm_fo1.evaluation.cli import run_eval

    report = run_eval(
        args.model,
        args.data,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        device=args.device,
        confidence=args.confidence,
        progress=not args.no_progress,
    )
    print(report.table())
    print(f"metrics written to {args.out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from vlm_fo1.synthetic import ProposalConfig, TaskMix, generate_dataset

    mix = TaskMix.general() if args.general else TaskMix(negative_ratio=args.negative_ratio)
    proposals = ProposalConfig(max_proposals=args.max_proposals, recall=args.recall)
    path = generate_dataset(
        args.out, args.scenes, args.seed, proposal_config=proposals, mix=mix, split_name=args.split
    )
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-fo1", description="VLM-FO1: region-token perception for VLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert-official", help="convert an official VLM-FO1 release directory")
    convert.add_argument("source", help="local directory in the release's layout (omchat_qwen2_5_vl)")
    convert.add_argument("destination", help="directory to write the FO1 checkpoint to")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    convert.set_defaults(func=_cmd_convert_official)

    train = sub.add_parser("train", help="run one training stage from a YAML run config")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a model on a records file; writes a metrics JSON")
    evaluate.add_argument("model", help="FO1 checkpoint directory")
    evaluate.add_argument("data", help="records JSONL (ours or the release's evaluation files)")
    evaluate.add_argument("--out", default="metrics.json", help="where to write the metrics JSON")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--confidence", choices=["product", "model", "proposal"], default="product")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_cmd_eval)

    synth = sub.add_parser("synth", help="generate miniature-world data (images + records JSONL)")
    synth.add_argument("out", help="output folder (images/ and {split}.jsonl)")
    synth.add_argument("--scenes", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--split", default="train", help="split name (also mixed into the seed)")
    synth.add_argument("--general", action="store_true", help="plain VQA and captions only (stage-0 data)")
    synth.add_argument("--negative-ratio", type=float, default=0.2)
    synth.add_argument("--max-proposals", type=int, default=32)
    synth.add_argument("--recall", type=float, default=0.95, help="simulated proposal recall")
    synth.set_defaults(func=_cmd_synth)

    smoke = sub.add_parser("smoke", help="run the whole pipeline once on a tiny random model (offline)")
    smoke.add_argument("--boxes", type=int, default=5)
    smoke.add_argument("--seed", type=int, default=0)
    smoke.set_defaults(func=_cmd_smoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        print(f"vlm-fo1 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
