"""The inference commands of ``vlm-fo1``, run as a user would (subprocesses) on a tiny saved model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

from test_inference import make_grounding_model
from vlm_fo1.testing import tiny_model_and_processor

from conftest import make_image

BOXES = [[0, 0, 60, 40], [50, 10, 150, 80], [100, 30, 159, 89]]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny grounding model and processor saved to a directory, images and a box file."""
    root = tmp_path_factory.mktemp("cli")
    model, processor = tiny_model_and_processor()
    make_grounding_model(model, processor)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    make_image(160, 90, seed=1).save(images / "a.png")
    make_image(90, 120, seed=2).save(images / "b.jpg")
    (images / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")  # corrupt
    (root / "boxes.json").write_text(json.dumps(BOXES))
    return root


def run_cli(*args, cwd=None, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-m", "vlm_fo1.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def model_args(root):
    return ["--model", root / "model", "--boxes", root / "boxes.json", "--max-new-tokens", "16"]


def test_detect_json_schema_and_save(workspace):
    image, saved = workspace / "images" / "a.png", workspace / "annotated.png"
    done = run_cli("detect", image, "--labels", "cat, dog", *model_args(workspace), "--json", "--save", saved)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["image"] == str(image) and result["task"] == "detection"
    assert result["image_size"] == [160, 90] and result["num_proposals"] == 3
    assert result["detections"] and result["issues"] == []
    for detection in result["detections"]:
        assert detection["label"] in {"cat", "dog"}
        assert detection["box"] == BOXES[detection["region_index"]]
        assert 0 <= detection["score"] <= 1 and detection["proposal_score"] == 1.0
    with Image.open(saved) as annotated:
        assert annotated.format == "PNG" and annotated.size == (160, 90)


def test_detect_ranked_lists_the_best_proposals(workspace):
    image = workspace / "images" / "a.png"
    done = run_cli("detect", image, "--labels", "cat, dog", *model_args(workspace), "--json", "--ranked", "4")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["task"] == "detection" and result["text"] == "" and len(result["detections"]) == 4
    scores = [d["score"] for d in result["detections"]]
    assert scores == sorted(scores, reverse=True)
    assert {(d["label"], d["region_index"]) for d in result["detections"]} <= {
        (label, i) for label in ("cat", "dog") for i in range(3)
    }


def test_detect_per_class_answers_one_segment_per_label(workspace):
    image = workspace / "images" / "a.png"
    done = run_cli("detect", image, "--labels", "cat, dog", *model_args(workspace), "--json", "--per-class")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    labels = re.findall(r"<ground>(.*?)</ground>", result["text"])
    assert result["task"] == "detection" and labels and set(labels) <= {"cat", "dog"}
    assert labels == sorted(labels, key=["cat", "dog"].index)  # the cat question's answer comes first
    done = run_cli("count", image, "cat", *model_args(workspace), "--per-class")
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr  # detect only


def test_count_prints_a_human_summary(workspace):
    done = run_cli("count", workspace / "images" / "a.png", "cat", *model_args(workspace))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("count: ")
    assert "counting:" in done.stdout and "candidate boxes (160x90 image)" in done.stdout
    assert "score" in done.stdout and "<region" in done.stdout


def test_predict_folder_skips_a_corrupt_image_and_resumes(workspace):
    out = workspace / "run" / "results.json"
    args = ["predict", workspace / "images", "--labels", "cat,dog", "--out", out, *model_args(workspace)]
    first = run_cli(*args, "--batch-size", "2")
    assert first.returncode == 0, first.stderr
    assert "c.png" in first.stderr and "failed" in first.stdout
    results = json.loads(out.read_text())
    meta = json.loads((workspace / "run" / "results.meta.json").read_text())
    assert meta["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [f["file_name"] for f in meta["failed"]] == ["c.png"]
    sizes = {image["id"]: (image["width"], image["height"]) for image in meta["images"]}
    assert sizes == {1: (160, 90), 2: (90, 120)}
    assert results and len(results) == meta["num_detections"]
    for entry in results:  # COCO results: xywh inside the image, a category from the sidecar
        assert set(entry) == {"image_id", "category_id", "bbox", "score"}
        x, y, w, h = entry["bbox"]
        width, height = sizes[entry["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0 and x + w <= width and y + h <= height
        assert entry["category_id"] in {1, 2} and 0 <= entry["score"] <= 1

    again = run_cli(*args, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "0 processed, 2 already done, 1 failed" in again.stdout
    assert json.loads(out.read_text()) == results
    lines = (workspace / "run" / "results.progress.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds.count("done") == 2 and kinds.count("failed") == 2  # only the bad image was retried


def test_offline_hub_id_fails_fast_without_traceback(workspace, tmp_path):
    start = time.perf_counter()
    done = run_cli(
        "detect",
        workspace / "images" / "a.png",
        "--labels",
        "cat",
        "--model",
        "someone/fo1-model",
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 2
    assert elapsed < 10
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "local" in lines[0] and "--model" in lines[0]


def test_convert_official_offline_hub_id_fails_fast(tmp_path):
    done = run_cli("convert-official", "someone/fo1-release", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "local" in done.stderr and not (tmp_path / "out").exists()


def test_demo_with_a_missing_checkpoint_says_how_to_rebuild(tmp_path):
    done = run_cli("demo", "--model", tmp_path / "nothing", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "benchmarks/miniature.py --demo-only" in done.stderr


def test_bad_arguments_are_one_line_errors(workspace):
    done = run_cli(
        "describe", workspace / "images" / "a.png", "--box", "1,2,3", "--model", workspace / "model"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "x1,y1,x2,y2" in done.stderr


def test_train_overrides_accumulate_across_repeated_set_flags():
    from vlm_fo1.cli import _parse_overrides, build_parser

    args = build_parser().parse_args(
        [
            "train",
            "run.yaml",
            "--set",
            "optim.steps=60",
            "optim.lr=5e-4",
            "output.logging_steps=1e2",
            "data.max_length=null",
            "model.lora=true",
            "--set",
            "output.save_steps=1000",
        ]
    )
    assert args.set == [
        "optim.steps=60",
        "optim.lr=5e-4",
        "output.logging_steps=1e2",
        "data.max_length=null",
        "model.lora=true",
        "output.save_steps=1000",
    ]
    parsed = _parse_overrides(args.set)
    assert isinstance(parsed["output"]["logging_steps"], int)  # "1e2" is a count, not 100.0
    assert parsed == {
        "optim": {"steps": 60, "lr": 5e-4},
        "data": {"max_length": None},
        "model": {"lora": True},
        "output": {"logging_steps": 100, "save_steps": 1000},
    }


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["optim.steps"], "expected KEY=VALUE"),
        (["optim=3", "optim.steps=60"], "inside 'optim'"),
        (["optim.steps=60", "optim=3"], "replaces the section 'optim'"),
    ],
)
def test_bad_train_overrides_say_what_is_wrong(pairs, message):
    from vlm_fo1.cli import _parse_overrides

    with pytest.raises(ValueError, match=message):
        _parse_overrides(pairs)
