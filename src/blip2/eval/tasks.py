"""The benchmarks ``blip2 eval`` runs: which files each reads, the paper's decoding presets, its metrics.

Needs no model. ``load_task`` reads a benchmark's official files into what the model must produce
(``GenerationData``: one text per question or image; ``RetrievalData``: images and texts to rank);
``score`` turns the model's outputs into the paper's metrics.

How images are found under ``--images``:

- VQAv2 / OK-VQA (questions name an integer ``image_id``): the file whose name ends in that number,
  as COCO's ``COCO_val2014_000000391895.jpg`` or ``000000391895.jpg``.
- GQA (string ``imageId``): the file whose stem is that id (``n161313.jpg``).
- Karpathy, NoCaps and COCO caption files: the path they give, relative to ``--images``. A Karpathy
  entry's image id (for the results file) is the number ending its file name, as LAVIS takes it.

Text as LAVIS feeds it to BLIP-2: questions through ``pre_question`` (lower case, a few punctuation
marks removed), retrieval captions through ``pre_caption``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from blip2.eval.caption import Tokenizer, evaluate_captions, evaluate_nocaps
from blip2.eval.formats import (
    CaptionedImage,
    GQAQuestion,
    RetrievalSet,
    VQAAnnotation,
    read_coco_captions,
    read_gqa_questions,
    read_karpathy,
    read_nocaps,
    read_retrieval,
    read_vqa_annotations,
    read_vqa_questions,
)
from blip2.eval.retrieval import recall_summary
from blip2.eval.vqa import Rules, gqa_accuracy, vqa_accuracy

__all__ = [
    "PREDICTION_FIELDS", "PRESETS", "TASKS", "GenerationData", "Item", "Preset", "RetrievalData", "Task", "TaskData",
    "load_task", "official_predictions", "pre_caption", "pre_question", "resolve_preset", "retrieval_scores", "score",
    "trailing_number",
]  # fmt: skip

Kind = Literal["vqa", "gqa", "caption", "nocaps", "retrieval"]
Key = int | str  # question_id (int for VQA, str for GQA) or image_id


@dataclass(frozen=True)
class Preset:
    """Decoding (or ranking) settings of one evaluation protocol.

    ``prompt``: for questions, ``{}`` stands for the question; for captions it is the text the
    caption continues (the caption is what comes after it). Token counts are new tokens, as LAVIS'
    ``max_len``/``min_len`` count them. ``rerank_k``: ITC candidates per query re-scored by ITM;
    ``max_text_tokens``: retrieval text truncation (LAVIS: 35).
    """

    name: str
    kind: Literal["question", "caption", "retrieval"]
    description: str
    prompt: str = ""
    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    rerank_k: int = 128
    max_text_tokens: int = 35


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("vqa-zeroshot", "question", "BLIP-2 zero-shot VQA (paper sec. 4.2; LAVIS predict_answers)",
               prompt="Question: {} Short answer:", num_beams=5, max_new_tokens=10, min_new_tokens=1,
               length_penalty=-1.0),
        Preset("caption", "caption", "BLIP-2 captioning (COCO fine-tuned, NoCaps zero-shot; LAVIS caption configs)",
               prompt="a photo of", num_beams=5, max_new_tokens=30, min_new_tokens=8),
        Preset("retrieval", "retrieval", "BLIP-2 retrieval: ITC, then ITM re-ranking of the top k=128 (LAVIS k_test)",
               rerank_k=128, max_text_tokens=35),
    )
}


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    preset: str  # the default preset
    description: str

    @property
    def preset_kind(self) -> str:
        return {"vqa": "question", "gqa": "question", "caption": "caption", "nocaps": "caption"}.get(
            self.kind, "retrieval")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("vqav2", "vqa", "vqa-zeroshot", "VQAv2 accuracy (official normalisation, 10-choose-9 average)"),
        Task("okvqa", "vqa", "vqa-zeroshot", "OK-VQA accuracy (the VQAv2 metric)"),
        Task("gqa", "gqa", "vqa-zeroshot", "GQA exact-match accuracy"),
        Task("coco_caption", "caption", "caption", "COCO Karpathy test: BLEU-4, METEOR, CIDEr, SPICE"),
        Task("nocaps", "nocaps", "caption", "NoCaps: caption metrics per domain and overall"),
        Task("flickr_retrieval", "retrieval", "retrieval", "Flickr30K image-text retrieval R@1/5/10"),
        Task("coco_retrieval", "retrieval", "retrieval", "COCO 5k image-text retrieval R@1/5/10"),
    )
}


def resolve_preset(task: Task, name: str | None = None, **overrides: Any) -> Preset:
    """The named preset (the task's default when None) with the non-None ``overrides`` applied."""
    name = name or task.preset
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.kind != task.preset_kind:
        fitting = sorted(p.name for p in PRESETS.values() if p.kind == task.preset_kind)
        raise ValueError(f"preset {name!r} is for {preset.kind} tasks, not {task.name}; use one of {fitting}")
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if preset.kind == "question" and "{}" not in preset.prompt:
        raise ValueError(f"a question prompt needs '{{}}' where the question goes, got {preset.prompt!r}")
    if preset.num_beams < 1 or preset.max_new_tokens < 1 or preset.min_new_tokens < 0 or preset.rerank_k < 1:
        raise ValueError(f"invalid preset values: {preset}")
    return preset


# ----------------------------------------------------------------------------- text as LAVIS feeds it

_LAVIS_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")


def pre_question(question: str, max_words: int = 50) -> str:
    """LAVIS ``BlipQuestionProcessor``: lower case, drop ``.!"()*#:;~``, at most ``max_words`` words."""
    question = _LAVIS_PUNCTUATION.sub("", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor``: lower case, ``.!"()*#:;~`` to spaces, single spaces, at most ``max_words``."""
    caption = re.sub(r"\s{2,}", " ", _LAVIS_PUNCTUATION.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Item:
    """One text the model produces: an answer to ``question`` about ``image``, or its caption."""

    key: Key
    image: str  # path
    question: str | None = None


@dataclass
class GenerationData:
    """VQA, GQA and captioning: items in file order, and what scoring needs (None: predictions only)."""

    task: Task
    items: list[Item]
    vqa_annotations: list[VQAAnnotation] | None = None
    gqa_questions: list[GQAQuestion] | None = None
    references: list[CaptionedImage] | None = None


@dataclass
class RetrievalData:
    """Images (paths) and texts of a retrieval split; ``texts.text_to_image[t]`` is the image of text t."""

    task: Task
    split: RetrievalSet  # .images are paths, .texts are pre_caption'ed
    captions: list[str]  # the texts as written in the file


TaskData = GenerationData | RetrievalData

_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _image_files(images_dir: str) -> list[str]:
    if not os.path.isdir(images_dir):
        raise ValueError(f"--images {images_dir}: not a directory")
    return sorted(e.path for e in os.scandir(images_dir)
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in _IMAGE_EXTENSIONS)


def trailing_number(name: str) -> int | None:
    """The number ending a file name's stem: ``COCO_val2014_000000391895.jpg`` -> 391895."""
    m = _TRAILING_NUMBER.search(os.path.splitext(os.path.basename(name))[0])
    return int(m.group(1)) if m else None


def _find_by_number(images_dir: str, ids: Sequence[int]) -> dict[int, str]:
    by_number: dict[int, list[str]] = {}
    for path in _image_files(images_dir):
        number = trailing_number(path)
        if number is not None:
            by_number.setdefault(number, []).append(path)
    out = {}
    for image_id in dict.fromkeys(ids):
        found = by_number.get(image_id, [])
        if len(found) != 1:
            what = "no image file" if not found else f"{len(found)} image files ({', '.join(found[:3])})"
            raise ValueError(f"--images {images_dir}: {what} for image_id {image_id} (looked for a file name "
                             f"ending in its number, as COCO_val2014_{image_id:012d}.jpg)")
        out[image_id] = found[0]
    return out


def _find_by_stem(images_dir: str, ids: Sequence[str]) -> dict[str, str]:
    by_stem: dict[str, list[str]] = {}
    for path in _image_files(images_dir):
        by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    out = {}
    for image_id in dict.fromkeys(ids):
        found = by_stem.get(image_id, [])
        if len(found) != 1:
            what = "no image file" if not found else f"{len(found)} image files"
            raise ValueError(f"--images {images_dir}: {what} named {image_id}.<ext> (GQA imageId)")
        out[image_id] = found[0]
    return out


def _under(images_dir: str, relative: str) -> str:
    path = os.path.join(images_dir, relative)
    if not os.path.isfile(path):
        raise ValueError(f"--images {images_dir}: image {relative!r} not found ({path})")
    return path


def _require(value: str | None, flag: str, task: Task) -> str:
    if not value:
        raise ValueError(f"task {task.name} needs {flag}")
    return value


def _limit(xs: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return xs if limit is None else xs[:limit]


def _is_json_list(path: str) -> bool:
    """Whether a JSON file's top level is a list, from its first non-blank character."""
    with open(path, encoding="utf-8") as f:
        while (c := f.read(1)).isspace():
            pass
    return c == "["


def _read_caption_references(path: str) -> list[CaptionedImage]:
    """A Karpathy split (a list; image ids from the file names) or a COCO captions file (an object)."""
    if not _is_json_list(path):
        return read_coco_captions(path)
    out: dict[int, CaptionedImage] = {}
    for k, entry in enumerate(read_karpathy(path)):
        image_id = trailing_number(entry.image)
        if image_id is None or image_id in out:
            problem = "has no number at the end of its name" if image_id is None else f"repeats image id {image_id}"
            raise ValueError(f"{path}: [{k}]: image {entry.image!r} {problem}; results are keyed by that number")
        out[image_id] = CaptionedImage(image_id, entry.image, entry.captions)
    return list(out.values())


def load_task(task: Task, images: str, questions: str | None = None, annotations: str | None = None,
              limit: int | None = None) -> TaskData:
    """Read a benchmark's files (the first ``limit`` questions, images or retrieval images)."""
    if task.kind == "vqa":
        qs = _limit(read_vqa_questions(_require(questions, "--questions", task)), limit)
        paths = _find_by_number(images, [q.image_id for q in qs])
        items = [Item(q.question_id, paths[q.image_id], q.question) for q in qs]
        if annotations is None:
            return GenerationData(task, items)
        by_id = {a.question_id: a for a in read_vqa_annotations(annotations)}
        missing = [q.question_id for q in qs if q.question_id not in by_id]
        if missing:
            raise ValueError(f"{annotations}: no annotation for {len(missing)} questions (e.g. {missing[:3]})")
        return GenerationData(task, items, vqa_annotations=[by_id[q.question_id] for q in qs])
    if task.kind == "gqa":
        path = _require(questions, "--questions", task)
        gqs = _limit(read_gqa_questions(path, require_answers=False), limit)
        paths = _find_by_stem(images, [q.image_id for q in gqs])
        items = [Item(q.question_id, paths[q.image_id], q.question) for q in gqs]
        answered = [q.answer is not None for q in gqs]
        if any(answered) and not all(answered):
            raise ValueError(f"{path}: some questions have answers and some do not")
        return GenerationData(task, items, gqa_questions=gqs if all(answered) else None)
    if task.kind in ("caption", "nocaps"):
        path = _require(annotations, "--annotations", task)
        refs = _limit(read_nocaps(path) if task.kind == "nocaps" else _read_caption_references(path), limit)
        items = [Item(im.id, _under(images, im.file_name)) for im in refs]
        with_refs = [bool(im.captions) for im in refs]
        if any(with_refs) and not all(with_refs):
            raise ValueError(f"{path}: some images have reference captions and some do not")
        return GenerationData(task, items, references=refs if all(with_refs) else None)
    path = _require(annotations, "--annotations", task)
    full = read_retrieval(path)
    kept = _limit(full.images, limit)
    texts = [t for t, i in enumerate(full.text_to_image) if i < len(kept)]
    split = RetrievalSet([_under(images, im) for im in kept], [pre_caption(full.texts[t]) for t in texts],
                         [full.text_to_image[t] for t in texts])
    return RetrievalData(task, split, [full.texts[t] for t in texts])


# ----------------------------------------------------------------------------- outputs


# The official results layout of each kind: [{key field: id, text field: output}]
PREDICTION_FIELDS: dict[str, tuple[str, str]] = {
    "vqa": ("question_id", "answer"),  # VQA / OK-VQA evaluation server
    "gqa": ("questionId", "prediction"),  # GQA submission
    "caption": ("image_id", "caption"),  # COCO caption results
    "nocaps": ("image_id", "caption"),  # NoCaps EvalAI submission
}


def official_predictions(data: GenerationData, predictions: Mapping[Key, str]) -> list[dict[str, Any]]:
    """Predictions in the layout the official evaluation servers take, in input order."""
    key_field, text_field = PREDICTION_FIELDS[data.task.kind]
    return [{key_field: it.key, text_field: predictions[it.key]} for it in data.items]


def score(data: GenerationData, predictions: Mapping[Key, str], *, tokenizer: Tokenizer = "auto",
          meteor: bool = True, spice: bool = True, vqa_rules: Rules = "official") -> dict[str, Any] | None:
    """The task's metrics (percent for VQA/GQA, pycocoevalcap's 0-1 scale for captions); None when
    the inputs have no answers or references (predictions only, e.g. for a test-dev submission)."""
    kind = data.task.kind
    if kind == "vqa":
        if data.vqa_annotations is None:
            return None
        s = vqa_accuracy(predictions, data.vqa_annotations, vqa_rules)
        return {"accuracy": s.overall, "per_answer_type": s.per_answer_type, "per_question_type": s.per_question_type}
    if kind == "gqa":
        return None if data.gqa_questions is None else {"accuracy": gqa_accuracy(predictions, data.gqa_questions)}
    if data.references is None:
        return None
    options: dict[str, Any] = {"tokenizer": tokenizer, "meteor": meteor, "spice": spice}
    if kind == "nocaps":
        return {domain: _caption_dict(s) for domain, s in evaluate_nocaps(data.references, predictions, **options).items()}
    return _caption_dict(evaluate_captions({im.id: im.captions for im in data.references}, predictions, **options))


def _caption_dict(s: Any) -> dict[str, Any]:
    return {**s.as_dict(), "num_images": s.num_images, "unavailable": dict(s.unavailable), "tokenizer": s.tokenizer}


def retrieval_scores(t2i_ranks: Sequence[int], i2t_ranks: Sequence[int]) -> dict[str, float]:
    """R@1/5/10 (percent) both ways and their means, from the 0-based rank of each query's best positive."""
    return recall_summary(np.asarray(t2i_ranks, dtype=np.int64), np.asarray(i2t_ranks, dtype=np.int64))
