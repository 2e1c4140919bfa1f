"""Special token strings of the VLM-FO1 prompt format.

The strings are fixed by the public release (see ``shared/docs/official-release.md`` §3-4):
region names ``<region0>``…``<region99>``, one ``<regionfeat>`` placeholder per region, the
grounding tags and the Qwen chat / vision control tokens. Everything else in the package takes
them from here.
"""

from __future__ import annotations

import re

REGION_FEATURE_TOKEN = "<regionfeat>"
REGION_TOKEN_TEMPLATE = "<region{}>"
REGION_TOKEN_PATTERN = re.compile(r"<region(\d+)>")

GROUND_OPEN, GROUND_CLOSE = "<ground>", "</ground>"
OBJECTS_OPEN, OBJECTS_CLOSE = "<objects>", "</objects>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
GROUNDING_TAGS = (GROUND_OPEN, GROUND_CLOSE, OBJECTS_OPEN, OBJECTS_CLOSE)
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Qwen2.5-VL chat and vision control tokens.
END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
CHAT_CONTROL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_MAX_REGIONS = 100


def region_token(index: int) -> str:
    """``<region{index}>``; ``index`` must be a non-negative int."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"region index must be a non-negative int, got {index!r}")
    return REGION_TOKEN_TEMPLATE.format(index)


def region_tokens(max_regions: int = DEFAULT_MAX_REGIONS) -> list[str]:
    """``["<region0>", …, "<region{max_regions-1}>"]``."""
    return [region_token(i) for i in range(max_regions)]


def all_special_strings(max_regions: int = DEFAULT_MAX_REGIONS) -> list[str]:
    """Every control string of the format: chat/vision tokens, region names, placeholder, tags."""
    return [
        *CHAT_CONTROL_TOKENS,
        REGION_FEATURE_TOKEN,
        *region_tokens(max_regions),
        *GROUNDING_TAGS,
        *REASONING_TAGS,
    ]
