"""Evaluation: metrics against hand-computed values and pycocotools, confidences, the coordinate
baseline, the runner on a tiny random model, the oracle, and the CLI hook."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from vlm_fo1.data import ConversationRecord, read_records
from vlm_fo1.evaluation import (
    COORDINATE_TASKS,
    DetectionTruth,
    GeneratedAnswer,
    RegionTokenProb,
    ScoredDetection,
    boxes_to_text,
    coco_map,
    count_from_box_text,
    counting_accuracy,
    detection_confidence,
    detection_probabilities,
    evaluate,
    exact_match_accuracy,
    false_positive_rate,
    generate_answers,
    normalize_answer,
    parse_box_text,
    precision_recall,
    random_choice_map,
    rec_accuracy,
    region_token_probabilities,
    score_records,
    to_coordinate_record,
)
from vlm_fo1.evaluation.cli import run_eval
from vlm_fo1.evaluation.runner import merge_answers, per_class_records, picked_counts, query_labels
from vlm_fo1.prompting import IM_END
from vlm_fo1.prompting import templates as P
from vlm_fo1.synthetic import TASK_NAMES, ProposalConfig, generate_dataset
from vlm_fo1.testing import bias_after_token

A, B = (10.0, 10.0, 30.0, 30.0), (50.0, 50.0, 80.0, 70.0)
FAR = (200.0, 200.0, 220.0, 220.0)


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A miniature-world split with every task, and a perfect proposal network (oracle ceiling 1.0)."""
    root = tmp_path_factory.mktemp("world")
    path = generate_dataset(
        root, 12, seed=1, split_name="val", proposal_config=ProposalConfig(recall=1.0, jitter=0.0)
    )
    return root, list(read_records(path))


@pytest.fixture(scope="module")
def small_set(world):
    """About a dozen records covering all tasks (the first one or two of each)."""
    _, records = world
    by_task = collections.defaultdict(list)
    for record in records:
        by_task[record.meta["task"]].append(record)
    assert set(by_task) == set(TASK_NAMES)
    return [r for task in TASK_NAMES for r in by_task[task][: 2 if task == "detection" else 1]]


# -- metrics: COCO mAP ---------------------------------------------------------------------------------
def test_coco_map_perfect_predictions_are_one():
    gt = [DetectionTruth(1, {"circle": [A, B]}), DetectionTruth(2, {"square": [A], "circle": []})]
    preds = [
        ScoredDetection(1, "circle", A, 0.3),
        ScoredDetection(1, "circle", B, 0.2),
        ScoredDetection(2, "square", A, 0.9),
    ]
    assert coco_map(gt, preds, ["circle", "square"]) == {"mAP": 1.0, "mAP50": 1.0, "mAP75": 1.0, "AR100": 1.0}


def test_coco_map_one_of_two_found_and_a_wrong_box():
    gt = [DetectionTruth(1, {"circle": [A, B]})]
    # TP at 0.9 then FP at 0.5: precision 1 up to recall 0.5 (51 of the 101 recall points), then nothing.
    result = coco_map(
        gt, [ScoredDetection(1, "circle", A, 0.9), ScoredDetection(1, "circle", FAR, 0.5)], ["circle"]
    )
    assert result["mAP50"] == pytest.approx(51 / 101)
    assert result["mAP"] == pytest.approx(51 / 101)  # the TP is exact, so every IoU threshold agrees
    assert result["AR100"] == pytest.approx(0.5)
    # The wrong box ranked first: precision 1/2 at recall 0.5.
    result = coco_map(
        gt, [ScoredDetection(1, "circle", A, 0.5), ScoredDetection(1, "circle", FAR, 0.9)], ["circle"]
    )
    assert result["mAP50"] == pytest.approx(0.5 * 51 / 101)


def test_coco_map_edge_cases():
    gt = [DetectionTruth(1, {"circle": [A]}), DetectionTruth(2, {"circle": []})]
    assert coco_map(gt, [], ["circle"])["mAP50"] == 0.0  # no predictions
    assert all(math.isnan(v) for v in coco_map([DetectionTruth(1, {"circle": []})], [], ["circle"]).values())
    # a prediction on an image without ground truth ranks above the TP: precision 1/2 everywhere
    preds = [ScoredDetection(1, "circle", A, 0.5), ScoredDetection(2, "circle", A, 0.9)]
    assert coco_map(gt, preds, ["circle"])["mAP50"] == pytest.approx(0.5)
    # a class without any ground truth is left out of the mean (COCO's rule)
    gt2 = [DetectionTruth(1, {"circle": [A], "star": []})]
    preds2 = [ScoredDetection(1, "circle", A, 0.5), ScoredDetection(1, "star", B, 0.9)]
    assert coco_map(gt2, preds2, ["circle", "star"])["mAP"] == pytest.approx(1.0)
    # a prediction inside a crowd region is ignored (neither hit nor false positive)
    crowd = [DetectionTruth(1, {"circle": [A]}, crowd={"circle": [B]})]
    preds3 = [ScoredDetection(1, "circle", A, 0.5), ScoredDetection(1, "circle", B, 0.9)]
    assert coco_map(crowd, preds3, ["circle"])["mAP50"] == pytest.approx(1.0)
    assert coco_map([DetectionTruth(1, {"circle": [A]})], preds3, ["circle"])["mAP50"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="categories"):
        coco_map(gt, [ScoredDetection(1, "dog", A, 0.5)], ["circle"])
    with pytest.raises(ValueError, match="unique"):
        coco_map([DetectionTruth(1, {}), DetectionTruth(1, {})], [], ["circle"])


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _reference_ap50(gt, preds):
    """COCO's 101-point interpolated AP at IoU 0.5 for one class, written out plainly."""
    hits = []
    for image_id, boxes in gt.items():
        free = [True] * len(boxes)
        for det in sorted((p for p in preds if p.image_id == image_id), key=lambda p: -p.score):
            candidates = [(_iou(det.box, g), j) for j, g in enumerate(boxes) if free[j]]
            best = max(candidates, default=(0.0, -1))
            if best[0] >= 0.5:
                free[best[1]] = False
            hits.append((det.score, best[0] >= 0.5))
    hits.sort(key=lambda h: -h[0])
    tp = np.cumsum([h[1] for h in hits])
    fp = np.cumsum([not h[1] for h in hits])
    npos = sum(len(b) for b in gt.values())
    recall, precision = tp / npos, tp / np.maximum(tp + fp, 1e-12)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def _random_scene(rng):
    gt = {}
    preds = []
    for image_id in range(1, 9):
        boxes = []
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 100), rng.uniform(0, 100)
            boxes.append((x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)))
        gt[image_id] = boxes
        for box in boxes:  # a noisy copy of some true boxes, plus background boxes
            if rng.random() < 0.7:
                d = [rng.gauss(0, 3) for _ in range(4)]
                shaken = (
                    box[0] + d[0],
                    box[1] + d[1],
                    max(box[2] + d[2], box[0] + d[0] + 1),
                    max(box[3] + d[3], box[1] + d[1] + 1),
                )
                preds.append(ScoredDetection(image_id, "c", shaken, rng.random()))
        for _ in range(rng.randint(0, 2)):
            x, y = rng.uniform(0, 100), rng.uniform(0, 100)
            preds.append(ScoredDetection(image_id, "c", (x, y, x + 10, y + 10), rng.random()))
    return gt, preds


@pytest.mark.parametrize("seed", range(4))
def test_coco_map_agrees_with_a_plain_reference(seed):
    gt, preds = _random_scene(random.Random(seed))
    truths = [DetectionTruth(i, {"c": boxes}) for i, boxes in gt.items()]
    assert coco_map(truths, preds, ["c"])["mAP50"] == pytest.approx(_reference_ap50(gt, preds), abs=1e-9)


def test_random_ranking_is_worse_than_a_good_ranking():
    rng = random.Random(0)
    truths, good, shuffled = [], [], []
    for image_id in range(1, 201):
        truths.append(DetectionTruth(image_id, {"c": [A]}))
        for box, quality in ((A, 1.0), (FAR, 0.0)):
            good.append(ScoredDetection(image_id, "c", box, quality + rng.random() * 0.5))
            shuffled.append(ScoredDetection(image_id, "c", box, rng.random()))
    assert coco_map(truths, good, ["c"])["mAP50"] == pytest.approx(1.0)
    assert 0.4 < coco_map(truths, shuffled, ["c"])["mAP50"] < 0.65  # precision about 1/2 at every recall


# -- metrics: the others -----------------------------------------------------------------------------
def test_simple_metrics_by_hand():
    assert counting_accuracy([3, None, 0], [3, 0, 1]) == pytest.approx(2 / 3)  # None counts as 0
    truth = (0, 0, 10, 10)
    assert rec_accuracy([(0, 0, 10, 5), (0, 0, 10, 4), None], [truth] * 3) == pytest.approx(1 / 3)
    assert normalize_answer("  Small  red\tCircle. ") == "small red circle"
    assert exact_match_accuracy(["CAT", "cat.", "a  b"], ["cat", "cats", "A B."]) == pytest.approx(2 / 3)
    assert false_positive_rate([0, 2, 1, 0]) == 0.5
    assert math.isnan(false_positive_rate([]))
    precision, recall = precision_recall([[A, B, FAR], []], [[A, B], [A]])
    assert (precision, recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # the same true box cannot be matched twice
    assert precision_recall([[A, A]], [[A]]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="one prediction per truth"):
        counting_accuracy([1], [1, 2])


# -- confidence ------------------------------------------------------------------------------------------
def test_region_token_probabilities_from_hand_made_logits():
    region_ids = [3, 4, 5]  # <region0..2>
    generated = torch.tensor([[1, 4, 5], [3, 2, 0]])  # (B=2, T=3)
    log3 = math.log(3.0)
    steps = [torch.zeros(2, 6) for _ in range(3)]
    steps[1][0, 4] = log3  # p = 3 / (5 + 3)
    steps[2][0, 5] = 100.0  # p ≈ 1
    steps[0][1, 3] = -log3  # p = (1/3) / (5 + 1/3)
    result = region_token_probabilities(generated, steps, region_ids)
    assert [(r.position, r.region_index) for r in result[0]] == [(1, 1), (2, 2)]
    assert result[0][0].probability == pytest.approx(3 / 8)
    assert result[0][1].probability == pytest.approx(1.0)
    assert [(r.position, r.region_index) for r in result[1]] == [(0, 0)]
    assert result[1][0].probability == pytest.approx((1 / 3) / (5 + 1 / 3))
    with pytest.raises(ValueError, match="3 tokens, 2 steps"):
        region_token_probabilities(generated, steps[:2], region_ids)


def test_detection_probabilities_pair_tags_with_tokens():
    text = "<ground>a</ground><objects><region1><region2></objects> and <ground>b</ground><objects><region1></objects>"
    emitted = [RegionTokenProb(3, 1, 0.9), RegionTokenProb(4, 2, 0.8), RegionTokenProb(9, 1, 0.3)]
    assert detection_probabilities(text, emitted) == {("a", 1): 0.9, ("a", 2): 0.8, ("b", 1): 0.3}
    assert detection_probabilities(text, emitted[:2]) == {
        ("a", 1): 0.9,
        ("a", 2): 0.8,
    }  # b's <region1>: none left
    assert detection_probabilities(text, None) == {}


def test_confidence_modes():
    assert detection_confidence("proposal", 0.2, 0.5) == 0.5
    assert detection_confidence("model", 0.2, 0.5) == 0.2
    assert detection_confidence("product", 0.2, 0.5) == pytest.approx(0.1)
    assert detection_confidence("proposal", 0.2, None) == 1.0  # no proposal scores: 1.0
    assert detection_confidence("product", None, 0.5) == 0.5  # no token probability: 1.0
    with pytest.raises(ValueError, match="confidence must be one of"):
        detection_confidence("mean", 0.2, 0.5)


def _detection_record(rid, classes, gt, targets, boxes, scores):
    answer = "".join(
        f"<ground>{c}</ground><objects>{''.join(f'<region{r}>' for r in targets[c])}</objects>"
        for c in classes
    )
    return ConversationRecord(
        messages=[{"role": "user", "content": "Please detect it."}, {"role": "assistant", "content": answer}],
        boxes=[list(b) for b in boxes],
        scores=scores,
        id=rid,
        task="detection",
        meta={"task": "detection", "classes": classes, "gt_boxes": gt, "target_regions": targets},
    )


def test_modes_rank_detections_differently():
    # Record 1: one circle, found.  Record 2: no circle, but the model names region 0 (a false positive).
    r1 = _detection_record("1", ["circle"], {"circle": [A]}, {"circle": [0]}, [A, B], [0.4, 0.3])
    r2 = _detection_record("2", ["circle"], {"circle": []}, {"circle": []}, [B], [0.9])
    text = "<ground>circle</ground><objects><region0></objects>"
    answers = [
        GeneratedAnswer(text, region_probs=[RegionTokenProb(4, 0, 0.9)]),
        GeneratedAnswer(text, region_probs=[RegionTokenProb(4, 0, 0.2)]),
    ]
    report = score_records([r1, r2], answers, confidence="model")
    m = report.metrics
    assert m["detection/mAP50@proposal"] == pytest.approx(0.5)  # the FP (0.9) outranks the TP (0.4)
    assert m["detection/mAP50@model"] == pytest.approx(1.0)  # 0.9 vs 0.2
    assert m["detection/mAP50@product"] == pytest.approx(1.0)  # 0.36 vs 0.18
    assert m["detection/mAP50"] == m["detection/mAP50@model"]
    assert m["detection/fp_rate"] == 1.0 and m["detection/n_negative"] == 1
    assert [p["correct"] for p in report.predictions] == [True, False]


def test_detection_negatives_are_absent_classes_only():
    # "star" has an object without a proposal: its expected answer is empty, but it is not absent.
    record = _detection_record(
        "1", ["circle", "star", "moon"], {"circle": [A], "star": [FAR], "moon": []},
        {"circle": [0], "star": [], "moon": []}, [A, B], [0.9, 0.8],
    )  # fmt: skip
    text = (
        "<ground>Circle</ground><objects><region0></objects><ground>star</ground><objects><region1></objects>"
    )
    m = score_records([record], [GeneratedAnswer(text)]).metrics
    assert m["detection/n_negative"] == 1 and m["detection/fp_rate"] == 0.0  # only "moon" is a negative
    m = score_records(
        [record], [GeneratedAnswer(text + "<ground>moon</ground><objects><region1></objects>")]
    ).metrics
    assert m["detection/fp_rate"] == 1.0
    # circle found (AP 1; "Circle" matches case-insensitively), star's box misses (AP 0), moon has no GT
    assert m["detection/mAP50"] == pytest.approx(0.5)


# -- coordinate baseline ------------------------------------------------------------------------------
def test_boxes_to_text_format_and_round_trip():
    text = boxes_to_text("circle", [(12.2, 30, 40.6, 56), (1, 2, 3, 4)])
    assert text == "<ground>circle</ground><box>12,30,41,56</box><box>1,2,3,4</box>"
    assert boxes_to_text("circle", []) == "<ground>circle</ground>"
    two = text + boxes_to_text("the small square", [(5, 6, 7, 8)])
    assert parse_box_text(two) == [
        ("circle", (12.0, 30.0, 41.0, 56.0)),
        ("circle", (1.0, 2.0, 3.0, 4.0)),
        ("the small square", (5.0, 6.0, 7.0, 8.0)),
    ]
    assert parse_box_text("<ground>circle</ground>") == []
    assert count_from_box_text("<ground>circles</ground><box>12,30,41,56</box>2") == 2
    with pytest.raises(ValueError, match="4 finite numbers"):
        boxes_to_text("circle", [(1, 2, 3)])


@pytest.mark.parametrize(
    "text",
    [
        "<ground>c</ground><box>1,2,3</box><box>1,2,3,4</box>",
        "<ground>c</ground><box>a,b,c,d</box> <box> 1 , 2 , 3 , 4 </box>",
        "<ground>c</ground><box>5,5,1,1</box><box>1,2,3,4</box>",  # inverted box skipped
        "<ground>c</ground><box>1,2,3,4</box><|im_end|><ground>d</ground><box>1,1,2,2</box>",
        "<box>9,9,9,9</box><ground>c</ground><box>1,2,3,4</box><box>1,2",
    ],
)
def test_parse_box_text_skips_malformed_parts(text):
    assert parse_box_text(text) == [("c", (1.0, 2.0, 3.0, 4.0))]


def test_parse_box_text_never_raises():
    rng = random.Random(0)
    pieces = [
        "<ground>",
        "</ground>",
        "<box>",
        "</box>",
        "1",
        ",",
        "-",
        ".",
        "x",
        " ",
        "<",
        ">",
        "99999999999999999999",
    ]
    for _ in range(300):
        parse_box_text("".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))))
    assert parse_box_text(None) == [] and parse_box_text(b"<ground>") == []


def test_to_coordinate_record(world, processor):
    root, records = world
    converted = 0
    for record in records:
        if record.meta["task"] not in COORDINATE_TASKS:
            if any(i.get("type") == "region" for m in record.prompt_messages() for i in m["content"]):
                with pytest.raises(ValueError, match="expected meta"):
                    to_coordinate_record(record)
            continue
        coords = to_coordinate_record(record)
        converted += 1
        assert coords.boxes == [] and coords.scores is None and coords.meta["format"] == "coords"
        assert coords.prompt_messages() == record.prompt_messages() and coords.id == f"{record.id}/coords"
        boxes = [box for _, box in parse_box_text(coords.target())]
        assert coords.meta.get("negative", False) == (not boxes)
        if record.meta["task"] == "referring":
            assert boxes == [tuple(float(round(v)) for v in record.meta["gt_box"])]
        elif record.meta["task"] == "counting":
            assert count_from_box_text(coords.target()) == record.meta["count"]
            assert len(boxes) == record.meta["count"]
        else:
            assert len(boxes) == sum(len(v) for v in record.meta["gt_boxes"].values())
    assert converted > 10
    sample = to_coordinate_record(records[[r.meta["task"] for r in records].index("detection")])
    batch = processor([sample.prompt_messages()], images=[sample.image_path(root)], boxes=[sample.boxes])
    assert "region_counts" not in batch  # no proposals reach the model


# -- the oracle ------------------------------------------------------------------------------------------
def _assert_perfect(metrics):
    for name, value in metrics.items():
        last = name.rsplit("/", 1)[-1]
        if last == "n" or last.startswith("n_") or (last == "fp_rate" and math.isnan(value)):
            continue  # counts; a false-positive rate without negatives is undefined
        expected = 0.0 if last in ("fp_rate", "mae") else 1.0
        assert value == pytest.approx(expected), name


def test_counting_reads_the_written_number_and_reports_the_grounded_regions_apart(world):
    _, records = world
    counted = [r for r in records if r.meta["task"] == "counting" and r.meta["count"] > 0][:2]
    assert len(counted) == 2
    wrong_number = re.sub(r"\d+$", str(counted[0].meta["count"] + 1), counted[0].target())
    no_regions = re.sub(r"<region\d+>", "", counted[1].target())  # right number, nothing grounded
    metrics = score_records(counted, [GeneratedAnswer(wrong_number), GeneratedAnswer(no_regions)]).metrics
    assert metrics["counting/accuracy"] == 0.5 and metrics["counting/accuracy_regions"] == 0.5
    assert metrics["counting/mae"] == 0.5


def test_referring_accuracy_is_reported_per_expression_form(world):
    _, records = world
    referring = [r for r in records if r.meta["task"] == "referring"]
    first = referring[0]
    other = next(r for r in referring if r.meta["form"] != first.meta["form"])
    # the first answered with no region (wrong), the other with its own target (right)
    answers = [GeneratedAnswer(re.sub(r"<region\d+>", "", first.target())), GeneratedAnswer(other.target())]
    metrics = score_records([first, other], answers).metrics
    assert metrics["referring/acc50"] == 0.5
    assert metrics[f"referring/acc50_{first.meta['form']}"] == 0.0
    assert metrics[f"referring/acc50_{other.meta['form']}"] == 1.0
    plain = [
        dataclasses.replace(r, meta={k: v for k, v in r.meta.items() if k != "form"}) for r in (first, other)
    ]
    assert not [k for k in score_records(plain, answers).metrics if k.startswith("referring/acc50_")]


def test_oracle_answers_score_perfectly(world):
    _, records = world
    report = score_records(records, [GeneratedAnswer(r.target()) for r in records])
    metrics = report.metrics
    for name in ("detection/fp_rate", "counting/fp_rate", "find_similar/fp_rate"):
        assert not math.isnan(metrics[name]), f"the world sample needs negatives for {name}"
    assert metrics["errors/n"] == 0
    _assert_perfect(metrics)
    assert all(p["correct"] for p in report.predictions)
    coords = [to_coordinate_record(r) for r in records if r.meta["task"] in COORDINATE_TASKS]
    coords_metrics = score_records(coords, [GeneratedAnswer(r.target()) for r in coords]).metrics
    assert coords_metrics["coords/detection/mAP"] == 1.0
    _assert_perfect(coords_metrics)


def test_random_choice_map_is_a_floor(world):
    _, records = world
    value = random_choice_map(records)
    assert 0.0 < value < 1.0
    assert random_choice_map(records) == value  # seeded
    assert math.isnan(random_choice_map([r for r in records if r.meta["task"] == "vqa"]))
    detection = [r for r in records if r.meta["task"] in ("detection", "multi_detection")]
    nothing = {r.id: {} for r in detection}
    assert random_choice_map(detection, counts=nothing) == 0.0  # names nothing: finds nothing
    true_counts = {r.id: {c: len(b) for c, b in r.meta["gt_boxes"].items()} for r in detection}
    assert random_choice_map(detection, counts=true_counts) == random_choice_map(detection)
    scores = score_records(detection, [GeneratedAnswer(r.target()) for r in detection])
    named = {i: {c: n for c, n in groups.items() if n} for i, groups in picked_counts(scores).items()}
    assert named == {
        r.id: {c: len(regions) for c, regions in r.meta["target_regions"].items() if regions}
        for r in detection
    }


# -- the runner ------------------------------------------------------------------------------------------
def test_evaluate_end_to_end_on_a_tiny_model(world, small_set, model, processor, tmp_path):
    root, _ = world
    broken = copy.deepcopy(small_set[0])
    broken.id, broken.image = "broken", "images/no-such-file.png"
    no_truth = copy.deepcopy(small_set[0])
    no_truth.id, no_truth.meta = "no-truth", {"task": "detection"}
    coords = to_coordinate_record(small_set[0])
    records = [*small_set, broken, no_truth, coords]
    report = evaluate(model, processor, records, root, batch_size=8, max_new_tokens=4, progress=False)
    m = report.metrics
    for name in (
        "detection/mAP", "detection/mAP50", "detection/mAP@proposal", "detection/mAP@model", "detection/mAP@product",
        "detection/fp_rate", "counting/accuracy", "referring/acc50", "region_caption/accuracy",
        "region_ocr/accuracy", "vqa/accuracy", "caption/accuracy", "find_similar/precision",
        "find_similar/recall", "coords/detection/mAP",
    ):  # fmt: skip
        assert name in m, name
    assert {e["id"]: e["stage"] for e in report.errors} == {"broken": "generation", "no-truth": "scoring"}
    assert m["errors/n"] == 2
    assert len(report.predictions) == len(records) - 2
    assert sum(v for k, v in m.items() if k.endswith("/n") and k != "errors/n") == len(records) - 2
    assert [p["id"] for p in report.predictions] == [
        r.id for r in records if r.id not in ("broken", "no-truth")
    ]
    assert all(
        isinstance(p["text"], str) and set(p) >= {"task", "parsed", "correct"} for p in report.predictions
    )
    path = report.write(tmp_path / "out" / "report.json")
    data = json.loads(path.read_text())
    assert data["metrics"].keys() == m.keys() and data["settings"]["confidence"] == "product"
    assert list(tmp_path.joinpath("out").iterdir()) == [path]  # no temporary file left behind
    assert "detection/mAP" in report.table() and len(report.table().splitlines()) == len(m) + 2


class ScriptedModel(nn.Module):
    """Stands in for FO1 in ``generate``: emits given token rows, each token with logit 2 (others 0)."""

    def __init__(self, rows, vocab_size):
        super().__init__()
        self.rows, self.vocab_size = rows, vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, **kwargs):
        assert kwargs["output_logits"] and kwargs["return_dict_in_generate"] and not kwargs["do_sample"]
        width = max(len(r) for r in self.rows)
        new = torch.zeros(len(self.rows), width, dtype=torch.long)
        for i, row in enumerate(self.rows):
            new[i, : len(row)] = torch.tensor(row)
        logits = tuple(
            torch.zeros(len(self.rows), self.vocab_size).scatter(1, new[:, t : t + 1], 2.0)
            for t in range(width)
        )
        return type(
            "Out", (), {"sequences": torch.cat([input_ids, new], 1), "logits": logits, "scores": None}
        )()


def test_generate_answers_carries_text_boxes_and_probabilities(world, small_set, processor):
    root, _ = world
    records = small_set[:6]
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids(IM_END)
    rows = [tokenizer(r.target(), add_special_tokens=False)["input_ids"] + [end] for r in records]
    model = ScriptedModel(rows, len(tokenizer))
    answers = generate_answers(model, processor, records, root, max_new_tokens=64)
    p = math.exp(2) / (math.exp(2) + len(tokenizer) - 1)
    for record, answer in zip(records, answers, strict=True):
        assert answer.text == record.target()
        np.testing.assert_allclose(answer.boxes, record.boxes, rtol=0, atol=1e-4)
        assert [r.region_index for r in answer.region_probs] == [int(t) for t in _regions(record.target())]
        assert all(r.probability == pytest.approx(p) for r in answer.region_probs)
    _assert_perfect(score_records(records, answers).metrics)


def _regions(text):
    return re.findall(r"<region(\d+)>", text)


def test_run_eval_loads_evaluates_and_writes(world, model, processor, tmp_path):
    root, _ = world
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    report = run_eval(
        tmp_path / "ckpt", root / "val.jsonl", out, batch_size=2, max_new_tokens=4, limit=3, device="cpu",
        confidence="proposal", progress=False,
    )  # fmt: skip
    data = json.loads(out.read_text())
    assert data["settings"]["records"] == 3 and data["settings"]["confidence"] == "proposal"
    assert len(report.predictions) + len(report.errors) == 3
    with pytest.raises(ValueError, match="confidence must be one of"):
        run_eval(tmp_path / "ckpt", root / "val.jsonl", out, confidence="best", progress=False)
    from vlm_fo1.cli import main

    command = ["eval", str(tmp_path / "ckpt"), str(root / "val.jsonl"), "--out", str(out), "--limit", "2"]
    assert main([*command, "--max-new-tokens", "4", "--suppress-overlap", "0.5", "--no-progress"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["constrained"] is True and settings["suppress_overlap"] == 0.5  # implies --constrained
    assert main([*command, "--suppress-overlap", "2", "--no-progress"]) == 2  # a one-line error
    assert main([*command, "--max-new-tokens", "4", "--close-bias", "1.5", "--no-progress"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["constrained"] is True and settings["close_bias"] == 1.5  # implies --constrained
    assert main([*command, "--close-bias", "nan", "--no-progress"]) == 2
    assert main([*command, "--max-new-tokens", "4", "--unique-labels", "--no-progress"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["constrained"] is True and settings["unique_labels"] is True  # implies --constrained
    assert main([*command, "--max-new-tokens", "4", "--count-from-list", "--no-progress"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["constrained"] is True and settings["count_from_list"] is True  # implies --constrained
    assert main([*command, "--max-new-tokens", "4", "--constrained", "--per-class", "--no-progress"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["per_class"] is True and settings["constrained"] is True


def test_constrained_evaluation_names_only_asked_labels_and_existing_regions(world, model, processor):
    root, records = world
    chosen = [r for r in records if query_labels(r) is not None][:12]
    assert {r.meta["task"] for r in chosen} >= {"detection", "counting", "referring"}
    report = evaluate(
        model, processor, chosen, root, batch_size=8, max_new_tokens=24, constrained=True, progress=False
    )
    assert report.settings["constrained"] is True and not report.errors
    by_id = {r.id: r for r in chosen}
    for prediction in report.predictions:
        record = by_id[prediction["id"]]
        labels = re.findall(r"<ground>(.*?)</ground>", prediction["text"])
        assert set(labels) <= set(query_labels(record)), (labels, query_labels(record))
        assert all(int(i) < len(record.boxes) for i in _regions(prediction["text"]))
    # Records asking about different things share a batch; each row keeps its own labels.
    mixed = [r for r in chosen if r.meta["task"] == "referring"][:2]
    assert len({query_labels(r) for r in mixed}) == 2
    together = generate_answers(model, processor, mixed, root, max_new_tokens=24, constrained=True)
    alone = [
        generate_answers(model, processor, [r], root, max_new_tokens=24, constrained=True)[0] for r in mixed
    ]
    for record, answer, single in zip(mixed, together, alone, strict=True):
        labels = re.findall(r"<ground>(.*?)</ground>", answer.text)
        assert set(labels) <= set(query_labels(record)) and answer.text == single.text


@contextlib.contextmanager
def _grounding_bias(model, processor, close: float):
    """The model's logits biased to open a segment at once (grounding tags +30), then to weigh
    each region at +20 against ``</objects>`` at ``close``."""
    from vlm_fo1.prompting import tokens as T

    ids = processor.tokenizer.convert_tokens_to_ids
    bias = torch.zeros(model.config.text_config.vocab_size)
    bias[[ids(T.GROUND_OPEN), ids(T.GROUND_CLOSE)]] = 30.0
    bias[processor.region_token_ids] = 20.0
    bias[ids(T.OBJECTS_CLOSE)] = close
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
    try:
        yield
    finally:
        hook.remove()


def _decode_with(model, processor, records, root, *, close, max_new_tokens, **option):
    """Under ``_grounding_bias(close=...)``: the constrained answers without and with the decoder
    ``option``, and the evaluation report with it."""
    with _grounding_bias(model, processor, close=close):
        plain = generate_answers(
            model, processor, records, root, max_new_tokens=max_new_tokens, constrained=True
        )
        changed = generate_answers(
            model, processor, records, root, max_new_tokens=max_new_tokens, constrained=True, **option
        )
        report = evaluate(
            model, processor, records, root, max_new_tokens=max_new_tokens, constrained=True,
            progress=False, **option,
        )  # fmt: skip
    return plain, changed, report


def test_stop_by_mass_only_lengthens_region_lists(world, model, processor):
    """Where greedy closes, the totals may go on; they never close earlier, and a region they add
    is the one greedy ranks first, so each greedy list is a prefix of the stop-by-mass list (the
    first group of each answer is compared: what follows it starts from different prefixes)."""
    root, records = world
    chosen = [r for r in records if r.meta["task"] in ("detection", "counting") and len(r.boxes) > 6][:6]
    assert chosen
    # A model that opens a segment at once and then prefers </objects> to any single region, but
    # not to six of them together (e^1.5 < 6): greedy names nothing, the totals go on.
    plain, mass, report = _decode_with(
        model, processor, chosen, root, close=21.5, max_new_tokens=40, stop_by_mass=True
    )
    lengthened = 0
    for a, b in zip(plain, mass, strict=True):
        first, second = (_regions(t.split("</objects>")[0]) for t in (a.text, b.text))
        assert second[: len(first)] == first, (a.text, b.text)
        lengthened += len(second) > len(first)
    assert lengthened == len(chosen), [b.text for b in mass]
    assert report.settings["stop_by_mass"] is True


def test_suppress_overlap_names_each_group_of_overlapping_boxes_once(world, model, processor):
    """A model that names every box it is offered: with ``suppress_overlap`` the first group holds
    no two boxes overlapping by more than the threshold, and every box left out overlaps one named."""
    from vlm_fo1.boxes import box_iou

    root, records = world
    chosen = [r for r in records if r.meta["task"] == "detection" and len(r.boxes) > 6][:4]
    assert chosen
    plain, kept, report = _decode_with(
        model, processor, chosen, root, close=10.0, max_new_tokens=60, suppress_overlap=0.3
    )
    overlapping = 0
    for record, a, b in zip(chosen, plain, kept, strict=True):
        everything, named = ([int(i) for i in _regions(t.text.split("</objects>")[0])] for t in (a, b))
        assert sorted(everything) == list(range(len(record.boxes)))  # without it: every box
        iou = box_iou(record.boxes, record.boxes)
        assert all(iou[i, j] <= 0.3 for i in named for j in named if i != j), b.text
        left_out = set(everything) - set(named)
        assert all(max(iou[i, j] for j in named) > 0.3 for i in left_out), b.text
        overlapping += bool(left_out)
    assert overlapping, "no record had overlapping boxes to suppress"
    assert report.settings["suppress_overlap"] == 0.3


def test_close_bias_trades_regions_for_closing(world, model, processor):
    """A model that names every region before closing (regions +20, ``</objects>`` +17): with
    ``close_bias=6`` the close (+23) wins at once, every group is empty, and the detection
    scorer sees no false positive."""
    root, records = world
    chosen = [r for r in records if r.meta["task"] == "detection" and r.boxes][:4]
    assert chosen
    plain, biased, report = _decode_with(
        model, processor, chosen, root, close=17.0, max_new_tokens=40, close_bias=6.0
    )
    assert all(_regions(a.text.split("</objects>")[0]) for a in plain), [a.text for a in plain]
    assert all(not _regions(b.text) for b in biased), [b.text for b in biased]
    assert report.settings["close_bias"] == 6.0
    assert report.metrics.get("detection/fp_rate", 0.0) == 0.0
    with pytest.raises(ValueError, match="close_bias must be a finite number"):
        evaluate(model, processor, chosen, root, close_bias=float("nan"), progress=False)


def test_unique_labels_ground_each_asked_class_once(world, model, processor):
    """A model that opens a new segment after every one: plain constrained decoding repeats the
    asked labels until the budget ends; with ``unique_labels`` each asked label is grounded once."""
    root, records = world
    chosen = [r for r in records if r.meta["task"] in ("detection", "multi_detection")][:4]
    assert chosen
    plain, unique, report = _decode_with(
        model, processor, chosen, root, close=25.0, max_new_tokens=48, unique_labels=True
    )
    for record, a, b in zip(chosen, plain, unique, strict=True):
        asked = set(record.meta["classes"])
        repeated, labels = (re.findall(r"<ground>(.*?)</ground>", t.text) for t in (a, b))
        assert len(repeated) > len(set(repeated)), a.text  # without it: labels again and again
        assert labels and len(labels) == len(set(labels)) and set(labels) <= asked, b.text
    assert report.settings["unique_labels"] is True


def test_count_from_list_writes_the_length_of_the_list(world, model, processor):
    """A model that names every region, then, right after ``</objects>``, prefers "9" to any other
    digit and a digit to anything else: plain constrained decoding writes 9 whatever it listed;
    with ``count_from_list`` the number is the count of the regions it named."""
    from vlm_fo1.prompting import tokens as T

    root, records = world
    chosen = [r for r in records if r.meta["task"] == "counting" and r.boxes][:4]
    assert chosen
    ids = processor.tokenizer.convert_tokens_to_ids
    digits = torch.zeros(model.config.text_config.vocab_size)
    digits[[ids(str(d)) for d in range(10)]] = 40.0
    digits[ids("9")] = 41.0
    with bias_after_token(model, ids(T.OBJECTS_CLOSE), digits):
        plain, counted, report = _decode_with(
            model, processor, chosen, root, close=17.0, max_new_tokens=40, count_from_list=True
        )
    for a, b in zip(plain, counted, strict=True):
        assert a.text.split("</objects>")[1].startswith("9"), a.text
        listed, after = b.text.split("</objects>")[:2]
        count = str(len(set(_regions(listed))))
        assert after.startswith(count) and not after[len(count) :][:1].isdigit(), b.text
    assert report.settings["count_from_list"] is True


def test_per_class_records_ask_each_class_of_a_multi_class_question_alone(world):
    _, records = world
    multi = [r for r in records if r.meta["task"] == "multi_detection" and r.boxes][:3]
    others = [r for r in records if r.meta["task"] in ("detection", "counting", "region_ocr")][:3]
    assert multi and others and all(len(r.meta["classes"]) > 1 for r in multi)
    asked, owners = per_class_records(multi + others)
    assert [len(own) for own in owners] == [len(r.meta["classes"]) for r in multi] + [1] * len(others)
    assert sorted(j for own in owners for j in own) == list(range(len(asked)))
    for record, own in zip(multi, owners, strict=False):
        for label, j in zip(record.meta["classes"], own, strict=True):
            single = asked[j]
            assert single.messages == [{"role": "user", "content": P.detect(label).content()}]
            assert single.meta["classes"] == [label] and single.task == "detection"
            assert (single.image, single.boxes, single.scores, single.id) == (
                record.image,
                record.boxes,
                record.scores,
                record.id,
            )
            assert single.meta["gt_boxes"] == record.meta["gt_boxes"]  # scored against the record's truth
    assert [asked[own[0]] for own in owners[len(multi) :]] == others  # the rest as they were
    system = {"role": "system", "content": "You are a careful detector."}
    with_system = dataclasses.replace(multi[0], messages=[system, *multi[0].messages])
    first = per_class_records([with_system])[0][0]
    assert first.messages == [
        system,
        {"role": "user", "content": P.detect(multi[0].meta["classes"][0]).content()},
    ]


def test_merge_answers_joins_in_class_order_and_fails_with_any_part():
    first = GeneratedAnswer(
        "<ground>a</ground><objects><region1></objects>", None, [RegionTokenProb(4, 1, 0.5)]
    )
    second = GeneratedAnswer("<ground>b</ground><objects></objects>", None, None)
    third = GeneratedAnswer(
        "<ground>c</ground><objects><region0></objects>", None, [RegionTokenProb(4, 0, 0.25)]
    )
    merged = merge_answers([first, second, third])
    assert merged.text == first.text + second.text + third.text
    assert [p.region_index for p in merged.region_probs] == [1, 0]
    assert detection_probabilities(merged.text, merged.region_probs) == {("a", 1): 0.5, ("c", 0): 0.25}
    assert merge_answers([first]) is first and merge_answers([first, None]) is None


def test_per_class_evaluation_joins_the_single_class_answers(world, model, processor):
    """Each class of a multi-class record is answered as its own single-class question would be
    (the model opens segments at once and names regions before closing), and the record's answer
    is those answers in class order."""
    root, records = world
    multi = [r for r in records if r.meta["task"] == "multi_detection" and r.boxes][:3]
    assert multi
    asked, owners = per_class_records(multi)
    with _grounding_bias(model, processor, close=19.0):
        alone = generate_answers(model, processor, asked, root, max_new_tokens=48, constrained=True)
        report = evaluate(
            model, processor, multi, root, max_new_tokens=48, constrained=True, per_class=True, progress=False
        )
        joint = evaluate(model, processor, multi, root, max_new_tokens=48, constrained=True, progress=False)
    assert report.settings["per_class"] is True and not report.errors
    for record, prediction, own in zip(multi, report.predictions, owners, strict=True):
        assert prediction["id"] == record.id
        assert prediction["text"] == "".join(alone[j].text for j in own)
        labels = re.findall(r"<ground>(.*?)</ground>", prediction["text"])  # the bias re-opens segments
        assert [label for label, _ in itertools.groupby(labels)] == record.meta["classes"]
    assert [p["text"] for p in joint.predictions] != [p["text"] for p in report.predictions]


# -- ranked retrieval -------------------------------------------------------------------------------------
def test_label_reading_compares_the_asked_and_a_swapped_label(world, model, processor):
    from vlm_fo1.ranking import label_reading, rank_regions

    root, records = world
    eligible = [
        r for r in records
        if r.meta["task"] == "detection" and not r.meta.get("negative") and len(r.meta["classes"]) == 1
        and r.meta["target_regions"][r.meta["classes"][0]] and len(r.boxes) > 1
    ][:3]  # fmt: skip
    assert eligible
    classes = ["circle", "square", "triangle", "star", "diamond", "hexagon", "word"]
    with torch.no_grad():
        result = label_reading(model, processor, eligible, root, classes)
        expected = []
        for r in eligible:
            label = r.meta["classes"][0]
            truth = r.meta["target_regions"][label]
            conversation = [{"role": "user", "content": P.detect(label)}]
            ranks = rank_regions(model, processor, conversation, r.image_path(root), r.boxes, [label])[label]
            expected.append(sum(ranks[i] for i in truth) / sum(ranks))
    assert result.questions == len(eligible)
    assert result.asked == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert 0.0 < result.swapped < 1.0
    truth_share = [len(r.meta["target_regions"][r.meta["classes"][0]]) / len(r.boxes) for r in eligible]
    assert result.uniform == pytest.approx(sum(truth_share) / len(eligible))
    with pytest.raises(ValueError, match="at least two classes"):
        label_reading(model, processor, eligible, root, ["circle"])
    with pytest.raises(ValueError, match="no positive single-class detection record"):
        label_reading(model, processor, [], root, classes)


def test_rank_regions_matches_the_teacher_forced_answer(world, model, processor):
    """The ranking equals the next-token distribution the model gives inside a whole answer
    encoded the training way (the assistant turn in the conversation, right padding)."""
    from vlm_fo1.prompting.tokens import region_token
    from vlm_fo1.ranking import rank_regions

    root, records = world
    record = next(r for r in records if r.meta["task"] == "detection" and len(r.boxes) > 2)
    label = record.meta["classes"][0]
    ranked = rank_regions(
        model, processor, record.prompt_messages(), record.image_path(root), record.boxes, [label, "circle"]
    )
    assert set(ranked) == {label, "circle"} and all(len(v) == len(record.boxes) for v in ranked.values())
    answer = f"<ground>{label}</ground><objects>{region_token(0)}</objects>"
    conversation = [*record.prompt_messages(), {"role": "assistant", "content": answer}]
    batch = processor([conversation], images=[record.image_path(root)], boxes=[record.boxes])
    position = int((batch["input_ids"][0] == processor.region_token_ids[0]).nonzero()[-1])
    with torch.no_grad():
        logits = model(**batch).logits[0, position - 1].float()
    expected = logits.softmax(-1)[processor.region_token_ids[: len(record.boxes)]]
    torch.testing.assert_close(torch.tensor(ranked[label]), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="special tokens"):
        rank_regions(
            model, processor, record.prompt_messages(), record.image_path(root), record.boxes, ["<region1>"]
        )
    with pytest.raises(ValueError, match="at least one candidate box"):
        rank_regions(model, processor, record.prompt_messages(), record.image_path(root), [], [label])


def test_ranked_evaluation_reports_the_ranking_map(world, model, processor):
    from vlm_fo1.evaluation import proposal_ranking_map

    root, records = world
    detection = [r for r in records if r.meta["task"] in ("detection", "multi_detection")][:10]
    report = evaluate(
        model, processor, detection, root, max_new_tokens=8, constrained=True, ranked=True, progress=False
    )
    metrics = report.metrics
    assert report.settings["ranked"] is True and not report.errors
    for name in ("mAP@ranked", "mAP50@ranked", "mAP50@ranked_product"):
        assert 0.0 <= metrics[f"detection/{name}"] <= 1.0
    plain = evaluate(model, processor, detection, root, max_new_tokens=8, constrained=True, progress=False)
    assert "detection/mAP50@ranked" not in plain.metrics
    assert plain.metrics["detection/mAP50"] == metrics["detection/mAP50"]  # generation is unchanged
    # Perfect rankers: every target region first, scored 1 (every other region 0), reach mAP 1
    # wherever each object has a proposal; the proposal-score ranking is lower.
    answers = [
        GeneratedAnswer(
            r.target(),
            ranked={
                c: [1.0 if n in r.meta["target_regions"][c] else 0.0 for n in range(len(r.boxes))]
                for c in r.meta["classes"]
            },
        )
        for r in detection
    ]
    perfect = score_records(detection, answers).metrics
    assert perfect["detection/mAP50@ranked"] == perfect["detection/mAP50"]
    assert proposal_ranking_map(detection) < perfect["detection/mAP50@ranked"]


def test_rank_queries_in_one_batch_equal_one_rank_regions_call_each(world, model, processor):
    from vlm_fo1.ranking import RankQuery, rank_queries, rank_regions

    root, records = world
    chosen = [r for r in records if r.meta["task"] in ("detection", "multi_detection") and r.boxes][:5]
    assert len({len(r.boxes) for r in chosen}) > 1  # rows of different lengths share the batch
    queries = [
        RankQuery(r.prompt_messages(), r.image_path(root), r.boxes, [*r.meta["classes"], "word"])
        for r in chosen
    ]
    batched = rank_queries(model, processor, queries)
    for query, got in zip(queries, batched, strict=True):
        expected = rank_regions(model, processor, query.conversation, query.image, query.boxes, query.labels)
        assert set(got) == set(expected)
        for label, values in expected.items():
            torch.testing.assert_close(torch.tensor(got[label]), torch.tensor(values), rtol=1e-4, atol=1e-6)
    assert rank_queries(model, processor, []) == []
    with pytest.raises(ValueError, match="at least one candidate box"):
        rank_queries(model, processor, [RankQuery(queries[0].conversation, queries[0].image, [], ["circle"])])
    with pytest.raises(ValueError, match="special tokens"):
        rank_queries(
            model,
            processor,
            [RankQuery(*[getattr(queries[0], f) for f in ("conversation", "image", "boxes")], ["<region1>"])],
        )
