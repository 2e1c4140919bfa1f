"""Proposal networks: the result type, the release's filter, the registry, given boxes, the
simulated network and the transformers detectors (tiny random models built offline)."""

from __future__ import annotations

import json
import math
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_fo1.data.proposal_sources import ImageProposals, select_proposals
from vlm_fo1.proposals import (
    GivenProposer,
    GroundingDinoProposer,
    OmDetTurboProposer,
    Owlv2Proposer,
    ProposalNetwork,
    ProposalSet,
    SyntheticProposer,
    UnionProposer,
    available_proposers,
    build_proposer,
    postprocess,
    register_proposer,
)
from vlm_fo1.proposals import base as proposals_base
from vlm_fo1.proposals import detectors as detectors_module
from vlm_fo1.synthetic import ProposalConfig, SceneConfig, derive_seed, render_scene, simulate_proposals

WIDTH, HEIGHT = 160, 90  # a non-square original image


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (two spin against each other on a busy 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_boxes(actual: torch.Tensor, expected, atol: float = 1e-4) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32).reshape(-1, 4), atol=atol, rtol=0
    )


def make_image(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# ProposalSet and postprocess


def test_proposal_set_coerces_and_round_trips_json():
    proposals = ProposalSet(np.array([[1, 2, 3, 4], [5, 6, 7, 8]]), [0.9, 0.5], ["a", "b"])
    assert proposals.boxes.dtype == torch.float32 and proposals.boxes.shape == (2, 4)
    assert proposals.scores.dtype == torch.float32 and len(proposals) == 2
    again = ProposalSet.from_json(json.dumps(proposals.to_json()))
    assert torch.equal(again.boxes, proposals.boxes) and torch.equal(again.scores, proposals.scores)
    assert again.labels == ("a", "b")
    unlabeled = ProposalSet.from_json({"boxes": [[0, 0, 1, 1]]})
    assert unlabeled.scores.tolist() == [1.0] and unlabeled.labels is None
    assert len(ProposalSet.empty()) == 0 and ProposalSet.empty().boxes.shape == (0, 4)


@pytest.mark.parametrize(
    ("boxes", "scores", "labels", "match"),
    [
        ([[0, 0, 1, 1]], [0.5, 0.4], None, "one score per box"),
        ([[0, 0, 1, 1]], [0.5], ("a", "b"), "one label per box"),
        ([[0, 0, 1]], [0.5], None, r"\(N, 4\)"),
    ],
)
def test_proposal_set_rejects_mismatches(boxes, scores, labels, match):
    with pytest.raises(ValueError, match=match):
        ProposalSet(boxes, scores, labels)


def test_postprocess_threshold_nms_sort_topk_and_clip():
    boxes = [
        [10, 10, 50, 50],  # 0.5
        [11, 10, 50, 50],  # 0.9, IoU > 0.8 with the first: suppresses it (class-agnostic)
        [60, 10, 90, 40],  # 0.2: under the threshold
        [-20, 5, 30, 200],  # 0.7: clipped to the image
        [170, 0, 180, 10],  # 0.95: wholly outside, no area after clipping
        [100, 20, 140, 60],  # 0.7: ties with index 3, keeps the input order
    ]
    raw = ProposalSet(boxes, [0.5, 0.9, 0.2, 0.7, 0.95, 0.7], ["x", "y", "z", "w", "v", "u"])
    out = postprocess(raw, image_size=(WIDTH, HEIGHT))
    assert out.labels == ("y", "w", "u")
    assert out.scores.tolist() == pytest.approx([0.9, 0.7, 0.7])
    assert out.boxes[1].tolist() == [0, 5, 30, HEIGHT]
    assert postprocess(raw, image_size=(WIDTH, HEIGHT), top_k=2).labels == ("y", "w")
    everything = postprocess(raw, score_threshold=None, nms_iou=None, top_k=None)
    assert len(everything) == 6 and everything.labels[0] == "v"
    assert torch.all(everything.scores[:-1] >= everything.scores[1:])


def test_postprocess_drops_nan_and_checks_arguments():
    raw = ProposalSet([[0, 0, 5, 5], [float("nan"), 0, 5, 5]], [0.9, 0.9])
    assert len(postprocess(raw)) == 1
    with pytest.raises(ValueError, match="top_k"):
        postprocess(raw, top_k=0)
    with pytest.raises(ValueError, match="nms_iou"):
        postprocess(raw, nms_iou=1.5)
    with pytest.raises(ValueError, match="score_threshold"):
        postprocess(raw, score_threshold=-0.1)


def test_postprocess_matches_select_proposals_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xy = rng.uniform(-20, 170, (60, 2))
        wh = rng.uniform(0, 60, (60, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).round(1)
        scores = rng.uniform(0, 1, 60).round(2)  # rounded: ties happen
        ours = postprocess(ProposalSet(boxes, scores), top_k=25, image_size=(WIDTH, HEIGHT))
        reference = select_proposals(
            ImageProposals(boxes.tolist(), scores.tolist()),
            image_size=(WIDTH, HEIGHT),
            max_regions=25,
            score_threshold=0.3,
            nms_iou=0.8,
        )
        assert_boxes(ours.boxes, reference.boxes)
        assert ours.scores.tolist() == pytest.approx(reference.scores)


# --------------------------------------------------------------------------------------------
# Registry and union


def test_registry_lists_builds_and_rejects(monkeypatch):
    assert {"given", "synthetic", "omdet-turbo", "grounding-dino", "owlv2"} <= set(available_proposers())
    with pytest.raises(ValueError, match=r"unknown proposer 'nope'.*given"):
        build_proposer("nope")
    proposer = build_proposer("given", boxes=[[0, 0, 10, 10]])
    assert isinstance(proposer, GivenProposer) and isinstance(proposer, ProposalNetwork)

    monkeypatch.setattr(proposals_base, "_REGISTRY", dict(proposals_base._REGISTRY))

    @register_proposer("test-fixed")
    def make_fixed(**kwargs):
        return GivenProposer([[1, 1, 2, 2]], **kwargs)

    assert "test-fixed" in available_proposers()
    assert len(build_proposer("test-fixed").propose(make_image())) == 1
    with pytest.raises(ValueError, match="already registered"):
        register_proposer("given")(make_fixed)
    with pytest.raises(ValueError, match="non-empty"):
        register_proposer(" ")


def test_union_pools_sources_and_filters():
    image = make_image()
    first = GivenProposer([[10, 10, 50, 50], [60, 10, 90, 40]], scores=[0.9, 0.4])
    second = GivenProposer([[11, 10, 50, 50], [100, 20, 140, 60]], scores=[0.8, 0.6], labels=["p", "q"])
    union = UnionProposer([first, second], top_k=10)
    out = union.propose(image)
    assert union.name == "union(given+given)"
    assert out.scores.tolist() == pytest.approx([0.9, 0.6, 0.4])  # the 0.8 near-duplicate is gone
    assert out.labels == ("", "q", "")
    with pytest.raises(ValueError, match="at least one"):
        UnionProposer([])


# --------------------------------------------------------------------------------------------
# Given boxes


def test_given_python_boxes_keep_order_default_scores_and_clip():
    proposer = GivenProposer([[10, 10, 50, 50], [11, 10, 50, 50], [150, 80, 200, 120]])
    out = proposer.propose(make_image())
    assert out.scores.tolist() == [1.0, 1.0, 1.0]  # no threshold, no NMS by default
    assert out.boxes.tolist() == [[10, 10, 50, 50], [11, 10, 50, 50], [150, 80, WIDTH, HEIGHT]]
    xywh = GivenProposer([[10, 10, 40, 40]], scores=[0.2], box_format="xywh").propose(make_image())
    assert xywh.boxes.tolist() == [[10, 10, 50, 50]] and xywh.scores.tolist() == pytest.approx([0.2])


def test_given_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r"inverted.*xywh"):
        GivenProposer([[50, 10, 40, 40]])
    with pytest.raises(ValueError, match="NaN"):
        GivenProposer([[0, 0, float("inf"), 4]])
    with pytest.raises(ValueError, match="box_format"):
        GivenProposer([[0, 0, 1, 1]], box_format="cxcywh")


def test_given_json_lists(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([[1, 2, 30, 40], [5, 5, 9, 9]]))
    assert GivenProposer(plain).propose(make_image()).boxes.tolist() == [[1, 2, 30, 40], [5, 5, 9, 9]]
    dicts = tmp_path / "dicts.json"
    dicts.write_text(
        json.dumps([{"bbox": [1, 2, 10, 10], "score": 0.4}, {"bbox": [5, 5, 4, 4], "label": "cat"}])
    )
    out = GivenProposer.from_file(dicts, box_format="xywh").propose(make_image())
    assert out.boxes.tolist() == [[5, 5, 9, 9], [1, 2, 11, 12]]
    assert out.labels == ("cat", "") and out.scores.tolist() == pytest.approx([1.0, 0.4])
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(ProposalSet([[3, 3, 8, 8]], [0.7], ["dog"]).to_json()))
    assert build_proposer("given", boxes=saved).propose(make_image()).labels == ("dog",)


def test_given_coco_results_and_release_jsonl_keyed_by_image(tmp_path):
    coco = tmp_path / "results.json"
    coco.write_text(
        json.dumps(
            [
                {"image_id": 42, "bbox": [10, 10, 20, 20], "score": 0.5, "category_id": 1},
                {"image_id": 42, "bbox": [0, 0, 5, 5], "score": 0.9, "category_id": 2},
                {"image_id": 7, "bbox": [1, 1, 2, 2], "score": 0.3, "category_id": 1},
            ]
        )
    )
    proposer = GivenProposer(coco)
    assert set(proposer.image_keys) == {42, 7}
    out = proposer.propose(make_image(), image_id=42)
    assert out.boxes.tolist() == [[0, 0, 5, 5], [10, 10, 30, 30]]
    saved = tmp_path / "000000000042.png"  # COCO-style name: the stem is the id
    make_image().save(saved)
    with Image.open(saved) as opened:
        assert len(proposer.propose(opened)) == 2
    with pytest.raises(ValueError, match=r"no given proposals.*image_id"):
        proposer.propose(make_image(), image_id=3)

    release = tmp_path / "coco_0.3_0.8.jsonl"
    lines = [
        {"id": 5, "image": "a.jpg", "bbox_list": [[1, 1, 20, 20]], "score_list": [0.8]},
        {"id": 6, "image": "b.jpg", "bbox_list": [[2, 2, 30, 30], [0, 0, 4, 4]], "score_list": [0.4, 0.6]},
    ]
    release.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    proposer = GivenProposer(release)
    assert proposer.propose(make_image(), image_id="b.jpg").scores.tolist() == pytest.approx([0.6, 0.4])
    assert proposer.propose(make_image(), image_id="/data/coco/a.jpg").boxes.tolist() == [[1, 1, 20, 20]]
    assert len(proposer.propose(make_image(), image_id=6)) == 2


def test_given_python_dicts_proposal_sets_and_filter_checks():
    items = [{"bbox": [0, 0, 10, 10], "score": 0.3}, {"bbox": [5, 5, 20, 20], "score": 0.6, "label": "cup"}]
    out = GivenProposer(items).propose(make_image())
    assert out.labels == ("cup", "") and out.boxes.tolist() == [[5, 5, 20, 20], [0, 0, 10, 10]]
    fixed = ProposalSet([[1, 1, 4, 4]], [0.5], ["x"])
    assert GivenProposer(fixed, top_k=1).propose(make_image()).labels == ("x",)
    with pytest.raises(ValueError, match="top_k"):
        GivenProposer(fixed, top_k=0)
    with pytest.raises(ValueError, match="nms_iou"):
        UnionProposer([GivenProposer(fixed)], nms_iou=2.0)


def test_given_mapping_in_memory():
    proposer = GivenProposer(
        {"x.png": [[0, 0, 10, 10]], 3: ([[0, 0, 4, 4], [1, 1, 9, 9]], [0.1, 0.8])}, box_format="xyxy"
    )
    assert proposer.propose(make_image(), image_id="x.png").scores.tolist() == [1.0]
    assert proposer.propose(make_image(), image_id="3").scores.tolist() == pytest.approx([0.8, 0.1])


# --------------------------------------------------------------------------------------------
# The simulated network


@pytest.fixture(scope="module")
def scenes():
    config = SceneConfig()
    return [render_scene(config, seed) for seed in (11, 12, 13)]


def test_synthetic_proposer_matches_simulation_and_recognises_images(scenes, tmp_path):
    config = ProposalConfig()
    proposer = build_proposer("synthetic", scenes=scenes, config=config, seed=5)
    scene = scenes[1]
    out = proposer.propose(scene.image)
    expected = simulate_proposals(scene, config, random.Random(derive_seed(5, scene.seed, "proposals")))
    assert_boxes(out.boxes, [list(b) for b in expected.boxes])
    assert out.scores.tolist() == pytest.approx(list(expected.scores))
    assert out.labels is None and torch.equal(proposer.propose(scene.image).boxes, out.boxes)
    width, height = scene.size
    assert bool((out.boxes[:, 0::2] <= width).all()) and bool((out.boxes[:, 1::2] <= height).all())

    path = tmp_path / "scene.png"
    scene.image.save(path)
    with Image.open(path) as reread:
        assert torch.equal(proposer.propose(reread.convert("RGB")).boxes, out.boxes)
    with pytest.raises(ValueError, match="matches none"):
        proposer.propose(make_image(31, 29))


def test_synthetic_proposer_uses_given_proposals_and_filter(scenes):
    config = ProposalConfig()
    precomputed = [simulate_proposals(s, config, random.Random(i)) for i, s in enumerate(scenes)]
    proposer = SyntheticProposer(scenes, config, proposals=precomputed, score_threshold=0.3, top_k=3)
    out = proposer.propose(scenes[2].image)
    kept = [s for s in precomputed[2].scores if s >= 0.3][:3]
    assert out.scores.tolist() == pytest.approx(kept)
    with pytest.raises(ValueError, match="one Proposals per scene"):
        SyntheticProposer(scenes, config, proposals=precomputed[:1])


# --------------------------------------------------------------------------------------------
# transformers detectors, tiny random models built offline

WORDS = ("cat", "dog", "person", "car", "thing", "detect", "a", "the")


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import CLIPTokenizer

    # id 0 is an ordinary token: OWLv2 masks text queries whose first id is 0 (padding queries)
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for char in "abcdefghijklmnopqrstuvwxyz.,":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)


@pytest.fixture(scope="module")
def bert_tokenizer():
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


def _tiny_swin(image_size: int) -> dict:
    return dict(
        model_type="swin",
        embed_dim=8,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        window_size=7,
        image_size=image_size,
        out_indices=(2, 3, 4),
    )


@pytest.fixture(scope="module")
def omdet(clip_tokenizer):
    from transformers import (
        DetrImageProcessor,
        OmDetTurboConfig,
        OmDetTurboForObjectDetection,
        OmDetTurboProcessor,
    )

    torch.manual_seed(0)
    text = dict(model_type="clip_text_model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    text.update(intermediate_size=16, max_position_embeddings=77, vocab_size=len(clip_tokenizer))
    text.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    hidden = 8
    config = OmDetTurboConfig(
        text_config=text,
        backbone_config=_tiny_swin(64),
        use_timm_backbone=False,
        apply_layernorm_after_vision_backbone=False,
        image_size=64,
        encoder_in_channels=(16, 32, 64),
        num_queries=20,
        encoder_layers=1,
        decoder_num_layers=1,
        encoder_projection_indices=[2],
        encoder_attention_heads=2,
        decoder_num_heads=2,
        decoder_num_points=2,
        encoder_dim_feedforward=16,
        task_encoder_hidden_dim=16,
        decoder_dim_feedforward=16,
        class_embed_dim=16,
        text_projection_in_dim=16,
        text_projection_out_dim=16,
        encoder_hidden_dim=hidden,
        decoder_hidden_dim=hidden,
        vision_features_channels=[hidden] * 3,
    )
    processor = OmDetTurboProcessor(
        image_processor=DetrImageProcessor(size={"height": 64, "width": 64}), tokenizer=clip_tokenizer
    )
    model = OmDetTurboForObjectDetection(config)
    return build_proposer("omdet-turbo", model=model, processor=processor, labels=("cat", "dog"))


@pytest.fixture(scope="module")
def grounding_dino(bert_tokenizer):
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    torch.manual_seed(0)
    text = dict(model_type="bert", vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1)
    text.update(num_attention_heads=2, intermediate_size=16, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=_tiny_swin(64),
        text_config=text,
        use_timm_backbone=False,
        d_model=32,  # GroupNorm(32, d_model) needs a multiple of 32
        encoder_layers=1,
        decoder_layers=2,  # one decoder layer breaks the tied box-head keys
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=20,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=32,
    )
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        tokenizer=bert_tokenizer,
    )
    model = GroundingDinoForObjectDetection(config)
    return GroundingDinoProposer(model, processor, labels=("cat", "dog"))


def _owlv2_parts(clip_tokenizer):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    torch.manual_seed(0)
    text = dict(vocab_size=len(clip_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    text.update(
        intermediate_size=16, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=2
    )
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    vision.update(image_size=64, patch_size=16)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=16)
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=clip_tokenizer
    )
    return Owlv2ForObjectDetection(config), processor


@pytest.fixture(scope="module")
def owlv2(clip_tokenizer):
    model, processor = _owlv2_parts(clip_tokenizer)
    return Owlv2Proposer(model, processor, labels=("cat", "dog"))


DETECTORS = ("omdet", "grounding_dino", "owlv2")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _force(monkeypatch, detector, edit):
    """Run the real forward, then overwrite its boxes and class logits with ``edit``."""
    original = detector.model.forward

    def forward(*args, **kwargs):
        outputs = original(*args, **kwargs)
        edit(outputs, kwargs, detector.processor.tokenizer)
        return outputs

    monkeypatch.setattr(detector.model, "forward", forward)


# Forced predictions (normalised cx, cy, w, h): query 0 is a "cat" at 0.88, query 1 a "dog" at
# 0.73, query 2 a "cat" at 0.12 (under the threshold), query 3 a near-copy of query 0 labelled
# "dog" at 0.82 that only class-agnostic NMS removes.
FORCED = [
    ((0.5, 0.25, 0.2, 0.1), 0, 0.88),
    ((0.2, 0.6, 0.1, 0.2), 1, 0.73),
    ((0.8, 0.5, 0.1, 0.1), 0, 0.12),
    ((0.5, 0.25, 0.2, 0.1), 1, 0.82),
]


def _forced_tensors(boxes_shape, logits_shape, positions):
    """``pred_boxes`` and logits holding FORCED; ``positions[c]`` are the logit columns of class ``c``."""
    boxes = torch.full(boxes_shape, 0.5)
    boxes[..., 2:] = 0.05
    logits = torch.full(logits_shape, -10.0)
    for query, (box, cls, score) in enumerate(FORCED):
        boxes[0, query] = torch.tensor(box)
        for column in positions[cls]:
            logits[0, query, column] = _logit(score)
    return boxes, logits


def _edit_omdet(outputs, kwargs, tokenizer):
    boxes, logits = _forced_tensors(
        outputs.decoder_coord_logits.shape, outputs.decoder_class_logits.shape, [[0], [1]]
    )
    outputs.decoder_coord_logits = boxes
    outputs.decoder_class_logits = logits


def _edit_grounding_dino(outputs, kwargs, tokenizer):
    ids = kwargs["input_ids"][0].tolist()  # [CLS] cat . dog . [SEP]
    positions = [[ids.index(tokenizer.convert_tokens_to_ids(word))] for word in ("cat", "dog")]
    boxes, logits = _forced_tensors(outputs.pred_boxes.shape, outputs.logits.shape, positions)
    outputs.pred_boxes = boxes
    outputs.logits = logits


def _edit_owlv2(outputs, kwargs, tokenizer):
    boxes, logits = _forced_tensors(outputs.pred_boxes.shape, outputs.logits.shape, [[0], [1]])
    outputs.pred_boxes = boxes
    outputs.logits = logits


EDITS = {"omdet": _edit_omdet, "grounding_dino": _edit_grounding_dino, "owlv2": _edit_owlv2}


def _expected_pixels(name: str) -> list[list[float]]:
    """FORCED boxes 0 and 1 in original pixels of the 160x90 image."""
    if name == "owlv2":  # padded to a 160x160 square: both axes scale by the long side
        return [[64, 32, 96, 48], [24, 80, 40, HEIGHT]]  # the second reaches the padding: clipped
    return [[64, 18, 96, 27], [24, 45, 40, 63]]


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_random_output_in_original_frame(name, request, monkeypatch):
    detector = request.getfixturevalue(name)
    monkeypatch.setattr(detector, "score_threshold", None)
    monkeypatch.setattr(detector, "top_k", 7)
    started = time.perf_counter()
    out = detector.propose(make_image(), labels=["cat", "dog"])
    assert time.perf_counter() - started < 30
    assert 0 < len(out) <= 7 and out.labels is not None and len(out.labels) == len(out)
    boxes = out.boxes
    assert bool((boxes >= 0).all()) and bool((boxes[:, 0::2] <= WIDTH).all())
    assert bool((boxes[:, 1::2] <= HEIGHT).all())
    assert bool((boxes[:, 2:] > boxes[:, :2]).all())
    assert bool((out.scores[:-1] >= out.scores[1:]).all())


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_forced_output_maps_to_original_pixels(name, request, monkeypatch):
    detector = request.getfixturevalue(name)
    _force(monkeypatch, detector, EDITS[name])
    out = detector.propose(make_image(), labels=["cat", "dog"])
    assert_boxes(out.boxes, _expected_pixels(name), atol=1e-3)
    assert out.scores.tolist() == pytest.approx([0.88, 0.73], abs=1e-4)
    assert out.labels == ("cat", "dog")
    monkeypatch.setattr(detector, "top_k", 1)
    assert len(detector.propose(make_image(), labels=["cat", "dog"])) == 1
    monkeypatch.setattr(detector, "top_k", 10)
    monkeypatch.setattr(detector, "score_threshold", 0.8)
    assert detector.propose(make_image(), labels=["cat", "dog"]).scores.tolist() == pytest.approx(
        [0.88], abs=1e-4
    )


def test_detector_generic_labels_and_label_checks(owlv2, monkeypatch):
    seen = []
    original = owlv2._encode
    monkeypatch.setattr(owlv2, "_encode", lambda image, words: seen.append(words) or original(image, words))
    owlv2.propose(make_image())
    owlv2.propose(make_image(), labels=[" car ", "car", "person"])
    assert seen == [("cat", "dog"), ("car", "person")]
    with pytest.raises(ValueError, match="non-empty strings"):
        owlv2.propose(make_image(), labels=["cat", ""])
    with pytest.raises(ValueError, match="sequence of strings"):
        owlv2.propose(make_image(), labels="cat")


def test_detector_needs_processor_with_ready_model(owlv2):
    with pytest.raises(ValueError, match="ready processor"):
        Owlv2Proposer(owlv2.model)
    with pytest.raises(ValueError, match="must be a directory"):
        OmDetTurboProposer(42)


def test_detector_loads_local_directory(tmp_path, clip_tokenizer):
    model, processor = _owlv2_parts(clip_tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    detector = build_proposer("owlv2", model=tmp_path, device="cpu", score_threshold=None, top_k=5)
    assert isinstance(detector, Owlv2Proposer) and detector.device == torch.device("cpu")
    out = detector.propose(make_image(), labels=["cat"])
    assert 0 < len(out) <= 5 and bool((out.boxes[:, 1::2] <= HEIGHT).all())


@pytest.mark.parametrize("offline", [True, False])
def test_detector_hub_id_without_network_fails_fast(monkeypatch, offline):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(detectors_module, "_hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="pass a local directory"):
        build_proposer("omdet-turbo", model="omlab/omdet-turbo-swin-tiny-hf")
    assert time.perf_counter() - started < 10
    with pytest.raises(ValueError, match="pass a local directory"):
        GroundingDinoProposer("/nonexistent/grounding-dino")


def test_detector_casts_inputs_to_model_dtype(clip_tokenizer):
    model, processor = _owlv2_parts(clip_tokenizer)
    detector = Owlv2Proposer(model, processor, dtype=torch.bfloat16, score_threshold=None, top_k=4)
    assert detector.dtype == torch.bfloat16
    out = detector.propose(make_image(), labels=["cat"])
    assert out.boxes.dtype == torch.float32 and 0 < len(out) <= 4


def test_detector_rejects_a_file_as_model(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="got a file"):
        Owlv2Proposer(weights)
