"""Region pooling: the separable mean of RoIAlign bins against torchvision's ``roi_align``.

``vlm_fo1.model.region_encoder.pool_regions`` computes the mean of RoIAlign's bins as one weight
vector per axis (tests check it equals ``torchvision.ops.roi_align(...).mean((2, 3))``, forward
and backward). This script times the hybrid region encoder's forward + backward on the same
inputs both ways, side by side in one run (the reference: ``roi_align`` on the aux levels resized
with ``F.interpolate``, as the release does), and prints the ratio. It also times the batch's
ViT maps through the simple feature pyramid grouped by map size (what the encoder does) against
one image at a time (``--sizes``: how many map sizes the batch holds; the miniature world's 16
images hold about 6-9 of its 9):

    python benchmarks/region_pooling.py                 # miniature sizes (mini preset), CPU
    python benchmarks/region_pooling.py --images 1 --boxes 100 --aux-size 768 --channels 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from vlm_fo1.model import region_encoder
from vlm_fo1.model.region_encoder import HybridRegionEncoder


def reference_pool(
    features, boxes, spatial_scale, output_size, sampling_ratio=-1, aligned=False, resize_to=None
):
    """``roi_align`` on each level (resized to ``resize_to`` first, as the release does), mean over
    the bins, levels concatenated on channels."""
    if torch.is_tensor(features):
        if features.dim() == 3:
            features, boxes = features[None], [boxes]
        features = [features]
    pooled = []
    for level in features:
        level = level.float()
        if resize_to is not None and tuple(level.shape[-2:]) != tuple(resize_to):
            level = F.interpolate(level, size=resize_to, mode="bilinear", align_corners=False)
        out = roi_align(
            level, [b.float() for b in boxes], output_size, spatial_scale, sampling_ratio, aligned
        )
        pooled.append(out.mean(dim=(2, 3)))
    return torch.cat(pooled, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--boxes", type=int, default=12, help="boxes per image")
    parser.add_argument("--aux-size", type=int, default=128, help="aux input side (levels at strides 4-32)")
    parser.add_argument("--channels", type=int, nargs=4, default=[32, 64, 96, 128], help="aux level widths")
    parser.add_argument("--vit-channels", type=int, default=128, help="ViT feature width (2 blocks x 64)")
    parser.add_argument("--fpn-channels", type=int, default=32)
    parser.add_argument("--roi", type=int, default=4, help="RoIAlign output size")
    parser.add_argument("--sizes", type=int, default=6, help="distinct ViT map sizes in the batch")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    strides = [4.0, 8.0, 16.0, 32.0]
    encoder = HybridRegionEncoder(
        vit_channels=args.vit_channels,
        aux_channels=args.channels,
        aux_strides=strides,
        use_simple_fpn=True,
        fpn_channels=args.fpn_channels,
        roi_output_size=args.roi,
        roi_sampling_ratio=-1,
        roi_aligned=False,
        use_position_embedding=True,
        region_layer_norm=True,
    )
    side, grid = args.aux_size, max(2, round(args.aux_size / 14))
    levels = [torch.randn(args.images, c, int(side / s), int(side / s), requires_grad=True)
              for c, s in zip(args.channels, strides, strict=True)]  # fmt: skip
    shapes = [(grid + i % 3 - 1, grid + i // 3 % 3 - 1) for i in range(args.sizes)]  # rows, columns
    vit = [
        torch.randn(args.vit_channels, *shapes[i % args.sizes], requires_grad=True)
        for i in range(args.images)
    ]
    frames = [(v.shape[2] * 14, v.shape[1] * 14) for v in vit]
    corners = torch.rand(args.images, args.boxes, 2) * side * 0.75
    boxes = [torch.cat([c, c + 6 + torch.rand_like(c) * side * 0.25], dim=1) for c in corners]

    vit_boxes = [b * grid * 14 / side for b in boxes]

    def step() -> None:
        out = encoder(
            vit_features=vit, vit_stride=14.0, vit_frames=frames,
            vit_boxes=vit_boxes, aux_levels=levels, aux_boxes=boxes,
        )  # fmt: skip
        out.pow(2).mean().backward()

    def step_one_image_at_a_time() -> None:
        out = torch.cat([
            encoder(
                vit_features=[vit[i]], vit_stride=14.0, vit_frames=[frames[i]],
                vit_boxes=[vit_boxes[i]], aux_levels=[lv[i : i + 1] for lv in levels], aux_boxes=[boxes[i]],
            )
            for i in range(args.images)
        ])  # fmt: skip
        out.pow(2).mean().backward()

    def timed(run=step) -> float:
        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    separable = timed()
    alone = timed(step_one_image_at_a_time)
    with mock.patch.object(region_encoder, "pool_regions", reference_pool):
        reference = timed()
    print(
        f"{args.images} images x {args.boxes} boxes, aux {side} px, RoI {args.roi}, {args.threads} thread(s): "
        f"forward + backward {1000 * separable:.1f} ms separable vs {1000 * reference:.1f} ms roi_align "
        f"({reference / separable:.2f}x); {args.sizes} ViT map sizes: {1000 * alone:.1f} ms one image at a time "
        f"({alone / separable:.2f}x)"
    )


if __name__ == "__main__":
    main()
