"""The words of the miniature world: object phrases, referring expressions, questions, captions.

Conventions (the tiny model must learn them, so they never vary):

- class label of a shape = its kind (``"circle"``); of a word object = ``"word"``;
- plural label (counting) = the label plus ``"s"`` (``"circles"``, ``"words"``);
- object phrase = ``"{size} {colour} {kind}"`` (``"small red circle"``) for shapes and
  ``"{colour} word {TEXT}"`` (``"blue word CAT"``) for words;
- image caption = the object phrases sorted by box centre x (ties by y), each with ``"a"``
  (``"an"`` before a vowel), joined by ``", "`` and a final ``" and "``, first letter
  capitalised, ending in ``"."``: ``"A small red circle, an orange word CAT and a large green star."``
- a referring expression is used only when exactly one object fits it. Spatial relations are
  strict: ``A left of B`` means ``A.x2 <= B.x1`` (``above``: ``A.y2 <= B.y1``); superlatives need
  a margin (area ratio >= 1.25; centre gap >= 8 px) so they are never a close call.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence

from vlm_fo1.prompting import templates
from vlm_fo1.synthetic.scenes import WORD_KIND, SceneConfig, SceneObject

AREA_MARGIN = 1.25
POSITION_MARGIN = 8.0
RELATIONS = ("left of", "right of", "above", "below")
SUPERLATIVES = ("largest", "smallest")
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
SHAPE_NOUN = "shape"
YES, NO = "yes", "no"

Expression = tuple[str, str, int]  # (form, text, referent index)


def plural(label: str) -> str:
    """The counting label of a class: ``circle`` → ``circles``, ``word`` → ``words``."""
    return label + "s"


def label_of(obj: SceneObject) -> str:
    """The detection class of an object."""
    return obj.kind


def object_phrase(obj: SceneObject) -> str:
    """``"small red circle"`` / ``"blue word CAT"`` (the brief region caption)."""
    if obj.is_word:
        return f"{obj.colour} word {obj.text}"
    return f"{obj.size} {obj.colour} {obj.kind}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def image_caption(objects: Sequence[SceneObject]) -> str:
    """The canonical caption: every object phrase, left to right (see the module docstring)."""
    if not objects:
        return "An empty image."
    ordered = sorted(objects, key=lambda o: (o.center[0], o.center[1]))
    text = _join([_with_article(object_phrase(o)) for o in ordered]) + "."
    return text[0].upper() + text[1:]


def _unique(objects: Sequence[SceneObject], keep: Callable[[SceneObject], bool]) -> int | None:
    hits = [i for i, o in enumerate(objects) if keep(o)]
    return hits[0] if len(hits) == 1 else None


def _attribute_expressions(objects: Sequence[SceneObject]) -> Iterator[Expression]:
    """``the red circle``, ``the small circle``, ``the small red circle``, ``the word CAT``."""
    for obj in objects:
        noun = label_of(obj)
        candidates: list[tuple[str, str, Callable[[SceneObject], bool]]] = [
            ("colour", f"the {obj.colour} {noun}", lambda o, t=obj: o.kind == t.kind and o.colour == t.colour)
        ]
        if obj.is_word:
            candidates.append(
                ("text", f"the word {obj.text}", lambda o, t=obj: o.is_word and o.text == t.text)
            )
        else:
            candidates.append(
                ("size", f"the {obj.size} {noun}", lambda o, t=obj: o.kind == t.kind and o.size == t.size)
            )
            candidates.append(
                (
                    "size_colour",
                    f"the {obj.size} {obj.colour} {noun}",
                    lambda o, t=obj: o.kind == t.kind and o.size == t.size and o.colour == t.colour,
                )
            )
        for form, text, keep in candidates:
            referent = _unique(objects, keep)
            if referent is not None:
                yield form, text, referent


def _extreme(values: list[tuple[float, int]], margin: float, ratio: bool) -> int | None:
    """Index of the smallest value when it beats the runner-up by ``margin`` (a ratio or a gap)."""
    ordered = sorted(values)
    (best, index), (second, _) = ordered[0], ordered[1]
    clear = second >= best * margin if ratio else second - best >= margin
    return index if clear else None


def _by_kind(objects: Sequence[SceneObject]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, obj in enumerate(objects):
        groups.setdefault(label_of(obj), []).append(i)
    return groups


def _superlative_expressions(objects: Sequence[SceneObject]) -> Iterator[Expression]:
    """``the largest circle``, ``the leftmost word`` … among two or more of a kind."""
    for noun, members in _by_kind(objects).items():
        if len(members) < 2:
            continue
        keys: dict[str, tuple[Callable[[SceneObject], float], bool, float]] = {
            "leftmost": (lambda o: o.center[0], False, POSITION_MARGIN),
            "rightmost": (lambda o: -o.center[0], False, POSITION_MARGIN),
            "topmost": (lambda o: o.center[1], False, POSITION_MARGIN),
            "bottommost": (lambda o: -o.center[1], False, POSITION_MARGIN),
        }
        if noun != WORD_KIND:
            keys["smallest"] = (lambda o: o.area, True, AREA_MARGIN)
            keys["largest"] = (lambda o: 1.0 / o.area, True, AREA_MARGIN)
        for word, (key, ratio, margin) in keys.items():
            referent = _extreme([(key(objects[i]), i) for i in members], margin, ratio)
            if referent is not None:
                yield ("superlative" if ratio else "extreme"), f"the {word} {noun}", referent


def related(a: SceneObject, relation: str, b: SceneObject) -> bool:
    """Strict spatial relation between two boxes (``a`` is ``relation`` ``b``)."""
    if relation == "left of":
        return a.box[2] <= b.box[0]
    if relation == "right of":
        return a.box[0] >= b.box[2]
    if relation == "above":
        return a.box[3] <= b.box[1]
    if relation == "below":
        return a.box[1] >= b.box[3]
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _relation_expressions(objects: Sequence[SceneObject]) -> Iterator[Expression]:
    """``the square left of the star``: the anchor is alone of its kind, the target unique."""
    groups = _by_kind(objects)
    anchors = [objects[members[0]] for members in groups.values() if len(members) == 1]
    for anchor in anchors:
        for noun in groups:
            if noun == label_of(anchor):
                continue
            for relation in RELATIONS:

                def fits(o: SceneObject, n: str = noun, r: str = relation, a: SceneObject = anchor) -> bool:
                    return label_of(o) == n and related(o, r, a)

                referent = _unique(objects, fits)
                if referent is not None:
                    yield "relation", f"the {noun} {relation} the {label_of(anchor)}", referent


def referring_expressions(objects: Sequence[SceneObject]) -> list[Expression]:
    """Every unambiguous expression of the scene as ``(form, text, referent index)``."""
    found = [
        *_attribute_expressions(objects),
        *_superlative_expressions(objects),
        *_relation_expressions(objects),
    ]
    return list(dict.fromkeys(found))


def _largest_shape(shapes: Sequence[SceneObject]) -> SceneObject | None:
    if len(shapes) == 1:
        return shapes[0]
    if len(shapes) < 2:
        return None
    index = _extreme([(1.0 / o.area, i) for i, o in enumerate(shapes)], AREA_MARGIN, True)
    return None if index is None else shapes[index]


def vqa_questions(
    objects: Sequence[SceneObject], config: SceneConfig, rng: random.Random
) -> list[tuple[str, str, str]]:
    """Whole-image questions with short closed answers: ``(question type, question, answer)``.

    One question per applicable type; ``exists`` asks about a present or an absent combination
    with equal chance.
    """
    shapes = [o for o in objects if not o.is_word]
    words = [o for o in objects if o.is_word]
    questions = [("count_shapes", "How many shapes are there?", str(len(shapes)))]
    kind = rng.choice(config.classes)
    questions.append(
        ("count_kind", f"How many {plural(kind)} are there?", str(sum(o.kind == kind for o in objects)))
    )
    largest = _largest_shape(shapes)
    if largest is not None:
        questions.append(("largest_colour", "What colour is the largest shape?", largest.colour))
    present = sorted({(o.colour, o.kind) for o in shapes})
    absent = [(c, k) for c in config.colour_names for k in config.kinds if (c, k) not in present]
    pool = present if present and (not absent or rng.random() < 0.5) else absent
    if pool:
        colour, kind = rng.choice(pool)
        questions.append(("exists", f"Is there a {colour} {kind}?", YES if (colour, kind) in present else NO))
    for colour in sorted({o.colour for o in shapes}):
        same = [o for o in objects if o.colour == colour]
        if len(same) == 1:
            questions.append(("shape_of_colour", f"What shape is the {colour} object?", same[0].kind))
    if len(words) == 1:
        questions.append(("read_word", "What word is written in the image?", str(words[0].text)))
    return questions


CAPTION_QUESTION = "Describe the image."
VQA_QUESTION_FORMS = (
    "How many shapes are there?",
    "How many {plural} are there?",
    "What colour is the largest shape?",
    "Is there a {colour} {kind}?",
    "What shape is the {colour} object?",
    "What word is written in the image?",
    CAPTION_QUESTION,
)


_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_SLOT_RE = re.compile(r"\{\w*\}")


def split_words(text: str) -> list[str]:
    """Words and punctuation marks of ``text`` (the unit of :func:`world_vocabulary`)."""
    return _TOKEN_RE.findall(text)


def world_vocabulary(config: SceneConfig | None = None) -> list[str]:
    """Every word and punctuation mark the world's prompts and answers use (sorted, unique).

    Covers the release templates used here, the questions, labels, plurals, colours, sizes,
    relation and superlative words, the word vocabulary, numbers up to the most objects, ``yes``
    and ``no``. Special tokens (``<regionN>``, grounding tags) are not included.
    """
    config = config or SceneConfig()
    used_templates = (
        templates.OD_TEMPLATE,
        templates.OD_COUNTING_TEMPLATE,
        templates.REGION_OCR_TEMPLATE,
        templates.BRIEF_REGION_CAPTION_TEMPLATE,
        templates.VISUAL_PROMPT_OD_TEMPLATE,
    )
    labels = [*config.kinds, WORD_KIND, SHAPE_NOUN]
    phrases = [
        *used_templates,
        *VQA_QUESTION_FORMS,
        "the a an and An empty image. A , " + " ".join(RELATIONS + SUPERLATIVES + EXTREMES),
        " ".join(labels + [plural(label) for label in labels]),
        " ".join((*config.colour_names, *config.size_names, *config.words, YES, NO)),
        " ".join(str(n) for n in range(max(config.objects_range[1], 10) + 1)),
    ]
    return sorted({token for phrase in phrases for token in split_words(_SLOT_RE.sub(" ", phrase))})
