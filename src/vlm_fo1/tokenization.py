"""Tokenizers: the FO1 special tokens on any Qwen2 tokenizer, and a tiny offline one.

The real checkpoint ships its own Qwen2 tokenizer. For tests, documentation and the miniature
world we build a small byte-level BPE tokenizer of the same class (``Qwen2Tokenizer``, same
pre-tokenizer regex) from a fixed corpus, offline and deterministically, in a few milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

from vlm_fo1.prompting import tokens as T

# The pre-tokenizer regex of Qwen2 (a fact of the tokenizer format, needed to reproduce its splits).
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_BASE_CORPUS = (
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Please detect {} in this image. Answer the question with object indexes.",
    "How many {} are there in this image? Count each instance of the target object. "
    "Locate them with object indexes and then answer the question with the number of objects.",
    "Please provide the ocr results of {} in the image.",
    "Provide a brief description for {}. Provide a detailed description for {}.",
    "Briefly describe this image and detect all mentioned objects. Answer with grounded object indexes.",
    "Using the provided object {} as a reference, identify all other objects of the same category "
    "in this image. Respond with object indexes.",
    "First thinks about the reasoning process in the mind and then provides the user with the answer.",
    "Please identify every object in the image and provide their labels along with their indexes.",
    "There are no such objects in the image. There is none. Yes. No. The answer is",
    "What color is the shape? Which shape is the largest? Is there a word in the image? What is it?",
    "red green blue yellow orange purple white black gray pink brown cyan magenta",
    "circle square triangle star diamond hexagon ring cross heart ellipse rectangle",
    "small medium large big tiny left right above below top bottom center middle of the next to",
    "cat dog person car apple orange bicycle chair table cup bottle bird horse text word letter",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ , . ; : ? ! ' \" ( ) - _ / + = # % &",
)


def fo1_added_tokens(max_regions: int = T.DEFAULT_MAX_REGIONS) -> list[str]:
    """The FO1 strings that must be single tokens: placeholder, region names and answer tags."""
    return [T.REGION_FEATURE_TOKEN, *T.region_tokens(max_regions), *T.GROUNDING_TAGS, *T.REASONING_TAGS]


def add_fo1_tokens(tokenizer: Qwen2Tokenizer, max_regions: int = T.DEFAULT_MAX_REGIONS) -> int:
    """Add the FO1 tokens that ``tokenizer`` lacks (in a fixed order); returns how many were added.

    A model built on this tokenizer must then resize its embeddings to ``len(tokenizer)``.
    """
    missing = [t for t in fo1_added_tokens(max_regions) if t not in tokenizer.get_vocab()]
    if not missing:
        return 0
    return tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])


def check_fo1_tokens(tokenizer: Qwen2Tokenizer, max_regions: int) -> dict[str, int]:
    """Ids of the placeholder and region tokens; ValueError naming any that is not one token."""
    result: dict[str, int] = {}
    broken: list[str] = []
    for text in [T.REGION_FEATURE_TOKEN, *T.region_tokens(max_regions), *T.CHAT_CONTROL_TOKENS]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            broken.append(f"{text!r} -> {len(ids)} ids")
        else:
            result[text] = ids[0]
    if broken:
        shown = ", ".join(broken[:5]) + (" …" if len(broken) > 5 else "")
        raise ValueError(
            f"expected every FO1 control string to be a single token, but {len(broken)} are not: {shown}. "
            "Call vlm_fo1.tokenization.add_fo1_tokens(tokenizer) and resize the model's embeddings."
        )
    return result


def fo1_token_ids(tokenizer: Qwen2Tokenizer, max_regions: int) -> dict[str, Any]:
    """``FO1Config``'s token-id fields read from ``tokenizer``: ``region_feature_token_id``,
    ``region_token_ids`` (``max_regions`` ids) and ``ground_token_ids`` (None unless ``<ground>``
    and ``</ground>`` are both tokens)."""
    vocab = tokenizer.get_vocab()
    ground = [vocab.get(tag) for tag in (T.GROUND_OPEN, T.GROUND_CLOSE)]
    return dict(
        region_feature_token_id=vocab[T.REGION_FEATURE_TOKEN],
        region_token_ids=[vocab[name] for name in T.region_tokens(max_regions)],
        ground_token_ids=None if None in ground else ground,
    )


def objects_close_id(tokenizer: Qwen2Tokenizer) -> int:
    """Id of ``</objects>``; ValueError when the tokenizer does not hold it as one token."""
    ids = tokenizer.encode(T.OBJECTS_CLOSE, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"expected {T.OBJECTS_CLOSE!r} to be a single token, got ids {ids}")
    return ids[0]


def _train_bpe(corpus: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[T.END_OF_TEXT],
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


@lru_cache(maxsize=8)
def _trained(
    corpus: tuple[str, ...], vocab_size: int
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab, merges = _train_bpe(corpus, vocab_size)
    return tuple(vocab.items()), tuple(merges)


def build_tiny_tokenizer(
    extra_corpus: Iterable[str] = (),
    *,
    vocab_size: int = 1000,
    max_regions: int = T.DEFAULT_MAX_REGIONS,
) -> Qwen2Tokenizer:
    """A small, deterministic ``Qwen2Tokenizer`` with all FO1 and Qwen control tokens, built offline.

    Args:
        extra_corpus: more text to learn merges from (e.g. the miniature world's vocabulary).
        vocab_size: size of the learned BPE vocabulary (added tokens come on top).
        max_regions: number of ``<regionN>`` tokens.
    """
    corpus = tuple(_BASE_CORPUS) + tuple(extra_corpus)
    vocab_items, merges = _trained(corpus, vocab_size)
    tokenizer = Qwen2Tokenizer(
        vocab=dict(vocab_items),
        merges=list(merges),
        unk_token=None,
        eos_token=T.IM_END,
        pad_token=T.END_OF_TEXT,
        bos_token=None,
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [t for t in T.CHAT_CONTROL_TOKENS if t != T.END_OF_TEXT]}
    )
    add_fo1_tokens(tokenizer, max_regions)
    return tokenizer
