"""Where the time of one FO1 prefill goes: ViT, DaViT, region encoder, connector, LLM prefill.

Each stage is timed on its own (median of repeats after a warm-up) on the same inputs, so the
shares add up to one forward pass. Run:

    python benchmarks/forward_breakdown.py                    # tiny config, CPU, 10 and 100 boxes
    python benchmarks/forward_breakdown.py --size full --device cuda --dtype bfloat16 --boxes 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.model.aux_encoder import encode_aux
from vlm_fo1.processing import FO1Processor
from vlm_fo1.prompting import templates as P
from vlm_fo1.testing import full_size_config, tiny_config, tiny_tokenizer


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def breakdown(
    model, processor, image, num_boxes: int, repeats: int, device: torch.device
) -> dict[str, float]:
    rng = np.random.default_rng(0)
    w, h = image.size
    xy = rng.uniform(0, 1, (num_boxes, 2)) * [w * 0.8, h * 0.8]
    boxes = np.concatenate([xy, xy + rng.uniform(0.05, 1, (num_boxes, 2)) * [w * 0.2, h * 0.2]], 1)
    batch = processor(P.detect("cat"), images=image, boxes=boxes.tolist()).to(device)
    dtype = next(model.parameters()).dtype
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    batch["aux_pixel_values"] = batch["aux_pixel_values"].to(dtype)
    times: dict[str, float] = {}
    with torch.no_grad():
        encoding = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        times["ViT (+ feature capture)"] = timed(
            lambda: model.encode_images(batch["pixel_values"], batch["image_grid_thw"]), repeats, device
        )
        aux_levels = encode_aux(model.aux_encoder, batch["aux_pixel_values"])
        times["DaViT"] = timed(
            lambda: encode_aux(model.aux_encoder, batch["aux_pixel_values"]), repeats, device
        )

        def regions():
            n = int(batch["region_counts"][0])
            fmap = encoding.feature_maps[0]
            return model.region_encoder(
                vit_features=[fmap.features],
                vit_stride=fmap.stride,
                vit_frames=encoding.frames,
                vit_boxes=[batch["region_boxes_vit"][0, :n]],
                aux_levels=aux_levels,
                aux_boxes=[batch["region_boxes_aux"][0, :n]],
            )

        pooled = regions()
        times["region encoder"] = timed(regions, repeats, device)
        tokens = model.connector(pooled.to(model.connector_dtype))
        times["connector"] = timed(lambda: model.connector(pooled.to(model.connector_dtype)), repeats, device)
        embeds = model.splice_regions(
            batch["input_ids"],
            model.get_input_embeddings()(batch["input_ids"]),
            tokens,
            batch["region_counts"],
        )

        def prefill():
            return model.adapter.forward(
                model.vlm,
                encoding,
                input_ids=batch["input_ids"],
                inputs_embeds=embeds,
                attention_mask=batch["attention_mask"],
                image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch["mm_token_type_ids"],
                use_cache=True,
                logits_to_keep=1,
            )

        times["LLM prefill"] = timed(prefill, repeats, device)
        times["(whole forward)"] = timed(lambda: model(**batch, logits_to_keep=1), repeats, device)
    times["(prompt tokens)"] = float(batch["input_ids"].shape[1])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--boxes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--image", type=int, nargs=2, default=None, metavar=("W", "H"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tokenizer = tiny_tokenizer(max_regions=100)
    if args.size == "tiny":
        config = tiny_config(tokenizer, max_regions=100)
        size = args.image or (224, 168)
    else:
        config = full_size_config(tokenizer)
        size = args.image or (640, 480)
    torch.manual_seed(0)
    with device:  # random weights made where they run (the 3B architecture: seconds on a GPU)
        model = FO1ForConditionalGeneration(config)
    model = model.to(dtype).eval()
    processor = FO1Processor.from_config(tokenizer, config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"# FO1 forward breakdown: {args.size} config, {args.dtype}, image {size[0]}x{size[1]}, {device_name}"
    )
    for num_boxes in args.boxes:
        times = breakdown(model, processor, image, num_boxes, args.repeats, device)
        stages = {k: v for k, v in times.items() if not k.startswith("(")}
        total = sum(stages.values())
        print(f"\n{num_boxes} boxes, {int(times['(prompt tokens)'])} prompt tokens")
        print(f"{'stage':<26}{'ms':>10}{'share':>9}")
        for name, seconds in stages.items():
            print(f"{name:<26}{seconds * 1e3:>10.2f}{seconds / total:>9.1%}")
        print(f"{'sum of stages':<26}{total * 1e3:>10.2f}")
        print(f"{'whole forward (measured)':<26}{times['(whole forward)'] * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
