"""The tiny offline tokenizer and FO1 token handling."""

from __future__ import annotations

import pytest

from vlm_fo1.prompting import tokens as T
from vlm_fo1.tokenization import add_fo1_tokens, build_tiny_tokenizer, check_fo1_tokens


def test_deterministic_and_complete():
    a, b = build_tiny_tokenizer(max_regions=8), build_tiny_tokenizer(max_regions=8)
    assert a.get_vocab() == b.get_vocab()
    ids = check_fo1_tokens(a, 8)
    assert len(set(ids.values())) == len(ids)
    text = "Please detect cat in this image."
    assert a.decode(a.encode(text)) == text


def test_extra_corpus_learns_merges():
    base = build_tiny_tokenizer(max_regions=4)
    extra = build_tiny_tokenizer(["zyxwv zyxwv zyxwv"] * 20, max_regions=4)
    assert len(extra.encode("zyxwv")) < len(base.encode("zyxwv"))


def test_missing_tokens_are_reported_and_added():
    tokenizer = build_tiny_tokenizer(max_regions=4)
    with pytest.raises(ValueError, match="<region4>"):
        check_fo1_tokens(tokenizer, 6)
    assert add_fo1_tokens(tokenizer, 6) == 2
    assert add_fo1_tokens(tokenizer, 6) == 0
    assert len(tokenizer.encode(T.region_token(5), add_special_tokens=False)) == 1
