"""The smallest end-to-end run: tiny random FO1 model, one image, a few boxes, one question.

It exercises every stage (processor, both encoders, region encoder, splicing, generation with
KV cache, parsing) offline in about a second. The weights are random, so the answer is noise;
``vlm-fo1 demo`` runs a trained checkpoint instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from vlm_fo1.prompting import ParsedOutput, parse
from vlm_fo1.prompting import templates as P
from vlm_fo1.testing import tiny_model_and_processor


@dataclass(frozen=True)
class SmokeResult:
    prompt: str
    num_boxes: int
    prompt_tokens: int
    generated: str
    parsed: ParsedOutput
    seconds: float

    def summary(self) -> str:
        return (
            f"tiny random FO1 model (untrained: the answer is noise)\n"
            f"prompt: {self.prompt}\n"
            f"boxes: {self.num_boxes}, prompt tokens: {self.prompt_tokens}\n"
            f"generated: {self.generated!r}\n"
            f"parsed detections: {len(self.parsed.detections)}, issues: {list(self.parsed.issues)}\n"
            f"time: {self.seconds:.2f} s"
        )


def run_smoke(num_boxes: int = 5, seed: int = 0, max_new_tokens: int = 16) -> SmokeResult:
    """Build a tiny model and processor, ask a detection question about a random image."""
    start = time.perf_counter()
    model, processor = tiny_model_and_processor(seed=seed)
    if not 0 <= num_boxes <= processor.max_regions:
        raise ValueError(f"num_boxes must be in [0, {processor.max_regions}], got {num_boxes}")
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    corners = rng.uniform(0, 1, (num_boxes, 4)) * np.array([128, 96, 128, 96])
    boxes = np.concatenate(
        [corners[:, :2].clip(max=corners[:, 2:]), corners[:, 2:].clip(min=corners[:, :2])], 1
    )
    prompt = P.detect("cat")
    batch = processor(prompt, images=image, boxes=boxes.tolist())
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.decode(out[0, batch["input_ids"].shape[1] :])
    return SmokeResult(
        prompt=prompt.text,
        num_boxes=num_boxes,
        prompt_tokens=int(batch["input_ids"].shape[1]),
        generated=text,
        parsed=parse(text, batch.samples[0].boxes),
        seconds=time.perf_counter() - start,
    )
