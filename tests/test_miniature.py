"""The miniature recipe end to end on a tiny scale: world, base, FO1 arm, coordinate arm, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlm_fo1.data.records import read_records
from vlm_fo1.evaluation.coords import COORDS_FORMAT
from vlm_fo1.training.miniature import (
    FO1_OVERRIDES,
    Recipe,
    WorldSpec,
    make_world,
    scaled,
    train_base,
    train_coords,
    train_fo1,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_WORLD = WorldSpec(
    val_easy=4,
    general=12,
    easy=8,
    medium=8,
    full=8,
    val=6,
    val_general=4,
    recalls=(1.0, 0.5),
    max_proposals=8,
)
TINY_RECIPE = replace(scaled(Recipe(), 0.01), preset="tiny", batch_size=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"), TINY_WORLD)


def test_world_has_every_split_and_reuses_files(world):
    for path in (
        world.general,
        world.easy,
        world.medium,
        world.full,
        world.val,
        world.val_easy,
        world.val_general,
    ):
        assert path.is_file() and list(read_records(path))
    coords = list(read_records(world.coords["val"]))
    assert coords and all(r.boxes == [] for r in coords)
    assert any(r.meta.get("format") == COORDS_FORMAT for r in coords)
    assert set(world.val_recall) == {1.0, 0.5}
    assert all(
        r.meta["task"] in ("detection", "multi_detection") for r in read_records(world.val_recall[0.5])
    )
    before = world.val.stat().st_mtime_ns
    again = make_world(world.root, TINY_WORLD)
    assert again.val == world.val and world.val.stat().st_mtime_ns == before  # reused, not regenerated
    with pytest.raises(ValueError, match=r"another spec \(wanted, found\): \{'val': \(7, 6\)\}"):
        make_world(world.root, replace(TINY_WORLD, val=7))


def test_world_made_by_two_processes_is_the_same_world(world, tmp_path):
    parallel = make_world(tmp_path / "world", TINY_WORLD, workers=2)
    files = sorted(p.relative_to(world.root) for p in world.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(parallel.root) for p in parallel.root.rglob("*") if p.is_file())
    for name in files:
        assert (world.root / name).read_bytes() == (parallel.root / name).read_bytes(), name
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        make_world(tmp_path / "other", TINY_WORLD, workers=0)


def test_recipe_arms_run_and_share_stage1(world, tmp_path):
    base = train_base(world, tmp_path / "base", TINY_RECIPE)
    hybrid = train_fo1(world, base, tmp_path / "hybrid", TINY_RECIPE)
    assert hybrid == tmp_path / "hybrid" / "stage2"
    for phase in ("perception", "stage1", "stage2"):
        assert (tmp_path / "hybrid" / phase / "config.json").is_file()
    assert TINY_RECIPE.easy_steps == 0 and not (tmp_path / "hybrid" / "stage2_easy").exists()
    # Without a shared aux_from, an arm with a DaViT pretrains its own, as the recipe says.
    aux_run = json.loads((tmp_path / "hybrid" / "aux" / "aux_pretraining.json").read_text())
    assert aux_run["steps"] == TINY_RECIPE.aux_pretrain_steps > 0
    assert aux_run["scenes"] == ["general_scenes.jsonl", "train_scenes.jsonl"]
    config = json.loads((hybrid / "config.json").read_text())
    assert config["region_token_norm"] == "batch" and config["region_name_embedding"] is True
    assert config["region_pointer"] is True and config["region_pointer_label"] is True
    assert config["region_pointer_match"] is True
    assert "region_set_loss: true" in (hybrid / "run_config.yaml").read_text()
    # Recipe.freeze_aux: the DaViT leaves perception pretraining as it stays through stages 1 and 2.
    for phase in ("stage1", "stage2"):
        trainable = json.loads((tmp_path / "hybrid" / phase / "train_summary.json").read_text())["trainable"]
        assert "aux_encoder" not in trainable and "region_encoder" in trainable, phase
    perceived = load_file(str(tmp_path / "hybrid" / "perception" / "model.safetensors"))
    final = load_file(str(hybrid / "model.safetensors"))
    aux_keys = [k for k in final if k.startswith("aux_encoder.")]
    assert aux_keys and all(torch.equal(final[k], perceived[k]) for k in aux_keys)
    assert any(not torch.equal(final[k], perceived[k]) for k in final if k.startswith("region_encoder."))
    no_neg = train_fo1(
        world,
        base,
        tmp_path / "no-neg",
        TINY_RECIPE,
        negatives=False,
        stage1_from=tmp_path / "hybrid" / "stage1",
    )
    assert not (tmp_path / "no-neg" / "stage1").exists() and (no_neg / "config.json").is_file()
    run_config = (no_neg / "run_config.yaml").read_text()
    assert "exclude_negatives: true" in run_config
    focused = train_fo1(
        world,
        base,
        tmp_path / "focused",
        replace(TINY_RECIPE, easy_tasks=("detection", "multi_detection"), easy_steps=2),
        stage1_from=tmp_path / "hybrid" / "stage1",
    )
    easy_config = yaml.safe_load((focused.parent / "stage2_easy" / "run_config.yaml").read_text())
    assert [(Path(s["path"]).stem, s["tasks"]) for s in easy_config["data"]["train"]] == [
        ("easy", ["detection", "multi_detection"]),
    ]
    coords = train_coords(world, base, tmp_path / "coords", TINY_RECIPE)
    summary = json.loads((coords.parent / "stage2_easy" / "train_summary.json").read_text())
    assert summary["steps"] == TINY_RECIPE.stage1_steps + TINY_RECIPE.easy_steps  # same budget as FO1


def test_scaled_recipe_keeps_at_least_one_step():
    recipe = scaled(Recipe(), 0.0001)
    assert recipe.base_steps == recipe.full_steps == 1
    assert recipe.easy_steps == 0  # a phase that is off stays off
    assert scaled(Recipe(), 2).fo1_steps == 2 * Recipe().fo1_steps


def test_recipe_rejects_missing_phases():
    with pytest.raises(ValueError, match=r"Recipe.stage1_steps must be an int >= 1, got 0"):
        Recipe(stage1_steps=0)
    with pytest.raises(ValueError, match=r"Recipe.easy_steps must be an int >= 0, got -1"):
        Recipe(easy_steps=-1)
    with pytest.raises(ValueError, match=r"Recipe.full_steps must be an int >= 1, got 2.5"):
        Recipe(full_steps=2.5)
    with pytest.raises(ValueError, match=r"Recipe.perception_match_lr_scale must be > 0, got 0"):
        Recipe(perception_match_lr_scale=0)
    with pytest.raises(ValueError, match=r"Recipe.close_loss_weight must be > 0, got -1"):
        Recipe(close_loss_weight=-1)
    assert Recipe(easy_steps=0, aux_pretrain_steps=0).fo1_steps == Recipe().stage1_steps + Recipe().full_steps


def test_shipped_demo_runs_offline(tmp_path):
    from vlm_fo1.demo import DEMO_CHECKPOINT

    if not (DEMO_CHECKPOINT / "config.json").is_file():
        pytest.fail(f"the demo checkpoint is missing from {DEMO_CHECKPOINT}; see configs/miniature/README.md")
    size = sum(p.stat().st_size for p in DEMO_CHECKPOINT.iterdir())
    assert size < 20 * 2**20
    out = tmp_path / "demo.png"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "vlm_fo1.cli", "demo", "--save", str(out), "--json"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["truth"] and result["detect"]["task"] == "detection"
    assert out.is_file() and out.stat().st_size > 0


def test_shipped_yaml_configs_follow_the_recipe():
    from vlm_fo1.training import load_run_config

    recipe = Recipe()
    folder = ROOT / "configs" / "miniature"
    steps = {
        "stage0": recipe.base_steps,
        "stage1": recipe.stage1_steps,
        "stage2": recipe.full_steps,
    }
    assert recipe.easy_steps == 0 and not (folder / "stage2_easy.yaml").exists()
    for name, expected in steps.items():
        config = load_run_config(folder / f"{name}.yaml")
        assert config.optim.steps == expected, name
        assert config.optim.batch_size == recipe.batch_size and config.optim.lr == recipe.lr
        if config.stage > 0:
            assert config.optim.region_loss_weight == recipe.region_loss_weight
            assert config.optim.region_set_loss == recipe.region_set_loss
            assert config.optim.close_loss_weight == recipe.close_loss_weight
    stage2 = load_run_config(folder / "stage2.yaml")
    assert Path(stage2.model.init).name == "stage1"
    weights = {Path(s.path).stem: s.weight for s in stage2.data.train}
    assert weights == {"medium": 1.5, "train": 1.5, "easy": 0.5, "general": 1.0}


def test_run_demo_on_a_tiny_checkpoint(tmp_path):
    from vlm_fo1.demo import run_demo
    from vlm_fo1.testing import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    result = run_demo(tmp_path / "ckpt", seed=1, difficulty="medium", save=tmp_path / "out" / "demo.png")
    assert len(result.truth) == 4 and result.true_count >= 1
    assert result.detection.num_proposals >= len(result.truth) - 1
    assert (tmp_path / "out" / "demo.png").is_file()
    text = result.summary()
    assert "scene: seed 1, medium difficulty, 4 objects" in text and "count " in text
    assert json.loads(json.dumps(result.to_dict()))["truth"][0]["box"]
    with pytest.raises(ValueError, match="difficulty"):
        run_demo(tmp_path / "ckpt", difficulty="hard")
    with pytest.raises(FileNotFoundError, match="--demo-only"):
        run_demo(tmp_path / "missing")


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("miniature_benchmark", ROOT / "benchmarks" / "miniature.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_runs_each_task_after_its_prerequisites():
    bench = _benchmark_module()
    tasks = {
        "late": bench._Task(pow, lambda done: (done["early"], 2), ("early",)),  # listed first, runs second
        "early": bench._Task(pow, lambda done: (2, 3)),
        "free": bench._Task(max, lambda done: (1, 5)),
    }
    assert bench._run_tasks(tasks, workers=2, threads=1) == {"early": 8, "free": 5, "late": 64}
    with pytest.raises(ValueError, match="wait on tasks that are not there"):
        bench._run_tasks({"x": bench._Task(max, lambda done: (1, 2), ("missing",))}, workers=1, threads=1)


def test_benchmark_report_formats_every_arm():
    bench = _benchmark_module()
    val = {
        "detection/mAP50": 0.5,
        "referring/acc50": 0.25,
        "vqa/accuracy": 0.4,
        "detection/mAP50@ranked": 0.7,
    }
    arms = [
        {"arm": arm, "seed": seed, "val": val, "val_constrained": val, "val_easy": val, "recall": {"1.0": 0.5},
         "general": val, "val_mass": {"detection/mAP50": 0.6 + seed / 10}}
        for arm in ("hybrid", "vit") for seed in (0, 1)
    ] + [{"arm": "coords", "seed": 0, "val": {"coords/detection/mAP50": 0.1}, "val_constrained": {}, "val_easy": {}}]  # fmt: skip
    results = {
        "seeds": [0, 1], "scale": 1.0, "minutes": 3.0, "cores": 2, "val_limit": None, "arms": arms,
        "random_map50": 0.2, "random_map50_easy": 0.6, "base_general": {"vqa/accuracy": 0.41},
        "proposal_ranking_map50": 0.3, "proposal_ranking_map50_easy": 0.65,
    }  # fmt: skip
    text = bench.report(results)
    assert "| detection/mAP50 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.100 |" in text
    assert "stage-0 base 0.410, hybrid after stages 1-2 0.400 ± 0.000" in text
    assert "| 1.0 | 0.500 ± 0.000 |" in text
    assert "| detection/mAP50@ranked | 0.700 ± 0.000 | 0.700 ± 0.000 | n/a |" in text
    assert "(class-blind), val detection mAP@0.5: 0.300" in text
    assert "by expression form" not in text  # results from before the per-form accuracy
    arms[0]["val_constrained"] = val | {"referring/acc50_relation": 0.5}  # hybrid seed 0 only
    forms = bench.report(results).split("by expression form")[1]
    assert "| referring/acc50_relation | 0.500 | n/a | n/a |" in forms.split("\n\n")[1]
    arms[0]["val_constrained"] = val
    mass = text.split("`stop_by_mass`")[1]
    assert (
        "| metric | hybrid | vit |" in mass and "| detection/mAP50 | 0.650 ± 0.071 | 0.650 ± 0.071 |" in mass
    )
    assert "`close_bias=" not in bench.report(results)  # results from before the option
    arms[0]["val_suppress"] = {"detection/mAP50": 0.9}  # hybrid seed 0 only
    suppressed = bench.report(results).split("`suppress_overlap=0.5`")[1]
    assert "| metric | hybrid |\n" in suppressed and "| detection/mAP50 | 0.900 |" in suppressed
    arms[0]["val_unique_count"] = {"counting/accuracy": 0.8}
    arms[1]["val_unique_close"] = {"detection/fp_rate": 0.1}
    counted, closed = (
        bench.report(results).split("`count_from_list` as well")[1].split("`close_bias=1` as well")
    )
    assert "| counting/accuracy | 0.800 |" in counted and "| detection/fp_rate | 0.100 |" in closed
    assert "(`per_class`)" not in text
    arms[2]["val_per_class"] = {"detection/mAP50": 0.75}  # vit seed 0 only
    per_class = bench.report(results).split("(`per_class`)")[1].split("`count_from_list` as well")[0]
    assert "| metric | vit |\n" in per_class and "| detection/mAP50 | 0.750 |" in per_class
    for arm in arms:  # the default run evaluates the ablation arms under constrained decoding only
        if arm["arm"] == "vit":
            del arm["val"], arm["val_mass"]
    raw, rest = bench.report(results).split("decoded as the Predictor decodes", 1)
    assert "| metric | hybrid | coords |" in raw
    assert "| metric | hybrid | vit | coords |" in rest
    assert "| metric | hybrid |\n" in rest.split("`stop_by_mass`")[1]
    for arm in arms:  # the default run has no stop_by_mass decoding (only with --all-decodings)
        arm.pop("val_mass", None)
    assert "`stop_by_mass`" not in bench.report(results)


def test_shipped_yaml_configs_shuffle_regions_and_freeze_like_the_recipe():
    from vlm_fo1.training import load_run_config

    for name in ("stage1", "stage2"):
        config = load_run_config(ROOT / "configs" / "miniature" / f"{name}.yaml")
        assert config.data.shuffle_regions == Recipe().shuffle_regions, name
        assert config.model.freeze == (["aux_encoder"] if Recipe().freeze_aux else []), name


# -- the CI learning test -----------------------------------------------------------------------------------
CI_WORLD = WorldSpec(
    general=600,
    easy=800,
    medium=60,
    full=60,
    val=10,
    val_easy=60,
    val_general=10,
    recalls=(1.0,),
    max_proposals=32,
)
CI_RECIPE = Recipe(
    base_steps=400,
    perception_steps=100,
    stage1_steps=50,
    easy_steps=600,
    full_steps=20,
    batch_size=16,
    overrides={**FO1_OVERRIDES, "region_pointer_label_gate": False},
)
"""The learning test's recipe, without the label gate: in this test's 670 steps of stages 1-2
(600 of them on easy scenes) the gate costs REC 0.698 against 0.837 and mAP@0.5 0.514 against
0.601 (measured, seeded), where the full recipe's 600 steps gain from it (relations 0.36 ->
0.72, benchmarks/RESULTS.md)."""


@pytest.mark.slow
def test_reduced_recipe_learns_to_retrieve_regions(tmp_path):
    """A reduced recipe (ViT-only region side, for speed; a few minutes on 2 cores) must pick the
    right proposals more often than random choice among them with the same number of picks, and
    find the referent of an expression more often than a random box (about 3 minutes)."""
    from vlm_fo1.evaluation.cli import run_eval
    from vlm_fo1.evaluation.runner import picked_counts, random_choice_map

    world = make_world(tmp_path / "world", CI_WORLD)
    base = train_base(world, tmp_path / "base", CI_RECIPE)
    final = train_fo1(world, base, tmp_path / "vit", CI_RECIPE, region_source="vit")
    report = run_eval(
        final, world.val_easy, tmp_path / "eval.json", batch_size=32, constrained=True, progress=False
    )
    records = list(read_records(world.val_easy))
    detection = [r for r in records if r.meta["task"] in ("detection", "multi_detection")]
    chance = random_choice_map(detection, counts=picked_counts(report), draws=20)
    referring = [r for r in records if r.meta["task"] == "referring"]
    rec_chance = sum(1 / len(r.boxes) for r in referring) / len(
        referring
    )  # one box at random (easy: no duplicates)
    metrics = report.metrics
    print(
        f"mAP50 {metrics['detection/mAP50']:.3f} vs chance {chance:.3f}; REC {metrics['referring/acc50']:.3f} vs {rec_chance:.3f}"
    )
    # Measured (seeded, CPU, 2 torch threads; the recipe's options - label-region match, set loss,
    # proposals through the release's NMS - with this test's own step counts, an easy phase and
    # the ViT-only region side, so no DaViT pretraining; no label gate): mAP50 0.601 against 0.373 by
    # chance, REC 0.837 against 0.628. The same test before the match and the set loss: REC 0.605 with NMS, 0.860 without it
    # - a single seed's spread is wide, hence the margins rather than the means in the asserts.
    assert metrics["detection/mAP50"] > chance + 0.1
    assert metrics["referring/acc50"] > rec_chance + 0.1


def test_perceive_command_writes_a_checkpoint_with_its_accuracy(world, tmp_path, capsys):
    from vlm_fo1.cli import main

    base = train_base(world, tmp_path / "base", TINY_RECIPE)
    scenes = world.full.with_name("train_scenes.jsonl")
    out = tmp_path / "perceived"
    assert (
        main(
            [
                "perceive",
                str(base),
                str(scenes),
                str(out),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "config.json").is_file() and "region side pretrained" in capsys.readouterr().out
    accuracy = json.loads((out / "perception.json").read_text())["accuracy"]
    assert set(accuracy) == {"kind", "colour", "size", "match"}  # the recipe trains the word match
    assert all(0 <= v <= 1 for v in accuracy.values())


def test_pretrain_aux_command_and_perceive_from_its_weights(world, tmp_path, capsys):
    from vlm_fo1.cli import main
    from vlm_fo1.model import FO1ForConditionalGeneration

    aux = tmp_path / "aux"
    args = ["pretrain-aux", str(aux), *map(str, world.aux_scenes), "--steps", "2", "--batch-size", "2"]
    assert main([*args, "--preset", "tiny", "--no-progress"]) == 0
    weights = aux / "aux_encoder.safetensors"
    assert weights.is_file() and "auxiliary encoder pretrained" in capsys.readouterr().out
    assert main([*args, "--preset", "tiny", "--no-progress"]) == 0  # the same run again: reused
    assert main([*args[:-3], "3", "--preset", "tiny", "--no-progress"]) == 2  # other steps: refused
    assert "pretrained with other settings" in capsys.readouterr().err
    assert main([*args[:-3], "0", "--no-progress"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert set(json.loads((aux / "aux_pretraining.json").read_text())["accuracy"]) == {
        "kind",
        "colour",
        "background",
    }
    base = train_base(world, tmp_path / "base", TINY_RECIPE)
    out = tmp_path / "perceived"
    perceive = [
        "perceive",
        str(base),
        str(world.aux_scenes[0]),
        str(out),
        "--steps",
        "1",
        "--batch-size",
        "2",
    ]
    assert main([*perceive, "--aux-from", str(weights), "--aux-frozen", "0", "--no-progress"]) == 0
    model = FO1ForConditionalGeneration.from_pretrained(out)
    pretrained = load_file(str(weights))
    # One AdamW step at lr 1e-3 moves each weight by about 1e-3: it started from the given weights.
    gap = max(
        (v.float() - pretrained[k].float()).abs().max().item()
        for k, v in model.aux_encoder.state_dict().items()
    )
    assert 0 < gap < 0.01
    # Seeded: the same command in the same process gives the same region side, bit for bit.
    again = tmp_path / "again"
    assert (
        main(
            [
                *perceive[:3],
                str(again),
                *perceive[4:],
                "--aux-from",
                str(weights),
                "--aux-frozen",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    # The recipe's --aux-frozen (every child of the encoder) keeps the given weights.
    kept = tmp_path / "kept"
    assert main([*perceive[:3], str(kept), *perceive[4:], "--aux-from", str(weights), "--no-progress"]) == 0
    frozen = FO1ForConditionalGeneration.from_pretrained(kept).aux_encoder.state_dict()
    assert all(torch.equal(v, pretrained[k].to(v.dtype)) for k, v in frozen.items())
