"""Data: the release's processed evaluation files, proposal sources and the COCO converter."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlm_fo1.boxes import box_iou
from vlm_fo1.data.coco import coco_eval_records, coco_to_records, convert_coco, read_coco
from vlm_fo1.data.proposal_sources import ImageProposals, load_proposals, select_proposals
from vlm_fo1.data.records import ConversationRecord, read_records, write_records
from vlm_fo1.prompting import templates as T
from vlm_fo1.prompting.tokens import IM_END
from vlm_fo1.testing import TINY_MAX_REGIONS, tiny_processor

SEGMENT = re.compile(r"<ground>(.*?)</ground><objects>((?:<region\d+>)*)</objects>")


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _user_text(record: ConversationRecord) -> str:
    return "".join(
        item["text"] if item["type"] == "text" else f"<region{item['index']}>"
        for item in record.prompt_messages()[0]["content"]
    )


# -- the release's processed files (official-release.md §7) -------------------------------------------

COCO_QUERY = "Please detect person; bicycle; car in the image and return the object indexes."
COCO_LINES = [
    {
        "id": 397133,
        "image": "000000397133.jpg",
        "conversations": [{"from": "human", "value": COCO_QUERY}, {"from": "gpt", "value": ""}],
        "bbox_list": [[57, 288, 134, 327], [382, 0, 640, 425], [0, 262, 62, 299]],
        "score_list": [0.8, 0.54, 0.37],
    },
    {
        "id": 37777,
        "image": "000000037777.jpg",
        "conversations": [{"from": "human", "value": "<image>\n" + COCO_QUERY}, {"from": "gpt", "value": ""}],
        "bbox_list": [[1, 2, 30, 40]],
        "score_list": [0.91],
    },
]
COUNT_QUESTION = (
    "How many headsets are there in the image? Count each instance of the target object. "
    "Locate them with object indexes and then answer the question with the number of objects."
)


def test_reads_the_release_coco_jsonl(tmp_path: Path) -> None:
    records = list(read_records(_write_jsonl(tmp_path / "coco_upn_0.3_0.8.jsonl", COCO_LINES)))
    assert [r.id for r in records] == [397133, 37777]
    first, second = records
    assert first.image == "000000397133.jpg" and first.task == "detection"
    assert first.boxes == [[57.0, 288.0, 134.0, 327.0], [382.0, 0.0, 640.0, 425.0], [0.0, 262.0, 62.0, 299.0]]
    assert first.scores == [0.8, 0.54, 0.37]
    assert [m["role"] for m in first.messages] == ["user"]  # the empty gpt slot is dropped
    assert first.target() == ""
    assert _user_text(first) == COCO_QUERY == T.coco_detect(["person", "bicycle", "car"]).text
    assert _user_text(second) == COCO_QUERY  # a leading "<image>\n" placeholder is dropped


def test_reads_the_countbench_list(tmp_path: Path) -> None:
    items = [
        {"question": COUNT_QUESTION, "answer": 10, "image": "image_0.jpg", "bboxes": [[0, 0, 5, 5]] * 3,
         "scores": [0.9, 0.5, 0.31]},
        {"question": "How many?", "answer": 2, "image": "image_1.jpg", "bboxes": [[1, 1, 4, 4], [2, 2, 8, 9]],
         "scores": [0.4, 0.35]},
    ]  # fmt: skip
    path = tmp_path / "countbench_with_upn_score_0.3_0.8.json"
    path.write_text("\n  " + json.dumps(items), encoding="utf-8")  # leading blanks: still a list
    records = list(read_records(path))
    assert [r.id for r in records] == [0, 1]
    assert [r.meta["answer"] for r in records] == [10, 2]
    assert all(r.task == "counting" and r.target() == "" for r in records)
    assert records[0].scores == [0.9, 0.5, 0.31] and len(records[0].boxes) == 3
    assert records[1].boxes == [[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 8.0, 9.0]]
    assert _user_text(records[0]) == COUNT_QUESTION == T.count_benchmark("headsets").text


def test_reads_the_pixmo_count_list_without_scores(tmp_path: Path) -> None:
    items = [{"question": COUNT_QUESTION.replace("headsets", "people"), "answer": 5, "image": "00000-0.jpg",
              "bboxes": [[0, 0, 10, 10], [5, 5, 20, 20]]}]  # fmt: skip
    path = tmp_path / "pixmoCount_with_upn_score_0.3_0.8.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    (record,) = read_records(path)
    assert record.scores is None and record.meta == {"answer": 5} and record.image == "00000-0.jpg"
    assert len(record.boxes) == 2


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"messages": []}', "{not json"], r":2: not a conversation record"),
        (['{"image": "a.jpg"}'], r":1: not a conversation record: missing key 'messages'"),
        (['{"messages": []}', "", "5"], r":3: .*expected a JSON object"),
        (
            [json.dumps(COCO_LINES[0] | {"score_list": [0.5]})],
            r":1: .*1 scores for 3 boxes",
        ),
        (
            [json.dumps(COCO_LINES[0] | {"conversations": [{"from": "robot", "value": "hi"}]})],
            r":1: .*'robot'",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + match):
        list(read_records(path))


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ('[{"question": "q", "answer": 2}, {"answer": 3}]', r": item 1: .*missing key 'question'"),
        ('[{"question": "q", "answer": "many"}]', r": item 0: not a counting item"),
        ('[{"question": "q", "answer": 2, "bboxes": [[0, 0, 1, 1]], "scores": []}]', r": item 0: .*0 scores"),
        ('["q"]', r": item 0: .*expected a JSON object"),
        ("[{", r": not a JSON list"),
    ],
)
def test_malformed_count_list_names_file_and_item(tmp_path: Path, items: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(items, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(str(path)) + match):
        list(read_records(path))


# -- proposal sources ----------------------------------------------------------------------------------


def test_load_proposals_from_the_release_jsonl_results_and_dict(tmp_path: Path) -> None:
    release = load_proposals(_write_jsonl(tmp_path / "coco.jsonl", COCO_LINES))
    assert release[397133] is release["000000397133.jpg"]  # filed by id and by file name
    assert release[397133].boxes[0] == [57.0, 288.0, 134.0, 327.0] and release[37777].scores == [0.91]

    results = [
        {"image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40], "score": 0.5},
        {"image_id": 8, "category_id": 3, "bbox": [0.5, 0, 1, 2], "score": 0.9},
        {"image_id": 7, "category_id": 2, "bbox": [1, 1, 2, 2], "score": 0.7},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    for loaded in (load_proposals(path), load_proposals(results)):
        assert loaded[7] == ImageProposals([[10.0, 20.0, 40.0, 60.0], [1.0, 1.0, 3.0, 3.0]], [0.5, 0.7])
        assert loaded[8] == ImageProposals([[0.5, 0.0, 1.5, 2.0]], [0.9])

    mapping = load_proposals({"7": ([[0, 0, 4, 4]], [0.3]), 8: ImageProposals([], [])})
    assert mapping[7] == ImageProposals([[0.0, 0.0, 4.0, 4.0]], [0.3]) and mapping[8].boxes == []


def test_load_proposals_rejects_malformed_sources(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [COCO_LINES[0], {"id": 5, "bbox_list": [[0, 0, 1, 1]]}])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":2: .*score_list"):
        load_proposals(path)
    path = _write_jsonl(tmp_path / "dup.jsonl", [COCO_LINES[1], COCO_LINES[1]])
    with pytest.raises(ValueError, match=r":2: proposals for image .* twice"):
        load_proposals(path)
    with pytest.raises(ValueError, match=r"result 1: expected image_id"):
        load_proposals(
            [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 1}, {"image_id": 1, "bbox": [0, 0, 1]}]
        )
    with pytest.raises(ValueError, match=r"image 3: .*1 scores for 2 boxes"):
        load_proposals({3: ([[0, 0, 1, 1], [0, 0, 2, 2]], [0.1])})
    with pytest.raises(ValueError, match=r"box 0: expected 4 numbers"):
        load_proposals({3: ([[0, 0, 1]], [0.1])})


def test_select_proposals_sorts_thresholds_suppresses_and_caps() -> None:
    proposals = ImageProposals(
        boxes=[[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 11], [20, 20, 30, 30], [-5, -5, 200, 8], [105, 5, 130, 9]],
        scores=[0.4, 0.9, 0.8, 0.4, 0.2, 0.6],
    )  # fmt: skip
    everything = select_proposals(proposals)
    assert everything.scores == [0.9, 0.8, 0.6, 0.4, 0.4, 0.2]  # stable for ties: box 0 before box 3
    assert everything.boxes[3] == [0, 0, 10, 10] and everything.boxes[4] == [20, 20, 30, 30]
    assert select_proposals(proposals, max_regions=2).boxes == [[50, 50, 60, 60], [0, 0, 10, 11]]
    assert select_proposals(proposals, score_threshold=0.6).scores == [0.9, 0.8, 0.6]
    suppressed = select_proposals(proposals, nms_iou=0.5)  # box 0 overlaps the better box 2 at IoU 0.91
    assert [0, 0, 10, 10] not in suppressed.boxes and suppressed.scores == [0.9, 0.8, 0.6, 0.4, 0.2]
    clipped = select_proposals(proposals, image_size=(100, 80))
    assert [0.0, 0.0, 100, 8] in clipped.boxes  # box 4 clipped to the image
    assert len(clipped.boxes) == 5  # box 5 lies right of x=100: no area left, dropped
    with pytest.raises(ValueError, match=r"max_regions must be an int >= 1, got 0"):
        select_proposals(proposals, max_regions=0)


# -- the COCO converter: a tiny hand-written data set -------------------------------------------------

TINY_COCO: dict[str, Any] = {
    "images": [
        {"id": 1, "file_name": "000001.jpg", "width": 100, "height": 80},
        {"id": 2, "file_name": "000002.jpg", "width": 60, "height": 60},
        {"id": 3, "file_name": "000003.jpg", "width": 50, "height": 50},
    ],
    "categories": [{"id": 5, "name": "traffic light"}, {"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    "annotations": [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [50.5, 10, 20, 20], "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [80, 60, 10, 10], "iscrowd": 0},  # no proposal
        {"id": 13, "image_id": 1, "category_id": 2, "bbox": [0, 40, 30, 30], "iscrowd": 1},
        {"id": 14, "image_id": 2, "category_id": 5, "bbox": [5, 5, 10, 30], "iscrowd": 0},
        {"id": 15, "image_id": 3, "category_id": 2, "bbox": [5, 5, 10, 30], "iscrowd": 0},
    ],
}
# Sorted by score, image 1 lists: 0 = cat #11, 1 = cat #10, 2 = a distractor; image 3 has no proposals.
TINY_PROPOSALS = {
    1: ([[10, 10, 30, 30], [0, 0, 5, 5], [50.5, 10, 70.5, 30]], [0.8, 0.3, 0.9]),
    2: ([[5, 5, 15, 35], [30, 30, 50, 50]], [0.5, 0.7]),
}


def _by_query(records: list[ConversationRecord]) -> dict[tuple[Any, str, str], ConversationRecord]:
    return {(r.meta["image_id"], r.meta["task"], ", ".join(r.meta["classes"])): r for r in records}


def test_tiny_coco_positive_answers_exactly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vlm_fo1.data.coco"):
        records = coco_to_records(TINY_COCO, TINY_PROPOSALS, negative_ratio=0.0, image_dir_prefix="val2017/")
    assert "skipped 1 of 3 images without proposals" in caplog.text
    found = _by_query(records)
    assert set(found) == {
        (1, "detection", "cat"),
        (1, "counting", "cat"),
        (2, "detection", "traffic light"),
        (2, "counting", "traffic light"),
    }  # the crowd-only dog of image 1 is asked neither as a positive nor as a negative
    cat = found[1, "detection", "cat"]
    assert cat.target() == "<ground>cat</ground><objects><region0><region1></objects>"
    assert cat.boxes == [[50.5, 10.0, 70.5, 30.0], [10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]]
    assert cat.scores == [0.9, 0.8, 0.3]
    assert cat.image == "val2017/000001.jpg" and cat.task == "detection" and cat.id == "1/detection-0"
    assert _user_text(cat) == T.detect("cat").text
    assert cat.meta["gt_boxes"] == {"cat": [[10, 10, 30, 30], [50.5, 10, 70.5, 30], [80, 60, 90, 70]]}
    assert cat.meta["target_regions"] == {"cat": [0, 1]}
    assert cat.meta["negative"] is False and cat.meta["image_size"] == [100, 80]
    count = found[1, "counting", "cat"]
    assert count.target() == "<ground>cat</ground><objects><region0><region1></objects>3"  # the true count
    assert _user_text(count) == T.count("cat").text and count.task == "counting"
    assert count.meta["count"] == 3 and count.meta["gt_boxes"] == cat.meta["gt_boxes"]["cat"]
    light = found[2, "detection", "traffic light"]
    assert light.target() == "<ground>traffic light</ground><objects><region1></objects>"
    assert found[2, "counting", "traffic light"].target().endswith("</objects>1")


def test_tiny_coco_negatives_and_crowd() -> None:
    records = coco_to_records(TINY_COCO, TINY_PROPOSALS, negative_ratio=0.5, seed=3)
    negatives = [r for r in records if r.meta["negative"]]
    assert negatives, "a ratio of 0.5 over two positives asks for negatives"
    for record in negatives:
        (label,) = record.meta["classes"]
        suffix = "0" if record.meta["task"] == "counting" else ""
        assert record.target() == f"<ground>{label}</ground><objects></objects>{suffix}"
        image = next(i for i in TINY_COCO["images"] if i["id"] == record.meta["image_id"])
        present = {a["category_id"] for a in TINY_COCO["annotations"] if a["image_id"] == image["id"]}
        assert record.meta["category_ids"][0] not in present  # crowd-only categories count as present
    kept = _by_query(coco_to_records(TINY_COCO, TINY_PROPOSALS, negative_ratio=0.0, skip_crowd=False))
    assert kept[1, "detection", "dog"].target() == "<ground>dog</ground><objects></objects>"
    assert kept[1, "detection", "dog"].meta["negative"] is False  # present, but no proposal matches it
    assert kept[1, "counting", "dog"].target() == "<ground>dog</ground><objects></objects>1"


def test_tiny_coco_evaluation_records() -> None:
    records = coco_eval_records(TINY_COCO, TINY_PROPOSALS, image_dir_prefix="imgs")
    assert [r.id for r in records] == ["1/multi_detection-0", "2/multi_detection-0"]
    first = records[0]
    assert first.image == "imgs/000001.jpg" and first.target() == "" and len(first.messages) == 1
    assert (
        _user_text(first)
        == "Please detect cat; dog; traffic light in the image and return the object indexes."
    )
    assert first.meta["classes"] == ["cat", "dog", "traffic light"] and first.meta["category_ids"] == [
        1,
        2,
        5,
    ]
    assert first.meta["gt_boxes"]["dog"] == [] and first.meta["crowd_boxes"]["dog"] == [[0, 40, 30, 70]]
    assert first.meta["gt_boxes"]["traffic light"] == [] and len(first.meta["gt_boxes"]["cat"]) == 3
    assert first.meta["target_regions"]["cat"] == [0, 1] and first.scores == [0.9, 0.8, 0.3]


def test_converter_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match=r"tasks must be some of"):
        coco_to_records(TINY_COCO, TINY_PROPOSALS, tasks=("captions",))
    with pytest.raises(ValueError, match=r"negative_ratio must be in \[0, 1\), got 1.0"):
        coco_to_records(TINY_COCO, TINY_PROPOSALS, negative_ratio=1.0)
    with pytest.raises(ValueError, match=r"max_classes_per_query must be an int >= 1, got 0"):
        coco_to_records(TINY_COCO, TINY_PROPOSALS, max_classes_per_query=0)
    with pytest.raises(ValueError, match=r"expected a COCO dict"):
        read_coco({"images": []})
    bad = TINY_COCO | {"annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]}
    with pytest.raises(ValueError, match=r"annotation 0 .*image_id=9"):
        read_coco(bad)
    bad = TINY_COCO | {"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat "}]}
    with pytest.raises(ValueError, match=r"unique non-empty category names"):
        read_coco(bad)


# -- the COCO converter on a larger synthetic data set -------------------------------------------------


def synthetic_coco(num_images: int = 200, num_classes: int = 12, seed: int = 0) -> tuple[dict, dict]:
    """A COCO dict and proposals: jittered true boxes (some missed), distractors, scores."""
    rng = random.Random(seed)
    coco: dict[str, Any] = {
        "images": [],
        "annotations": [],
        "categories": [{"id": 10 + c, "name": f"class {c}"} for c in range(num_classes)],
    }
    proposals = {}
    for image_id in range(1, num_images + 1):
        width, height = rng.randint(120, 300), rng.randint(120, 300)
        coco["images"].append(
            {"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height}
        )
        boxes, scores = [], []
        for _ in range(rng.randint(0, 6)):
            w, h = rng.uniform(10, 60), rng.uniform(10, 60)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": 10 + rng.randrange(num_classes),
                "bbox": [x, y, w, h], "iscrowd": int(rng.random() < 0.05), "area": w * h,
            })  # fmt: skip
            if rng.random() < 0.9:
                boxes.append([x + rng.gauss(0, 1), y + rng.gauss(0, 1), x + w + rng.gauss(0, 1), y + h])
                scores.append(round(rng.uniform(0.5, 1.0), 3))
        for _ in range(rng.randint(1, 30)):
            x, y = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
            boxes.append([x, y, x + rng.uniform(3, 10), y + rng.uniform(3, 10)])
            scores.append(round(rng.uniform(0.05, 0.6), 3))
        if rng.random() < 0.95:
            proposals[image_id] = (boxes, scores)
    return coco, proposals


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict, dict]:
    return synthetic_coco()


@pytest.mark.parametrize("ratio", [0.2, 0.35])
@pytest.mark.parametrize("per_query", [1, 3])
def test_negative_ratio_over_many_images(synthetic: tuple[dict, dict], ratio: float, per_query: int) -> None:
    records = coco_to_records(*synthetic, negative_ratio=ratio, max_classes_per_query=per_query, seed=1)
    for task in ("detection", "counting"):
        subset = [r for r in records if (r.meta["task"] == "counting") == (task == "counting")]
        share = sum(r.meta["negative"] for r in subset) / len(subset)
        assert share == pytest.approx(ratio, abs=0.01), task
    multi = [r for r in records if r.meta["task"] == "multi_detection"]
    assert (per_query > 1) == bool(multi)
    assert all(len(r.meta["classes"]) <= per_query for r in records)


def test_answers_are_consistent_with_boxes_and_meta(synthetic: tuple[dict, dict]) -> None:
    records = coco_to_records(*synthetic, max_classes_per_query=3, max_regions=20, seed=2)
    assert len({r.id for r in records}) == len(records)
    for record in records:
        assert 0 < len(record.boxes) <= 20 and record.scores == sorted(record.scores, reverse=True)
        segments = SEGMENT.findall(record.target())
        assert SEGMENT.sub("", record.target()) == (
            str(record.meta["count"]) if record.task == "counting" else ""
        )
        targets = record.meta["target_regions"]
        targets = targets if isinstance(targets, dict) else {record.meta["label"]: targets}
        expected = [(c, targets[c]) for c in record.meta["classes"] if targets[c]]
        expected = expected or [(record.meta["classes"][0], [])]
        assert [
            (label, [int(i) for i in re.findall(r"\d+", regions)]) for label, regions in segments
        ] == expected
        for label, regions in expected:
            assert regions == sorted(set(regions)) and all(0 <= i < len(record.boxes) for i in regions)
            gt = (
                record.meta["gt_boxes"][label]
                if isinstance(record.meta["gt_boxes"], dict)
                else record.meta["gt_boxes"]
            )
            if regions:  # every named region overlaps a true box of its class
                assert box_iou([record.boxes[i] for i in regions], gt).max(dim=1).values.min() >= 0.5
        if record.meta["negative"]:
            gt = record.meta["gt_boxes"]
            assert all(r == [] for r in targets.values())
            assert all(b == [] for b in gt.values()) if isinstance(gt, dict) else gt == []


def test_xywh_annotations_become_xyxy(synthetic: tuple[dict, dict]) -> None:
    coco, _ = synthetic
    read = read_coco(coco, skip_crowd=False)
    ann = coco["annotations"][0]
    x, y, w, h = ann["bbox"]
    image = next(i for i in read.images if i.id == ann["image_id"])
    assert image.boxes[ann["category_id"]][0] == [x, y, x + w, y + h]


def test_top_k_threshold_and_nms_reach_the_records(synthetic: tuple[dict, dict]) -> None:
    coco, proposals = synthetic
    plain = coco_to_records(coco, proposals, tasks=("detection",))
    capped = coco_to_records(coco, proposals, tasks=("detection",), max_regions=5)
    assert max(len(r.boxes) for r in plain) > 5 and max(len(r.boxes) for r in capped) == 5
    first = {r.meta["image_id"]: r for r in plain}
    for record in capped:  # the top five of the full list
        assert record.boxes == first[record.meta["image_id"]].boxes[:5]
    high = coco_to_records(coco, proposals, tasks=("detection",), score_threshold=0.5)
    assert min(min(r.scores) for r in high) >= 0.5
    nms = coco_to_records(coco, proposals, tasks=("detection",), nms_iou=0.3)
    for record in nms:
        iou = box_iou(record.boxes, record.boxes).fill_diagonal_(0)
        assert float(iou.max()) <= 0.3


def test_conversion_is_deterministic_with_the_seed(synthetic: tuple[dict, dict], tmp_path: Path) -> None:
    def dump(seed: int) -> list[dict]:
        return [r.to_json() for r in coco_to_records(*synthetic, max_classes_per_query=2, seed=seed)]

    assert dump(5) == dump(5)
    assert dump(5) != dump(6)
    out = tmp_path / "train.jsonl"
    count = convert_coco(*synthetic, out, max_classes_per_query=2, seed=5)
    assert count == len(dump(5)) and [r.to_json() for r in read_records(out)] == dump(5)
    count = convert_coco(*synthetic, tmp_path / "val.jsonl", evaluation=True, max_regions=10)
    assert count == len(coco_eval_records(*synthetic)) and count == sum(
        1 for _ in read_records(tmp_path / "val.jsonl")
    )


def test_annotations_and_proposals_from_files(synthetic: tuple[dict, dict], tmp_path: Path) -> None:
    coco, proposals = synthetic
    (tmp_path / "instances.json").write_text(json.dumps(coco), encoding="utf-8")
    results = [
        {"image_id": i, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
        for i, (boxes, scores) in proposals.items()
        for b, s in zip(boxes, scores, strict=True)
    ]
    (tmp_path / "results.json").write_text(json.dumps(results), encoding="utf-8")
    from_files = coco_to_records(tmp_path / "instances.json", tmp_path / "results.json", max_regions=8)
    in_memory = coco_to_records(coco, proposals, max_regions=8)
    assert [r.target() for r in from_files] == [r.target() for r in in_memory]
    for a, b in zip(from_files, in_memory, strict=True):
        flat_a, flat_b = [v for box in a.boxes for v in box], [v for box in b.boxes for v in box]
        assert flat_a == pytest.approx(flat_b, abs=1e-9)


# -- every record encodes with the tiny processor ------------------------------------------------------


def test_records_encode_with_the_tiny_processor(synthetic: tuple[dict, dict]) -> None:
    processor = tiny_processor()
    coco, proposals = synthetic
    records = coco_to_records(coco, proposals, max_regions=TINY_MAX_REGIONS, max_classes_per_query=2)
    records += coco_to_records(TINY_COCO, TINY_PROPOSALS, max_regions=TINY_MAX_REGIONS, negative_ratio=0.5)
    for record in records[:60] + records[-8:]:
        image = Image.new("RGB", tuple(record.meta["image_size"]))
        batch = processor(
            record.training_messages(),
            images=image,
            boxes=record.boxes,
            return_labels=True,
            padding_side="right",
        )
        labels = batch["labels"][0]
        assert processor.tokenizer.decode(labels[labels != -100]) == record.target() + IM_END
        assert int(batch["region_counts"][0]) == len(record.boxes)
    for record in coco_eval_records(TINY_COCO, TINY_PROPOSALS):
        batch = processor(
            record.prompt_messages(),
            images=Image.new("RGB", tuple(record.meta["image_size"])),
            boxes=record.boxes,
        )
        assert "labels" not in batch and int(batch["region_counts"][0]) == len(record.boxes)


def test_written_records_round_trip(tmp_path: Path) -> None:
    records = coco_to_records(TINY_COCO, TINY_PROPOSALS, negative_ratio=0.5)
    write_records(tmp_path / "r.jsonl", records)
    again = list(read_records(tmp_path / "r.jsonl"))
    assert [r.to_json() for r in again] == [r.to_json() for r in records]
    assert [r.prompt_messages() for r in again] == [r.prompt_messages() for r in records]


def test_pack_conversations_merges_turns_about_the_same_image():
    from vlm_fo1.data import ConversationRecord, pack_conversations

    def rec(i, image, boxes):
        return ConversationRecord(
            messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            image=image,
            boxes=boxes,
            id=f"r{i}",
        )

    box = [[0, 0, 5, 5]]
    records = [
        rec(0, "a.png", box),
        rec(1, "b.png", box),
        rec(2, "a.png", box),
        rec(3, "a.png", []),
        rec(4, "a.png", box),
    ]
    packed = pack_conversations(records, max_turns=2)
    assert [p.meta["packed_ids"] for p in packed] == [["r0", "r2"], ["r4"], ["r1"], ["r3"]]
    assert [m["content"] for m in packed[0].messages] == ["q0", "a0", "q2", "a2"]
    assert packed[0].id == "r0+1" and packed[1].id == "r4"
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        pack_conversations(records, 0)


# -- region order -------------------------------------------------------------------------------------------
def test_permute_regions_keeps_every_reference_pointing_at_the_same_box() -> None:
    from vlm_fo1.data.records import permute_regions
    from vlm_fo1.synthetic import ProposalConfig, SceneConfig, TaskMix, build_scene, make_records

    mix = TaskMix(records_per_scene=8)
    checked = set()
    for index in range(40):
        scene, proposals = build_scene(3, "perm", index, SceneConfig(), ProposalConfig(max_proposals=12))
        records = make_records(scene, proposals, mix, random.Random(index), "x.png")
        for record in records:
            order = random.Random(index).sample(range(len(record.boxes)), len(record.boxes))
            moved = permute_regions(record, order)
            old_boxes = [record.boxes[i] for i in _region_refs(record)]
            assert [moved.boxes[i] for i in _region_refs(moved)] == old_boxes
            for key in ("target_region", "region", "reference_region"):
                if key in record.meta:
                    assert moved.boxes[moved.meta[key]] == record.boxes[record.meta[key]]
                    checked.add(key)
            targets, moved_targets = (
                record.meta.get("target_regions", {}),
                moved.meta.get("target_regions", {}),
            )
            if isinstance(targets, list):
                targets, moved_targets = {"": targets}, {"": moved_targets}
            for label, regions in targets.items():
                assert [moved.boxes[i] for i in moved_targets[label]] == [record.boxes[i] for i in regions]
            assert moved.scores == (None if record.scores is None else [record.scores[i] for i in order])
    assert checked == {"target_region", "region", "reference_region"}
    with pytest.raises(ValueError, match="permutation"):
        permute_regions(records[0], [0, 0])


def _region_refs(record: ConversationRecord) -> list[int]:
    """Region indexes in the order they are referenced across all messages (text tags and items)."""
    found = []
    for message in record.messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            if item.get("type") == "region":
                found.append(int(item["index"]))
            else:
                found += [int(n) for n in re.findall(r"<region(\d+)>", item.get("text", ""))]
    return found
