"""Tests for vlm_fo1.prompting.parse: the release grammar, repairs, counting rule, fuzzing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vlm_fo1.prompting.parse import (
    Detection,
    GroundedGroup,
    ParsedOutput,
    count_from_text,
    parse,
    region_indexes_in,
)

BOXES = [[float(10 * i), float(5 * i), float(10 * i + 8), float(5 * i + 4)] for i in range(12)]


def test_release_grammar_single_label() -> None:
    out = parse("<ground>orange</ground><objects><region0><region3></objects><|im_end|>")
    assert out.groups == (GroundedGroup("orange", (0, 3)),)
    assert out.detections == ()
    assert out.answer == "orange"
    assert out.issues == ()
    assert out.ok
    assert out.raw.endswith("<|im_end|>")


def test_multi_label_with_boxes() -> None:
    text = "<ground>orange</ground><objects><region0><region3></objects><ground>apple</ground><objects><region1></objects>"
    out = parse(text, BOXES)
    assert out.groups == (GroundedGroup("orange", (0, 3)), GroundedGroup("apple", (1,)))
    assert out.labels == ("orange", "apple")
    assert out.detections == (
        Detection("orange", 0, (0.0, 0.0, 8.0, 4.0)),
        Detection("orange", 3, (30.0, 15.0, 38.0, 19.0)),
        Detection("apple", 1, (10.0, 5.0, 18.0, 9.0)),
    )
    assert out.by_label() == {
        "orange": [out.detections[0], out.detections[1]],
        "apple": [out.detections[2]],
    }
    assert out.answer == "orange apple"
    assert out.region_indexes == (0, 3, 1)


def test_repeated_labels_are_merged_in_first_appearance_order() -> None:
    text = (
        "<ground>cat</ground><objects><region5><region2></objects>"
        "<ground>dog</ground><objects><region1></objects>"
        "<ground> cat </ground><objects><region2><region7><region7></objects>"
    )
    out = parse(text)
    assert out.groups == (GroundedGroup("cat", (5, 2, 7)), GroundedGroup("dog", (1,)))
    assert out.issues == ()


def test_whitespace_between_ground_and_objects_tolerated() -> None:
    out = parse("<ground> red car </ground>\n  <objects> <region4> <region9>\n</objects>")
    assert out.groups == (GroundedGroup("red car", (4, 9)),)
    assert out.issues == ()


def test_out_of_range_index_dropped_and_reported() -> None:
    out = parse("<ground>cat</ground><objects><region2><region12><region40><region12></objects>", BOXES)
    assert out.groups == (GroundedGroup("cat", (2,)),)
    assert [d.region_index for d in out.detections] == [2]
    assert out.dropped_indexes == (12, 40)
    assert any("[12, 40] are out of range for 12 boxes (expected 0..11)" in issue for issue in out.issues)
    assert not out.ok


def test_no_bounds_check_without_boxes() -> None:
    out = parse("<ground>cat</ground><objects><region250></objects>")
    assert out.groups == (GroundedGroup("cat", (250,)),)
    assert out.dropped_indexes == ()


def test_boxes_map_to_original_pixels_from_tensor_and_array() -> None:
    text = "<ground>sign</ground><objects><region1></objects>"
    for boxes in (
        torch.tensor([[0, 0, 1, 1], [100.5, 20, 300, 400]]),
        np.array([[0, 0, 1, 1], [100.5, 20, 300, 400]]),
    ):
        out = parse(text, boxes)
        assert out.detections == (Detection("sign", 1, (100.5, 20.0, 300.0, 400.0)),)
        assert isinstance(out.detections[0].box[0], float)


def test_bad_boxes_raise() -> None:
    with pytest.raises(ValueError, match=r"box 1 must be 4 finite numbers \(x1, y1, x2, y2\), got \[1, 2\]"):
        parse("<ground>a</ground><objects><region0></objects>", [[0, 0, 1, 1], [1, 2]])
    with pytest.raises(ValueError, match="boxes must be a sequence"):
        parse("x", "boxes")
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        parse(b"x")  # type: ignore[arg-type]


def test_empty_group_kept() -> None:
    out = parse("<ground>zebra</ground><objects></objects>", BOXES)
    assert out.groups == (GroundedGroup("zebra", ()),)
    assert out.detections == ()


def test_empty_output() -> None:
    out = parse("")
    assert out == ParsedOutput(
        raw="",
        answer="",
        groups=(),
        detections=(),
        count=None,
        reasoning=None,
        dropped_indexes=(),
        issues=(),
    )
    assert out.by_label() == {}


def test_plain_answer_and_control_tokens() -> None:
    out = parse("There is a red bus.<|im_end|><|endoftext|><|endoftext|>")
    assert out.answer == "There is a red bus."
    assert out.groups == ()
    assert out.issues == ()


def test_text_after_end_of_turn_is_ignored_and_reported() -> None:
    out = parse("Yes.<|im_end|>\n<|im_start|>user\nmore")
    assert out.answer == "Yes."
    assert any("after the end-of-turn token" in issue for issue in out.issues)


@pytest.mark.parametrize(
    ("text", "note"),
    [
        ("<ground>cat</ground><objects><region1>", "unmatched <ground>"),
        ("<ground>cat", "unmatched <ground>"),
        ("<objects><region1></objects>", "unmatched <objects>"),
        ("<ground>cat</ground> and more", "unmatched </ground>"),
        ("<ground>cat</ground><objects><regionX><region2></objects>", "malformed region tags"),
        ("<ground>cat</ground><objects><region-1></objects>", "malformed region tags"),
        ("<ground>cat</ground><objects>two of them<region2></objects>", "unexpected text in the objects"),
        ("<think>hmm", "unclosed <think>"),
        ("<answer>the dog", "unclosed <answer>"),
        ("<ground></ground><objects><region0></objects>", "empty label"),
        ("<ground>a</ground><objects><region00000000000000000000001234567890123></objects>", "too large"),
        ("<regionfeat>", "placeholder"),
    ],
)
def test_malformed_text_reports_issues(text: str, note: str) -> None:
    out = parse(text, BOXES)
    assert any(note in issue for issue in out.issues), out.issues
    assert "<region" not in out.answer


def test_unclosed_objects_groups_nothing_but_keeps_readable_answer() -> None:
    out = parse("<ground>cat</ground><objects><region1><region2>")
    assert out.groups == ()
    assert out.answer == "cat"


def test_malformed_region_names_are_skipped_not_guessed() -> None:
    out = parse("<ground>cat</ground><objects><regionX><region2><region 3></objects>", BOXES)
    assert out.groups == (GroundedGroup("cat", (2,)),)


def test_counting_release_rule() -> None:
    text = "<ground>cat</ground><objects><region2><region10></objects>There are 2 cats."
    assert count_from_text(text) == 2
    out = parse(text)
    assert out.count == 2
    assert out.answer == "cat There are 2 cats."
    assert out.groups == (GroundedGroup("cat", (2, 10)),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("There are no cats.", None),
        ("", None),
        ("<ground>cat</ground><objects><region2><region10></objects>", None),
        ("<region12>5", 5),
        ("I count 07 birds and 3 nests", 7),
        ("<ground>3 dogs</ground><objects><region1></objects>", 3),
    ],
)
def test_count_from_text_examples(text: str, expected: int | None) -> None:
    assert count_from_text(text) == expected


def test_count_lookbehind_behaves_like_release_regex() -> None:
    # '(?<!region)\d+' refuses a match starting right after 'region', but may start one digit later.
    assert count_from_text("region12") == 2


def test_reasoning_output() -> None:
    text = (
        "<think>The man <region1> holds a cup <region4>; the cup is red.</think>"
        "<answer><ground>red cup</ground><objects><region4></objects></answer><|im_end|>"
    )
    out = parse(text, BOXES)
    assert out.reasoning == "The man <region1> holds a cup <region4>; the cup is red."
    assert out.groups == (GroundedGroup("red cup", (4,)),)
    assert out.answer == "red cup"
    assert [d.region_index for d in out.detections] == [4]
    assert out.issues == ()


def test_reasoning_answer_with_free_region_mentions() -> None:
    out = parse("<think>look</think><answer>The man <region3>, not <region30>.</answer>", BOXES)
    assert out.answer == "The man, not."
    assert out.mentioned_indexes == (3,)
    assert out.dropped_indexes == (30,)
    assert out.groups == ()


def test_reasoning_without_answer_block() -> None:
    out = parse("<think>thinking</think>It is a dog.")
    assert out.reasoning == "thinking"
    assert out.answer == "It is a dog."


def test_grounded_caption_answer_is_readable() -> None:
    text = (
        "A <ground>man</ground><objects><region0></objects> rides a "
        "<ground>brown horse</ground><objects><region1><region2></objects> near "
        "<ground>two trees</ground><objects><region5><region6></objects>."
    )
    out = parse(text, BOXES)
    assert out.answer == "A man rides a brown horse near two trees."
    assert out.labels == ("man", "brown horse", "two trees")
    assert len(out.detections) == 5
    assert out.count is None  # the release rule, applied to any text: no digits here


def test_region_indexes_in() -> None:
    assert region_indexes_in("<region3> and <region03><regionX><region11><region3>") == [3, 3, 11, 3]
    assert region_indexes_in("nothing") == []


_VOCAB = [
    "<ground>",
    "</ground>",
    "<objects>",
    "</objects>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<region0>",
    "<region3>",
    "<region11>",
    "<region99>",
    "<region123456789012345>",
    "<regionX>",
    "<region>",
    "<region-2>",
    "<regionfeat>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|vision_start|>",
    "<|",
    "|>",
    "<",
    ">",
    "region",
    "<grou",
    "nd>",
    " ",
    "\n",
    "cat",
    "red car",
    "There are",
    "7",
    "12",
    ".",
    ",",
    "é",
    "\u200b",
]


def _random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randint(0, 30)):
        if rng.random() < 0.8:
            pieces.append(rng.choice(_VOCAB))
        else:
            pieces.append("".join(chr(rng.randint(32, 0x24F)) for _ in range(rng.randint(1, 6))))
    return "".join(pieces)


def test_fuzz_never_raises() -> None:
    rng = random.Random(1234)
    boxes = BOXES[:5]
    for _ in range(2000):
        text = _random_text(rng)
        out = parse(text, boxes if rng.random() < 0.5 else None)
        assert isinstance(out, ParsedOutput)
        assert out.raw == text
        assert region_indexes_in(out.answer) == []
        assert "<ground>" not in out.answer and "</objects>" not in out.answer
        assert out.count is None or out.count >= 0
        assert all(d.region_index < len(boxes) for d in out.detections)
        assert all(i >= len(boxes) for i in out.dropped_indexes) or not out.dropped_indexes
        assert all(isinstance(issue, str) for issue in out.issues)
        for group in out.groups:
            assert len(set(group.region_indexes)) == len(group.region_indexes)
