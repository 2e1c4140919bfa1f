"""GPU checks (skipped without CUDA): the same answers on the GPU as on the CPU, and the full-size
architecture (random weights) through one bfloat16 forward pass with 100 boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu


def test_demo_checkpoint_answers_the_same_on_cuda_as_on_cpu() -> None:
    from vlm_fo1.demo import DEMO_MAX_PROPOSALS, DEMO_SPLIT, demo_checkpoint
    from vlm_fo1.inference import Predictor
    from vlm_fo1.proposals.synthetic import SyntheticProposer
    from vlm_fo1.synthetic import build_scene, difficulty_configs
    from vlm_fo1.synthetic.language import label_of

    scene_config, proposal_config = difficulty_configs("medium", max_proposals=DEMO_MAX_PROPOSALS)
    scene, proposals = build_scene(3, DEMO_SPLIT, 0, scene_config, proposal_config)
    labels = sorted({label_of(o) for o in scene.objects})
    results = {}
    for device in ("cpu", "cuda"):
        proposer = SyntheticProposer([scene], proposal_config, proposals=[proposals])
        predictor = Predictor.from_pretrained(demo_checkpoint(), proposer, device=device)
        predictor.set_image(scene.image)
        results[device] = (predictor.detect(labels), predictor.rank(labels))
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        assert gpu.text == cpu.text
        assert [(d.label, d.region_index) for d in gpu.detections] == [
            (d.label, d.region_index) for d in cpu.detections
        ]
        np.testing.assert_allclose(
            [d.score for d in gpu.detections], [d.score for d in cpu.detections], atol=1e-3
        )


def test_full_size_architecture_runs_in_bfloat16_on_cuda() -> None:
    from vlm_fo1.model import FO1ForConditionalGeneration
    from vlm_fo1.processing import FO1Processor
    from vlm_fo1.prompting import templates as P
    from vlm_fo1.testing import full_size_config, tiny_tokenizer

    tokenizer = tiny_tokenizer(max_regions=100)
    config = full_size_config(tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda"):  # random weights made on the GPU: seconds, not minutes
        model = FO1ForConditionalGeneration(config)
    model = model.to(torch.bfloat16).eval()
    processor = FO1Processor.from_config(tokenizer, config)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    xy = rng.uniform(0, 1, (100, 2)) * [400, 300]  # boxes of 10-120 px inside the 640x480 image
    boxes = np.concatenate([xy, xy + rng.uniform(10, 120, (100, 2))], 1).tolist()
    batch = processor(P.detect("cat"), images=image, boxes=boxes).to("cuda")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    batch["aux_pixel_values"] = batch["aux_pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits
    assert logits.shape[:2] == (1, 1) and logits.shape[2] >= len(tokenizer)
    assert torch.isfinite(logits.float()).all()
