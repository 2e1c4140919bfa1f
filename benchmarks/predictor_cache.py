"""What the Predictor's cache saves, and how many tokens a detection costs.

    python benchmarks/predictor_cache.py                 # tiny random model + the demo checkpoint, CPU

Side by side in one run, medians over ``--repeats``:

- ``set_image`` (proposals, ViT, DaViT, region encoder: everything cached for the image) against
  one more question on the same image (only the language model runs), and against an uncached
  question (``model.generate`` on the full batch, every encoder again);
- generated tokens per detected object for ``detect`` on the demo checkpoint's miniature scenes.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def cache_timing(repeats: int, boxes: int) -> dict[str, float]:
    """Tiny random model: set_image vs one more question vs an uncached question (ms)."""
    from vlm_fo1.inference.predictor import Predictor
    from vlm_fo1.prompting import templates as P
    from vlm_fo1.testing import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (168, 224, 3), dtype=np.uint8))
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(boxes, 4, generator=generator) * torch.tensor([224, 168, 224, 168])
    proposals = torch.cat([corners[:, :2].minimum(corners[:, 2:]), corners[:, :2].maximum(corners[:, 2:])], 1)
    predictor = Predictor(model, processor, device="cpu", max_new_tokens=16)
    set_ms = _median_ms(lambda: predictor.set_image(image, proposals.tolist()), repeats)
    question_ms = _median_ms(lambda: predictor.detect("cat"), repeats)
    batch = processor(P.detect("cat"), images=image, boxes=proposals.tolist())

    def uncached() -> None:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=16, do_sample=False)

    uncached_ms = _median_ms(uncached, repeats)
    return {"set_image_ms": set_ms, "extra_question_ms": question_ms, "uncached_question_ms": uncached_ms}


def tokens_per_object(scenes: int) -> dict[str, float]:
    """Demo checkpoint on miniature scenes: generated tokens per detected object for ``detect``."""
    from vlm_fo1.demo import DEMO_MAX_PROPOSALS, demo_checkpoint
    from vlm_fo1.inference.predictor import Predictor
    from vlm_fo1.synthetic import build_scene, difficulty_configs
    from vlm_fo1.synthetic.language import label_of

    predictor = Predictor.from_pretrained(demo_checkpoint(), device="cpu")
    tokenizer = predictor.processor.tokenizer
    scene_config, proposal_config = difficulty_configs("full", max_proposals=DEMO_MAX_PROPOSALS)
    tokens = objects = 0
    for index in range(scenes):
        scene, proposals = build_scene(7, "bench", index, scene_config, proposal_config)
        predictor.set_image(scene.image, [list(b) for b in proposals.boxes])
        result = predictor.detect(sorted({label_of(o) for o in scene.objects}))
        tokens += len(tokenizer(result.text, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        objects += len(result.detections)
    return {
        "scenes": scenes,
        "generated_tokens": tokens,
        "detections": objects,
        "tokens_per_detection": tokens / max(objects, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--boxes", type=int, default=30)
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    timing = cache_timing(args.repeats, args.boxes)
    print(
        f"tiny random model, CPU, {args.threads} threads, {args.boxes} boxes, 16 new tokens, median of {args.repeats}:"
    )
    print(f"  set_image                 {timing['set_image_ms']:8.1f} ms")
    print(f"  one more question (cache) {timing['extra_question_ms']:8.1f} ms")
    print(f"  uncached question         {timing['uncached_question_ms']:8.1f} ms")
    print(f"  cached / uncached question: {timing['extra_question_ms'] / timing['uncached_question_ms']:.2f}")
    counts = tokens_per_object(args.scenes)
    print(
        f"demo checkpoint, detect every class of {counts['scenes']} full-difficulty scenes: "
        f"{counts['generated_tokens']} generated tokens, {counts['detections']} detections, "
        f"{counts['tokens_per_detection']:.2f} tokens per detection"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
