"""Caption metrics as pycocoevalcap computes them: BLEU-1..4, CIDEr-D, METEOR, SPICE; NoCaps domains.

BLEU and CIDEr-D are reimplemented here in plain Python (no Java, no pycocoevalcap) and agree with
pycocoevalcap's ``Bleu(4)`` and ``Cider()`` on the same tokenized input to float precision. METEOR
and SPICE are Java programs shipped inside pycocoevalcap; they run when it is installed and
``java`` is on PATH, and are otherwise reported as ``None`` with the reason. Captions are tokenized by
pycocoevalcap's Java PTB tokenizer where it runs, else (saying so in a warning) by ``ptb_tokenize``.

Scores are on pycocoevalcap's scale (CIDEr 1.17, not 117), under its names in ``as_dict``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from blip2.eval.formats import NOCAPS_DOMAINS, CaptionedImage

__all__ = [
    "ptb_tokenize",
    "tokenize_captions",
    "corpus_bleu",
    "cider_d",
    "meteor_score",
    "spice_score",
    "CaptionScores",
    "evaluate_captions",
    "evaluate_nocaps",
]

K = TypeVar("K", bound=Hashable)
Ngram = tuple[str, ...]
Tokenizer = Literal["auto", "python", "java"]

logger = logging.getLogger("blip2.eval")

# ----------------------------------------------------------------------------- tokenization
#
# pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase, needs Java)
# and then drops the tokens in its PUNCTUATIONS list. ptb_tokenize reproduces that in Python.
# Checked against the Java tokenizer (tests do it when Java is present), it agrees on the things
# captions contain: punctuation split off and dropped, "1,000" / "3.5" / "3:30" / "t-shirt" /
# "o'clock" / URLs kept whole, clitics split ("isn't" -> "is n't", "dog's" -> "dog 's",
# "can't" -> "ca n't"), "cannot"/"gonna"/... split, abbreviations ("u.s.", "st.", "mr.") and
# mid-sentence initials keep their period, brackets kept as "-lrb-" (pycocoevalcap lists them
# upper-case but the tokens are lower-cased, so they survive), "?!" / "!!!" kept as one token.
# Known differences, all rare in captions: PTB's full abbreviation list is longer than ours;
# SGML-like "<tag>" stays one token in PTB but is split here; PTB's other special cases
# (emoticons, "c'mon"-style words beyond the handful listed below) are not reproduced.

# Tokens pycocoevalcap removes that the lower-cased PTB output can contain.
_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc no mt ft inc ltd co corp ave prof gen gov sen rep sgt capt lt col rev "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SPLIT_WORDS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
    "lemme": ["lem", "me"], "gimme": ["gim", "me"], "'tis": ["'t", "is"], "'twas": ["'t", "was"],
    "y'all": ["y'", "all"],
}  # fmt: skip
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")
_LETTER_ABBREVIATION = re.compile(r"^[a-z](\.[a-z])+$")  # u.s, p.m, e.g (final period removed)
_DECIMAL_UNIT = re.compile(r"^(\d+\.\d+)([a-z]+)$")  # PTB splits "1.5m" (but not "100m")
# A leading apostrophe that belongs to the word ("'90s", "'em", "'til", "'n'", a lone clitic "'s")
# is not an opening quote.
_KEEP_LEADING_QUOTE = re.compile(r"^'(\d|em$|til$|n'$|tis$|twas$|s$|m$|d$|re$|ve$|ll$)")

_TEXT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"''|``|\""), " "),  # double quotes become `` / '' and are dropped
    (re.compile(r"`"), " "),
    (re.compile(r"\("), " -lrb- "), (re.compile(r"\)"), " -rrb- "),
    (re.compile(r"\["), " -lsb- "), (re.compile(r"\]"), " -rsb- "),
    (re.compile(r"\{"), " -lcb- "), (re.compile(r"\}"), " -rcb- "),
    # "..", "...", ". . .": the first period stays on the word, which keeps it if it is an abbreviation
    # ("mr...." -> "mr." "...", "u.s.." -> "u.s." "."), else loses it as the sentence's end
    (re.compile(r"\.\s?\.(\s?\.)*"), ". ... "),
    (re.compile(r"--+"), " -- "),
    (re.compile(r"[?!]+"), r" \g<0> "),
    (re.compile(r";"), " ; "),
    (re.compile(r",(?!\d)|(?<!\d),"), " , "),  # but not inside "1,000"
    (re.compile(r"(?<!\d):(?!//)|:(?!\d|//)"), " : "),  # but not inside "3:30" or "http://"
    (re.compile(r"[%$#*+=&<>]"), r" \g<0> "),
]  # fmt: skip
_UNICODE = {"\u2026": "...", "\u2013": "--", "\u2014": "--", "\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}


def _split_token(tok: str, last: bool) -> list[str]:
    """PTB treatment of one whitespace-separated piece: final period and quotes, then leading quotes (so
    "'s." is the clitic "'s" and a period), clitics."""
    tail: list[str] = []
    while True:
        if tok.endswith("'") and len(tok) > 1 and tok != "'n'":
            tail.insert(0, "'")
            tok = tok[:-1]
        elif tok.endswith(".") and len(tok) > 1:
            stem = tok[:-1]
            abbreviation = (
                stem in _ABBREVIATIONS
                or _LETTER_ABBREVIATION.match(stem) is not None
                or (len(stem) == 1 and stem.isalpha() and not last)  # initials, except at the end
            )
            if abbreviation:
                break
            tail.insert(0, ".")
            tok = stem
        else:
            break
    head: list[str] = []
    while tok.startswith("'") and len(tok) > 1 and not _KEEP_LEADING_QUOTE.match(tok):
        head.append("'")
        tok = tok[1:]
    if tok in _SPLIT_WORDS:
        return head + _SPLIT_WORDS[tok] + tail
    unit = _DECIMAL_UNIT.match(tok)
    if unit:
        return head + [unit.group(1), unit.group(2)] + tail
    clitics: list[str] = []
    while (m := _CLITIC.match(tok)) and not tok.startswith("'"):
        tok, clitic = m.group(1), m.group(2)
        clitics.insert(0, clitic)
    return head + [tok] + clitics + tail


def ptb_tokenize(caption: str) -> str:
    """Lower-cased, PTB-tokenized ``caption`` without punctuation tokens, as pycocoevalcap scores it."""
    text = caption.replace("\n", " ").lower()
    for src, dst in _UNICODE.items():
        text = text.replace(src, dst)
    for pattern, repl in _TEXT_RULES:
        text = pattern.sub(repl, text)
    pieces = text.split()
    tokens: list[str] = []
    for j, piece in enumerate(pieces):
        tokens.extend(_split_token(piece, last=j == len(pieces) - 1))
    return " ".join(t for t in tokens if t not in _DROPPED)


def tokenize_captions(captions: Mapping[K, Sequence[str]], tokenizer: Tokenizer = "auto") -> dict[K, list[str]]:
    """Tokenize every caption of every image, as pycocoevalcap scores them.

    ``"java"`` runs pycocoevalcap's own PTB tokenizer (needs pycocoevalcap and Java; raises ``RuntimeError``
    naming what is missing or what failed); ``"python"`` is :func:`ptb_tokenize`; ``"auto"`` is Java where it
    runs, else Python with a warning that says so.
    """
    return _tokenize(captions, tokenizer)[0]


def _tokenize(captions: Mapping[K, Sequence[str]], tokenizer: Tokenizer) -> tuple[dict[K, list[str]], str]:
    """The tokenized captions and which tokenizer made them ("java" or "python")."""
    if tokenizer not in ("auto", "python", "java"):
        raise ValueError(f"tokenizer must be 'auto', 'python' or 'java', got {tokenizer!r}")
    if tokenizer != "python":
        reason = _java_unavailable()
        if reason is None:
            try:
                return _java_tokenize(captions), "java"
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                reason = f"it failed: {e}"
        if tokenizer == "java":
            raise RuntimeError(f"tokenizer='java': {reason}")
        logger.warning("caption metrics: pycocoevalcap's Java PTB tokenizer cannot run (%s); tokenizing with "
                       "blip2's Python PTB tokenizer instead, which splits a few rare captions differently", reason)
    return {k: [ptb_tokenize(c) for c in cs] for k, cs in captions.items()}, "python"


def _java_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's ``PTBTokenizer``: its jar and options, one caption a line, its punctuation tokens
    dropped; the file in a temporary folder of ours (pycocoevalcap writes it into its own, which may be
    read-only), UTF-8 said explicitly (Java otherwise reads the locale's charset), and the output checked."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    keys = [k for k, cs in captions.items() for _ in cs]
    lines = [c.replace("\n", " ") for cs in captions.values() for c in cs]
    jar = os.path.join(os.path.dirname(ptb.__file__), ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        done = subprocess.run(["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", "-encoding", "UTF-8", path], capture_output=True, timeout=3600)
    out = done.stdout.decode("utf-8", "replace").split("\n")
    if done.returncode != 0 or len(out) < len(lines):
        tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise RuntimeError(f"java exited with {done.returncode}, {len(out)} lines for {len(lines)} captions: {tail}")
    tokenized: dict[K, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return tokenized


# ----------------------------------------------------------------------------- BLEU


def _ngrams(words: Sequence[str], n: int) -> Counter[Ngram]:
    counts: Counter[Ngram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _check_pairs(references: Mapping[K, Sequence[str]], hypotheses: Mapping[K, str], what: str) -> None:
    if set(references) != set(hypotheses):
        missing = [k for k in references if k not in hypotheses]
        extra = [k for k in hypotheses if k not in references]
        raise ValueError(
            f"{what}: hypotheses must cover exactly the images with references: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )
    if not references:
        raise ValueError(f"{what}: no images")
    for k, refs in references.items():
        if len(refs) == 0:
            raise ValueError(f"{what}: image {k!r} has no references")


def corpus_bleu(references: Mapping[K, Sequence[str]], hypotheses: Mapping[K, str], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of tokenized captions, exactly as pycocoevalcap's ``Bleu`` computes it.

    N-gram matches are clipped by the maximum count over an image's references; the brevity
    penalty uses, for each image, the reference length closest to the hypothesis length (the
    shorter one on a tie), summed over the corpus. The 1e-15 / 1e-9 guards are pycocoevalcap's: a
    zero n-gram precision gives a tiny positive score rather than 0, as there.
    """
    _check_pairs(references, hypotheses, "corpus_bleu")
    tiny, small = 1e-15, 1e-9
    correct = [0] * max_n
    guess = [0] * max_n
    test_len = ref_len = 0
    for key, refs in references.items():
        hyp = hypotheses[key].split()
        max_ref: dict[Ngram, int] = {}
        lengths = []
        for ref in refs:
            words = ref.split()
            lengths.append(len(words))
            for ngram, c in _ngrams(words, max_n).items():
                max_ref[ngram] = max(max_ref.get(ngram, 0), c)
        test_len += len(hyp)
        ref_len += min(lengths, key=lambda n: (abs(n - len(hyp)), n))
        for k in range(max_n):
            guess[k] += max(0, len(hyp) - k)
        for ngram, c in _ngrams(hyp, max_n).items():
            correct[len(ngram) - 1] += min(max_ref.get(ngram, 0), c)
    scores = []
    product = 1.0
    for k in range(max_n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ----------------------------------------------------------------------------- CIDEr-D


def cider_d(
    references: Mapping[K, Sequence[str]], hypotheses: Mapping[K, str], sigma: float = 6.0
) -> tuple[float, dict[K, float]]:
    """CIDEr-D of tokenized captions as pycocoevalcap's ``Cider`` computes it: (mean, per image).

    Each caption becomes, per n-gram order, a tf-idf vector whose document frequencies count the
    images whose references contain the n-gram (so the score depends on the evaluated set; the
    idf is log(#images / max(df, 1))). An image scores the mean over its references and over
    n = 1..4 of the clipped cosine sum(min(h, r) * r) / (|h| |r|) times a Gaussian length penalty
    exp(-delta^2 / (2 sigma^2)) on the length difference delta, times 10.
    """
    _check_pairs(references, hypotheses, "cider_d")
    n = 4
    ref_counts = {k: [_ngrams(r.split(), n) for r in refs] for k, refs in references.items()}
    doc_freq: Counter[Ngram] = Counter()
    for counts in ref_counts.values():
        doc_freq.update(set().union(*counts))
    log_images = math.log(float(len(references)))

    # The length is pycocoevalcap's, the number of bigrams (len - 1): its difference is the
    # word-count difference whenever it matters (an empty caption has all cosines 0 anyway).
    def vectorize(counts: Counter[Ngram]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        vec: list[dict[Ngram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            weight = tf * (log_images - math.log(max(1.0, doc_freq[ngram])))
            vec[order][ngram] = weight
            norm[order] += weight * weight
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    penalty_denominator = 2 * sigma**2
    per_image: dict[K, float] = {}
    for key, refs in ref_counts.items():
        hyp_vec, hyp_norm, hyp_len = vectorize(_ngrams(hypotheses[key].split(), n))
        total = [0.0] * n
        for ref in refs:
            ref_vec, ref_norm, ref_len = vectorize(ref)
            penalty = math.exp(-(float(hyp_len - ref_len) ** 2) / penalty_denominator)
            for order in range(n):
                r = ref_vec[order]
                val = sum(min(h, r.get(g, 0.0)) * r.get(g, 0.0) for g, h in hyp_vec[order].items())
                if hyp_norm[order] != 0 and ref_norm[order] != 0:
                    val /= hyp_norm[order] * ref_norm[order]
                total[order] += val * penalty
        per_image[key] = sum(total) / n / len(refs) * 10.0
    return sum(per_image.values()) / len(per_image), per_image


# ----------------------------------------------------------------------------- METEOR / SPICE (Java)


def _java_unavailable() -> str | None:
    """Why pycocoevalcap's Java tools cannot run here, or None if they can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "no 'java' on PATH (pycocoevalcap's METEOR, SPICE and PTB tokenizer are Java programs)"
    return None


def meteor_score(references: Mapping[K, Sequence[str]], hypotheses: Mapping[K, str]) -> tuple[float | None, str]:
    """pycocoevalcap's METEOR 1.5 of tokenized captions: (score, "") or (None, why it is unavailable)."""
    _check_pairs(references, hypotheses, "meteor_score")
    reason = _java_unavailable()
    if reason:
        return None, f"METEOR unavailable: {reason}"
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        score, _ = Meteor().compute_score(_as_lists(references), {k: [hypotheses[k]] for k in references})
        return float(score), ""
    except Exception as e:  # the jar dies (memory, JVM) -> a None with the reason, not a crash
        return None, f"METEOR failed: {type(e).__name__}: {e}"


def spice_score(references: Mapping[K, Sequence[str]], hypotheses: Mapping[K, str]) -> tuple[float | None, str]:
    """pycocoevalcap's SPICE of tokenized captions: (score, "") or (None, why it is unavailable).

    SPICE also needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads into its ``spice/lib``
    on first use; without those jars (e.g. offline) we report SPICE unavailable instead of letting
    it try the download.
    """
    _check_pairs(references, hypotheses, "spice_score")
    reason = _java_unavailable()
    if reason:
        return None, f"SPICE unavailable: {reason}"
    import pycocoevalcap.spice.spice as spice_module

    lib = os.path.join(os.path.dirname(spice_module.__file__), "lib")
    jars = [os.path.join(lib, f"stanford-corenlp-3.6.0{s}.jar") for s in ("", "-models")]
    absent = [j for j in jars if not os.path.exists(j)]
    if absent:
        return None, (
            f"SPICE unavailable: Stanford CoreNLP 3.6.0 is missing ({', '.join(absent)}); pycocoevalcap "
            "downloads it on first use, which needs internet: run "
            "`python -c 'from pycocoevalcap.spice.spice import Spice; Spice()'` once where it is reachable"
        )
    try:
        score, _ = spice_module.Spice().compute_score(_as_lists(references), {k: [hypotheses[k]] for k in references})
        return float(score), ""
    except Exception as e:  # e.g. a JVM too new for SPICE's bundled libraries
        return None, f"SPICE failed: {type(e).__name__}: {e}"


def _as_lists(references: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    return {k: list(v) for k, v in references.items()}


# ----------------------------------------------------------------------------- evaluation entry points


@dataclass
class CaptionScores:
    bleu: list[float]  # BLEU-1..4
    cider: float
    meteor: float | None
    spice: float | None
    num_images: int
    # metric name -> why it is None
    unavailable: dict[str, str] = field(default_factory=dict)
    tokenizer: str = "python"  # the PTB tokenizer that ran: "java" (pycocoevalcap's) or "python"

    def as_dict(self) -> dict[str, float | None]:
        """pycocoevalcap's ``COCOEvalCap.eval`` names and scale."""
        out: dict[str, float | None] = {f"Bleu_{i + 1}": b for i, b in enumerate(self.bleu)}
        out.update({"METEOR": self.meteor, "CIDEr": self.cider, "SPICE": self.spice})
        return out


def evaluate_captions(
    references: Mapping[K, Sequence[str]],
    predictions: Mapping[K, str],
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool = True,
    spice: bool = True,
) -> CaptionScores:
    """BLEU-1..4, CIDEr-D, METEOR and SPICE of raw ``predictions`` against raw ``references``.

    Keys are image ids; both sides are tokenized first, in one call (see :func:`tokenize_captions`). METEOR and
    SPICE are ``None`` (reason in ``unavailable``) when Java or pycocoevalcap is missing, or when
    switched off here (SPICE parses every caption and takes minutes on a full split).
    """
    _check_pairs(references, predictions, "evaluate_captions")
    # one run of the tokenizer (one JVM) for both sides: references first, then the prediction, per image
    both, used = _tokenize({k: [*references[k], predictions[k]] for k in references}, tokenizer)
    refs = {k: v[:-1] for k, v in both.items()}
    hyps = {k: v[-1] for k, v in both.items()}
    unavailable: dict[str, str] = {}

    def java_metric(name: str, wanted: bool, measure: Callable[..., tuple[float | None, str]]) -> float | None:
        """METEOR or SPICE, or None with the reason in ``unavailable``."""
        value, why = measure(refs, hyps) if wanted else (None, "not requested")
        if why:
            unavailable[name] = why
        return value

    meteor_value = java_metric("METEOR", meteor, meteor_score)
    spice_value = java_metric("SPICE", spice, spice_score)
    return CaptionScores(
        bleu=corpus_bleu(refs, hyps),
        cider=cider_d(refs, hyps)[0],
        meteor=meteor_value,
        spice=spice_value,
        num_images=len(refs),
        unavailable=unavailable,
        tokenizer=used,
    )


def evaluate_nocaps(
    images: Sequence[CaptionedImage],
    predictions: Mapping[int, str],
    *,
    tokenizer: Tokenizer = "auto",
    meteor: bool = True,
    spice: bool = True,
) -> dict[str, CaptionScores]:
    """NoCaps scores per domain ("in-domain", "near-domain", "out-domain") and "entire".

    Each domain is evaluated as its own set, as the NoCaps evaluation does, so CIDEr's document
    frequencies come from that domain's references only (a domain score is not the mean of the
    per-image scores of the entire set). Domains absent from ``images`` are left out.
    """
    for im in images:
        if im.domain not in NOCAPS_DOMAINS:
            raise ValueError(
                f"evaluate_nocaps: image {im.id} has domain {im.domain!r}, expected one of {NOCAPS_DOMAINS}"
            )
    subsets = {d: [im for im in images if im.domain == d] for d in NOCAPS_DOMAINS}
    subsets = {d: ims for d, ims in subsets.items() if ims}
    subsets["entire"] = list(images)
    out = {}
    for name, ims in subsets.items():
        out[name] = evaluate_captions(
            {im.id: im.captions for im in ims},
            {im.id: predictions[im.id] for im in ims if im.id in predictions},
            tokenizer=tokenizer,
            meteor=meteor,
            spice=spice,
        )
    return out
