"""Task prompts of the VLM-FO1 release, as typed values.

The wording of every template is the release's, verbatim (``shared/docs/official-release.md``
§4 and §7), typos included. A template is not returned as a plain string but as a
:class:`Prompt`: a sequence of text parts and :class:`RegionRef` parts. The distinction matters:
the processor tokenises text parts as ordinary text, so that nothing a user writes (a label, an
expression, a question) can ever become a control or region token, while a :class:`RegionRef`
becomes the real ``<regionN>`` token. ``Prompt.text`` renders the same prompt as one string, as
the release writes it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from vlm_fo1.prompting.tokens import region_token

logger = logging.getLogger(__name__)

# The release's `vlm_fo1/task_templates.py` strings (each has one `{}` slot).
OD_TEMPLATE = "Please detect {} in this image. Answer the question with object indexes."
OD_ALL_TEMPLATE = (
    "Please identify every object in the image and provide their labels along with their indexes."
)
OD_COUNTING_TEMPLATE = (
    "How many {} are there in this image? Count each instance of the target object. "
    "Locate them with object indexes and then answer the question with the number of objects."
)
REC_TEMPLATE = OD_TEMPLATE
REGION_OCR_TEMPLATE = "Please provide the ocr results of {} in the image."
BRIEF_REGION_CAPTION_TEMPLATE = "Provide a brief description for {}."
DETAILED_REGION_CAPTION_TEMPLATE = "Provide a detailed description for {}."
GROUNDING_TEMPLATE = (
    "Briefly describe this image and detect all mentioned objects. Answer with grounded object indexes."
)
VISUAL_PROMPT_OD_TEMPLATE = (
    "Using the provided object {} as a reference, identify all other objects of the same category "
    "in this image. Respond with object indexes."
)
REGION_REASONING_TEMPLATE = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>. "
    "Please give a detailed reasoning process process and provide image regions that can help you "
    "answer the question better. {}"
)
# Evaluation wordings (§7): the COCO jsonl queries and the CountBench / PixmoCount questions.
COCO_EVAL_TEMPLATE = "Please detect {} in the image and return the object indexes."
COUNTING_EVAL_TEMPLATE = (
    "How many {} are there in the image? Count each instance of the target object. "
    "Locate them with object indexes and then answer the question with the number of objects."
)

TEMPLATES: Mapping[str, str] = MappingProxyType(
    {
        "OD_template": OD_TEMPLATE,
        "OD_All_template": OD_ALL_TEMPLATE,
        "OD_Counting_template": OD_COUNTING_TEMPLATE,
        "REC_template": REC_TEMPLATE,
        "Region_OCR_template": REGION_OCR_TEMPLATE,
        "Brief_Region_Caption_template": BRIEF_REGION_CAPTION_TEMPLATE,
        "Detailed_Region_Caption_template": DETAILED_REGION_CAPTION_TEMPLATE,
        "Grounding_template": GROUNDING_TEMPLATE,
        "Visual_Prompt_OD_template": VISUAL_PROMPT_OD_TEMPLATE,
        "Viusal_Region_Reasoning_template": REGION_REASONING_TEMPLATE,
        "COCO_eval_template": COCO_EVAL_TEMPLATE,
        "Counting_eval_template": COUNTING_EVAL_TEMPLATE,
    }
)
"""Raw release strings by their release names (read-only; the two ``*_eval_*`` names are ours)."""


class Task(enum.StrEnum):
    """What a prompt asks for; decides how an answer is read (a ``str`` subclass: ``Task.COUNTING == "counting"``)."""

    DETECTION = "detection"
    COUNTING = "counting"
    REFERRING = "referring"
    REGION_OCR = "region_ocr"
    REGION_CAPTION_BRIEF = "region_caption_brief"
    REGION_CAPTION_DETAILED = "region_caption_detailed"
    GROUNDED_CAPTION = "grounded_caption"
    VISUAL_PROMPT_DETECTION = "visual_prompt_detection"
    REGION_REASONING = "region_reasoning"
    FREE = "free"


@dataclass(frozen=True)
class RegionRef:
    """A reference to candidate box ``index``; rendered as the ``<region{index}>`` token."""

    index: int

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise ValueError(f"RegionRef index must be a non-negative int, got {self.index!r}")

    def __str__(self) -> str:
        return region_token(self.index)


PromptPart = str | RegionRef


def _normalise_parts(parts: Iterable[Any]) -> tuple[PromptPart, ...]:
    """Check part types, merge adjacent strings and drop empty ones."""
    merged: list[PromptPart] = []
    for part in parts:
        if isinstance(part, RegionRef):
            merged.append(part)
        elif isinstance(part, str):
            if not part:
                continue
            if merged and isinstance(merged[-1], str):
                merged[-1] = merged[-1] + part
            else:
                merged.append(part)
        else:
            raise ValueError(f"prompt parts must be str or RegionRef, got {type(part).__name__}: {part!r}")
    return tuple(merged)


@dataclass(frozen=True)
class Prompt:
    """A user prompt: text parts and region references, plus the task it poses.

    ``parts`` is normalised on construction (adjacent strings merged, empty strings dropped), so
    two prompts with the same rendering and the same references compare equal.
    """

    parts: tuple[PromptPart, ...]
    task: Task

    def __post_init__(self) -> None:
        if isinstance(self.parts, str | RegionRef):
            raise ValueError(f"Prompt parts must be a sequence of parts, got a single {self.parts!r}")
        object.__setattr__(self, "parts", _normalise_parts(self.parts))
        try:
            object.__setattr__(self, "task", Task(self.task))
        except ValueError as err:
            raise ValueError(f"task must be one of {[t.value for t in Task]}, got {self.task!r}") from err

    @property
    def text(self) -> str:
        """The prompt as one string, region references rendered as ``<regionN>``."""
        return "".join(str(part) for part in self.parts)

    def __str__(self) -> str:
        return self.text

    @property
    def regions(self) -> tuple[int, ...]:
        """Indexes of the referenced regions, in order of appearance."""
        return tuple(part.index for part in self.parts if isinstance(part, RegionRef))

    def content(self) -> list[dict[str, Any]]:
        """Chat content items: ``{"type": "text", "text": ...}`` / ``{"type": "region", "index": i}``."""
        return [
            {"type": "region", "index": part.index}
            if isinstance(part, RegionRef)
            else {"type": "text", "text": part}
            for part in self.parts
        ]


def _fill(template: str, fill: Sequence[PromptPart], task: Task) -> Prompt:
    """Put ``fill`` into the single ``{}`` slot of ``template``."""
    prefix, suffix = template.split("{}")
    return Prompt((prefix, *fill, suffix), task)


def _clean_text(value: Any, what: str) -> str:
    """A stripped, non-empty string, or ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    text = value.strip()
    if not text:
        raise ValueError(f"{what} must be non-empty text, got {value!r}")
    return text


def _clean_labels(labels: str | Sequence[str], what: str = "label") -> list[str]:
    """One or more stripped, non-empty labels."""
    if isinstance(labels, str):
        return [_clean_text(labels, what)]
    items = list(labels)
    if not items:
        raise ValueError(f"expected at least one {what}, got an empty sequence")
    return [_clean_text(item, f"{what} {i}") for i, item in enumerate(items)]


def _region_refs(regions: int | RegionRef | Sequence[int | RegionRef]) -> list[RegionRef]:
    """One or more region references, joined later by ", "."""
    items = [regions] if isinstance(regions, int | RegionRef) else list(regions)
    if not items:
        raise ValueError("expected at least one region index, got an empty sequence")
    return [item if isinstance(item, RegionRef) else RegionRef(item) for item in items]


def _join_refs(refs: Sequence[RegionRef], sep: str = ", ") -> list[PromptPart]:
    parts: list[PromptPart] = []
    for i, ref in enumerate(refs):
        if i:
            parts.append(sep)
        parts.append(ref)
    return parts


def detect(labels: str | Sequence[str]) -> Prompt:
    """Open-vocabulary detection (``OD_template``); several labels are joined with ``", "``."""
    return _fill(OD_TEMPLATE, [", ".join(_clean_labels(labels))], Task.DETECTION)


def detect_all() -> Prompt:
    """Detect every object with its label (the newer upstream ``OD_All_template``)."""
    return Prompt((OD_ALL_TEMPLATE,), Task.DETECTION)


def count(label: str) -> Prompt:
    """Count the instances of ``label`` (``OD_Counting_template``)."""
    return _fill(OD_COUNTING_TEMPLATE, [_clean_text(label, "label")], Task.COUNTING)


def refer(expression: str) -> Prompt:
    """Referring-expression comprehension (``REC_template``, same words as detection)."""
    return _fill(REC_TEMPLATE, [_clean_text(expression, "expression")], Task.REFERRING)


def region_ocr(region: int) -> Prompt:
    """Read the text inside one region (``Region_OCR_template``)."""
    return _fill(REGION_OCR_TEMPLATE, [RegionRef(region)], Task.REGION_OCR)


def describe_region(region: int, detailed: bool = False) -> Prompt:
    """Brief or detailed caption of one region (``Brief_/Detailed_Region_Caption_template``)."""
    if detailed:
        return _fill(DETAILED_REGION_CAPTION_TEMPLATE, [RegionRef(region)], Task.REGION_CAPTION_DETAILED)
    return _fill(BRIEF_REGION_CAPTION_TEMPLATE, [RegionRef(region)], Task.REGION_CAPTION_BRIEF)


def grounded_caption() -> Prompt:
    """Describe the image and ground every mentioned object (``Grounding_template``)."""
    return Prompt((GROUNDING_TEMPLATE,), Task.GROUNDED_CAPTION)


def find_similar(regions: int | Sequence[int]) -> Prompt:
    """Find objects of the same category as the given regions (``Visual_Prompt_OD_template``)."""
    return _fill(VISUAL_PROMPT_OD_TEMPLATE, _join_refs(_region_refs(regions)), Task.VISUAL_PROMPT_DETECTION)


def ask(text: str | Sequence[PromptPart]) -> Prompt:
    """A plain question (VQA), kept as written; parts may mix text and :class:`RegionRef`."""
    parts = [text] if isinstance(text, str) else list(text)
    prompt = Prompt(tuple(parts), Task.FREE)
    if not prompt.regions and not prompt.text.strip():
        raise ValueError(f"question must be non-empty, got {text!r}")
    return prompt


def reason(question: str | Prompt) -> Prompt:
    """Region reasoning with ``<think>``/``<answer>`` (the release's reasoning template, verbatim).

    ``question`` may be a :class:`Prompt` (e.g. from :func:`ask`) that contains region references;
    its parts are appended after the template's instructions.
    """
    if isinstance(question, Prompt):
        fill = list(question.parts)
        if not question.regions and not question.text.strip():
            raise ValueError(f"question must be non-empty, got {question.text!r}")
    else:
        fill = [_clean_text(question, "question")]
    return _fill(REGION_REASONING_TEMPLATE, fill, Task.REGION_REASONING)


def coco_detect(categories: Sequence[str]) -> Prompt:
    """The COCO evaluation query: ``Please detect a; b; … in the image and return the object indexes.``"""
    if isinstance(categories, str):
        raise ValueError(f"categories must be a sequence of names, got the string {categories!r}")
    names = _clean_labels(categories, "category")
    return _fill(COCO_EVAL_TEMPLATE, ["; ".join(names)], Task.DETECTION)


def count_benchmark(label: str) -> Prompt:
    """The CountBench / PixmoCount question wording (``in the image`` rather than ``in this image``)."""
    return _fill(COUNTING_EVAL_TEMPLATE, [_clean_text(label, "label")], Task.COUNTING)
