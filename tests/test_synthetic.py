"""Tests for vlm_fo1.synthetic: scenes, simulated proposals, tasks and dataset files."""

from __future__ import annotations

import io
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_fo1.data.records import ConversationRecord, read_records, write_records
from vlm_fo1.prompting import templates as T
from vlm_fo1.prompting.parse import parse
from vlm_fo1.prompting.tokens import REGION_TOKEN_PATTERN
from vlm_fo1.synthetic import (
    NEGATIVE_TASKS,
    TASK_NAMES,
    VQA_QUESTION_FORMS,
    NegativeBalance,
    ProposalConfig,
    SceneConfig,
    SceneObject,
    TaskMix,
    build_scene,
    derive_seed,
    difficulty_configs,
    generate_dataset,
    image_caption,
    make_records,
    match_proposals,
    referring_expressions,
    render_scene,
    simulate_proposals,
    world_vocabulary,
)
from vlm_fo1.synthetic.language import split_words

CONFIG = SceneConfig()
PROPOSALS = ProposalConfig()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _scenes(count: int, base: int = 0, config: SceneConfig = CONFIG) -> list:
    return [render_scene(config, base + i) for i in range(count)]


@pytest.fixture(scope="module")
def records() -> list[ConversationRecord]:
    """Records of 200 scenes with every task weighted, six per scene."""
    mix = TaskMix(records_per_scene=6)
    out: list[ConversationRecord] = []
    for index in range(200):
        scene, proposals = build_scene(7, "test", index, CONFIG, PROPOSALS)
        out += make_records(scene, proposals, mix, random.Random(index), f"images/{index}.png")
    return out


# -- scenes ----------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_differs() -> None:
    a, b, c = render_scene(CONFIG, 123), render_scene(CONFIG, 123), render_scene(CONFIG, 124)
    assert _png(a.image) == _png(b.image)
    assert a.objects == b.objects
    assert _png(a.image) != _png(c.image)
    from_rng = render_scene(CONFIG, random.Random(5))
    again = render_scene(CONFIG, from_rng.seed)
    assert _png(from_rng.image) == _png(again.image)


def test_scene_sizes_and_counts_follow_the_config() -> None:
    for scene in _scenes(60):
        width, height = scene.size
        assert scene.image.size == scene.size
        assert CONFIG.width_range[0] <= width <= CONFIG.width_range[1]
        assert CONFIG.height_range[0] <= height <= CONFIG.height_range[1]
        assert 1 <= len(scene.objects) <= CONFIG.objects_range[1]
        for obj in scene.objects:
            assert obj.visible_fraction >= CONFIG.min_visible_fraction
            assert obj.visible_fraction == 1.0 or not obj.is_word
            assert (obj.text is not None) == obj.is_word


def test_ground_truth_boxes_are_tight() -> None:
    """The object's own colour fills the box to all four edges and never appears just outside it."""
    checked = 0
    for scene in _scenes(80):
        pixels = np.asarray(scene.image).astype(int)
        height, width = pixels.shape[:2]
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in obj.box)
            assert obj.box == (x1, y1, x2, y2) and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            base = np.array(dict(CONFIG.colours)[obj.colour])
            crop = pixels[y1:y2, x1:x2]
            near = np.abs(crop - base).max(axis=-1) <= CONFIG.colour_jitter
            values, counts = np.unique(crop[near], axis=0, return_counts=True)
            own = np.all(pixels == values[counts.argmax()], axis=-1)  # the object's exact colour
            inside = own[y1:y2, x1:x2]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            ring = own[max(y1 - 1, 0) : y2 + 1, max(x1 - 1, 0) : x2 + 1].sum() - inside.sum()
            assert ring == 0, (scene.seed, obj)
            checked += 1
    assert checked > 150


def test_scene_config_validation() -> None:
    with pytest.raises(ValueError, match="width_range"):
        SceneConfig(width_range=(100, 50))
    with pytest.raises(ValueError, match="kinds"):
        SceneConfig(kinds=("circle", "blob"))
    with pytest.raises(ValueError, match="max_overlap"):
        SceneConfig(max_overlap=1.5)
    with pytest.raises(ValueError, match="fit"):
        SceneConfig(width_range=(40, 40), height_range=(40, 40))


# -- proposals -------------------------------------------------------------------------------------------


def _proposal_stats(config: ProposalConfig, scenes: int = 150) -> tuple[list[float], list[float], float]:
    ious, best, found, total = [], [], 0, 0
    for scene in _scenes(scenes, base=1000):
        proposals = simulate_proposals(scene, config, random.Random(scene.seed))
        ious += [iou for m, iou in zip(proposals.matched_object, proposals.iou, strict=True) if m >= 0]
        for index in range(len(scene.objects)):
            own = [iou for m, iou in zip(proposals.matched_object, proposals.iou, strict=True) if m == index]
            found += bool(own)
            best += [max(own)] if own else []
        total += len(scene.objects)
    return ious, best, found / total


def test_proposal_iou_statistics_at_defaults() -> None:
    ious, best, recall = _proposal_stats(PROPOSALS)
    assert np.mean(np.array(ious) >= 0.8) > 0.6
    assert np.mean(np.array(best) >= 0.8) > 0.9
    assert abs(recall - PROPOSALS.recall) < 0.05


@pytest.mark.parametrize("recall", [0.0, 0.5, 1.0])
def test_recall_setting_is_respected(recall: float) -> None:
    _, _, measured = _proposal_stats(ProposalConfig(recall=recall), scenes=200)
    assert abs(measured - recall) < 0.07


def test_difficulty_levels_grow_scenes_and_proposal_noise() -> None:
    sizes = {}
    for level in ("easy", "medium", "full"):
        scene_config, proposal_config = difficulty_configs(level, max_proposals=32)
        counts = []
        for index in range(60):
            scene, proposals = build_scene(3, level, index, scene_config, proposal_config)
            counts.append((len(scene.objects), len(proposals)))
        sizes[level] = np.mean(counts, axis=0)
        if level == "easy":  # at most one box beyond one per object
            assert all(1 <= o <= 2 and p <= o + 1 for o, p in counts)
    assert sizes["easy"][1] < sizes["medium"][1] < sizes["full"][1]
    assert difficulty_configs("full") == (SceneConfig(), ProposalConfig())
    with pytest.raises(ValueError, match="difficulty must be one of"):
        difficulty_configs("hard")


def test_proposals_capped_sorted_clipped() -> None:
    config = ProposalConfig(max_proposals=5)
    for scene in _scenes(40, base=2000):
        proposals = simulate_proposals(scene, config, random.Random(scene.seed))
        assert len(proposals) <= 5
        assert list(proposals.scores) == sorted(proposals.scores, reverse=True)
        assert all(0.0 < s < 1.0 for s in proposals.scores)
        width, height = scene.size
        for x1, y1, x2, y2 in proposals.boxes:
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert x2 - x1 >= 1 and y2 - y1 >= 1
        for m, iou in zip(proposals.matched_object, proposals.iou, strict=True):
            assert (m == -1 and iou == 0.0) or (0 <= m < len(scene.objects) and 0.0 <= iou <= 1.0)
    full = simulate_proposals(render_scene(CONFIG, 3), PROPOSALS, random.Random(0))
    assert full == simulate_proposals(render_scene(CONFIG, 3), PROPOSALS, random.Random(0))


def test_proposal_nms_keeps_the_best_of_each_overlapping_group() -> None:
    import torch
    from torchvision.ops import nms

    config = ProposalConfig(nms_iou=0.8, duplicates_range=(2, 2))
    raw_config = ProposalConfig(duplicates_range=(2, 2), max_proposals=1000)
    for scene in _scenes(30, base=3000):
        raw = simulate_proposals(scene, raw_config, random.Random(scene.seed))
        kept = simulate_proposals(scene, config, random.Random(scene.seed))
        expected = nms(torch.tensor(raw.boxes), torch.tensor(raw.scores), 0.8).tolist()
        assert kept.boxes == tuple(raw.boxes[i] for i in expected[: config.max_proposals])
        assert len(kept) <= len(raw)
    with pytest.raises(ValueError, match="nms_iou must be in"):
        ProposalConfig(nms_iou=0.0)


def test_match_proposals_is_greedy_one_to_one() -> None:
    objects = [[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]]
    proposals = [[1, 0, 11, 10], [0, 0, 10, 12], [100, 100, 110, 110]]
    # object 1 takes proposal 0 (IoU 1.0) first; object 0 falls back to proposal 1; object 2 has none
    assert match_proposals(proposals, objects) == [1, 0, None]
    assert match_proposals([[1, 0, 11, 10]], objects) == [None, 0, None]
    assert match_proposals([], objects) == [None, None, None]
    assert match_proposals(proposals, []) == []
    with pytest.raises(ValueError, match="iou_threshold"):
        match_proposals(proposals, objects, iou_threshold=0.0)
    rng = random.Random(0)
    for _ in range(50):
        boxes = [
            [x := rng.uniform(0, 50), y := rng.uniform(0, 50), x + rng.uniform(5, 30), y + rng.uniform(5, 30)]
            for _ in range(8)
        ]
        matched = [m for m in match_proposals(boxes[:5], boxes[3:]) if m is not None]
        assert len(matched) == len(set(matched))


# -- tasks -----------------------------------------------------------------------------------------------


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{\}", "(.+)"))


_TEMPLATE_OF = {
    "detection": T.OD_TEMPLATE,
    "multi_detection": T.OD_TEMPLATE,
    "referring": T.REC_TEMPLATE,
    "counting": T.OD_COUNTING_TEMPLATE,
    "region_caption": T.BRIEF_REGION_CAPTION_TEMPLATE,
    "region_ocr": T.REGION_OCR_TEMPLATE,
    "visual_prompt": T.VISUAL_PROMPT_OD_TEMPLATE,
}
_QUESTIONS = [re.compile(re.sub(r"\\\{\w+\\\}", r"\\w+", re.escape(q))) for q in VQA_QUESTION_FORMS]


def _user_text(record: ConversationRecord) -> str:
    return "".join(
        item["text"] if item["type"] == "text" else f"<region{item['index']}>"
        for item in record.messages[0]["content"]
    )


def test_every_task_appears(records: list[ConversationRecord]) -> None:
    assert set(Counter(r.meta["task"] for r in records)) == set(TASK_NAMES)


def test_user_prompts_use_the_release_wording(records: list[ConversationRecord]) -> None:
    for record in records:
        text, name = _user_text(record), record.meta["task"]
        if name in _TEMPLATE_OF:
            match = _template_regex(_TEMPLATE_OF[name]).fullmatch(text)
            assert match, (name, text)
            if name in ("region_caption", "region_ocr", "visual_prompt"):
                assert REGION_TOKEN_PATTERN.fullmatch(match.group(1)), text
        else:
            assert any(q.fullmatch(text) for q in _QUESTIONS), text
            assert record.boxes == [] and record.scores is None and record.task == T.Task.FREE


def test_region_indexes_are_in_range(records: list[ConversationRecord]) -> None:
    for record in records:
        used = [int(i) for i in REGION_TOKEN_PATTERN.findall(record.target())]
        used += [item["index"] for item in record.messages[0]["content"] if item["type"] == "region"]
        assert all(0 <= i < len(record.boxes) for i in used), record.id
        assert record.scores is None or len(record.scores) == len(record.boxes)


def _expected_groups(meta: dict) -> list[tuple[str, tuple[int, ...]]]:
    name = meta["task"]
    if name == "detection":
        return [(meta["classes"][0], tuple(meta["target_regions"][meta["classes"][0]]))]
    if name == "multi_detection":  # every asked class in order, absent ones with an empty group
        return [(c, tuple(meta["target_regions"][c])) for c in meta["classes"]]
    if name == "counting":
        return [(meta["label"], tuple(meta["target_regions"]))]
    if name == "referring":
        return [(meta["expression"], (meta["target_region"],))]
    if name == "visual_prompt":
        return [(meta["kind"], tuple(meta["target_regions"]))]
    return []


def test_answers_parse_to_the_intended_groups(records: list[ConversationRecord]) -> None:
    for record in records:
        out = parse(record.target(), record.boxes)
        assert out.ok, (record.target(), out.issues)
        groups = [(g.label, g.region_indexes) for g in out.groups]
        assert groups == _expected_groups(record.meta), record.target()
        for group in out.groups:
            assert list(group.region_indexes) == sorted(group.region_indexes)
        if record.meta["task"] == "counting":
            assert out.count == record.meta["count"] == len(record.meta["gt_boxes"])
            assert record.meta["label"] == record.meta["kind"] + "s"
            assert len(record.meta["target_regions"]) <= record.meta["count"]
        if not groups:
            assert out.answer == record.target() == record.meta["answer"]


def test_region_answers_match_the_objects(records: list[ConversationRecord]) -> None:
    for record in records:
        meta = record.meta
        if meta["task"] == "region_ocr":
            assert re.fullmatch("[A-Z]{3,4}", record.target())
        if meta["task"] in ("region_caption", "region_ocr", "referring"):
            region = meta.get("region", meta.get("target_region"))
            box = np.array(record.boxes[region])
            truth = np.array(meta["gt_box"])
            inter = np.clip(np.minimum(box[2:], truth[2:]) - np.maximum(box[:2], truth[:2]), 0, None).prod()
            union = np.prod(box[2:] - box[:2]) + np.prod(truth[2:] - truth[:2]) - inter
            assert inter / union >= 0.5


@pytest.mark.parametrize(
    ("mix", "tasks"),
    [
        (TaskMix(), NEGATIVE_TASKS),
        (TaskMix.only("detection", negative_ratio=0.5, records_per_scene=3), ("detection",)),
    ],
)
def test_negative_ratio_is_close_to_the_target(mix: TaskMix, tasks: tuple[str, ...]) -> None:
    negatives: dict[str, list[bool]] = {}
    balance = NegativeBalance(mix.negative_ratio)
    for index in range(400):
        scene, proposals = build_scene(11, "neg", index, CONFIG, PROPOSALS)
        for record in make_records(scene, proposals, mix, random.Random(index), None, balance=balance):
            if record.meta["task"] not in NEGATIVE_TASKS:
                continue
            negative = record.meta["negative"]
            negatives.setdefault(record.meta["task"], []).append(negative)
            if record.meta["task"] == "counting":
                assert negative == (record.meta["count"] == 0)
            else:  # a positive multi-class answer may end with an absent class's empty group
                assert negative == (not REGION_TOKEN_PATTERN.findall(record.target())), record.target()
                assert not negative or record.target().endswith("</ground><objects></objects>")
    assert set(negatives) == set(tasks)
    for task, flags in negatives.items():
        assert len(flags) > 50 and abs(np.mean(flags) - mix.negative_ratio) < 0.03, (task, np.mean(flags))
    with pytest.raises(ValueError, match=r"balance\.ratio"):
        make_records(scene, proposals, mix, random.Random(0), None, balance=NegativeBalance(0.9))


def test_referring_expressions_are_unique_and_strict() -> None:
    def obj(
        kind: str, colour: str, size: str, box: tuple[float, float, float, float], area: float
    ) -> SceneObject:
        return SceneObject(kind, colour, size, None, box, area, 0, 1.0)

    objects = [
        obj("circle", "red", "small", (0, 0, 10, 10), 80),
        obj("circle", "blue", "large", (40, 0, 70, 30), 700),
        obj("star", "red", "medium", (20, 40, 40, 60), 200),
    ]
    found = {text: index for _, text, index in referring_expressions(objects)}
    assert found["the red circle"] == 0 and found["the blue circle"] == 1
    assert found["the largest circle"] == 1 and found["the leftmost circle"] == 0
    assert "the circle above the star" not in found and found["the circle right of the star"] == 1
    assert "the circle left of the star" in found and found["the circle left of the star"] == 0
    assert "the circle" not in found and "the red star" in found
    assert image_caption(objects) == "A small red circle, a medium red star and a large blue circle."


def test_general_mix_has_no_regions() -> None:
    scene, proposals = build_scene(0, "g", 0, CONFIG, PROPOSALS)
    out = make_records(scene, proposals, TaskMix.general(records_per_scene=3), random.Random(0), "x.png")
    assert out and all(r.boxes == [] and r.meta["task"] in ("vqa", "caption") for r in out)
    with pytest.raises(ValueError, match="task names"):
        TaskMix.only("nope")
    with pytest.raises(ValueError, match="negative_ratio"):
        TaskMix(negative_ratio=1.5)


def test_world_vocabulary_covers_every_text(records: list[ConversationRecord]) -> None:
    vocabulary = set(world_vocabulary())
    for record in records:
        text = REGION_TOKEN_PATTERN.sub(" ", _user_text(record) + " " + record.target())
        text = re.sub(r"</?(ground|objects)>", " ", text)
        missing = set(split_words(text)) - vocabulary
        assert not missing, (missing, text)


# -- files -----------------------------------------------------------------------------------------------


def test_records_round_trip(records: list[ConversationRecord], tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    assert write_records(path, records[:50]) == 50
    back = list(read_records(path))
    assert [r.to_json() for r in back] == [json.loads(json.dumps(r.to_json())) for r in records[:50]]


def test_generate_dataset_writes_readable_files(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path / "a", 12, seed=3, mix=TaskMix(records_per_scene=3), split_name="val")
    again = generate_dataset(tmp_path / "b", 12, seed=3, mix=TaskMix(records_per_scene=3), split_name="val")
    assert path.read_bytes() == again.read_bytes()
    back = list(read_records(path))
    assert len(back) >= 12
    for record in back:
        image_path = record.image_path(path.parent)
        assert image_path is not None and not Path(record.image or "").is_absolute()
        with Image.open(image_path) as image:
            assert list(image.size) == record.meta["image_size"] and image.mode == "RGB"
    truth = [json.loads(line) for line in (path.parent / "val_scenes.jsonl").read_text().splitlines()]
    assert len(truth) == 12 and all(t["objects"] for t in truth)
    assert derive_seed(3, "val", 0, "scene") != derive_seed(3, "train", 0, "scene")
    with pytest.raises(ValueError, match="num_scenes"):
        generate_dataset(tmp_path / "c", 0, seed=0)


def test_generation_speed_benchmark(tmp_path: Path) -> None:
    """Not an assertion: prints scenes per second (render + proposals + records + PNG + JSONL)."""
    start = time.perf_counter()
    generate_dataset(tmp_path, 100, seed=0, split_name="bench")
    elapsed = time.perf_counter() - start
    print(f"\nsynthetic world: {100 / elapsed:.0f} scenes/s (100 scenes in {elapsed:.2f} s)")


def test_object_map_png_round_trips_and_refuses_a_scene_without_one(tmp_path: Path) -> None:
    from dataclasses import replace

    from vlm_fo1.synthetic.dataset import save_object_map

    scene = render_scene(CONFIG, 3)
    assert scene.object_map is not None and scene.object_map.shape == (scene.size[1], scene.size[0])
    save_object_map(scene, tmp_path / "map.png")
    read = np.asarray(Image.open(tmp_path / "map.png"), dtype=np.int16) - 1
    assert np.array_equal(read, scene.object_map) and set(np.unique(read)) <= set(
        range(-1, len(scene.objects))
    )
    with pytest.raises(ValueError, match="no object map"):
        save_object_map(replace(scene, object_map=None), tmp_path / "none.png")
