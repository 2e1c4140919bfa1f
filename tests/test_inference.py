"""Predictor: cached encoders, original pixels, typed results, batches equal single images."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from vlm_fo1.inference import NoImageError, Predictor
from vlm_fo1.inference.inputs import as_proposals, cap_proposals
from vlm_fo1.prompting import tokens as T
from vlm_fo1.proposals import ProposalSet
from vlm_fo1.testing import bias_after_token, tiny_model

from conftest import make_image

BOXES = [
    [0, 0, 60, 40],
    [50, 10, 190, 65],
    [120, 30, 230, 90],
    [10, 20, 30, 60],
]  # the last-but-one reaches outside
SCORES = [0.9, 0.8, 0.5, 0.3]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_grounding_model(model, processor):
    """Turn a tiny random model into one that answers in grounding segments.

    The last attention layer adds a large constant to hidden dimension 0 at every position
    (zero value weights, a value bias of ones, one output row), so the final norm's output is
    almost a fixed vector and ``lm_head[:, 0]`` sets near-constant logits: ``<ground>`` first,
    then ``</ground>``, the region tokens (in decreasing preference), ``</objects>``.
    """
    attention = model.vlm.model.language_model.layers[-1].self_attn
    ids = processor.tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        attention.v_proj.weight.zero_()
        attention.v_proj.bias.fill_(1.0)
        attention.o_proj.weight.zero_()
        attention.o_proj.weight[0].fill_(50.0 / attention.o_proj.in_features)
        head = model.get_output_embeddings().weight
        head[:, 0] = 0.0
        head[ids(T.GROUND_OPEN), 0] = 3.0
        head[ids(T.GROUND_CLOSE), 0] = 2.5
        head[ids(T.OBJECTS_CLOSE), 0] = 1.5
        head[processor.region_token_ids, 0] = torch.linspace(2.2, 1.2, len(processor.region_token_ids))
    return model


@pytest.fixture(scope="module")
def predictor(config, processor):
    model = make_grounding_model(tiny_model(config, seed=0), processor)
    return Predictor(model, processor, max_new_tokens=20)


@pytest.fixture(scope="module")
def wide():
    return make_image(200, 90, seed=5)  # non-square


def test_question_before_set_image_raises(config, processor):
    fresh = Predictor(tiny_model(config), processor)
    with pytest.raises(NoImageError, match="set_image"):
        fresh.detect("cat")
    assert issubclass(NoImageError, RuntimeError)


def test_encoders_run_once_for_many_questions(predictor, wide):
    model = predictor.model
    with (
        mock.patch.object(model, "encode_images", wraps=model.encode_images) as images,
        mock.patch.object(model, "encode_regions", wraps=model.encode_regions) as regions,
    ):
        predictor.set_image(wide, (BOXES, SCORES))
        assert (images.call_count, regions.call_count) == (1, 1)
        detected = predictor.detect("cat, dog")
        counted = predictor.count("cat")
        described = predictor.describe(1, detailed=True)
        asked = predictor.ask("What is here?")
        similar = predictor.find_similar(0)
        assert (images.call_count, regions.call_count) == (1, 1)  # every answer reused the cache
        predictor.ocr([5, 5, 25, 25])  # a new box: only the region encoder runs again
        assert (images.call_count, regions.call_count) == (1, 2)
    assert len(predictor.proposals) == len(BOXES) + 1
    assert detected.task == "detection" and detected.detections
    assert set(detected.labels) <= {"cat", "dog"}
    assert (
        counted.count == len({d.region_index for d in counted.detections})
        and counted.count_source == "regions"
    )
    assert described.task == "region_caption_detailed" and similar.task == "visual_prompt_detection"
    assert asked.reasoning is None and isinstance(asked.answer, str)


def test_results_are_in_original_pixels(predictor, wide):
    seen = predictor.set_image(wide, (BOXES, SCORES))
    assert seen.boxes[2].tolist() == [120, 30, 200, 90]  # clipped to the 200x90 image
    result = predictor.detect("cat")
    assert result.image_size == (200, 90) and result.num_proposals == len(BOXES)
    assert result.detections
    for detection in result.detections:
        assert list(detection.box) == seen.boxes[detection.region_index].tolist()
        assert detection.proposal_score == pytest.approx(SCORES[detection.region_index])


def test_close_bias_names_fewer_regions(processor, predictor, wide):
    predictor.set_image(wide, (BOXES, SCORES))
    every = [d.region_index for d in predictor.detect("cat").detections]
    sure = Predictor(predictor.model, processor, max_new_tokens=20, close_bias=1e4)
    sure.set_image(wide, (BOXES, SCORES))
    assert every and not sure.detect("cat").detections  # the close always wins
    eager = Predictor(predictor.model, processor, max_new_tokens=20, close_bias=-1e4)
    eager.set_image(wide, (BOXES, SCORES))
    assert len(eager.detect("cat").detections) == len(BOXES) >= len(every)  # it never closes early
    with pytest.raises(ValueError, match="close_bias must be a finite number"):
        Predictor(predictor.model, processor, close_bias=float("inf"))


def test_ground_writes_the_expression_as_its_label(predictor, wide):
    predictor.set_image(wide, (BOXES, SCORES))
    text = predictor.ground("the red cat ").text
    labels = [segment.split(T.GROUND_CLOSE)[0] for segment in text.split(T.GROUND_OPEN)[1:]]
    assert labels and set(labels) == {"the red cat"}, text


def test_unique_labels_ground_each_detected_class_once(processor, predictor, wide):
    ids = processor.tokenizer.convert_tokens_to_ids
    bias = torch.zeros(predictor.model.config.text_config.vocab_size)
    # empty groups, again and again
    bias[[ids(T.GROUND_OPEN), ids(T.GROUND_CLOSE), ids(T.OBJECTS_CLOSE)]] = 30.0
    head = predictor.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
    try:
        plain = Predictor(predictor.model, processor, max_new_tokens=40)
        once = Predictor(predictor.model, processor, max_new_tokens=40, unique_labels=True)
        for p in (plain, once):
            p.set_image(wide, (BOXES, SCORES))
        again, single = (p.detect(["cat", "dog"]).text for p in (plain, once))
    finally:
        hook.remove()
    assert again.count(T.GROUND_OPEN) > 2
    assert single.count(T.GROUND_OPEN) <= 2 and single.count("cat") <= 1 and single.count("dog") <= 1


def test_count_from_list_reports_the_number_of_regions_it_named(processor, predictor, wide):
    ids = processor.tokenizer.convert_tokens_to_ids
    digits = torch.zeros(predictor.model.config.text_config.vocab_size)
    digits[[ids(str(d)) for d in range(10)]] = 50.0  # right after </objects>, a digit above anything
    digits[ids("9")] = 60.0  # and "9" above the other digits
    counted = Predictor(predictor.model, processor, max_new_tokens=40, count_from_list=True)
    for p in (predictor, counted):
        p.set_image(wide, (BOXES, SCORES))
    with bias_after_token(predictor.model, ids(T.OBJECTS_CLOSE), digits):
        plain, listed = predictor.count("cat"), counted.count("cat")
    assert plain.count == 9 and plain.count_source == "text", plain.text
    assert listed.count == len({d.region_index for d in listed.detections}) != 9, listed.text
    assert listed.count_source == "text"


def test_detect_per_class_joins_single_class_answers_from_the_cached_image(predictor, wide):
    predictor.set_image(wide, (BOXES, SCORES))
    model = predictor.model
    with (
        mock.patch.object(model, "encode_images", wraps=model.encode_images) as images,
        mock.patch.object(model, "encode_regions", wraps=model.encode_regions) as regions,
    ):
        joint = predictor.detect(["cat", "dog"], per_class=True)
    assert (images.call_count, regions.call_count) == (0, 0)  # both questions reused the cache
    cat, dog = predictor.detect("cat"), predictor.detect("dog")
    assert joint.task == "detection" and joint.text == cat.text + dog.text
    summary = [(d.label, d.region_index, d.score, d.model_probability) for d in joint.detections]
    assert summary == [
        (d.label, d.region_index, d.score, d.model_probability) for d in (*cat.detections, *dog.detections)
    ]
    assert {d.label for d in joint.detections} == {"cat", "dog"}
    assert predictor.detect("cat", per_class=True).text == cat.text  # one class: the plain question


def test_suppress_overlap_leaves_out_boxes_overlapping_a_named_one(config, processor, predictor, wide):
    from vlm_fo1.boxes import box_iou

    predictor.set_image(wide, (BOXES, SCORES))
    every = [d.region_index for d in predictor.detect("cat").detections]
    strict = Predictor(predictor.model, processor, max_new_tokens=20, suppress_overlap=0.0)
    seen = strict.set_image(wide, (BOXES, SCORES))
    named = [d.region_index for d in strict.detect("cat").detections]
    iou = box_iou(seen.boxes, seen.boxes)
    assert named and len(named) < len(every)
    assert all(iou[i, j] == 0 for i in named for j in named if i != j)
    with pytest.raises(ValueError, match=r"suppress_overlap must be an IoU in \[0, 1\] or None, got -0.5"):
        Predictor(predictor.model, processor, suppress_overlap=-0.5)


def test_confidence_is_model_probability_times_proposal_score(predictor, wide):
    predictor.set_image(wide, (BOXES, SCORES))
    result = predictor.detect(["cat", "dog"])
    assert result.detections
    for d in result.detections:
        assert 0.0 <= d.score <= 1.0 and 0.0 < d.model_probability <= 1.0
        assert d.score == pytest.approx(d.model_probability * d.proposal_score)
    data = json.loads(result.to_json())
    assert set(data) >= {"task", "image_size", "num_proposals", "text", "answer", "detections", "issues"}
    assert set(data["detections"][0]) == {
        "label",
        "box",
        "score",
        "region_index",
        "model_probability",
        "proposal_score",
    }


def test_rank_scores_every_proposal_from_the_cached_image(predictor, wide):
    from vlm_fo1.prompting import templates as P
    from vlm_fo1.ranking import rank_batch

    seen = predictor.set_image(wide, (BOXES, SCORES))
    result = predictor.rank(["cat", "dog"])
    ranked = result.detections
    assert result.task == "detection" and result.text == "" and result.num_proposals == len(BOXES)
    assert len(ranked) == 2 * len(BOXES)
    assert predictor.rank(["cat", "dog"], top=3).detections == ranked[:3]
    assert [d.score for d in ranked] == sorted((d.score for d in ranked), reverse=True)
    for d in ranked:
        assert d.score == pytest.approx(d.model_probability * d.proposal_score)
        assert list(d.box) == seen.boxes[d.region_index].tolist()
    # The cached encodings give what a fresh forward over the same prompt gives.
    batch = predictor.processor(P.detect("cat"), images=wide, boxes=seen.boxes)
    fresh = rank_batch(predictor.model, predictor.processor, batch, ["cat"])["cat"]
    cat = {d.region_index: d.model_probability for d in ranked if d.label == "cat"}
    assert [cat[i] for i in range(len(BOXES))] == pytest.approx(fresh, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="special tokens"):
        predictor.rank("<ground>")
    with pytest.raises(ValueError, match="top must be"):
        predictor.rank("cat", top=0)


def test_batch_prediction_equals_single_predictions(predictor):
    images = [make_image(200, 90, seed=1), make_image(70, 120, seed=2), make_image(64, 64, seed=3)]
    proposals = [(BOXES, SCORES), BOXES[:2], ProposalSet(torch.tensor([BOXES[0]]), torch.tensor([0.7]))]
    batched = predictor.predict_batch(images, "cat, dog", proposals, batch_size=2)
    assert all(result.detections for result in batched)
    for image, given, together in zip(images, proposals, batched, strict=True):
        predictor.set_image(image, given)
        alone = predictor.detect(["cat", "dog"])
        assert together.text == alone.text
        assert [(d.label, d.region_index, d.box) for d in together.detections] == [
            (d.label, d.region_index, d.box) for d in alone.detections
        ]
        assert [d.score for d in together.detections] == pytest.approx(
            [d.score for d in alone.detections], abs=1e-4
        )


class StubProposer:
    """A proposal network that returns many scored boxes and remembers the labels it was asked for."""

    name = "stub"

    def __init__(self, count):
        self.count = count
        self.asked = []

    def propose(self, image, labels=None):
        self.asked.append(labels)
        width, height = image.size
        corners = torch.rand(self.count, 2, generator=torch.Generator().manual_seed(0)) * 0.5
        boxes = torch.cat(
            [corners * torch.tensor([width, height]), (corners + 0.4) * torch.tensor([width, height])], 1
        )
        return ProposalSet(boxes, torch.linspace(0.99, 0.01, self.count).flip(0))


def test_proposer_is_used_and_capped(config, processor, wide):
    stub = StubProposer(50)
    predictor = Predictor(tiny_model(config), processor, stub, max_new_tokens=4)
    seen = predictor.set_image(wide, labels=["cat"])
    assert stub.asked == [["cat"]]
    assert len(seen) == processor.max_regions  # 32 of 50: the highest scores, in the given order
    assert seen.scores.min() >= torch.linspace(0.99, 0.01, 50).flip(0)[-processor.max_regions] - 1e-6


def test_proposal_forms():
    assert len(as_proposals([[0, 0, 1, 1], [1, 1, 2, 2]])) == 2
    assert as_proposals(([[0, 0, 1, 1]], [0.5])).scores.tolist() == [0.5]
    assert as_proposals({"boxes": [[0, 0, 1, 1]]}).scores.tolist() == [1.0]
    capped = cap_proposals(as_proposals(([[0, 0, 1, 1]] * 3, [0.1, 0.9, 0.5])), 2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.5])
    with pytest.raises(ValueError, match="one score per box"):
        as_proposals(([[0, 0, 1, 1]], [0.5, 0.4]))
    with pytest.raises(ValueError, match="proposals must be"):
        as_proposals("boxes.json")


def test_bad_region_index_names_the_range(predictor, wide):
    predictor.set_image(wide, BOXES)
    with pytest.raises(ValueError, match=r"\[0, 3\].*got 7"):
        predictor.describe(7)


def test_per_image_box_file_is_looked_up_by_path(config, processor, tmp_path):
    from vlm_fo1.proposals import GivenProposer

    path = tmp_path / "street.png"
    make_image(200, 90, seed=4).save(path)
    (tmp_path / "boxes.json").write_text(json.dumps({"street.png": BOXES[:2], "other.png": BOXES}))
    predictor = Predictor(tiny_model(config), processor, GivenProposer.from_file(tmp_path / "boxes.json"))
    assert predictor.set_image(path).boxes.tolist() == BOXES[:2]
    with pytest.raises(ValueError, match="no given proposals"):
        predictor.set_image(make_image(20, 20))  # an array-born image has no file name to look up


def test_image_lists(tmp_path):
    from vlm_fo1.inference.inputs import list_images

    (tmp_path / "imgs").mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    assert [(e.file_name, e.image_id) for e in list_images(tmp_path / "imgs")] == [("a.jpg", 1), ("b.png", 2)]
    (tmp_path / "list.txt").write_text("# two images\nimgs/b.png\n\nimgs/a.jpg\n")
    listed = list_images(tmp_path / "list.txt")
    assert [(e.path, e.image_id) for e in listed] == [
        (tmp_path / "imgs/b.png", 1),
        (tmp_path / "imgs/a.jpg", 2),
    ]
    coco = {"images": [{"id": 42, "file_name": "a.jpg"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    [entry] = list_images(tmp_path / "ann.json", image_root=tmp_path / "imgs")
    assert (entry.path, entry.image_id) == (tmp_path / "imgs/a.jpg", 42)
    with pytest.raises(ValueError, match="does not exist"):
        list_images(tmp_path / "missing")
