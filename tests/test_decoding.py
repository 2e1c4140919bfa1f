"""GroundingConstraint: only existing regions, a well-formed answer, per sample, on any model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlm_fo1.decoding import GrammarVocabulary, GroundingConstraint, constrained_processors, region_counts_of
from vlm_fo1.prompting import parse, region_indexes_in
from vlm_fo1.prompting import templates as P
from vlm_fo1.prompting import tokens as T
from vlm_fo1.testing import tiny_model

from conftest import make_image

BOXES = [[i * 8.0, i * 5.0, i * 8.0 + 40, i * 5.0 + 30] for i in range(12)]
COUNTS = (12, 3, 0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake(config):
    """A tiny random model whose logits get a fixed bias (set per test): a stand-in for a model
    that insists on some tokens. The bias is a forward hook on the output layer."""
    model = tiny_model(config, seed=3)
    bias = torch.zeros(config.text_config.vocab_size)
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    return model, bias


def _batch(processor, counts=COUNTS, prompt=None):
    prompt = prompt or P.detect("cat")
    return processor(
        [[{"role": "user", "content": prompt}] for _ in counts],
        images=[make_image(130, 90, seed=i) for i in range(len(counts))],
        boxes=[BOXES[:n] for n in counts],
    )


def _generate(model, processor, batch, max_new_tokens, constrained=True, seed=None, beams=1, **kwargs):
    processors = (
        constrained_processors(processor, region_counts_of(batch), max_new_tokens=max_new_tokens, **kwargs)
        if constrained
        else None
    )
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=seed is not None,
            num_beams=beams,
            logits_processor=processors,
        )
    return [processor.decode(row) for row in out[:, batch["input_ids"].shape[1] :]]


def _ids(processor, *tokens):
    return [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_forced_out_of_range_region_never_appears(processor, fake):
    model, bias = fake
    bias.zero_()
    bias[processor.region_token_ids[31]] = 50.0  # the fake model always wants <region31>
    bias[_ids(processor, T.GROUND_OPEN, T.GROUND_CLOSE, T.OBJECTS_OPEN)] = 30.0
    batch = _batch(processor)
    free = _generate(model, processor, batch, 12, constrained=False)
    assert all("<region31>" in text for text in free)  # unconstrained: the impossible region wins
    greedy, beams = _generate(model, processor, batch, 12), _generate(model, processor, batch, 12, beams=3)
    for texts in (greedy, beams):
        for text, count in zip(texts, COUNTS, strict=True):
            indexes = region_indexes_in(text)
            assert all(i < count for i in indexes), (count, text)
            assert T.REGION_FEATURE_TOKEN not in text
            assert parse(text).ok
    assert any(region_indexes_in(text) for text in greedy)
    bias.zero_()


@pytest.mark.parametrize("max_new_tokens", [7, 16, 29])
def test_grammar_holds_on_sampled_answers(processor, fake, max_new_tokens):
    model, bias = fake
    bias.zero_()
    special = _ids(processor, T.GROUND_OPEN, T.GROUND_CLOSE, T.OBJECTS_OPEN, T.OBJECTS_CLOSE, T.IM_END)
    bias[special] = 6.0
    bias[processor.region_token_ids] = 6.0
    bias[processor.region_feature_token_id] = 20.0
    batch = _batch(processor)
    for seed in range(3):
        texts = _generate(model, processor, batch, max_new_tokens, seed=seed)
        for text, count, sample in zip(texts, COUNTS, batch.samples, strict=True):
            parsed = parse(text, sample.boxes)
            assert parsed.ok, (text, parsed.issues)  # closed tags, nothing dropped or malformed
            assert not parsed.dropped_indexes and not parsed.mentioned_indexes
            assert all(i < count for i in region_indexes_in(text))
            assert T.REGION_FEATURE_TOKEN not in text
    bias.zero_()


def _grounding_setup(processor, fake):
    """The fake model pushed towards grounding tags and region names, and a two-sample detection
    batch (12 and 3 boxes) for it."""
    model, bias = fake
    bias.zero_()
    bias[_ids(processor, T.GROUND_OPEN, T.GROUND_CLOSE)] = 8.0
    bias[processor.region_token_ids] = 6.0
    return model, bias, _batch(processor, counts=(12, 3), prompt=P.detect(["cat", "dog"]))


def test_labels_restrict_the_grounded_text(processor, fake):
    model, bias, batch = _grounding_setup(processor, fake)
    for seed in range(2):
        texts = _generate(model, processor, batch, 24, seed=seed, labels=["cat", "red circle"])
        labels = {g.label for text in texts for g in parse(text).groups}
        assert labels and labels <= {"cat", "red circle"}
    bias.zero_()


def test_row_labels_restrict_each_sample_to_its_own(processor, fake):
    model, bias, batch = _grounding_setup(processor, fake)
    allowed = [{"cat"}, {"red circle", "dog"}]
    for seed in range(3):
        texts = _generate(model, processor, batch, 24, seed=seed, row_labels=[["cat"], ["red circle", "dog"]])
        for text, labels in zip(texts, allowed, strict=True):
            named = {g.label for g in parse(text).groups}
            assert named and named <= labels, (text, labels)
    free = _generate(model, processor, batch, 24, seed=0, row_labels=[["cat"], None])
    assert {g.label for g in parse(free[0]).groups} <= {"cat"}
    bias.zero_()
    with pytest.raises(ValueError, match="not both"):
        GroundingConstraint.from_processor(processor, [3, 3], labels=["cat"], row_labels=[["cat"], None])
    with pytest.raises(ValueError, match="one entry per sample"):
        GroundingConstraint.from_processor(processor, [3, 3], row_labels=[["cat"]])


def test_free_region_mentions_only_when_allowed(processor, fake):
    model, bias = fake
    bias.zero_()
    bias[processor.region_token_ids] = 30.0
    batch = _batch(processor, counts=(12, 3), prompt=P.ask("What is there?"))
    strict = _generate(model, processor, batch, 8)
    free = _generate(model, processor, batch, 8, free_region_mentions=True)
    assert not any(region_indexes_in(text) for text in strict)
    for text, count in zip(free, (12, 3), strict=True):
        indexes = region_indexes_in(text)
        assert indexes and all(i < count for i in indexes)
    bias.zero_()


def _step(constraint, prefix, width):
    """Allowed ids after the generated ``prefix`` (a fresh generation of one sample)."""
    prompt = torch.zeros(1, 3, dtype=torch.long)
    constraint(prompt, torch.zeros(1, width))  # first step: resets the state
    ids = prompt
    for token in prefix:
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        scores = constraint(ids, torch.zeros(1, width))
    if not prefix:
        scores = constraint(prompt, torch.zeros(1, width))
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def _scores_after(constraint, prefix, scores):
    """The constraint's output ``(V,)`` for ``scores`` ``(V,)`` after the generated ``prefix`` (a
    fresh generation of one sample)."""
    prompt = torch.zeros(1, 3, dtype=torch.long)
    constraint(prompt, torch.zeros_like(scores)[None])  # first step: resets the state
    return constraint(torch.cat([prompt, torch.tensor([prefix])], dim=1), scores[None])[0]


def _grammar(processor):
    """``(vocabulary, its four tags, region ids, the ids of "cat", vocabulary width)``."""
    vocab = GrammarVocabulary.from_processor(processor)
    cat = processor.tokenizer.encode("cat", add_special_tokens=False)
    return vocab, vocab.tags, processor.region_token_ids, cat, len(processor.tokenizer)


def test_state_machine_step_by_step(processor):
    vocab = GrammarVocabulary.from_processor(processor)
    ground, ground_close, objects, objects_close = vocab.tags
    regions = processor.region_token_ids
    width = len(processor.tokenizer) + 5  # padded embedding rows are never allowed
    cat = processor.tokenizer.encode("cat", add_special_tokens=False)
    constraint = GroundingConstraint(vocab, [4])

    start = _step(constraint, [], width)
    assert ground in start and not start & {ground_close, objects, objects_close, *regions}
    assert processor.region_feature_token_id not in start and max(start) < len(processor.tokenizer)
    assert _step(constraint, [ground, *cat, ground_close], width) == {objects}
    inside = _step(constraint, [ground, *cat, ground_close, objects, regions[2]], width)
    assert inside == {objects_close, regions[0], regions[1], regions[3]}  # no repeat, nothing >= 4
    assert _step(constraint, [ground], width).isdisjoint({ground_close, *vocab.end_ids})  # empty label

    budget = GroundingConstraint(vocab, [4], max_new_tokens=4)
    assert ground not in _step(budget, [], width)  # no room for LABEL</ground><objects></objects>
    tight = GroundingConstraint(vocab, [4], max_new_tokens=len(cat) + 4)
    assert _step(tight, [ground, *cat], width) == {ground_close}  # closes in time


def test_stop_by_mass_goes_on_when_the_regions_together_outweigh_the_close(processor):
    vocab, (ground, ground_close, objects, objects_close), regions, cat, width = _grammar(processor)
    prefix = [ground, *cat, ground_close, objects, regions[2]]

    def allowed(scores, **kwargs):
        out = _scores_after(GroundingConstraint(vocab, [6], **kwargs), prefix, scores)
        return set(torch.isfinite(out).nonzero().flatten().tolist())

    # </objects> has probability 0.3, each of the five unused regions 0.14 (0.7 together):
    # greedy would close, the totals say go on.
    logits = torch.full((width,), -30.0)
    logits[objects_close] = torch.tensor(0.3).log()
    logits[[regions[i] for i in (0, 1, 3, 4, 5)]] = torch.tensor(0.14).log()
    unused = {regions[i] for i in (0, 1, 3, 4, 5)}
    assert allowed(logits) == unused | {objects_close}  # off (the default): both sides
    assert allowed(logits, stop_by_mass=True) == unused
    logits[objects_close] = torch.tensor(0.75).log()  # now the close outweighs 0.7
    assert allowed(logits, stop_by_mass=True) == {objects_close}
    logits[regions[0]] = 5.0  # an unused region that itself outweighs the close
    assert allowed(logits, stop_by_mass=True) == unused
    used_up = [ground, *cat, ground_close, objects, *regions[:6]]
    prefix[:] = used_up  # every region named: only the close is left, whatever the scores
    assert allowed(logits, stop_by_mass=True) == {objects_close}


def test_close_bias_shifts_only_the_close_logit_inside_objects(processor):
    vocab, (ground, ground_close, objects, objects_close), regions, cat, width = _grammar(processor)

    def step(prefix, scores, **kwargs):
        return _scores_after(GroundingConstraint(vocab, [3], **kwargs), prefix, scores)

    # In <objects>: region 1 at probability 0.5 beats </objects> at 0.3 by log(5/3) = 0.51.
    logits = torch.full((width,), -30.0)
    logits[objects_close] = torch.tensor(0.3).log()
    logits[regions[1]] = torch.tensor(0.5).log()
    in_objects = [ground, *cat, ground_close, objects]
    plain = step(in_objects, logits)
    assert int(plain.argmax()) == regions[1]
    biased = step(in_objects, logits, close_bias=1.0)
    assert int(biased.argmax()) == objects_close  # 0.3 * e > 0.5: greedy now closes
    torch.testing.assert_close(biased[objects_close], plain[objects_close] + 1.0)
    keep = torch.isfinite(plain) & (torch.arange(width) != objects_close)
    assert torch.equal(biased[keep], plain[keep])  # every other allowed logit as it was
    assert int(step(in_objects, logits, close_bias=0.4).argmax()) == regions[1]  # under the margin
    # Outside <objects> (here: the label of <ground>) nothing moves.
    in_ground = [ground, *cat]
    torch.testing.assert_close(step(in_ground, logits, close_bias=3.0), step(in_ground, logits))
    # With stop_by_mass the biased close enters the totals: regions 0.1 + 0.5 = 0.6 > 0.3 goes on,
    # 0.6 < 0.3 e = 0.82 closes.
    logits[regions[0]] = torch.tensor(0.1).log()
    assert torch.isfinite(step(in_objects, logits, stop_by_mass=True)[regions[0]])
    mass = step(in_objects, logits, stop_by_mass=True, close_bias=1.0)
    assert set(torch.isfinite(mass).nonzero().flatten().tolist()) == {objects_close}
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="close_bias must be a finite number"):
            GroundingConstraint(vocab, [3], close_bias=bad)


def test_suppress_overlap_drops_the_boxes_of_an_object_already_named(processor):
    vocab, (ground, ground_close, objects, objects_close), regions, cat, width = _grammar(processor)
    # 0 and 1: one object and a duplicate (IoU 0.9); 2 overlaps 0 a little (IoU 0.14); 3 apart
    boxes = [[0, 0, 10, 10], [0, 0, 10, 9], [5, 5, 15, 15], [50, 50, 60, 60]]
    named_0 = [ground, *cat, ground_close, objects, regions[0]]
    suppress = GroundingConstraint(vocab, [4], suppress_overlap=0.5, boxes=[boxes])
    assert _step(suppress, named_0, width) == {objects_close, regions[2], regions[3]}
    assert _step(suppress, [ground, *cat, ground_close, objects], width) == {objects_close, *regions[:4]}
    assert _step(suppress, [*named_0, objects_close, ground, *cat, ground_close, objects], width) == {
        objects_close,
        *regions[:4],
    }  # a new group offers every box again
    strict = GroundingConstraint(vocab, [4], suppress_overlap=0.1, boxes=[boxes])
    assert _step(strict, named_0, width) == {objects_close, regions[3]}
    plain = GroundingConstraint(vocab, [4])
    assert _step(plain, named_0, width) == {objects_close, *regions[1:4]}
    with pytest.raises(ValueError, match="one box list per sample"):
        GroundingConstraint(vocab, [4], suppress_overlap=0.5)
    with pytest.raises(ValueError, match="expected 4 boxes"):
        GroundingConstraint(vocab, [4], suppress_overlap=0.5, boxes=[boxes[:3]])
    with pytest.raises(ValueError, match=r"an IoU in \[0, 1\] or None, got 1.5"):
        GroundingConstraint(vocab, [4], suppress_overlap=1.5, boxes=[boxes])


def test_unique_labels_ground_each_asked_label_once(processor):
    vocab, (ground, ground_close, objects, objects_close), regions, cat, width = _grammar(processor)
    tokenizer = processor.tokenizer
    dog = tokenizer.encode("dog", add_special_tokens=False)
    cats = tokenizer.encode("cats", add_special_tokens=False)  # "cat" may be a prefix of it
    labels = [cat, dog, cats]
    first = [ground, *cat, ground_close, objects, regions[0], objects_close]
    unique = GroundingConstraint(vocab, [4], labels=labels, unique_labels=True)
    plain = GroundingConstraint(vocab, [4], labels=labels)
    starts = {spelling[0] for spelling in labels}
    assert _step(plain, [*first, ground], width) == starts
    after = _step(unique, [*first, ground], width)
    assert after == {dog[0], cats[0]}  # "cat" is still a prefix of "cats" when they share a token
    if cats[: len(cat)] == cat:
        assert ground_close not in _step(unique, [*first, ground, *cat], width)
    assert ground in _step(unique, first, width)
    every = [*first, ground, *dog, ground_close, objects, objects_close, ground, *cats, ground_close, objects]
    assert ground not in _step(unique, [*every, objects_close], width)  # every label used: no new group
    assert ground in _step(plain, [*every, objects_close], width)
    assert vocab.end_ids[0] in _step(unique, [*every, objects_close], width)
    free = GroundingConstraint(vocab, [4], unique_labels=True)  # no labels: any label text, again
    assert _step(free, [*first, ground, *cat], width) >= {ground_close}


def test_bad_region_counts_raise(processor):
    vocab = GrammarVocabulary.from_processor(processor)
    with pytest.raises(ValueError, match=r"\[0, 32\]"):
        GroundingConstraint(vocab, [33])
    with pytest.raises(ValueError, match="one per region count"):
        _step(GroundingConstraint(vocab, [1, 2]), [], 10)


def test_without_single_token_tags_only_region_ranges_apply(processor):
    vocab = dataclasses.replace(GrammarVocabulary.from_processor(processor), tags=None)
    regions = processor.region_token_ids
    allowed = _step(GroundingConstraint(vocab, [2]), [], len(processor.tokenizer))
    assert {regions[0], regions[1]} <= allowed and not allowed & set(regions[2:])
    assert processor.region_feature_token_id not in allowed


def test_count_from_list_makes_the_number_after_the_list_its_length(processor):
    vocab, (ground, ground_close, objects, objects_close), regions, cat, width = _grammar(processor)
    digit = {d: processor.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)}
    assert set(digit.values()) <= dict(vocab.digit_ids).keys()
    counted = GroundingConstraint(vocab, [12], count_from_list=True)
    plain = GroundingConstraint(vocab, [12])
    two = [ground, *cat, ground_close, objects, regions[3], regions[1], objects_close]
    after = _step(counted, two, width)
    assert after & set(digit.values()) == {digit[2]}  # the list's length, no other digit
    assert vocab.end_ids[0] in after and ground in after  # no number, or more answer, still allowed
    assert set(digit.values()) <= _step(plain, two, width)
    assert not _step(counted, [*two, digit[2]], width) & set(digit.values())  # the count is written
    # Distinct regions of every group count; a two-digit count, once started, must be finished.
    groups = [ground, *cat, ground_close, objects, *regions[:6], objects_close]
    groups += [ground, *cat, ground_close, objects, *regions[4:11], objects_close]  # 4, 5 again
    assert _step(counted, groups, width) & set(digit.values()) == {digit[1]}
    assert _step(counted, [*groups, digit[1]], width) == {digit[1]}  # 11: the second digit only
    none = [ground, *cat, ground_close, objects, objects_close]
    assert _step(counted, none, width) & set(digit.values()) == {digit[0]}
    # Digits elsewhere are free: in the label, after text that follows the list.
    space = processor.tokenizer.encode(" ", add_special_tokens=False)
    assert set(digit.values()) <= _step(counted, [*two, *space], width)
    assert set(digit.values()) <= _step(counted, [ground], width)
