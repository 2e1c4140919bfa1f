"""The miniature reproduction's recipe: data, the base, FO1 arms and the coordinate baseline.

One place defines how the miniature world is trained end to end, so that
``benchmarks/miniature.py`` (every arm, several seeds), the CI learning test (a reduced recipe)
and the demo checkpoint all run the same steps::

    world = make_world("runs/mini/data", WorldSpec())
    base = train_base(world, "runs/mini/base", Recipe())                   # stage 0
    fo1 = train_fo1(world, base, "runs/mini/hybrid-s0", Recipe(), seed=0)  # aux, perception, 1, 2
    metrics = evaluate_checkpoint(fo1, world.val)

An FO1 arm is: dense pretraining of the auxiliary encoder (``training.aux_pretraining``; shared
between arms when passed as ``aux_from``) and region perception pretraining
(``training.perception``) - together the stand-in for a pretrained DaViT, frozen from then on
(``Recipe.freeze_aux``) -, stage 1 (region side and connector; LLM frozen), an optional stage-2
phase on easy scenes (``Recipe.easy_steps``, off by default), then stage 2 on the medium and full
world with the general data mixed in. The coordinate baseline trains the same base with the same
number of stage-1 + stage-2 steps to write boxes as text (``evaluation.coords``).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from transformers import set_seed

from vlm_fo1.data.records import read_records, write_records
from vlm_fo1.evaluation.coords import COORDINATE_TASKS, to_coordinate_record
from vlm_fo1.synthetic import GENERAL_TASKS, RELEASE_NMS_IOU, TaskMix, difficulty_configs, generate_dataset
from vlm_fo1.training.aux_pretraining import pretrain_aux_encoder
from vlm_fo1.training.config import run_config_from_dict
from vlm_fo1.training.perception import pretrain_region_perception
from vlm_fo1.training.trainer import init_model, train

logger = logging.getLogger(__name__)

DETECTION_TASKS = ("detection", "multi_detection")

# The data of each phase as (split, weight); splits are World attributes (configs/miniature/*.yaml agree).
STAGE1_MIX = (("easy", 1.0), ("medium", 1.0), ("full", 1.0))
EASY_MIX = (("easy", 3.0), ("general", 1.0))
FULL_MIX = (("medium", 1.5), ("full", 1.5), ("easy", 0.5), ("general", 1.0))

FO1_OVERRIDES = {
    "region_layer_norm": True,
    "region_token_norm": "batch",
    "region_name_embedding": True,
    "region_pointer": True,
    "region_pointer_label": True,
    "region_pointer_match": True,
    "region_pointer_label_gate": True,
}
"""Model options of the miniature FO1 arms (see ``FO1Config``; the last six are not in the release)."""


@dataclass(frozen=True)
class WorldSpec:
    """Sizes of the generated splits (scenes); ``val`` uses its own seed (held out);
    ``nms_iou``: the release's NMS on the simulated proposals (None: every box kept)."""

    general: int = 2000
    easy: int = 1500
    medium: int = 1500
    full: int = 2000
    val: int = 150
    val_easy: int = 100
    val_general: int = 150
    recalls: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
    max_proposals: int = 32
    nms_iou: float | None = RELEASE_NMS_IOU
    seed: int = 0
    val_seed: int = 1000


@dataclass(frozen=True)
class World:
    """Paths of a generated world (record JSONL files; images next to them)."""

    root: Path
    general: Path
    easy: Path
    medium: Path
    full: Path
    val: Path
    val_easy: Path
    val_general: Path
    val_recall: dict[float, Path]
    coords: dict[str, Path]  # split -> coordinate-format records (easy, medium, full, val, val_easy)

    def scenes(self, split: Path) -> Path:
        """The scene truth (``{split}_scenes.jsonl``, with object maps) next to a split's records."""
        return split.with_name(f"{split.stem}_scenes.jsonl")

    @property
    def aux_scenes(self) -> list[Path]:
        """Scene truth of the general and full-world training splits, in that order: the data of
        the auxiliary encoder's dense pretraining. Its held-out scenes are the last of the list,
        so they include the training split's last scenes, which region perception holds out to
        score itself: neither pretraining sees them."""
        return [self.scenes(p) for p in (self.general, self.full)]


@dataclass(frozen=True)
class Recipe:
    """Steps and settings of every phase (the same for every arm of a comparison)."""

    base_steps: int = 600
    aux_pretrain_steps: int = 2000
    """Dense pretraining of the shared auxiliary encoder (:func:`pretrain_aux`; 0: none). At 2 000
    steps instead of 1 000 its held-out cell kind accuracy rises from 0.734 to 0.97 and hybrid
    counting with ``suppress_overlap=0.5`` from 0.808 / 0.782 to 0.83-0.86 in three runs (seeds
    0 / 1); the false-positive rate fell to 0.032-0.048 in two of them, not in the third (0.095 /
    0.063; docs/training.md)."""
    perception_steps: int = 900
    """Region perception pretraining (:func:`perceive`; hybrid seeds 0 / 1, full-world constrained
    mAP@0.5 0.553 / 0.583 at 200 steps, 0.612 / 0.591 at 400; on another world and base 0.576 /
    0.606 at 400, 0.635 / 0.625 at 600; at 900 0.602 / 0.628 with the false-positive rate halved
    (0.071 / 0.079 from 0.135 / 0.127) and REC 0.840 / 0.792 from 0.774 / 0.774, docs/training.md)."""
    perception_align_weight: float = 0.0
    perception_match_weight: float = 1.0
    """Weight of the word-match loss in region perception pretraining (needs the model option
    ``region_pointer_match``; ``training.perception``)."""
    perception_match_lr_scale: float = 30.0
    """Learning-rate multiplier of the match's own parameters in region perception pretraining
    (hybrid seed 0, full-world constrained mAP@0.5 0.503 at 1, 0.587 at 10, 0.596 at 30)."""
    perception_position_weight: float = 0.0
    """Weight of region perception's position words: which half of the image each object lies in
    (``position_weight`` of :func:`pretrain_region_perception`; 0: not asked)."""
    perception_aux_frozen: int = 5
    """Child modules of the auxiliary encoder (stem, stages …) that region perception leaves as
    dense pretraining made them, from the first (``aux_frozen`` of
    :func:`pretrain_region_perception`; 0: all of it trains; 5: the miniature DaViT's stem and
    four stages, all of it). Frozen, perception skips the DaViT's backward pass: 250-285 s
    instead of 470-500 s per hybrid arm in the benchmark, and with the label gate hybrid seeds 0 / 1 reached a
    false-positive rate of 0.008 / 0.016 against 0.056 / 0.048 with it trained, REC 0.783 /
    0.858 against 0.849 / 0.821 (unique labels, suppress 0.5, count from list; docs/training.md)."""
    stage1_steps: int = 150
    freeze_aux: bool = True
    """Keep the auxiliary encoder as region perception left it through stages 1 and 2 (the paper
    trains it in stage 2; here its LM-loss updates cost a quarter of an arm's time and did not help,
    docs/training.md). The stage presets (``training.stages``) are the paper's either way."""
    easy_steps: int = 0
    """Steps of the easy-scene phase of stage 2 before the full one (0: none)."""
    full_steps: int = 450
    batch_size: int = 16
    lr: float = 1e-3
    region_loss_weight: float = 5.0
    region_set_loss: bool = True
    """Train each region target on the set of regions still to be named (``training.losses``)."""
    close_loss_weight: float = 1.0
    """Weight of each ``</objects>`` target (the decision to stop naming regions)."""
    shuffle_regions: float = 1.0
    pack_turns: int = 1
    easy_tasks: tuple[str, ...] | None = None
    """With ``easy_steps > 0``. None: the first stage-2 phase trains on ``EASY_MIX`` (every task
    of the easy scenes and the general data); a tuple: on those tasks of the easy scenes alone
    (the general data comes back in the second phase). :data:`DETECTION_TASKS` is the one change
    that moved full-world retrieval in docs/training.md; not the default, because the benchmark
    has not been rerun with it."""
    preset: str = "mini"
    overrides: dict[str, Any] = field(default_factory=lambda: dict(FO1_OVERRIDES))

    def __post_init__(self) -> None:
        required = ("base_steps", "perception_steps", "stage1_steps", "full_steps", "batch_size")
        for name in (*required, "aux_pretrain_steps", "easy_steps", "perception_aux_frozen"):
            value = getattr(self, name)
            least = 1 if name in required else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"Recipe.{name} must be an int >= {least}, got {value!r}")
        for name in ("lr", "perception_match_lr_scale", "close_loss_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Recipe.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def fo1_steps(self) -> int:
        """Stage-1 + stage-2 steps of an FO1 arm (the coordinate baseline gets the same)."""
        return self.stage1_steps + self.easy_steps + self.full_steps


def _coords_file(source: Path, target: Path) -> Path:
    """The coordinate-format version of ``source``: region-free general records kept as they are,
    detection / counting / referring converted, other region tasks dropped."""

    def convert():
        for record in read_records(source):
            task = record.meta.get("task")
            if task in COORDINATE_TASKS:
                yield to_coordinate_record(record)
            elif task in GENERAL_TASKS:
                yield record

    write_records(target, convert())
    return target


def _differences(wanted: dict[str, Any], found: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (wanted, found)}`` for each key a record holds with another value."""
    return {k: (v, found[k]) for k, v in wanted.items() if k in found and found[k] != v}


def _generate_split(
    root: Path,
    name: str,
    scenes: int,
    difficulty: str,
    seed: int,
    spec: WorldSpec,
    recall: float,
    general: bool,
) -> Path:
    """One split of :func:`make_world` (``root/{name}.jsonl``); a recall-sweep split (``name``
    ``recallNNN/detection``) keeps the validation split's detection records only."""
    scene_config, proposal_config = difficulty_configs(
        difficulty, max_proposals=spec.max_proposals, recall=recall, nms_iou=spec.nms_iou
    )
    target = root / f"{name}.jsonl"
    sweep = target.stem == "detection"
    written = generate_dataset(
        target.parent,
        scenes,
        seed,
        scene_config=scene_config,
        proposal_config=proposal_config,
        split_name="val" if sweep else name,
        **({"mix": TaskMix.general()} if general else {}),
    )
    if sweep:  # same scenes and questions as val (same split name and seed); only the recall differs
        write_records(target, (r for r in read_records(written) if r.meta.get("task") in DETECTION_TASKS))
    return target


def make_world(
    root: str | Path, spec: WorldSpec = WorldSpec(), *, overwrite: bool = False, workers: int = 1
) -> World:
    """Generate (or reuse, when present and ``overwrite`` is false) every split the recipe needs,
    with ``workers`` processes (the splits are independent).

    The spec is written to ``root/world.json``; a world is reused only under the same spec.

    Raises:
        ValueError: ``root`` holds a world generated from another spec (and ``overwrite`` is false),
            or ``workers < 1``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    root = Path(root)
    written = root / "world.json"
    wanted = json.loads(json.dumps(asdict(spec)))  # tuples as lists, as the file holds them
    if written.is_file() and not overwrite:
        if differ := _differences(wanted, json.loads(written.read_text())):
            raise ValueError(
                f"{root} holds a world from another spec (wanted, found): {differ}; "
                "pass overwrite=True or another folder"
            )
    elif (root / "general.jsonl").is_file() and not overwrite:
        logger.warning("%s has no world.json (made by an older version): reused without a check", root)
    else:
        root.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps(wanted, indent=2))

    # name -> (scenes, difficulty, seed, recall, general mix); the largest first, for the pool
    splits = {
        "general": (spec.general, "full", spec.seed, 0.95, True),
        "train": (spec.full, "full", spec.seed, 0.95, False),
        "easy": (spec.easy, "easy", spec.seed, 0.95, False),
        "medium": (spec.medium, "medium", spec.seed, 0.95, False),
        "val": (spec.val, "full", spec.val_seed, 0.95, False),
        "val_general": (spec.val_general, "full", spec.val_seed, 0.95, True),
        "val_easy": (spec.val_easy, "easy", spec.val_seed, 0.95, False),
    }
    sweep = {recall: f"recall{round(recall * 100):03d}/detection" for recall in spec.recalls}
    splits |= {name: (spec.val, "full", spec.val_seed, recall, False) for recall, name in sweep.items()}
    todo = [n for n in splits if overwrite or not (root / f"{n}.jsonl").is_file()]
    jobs = [(root, n, *splits[n][:3], spec, *splits[n][3:]) for n in todo]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_generate_split, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _generate_split(*job)
    path = {n: root / f"{n}.jsonl" for n in splits}
    coords = {}
    for name, source in (
        ("easy", path["easy"]),
        ("medium", path["medium"]),
        ("full", path["train"]),
        ("val", path["val"]),
        ("val_easy", path["val_easy"]),
    ):
        target = root / f"{source.stem}_coords.jsonl"
        coords[name] = target if target.is_file() and not overwrite else _coords_file(source, target)
    return World(
        root,
        path["general"],
        path["easy"],
        path["medium"],
        path["train"],
        path["val"],
        path["val_easy"],
        path["val_general"],
        {recall: path[name] for recall, name in sweep.items()},
        coords,
    )


Source = tuple[Path, float, tuple[str, ...] | None]
"""A phase's data source: records file, weight, the tasks kept (None: all)."""


def _mix(world: World, mix: tuple[tuple[str, float], ...], *, coords: bool = False) -> list[Source]:
    """Sources of a phase (every task); ``coords``: the coordinate-format region splits."""
    return [(world.coords[s] if coords and s in world.coords else getattr(world, s), w, None) for s, w in mix]


def _stage(
    stage: int,
    out: Path,
    init: Path | None,
    sources: list[Source],
    steps: int,
    recipe: Recipe,
    seed: int,
    *,
    keep: str = "all",
    overrides: dict[str, Any] | None = None,
    freeze: Sequence[str] = (),
    exclude_negatives: bool = False,
    progress: bool = False,
) -> Path:
    config: dict[str, Any] = {
        "stage": stage,
        "seed": seed,
        "model": {"preset": recipe.preset, "overrides": overrides or {}, "freeze": list(freeze)},
        "data": {
            "train": [
                {"path": str(p), "weight": w} | ({"tasks": list(t)} if t else {}) for p, w, t in sources
            ],
            "exclude_negatives": exclude_negatives,
            "shuffle_regions": recipe.shuffle_regions,  # no-op (no random draw) on records without regions
            "pack_turns": recipe.pack_turns if stage > 0 else 1,
        },
        "optim": {
            "steps": steps,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "region_loss_weight": recipe.region_loss_weight,
            "region_set_loss": recipe.region_set_loss,
            "close_loss_weight": recipe.close_loss_weight,
        },
        "output": {"dir": str(out), "save_steps": steps, "logging_steps": 25, "keep": 1},
    }
    if init is not None:
        config["model"] |= {"init": str(init), "keep": keep}
    if (out / "train_summary.json").is_file():
        logger.info("reusing finished run %s", out)
        return out
    train(run_config_from_dict(config), progress=progress)
    return out


def train_base(
    world: World, out: str | Path, recipe: Recipe = Recipe(), *, seed: int = 0, progress: bool = False
) -> Path:
    """Stage 0: the tiny base VLM on captions and VQA (the stand-in for a pretrained Qwen2.5-VL)."""
    return _stage(
        0, Path(out), None, [(world.general, 1.0, None)], recipe.base_steps, recipe, seed, progress=progress
    )


AUX_WEIGHTS = "aux_encoder.safetensors"


def pretrain_aux(
    scenes: Sequence[str | Path],
    out: str | Path,
    recipe: Recipe = Recipe(),
    *,
    seed: int = 0,
    progress: bool = False,
) -> Path | None:
    """The shared auxiliary encoder (``training.aux_pretraining``, the stand-in for a pretrained
    DaViT) on ``scenes`` (``*_scenes.jsonl`` with object maps; the recipe's are
    ``World.aux_scenes``): ``out/aux_encoder.safetensors`` (reused when present and made with the
    same preset, steps and scene files), or None with ``recipe.aux_pretrain_steps == 0``. Needs no
    base: the encoder is independent of the VLM.

    Raises:
        ValueError: ``out`` holds an encoder pretrained with other settings.
    """
    if not recipe.aux_pretrain_steps:
        return None
    out = Path(out)
    weights = out / AUX_WEIGHTS
    run = {
        "preset": recipe.preset,
        "steps": recipe.aux_pretrain_steps,
        "scenes": [Path(p).name for p in scenes],
    }
    if weights.is_file():
        record = out / "aux_pretraining.json"
        if differ := _differences(run, json.loads(record.read_text()) if record.is_file() else {}):
            raise ValueError(
                f"{weights} was pretrained with other settings (wanted, found): {differ}; "
                "remove it or choose another directory"
            )
        logger.info("reusing the pretrained auxiliary encoder %s", weights)
        return weights
    set_seed(seed)
    config = run_config_from_dict(
        {"stage": 0, "seed": seed, "model": {"preset": recipe.preset, "overrides": recipe.overrides},
         "data": {"train": [{"path": str(scenes[0])}]}}
    )  # fmt: skip
    model, processor = init_model(config)
    result = pretrain_aux_encoder(
        model, processor, scenes, steps=recipe.aux_pretrain_steps, batch_size=recipe.batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.aux_encoder.state_dict().items()}, out / f".{AUX_WEIGHTS}")
    (out / f".{AUX_WEIGHTS}").replace(weights)
    (out / "aux_pretraining.json").write_text(json.dumps(run | result.to_json(), indent=2))
    return weights


def perceive(
    base: str | Path,
    scenes: str | Path,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    recipe: Recipe = Recipe(),
    *,
    seed: int = 0,
    aux_from: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """A fresh FO1 region side on ``base``'s VLM, pretrained on ``scenes`` (``*_scenes.jsonl``)
    by :func:`pretrain_region_perception`; saved with its processor to ``out``. ``aux_from``: the
    auxiliary encoder's starting weights (:func:`pretrain_aux`; a ViT-only model has none)."""
    set_seed(seed)
    overrides = dict(recipe.overrides if overrides is None else overrides)
    config = run_config_from_dict(
        {"stage": 1, "seed": seed, "model": {"init": str(base), "keep": "vlm", "overrides": overrides},
         "data": {"train": [{"path": str(scenes)}]}}
    )  # fmt: skip
    model, processor = init_model(config)
    if aux_from is not None:
        if model.aux_encoder is None:
            logger.warning("%s not loaded: a ViT-only region side has no auxiliary encoder", aux_from)
        else:
            model.aux_encoder.load_state_dict(load_file(str(aux_from)))
    result = pretrain_region_perception(
        model, processor, scenes, steps=recipe.perception_steps, batch_size=recipe.batch_size, seed=seed,
        align_weight=recipe.perception_align_weight, match_weight=recipe.perception_match_weight,
        match_lr_scale=recipe.perception_match_lr_scale,
        position_weight=recipe.perception_position_weight, aux_frozen=recipe.perception_aux_frozen,
        progress=progress,
    )  # fmt: skip
    logger.info("region perception pretraining: %s", result.to_json())
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "perception.json").write_text(json.dumps(result.to_json(), indent=2))
    return out


def train_fo1(
    world: World,
    base: str | Path,
    out: str | Path,
    recipe: Recipe = Recipe(),
    *,
    seed: int = 0,
    region_source: str = "hybrid",
    negatives: bool = True,
    perception_from: str | Path | None = None,
    stage1_from: str | Path | None = None,
    aux_from: str | Path | None = None,
    progress: bool = False,
) -> Path:
    """An FO1 arm: auxiliary-encoder pretraining → perception → stage 1 → stage 2 (easy, with
    ``recipe.easy_steps``) → stage 2 (medium + full); returns the final checkpoint
    (``out/stage2``). ``aux_from`` shares one pretrained auxiliary encoder between arms (without
    it, an arm that has one pretrains its own in ``out/aux``); ``stage1_from`` reuses another
    arm's stage-1 checkpoint (arms that differ only in stage 2, such as the no-negatives arm)."""
    out = Path(out)
    overrides = {**recipe.overrides, "region_source": region_source}
    freeze = ("aux_encoder",) if recipe.freeze_aux else ()
    if stage1_from is None:
        perceived = Path(perception_from) if perception_from is not None else out / "perception"
        if not (perceived / "config.json").is_file():
            scenes = world.scenes(world.full)
            if aux_from is None and region_source != "vit":
                aux_from = pretrain_aux(world.aux_scenes, out / "aux", recipe, seed=seed, progress=progress)
            perceive(
                base, scenes, perceived, overrides, recipe, seed=seed, aux_from=aux_from, progress=progress
            )
        stage1 = _stage(
            1,
            out / "stage1",
            perceived,
            _mix(world, STAGE1_MIX),
            recipe.stage1_steps,
            recipe,
            seed,
            freeze=freeze,
            progress=progress,
        )
    else:
        stage1 = Path(stage1_from)
    easy = stage1  # easy_steps=0: no easy phase
    if recipe.easy_steps:
        easy = _stage(
            2,
            out / "stage2_easy",
            stage1,
            _mix(world, EASY_MIX) if recipe.easy_tasks is None else [(world.easy, 1.0, recipe.easy_tasks)],
            recipe.easy_steps,
            recipe,
            seed,
            freeze=freeze,
            exclude_negatives=not negatives,
            progress=progress,
        )
    return _stage(
        2,
        out / "stage2",
        easy,
        _mix(world, FULL_MIX),
        recipe.full_steps,
        recipe,
        seed,
        freeze=freeze,
        exclude_negatives=not negatives,
        progress=progress,
    )


def train_coords(
    world: World,
    base: str | Path,
    out: str | Path,
    recipe: Recipe = Recipe(),
    *,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """The coordinate baseline: the base trained (stage 2 settings, no proposals) to write boxes
    as text, with as many steps as an FO1 arm's stages 1 and 2: a first phase on the easy mix for
    the steps of stage 1 and the easy phase, then the full-world mix for ``full_steps``."""
    out = Path(out)
    easy_steps = recipe.stage1_steps + recipe.easy_steps
    easy = _stage(
        2,
        out / "stage2_easy",
        Path(base),
        _mix(world, EASY_MIX, coords=True),
        easy_steps,
        recipe,
        seed,
        progress=progress,
    )
    return _stage(
        2,
        out / "stage2",
        easy,
        _mix(world, FULL_MIX, coords=True),
        recipe.full_steps,
        recipe,
        seed,
        progress=progress,
    )


def evaluate_checkpoint(
    model_dir: str | Path,
    records: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    constrained: bool = False,
    stop_by_mass: bool = False,
    suppress_overlap: float | None = None,
    close_bias: float = 0.0,
    unique_labels: bool = False,
    count_from_list: bool = False,
    ranked: bool = False,
    per_class: bool = False,
    out: str | Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of a checkpoint on a record file (first ``limit`` records; ``constrained``: decode
    as the Predictor does; ``stop_by_mass`` / ``suppress_overlap`` / ``close_bias`` /
    ``unique_labels`` / ``count_from_list``: the decoder's options, not in the release;
    ``per_class``: multi-class detection asked one class at a time, not in the release); the
    report is written to ``out`` (default: next to the checkpoint)."""
    from vlm_fo1.evaluation.cli import run_eval

    name = (
        f"eval_{Path(records).parent.name}_{Path(records).stem}"
        f"{'_constrained' if constrained else ''}{'_mass' if stop_by_mass else ''}"
        f"{'' if suppress_overlap is None else f'_suppress{suppress_overlap:g}'}"
        f"{f'_close{close_bias:g}' if close_bias else ''}{'_unique' if unique_labels else ''}"
        f"{'_count' if count_from_list else ''}"
        f"{'_ranked' if ranked else ''}{'_per_class' if per_class else ''}.json"
    )
    target = Path(out) if out is not None else Path(model_dir) / name
    report = run_eval(
        model_dir,
        records,
        target,
        batch_size=batch_size,
        limit=limit,
        device="cpu",
        constrained=constrained,
        stop_by_mass=stop_by_mass,
        suppress_overlap=suppress_overlap,
        close_bias=close_bias,
        unique_labels=unique_labels,
        count_from_list=count_from_list,
        ranked=ranked,
        per_class=per_class,
        progress=progress,
    )
    return dict(report.metrics)


def first_records(path: str | Path, limit: int | None) -> list:
    """The first ``limit`` records of a file (all with None)."""
    return list(itertools.islice(read_records(path), limit))


def scaled(recipe: Recipe, factor: float) -> Recipe:
    """``recipe`` with every step count multiplied by ``factor`` (at least 1 step each; a phase
    with 0 steps stays off)."""
    names = (
        "base_steps",
        "aux_pretrain_steps",
        "perception_steps",
        "stage1_steps",
        "easy_steps",
        "full_steps",
    )
    steps = {n: getattr(recipe, n) for n in names}
    return replace(recipe, **{n: max(1, round(v * factor)) if v else 0 for n, v in steps.items()})
