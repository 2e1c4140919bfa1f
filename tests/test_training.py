"""Training: run configs, stage presets, row-masked embeddings, LoRA, atomic checkpoints, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainingArguments

from vlm_fo1.data.collate import FO1Collator
from vlm_fo1.data.records import read_records
from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.synthetic import ProposalConfig, TaskMix, generate_dataset
from vlm_fo1.tokenization import objects_close_id
from vlm_fo1.training import configure_trainable, load_run_config, merge_lora, run_config_from_dict, train
from vlm_fo1.training.losses import region_token_loss
from vlm_fo1.training.perception import pretrain_region_perception, read_scene_regions
from vlm_fo1.training.stages import fo1_token_ids
from vlm_fo1.training.trainer import FO1Trainer, init_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini")
    proposals = ProposalConfig(max_proposals=32)
    generate_dataset(out, 12, seed=0, split_name="train", proposal_config=proposals)
    generate_dataset(out, 12, seed=0, split_name="general", proposal_config=proposals, mix=TaskMix.general())
    return out


def _config(data_dir: Path, out: Path, stage: int, init: Path | None = None, **extra) -> dict:
    data = "general.jsonl" if stage == 0 else "train.jsonl"
    config = {
        "stage": stage,
        "seed": 0,
        "model": {"preset": "tiny", "init": str(init) if init else None, **extra.pop("model", {})},
        "data": {"train": [{"path": str(data_dir / data)}]},
        "optim": {"steps": 4, "batch_size": 4, "lr": 1e-3},
        "output": {"dir": str(out), "save_steps": 2, "logging_steps": 1},
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def stage0(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage0")
    train(run_config_from_dict(_config(data_dir, out, 0)), progress=False)
    return out


# -- config ------------------------------------------------------------------------------------------------
def test_run_config_validation(tmp_path):
    good = {"stage": 1, "model": {"init": "ckpt"}, "data": {"train": [{"path": "d.jsonl"}]}}
    with pytest.raises(ValueError, match="stage must be one of"):
        run_config_from_dict({**good, "stage": 3})
    with pytest.raises(ValueError, match="unknown keys in optim"):
        run_config_from_dict({**good, "optim": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown top-level keys"):
        run_config_from_dict({**good, "extra": 1})
    with pytest.raises(ValueError, match=r"set model\.init"):
        run_config_from_dict({**good, "model": {}})
    with pytest.raises(ValueError, match="stage 2 only"):
        run_config_from_dict({**good, "model": {"init": "x", "lora": True}})
    with pytest.raises(ValueError, match="steps must be a positive int"):
        run_config_from_dict({**good, "optim": {"steps": 0}})
    with pytest.raises(ValueError, match="at least one JSONL"):
        run_config_from_dict({**good, "data": {"train": []}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(good))
    config = load_run_config(path, {"optim": {"steps": 7}})
    assert config.optim.steps == 7
    assert config.model.init == str(tmp_path / "ckpt")  # relative to the YAML file
    assert config.data.train[0].path == str(tmp_path / "d.jsonl")


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        load_run_config(path)


def test_shuffle_regions_draws_seeded_permutations(data_dir):
    from vlm_fo1.training.config import DataSource, DataSpec
    from vlm_fo1.training.trainer import build_dataset

    spec = DataSpec(train=[DataSource(str(data_dir / "train.jsonl"))], shuffle_regions=True)
    first, again = build_dataset(spec, 40, seed=3), build_dataset(spec, 40, seed=3)
    plain = build_dataset(DataSpec(train=[DataSource(str(data_dir / "train.jsonl"))]), 40, seed=3)
    assert [r.boxes for r in first.records] == [r.boxes for r in again.records]
    moved = 0
    for shuffled, original in zip(first.records, plain.records, strict=True):
        assert shuffled.id == original.id
        assert sorted(map(tuple, shuffled.boxes)) == sorted(map(tuple, original.boxes))
        moved += shuffled.boxes != original.boxes
    assert moved > 20


def test_shuffle_regions_share(data_dir):
    from vlm_fo1.training.config import DataSource, DataSpec
    from vlm_fo1.training.trainer import build_dataset

    source = [DataSource(str(data_dir / "train.jsonl"))]
    plain = build_dataset(DataSpec(train=source), 200, seed=3)
    half = build_dataset(DataSpec(train=source, shuffle_regions=0.5), 200, seed=3)
    multi = [i for i, r in enumerate(plain.records) if len(r.boxes) > 2]
    kept = sum(half.records[i].boxes == plain.records[i].boxes for i in multi)
    assert 0.3 < kept / len(multi) < 0.75  # about half kept (plus permutations that change nothing)
    bad = _config(data_dir, data_dir / "x", 0, None)
    bad["data"]["shuffle_regions"] = 1.5
    with pytest.raises(ValueError, match=r"data.shuffle_regions must be a share in \[0, 1\]"):
        run_config_from_dict(bad)


# -- stages ------------------------------------------------------------------------------------------------
def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_stage_presets(stage0):
    config = run_config_from_dict(_config(Path("."), Path("x"), 1, stage0))
    model, processor = init_model(config)
    configure_trainable(model, 0, processor.tokenizer)
    assert all(n.startswith("vlm.") for n in _trainable(model))
    assert any(n.startswith("vlm.model.visual.") for n in _trainable(model))

    model, processor = init_model(config)
    summary = configure_trainable(model, 1, processor.tokenizer)
    names = _trainable(model)
    assert {n.split(".")[0] for n in names} == {"aux_encoder", "region_encoder", "connector", "vlm"}
    assert {n for n in names if n.startswith("vlm.")} == {
        "vlm.model.language_model.embed_tokens.weight",
        "vlm.lm_head.weight",
    }
    assert summary.row_masked == ["input embeddings", "LM head"]

    model, processor = init_model(config)
    configure_trainable(model, 2, processor.tokenizer)
    names = _trainable(model)
    assert not any(n.startswith("vlm.model.visual.") for n in names)
    assert any(n.startswith("vlm.model.language_model.layers.") for n in names)
    assert any(n.startswith("aux_encoder.") for n in names)

    model, processor = init_model(config)
    configure_trainable(model, 2, processor.tokenizer, freeze=["aux_encoder", "vlm.lm_head"])
    frozen_extra = _trainable(model)
    assert frozen_extra == {n for n in names if not n.startswith(("aux_encoder", "vlm.lm_head"))}

    # new modules: part of the region side
    config.model.overrides = {
        "region_pointer": True,
        "region_pointer_label": True,
        "region_pointer_match": True,
    }
    model, processor = init_model(config)
    for stage in (1, 2):
        configure_trainable(model, stage, processor.tokenizer)
        assert {"region_pointer.weight", "region_match.weight"} <= _trainable(model)


def test_stage1_updates_only_fo1_token_rows(stage0, data_dir):
    config = run_config_from_dict(_config(data_dir, Path("x"), 1, stage0))
    model, processor = init_model(config)
    configure_trainable(model, 1, processor.tokenizer)
    before = model.vlm.get_input_embeddings().weight.detach().clone()
    head_before = model.vlm.lm_head.weight.detach().clone()
    records = list(read_records(data_dir / "train.jsonl"))[:4]
    batch = FO1Collator(processor)([(r, data_dir) for r in records])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    ids = fo1_token_ids(model, processor.tokenizer)
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[ids] = False
    after = model.vlm.get_input_embeddings().weight.detach()
    assert torch.equal(after[others], before[others])
    assert torch.equal(model.vlm.lm_head.weight.detach()[others], head_before[others])
    assert not torch.equal(model.vlm.lm_head.weight.detach()[ids], head_before[ids])


def test_region_loss_weight_matches_the_model_loss_and_upweights_region_tokens(stage0, data_dir, tmp_path):
    config = run_config_from_dict(_config(data_dir, Path("x"), 1, stage0))
    model, processor = init_model(config)
    records = [r for r in read_records(data_dir / "train.jsonl") if "<region" in r.messages[-1]["content"]]
    batch = FO1Collator(processor)([(r, data_dir) for r in records[:4]])
    with torch.no_grad():
        out = model(**batch)
    ids = model.config.region_token_ids
    torch.testing.assert_close(region_token_loss(out.logits, batch["labels"], ids, 1.0), out.loss)
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    region = torch.isin(targets, torch.tensor(ids))
    assert region.any()
    # a huge weight leaves (almost) only the region tokens' mean
    only_regions = per_token[region].mean()
    torch.testing.assert_close(
        region_token_loss(out.logits, batch["labels"], ids, 1e6), only_regions, rtol=1e-3, atol=1e-4
    )
    with pytest.raises(ValueError, match="region_loss_weight must be a positive number"):
        run_config_from_dict(_config(data_dir, Path("x"), 1, stage0, optim={"region_loss_weight": 0}))
    with pytest.raises(ValueError, match="region_set_loss must be a bool"):
        run_config_from_dict(_config(data_dir, Path("x"), 1, stage0, optim={"region_set_loss": "yes"}))
    with pytest.raises(ValueError, match="close_loss_weight must be a positive number"):
        run_config_from_dict(_config(data_dir, Path("x"), 1, stage0, optim={"close_loss_weight": -1}))
    # the trainer weights </objects> targets with close_loss_weight: the tokenizer's id of it
    close = objects_close_id(processor.tokenizer)
    closing = targets == close
    assert closing.any()
    torch.testing.assert_close(
        region_token_loss(out.logits, batch["labels"], ids, 1.0, close_id=close, close_weight=1e6),
        per_token[closing].mean(),
        rtol=1e-3,
        atol=1e-4,
    )
    trainer = FO1Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to=[]))
    trainer.close_id, trainer.close_loss_weight = close, 1e6
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.compute_loss(model, dict(batch)), per_token[closing].mean(), rtol=1e-3, atol=1e-4
        )


def test_lora_trains_and_merges(stage0, data_dir):
    config = run_config_from_dict(
        _config(data_dir, Path("x"), 2, stage0, model={"lora": True, "lora_rank": 4})
    )
    model, processor = init_model(config)
    configure_trainable(model, 2, processor.tokenizer, lora=True, lora_rank=4)
    names = _trainable(model)
    assert any("lora_A" in n for n in names)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in names)
    records = list(read_records(data_dir / "train.jsonl"))[:4]
    batch = FO1Collator(processor)([(r, data_dir) for r in records])
    for name, param in model.named_parameters():  # a non-zero adapter, as after training
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    with torch.no_grad():
        with_adapters = model(**batch).logits
        assert merge_lora(model) > 0
        merged = model(**batch).logits
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-4)


# -- runs --------------------------------------------------------------------------------------------------
def test_three_stages_chain(stage0, data_dir, tmp_path):
    assert (stage0 / "model.safetensors").is_file() and (stage0 / "tokenizer.json").is_file()
    stage1 = tmp_path / "stage1"
    result = train(
        run_config_from_dict(_config(data_dir, stage1, 1, stage0, model={"keep": "vlm"})), progress=False
    )
    assert result.steps == 4
    stage2 = tmp_path / "stage2"
    stage2_config = _config(data_dir, stage2, 2, stage1)
    stage2_config["optim"] |= {"region_loss_weight": 4.0, "close_loss_weight": 4.0}  # FO1Trainer.compute_loss
    train(run_config_from_dict(stage2_config), progress=False)
    summary = json.loads((stage2 / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_loss"] > 0
    logs = [json.loads(line) for line in (stage2 / "log.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in logs)
    assert sorted(p.name for p in stage2.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # The frozen ViT of stage 2 still equals the stage-0 ViT; the LLM moved.
    s0 = FO1ForConditionalGeneration.from_pretrained(stage0).state_dict()
    s2 = FO1ForConditionalGeneration.from_pretrained(stage2).state_dict()
    visual = [k for k in s0 if k.startswith("vlm.model.visual.")]
    assert visual and all(torch.equal(s0[k], s2[k]) for k in visual)
    assert not torch.equal(s0["vlm.lm_head.weight"], s2["vlm.lm_head.weight"])


def test_region_source_override_with_fresh_region_side(stage0, data_dir, tmp_path):
    out = tmp_path / "vit-only"
    config = _config(data_dir, out, 1, stage0, model={"keep": "vlm", "overrides": {"region_source": "vit"}})
    train(run_config_from_dict(config), progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["region_source"] == "vit"
    assert not any(k.startswith("aux_encoder.") for k in load_file(out / "model.safetensors"))


def test_fresh_region_side_takes_token_ids_from_the_tokenizer(stage0, tmp_path):
    """A base saved before a token-id field existed (here: ground_token_ids removed) still gets it."""
    old = tmp_path / "old-base"
    shutil.copytree(stage0, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["ground_token_ids"]
    (old / "config.json").write_text(json.dumps(saved))
    overrides = {"region_pointer": True, "region_pointer_label": True}
    config = _config(Path("."), Path("x"), 1, old, model={"keep": "vlm", "overrides": overrides})
    model, processor = init_model(run_config_from_dict(config))
    expected = processor.tokenizer.convert_tokens_to_ids(["<ground>", "</ground>"])
    assert model.config.ground_token_ids == expected and model.config.region_pointer_label


def _run_cli(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "vlm_fo1.cli", "train", str(config_path), "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def test_killed_run_resumes_to_the_same_weights(stage0, data_dir, tmp_path):
    steps = {"optim": {"steps": 8, "batch_size": 4, "lr": 1e-3}}
    straight = tmp_path / "straight"
    train(run_config_from_dict({**_config(data_dir, straight, 2, stage0), **steps}), progress=False)

    killed = tmp_path / "killed"
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump({**_config(data_dir, killed, 2, stage0), **steps}))
    process = _run_cli(path, "--set", "output.save_steps=2")
    deadline = time.time() + 120
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.time() < deadline, "no checkpoint-4 within 120 s"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()  # it really died before the end

    (killed / ".staging").mkdir(exist_ok=True)  # a half-written save must not be used
    resumed = train(load_run_config(path), progress=False)
    assert resumed.resumed_from is not None and int(resumed.resumed_from.rsplit("-", 1)[1]) >= 4
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not (killed / ".staging").exists()


def test_resume_refuses_a_different_config(stage0, data_dir, tmp_path):
    out = tmp_path / "run"
    config = _config(data_dir, out, 2, stage0)
    train(run_config_from_dict(config), progress=False)
    changed = {**config, "optim": {**config["optim"], "lr": 5e-4}}
    with pytest.raises(ValueError, match=r"another config \(changed: optim\.lr\)"):
        train(run_config_from_dict(changed), progress=False)
    fresh = {**changed, "output": {**changed["output"], "resume": False}}
    assert train(run_config_from_dict(fresh), progress=False).resumed_from is None


# -- region perception pretraining --------------------------------------------------------------------------
def test_region_perception_trains_only_the_region_side_and_learns_colour(stage0, tmp_path):
    data = tmp_path / "world"
    generate_dataset(data, 90, seed=5, split_name="train", proposal_config=ProposalConfig(max_proposals=8))
    config = run_config_from_dict(_config(data, Path("x"), 1, stage0, model={"keep": "vlm"}))
    model, processor = init_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = pretrain_region_perception(
        model,
        processor,
        data / "train_scenes.jsonl",
        steps=40,
        batch_size=8,
        lr=3e-3,
        held_out=30,
        progress=False,
    )
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"aux_encoder", "region_encoder"}
    assert all(p.requires_grad for p in model.parameters())  # handed back trainable
    majority = {}
    scenes = read_scene_regions(data / "train_scenes.jsonl")[-30:]
    for name in ("kind", "colour", "size"):
        values = [labels[name] for _, _, per_box in scenes for labels in per_box]
        majority[name] = max(values.count(v) for v in set(values)) / len(values)
    assert result.accuracy["colour"] > majority["colour"] + 0.1, (result.accuracy, majority)
    connector = [p.detach().clone() for p in model.connector.parameters()]
    pretrain_region_perception(
        model, processor, data / "train_scenes.jsonl", steps=2, batch_size=4, align_weight=1.0, progress=False
    )
    assert any(not torch.equal(a, b) for a, b in zip(connector, model.connector.parameters(), strict=True))
    assert result.heads is not None and set(result.heads.classes) == {"kind", "colour", "size"}
    with pytest.raises(ValueError, match="held_out"):
        pretrain_region_perception(
            model, processor, data / "train_scenes.jsonl", held_out=500, progress=False
        )
    bad = tmp_path / "bad_scenes.jsonl"
    bad.write_text('{"image": "x.png"}\n')
    with pytest.raises(ValueError, match="expected scene truth with proposals"):
        read_scene_regions(bad)
    bad.write_text('{"image": "x.png", "objects": [], "proposals": {"boxes": []}}\n')
    with pytest.raises(ValueError, match="and the image size, got \\['image', 'objects', 'proposals'\\]"):
        read_scene_regions(bad)


MATCH = {"region_pointer": True, "region_pointer_label": True, "region_pointer_match": True}


@pytest.mark.parametrize("aux_frozen", [0, 3, 99])
def test_region_perception_word_match_trains_the_score_the_model_adds_to_region_logits(
    stage0, tmp_path, aux_frozen
):
    """With ``match_weight`` the connector and ``region_match`` train too (the auxiliary encoder
    but its first ``aux_frozen`` children), and the perception's word-match score is exactly what
    the model adds to ``<regionN>`` after ``<ground>word</ground>`` when the pointer's own matrix
    is zero."""
    from vlm_fo1.training import perception

    data = tmp_path / "world"
    generate_dataset(data, 40, seed=5, split_name="train", proposal_config=ProposalConfig(max_proposals=8))
    scenes = data / "train_scenes.jsonl"
    config = run_config_from_dict(
        _config(data, Path("x"), 1, stage0, model={"keep": "vlm", "overrides": MATCH})
    )
    model, processor = init_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = pretrain_region_perception(
        model, processor, scenes, steps=6, batch_size=4, held_out=8, match_weight=1.0, aux_frozen=aux_frozen,
        progress=False,
    )  # fmt: skip
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {n.split(".")[0] for n in moved} - {"aux_encoder"} == {
        "region_encoder",
        "connector",
        "region_match",
    }
    children = [name for name, _ in model.aux_encoder.named_children()]
    aux_moved = {n.split(".")[1] for n in moved if n.startswith("aux_encoder.")}
    assert aux_moved == set(children[aux_frozen:])  # the first aux_frozen children stay as they came
    assert 0.0 <= result.accuracy["match"] <= 1.0

    image, boxes, per_box = perception.read_scene_regions(scenes)[0]
    match = perception._WordMatch(
        model, processor, [*per_box, {"kind": "circle", "colour": "red", "size": "small"}]
    )
    word = {"kind": "word", "colour": "red", "size": "small", "text": "CAT"}
    assert [perception._group_value(word, g) for g in perception.MATCH_GROUPS] == [
        "word",
        "words",
        "red",
        "small",
        "CAT",
    ]
    assert perception._group_value({"kind": "background"}, "colour") is None
    model.eval()
    with torch.no_grad():
        model.region_pointer.weight.zero_()
        counts, features = perception._region_features(model, processor, [data / image], [boxes])
        expected = match(model, features, counts)[match.row("kind", "circle")]  # (N,)
        prompt = [
            {"role": "user", "content": "find"},
            {"role": "assistant", "content": "<ground>circle</ground><objects>"},
        ]
        batch = processor([prompt], images=[data / image], boxes=[boxes], add_generation_prompt=False)
        logits = model(**batch).logits[0, -1]
        model.region_match.weight.zero_()
        plain = model(**batch).logits[0, -1]
    ids = processor.region_token_ids[: len(boxes)]
    torch.testing.assert_close((logits - plain)[ids], expected, atol=1e-4, rtol=1e-4)
    plain_model, _ = init_model(
        run_config_from_dict(_config(data, Path("x"), 1, stage0, model={"keep": "vlm"}))
    )
    with pytest.raises(ValueError, match="region_pointer_match=True"):
        pretrain_region_perception(plain_model, processor, scenes, steps=1, match_weight=1.0, progress=False)
    background = [{"kind": perception.BACKGROUND, "colour": perception.BACKGROUND, "size": "small"}]
    with pytest.raises(ValueError, match="every one is background"):
        perception._WordMatch(model, processor, background)


def test_region_perception_position_words_name_the_half_of_the_image(stage0, tmp_path):
    """Each covered proposal is labelled with the half of the image its object's centre lies in
    (from the scene truth), and ``position_words`` adds those words to the match's problems."""
    from vlm_fo1.training import perception

    data = tmp_path / "world"
    generate_dataset(data, 12, seed=5, split_name="train", proposal_config=ProposalConfig(max_proposals=8))
    scenes = data / "train_scenes.jsonl"
    truths = [json.loads(line) for line in scenes.read_text().splitlines()]
    regions = perception.read_scene_regions(scenes)
    seen = set()
    for truth, (_, _, per_box) in zip([t for t in truths if t["proposals"]["boxes"]], regions, strict=True):
        width, height = truth["size"]
        for matched, iou, labels in zip(
            truth["proposals"]["matched_object"], truth["proposals"]["iou"], per_box, strict=True
        ):
            if matched < 0 or iou < 0.5:
                assert "horizontal" not in labels
                continue
            x0, y0, x1, y1 = truth["objects"][matched]["box"]
            left, top = x0 + x1 < width, y0 + y1 < height
            assert labels["horizontal"] == ("leftmost" if left else "rightmost")
            assert labels["side"] == ("left" if left else "right")
            assert labels["vertical"] == ("topmost" if top else "bottommost")
            assert labels["level"] == ("above" if top else "below")
            seen.add((left, top))
    assert len(seen) == 4  # every quarter of the image occurs
    config = run_config_from_dict(
        _config(data, Path("x"), 1, stage0, model={"keep": "vlm", "overrides": MATCH})
    )
    model, processor = init_model(config)
    per_box = [b for _, _, boxes in regions for b in boxes]
    plain = perception._WordMatch(model, processor, per_box)
    placed = perception._WordMatch(
        model, processor, per_box, (*perception.MATCH_GROUPS, *perception.POSITION_GROUPS)
    )
    added = [p for p in placed.problems if p not in plain.problems]
    assert {g for g, _ in added} == set(perception.POSITION_GROUPS) and len(added) == 8
    assert placed.vocabulary["horizontal"] == ["leftmost", "rightmost"]
    image, boxes, labels = regions[0]
    with torch.no_grad():  # the position problems are added beside the others, not mixed in
        counts, features = perception._region_features(model, processor, [data / image], [boxes])
        base = plain.loss(plain(model, features, counts), labels)
        scores = placed(model, features, counts)
        torch.testing.assert_close(placed.loss(scores, labels, 0.0), base)
        position = placed.loss(scores, labels, 1.0) - base
        assert position > 0
        torch.testing.assert_close(placed.loss(scores, labels, 2.0) - base, 2 * position)
    result = pretrain_region_perception(
        model, processor, scenes, steps=2, batch_size=4, held_out=4, match_weight=1.0,
        position_weight=0.5, progress=False,
    )  # fmt: skip
    assert 0.0 <= result.accuracy["match"] <= 1.0
    with pytest.raises(ValueError, match="position_weight must be a finite number >= 0, got -1"):
        pretrain_region_perception(model, processor, scenes, steps=1, position_weight=-1, progress=False)


def test_region_perception_match_lr_scale_speeds_only_the_match(stage0, tmp_path):
    """Adam's first step moves each parameter by about its learning rate, so ``match_lr_scale``
    moves ``region_match`` that much farther while the region encoder moves as before."""
    data = tmp_path / "world"
    generate_dataset(data, 12, seed=5, split_name="train", proposal_config=ProposalConfig(max_proposals=8))
    scenes = data / "train_scenes.jsonl"
    config = run_config_from_dict(
        _config(data, Path("x"), 1, stage0, model={"keep": "vlm", "overrides": MATCH})
    )
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model, processor = init_model(config)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        pretrain_region_perception(
            model, processor, scenes, steps=1, batch_size=4, held_out=4, match_weight=1.0,
            match_lr_scale=scale, progress=False,
        )  # fmt: skip
        moved[scale] = {
            group: max(
                (p.detach() - before[n]).abs().max().item()
                for n, p in model.named_parameters()
                if n.startswith(group)
            )
            for group in ("region_match", "region_encoder")
        }
    assert moved[10.0]["region_match"] == pytest.approx(10 * moved[1.0]["region_match"], rel=0.05)
    assert moved[10.0]["region_encoder"] == pytest.approx(moved[1.0]["region_encoder"], rel=0.05)
    with pytest.raises(ValueError, match="match_lr_scale must be > 0, got 0"):
        pretrain_region_perception(model, processor, scenes, steps=1, match_weight=1.0, match_lr_scale=0)


def test_probe_detection_scores_regions_by_the_kind_head(stage0, tmp_path, monkeypatch):
    """With region features that are the truth (one-hot kind of each target region), the probe
    ranks every target region first: mAP@0.5 is 1 when every object has a proposal."""

    from vlm_fo1.training import perception

    data = tmp_path / "world"
    generate_dataset(data, 30, seed=7, split_name="val", proposal_config=ProposalConfig(recall=1.0))
    records = [r for r in read_records(data / "val.jsonl") if r.meta.get("task") == "detection"]
    kinds = ["background", "circle", "diamond", "hexagon", "square", "star", "triangle", "word"]
    queue = []

    def oracle(model, processor, images, boxes):
        record = queue.pop(0)
        label = record.meta["classes"][0]
        rows = torch.zeros(len(boxes[0]), len(kinds))
        rows[:, 0] = 1.0
        for region in record.meta["target_regions"][label]:
            rows[region] = 0.0
            rows[region, kinds.index(label)] = 1.0
        return [len(boxes[0])], rows

    heads = perception._Heads(len(kinds), {"kind": kinds})
    with torch.no_grad():
        heads.heads["kind"].weight.copy_(10 * torch.eye(len(kinds)))
        heads.heads["kind"].bias.zero_()
    monkeypatch.setattr(perception, "_region_features", oracle)
    config = run_config_from_dict(_config(data, Path("x"), 1, stage0, model={"keep": "vlm"}))
    model, processor = init_model(config)
    usable = [r for r in records if r.meta["classes"][0] in kinds]
    queue.extend(r for r in usable if r.boxes)
    metrics = perception.probe_detection(model, processor, heads, records, data)
    assert not queue and metrics["mAP50"] == pytest.approx(1.0)
    queue.extend(r for r in usable if r.boxes)
    flipped = perception.probe_detection(model, processor, _negated(heads), records, data)
    assert flipped["mAP50"] < 0.5
    with pytest.raises(ValueError, match="single-class detection records"):
        perception.probe_detection(model, processor, heads, records[:0], data)


def _negated(heads):
    """The same heads with every logit negated (the truth ranked last)."""
    with torch.no_grad():
        for layer in heads.heads.values():
            layer.weight.neg_()
    return heads


# -- dense pretraining of the auxiliary encoder -------------------------------------------------------------
def test_cell_targets_read_the_object_map_at_cell_centres():
    from vlm_fo1.training.aux_pretraining import cell_targets

    object_map = -np.ones((8, 12), dtype=np.int16)
    object_map[0:4, 0:6] = 0  # object 0: top-left quarter
    object_map[4:8, 6:12] = 1  # object 1: bottom-right quarter
    classes = ["background", "circle", "star"]
    got = cell_targets(object_map, ["star", "circle"], classes, (2, 3))
    # cell centres: rows 2 and 6, columns 2, 6 and 10
    assert got.tolist() == [[2, 0, 0], [0, 1, 1]]


def test_aux_pretraining_trains_only_the_aux_encoder_and_reports_cell_accuracy(stage0, tmp_path):
    from vlm_fo1.training.aux_pretraining import pretrain_aux_encoder, read_mask_scenes

    data = tmp_path / "world"
    generate_dataset(data, 24, seed=5, split_name="train", proposal_config=ProposalConfig(max_proposals=8))
    scenes = data / "train_scenes.jsonl"
    assert len(read_mask_scenes([scenes])) == 24
    config = run_config_from_dict(_config(data, Path("x"), 1, stage0, model={"keep": "vlm"}))
    model, processor = init_model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = pretrain_aux_encoder(
        model, processor, [scenes], steps=3, batch_size=4, held_out=4, progress=False
    )
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"aux_encoder"}
    assert set(result.accuracy) == {"kind", "colour", "background"}
    assert all(0.0 <= v <= 1.0 for v in result.accuracy.values())
    with pytest.raises(ValueError, match="held_out"):
        pretrain_aux_encoder(model, processor, [scenes], steps=1, held_out=24, progress=False)
    old = tmp_path / "old_scenes.jsonl"
    old.write_text(
        json.dumps({k: v for k, v in json.loads(scenes.read_text().splitlines()[0]).items() if k != "mask"})
        + "\n"
    )
    with pytest.raises(ValueError, match="without an object map"):
        read_mask_scenes([old])
    # The dense targets come from the auxiliary input alone, the same tensor prepare_image gives.
    image = data / json.loads(scenes.read_text().splitlines()[0])["image"]
    assert torch.equal(processor.aux_pixel_values(image), processor.prepare_image(image).aux_pixel_values)
    processor.aux_resize_mode = "dynamic"
    with pytest.raises(ValueError, match="'squash'"):
        pretrain_aux_encoder(model, processor, [scenes], steps=1, held_out=4, progress=False)
