"""``vlm-fo1``: a thin command line over the library (each sub-command calls one library function).

Questions about one image (``vlm_fo1.inference.tasks.run_query``)::

    vlm-fo1 detect IMAGE --labels "cat, dog"
    vlm-fo1 ground IMAGE "the red cup"
    vlm-fo1 count IMAGE LABEL
    vlm-fo1 describe IMAGE --box x1,y1,x2,y2 [--detailed]
    vlm-fo1 ocr IMAGE --box x1,y1,x2,y2
    vlm-fo1 ask IMAGE "question"

Common options: ``--model`` (local checkpoint directory or Hub id; offline, a Hub id fails at
once with exit code 2), ``--proposer`` (default: ``given`` with ``--boxes FILE``, else
``omdet-turbo``), ``--proposer-model``, ``--boxes FILE`` (JSON, see ``vlm_fo1.proposals.given``),
``--device``, ``--dtype``, ``--max-new-tokens``, ``--confidence``. ``describe``/``ocr`` without
``--boxes`` need no detector: the given box is the only candidate.

Output: a short human summary by default; ``--json`` prints one JSON object, the result's
``to_dict()`` (schema in ``vlm_fo1.inference.results``) plus ``"image"``: the image path::

    {"image": "photo.jpg", "task": "detection", "image_size": [w, h], "num_proposals": 12,
     "text": "...", "answer": "...", "issues": [],
     "detections": [{"label", "box": [x1, y1, x2, y2], "score", "region_index",
                     "model_probability", "proposal_score"}],
     "count", "count_source"                    (count only)
     "reasoning", "mentioned_regions"           (describe, ocr, ask)}

``--save annotated.png`` draws the detections (``vlm_fo1.drawing``).

Many images (``vlm_fo1.inference.tasks.run_predict``)::

    vlm-fo1 predict DIR_OR_LIST --labels "cat, dog" --out results.json

writes COCO results, a ``.meta.json`` sidecar (categories, images, failed) and a resumable
``.progress.jsonl`` next to ``--out``.

Errors a user can fix (bad arguments, missing files, an unreachable model) print one line
``vlm-fo1 COMMAND: error: …`` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlm_fo1.inference.tasks import ModelSettings

logger = logging.getLogger("vlm_fo1")


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from vlm_fo1.inference.hub import resolve_model_path

    source = resolve_model_path(args.source)  # a Hub id is fetched (or fails at once offline)
    import torch

    from vlm_fo1.checkpoints import convert_official

    dtype = getattr(torch, args.dtype) if args.dtype else None
    destination = convert_official(source, args.destination, dtype=dtype)
    print(f"wrote an FO1 checkpoint to {destination}")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    from vlm_fo1.smoke import run_smoke

    result = run_smoke(num_boxes=args.boxes, seed=args.seed)
    print(result.summary())
    return 0


def _recipe(**fields: Any) -> Any:
    """The miniature recipe with the options given on the command line (None: the recipe's)."""
    from dataclasses import replace

    from vlm_fo1.training.miniature import Recipe

    return replace(Recipe(), **{name: value for name, value in fields.items() if value is not None})


def _cmd_perceive(args: argparse.Namespace) -> int:
    from vlm_fo1.training.miniature import FO1_OVERRIDES, perceive

    overrides = {**FO1_OVERRIDES, "region_source": args.region_source}
    recipe = _recipe(
        perception_steps=args.steps,
        batch_size=args.batch_size,
        perception_align_weight=args.align_weight,
        perception_match_weight=args.match_weight,
        perception_match_lr_scale=args.match_lr_scale,
        perception_aux_frozen=args.aux_frozen,
    )
    out = perceive(
        args.base,
        args.scenes,
        args.out,
        overrides,
        recipe,
        seed=args.seed,
        aux_from=args.aux_from,
        progress=not args.no_progress,
    )
    print(f"region side pretrained; checkpoint in {out} (held-out accuracy in {out / 'perception.json'})")
    return 0


def _cmd_pretrain_aux(args: argparse.Namespace) -> int:
    from vlm_fo1.training.miniature import pretrain_aux

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    recipe = _recipe(aux_pretrain_steps=args.steps, batch_size=args.batch_size, preset=args.preset)
    out = pretrain_aux(args.scenes, args.out, recipe, seed=args.seed, progress=not args.no_progress)
    print(
        f"auxiliary encoder pretrained; weights in {out} (held-out accuracy in {args.out}/aux_pretraining.json)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from vlm_fo1.demo import run_demo

    hf_logging.disable_progress_bar()  # a 10 MB checkpoint loads at once; the bar is only noise here

    result = run_demo(
        args.model,
        seed=args.seed,
        difficulty=args.difficulty,
        save=None if args.no_save else args.save,
        device=args.device,
    )
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else result.summary())
    return 0


def _settings(args: argparse.Namespace) -> ModelSettings:
    from vlm_fo1.inference.hub import resolve_model_path

    model = resolve_model_path(args.model)  # fails fast (offline Hub id), before torch is imported
    from vlm_fo1.inference.tasks import ModelSettings

    return ModelSettings(
        model=str(model),
        proposer=args.proposer,
        proposer_model=args.proposer_model,
        boxes=args.boxes,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        confidence=args.confidence,
    )


def _cmd_query(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from vlm_fo1.inference.tasks import run_query

    query = {"detect": "labels", "describe": "box", "ocr": "box"}.get(args.command, "query")
    result = run_query(
        settings,
        args.command,
        args.image,
        getattr(args, query),
        detailed=getattr(args, "detailed", False),
        save=args.save,
        ranked=getattr(args, "ranked", None),
        per_class=getattr(args, "per_class", False),
    )
    if args.json:
        print(json.dumps({"image": args.image, **result.to_dict()}, ensure_ascii=False))
    else:
        print(result.summary())
    if args.save:
        print(f"annotated image written to {args.save}", file=sys.stderr)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from vlm_fo1.inference.tasks import run_predict

    summary = run_predict(
        settings,
        args.source,
        args.labels,
        args.out,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        image_root=args.image_root,
    )
    print(summary.summary())
    return 0


def _model_options() -> argparse.ArgumentParser:
    """Options shared by the inference commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="FO1 checkpoint: a local directory or a Hub id")
    common.add_argument(
        "--proposer",
        default=None,
        help="proposal network: given, omdet-turbo, grounding-dino, owlv2 "
        "(default: given with --boxes, else omdet-turbo)",
    )
    common.add_argument(
        "--proposer-model", default=None, help="the detector's checkpoint (directory or Hub id)"
    )
    common.add_argument(
        "--boxes", default=None, metavar="FILE", help="candidate boxes (JSON) for --proposer given"
    )
    common.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: CUDA when available)")
    common.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    common.add_argument("--max-new-tokens", type=int, default=128)
    common.add_argument("--confidence", choices=["product", "model", "proposal"], default="product")
    return common


def _output_options() -> argparse.ArgumentParser:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print the result as one JSON object")
    output.add_argument(
        "--save", default=None, metavar="PNG", help="write the image with the detections drawn"
    )
    return output


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    parents = [_model_options(), _output_options()]
    detect = sub.add_parser("detect", parents=parents, help="detect the given classes in an image")
    detect.add_argument("image")
    detect.add_argument("--labels", required=True, help='class names, comma-separated ("cat, dog")')
    detect.add_argument(
        "--ranked",
        type=int,
        metavar="K",
        default=None,
        help="list the K best proposals by the model's ranking (one forward pass per label) instead of generating",
    )
    detect.add_argument(
        "--per-class",
        action="store_true",
        help="ask for each label on its own and join the answers (one generation per label)",
    )
    ground = sub.add_parser("ground", parents=parents, help="find what a referring expression points at")
    ground.add_argument("image")
    ground.add_argument("query", metavar="EXPRESSION")
    count = sub.add_parser("count", parents=parents, help="count the instances of a class")
    count.add_argument("image")
    count.add_argument("query", metavar="LABEL")
    describe = sub.add_parser("describe", parents=parents, help="describe one region")
    describe.add_argument("image")
    describe.add_argument("--box", required=True, help="the region as x1,y1,x2,y2 (original pixels)")
    describe.add_argument("--detailed", action="store_true", help="a detailed rather than a brief caption")
    ocr = sub.add_parser("ocr", parents=parents, help="read the text in one region")
    ocr.add_argument("image")
    ocr.add_argument("--box", required=True, help="the region as x1,y1,x2,y2 (original pixels)")
    ask = sub.add_parser("ask", parents=parents, help="ask a free question about an image")
    ask.add_argument("image")
    ask.add_argument("query", metavar="QUESTION")
    for command in (detect, ground, count, describe, ocr, ask):
        command.set_defaults(func=_cmd_query)

    predict = sub.add_parser(
        "predict", parents=[_model_options()], help="detect over many images (COCO results)"
    )
    predict.add_argument(
        "source", metavar="DIR_OR_LIST", help="a folder, a text file of paths or a COCO JSON"
    )
    predict.add_argument("--labels", required=True, help='class names, comma-separated ("cat, dog")')
    predict.add_argument("--out", required=True, help="COCO results JSON to write (sidecars go next to it)")
    predict.add_argument(
        "--image-root",
        default=None,
        help="where relative paths of a list or COCO JSON start (default: its folder)",
    )
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    predict.set_defaults(func=_cmd_predict)
    # `vlm-fo1 demo` (owned elsewhere) registers here, beside the inference commands.


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


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
            if not isinstance(node, dict):
                raise ValueError(
                    f"override {pair!r} sets a key inside {part!r}, which another override set to {node!r}"
                )
        if isinstance(node.get(leaf), dict):
            raise ValueError(
                f"override {pair!r} replaces the section {key!r} that other overrides set inside"
            )
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _NUMBER.fullmatch(value.strip()):
            parsed = float(value)  # YAML 1.1 reads "5e-4" (no dot) as a string
            if parsed.is_integer() and "." not in value:
                parsed = int(parsed)  # "1e3" steps: an int, as a step count must be
        node[leaf] = parsed
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
        constrained=args.constrained
        or args.stop_by_mass
        or args.suppress_overlap is not None
        or args.close_bias is not None
        or args.unique_labels
        or args.count_from_list,
        stop_by_mass=args.stop_by_mass,
        suppress_overlap=args.suppress_overlap,
        close_bias=args.close_bias or 0.0,
        unique_labels=args.unique_labels,
        count_from_list=args.count_from_list,
        ranked=args.ranked,
        per_class=args.per_class,
        progress=not args.no_progress,
    )
    print(report.table())
    print(f"metrics written to {args.out}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from vlm_fo1.synthetic import RELEASE_NMS_IOU, TaskMix, difficulty_configs, generate_dataset

    mix = TaskMix.general() if args.general else TaskMix(negative_ratio=args.negative_ratio)
    scenes, proposals = difficulty_configs(
        args.difficulty,
        max_proposals=args.max_proposals,
        recall=args.recall,
        nms_iou=None if args.no_nms else RELEASE_NMS_IOU,
    )
    path = generate_dataset(
        args.out,
        args.scenes,
        args.seed,
        scene_config=scenes,
        proposal_config=proposals,
        mix=mix,
        split_name=args.split,
    )
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-fo1", description="VLM-FO1: region-token perception for VLMs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser("convert-official", help="convert an official VLM-FO1 release directory")
    convert.add_argument("source", help="release directory (omchat_qwen2_5_vl layout) or its Hub id")
    convert.add_argument("destination", help="directory to write the FO1 checkpoint to")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    convert.set_defaults(func=_cmd_convert_official)

    train = sub.add_parser("train", help="run one training stage from a YAML run config")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values (repeatable: --set a=1 b=2 --set c=3)",
    )
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
    evaluate.add_argument(
        "--constrained",
        action="store_true",
        help="decode under the grounding constraint, as the Predictor does",
    )
    evaluate.add_argument(
        "--stop-by-mass",
        action="store_true",
        help="constrained, and go on naming regions while they together outweigh </objects>",
    )
    evaluate.add_argument(
        "--suppress-overlap",
        type=float,
        default=None,
        metavar="IOU",
        help="constrained, and once a box is named do not offer boxes overlapping it by more IoU",
    )
    evaluate.add_argument(
        "--close-bias",
        type=float,
        default=None,
        metavar="LOGIT",
        help="constrained, and add LOGIT to </objects> inside <objects> (> 0: fewer, surer regions)",
    )
    evaluate.add_argument(
        "--unique-labels",
        action="store_true",
        help="constrained, and ground each asked label in at most one segment of an answer",
    )
    evaluate.add_argument(
        "--count-from-list",
        action="store_true",
        help="constrained, and a number written after </objects> is the count of the regions named",
    )
    evaluate.add_argument(
        "--ranked",
        action="store_true",
        help="also rank every region of each detection query by the model (detection/mAP@ranked)",
    )
    evaluate.add_argument(
        "--per-class",
        action="store_true",
        help="ask each class of a multi-class detection question on its own and join the answers",
    )
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
    synth.add_argument(
        "--no-nms",
        action="store_true",
        help="keep every simulated box (default: the release's NMS at IoU 0.8)",
    )
    synth.add_argument(
        "--difficulty",
        choices=["easy", "medium", "full"],
        default="full",
        help="curriculum level: easy = 1-2 objects with clean proposals (see docs/training.md)",
    )
    synth.set_defaults(func=_cmd_synth)

    smoke = sub.add_parser("smoke", help="run the whole pipeline once on a tiny random model (offline)")
    smoke.add_argument("--boxes", type=int, default=5)
    smoke.add_argument("--seed", type=int, default=0)
    smoke.set_defaults(func=_cmd_smoke)

    perceive = sub.add_parser(
        "perceive", help="miniature world: pretrain a fresh region side on scene truth (before stage 1)"
    )
    perceive.add_argument("base", help="stage-0 checkpoint directory")
    perceive.add_argument("scenes", help="a {split}_scenes.jsonl written by vlm-fo1 synth")
    perceive.add_argument("out", help="directory to write the FO1 checkpoint to")
    perceive.add_argument("--steps", type=int, default=None, help="the miniature recipe's by default")
    perceive.add_argument("--batch-size", type=int, default=None, help="the recipe's (16) by default")
    perceive.add_argument(
        "--align-weight", type=float, default=None, help="region-word alignment loss weight (the recipe's: 0)"
    )
    perceive.add_argument(
        "--match-weight",
        type=float,
        default=None,
        help="word-match loss weight (trains the connector and the label-region match; the recipe's by default)",
    )
    perceive.add_argument(
        "--match-lr-scale",
        type=float,
        default=None,
        help="learning-rate multiplier of the label-region match's own parameters (the recipe's by default)",
    )
    perceive.add_argument(
        "--aux-frozen",
        type=int,
        default=None,
        metavar="N",
        help="leave the first N child modules of the auxiliary encoder (stem, stages) untrained (the recipe's by default)",
    )
    perceive.add_argument("--region-source", choices=["hybrid", "vit", "aux"], default="hybrid")
    perceive.add_argument(
        "--aux-from", default=None, help="auxiliary-encoder weights to start from (vlm-fo1 pretrain-aux)"
    )
    perceive.add_argument("--seed", type=int, default=0)
    perceive.add_argument("--no-progress", action="store_true")
    perceive.set_defaults(func=_cmd_perceive)

    pretrain_aux = sub.add_parser(
        "pretrain-aux",
        help="miniature world: dense pretraining of the auxiliary encoder on a world's object maps",
    )
    pretrain_aux.add_argument("out", help="directory for aux_encoder.safetensors")
    pretrain_aux.add_argument("scenes", nargs="+", help="{split}_scenes.jsonl files written by vlm-fo1 synth")
    pretrain_aux.add_argument("--steps", type=int, default=None, help="the miniature recipe's by default")
    pretrain_aux.add_argument("--batch-size", type=int, default=None, help="the recipe's (16) by default")
    pretrain_aux.add_argument(
        "--preset",
        choices=["mini", "tiny"],
        default="mini",
        help="architecture (that of the base used later)",
    )
    pretrain_aux.add_argument("--seed", type=int, default=0)
    pretrain_aux.add_argument("--no-progress", action="store_true")
    pretrain_aux.set_defaults(func=_cmd_pretrain_aux)

    demo = sub.add_parser(
        "demo", help="the shipped miniature-world checkpoint on a generated scene (offline; writes a PNG)"
    )
    demo.add_argument("--model", default=None, help="FO1 checkpoint directory (default: the shipped demo)")
    demo.add_argument("--seed", type=int, default=1, help="which scene to generate")
    demo.add_argument(
        "--difficulty",
        choices=["easy", "medium", "full"],
        default="easy",
        help="scene level (see docs/training.md)",
    )
    demo.add_argument("--save", default="fo1_demo.png", help="annotated PNG to write")
    demo.add_argument("--no-save", action="store_true", help="do not write the annotated PNG")
    demo.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(func=_cmd_demo)

    _add_inference_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # errors the user can fix: one line, no traceback
        print(f"vlm-fo1 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
