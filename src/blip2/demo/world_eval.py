"""Check a model's captions and answers against a ``blip2.demo.world`` scene.

``parse_caption`` reads free text tolerantly: "and"/commas/"with"/"next to" all separate
objects, plurals and number words ("two red circles") expand, articles and filler are ignored,
missing size or colour words become None. ``caption_scores`` compares the parsed objects with
the scene as multisets (order is not scored):

- ``objects_correct``: every object's colour and shape named, nothing invented;
- ``exact``: the same, and every size right too.
"""

from __future__ import annotations

import re
from collections import Counter

from blip2.demo.world import COLORS, COUNT_WORDS, SHAPES, SIZES, Scene

__all__ = ["parse_caption", "caption_scores", "caption_correct", "normalize_answer", "answer_correct"]

_NUMBERS = {w: i for i, w in enumerate(COUNT_WORDS)} | {str(i): i for i in range(len(COUNT_WORDS))} | {"a": 1, "an": 1}
_ALIASES = {"big": "large", "little": "small", "violet": "purple"}


def _words(text: str) -> list[str]:
    return [_ALIASES.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def _singular(word: str) -> str:
    return word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word


def parse_caption(text: str) -> list[tuple[str | None, str | None, str]]:
    """Objects named in ``text`` as (size, color, shape), in the order they are mentioned.

    A shape word closes an object; the last size, colour and number word since the previous
    shape word describe it ("two small red circles" -> two entries).
    """
    out: list[tuple[str | None, str | None, str]] = []
    size = color = None
    count = 1
    for w in _words(text):
        w = _singular(w)
        if w in SIZES:
            size = w
        elif w in COLORS:
            color = w
        elif w in _NUMBERS:
            count = _NUMBERS[w]
        elif w in SHAPES:
            out += [(size, color, w)] * count
            size = color = None
            count = 1
    return out


def caption_scores(text: str, scene: Scene) -> dict[str, bool]:
    """``{"objects_correct": bool, "exact": bool}`` for caption ``text`` of ``scene``."""
    said = parse_caption(text)
    truth = [(o.size, o.color, o.shape) for o in scene.objects]
    objects = Counter((c, s) for _, c, s in said) == Counter((c, s) for _, c, s in truth)
    return {"objects_correct": objects, "exact": objects and Counter(said) == Counter(truth)}


def caption_correct(text: str, scene: Scene, require_size: bool = False) -> bool:
    """True when ``text`` names every object's colour and shape (and size, if asked), nothing more."""
    return caption_scores(text, scene)["exact" if require_size else "objects_correct"]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, digits as words: " Two." -> "two"."""
    words = [w for w in _words(text) if w not in ("a", "an", "the")]
    return " ".join(COUNT_WORDS[int(w)] if w.isdigit() and int(w) < len(COUNT_WORDS) else w for w in words)


def answer_correct(prediction: str, answer: str) -> bool:
    """Exact match after ``normalize_answer``, or else the only colour/shape/count word in
    ``prediction`` is ``answer`` ("it is red" is right for "red"; "red or blue" is not)."""
    pred = normalize_answer(prediction)
    if pred == answer:
        return True
    vocab = set(COLORS) | set(SHAPES) | set(COUNT_WORDS)
    named = {_singular(w) for w in pred.split() if _singular(w) in vocab}
    return named == {answer}
