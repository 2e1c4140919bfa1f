"""Tests for vlm_fo1.prompting.templates: verbatim release wordings and the typed Prompt."""

from __future__ import annotations

import pytest

from vlm_fo1.prompting import templates as tpl
from vlm_fo1.prompting.templates import (
    TEMPLATES,
    Prompt,
    RegionRef,
    Task,
    ask,
    coco_detect,
    count,
    count_benchmark,
    describe_region,
    detect,
    detect_all,
    find_similar,
    grounded_caption,
    reason,
    refer,
    region_ocr,
)

REASONING_PREFIX = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>. "
    "Please give a detailed reasoning process process and provide image regions that can help you "
    "answer the question better. "
)

# (prompt, expected text written out literally, task, referenced regions)
CASES = [
    (
        detect("orange"),
        "Please detect orange in this image. Answer the question with object indexes.",
        Task.DETECTION,
        (),
    ),
    (
        detect(["  orange", "apple "]),
        "Please detect orange, apple in this image. Answer the question with object indexes.",
        Task.DETECTION,
        (),
    ),
    (
        detect_all(),
        "Please identify every object in the image and provide their labels along with their indexes.",
        Task.DETECTION,
        (),
    ),
    (
        count(" person "),
        "How many person are there in this image? Count each instance of the target object. Locate them "
        "with object indexes and then answer the question with the number of objects.",
        Task.COUNTING,
        (),
    ),
    (
        refer("the man in a red shirt"),
        "Please detect the man in a red shirt in this image. Answer the question with object indexes.",
        Task.REFERRING,
        (),
    ),
    (
        region_ocr(3),
        "Please provide the ocr results of <region3> in the image.",
        Task.REGION_OCR,
        (3,),
    ),
    (
        describe_region(0),
        "Provide a brief description for <region0>.",
        Task.REGION_CAPTION_BRIEF,
        (0,),
    ),
    (
        describe_region(12, detailed=True),
        "Provide a detailed description for <region12>.",
        Task.REGION_CAPTION_DETAILED,
        (12,),
    ),
    (
        grounded_caption(),
        "Briefly describe this image and detect all mentioned objects. Answer with grounded object indexes.",
        Task.GROUNDED_CAPTION,
        (),
    ),
    (
        find_similar(4),
        "Using the provided object <region4> as a reference, identify all other objects of the same "
        "category in this image. Respond with object indexes.",
        Task.VISUAL_PROMPT_DETECTION,
        (4,),
    ),
    (
        find_similar([4, 7]),
        "Using the provided object <region4>, <region7> as a reference, identify all other objects of the "
        "same category in this image. Respond with object indexes.",
        Task.VISUAL_PROMPT_DETECTION,
        (4, 7),
    ),
    (
        reason("What is the person holding?"),
        REASONING_PREFIX + "What is the person holding?",
        Task.REGION_REASONING,
        (),
    ),
    (
        reason(ask(["Why is ", RegionRef(2), " next to ", RegionRef(5), "?"])),
        REASONING_PREFIX + "Why is <region2> next to <region5>?",
        Task.REGION_REASONING,
        (2, 5),
    ),
    (ask("  What colour is the sky?"), "  What colour is the sky?", Task.FREE, ()),
    (
        coco_detect(["person", "bicycle", "traffic light"]),
        "Please detect person; bicycle; traffic light in the image and return the object indexes.",
        Task.DETECTION,
        (),
    ),
    (
        count_benchmark("headsets"),
        "How many headsets are there in the image? Count each instance of the target object. Locate them "
        "with object indexes and then answer the question with the number of objects.",
        Task.COUNTING,
        (),
    ),
]


@pytest.mark.parametrize(("prompt", "text", "task", "regions"), CASES)
def test_rendered_text_is_release_verbatim(prompt: Prompt, text: str, task: Task, regions: tuple) -> None:
    assert prompt.text == text
    assert str(prompt) == text
    assert prompt.task is task
    assert prompt.regions == regions


def test_raw_templates_verbatim() -> None:
    assert TEMPLATES["OD_template"] == (
        "Please detect {} in this image. Answer the question with object indexes."
    )
    assert TEMPLATES["REC_template"] == TEMPLATES["OD_template"]
    assert TEMPLATES["Region_OCR_template"] == "Please provide the ocr results of {} in the image."
    assert TEMPLATES["Brief_Region_Caption_template"] == "Provide a brief description for {}."
    assert TEMPLATES["Detailed_Region_Caption_template"] == "Provide a detailed description for {}."
    assert TEMPLATES["Viusal_Region_Reasoning_template"] == REASONING_PREFIX + "{}"
    assert TEMPLATES["Visual_Prompt_OD_template"].startswith("Using the provided object {} as a reference")
    assert set(TEMPLATES) >= {
        "OD_template",
        "OD_All_template",
        "OD_Counting_template",
        "REC_template",
        "Region_OCR_template",
        "Brief_Region_Caption_template",
        "Detailed_Region_Caption_template",
        "Grounding_template",
        "Visual_Prompt_OD_template",
        "Viusal_Region_Reasoning_template",
    }
    with pytest.raises(TypeError):
        TEMPLATES["OD_template"] = "changed"  # type: ignore[index]


def test_every_prompt_text_equals_format_of_raw_template() -> None:
    assert detect("cat").text == TEMPLATES["OD_template"].format("cat")
    assert count("cat").text == TEMPLATES["OD_Counting_template"].format("cat")
    assert region_ocr(1).text == TEMPLATES["Region_OCR_template"].format("<region1>")
    assert find_similar([1, 2]).text == TEMPLATES["Visual_Prompt_OD_template"].format("<region1>, <region2>")
    assert reason("q?").text == TEMPLATES["Viusal_Region_Reasoning_template"].format("q?")
    assert grounded_caption().text == TEMPLATES["Grounding_template"]
    assert detect_all().text == TEMPLATES["OD_All_template"]


def test_content_structure() -> None:
    assert find_similar([4, 7]).content() == [
        {"type": "text", "text": "Using the provided object "},
        {"type": "region", "index": 4},
        {"type": "text", "text": ", "},
        {"type": "region", "index": 7},
        {
            "type": "text",
            "text": " as a reference, identify all other objects of the same category in this image. "
            "Respond with object indexes.",
        },
    ]
    assert detect("cat").content() == [
        {"type": "text", "text": "Please detect cat in this image. Answer the question with object indexes."}
    ]
    assert describe_region(0).content() == [
        {"type": "text", "text": "Provide a brief description for "},
        {"type": "region", "index": 0},
        {"type": "text", "text": "."},
    ]


def test_user_text_stays_text_even_if_it_looks_like_a_region() -> None:
    prompt = detect("<region5>")
    assert prompt.regions == ()
    assert all(item["type"] == "text" for item in prompt.content())


def test_prompt_normalises_parts() -> None:
    prompt = Prompt(("a", "", "b", RegionRef(1), "", RegionRef(2), "c", "d"), Task.FREE)
    assert prompt.parts == ("ab", RegionRef(1), RegionRef(2), "cd")
    assert prompt == Prompt(("ab", RegionRef(1), RegionRef(2), "c", "d"), Task.FREE)
    assert prompt.content() == [
        {"type": "text", "text": "ab"},
        {"type": "region", "index": 1},
        {"type": "region", "index": 2},
        {"type": "text", "text": "cd"},
    ]
    assert Prompt(["x"], "counting").task is Task.COUNTING  # type: ignore[arg-type]


def test_prompt_validation() -> None:
    with pytest.raises(ValueError, match="prompt parts must be str or RegionRef, got int: 3"):
        Prompt(("a", 3), Task.FREE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Prompt parts must be a sequence of parts"):
        Prompt("abc", Task.FREE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"task must be one of .* got 'nope'"):
        Prompt(("a",), "nope")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, True, 1.0, "3"])
def test_region_ref_validation(bad: object) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        RegionRef(bad)  # type: ignore[arg-type]


def test_region_ref_str() -> None:
    assert str(RegionRef(42)) == "<region42>"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: detect(""), "label must be non-empty text, got ''"),
        (lambda: detect("   "), "label must be non-empty text, got '   '"),
        (lambda: detect([]), "expected at least one label, got an empty sequence"),
        (lambda: detect(["cat", " "]), "label 1 must be non-empty text"),
        (lambda: detect([3]), "label 0 must be a str, got int"),
        (lambda: count(""), "label must be non-empty"),
        (lambda: count_benchmark(" "), "label must be non-empty"),
        (lambda: refer("\n"), "expression must be non-empty"),
        (lambda: reason(""), "question must be non-empty"),
        (lambda: reason(Prompt((" ",), Task.FREE)), "question must be non-empty"),
        (lambda: ask(""), "question must be non-empty"),
        (lambda: region_ocr(-1), "non-negative int, got -1"),
        (lambda: describe_region(True), "non-negative int, got True"),
        (lambda: find_similar([]), "expected at least one region index"),
        (lambda: coco_detect("person"), "categories must be a sequence of names"),
        (lambda: coco_detect(["person", ""]), "category 1 must be non-empty"),
    ],
)
def test_validation_errors(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_task_enum_values() -> None:
    assert {t.value for t in Task} == {
        "detection",
        "counting",
        "referring",
        "region_ocr",
        "region_caption_brief",
        "region_caption_detailed",
        "grounded_caption",
        "visual_prompt_detection",
        "region_reasoning",
        "free",
    }
    assert Task.COUNTING == "counting"
    assert isinstance(Task.FREE, str)


def test_ask_allows_region_only_questions() -> None:
    assert ask([RegionRef(0)]).regions == (0,)
    assert tpl.ask(["What is ", RegionRef(1), "?"]).text == "What is <region1>?"
