"""FO1ForConditionalGeneration against references: stock Qwen2.5-VL, round trips, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vlm_fo1.model import FO1ForConditionalGeneration
from vlm_fo1.prompting import templates as P
from vlm_fo1.testing import tiny_config, tiny_model

from conftest import make_image

BOXES = [[0, 0, 40, 30], [20, 10, 120, 80], [60, 40, 129, 89]]


def _stock(model: FO1ForConditionalGeneration, attn: str) -> Qwen2_5_VLForConditionalGeneration:
    stock = Qwen2_5_VLForConditionalGeneration._from_config(
        model.config.base_config, attn_implementation=attn
    )
    stock.load_state_dict(model.vlm.state_dict())
    return stock.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_zero_boxes_match_stock_qwen(processor, config, attn):
    model = tiny_model(config, seed=1)
    model.set_attn_implementation(attn)
    batch = processor(P.ask("What is in the image?"), images=make_image(), boxes=[])
    assert "region_counts" not in batch
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = _stock(model, attn)(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_zero_boxes_batch_with_padding_match_stock(processor, model):
    batch = processor(
        [
            [{"role": "user", "content": "Describe it."}],
            [{"role": "user", "content": P.ask("What colour is it, please?")}],
        ],
        images=[make_image(), make_image(70, 140, seed=3)],
        boxes=[[], []],
    )
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = _stock(model, "sdpa")(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=0)


def test_region_tokens_change_logits_after_listing(processor, model, image):
    a = processor(P.detect("cat"), images=image, boxes=BOXES)
    b = processor(P.detect("cat"), images=image, boxes=[BOXES[0], BOXES[1], [0, 0, 129, 89]])
    with torch.no_grad():
        la, lb = model(**a).logits, model(**b).logits
    feat = processor.region_feature_token_id
    first = int((a["input_ids"][0] == feat).nonzero()[0])
    last = int((a["input_ids"][0] == feat).nonzero()[-1])
    torch.testing.assert_close(la[:, :last], lb[:, :last])  # causal: before the changed region, identical
    assert (la[:, last:] - lb[:, last:]).abs().max() > 1e-4
    assert first < last


def test_placeholder_count_mismatch_names_both_counts(processor, model, image):
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    batch["region_counts"] = torch.tensor([2])
    with pytest.raises(ValueError, match=r"placeholders per sample \[3\], boxes per sample \[2\]"):
        model(**batch)


def test_placeholders_without_boxes_raise(processor, model, image):
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    for key in ("region_counts", "region_boxes_vit", "region_boxes_aux"):
        batch.pop(key)
    with pytest.raises(ValueError, match="3 <regionfeat> placeholders but no region boxes"):
        model(**batch)


def test_regions_without_image_raise(processor, model, image):
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    batch.pop("pixel_values")
    with pytest.raises(ValueError, match="need the image"):
        model(**batch)


def test_cached_and_uncached_greedy_generation_agree(processor, model, image):
    batch = processor(P.detect(["cat", "dog"]), images=image, boxes=BOXES)
    cached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_batch_with_different_box_counts_equals_single_runs(processor, model):
    images = [make_image(), make_image(60, 150, seed=1), make_image(100, 100, seed=2)]
    boxes = [BOXES, [[1, 1, 30, 30]], []]
    prompts = [P.detect("cat"), P.describe_region(0), P.ask("How many shapes?")]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    batch = processor(conversations, images=images, boxes=boxes)
    assert batch["region_counts"].tolist() == [3, 1, 0]
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    width = batch["input_ids"].shape[1]
    for i in range(3):
        single = processor(conversations[i], images=images[i], boxes=boxes[i])
        ref = model.generate(**single, max_new_tokens=6, do_sample=False)
        assert out[i, width:].tolist() == ref[0, single["input_ids"].shape[1] :].tolist()


def test_aux_encoder_runs_only_on_the_images_with_boxes(processor, model):
    """A batch that mixes a region record with a region-free one runs the DaViT on one image; the
    region record's logits are those of running it alone."""
    images = [make_image(), make_image(100, 100, seed=2)]
    conversations = [[{"role": "user", "content": p}] for p in (P.detect("cat"), P.ask("How many?"))]
    batch = processor(conversations, images=images, boxes=[BOXES, []])
    seen = []
    handle = model.aux_encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        mixed = model(**batch).logits
        single = processor(conversations[0], images=images[0], boxes=BOXES)
        alone = model(**single).logits
    handle.remove()
    assert seen == [1, 1]
    width = single["input_ids"].shape[1]
    torch.testing.assert_close(mixed[0, -width:], alone[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"one image per image of the batch \(2\), got 1"):
        model._encode_aux_where(batch["aux_pixel_values"][:1], [True, False])


def test_save_and_load_round_trip(tmp_path, processor, model, image):
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    model.save_pretrained(tmp_path)
    loaded = FO1ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=0)


def test_bfloat16_runs_and_tracks_float32(processor, config, image):
    fp32 = tiny_model(config, seed=2)
    bf16 = tiny_model(config, seed=2).to(torch.bfloat16)
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        a = fp32(**batch).logits
        b = bf16(**batch).logits
    assert b.dtype == torch.bfloat16
    assert torch.isfinite(b.float()).all()
    # bf16 keeps about 3 significant digits; logits of a random model are O(1).
    assert (a - b.float()).abs().max() < 0.1 * a.abs().max()
    out = bf16.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_eager_and_sdpa_agree(processor, config, image):
    eager = tiny_model(config, seed=3)
    eager.set_attn_implementation("eager")
    sdpa = tiny_model(config, seed=3)
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).logits, sdpa(**batch).logits, rtol=1e-4, atol=1e-4)


def test_loss_trains_region_side(processor, model, image):
    conversation = [
        {"role": "user", "content": P.detect("cat")},
        {"role": "assistant", "content": "<ground>cat</ground><objects><region1></objects>"},
    ]
    batch = processor(conversation, images=image, boxes=BOXES, return_labels=True, padding_side="right")
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    for module in (model.connector, model.region_encoder, model.aux_encoder):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


@pytest.mark.parametrize("source", ["hybrid", "vit", "aux"])
@pytest.mark.parametrize("fpn", [True, False])
def test_region_sources_and_pyramid_options_run(processor, tokenizer, image, source, fpn):
    model = tiny_model(
        tiny_config(tokenizer, region_source=source, use_simple_fpn=fpn, region_layer_norm=True)
    )
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    assert (model.aux_encoder is None) == (source == "vit")


def test_linear_connector_and_no_position_embedding(processor, tokenizer, image):
    model = tiny_model(tiny_config(tokenizer, connector_type="linear", use_position_embedding=False))
    assert isinstance(model.connector, torch.nn.Linear)
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_precomputed_encodings_give_the_same_generation(processor, model, image):
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        encoding = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        tokens = model.encode_regions(
            encoding,
            batch["aux_pixel_values"],
            batch["region_boxes_vit"],
            batch["region_boxes_aux"],
            batch["region_counts"],
            model._image_index(batch["input_ids"]),
        )
    reference = model.generate(**batch, max_new_tokens=8, do_sample=False)
    cached = dict(batch)
    for key in ("pixel_values", "aux_pixel_values", "region_boxes_vit", "region_boxes_aux"):
        cached.pop(key)
    out = model.generate(
        **cached, image_encoding=encoding, region_tokens=tokens, max_new_tokens=8, do_sample=False
    )
    assert out.tolist() == reference.tolist()


def test_batch_region_norm_standardises_tokens_and_round_trips(tmp_path, processor, tokenizer, image):
    model = tiny_model(tiny_config(tokenizer, region_token_norm="batch"))
    target = model.get_input_embeddings().weight.detach().pow(2).mean().sqrt()
    raw = torch.randn(7, model.config.text_config.hidden_size) * 50 + 3
    model.train()
    out = model._finish_region_tokens(raw, torch.tensor([3, 4]))
    torch.testing.assert_close(out.mean(0), torch.zeros(out.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), target.expand(out.shape[1]), rtol=1e-2, atol=0)
    assert model.region_token_bn.running_mean.abs().sum() > 0  # running statistics were updated
    model.eval()  # inference: running statistics, so one image's tokens do not depend on another's
    one = model._finish_region_tokens(raw[:1], torch.tensor([1]))
    torch.testing.assert_close(one, model._finish_region_tokens(raw, torch.tensor([3, 4]))[:1])
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    model.save_pretrained(tmp_path)
    loaded = FO1ForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded.region_token_bn.running_var, model.region_token_bn.running_var)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=0)


def test_region_name_embedding_adds_each_regions_own_name(tokenizer):
    model = tiny_model(tiny_config(tokenizer, region_name_embedding=True)).eval()
    ids = model.config.region_token_ids
    zeros = torch.zeros(5, model.config.text_config.hidden_size)
    out = model._finish_region_tokens(zeros, torch.tensor([2, 3]))
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(out, table[[ids[0], ids[1], ids[0], ids[1], ids[2]]])


def test_region_token_options_are_validated(tokenizer):
    with pytest.raises(ValueError, match="region_token_norm"):
        tiny_config(tokenizer, region_token_norm="layer")
    with pytest.raises(ValueError, match="region_token_ids"):
        tiny_config(tokenizer, region_name_embedding=True, region_token_ids=None)
    with pytest.raises(ValueError, match="region_pointer needs region_token_ids"):
        tiny_config(tokenizer, region_pointer=True, region_token_ids=None)


def _pointer_pair(tokenizer, seed: int = 3):
    """The same weights without and with the region pointer (its matrix left at zero)."""
    plain = tiny_model(tiny_config(tokenizer), seed=seed)
    pointed = tiny_model(tiny_config(tokenizer, region_pointer=True), seed=seed)
    result = pointed.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == ["region_pointer.weight"] and not result.unexpected_keys
    return plain, pointed


def test_region_pointer_starts_as_the_lm_head_then_adds_bilinear_scores(processor, tokenizer, image):
    plain, pointed = _pointer_pair(tokenizer)
    assert pointed.region_pointer.weight.abs().sum() == 0  # zero-initialised
    batch = processor(P.detect("cat"), images=image, boxes=BOXES)
    with torch.no_grad():
        base = plain(**batch, output_hidden_states=True)
        torch.testing.assert_close(pointed(**batch).logits, base.logits, rtol=0, atol=0)
        torch.nn.init.normal_(pointed.region_pointer.weight, std=0.5)
        logits = pointed(**batch).logits
    # The reference: the stock model's last hidden states (normed: the LM head reads them).
    hidden = base.hidden_states[-1][0]  # (T, D)
    torch.testing.assert_close(plain.vlm.lm_head(hidden), base.logits[0])
    regions = hidden[batch["input_ids"][0] == processor.region_feature_token_id]  # (3, D)
    expected = hidden @ pointed.region_pointer.weight @ regions.T / hidden.shape[-1] ** 0.5  # (T, 3)
    ids = pointed.config.region_token_ids
    torch.testing.assert_close(logits[0][:, ids[:3]] - base.logits[0][:, ids[:3]], expected)
    others = [i for i in range(logits.shape[-1]) if i not in ids[:3]]
    torch.testing.assert_close(logits[0][:, others], base.logits[0][:, others], rtol=0, atol=0)


def test_region_pointer_cached_generation_matches_full_forward(processor, tokenizer, image, tmp_path):
    _, model = _pointer_pair(tokenizer)
    torch.nn.init.normal_(model.region_pointer.weight, std=0.5)
    model.save_pretrained(tmp_path)
    model = FO1ForConditionalGeneration.from_pretrained(tmp_path).eval()  # the pointer round-trips
    assert model.region_pointer.weight.abs().sum() > 0
    batch = processor(P.detect(["cat", "dog"]), images=image, boxes=BOXES)
    out = model.generate(
        **batch, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    width = batch["input_ids"].shape[1]
    full = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        reference = model(**full).logits[0, width - 1 :]  # (6, V): every step from one uncached pass
    torch.testing.assert_close(torch.stack([step[0] for step in out.logits]), reference, rtol=1e-4, atol=1e-4)
    assert set(out.sequences[0, width:].tolist()) & set(model.config.region_token_ids[:3])


def test_region_pointer_label_options_are_validated(tokenizer):
    with pytest.raises(ValueError, match="region_pointer_label needs region_pointer=True"):
        tiny_config(tokenizer, region_pointer_label=True)
    with pytest.raises(ValueError, match="needs ground_token_ids"):
        tiny_config(tokenizer, region_pointer=True, region_pointer_label=True, ground_token_ids=None)
    with pytest.raises(ValueError, match="region_pointer_match needs region_pointer_label=True"):
        tiny_config(tokenizer, region_pointer=True, region_pointer_match=True)
    with pytest.raises(ValueError, match="region_pointer_label_gate needs region_pointer_label=True"):
        tiny_config(tokenizer, region_pointer=True, region_pointer_label_gate=True)
    with pytest.raises(ValueError, match="2 ids of <ground> and </ground>"):
        tiny_config(tokenizer, ground_token_ids=[5])
    assert tiny_config(tokenizer).ground_token_ids == tokenizer.convert_tokens_to_ids(
        ["<ground>", "</ground>"]
    )


def _label_pointer(tokenizer, match: bool = False, gate: bool = False):
    """The pointer pair's weights with the asked label in the query and random pointer matrices
    (``gate``: and a random label gate)."""
    plain, _ = _pointer_pair(tokenizer)
    config = tiny_config(
        tokenizer,
        region_pointer=True,
        region_pointer_label=True,
        region_pointer_match=match,
        region_pointer_label_gate=gate,
    )
    model = tiny_model(config, seed=3)
    model.load_state_dict(plain.state_dict(), strict=False)
    torch.nn.init.normal_(model.region_pointer.weight, std=0.5)
    if match:
        assert model.region_match.weight.abs().sum() == 0  # zero-initialised
        torch.nn.init.normal_(model.region_match.weight, std=0.5)
    if gate:
        assert model.region_label_gate.weight.abs().sum() == 0 == model.region_label_gate.bias.abs().sum()
        torch.nn.init.normal_(model.region_label_gate.weight, std=2.0)
        torch.nn.init.normal_(model.region_label_gate.bias, std=1.0)
    return plain.eval(), model.eval()


WORDY_SPANS = (
    "<ground>the black cat</ground><objects><region1></objects>"
    "<ground>the dog left of the cat</ground><objects><region2></objects>"
)


@pytest.mark.parametrize(("match", "gate"), [(False, False), (True, False), (True, True)])
def test_region_pointer_label_adds_the_latest_closed_span_to_the_query(
    processor, tokenizer, image, match, gate
):
    plain, model = _label_pointer(tokenizer, match, gate)
    conversation = [
        {"role": "user", "content": P.detect(["cat", "dog"])},
        {"role": "assistant", "content": WORDY_SPANS},
    ]
    batch = processor(conversation, images=image, boxes=BOXES)
    with torch.no_grad():
        base = plain(**batch, output_hidden_states=True)
        logits = model(**batch).logits
    ids = batch["input_ids"][0].tolist()
    hidden = base.hidden_states[-1][0]  # (T, D): the stock model's last (normed) hidden states
    table = plain.get_input_embeddings().weight
    open_id, close_id = model.config.ground_token_ids
    # The reference label by hand: each span's token embeddings, averaged (weighted by the gate
    # read from each token's hidden state) and RMS-normalised.
    weights = torch.ones(len(ids))
    if gate:
        weights = torch.sigmoid(hidden @ model.region_label_gate.weight[0] + model.region_label_gate.bias)
        assert weights.std() > 0.05  # the gate weighs tokens differently
    label, labels = None, torch.zeros_like(hidden)
    for t, token in enumerate(ids):
        if token == open_id:
            start = t
        elif token == close_id:
            inside = slice(start + 1, t)
            mean = (table[ids[inside]] * weights[inside, None]).sum(0) / weights[inside].sum()
            label = mean / mean.pow(2).mean().sqrt()
        if label is not None:
            labels[t] = label
    closes = [t for t, token in enumerate(ids) if token == close_id]
    assert len(closes) == 2 and not torch.equal(labels[closes[0]], labels[closes[1]])
    at = batch["input_ids"][0] == processor.region_feature_token_id
    regions = hidden[at]  # (3, D)
    weight = model.region_pointer.weight
    expected = (hidden + labels) @ weight @ regions.T / hidden.shape[-1] ** 0.5  # (T, 3)
    if match:  # the label alone against the region tokens the language model read
        tokens = base.hidden_states[0][0][at]  # (3, D): the input embeddings at <regionfeat>
        expected = expected + labels @ model.region_match.weight @ tokens.T / hidden.shape[-1] ** 0.5
    region_ids = model.config.region_token_ids[:3]
    torch.testing.assert_close(logits[0][:, region_ids] - base.logits[0][:, region_ids], expected)


class _Force:
    """A logits processor that makes generation emit ``tokens`` first, then argmax."""

    def __init__(self, tokens: list[int], start: int) -> None:
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.start
        if step < len(self.tokens):
            scores = torch.full_like(scores, -1e9)
            scores[:, self.tokens[step]] = 0
        return scores


@pytest.mark.parametrize(
    ("use_cache", "match", "gate"),
    [(True, False, False), (False, False, False), (True, True, False), (True, True, True)],
)
def test_region_pointer_label_generation_matches_one_full_forward(
    processor, tokenizer, image, use_cache, match, gate
):
    _, model = _label_pointer(tokenizer, match, gate)
    batch = processor(P.detect(["cat", "dog"]), images=image, boxes=BOXES)
    width = batch["input_ids"].shape[1]
    forced = tokenizer.encode("<ground>cat</ground><objects><region1></objects><ground>dog</ground>")
    carried = []  # per forward: was a span state from an earlier forward handed in?
    model.register_forward_pre_hook(
        lambda _, args, kwargs: carried.append(kwargs.get("region_pointer_label_state") is not None),
        with_kwargs=True,
    )
    out = model.generate(
        **batch,
        max_new_tokens=len(forced) + 3,
        do_sample=False,
        use_cache=use_cache,
        logits_processor=[_Force(forced, width)],
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert out.sequences[0, width : width + len(forced)].tolist() == forced
    assert carried == [False] + [use_cache] * (len(carried) - 1)  # a re-read sequence starts afresh
    full = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        reference = model(**full).logits[0, width - 1 :]  # every step from one uncached pass
    steps = torch.stack([step[0] for step in out.logits])  # the raw logits, before forcing
    torch.testing.assert_close(steps, reference, rtol=1e-4, atol=1e-4)
    # The label moved the region scores: without it the steps after </ground> score differently.
    if match:
        return
    model.config.region_pointer_label = False
    with torch.no_grad():
        unlabelled = model(**full).logits[0, width - 1 :]
    after = forced.index(model.config.ground_token_ids[1]) + 1
    region_ids = model.config.region_token_ids[:3]
    assert not torch.allclose(unlabelled[after:, region_ids], reference[after:, region_ids])
    torch.testing.assert_close(unlabelled[:after], reference[:after])


def test_region_pointer_loss_is_the_cross_entropy_of_its_logits(processor, tokenizer, image):
    _, model = _pointer_pair(tokenizer)
    conversation = [
        {"role": "user", "content": P.detect("cat")},
        {"role": "assistant", "content": "<ground>cat</ground><objects><region1></objects>"},
    ]
    batch = processor(conversation, images=image, boxes=BOXES, return_labels=True, padding_side="right")
    out = model(**batch)
    labels = batch["labels"][0, 1:]
    trained = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1][trained], labels[trained])
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.region_pointer.weight.grad.abs().sum() > 0  # zero-initialised, still learns
