"""Evaluation metrics and formats, against values worked out by hand (and against pycocoevalcap's
own BLEU / CIDEr scorers and Java PTB tokenizer when they are installed)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from blip2.eval import (
    CaptionedImage,
    GQAQuestion,
    KarpathyEntry,
    RetrievalSet,
    VQAAnnotation,
    VQAQuestion,
    cider_d,
    corpus_bleu,
    evaluate_captions,
    evaluate_nocaps,
    gqa_accuracy,
    meteor_score,
    normalize_answer,
    process_punctuation,
    ptb_tokenize,
    ranks_from_rankings,
    read_caption_results,
    read_coco_captions,
    read_gqa_questions,
    read_karpathy,
    read_nocaps,
    read_retrieval,
    read_vqa_annotations,
    read_vqa_questions,
    read_vqa_results,
    recall_at_k,
    rerank_top_k,
    retrieval_recall,
    retrieval_recall_from_rankings,
    spice_score,
    tokenize_captions,
    vqa_accuracy,
    vqa_question_accuracy,
    write_caption_results,
    write_coco_captions,
    write_gqa_questions,
    write_karpathy,
    write_nocaps,
    write_retrieval,
    write_vqa_annotations,
    write_vqa_questions,
    write_vqa_results,
)

HAVE_PYCOCOEVALCAP = importlib.util.find_spec("pycocoevalcap") is not None
HAVE_JAVA = shutil.which("java") is not None
needs_pycocoevalcap = pytest.mark.skipif(not HAVE_PYCOCOEVALCAP, reason="pycocoevalcap not installed")
needs_java_tools = pytest.mark.skipif(not (HAVE_PYCOCOEVALCAP and HAVE_JAVA), reason="needs pycocoevalcap and java")


# ============================================================================ VQA normalisation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),  # number words -> digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are in the table
        ("The dog", "dog"),  # articles dropped
        ("an apple a day", "apple day"),
        ("dont know", "don't know"),  # contractions restored
        ("yes.", "yes"),  # period not followed by a digit: deleted
        ("3.5", "3.5"),  # decimal point kept
        ("1,000", "1000"),  # comma between digits: deleted
        ("yes/no", "yes no"),  # punctuation not next to a space: becomes a space
        ("red, white", "red white"),  # ", " in the text: the comma is deleted
        ("1,000 a-b", "1000 ab"),  # a digit-comma-digit anywhere deletes all punctuation
        ("  Two\tdogs!\n", "2 dogs"),
        ("Im", "im"),  # capitalised table keys never match after lower-casing (official)
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_period_strip_quirk_at_most_32_periods() -> None:
    # the official script passes re.UNICODE (32) as sub()'s count
    assert process_punctuation("." * 40) == "." * 8


# ============================================================================ VQA accuracy


def ten(answer: str, k: int, other: str = "3") -> list[str]:
    """k annotators say `answer`, the other 10 - k say `other`."""
    return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    "k, expected",
    [
        # leaving out one of the 10 annotators leaves 9; acc = mean over the 10 of min(matches / 3, 1)
        (0, 0.0),
        (1, (9 * (1 / 3) + 1 * 0) / 10),  # 0.3
        (2, (8 * (2 / 3) + 2 * (1 / 3)) / 10),  # 0.6
        (3, (7 * 1 + 3 * (2 / 3)) / 10),  # 0.9
        (4, 1.0),  # 6 * 1 + 4 * min(3/3, 1)
    ],
)
@pytest.mark.parametrize("rules", ["official", "lavis"])
def test_vqa_question_accuracy_disagreeing_annotators(k: int, expected: float, rules: str) -> None:
    # the prediction "two" is normalised to "2"; the ground truth is already in digits, as in VQAv2
    assert vqa_question_accuracy("two", ten("2", k), rules) == pytest.approx(expected, abs=1e-12)


# (prediction, annotators' answers, accuracy by the 2021 official script, by the 2016 one LAVIS copies)
RULE_CASES = [
    # annotators disagree: both normalise the prediction; 2021 normalises the answers fully, 2016 only
    # their punctuation ("red, white" -> "red white")
    ("red white", ten("red, white", 3, "red"), 0.9, 0.9),
    ("Two.", ten("2", 3), 0.9, 0.9),
    ("2", ten("two", 3, "three"), 0.9, 0.0),  # 2016 leaves "two" as written: never matches a digit
    ("dog", ten("the dog", 4, "cat"), 1.0, 0.0),  # ... nor drops its article
    ("no", ten("No.", 2, "yes"), 0.6, 0.0),  # ... nor lower-cases it ("No" after its punctuation)
    ("dont know", ten("don't know", 3, "no"), 0.9, 0.9),
    # annotators agree: 2021 compares prediction and answer as written (but stripped); 2016 normalises the
    # prediction only
    ("yes", ["yes"] * 10, 1.0, 1.0),
    ("Yes", ["yes"] * 10, 0.0, 1.0),
    ("Two.", ["2"] * 10, 0.0, 1.0),
    ("two", ["two"] * 10, 1.0, 0.0),
    ("red, white", ["red, white"] * 10, 1.0, 0.0),
    (" yes\n", ["yes"] * 10, 1.0, 1.0),  # newlines and tabs become spaces and ends are stripped, both
    ("yes", ["yes\t"] * 10, 1.0, 0.0),  # 2016 never cleans the annotators' answers
    ("the dog", ["dog"] * 10, 0.0, 1.0),
]


@pytest.mark.parametrize("prediction, answers, official, lavis", RULE_CASES)
def test_vqa_rules_case_by_case(prediction: str, answers: list[str], official: float, lavis: float) -> None:
    assert vqa_question_accuracy(prediction, answers) == pytest.approx(official, abs=1e-12)  # the default
    assert vqa_question_accuracy(prediction, answers, "official") == pytest.approx(official, abs=1e-12)
    assert vqa_question_accuracy(prediction, answers, "lavis") == pytest.approx(lavis, abs=1e-12)


def test_vqa_rules_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"rules must be one of \('official', 'lavis'\), got '2019'"):
        vqa_question_accuracy("yes", ["yes"], "2019")


def make_annotations() -> list[VQAAnnotation]:
    return [
        VQAAnnotation(1, 100, ten("yes", 10), "yes", "yes/no", "is the"),
        VQAAnnotation(2, 100, ten("2", 2), "3", "number", "how many"),
        VQAAnnotation(3, 101, ten("red", 1, "blue"), "blue", "other", "what color is the"),
        VQAAnnotation(4, 101, ten("no", 10), "no", "yes/no", "is the"),
    ]


def test_vqa_accuracy_breakdown() -> None:
    preds = {1: "Yes", 2: "two", 3: "red", 4: "yes"}
    score = vqa_accuracy(preds, make_annotations(), rules="lavis")
    # per question: 100, 60, 30, 0
    assert score.per_question == pytest.approx({1: 100.0, 2: 60.0, 3: 30.0, 4: 0.0})
    assert score.overall == pytest.approx((100 + 60 + 30 + 0) / 4)
    assert score.per_answer_type == pytest.approx({"yes/no": 50.0, "number": 60.0, "other": 30.0})
    assert score.per_question_type == pytest.approx({"is the": 50.0, "how many": 60.0, "what color is the": 30.0})
    # by the 2021 script "Yes" misses ten annotators' "yes": nothing normalises a unanimous question
    score = vqa_accuracy(preds, make_annotations())
    assert score.per_question == pytest.approx({1: 0.0, 2: 60.0, 3: 30.0, 4: 0.0})
    assert score.per_answer_type == pytest.approx({"yes/no": 0.0, "number": 60.0, "other": 30.0})


def test_vqa_accuracy_rejects_mismatched_predictions() -> None:
    anns = make_annotations()
    with pytest.raises(ValueError, match="1 missing"):
        vqa_accuracy({1: "yes", 2: "2", 3: "red"}, anns)
    # string ids for int-keyed annotations: everything missing, and the message says why
    with pytest.raises(ValueError, match="int vs str"):
        vqa_accuracy({str(a.question_id): "yes" for a in anns}, anns)


def test_gqa_exact_match_after_normalisation() -> None:
    questions = [
        GQAQuestion("1", "n1", "What animal is it?", "dog"),
        GQAQuestion("2", "n1", "How many?", "2"),
        GQAQuestion("3", "n2", "Which side?", "right"),
    ]
    # "The dog." -> "dog" (hit), "two" -> "2" (hit), "left" (miss)
    assert gqa_accuracy({"1": "The dog.", "2": "two", "3": "left"}, questions) == pytest.approx(200 / 3)


# ============================================================================ caption tokenization


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('A man\'s dog isn\'t running, he can\'t "jump" (really).',
         "a man 's dog is n't running he ca n't jump -lrb- really -rrb-"),
        ("The U.S. flag at 3.5 o'clock... near St. Mary's!", "the u.s. flag at 3.5 o'clock near st. mary 's"),
        ("black-and-white photo; 1,000 people: yes/no?", "black-and-white photo 1,000 people yes/no"),
        ("A clock that reads 10:30.", "a clock that reads 10:30"),
        ("I'm gonna eat; you'd've cannot", "i 'm gon na eat you 'd 've can not"),
        ("the dogs' toys -- two of them", "the dogs toys two of them"),
        ("What a view!!", "what a view !!"),  # PTB keeps "!!" as one token; only "!" is dropped
        # as the Java tokenizer splits them (checked against it below where Java is present): a clitic
        # before a period; an abbreviation before more periods keeps one of them
        ("the dog 's.", "the dog 's"),
        ("in the u.s..", "in the u.s."),
        ("mr.... smith", "mr. smith"),
        ("st.. louis", "st. louis"),
        ("i saw a.. dog", "i saw a. dog"),
        ("the dog.. ran", "the dog ran"),
        ("'em. 'hello'.", "'em hello"),
    ],
)  # fmt: skip
def test_ptb_tokenize(raw: str, expected: str) -> None:
    assert ptb_tokenize(raw) == expected


CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A kitchen with wooden cabinets, a sink, and a window.",
    "A man's reflection in a mirror while he's shaving",
    'A "Stop" sign at the intersection of Main St. and 5th Ave.',
    "An airplane (a large jet) flying over the city.",
    "A bathroom with a toilet, sink and shower/tub combo.",
    "A 747 airplane at the gate - waiting for passengers",
    "Is this a bathroom?",
    "The dog doesn't want to take a bath.",
    "There are 3 people and 1,000 balloons; it's 3:30 p.m.",
    "It's a sunny day at the beach, isn't it?",
    "A dog's toy lies on the floor and the dogs' bowls are empty...",
    "the dog 's.",
    "in the u.s..",
    "mr.... smith",
    "St.. Louis at 5 p.m... yes",
    "i saw a.. dog, 'em. 'hello'.",
]


@needs_java_tools
def test_python_tokenizer_matches_java_ptb_tokenizer() -> None:
    java = tokenize_captions({i: [c] for i, c in enumerate(CAPTIONS)}, tokenizer="java")
    assert [java[i][0] for i in range(len(CAPTIONS))] == [ptb_tokenize(c) for c in CAPTIONS]


def test_auto_tokenizer_is_java_where_it_runs_else_python_saying_so(monkeypatch, caplog) -> None:
    refs, preds = {1: ["in the u.s.."], 2: ["mr.... smith"]}, {1: "the dog 's.", 2: "a dog"}
    if HAVE_PYCOCOEVALCAP and HAVE_JAVA:
        with caplog.at_level(logging.WARNING, logger="blip2.eval"):
            assert evaluate_captions(refs, preds, meteor=False, spice=False).tokenizer == "java"
        assert caplog.text == ""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="blip2.eval"):
        scores = evaluate_captions(refs, preds, meteor=False, spice=False)
    assert scores.tokenizer == "python"
    assert ("caption metrics: pycocoevalcap's Java PTB tokenizer cannot run (" in caplog.text
            and "tokenizing with blip2's Python PTB tokenizer instead" in caplog.text)
    with pytest.raises(RuntimeError, match="tokenizer='java': "):
        tokenize_captions(refs, tokenizer="java")


@needs_java_tools
def test_a_java_tokenizer_that_fails_falls_back_under_auto_only(monkeypatch, caplog) -> None:
    def crash(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["java"])

    monkeypatch.setattr(subprocess, "run", crash)
    with caplog.at_level(logging.WARNING, logger="blip2.eval"):
        assert tokenize_captions({1: ["A dog."]}) == {1: ["a dog"]}
    assert "cannot run (it failed: Command '['java']' returned non-zero exit status 1.)" in caplog.text
    with pytest.raises(RuntimeError, match="tokenizer='java': it failed"):
        tokenize_captions({1: ["A dog."]}, tokenizer="java")


# ============================================================================ BLEU


def test_corpus_bleu_by_hand() -> None:
    refs = {1: ["the cat sat on the mat", "a cat is on the mat"], 2: ["a dog runs"]}
    hyps = {1: "the cat on the mat", 2: "a dog"}
    # image 1: 1-grams 5/5, 2-grams 3/4 (the cat, on the, the mat), 3-grams 1/3 (on the mat), 4-grams 0/2;
    #          closest reference length 6
    # image 2: 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams; reference length 3
    # corpus: correct [7, 4, 1, 0], guess [7, 5, 3, 2], hypothesis length 7, reference length 9
    bp = math.exp(1 - 9 / 7)
    p = [7 / 7, 4 / 5, 1 / 3, 1e-15 / 2]  # a zero count becomes 1e-15 (pycocoevalcap's guard)
    expected = [math.prod(p[: k + 1]) ** (1 / (k + 1)) * bp for k in range(4)]
    assert corpus_bleu(refs, hyps) == pytest.approx(expected, rel=1e-9)
    assert expected[1] == pytest.approx(math.sqrt(0.8) * bp)


def test_bleu_closest_reference_length_prefers_shorter_on_tie() -> None:
    # references of 4 and 2 words, hypothesis of 3: both 1 away, the shorter (2) is taken, so no
    # brevity penalty; with the longer one BLEU-1 would be exp(1 - 4/3) ~ 0.72
    bleu1 = corpus_bleu({0: ["a b c d", "a b"]}, {0: "a b c"})[0]
    assert bleu1 == pytest.approx(1.0, abs=1e-9)


# ============================================================================ CIDEr-D


def test_cider_d_by_hand() -> None:
    # two images, so idf = log(2 / df): "x" is in both images' references -> weight 0;
    # "y", "z", "x y", "x z" are in one each -> weight log 2 per occurrence
    refs = {"A": ["x y"], "B": ["x z"]}
    hyps = {"A": "y y", "B": "z"}
    # A: unigram hyp {y: 2 log2}, ref {x: 0, y: log2}. Clipped: min(2 log2, log2) * log2 / (2 log2 * log2)
    #    = 0.5 (unclipped it would be 1); bigram "y y" not in ref -> 0; no 3-, 4-grams; same length.
    #    score = 10 * mean(0.5, 0, 0, 0) = 1.25
    # B: unigram cosine 1; no bigrams in hyp -> 0; lengths 1 vs 2 -> penalty exp(-1 / (2 * 6^2))
    #    score = 10 * mean(exp(-1/72), 0, 0, 0) = 2.5 exp(-1/72)
    mean, per_image = cider_d(refs, hyps)
    assert per_image == pytest.approx({"A": 1.25, "B": 2.5 * math.exp(-1 / 72)}, rel=1e-12)
    assert mean == pytest.approx((1.25 + 2.5 * math.exp(-1 / 72)) / 2, rel=1e-12)


def test_cider_d_identical_caption_scores_ten_on_the_ngrams_it_has() -> None:
    # 4 words -> all four n-gram orders present; idf nonzero because the other image differs
    refs = {0: ["a b c d"], 1: ["e f g h"]}
    _, per_image = cider_d(refs, {0: "a b c d", 1: "e f g h"})
    assert per_image == pytest.approx({0: 10.0, 1: 10.0})


def test_caption_metrics_reject_missing_hypotheses() -> None:
    with pytest.raises(ValueError, match="1 missing"):
        corpus_bleu({0: ["a"], 1: ["b"]}, {0: "a"})
    with pytest.raises(ValueError, match="1 missing"):
        cider_d({0: ["a"], 1: ["b"]}, {0: "a"})


def random_corpus(seed: int, n_images: int) -> tuple[dict[int, list[str]], dict[int, str]]:
    rng = random.Random(seed)
    vocab = "a man dog cat on the with grass red is sitting in of two".split()

    def sentence(lo: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, 12)))

    refs = {i: [sentence(1) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    return refs, {i: sentence(0) for i in range(n_images)}


@needs_pycocoevalcap
@pytest.mark.parametrize("seed", range(5))
def test_bleu_and_cider_match_pycocoevalcap(seed: int) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = random_corpus(seed, n_images=6 + seed)
    as_lists = {k: [v] for k, v in hyps.items()}
    bleu_ref, _ = Bleu(4).compute_score(refs, as_lists, verbose=0)
    cider_ref, cider_per_image_ref = Cider().compute_score(refs, as_lists)
    assert corpus_bleu(refs, hyps) == pytest.approx(bleu_ref, rel=1e-12, abs=1e-15)
    mean, per_image = cider_d(refs, hyps)
    assert mean == pytest.approx(cider_ref, rel=1e-12, abs=1e-15)
    assert [per_image[k] for k in refs] == pytest.approx(list(cider_per_image_ref), rel=1e-12, abs=1e-15)


# ============================================================================ METEOR / SPICE / entry points


def test_java_metrics_report_unavailable_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    refs, hyps = {0: ["a dog runs"]}, {0: "a dog"}
    for fn, name in ((meteor_score, "METEOR"), (spice_score, "SPICE")):
        value, why = fn(refs, hyps)
        assert value is None
        assert name in why and ("java" in why or "pycocoevalcap" in why)


@needs_java_tools
def test_meteor_runs_through_pycocoevalcap() -> None:
    # one JVM start (~15 s: METEOR loads its paraphrase table); METEOR itself is pycocoevalcap's,
    # so this checks the plumbing: a real score comes back, between the copy's and the miss's
    refs = {0: ["a dog runs on the grass"], 1: ["a brown dog running on grass"]}
    value, why = meteor_score(refs, {0: "a dog runs on the grass", 1: "a plate of food"})
    assert why == ""
    assert value is not None and 0.0 < value < 1.0


def test_evaluate_captions_never_crashes_on_java_metrics() -> None:
    refs = {1: ["A dog runs on the grass.", "A brown dog running."], 2: ["Two cats sleep."]}
    scores = evaluate_captions(refs, {1: "a dog running on grass", 2: "two cats sleeping"}, meteor=False)
    # SPICE either ran or says why not; METEOR was switched off
    assert (scores.spice is None) == ("SPICE" in scores.unavailable)
    assert scores.meteor is None and scores.unavailable["METEOR"] == "not requested"
    tokenized_refs = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two cats sleep"]}
    tokenized_hyps = {1: "a dog running on grass", 2: "two cats sleeping"}
    assert scores.bleu == pytest.approx(corpus_bleu(tokenized_refs, tokenized_hyps))
    assert scores.as_dict()["CIDEr"] == pytest.approx(cider_d(tokenized_refs, tokenized_hyps)[0])
    assert scores.num_images == 2


def test_evaluate_nocaps_scores_each_domain_as_its_own_set() -> None:
    images = [
        CaptionedImage(1, "1.jpg", ["a red bus"], "in-domain"),
        CaptionedImage(2, "2.jpg", ["a green car"], "in-domain"),
        CaptionedImage(3, "3.jpg", ["a blue boat"], "near-domain"),
        CaptionedImage(4, "4.jpg", ["an old tram"], "out-domain"),
    ]
    preds = {1: "a red bus", 2: "a green car", 3: "a blue boat", 4: "a cat"}
    out = evaluate_nocaps(images, preds, meteor=False, spice=False)
    assert set(out) == {"in-domain", "near-domain", "out-domain", "entire"}
    # in-domain: exact copies -> BLEU-1 1; out-domain: "a cat" vs "an old tram" -> no match
    assert out["in-domain"].bleu[0] == pytest.approx(1.0)
    assert out["out-domain"].bleu[0] < 1e-6
    # in-domain on its own: "a" is in both references -> idf 0; every other n-gram in one -> log 2
    # each image: unigram/bigram/trigram cosines 1, no 4-grams -> 10 * 3/4 = 7.5
    assert out["in-domain"].cider == pytest.approx(7.5)
    # the same two images inside the entire set get a different CIDEr (idf over 4 images)
    assert out["entire"].num_images == 4
    assert cider_d({1: ["a red bus"], 2: ["a green car"]}, {1: "a red bus", 2: "a green car"})[0] == pytest.approx(7.5)


# ============================================================================ retrieval

# 3 images x 2 captions: texts 0, 1 -> image 0; 2, 3 -> image 1; 4, 5 -> image 2
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]
SCORES_T2I = np.array(
    [
        [0.9, 0.1, 0.2],  # t0 -> img0 first: rank 0
        [0.3, 0.5, 0.1],  # t1 -> img0 second: rank 1
        [0.1, 0.8, 0.0],  # t2 -> img1 first: rank 0
        [0.7, 0.2, 0.6],  # t3 -> img1 last: rank 2
        [0.2, 0.4, 0.4],  # t4 -> img2 tied with img1: ties count against -> rank 1
        [0.0, 0.1, 0.5],  # t5 -> img2 first: rank 0
    ]
)
# image -> text (columns): img0 best caption t0 (0.9) first -> 0; img1 best t2 (0.8) first -> 0;
# img2 best caption t5 (0.5), beaten only by t3 (0.6) -> 1


def test_retrieval_recall_from_scores() -> None:
    r = retrieval_recall(SCORES_T2I, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert r["t2i_r1"] == pytest.approx(100 * 3 / 6)
    assert r["t2i_r2"] == pytest.approx(100 * 5 / 6)
    assert r["t2i_r3"] == pytest.approx(100.0)
    assert r["i2t_r1"] == pytest.approx(100 * 2 / 3)
    assert r["i2t_r2"] == pytest.approx(100.0)
    assert r["t2i_r_mean"] == pytest.approx((50 + 500 / 6 + 100) / 3)
    assert r["r_mean"] == pytest.approx((r["t2i_r_mean"] + r["i2t_r_mean"]) / 2)
    # torch input gives the same numbers
    assert retrieval_recall(torch.tensor(SCORES_T2I), TEXT_TO_IMAGE, ks=(1, 2, 3)) == pytest.approx(r)


def test_retrieval_recall_with_a_separate_image_to_text_matrix() -> None:
    i2t = SCORES_T2I.T.copy()
    # img2 -> texts now [0.2, 0.1, 0.0, 0.1, 0.4, 0.0]: its caption t4 is first -> rank 0
    i2t[2, 5] = 0.0
    i2t[2, 3] = 0.1
    r = retrieval_recall(SCORES_T2I, TEXT_TO_IMAGE, scores_i2t=i2t, ks=(1,))
    assert r["i2t_r1"] == pytest.approx(100.0)
    assert r["t2i_r1"] == pytest.approx(50.0)  # text -> image side unchanged


def test_retrieval_recall_from_rankings() -> None:
    t2i = [[0, 2, 1], [1, 0, 2], [1, 0, 2], [0, 2, 1], [1, 2, 0], [2, 1, 0]]
    # truncated lists: img1's caption t3 is second; img2's list holds none of its captions (t4, t5),
    # which is a miss at every k, even k = 2 beyond the list's length
    i2t = [[0, 3, 1], [2, 3], [3]]
    r = retrieval_recall_from_rankings(t2i, i2t, TEXT_TO_IMAGE, ks=(1, 2))
    assert r["t2i_r1"] == pytest.approx(50.0) and r["t2i_r2"] == pytest.approx(100 * 5 / 6)
    assert r["i2t_r1"] == pytest.approx(100 * 2 / 3) and r["i2t_r2"] == pytest.approx(100 * 2 / 3)
    ranks = ranks_from_rankings(i2t, [[0, 1], [2, 3], [4, 5]])
    assert list(ranks[:2]) == [0, 0] and ranks[2] == np.iinfo(np.int64).max
    assert recall_at_k(np.array([0, 3, 9, 10]), ks=(1, 10)) == {1: 25.0, 10: 75.0}


def test_rerank_top_k_is_itm_plus_itc_on_the_top_k() -> None:
    itc = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.5, 0.0, 0.2, 0.6]])
    calls = []

    def itm_fn(query: int, candidates: torch.Tensor) -> torch.Tensor:
        calls.append((query, sorted(candidates.tolist())))
        return candidates.float() * 10  # candidate c gets ITM score 10 c

    out = rerank_top_k(itc, k=2, itm_fn=itm_fn)
    assert calls == [(0, [1, 2]), (1, [0, 3])]
    expected = torch.tensor([[-100.0, 10.4, 20.3, -100.0], [0.5, -100.0, -100.0, 30.6]])
    torch.testing.assert_close(out, expected)
    # the re-rank changes the winner of query 0 from candidate 1 (ITC) to candidate 2
    assert int(out[0].argmax()) == 2 and int(itc[0].argmax()) == 1


def test_rerank_top_k_checks_the_callback() -> None:
    with pytest.raises(ValueError, match="returned 1 scores for 2 candidates"):
        rerank_top_k(torch.zeros(1, 3), k=2, itm_fn=lambda q, c: torch.zeros(1))


# ============================================================================ formats


def test_vqa_files_round_trip(tmp_path) -> None:
    questions = [VQAQuestion(1, 100, "Is it a dog?"), VQAQuestion(2, 100, "How many cats?")]
    anns = make_annotations()[:2]
    write_vqa_questions(tmp_path / "q.json", questions)
    write_vqa_annotations(tmp_path / "a.json", anns)
    write_vqa_results(tmp_path / "r.json", {1: "yes", 2: "2"})
    assert read_vqa_questions(tmp_path / "q.json") == questions
    assert read_vqa_annotations(tmp_path / "a.json") == anns
    assert read_vqa_results(tmp_path / "r.json") == {1: "yes", 2: "2"}
    # the written annotation file has the official layout
    raw = json.loads((tmp_path / "a.json").read_text())["annotations"][0]
    assert raw["answers"][0] == {"answer": "yes", "answer_id": 1} and len(raw["answers"]) == 10


def test_vqa_annotation_missing_field_names_file_record_and_field(tmp_path) -> None:
    path = tmp_path / "mscoco_val2014_annotations.json"
    write_vqa_annotations(path, make_annotations()[:2])
    data = json.loads(path.read_text())
    del data["annotations"][1]["answer_type"]
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"mscoco_val2014_annotations\.json: annotations\[1\]: missing field 'answer_type'"
    ):
        read_vqa_annotations(path)
    data["annotations"][1]["answer_type"] = "number"
    data["annotations"][0]["answers"][3] = {"answer_id": 4}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[0\]\.answers\[3\]: missing field 'answer'"):
        read_vqa_annotations(path)
    path.write_text(json.dumps({"questions": [{"image_id": 1, "question": "?", "question_id": "7"}]}))
    with pytest.raises(ValueError, match=r"questions\[0\]: field 'question_id' must be int, got str"):
        read_vqa_questions(path)


def test_gqa_round_trip_and_errors(tmp_path) -> None:
    qs = [GQAQuestion("201", "n1", "Is it red?", "yes"), GQAQuestion("202", "n2", "What is it?", "cup")]
    path = tmp_path / "testdev_balanced_questions.json"
    write_gqa_questions(path, qs)
    assert read_gqa_questions(path) == qs
    path.write_text(json.dumps({"201": {"imageId": "n1", "question": "Is it red?"}}))
    with pytest.raises(ValueError, match=r"question '201': missing field 'answer'"):
        read_gqa_questions(path)
    assert read_gqa_questions(path, require_answers=False) == [GQAQuestion("201", "n1", "Is it red?", None)]
    path.write_text(json.dumps({"201": {"question": "?", "answer": "no"}}))
    with pytest.raises(ValueError, match="missing field 'imageId'"):
        read_gqa_questions(path)


def test_coco_nocaps_and_results_round_trip(tmp_path) -> None:
    coco = [CaptionedImage(5, "a.jpg", ["one", "two"]), CaptionedImage(9, "b.jpg", ["three"])]
    write_coco_captions(tmp_path / "captions_val2014.json", coco)
    assert read_coco_captions(tmp_path / "captions_val2014.json") == coco
    nocaps = [CaptionedImage(0, "x.jpg", ["c"] * 10, "in-domain"), CaptionedImage(1, "y.jpg", ["d"], "out-domain")]
    write_nocaps(tmp_path / "nocaps_val.json", nocaps)
    assert read_nocaps(tmp_path / "nocaps_val.json") == nocaps
    write_caption_results(tmp_path / "res.json", {5: "a caption", 9: "another"})
    assert read_caption_results(tmp_path / "res.json") == {5: "a caption", 9: "another"}


def test_caption_file_errors(tmp_path) -> None:
    path = tmp_path / "nocaps_val_4500_captions.json"
    path.write_text(json.dumps({"images": [{"id": 0, "file_name": "x.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match=r"nocaps_val_4500_captions\.json: images\[0\]: missing field 'domain'"):
        read_nocaps(path)
    path.write_text(json.dumps({"images": [{"id": 0, "file_name": "x.jpg", "domain": "far"}]}))
    with pytest.raises(ValueError, match="field 'domain' is 'far'"):
        read_nocaps(path)
    path.write_text(
        json.dumps({"images": [{"id": 0, "file_name": "x.jpg"}], "annotations": [{"image_id": 3, "caption": "c"}]})
    )
    with pytest.raises(ValueError, match=r"annotations\[0\]: image_id 3 is not in 'images'"):
        read_coco_captions(path)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="top level: missing field 'images'"):
        read_coco_captions(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco_captions(path)


def test_karpathy_and_retrieval_round_trip(tmp_path) -> None:
    entries = [KarpathyEntry("val2014/a.jpg", ["c0", "c1"]), KarpathyEntry("val2014/b.jpg", ["c2", "c3", "c4"])]
    write_karpathy(tmp_path / "coco_karpathy_test.json", entries)
    assert read_karpathy(tmp_path / "coco_karpathy_test.json") == entries
    data = read_retrieval(tmp_path / "coco_karpathy_test.json")
    assert data == RetrievalSet(["val2014/a.jpg", "val2014/b.jpg"], ["c0", "c1", "c2", "c3", "c4"], [0, 0, 1, 1, 1])
    assert data.image_to_texts == [[0, 1], [2, 3, 4]]
    write_retrieval(tmp_path / "flickr30k_test.json", data)
    assert read_retrieval(tmp_path / "flickr30k_test.json") == data


def test_karpathy_errors(tmp_path) -> None:
    path = tmp_path / "flickr30k_test.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": ["ok"]}, {"caption": ["no image"]}]))
    with pytest.raises(ValueError, match=r"flickr30k_test\.json: \[1\]: missing field 'image'"):
        read_karpathy(path)
    path.write_text(json.dumps([{"image": "a.jpg", "caption": ["ok", 3]}]))
    with pytest.raises(ValueError, match=r"\[0\]: 'caption\[1\]' must be str, got int"):
        read_karpathy(path)
    path.write_text(json.dumps([{"image": "a.jpg", "caption": []}]))
    with pytest.raises(ValueError, match=r"\[0\]: field 'caption' is empty"):
        read_retrieval(path)
