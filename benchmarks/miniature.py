"""The miniature reproduction of VLM-FO1's claims on 2 CPU cores (issue: training and evaluation).

    python benchmarks/miniature.py                      # every arm, seeds 0 and 1 (~40-60 min on 2 cores)
    python benchmarks/miniature.py --scale 0.25 --seeds 0   # a quick look
    python benchmarks/miniature.py --demo-only          # just the demo checkpoint (hybrid, seed 0)

Arms, all from one shared stage-0 base and with the same step budget (``training.miniature``);
the base and the dense pretraining of the auxiliary encoder run first, side by side; every arm
that uses the DaViT starts from that encoder, and each job starts as soon as what it needs is
done (in ``ARM_ORDER``, seed by seed), so the arms without a DaViT fill the wait for it:

    hybrid     FO1 with both encoders (ViT + auxiliary DaViT)          region_source=hybrid
    vit        primary ViT only                                         region_source=vit
    aux        auxiliary encoder only                                   region_source=aux
    no-neg     hybrid without the ~20 % negative records in stage 2    (reuses hybrid's stage 1)
    coords     the base trained to write boxes as text (no proposals)   evaluation/coords.py

Each arm is evaluated on the held-out validation split (its own seed); hybrid also on the same
scenes with proposal recall 1.0 / 0.8 / 0.6 / 0.4 (the retrieval ceiling) and on general VQA,
next to the stage-0 base. Writes ``OUT/results.json`` and prints a Markdown report (the one in
``benchmarks/RESULTS.md``). Finished runs are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "vlm_fo1" / "assets" / "demo"
ARMS = ("hybrid", "vit", "aux", "no-neg", "coords")
ARM_ORDER = ("coords", "hybrid", "vit", "aux", "no-neg")
"""The order the benchmark starts the arms of each seed in (every arm of a seed before the next
seed's). With the measured arm times, two workers and 2 seeds it ends about a minute sooner than
the longest arms first (a simulated schedule of the measured times): the short coordinate arm fills
the wait for the DaViT, and the two workers' last jobs are of similar length."""
SUPPRESS_IOU = 0.5
"""The ``suppress_overlap`` of the benchmark's extra decoding (once a box is named, the boxes
overlapping it by IoU > 0.5 are not offered again in that answer group; ``vlm_fo1.decoding``)."""
CLOSE_BIAS = 1.0
"""The ``close_bias`` of the benchmark's extra decodings (``</objects>`` +1 inside ``<objects>``:
another region only while it is e times as likely as closing; ``vlm_fo1.decoding``), with
``unique_labels`` and ``SUPPRESS_IOU``."""
RANKED_METRICS = ("detection/mAP50@ranked", "detection/mAP@ranked", "detection/mAP50@ranked_product")
"""Detection mAP of the model's ranking of every region (``vlm_fo1.ranking``; FO1 arms only)."""
REC_FORM_PREFIX = "referring/acc50_"
"""REC accuracy per expression form (``referring/acc50_relation`` …; ``evaluation.scorers``)."""
KEY_METRICS = (
    "detection/mAP50",
    "detection/mAP",
    "detection/mAP50@proposal",
    "detection/mAP50@model",
    "detection/fp_rate",
    "counting/accuracy",
    "referring/acc50",
    "region_caption/accuracy",
    "region_ocr/accuracy",
    "vqa/accuracy",
)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


@dataclass(frozen=True)
class _Task:
    """A job of the benchmark: ``function(*args(done))`` once every task in ``after`` is done
    (``done``: name -> result of the finished tasks)."""

    function: Callable[..., Any]
    args: Callable[[dict[str, Any]], tuple]
    after: tuple[str, ...] = ()


def _run_tasks(tasks: dict[str, _Task], workers: int, threads: int) -> dict[str, Any]:
    """Run every task on ``workers`` processes of ``threads`` torch threads each; a free worker
    takes the first task (in ``tasks``' order) whose prerequisites are done, so no worker waits
    on another's job. Returns name -> result."""
    done: dict[str, Any] = {}
    running: dict[Any, str] = {}
    waiting = list(tasks)
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        while waiting or running:
            for name in [n for n in waiting if all(d in done for d in tasks[n].after)]:
                if len(running) == workers:
                    break
                waiting.remove(name)
                running[pool.submit(tasks[name].function, *tasks[name].args(done))] = name
            if not running:
                raise ValueError(f"tasks {waiting} wait on tasks that are not there")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                done[name] = future.result()
                logging.info("%s done", name)
    return done


def _pretrain(kind: str, out: str, world_root: str, scale: float) -> str | None:
    """The shared starting points, one per worker: the stage-0 base or the auxiliary encoder."""
    from vlm_fo1.training.miniature import Recipe, WorldSpec, make_world, pretrain_aux, scaled, train_base

    world = make_world(world_root, WorldSpec())
    recipe = scaled(Recipe(), scale)
    if kind == "base":
        return str(train_base(world, Path(out) / "base", recipe))
    aux = pretrain_aux(world.aux_scenes, Path(out) / "aux", recipe)
    return None if aux is None else str(aux)


def _general(base: str, world_root: str) -> dict[str, float]:
    """The stage-0 base's general VQA metrics (the yardstick of the general skill)."""
    from vlm_fo1.training.miniature import WorldSpec, evaluate_checkpoint, make_world

    return evaluate_checkpoint(base, make_world(world_root, WorldSpec()).val_general)


def _run_arm(
    arm: str,
    seed: int,
    out: str,
    base: str,
    aux: str | None,
    world_root: str,
    scale: float,
    limit: int,
    all_decodings: bool,
) -> dict[str, Any]:
    from vlm_fo1.training.miniature import (
        Recipe,
        WorldSpec,
        evaluate_checkpoint,
        make_world,
        scaled,
        train_coords,
        train_fo1,
    )

    start = time.perf_counter()
    world = make_world(world_root, WorldSpec())
    recipe = scaled(Recipe(), scale)
    run = Path(out) / f"{arm}-s{seed}"
    if arm == "coords":
        final = train_coords(world, base, run, recipe, seed=seed)
        val, val_easy = world.coords["val"], world.coords["val_easy"]
    else:
        source = {"vit": "vit", "aux": "aux"}.get(arm, "hybrid")
        stage1 = Path(out) / f"hybrid-s{seed}" / "stage1" if arm == "no-neg" else None
        final = train_fo1(
            world,
            base,
            run,
            recipe,
            seed=seed,
            region_source=source,
            negatives=arm != "no-neg",
            stage1_from=stage1,
            aux_from=aux,
        )
        val, val_easy = world.val, world.val_easy
    result = {
        "arm": arm,
        "seed": seed,
        "checkpoint": str(final),
        "train_seconds": time.perf_counter() - start,
    }
    # The raw model and the decoder's options: the hybrid arm and (raw) the coordinate baseline, or
    # every arm with all_decodings (about 2 min more per arm).
    if all_decodings or arm in ("hybrid", "coords"):
        result["val"] = evaluate_checkpoint(final, val, limit=limit)
    ranked = arm != "coords"  # the coordinate baseline has no regions to rank
    result["val_constrained"] = evaluate_checkpoint(final, val, limit=limit, constrained=True, ranked=ranked)
    result["val_easy"] = evaluate_checkpoint(final, val_easy, limit=limit, constrained=True, ranked=ranked)
    if arm != "coords" and (all_decodings or arm == "hybrid"):
        if all_decodings:  # stop_by_mass: about level with plain greedy decoding in every run so far
            result["val_mass"] = evaluate_checkpoint(
                final, val, limit=limit, constrained=True, stop_by_mass=True
            )
        result["val_per_class"] = evaluate_checkpoint(
            final, val, limit=limit, constrained=True, suppress_overlap=SUPPRESS_IOU, per_class=True
        )
        result["val_suppress"] = evaluate_checkpoint(
            final, val, limit=limit, constrained=True, suppress_overlap=SUPPRESS_IOU
        )
        unique = dict(limit=limit, constrained=True, suppress_overlap=SUPPRESS_IOU, unique_labels=True)
        result["val_unique"] = evaluate_checkpoint(final, val, **unique)
        result["val_unique_count"] = evaluate_checkpoint(final, val, count_from_list=True, **unique)
        result["val_unique_close"] = evaluate_checkpoint(
            final, val, close_bias=CLOSE_BIAS, count_from_list=True, **unique
        )
    if arm == "hybrid":
        result["recall"] = {
            str(r): evaluate_checkpoint(final, path, constrained=True)["detection/mAP50"]
            for r, path in world.val_recall.items()
        }
        result["general"] = evaluate_checkpoint(final, world.val_general)
    result["seconds"] = time.perf_counter() - start
    return result


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _metric(result: dict[str, Any], name: str, split: str = "val") -> float:
    """A validation metric of an arm (the coordinate arm's region tasks are named ``coords/…``)."""
    metrics = result[split]
    return metrics.get(f"coords/{name}", metrics.get(name, math.nan))


def _table(arms: list[dict[str, Any]], present: list[str], metrics: tuple[str, ...], split: str) -> list[str]:
    """Markdown rows: one metric per row, mean ± sd over seeds per arm (columns: the arms of
    ``present`` evaluated on ``split``)."""
    arms = [r for r in arms if split in r]
    present = [a for a in present if any(r["arm"] == a for r in arms)]
    lines = ["| metric | " + " | ".join(present) + " |", "|---|" + "---|" * len(present)]
    for metric in metrics:
        cells = [_mean_sd([_metric(r, metric, split) for r in arms if r["arm"] == a]) for a in present]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict[str, Any]) -> str:
    """The Markdown tables of a results dict (``results.json``)."""
    arms = results["arms"]
    present = [a for a in ARMS if any(r["arm"] == a for r in arms)]
    lines = [
        f"seeds {results['seeds']}, scale {results['scale']}, {results['minutes']:.1f} min on "
        f"{results['cores']} cores, validation records: {results['val_limit'] or 'all'}",
        "",
        *_table(arms, present, KEY_METRICS, "val"),
        "",
        f"random choice among proposals (oracle count), val detection mAP@0.5: {results['random_map50']:.3f}",
        "",
        "the same, decoded as the Predictor decodes (labels from the prompt, existing regions only):",
        "",
    ]
    constrained = (
        "detection/mAP50",
        "detection/mAP",
        "detection/fp_rate",
        "counting/accuracy",
        "counting/accuracy_regions",  # as many regions grounded as objects (not the release's rule)
        "referring/acc50",
    )
    lines += _table(arms, present, (*constrained, *RANKED_METRICS), "val_constrained")
    forms = sorted({k for r in arms for k in r.get("val_constrained", {}) if k.startswith(REC_FORM_PREFIX)})
    if forms:  # results from before the per-form accuracy have none
        lines += ["", "REC accuracy by expression form, the same decoding:", ""]
        lines += _table(arms, present, tuple(forms), "val_constrained")
    fo1 = [a for a in present if a != "coords"]
    lines += [
        "",
        "every proposal ranked by its proposal score alone (class-blind), val detection mAP@0.5: "
        f"{results['proposal_ranking_map50']:.3f}",
        "",
        f"the same decoding with `suppress_overlap={SUPPRESS_IOU}` (a box overlapping one already named "
        "by more IoU is not offered again in that group; duplicates of one object):",
        "",
        *_table(arms, fo1, constrained, "val_suppress"),
        "",
    ]
    optional = {  # splits that only some runs have: stop_by_mass with --all-decodings (and the hybrid
        # arm of earlier runs), per_class and unique_labels since they exist
        "val_mass": "the same decoding with `stop_by_mass` (another region while the regions together "
        "outweigh `</objects>`):",
        "val_per_class": "multi-class detection asked one class at a time (`per_class`), with "
        f"`suppress_overlap={SUPPRESS_IOU}`:",
        "val_unique": "every class in one question, as the release asks, each asked label grounded at most "
        f"once (`unique_labels`), with `suppress_overlap={SUPPRESS_IOU}`:",
        "val_unique_count": "the same with `count_from_list` as well (a count written after `</objects>` is "
        f"the number of regions listed; `unique_labels`, `suppress_overlap={SUPPRESS_IOU}`, "
        "`count_from_list`; the decoding the demo uses):",
        "val_unique_close": f"the same with `close_bias={CLOSE_BIAS:g}` as well (`</objects>` "
        f"+{CLOSE_BIAS:g} inside `<objects>`: another region only while it is e times as likely as "
        f"closing; `unique_labels`, `suppress_overlap={SUPPRESS_IOU}`, `count_from_list`, "
        f"`close_bias={CLOSE_BIAS:g}`):",
    }
    for split, title in optional.items():
        if any(split in r for r in arms):
            lines += [title, "", *_table(arms, fo1, constrained, split), ""]
    lines += [
        "easy scenes (1-2 objects, clean proposals; held-out seed), decoded as the Predictor decodes:",
        "",
    ]
    easy = ("detection/mAP50", "detection/fp_rate", "counting/accuracy", "referring/acc50")
    lines += _table(arms, present, (*easy, *RANKED_METRICS), "val_easy")
    easy_random = results["random_map50_easy"]
    lines += ["", f"random choice (oracle count), easy val detection mAP@0.5: {easy_random:.3f}"]
    lines += [
        f"every proposal ranked by its score alone, easy val: {results['proposal_ranking_map50_easy']:.3f}"
    ]
    hybrid = [r for r in arms if r["arm"] == "hybrid"]
    if hybrid:
        lines += ["", "| proposal recall | hybrid detection mAP@0.5 (constrained) |", "|---|---|"]
        for recall in hybrid[0]["recall"]:
            lines.append(f"| {recall} | {_mean_sd([r['recall'][recall] for r in hybrid])} |")
        base_vqa = results["base_general"].get("vqa/accuracy", math.nan)
        after = _mean_sd([r["general"].get("vqa/accuracy", math.nan) for r in hybrid])
        lines += ["", f"general VQA accuracy: stage-0 base {base_vqa:.3f}, hybrid after stages 1-2 {after}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "miniature"))
    parser.add_argument(
        "--data", default=None, help="world folder (default OUT/data; generated once, reused)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--val-limit", type=int, default=None, help="validation records per evaluation (all)")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once (torch threads split)")
    parser.add_argument(
        "--all-decodings",
        action="store_true",
        help="evaluate every arm raw and with every decoder option too (stop_by_mass, "
        "suppress_overlap, per_class, unique_labels, count_from_list, close_bias; default: the "
        "hybrid arm without stop_by_mass; ~2 min per arm)",
    )
    parser.add_argument(
        "--demo-only", action="store_true", help="train hybrid seed 0 and install it as the demo"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    out = Path(args.out)
    from vlm_fo1.evaluation.runner import proposal_ranking_map, random_choice_map
    from vlm_fo1.training.miniature import Recipe, WorldSpec, first_records, make_world, scaled

    world = make_world(args.data or out / "data", WorldSpec(), workers=args.jobs)
    recipe = scaled(Recipe(), args.scale)
    cores = os.cpu_count() or 1
    if args.demo_only:
        args.arms, args.seeds, args.jobs = ["hybrid"], [0], 1
    uses_aux = {"hybrid", "aux", "no-neg"} & set(args.arms)  # the arms with a DaViT
    shared = (str(out), str(world.root), args.scale)
    tasks = {
        "base": _Task(_pretrain, lambda done: ("base", *shared)),
        "base-general": _Task(_general, lambda done: (done["base"], str(world.root)), ("base",)),
    }
    if uses_aux:
        tasks["aux"] = _Task(_pretrain, lambda done: ("aux", *shared))
    for seed, arm in ((s, a) for s in args.seeds for a in sorted(args.arms, key=ARM_ORDER.index)):
        after = ("base", "aux") if arm in uses_aux else ("base",)
        hybrid = f"hybrid-s{seed}"  # the no-negatives arm starts from hybrid's stage 1
        tasks[f"{arm}-s{seed}"] = _Task(
            _run_arm,
            lambda done, arm=arm, seed=seed: (
                arm, seed, str(out), done["base"], done.get("aux"), str(world.root), args.scale, args.val_limit,
                args.all_decodings,
            ),
            (*after, hybrid) if arm == "no-neg" and hybrid in tasks else after,
        )  # fmt: skip
    done = _run_tasks(tasks, args.jobs, max(1, cores // args.jobs))
    results = [done[name] for name in tasks if name not in ("base", "base-general", "aux")]
    if args.demo_only:
        final = Path(results[0]["checkpoint"])
        shutil.rmtree(DEMO_DIR, ignore_errors=True)
        DEMO_DIR.mkdir(parents=True)
        for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "preprocessor_config.json", "fo1_processor_config.json"):  # fmt: skip
            if (final / name).is_file():
                shutil.copy2(final / name, DEMO_DIR / name)
        size = sum(p.stat().st_size for p in DEMO_DIR.iterdir()) / 2**20
        print(f"demo checkpoint installed in {DEMO_DIR} ({size:.1f} MiB)")
    summary = {
        "seeds": args.seeds,
        "scale": args.scale,
        "cores": cores,
        "val_limit": args.val_limit,
        "all_decodings": args.all_decodings,
        "recipe": recipe.__dict__,
        "random_map50": random_choice_map(first_records(world.val, args.val_limit)),
        "random_map50_easy": random_choice_map(first_records(world.val_easy, args.val_limit)),
        "proposal_ranking_map50": proposal_ranking_map(first_records(world.val, args.val_limit)),
        "proposal_ranking_map50_easy": proposal_ranking_map(first_records(world.val_easy, args.val_limit)),
        "base_general": done["base-general"],
        "arms": sorted(results, key=lambda r: (ARMS.index(r["arm"]), r["seed"])),
        "minutes": (time.perf_counter() - start) / 60,
    }
    name = "demo_results.json" if args.demo_only else "results.json"
    (out / name).write_text(json.dumps(summary, indent=2, default=float))
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
