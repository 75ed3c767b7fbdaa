"""VQA accuracy as the official VQAv2 evaluation computes it (also used for OK-VQA), and GQA.

Two versions of the official ``vqaEval.py`` (GT-Vision-Lab/VQA) are in use, and ``rules`` picks one:

- ``"official"`` (the default): the script as it is since its fix of March 2021 (commit a013f00, "Fixed
  processing answers bug"). Prediction and ground-truth answers have newlines and tabs made spaces and are
  stripped; then, only when the annotators disagree, *both* sides get ``process_punctuation`` and
  ``process_digit_article``. When all annotators gave the same answer, neither side is normalised: the
  prediction must equal that answer as written ("Yes" does not match ten "yes").
- ``"lavis"``: the 2016 script that LAVIS copies, which the published BLIP-2 numbers come from. The
  prediction always gets both steps; the ground-truth answers get only ``process_punctuation``, and only
  when the annotators disagree, so a ground truth written as "two" never matches (the official files store
  answers already lower-cased with digits).

The normalisation steps reproduce the script, quirks included:

- ``process_punctuation``: each character of a fixed list is deleted if the *original* answer
  has it next to a space, or has a digit-comma-digit anywhere ("1,000" -> "1000"); otherwise it
  becomes a space ("yes/no" -> "yes no"). Then every "." not followed by a digit is deleted
  ("3.5" keeps its point); the official call passes ``re.UNICODE`` as the ``count`` argument, so at
  most 32 periods go. Apostrophes and colons are left alone.
- ``process_digit_article``: lower-case, number words zero..ten -> digits ("none" -> "0"),
  articles a/an/the dropped, apostrophe-less contractions restored ("dont" -> "don't").

Accuracy of one question: for each annotator, min(#other annotators who gave the predicted answer
/ 3, 1); averaged over the annotators (= over the 10 leave-one-out subsets of 9).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from blip2.eval.formats import GQAQuestion, VQAAnnotation

__all__ = [
    "process_punctuation",
    "process_digit_article",
    "normalize_answer",
    "vqa_question_accuracy",
    "VQAScore",
    "VQA_RULES",
    "vqa_accuracy",
    "gqa_accuracy",
]

VQA_RULES = ("official", "lavis")
Rules = Literal["official", "lavis"]

# The official table. The capitalised keys ("Im", "Ive", "Id've", "I'dve") can never match because
# the text is lower-cased first; they are kept so the table stays the official one.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES = frozenset({"a", "an", "the"})

# In this order (the order only matters for which replacement happens first; the result is the same).
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)": a mistyped look-behind that is really a look-ahead
# for the text "<=digit", which never follows a "." -- so it deletes every "." not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official script calls periodStrip.sub("", text, re.UNICODE): the flag lands in `count`.
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    # the conditions look at the original text, not at the text being rewritten (as officially)
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, no articles, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """Both normalisation steps, as the official evaluation applies them to an answer."""
    return process_digit_article(process_punctuation(_clean(answer)))


def _compared(prediction: str, gt_answers: Sequence[str], rules: Rules) -> tuple[str, list[str]]:
    """The prediction and the ground-truth answers as ``rules`` compares them (see the module docstring)."""
    if rules == "official":
        gts, pred = [_clean(a) for a in gt_answers], _clean(prediction)
        if len(set(gts)) > 1:
            return normalize_answer(pred), [normalize_answer(a) for a in gts]
        return pred, gts
    if rules == "lavis":
        gts = list(gt_answers)
        return normalize_answer(prediction), [process_punctuation(a) for a in gts] if len(set(gts)) > 1 else gts
    raise ValueError(f"rules must be one of {VQA_RULES}, got {rules!r}")


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str], rules: Rules = "official") -> float:
    """Official accuracy of one answer in [0, 1] against the annotators' answers (10 in VQAv2).

    Leave-one-out is by position: the official script removes answer dicts that compare equal, and
    those are unique in the real files because each carries its own answer_id.
    """
    if not gt_answers:
        raise ValueError("vqa_question_accuracy: no ground-truth answers")
    pred, gts = _compared(prediction, gt_answers, rules)
    matches = sum(a == pred for a in gts)
    # leaving out annotator j leaves matches - [gts[j] == pred] matching answers among the others
    return sum(min(1.0, (matches - (a == pred)) / 3.0) for a in gts) / len(gts)


@dataclass
class VQAScore:
    """Accuracies in percent, unrounded (the official script rounds to 2 decimals for display)."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float]


def _check_keys(predictions: Mapping, wanted: Sequence, what: str) -> None:
    missing = [k for k in wanted if k not in predictions]
    extra = set(predictions) - set(wanted)
    if missing or extra:
        raise ValueError(
            f"{what}: predictions must cover exactly the annotated questions: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} not annotated (e.g. {sorted(map(repr, extra))[:3]}); "
            "check that the ids have the same type (int vs str)"
        )


def vqa_accuracy(predictions: Mapping[int, str], annotations: Sequence[VQAAnnotation], rules: Rules = "official"
                 ) -> VQAScore:
    """Official VQAv2 / OK-VQA accuracy of ``predictions`` (question_id -> answer), by the current official
    script's ``rules`` or LAVIS's (the module docstring says how they differ).

    Like the official API, the predictions must answer exactly the annotated questions.
    """
    if not annotations:
        raise ValueError("vqa_accuracy: no annotations")
    _check_keys(predictions, [a.question_id for a in annotations], "vqa_accuracy")
    per_question: dict[int, float] = {}
    by_answer_type: dict[str, list[float]] = defaultdict(list)
    by_question_type: dict[str, list[float]] = defaultdict(list)
    for a in annotations:
        acc = vqa_question_accuracy(predictions[a.question_id], a.answers, rules)
        per_question[a.question_id] = 100.0 * acc
        by_answer_type[a.answer_type].append(acc)
        by_question_type[a.question_type].append(acc)

    def mean_pct(xs: list[float]) -> float:
        return 100.0 * sum(xs) / len(xs)

    return VQAScore(
        overall=sum(per_question.values()) / len(per_question),
        per_answer_type={k: mean_pct(v) for k, v in by_answer_type.items()},
        per_question_type={k: mean_pct(v) for k, v in by_question_type.items()},
        per_question=per_question,
    )


def gqa_accuracy(predictions: Mapping[str, str], questions: Sequence[GQAQuestion]) -> float:
    """GQA accuracy in percent: exact match after VQA normalisation of both prediction and answer.

    LAVIS normalises the prediction only; GQA answers are single lower-case words, for which
    normalising them too changes nothing except number words, which then match their digits.
    """
    if not questions:
        raise ValueError("gqa_accuracy: no questions")
    _check_keys(predictions, [q.question_id for q in questions], "gqa_accuracy")
    hits = 0
    for q in questions:
        if q.answer is None:
            raise ValueError(f"gqa_accuracy: question {q.question_id!r} has no answer")
        hits += normalize_answer(predictions[q.question_id]) == normalize_answer(q.answer)
    return 100.0 * hits / len(questions)
