"""Readers and writers for the official evaluation file formats.

Every reader checks the fields the metrics need and raises ``ValueError`` naming the file, the
record and the field when one is missing or has the wrong type, so a broken annotation file fails
at load time instead of as a ``KeyError`` deep inside a metric. Fields the metrics do not use
(``info``, ``license``, ``answer_confidence``, ...) are not required and not kept.

Formats:

- VQAv2 / OK-VQA: ``OpenEnded_mscoco_*_questions.json`` (``questions``: image_id, question,
  question_id) and ``mscoco_*_annotations.json`` (``annotations``: question_id, image_id, answers
  [10 x {answer}], multiple_choice_answer, answer_type, question_type). Results: a list of
  {question_id, answer}.
- GQA: ``*_balanced_questions.json``, a dict question id -> {imageId, question, answer, ...}.
- COCO captions (``annotations/captions_val2014.json``) and NoCaps (``nocaps_val_4500_captions.json``):
  {images: [{id, file_name[, domain]}], annotations: [{image_id, id, caption}]}. Results: a list of
  {image_id, caption}.
- Karpathy splits as LAVIS ships them (``coco_karpathy_test.json``, ``flickr30k_test.json``): a list
  of {image, caption: [...]}; used for captioning references and for retrieval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "VQAQuestion",
    "VQAAnnotation",
    "GQAQuestion",
    "CaptionedImage",
    "KarpathyEntry",
    "RetrievalSet",
    "NOCAPS_DOMAINS",
    "read_vqa_questions",
    "write_vqa_questions",
    "read_vqa_annotations",
    "write_vqa_annotations",
    "read_vqa_results",
    "write_vqa_results",
    "read_gqa_questions",
    "write_gqa_questions",
    "read_coco_captions",
    "write_coco_captions",
    "read_nocaps",
    "write_nocaps",
    "read_caption_results",
    "write_caption_results",
    "read_karpathy",
    "write_karpathy",
    "read_retrieval",
    "write_retrieval",
]

PathLike = str | os.PathLike[str]

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


@dataclass
class VQAQuestion:
    question_id: int
    image_id: int
    question: str


@dataclass
class VQAAnnotation:
    question_id: int
    image_id: int
    answers: list[str]  # the 10 annotators' raw answers, in answer_id order
    multiple_choice_answer: str
    answer_type: str  # "yes/no", "number", "other"
    question_type: str  # e.g. "how many", "what color is the"


@dataclass
class GQAQuestion:
    question_id: str  # GQA ids are strings ("20968379")
    image_id: str  # GQA image ids are strings ("n161313")
    question: str
    answer: str | None  # None only when read with require_answers=False (test/submission files)


@dataclass
class CaptionedImage:
    """One image of a COCO-format caption file; ``domain`` is set for NoCaps only."""

    id: int
    file_name: str
    captions: list[str] = field(default_factory=list)
    domain: str | None = None


@dataclass
class KarpathyEntry:
    image: str  # path relative to the image root, e.g. "val2014/COCO_val2014_000000391895.jpg"
    captions: list[str]


@dataclass
class RetrievalSet:
    """Images and texts of a retrieval split; ``text_to_image[t]`` is the image of text ``t``."""

    images: list[str]
    texts: list[str]
    text_to_image: list[int]

    @property
    def image_to_texts(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for t, i in enumerate(self.text_to_image):
            out[i].append(t)
        return out


# ----------------------------------------------------------------------------- helpers


def _load(path: PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from e


def _dump(path: PathLike, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def _get(obj: Any, key: str, kind: type | tuple[type, ...], path: PathLike, where: str) -> Any:
    """``obj[key]`` checked for presence and type; the error names file, record and field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)}: {where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{os.fspath(path)}: {where}: missing field '{key}'")
    value = obj[key]
    # bool is an int subclass; an id of `true` is a broken file, not id 1
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise ValueError(f"{os.fspath(path)}: {where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def _fields(obj: Any, kinds: dict[str, type], path: PathLike, where: str) -> dict[str, Any]:
    """``{key: obj[key]}`` for each key of ``kinds``, each checked as ``_get`` checks it (in that order)."""
    return {key: _get(obj, key, kind, path, where) for key, kind in kinds.items()}


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _list_field(root: Any, key: str, path: PathLike) -> list[Any]:
    return _get(root, key, list, path, "top level")


def _string_list(obj: Any, key: str, path: PathLike, where: str) -> list[str]:
    values = _get(obj, key, list, path, where)
    for j, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{os.fspath(path)}: {where}: '{key}[{j}]' must be str, got {type(v).__name__}")
    return list(values)


# ----------------------------------------------------------------------------- VQAv2 / OK-VQA


def read_vqa_questions(path: PathLike) -> list[VQAQuestion]:
    """VQAv2 / OK-VQA questions file: ``{"questions": [{image_id, question, question_id}]}``."""
    out = []
    for k, q in enumerate(_list_field(_load(path), "questions", path)):
        out.append(VQAQuestion(**_fields(q, {"question_id": int, "image_id": int, "question": str}, path,
                                         f"questions[{k}]")))
    return out


def write_vqa_questions(path: PathLike, questions: Iterable[VQAQuestion]) -> None:
    _dump(
        path,
        {
            "task_type": "Open-Ended",
            "questions": [
                {"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in questions
            ],
        },
    )


def read_vqa_annotations(path: PathLike) -> list[VQAAnnotation]:
    """VQAv2 / OK-VQA annotations file: ``{"annotations": [{question_id, image_id, answers, ...}]}``.

    ``answers`` is a list of ``{"answer": str, ...}`` (10 in the official files; any non-empty
    number is accepted, the accuracy formula is defined for all of them).
    """
    out = []
    for k, a in enumerate(_list_field(_load(path), "annotations", path)):
        where = f"annotations[{k}]"
        raw = _get(a, "answers", list, path, where)
        if not raw:
            raise ValueError(f"{os.fspath(path)}: {where}: field 'answers' is empty")
        answers = [_get(ans, "answer", str, path, f"{where}.answers[{j}]") for j, ans in enumerate(raw)]
        fields = _fields(a, {"question_id": int, "image_id": int, "multiple_choice_answer": str, "answer_type": str,
                             "question_type": str}, path, where)
        out.append(VQAAnnotation(answers=answers, **fields))
    return out


def write_vqa_annotations(path: PathLike, annotations: Iterable[VQAAnnotation]) -> None:
    # answer_id is 1-based as in the official files; answer_confidence is not written because we
    # do not know it (no metric reads it)
    _dump(
        path,
        {
            "annotations": [
                {
                    "question_type": a.question_type,
                    "multiple_choice_answer": a.multiple_choice_answer,
                    "answers": [{"answer": s, "answer_id": j + 1} for j, s in enumerate(a.answers)],
                    "image_id": a.image_id,
                    "answer_type": a.answer_type,
                    "question_id": a.question_id,
                }
                for a in annotations
            ]
        },
    )


def read_vqa_results(path: PathLike) -> dict[int, str] | dict[str, str]:
    """VQA results file (what the evaluation server takes): ``[{question_id, answer}]``.

    Ids are kept as written: ints for VQAv2 / OK-VQA, strings when GQA answers use this layout.
    """
    root = _load(path)
    if not isinstance(root, list):
        raise ValueError(f"{os.fspath(path)}: top level: expected a JSON list of {{question_id, answer}}")
    out: dict[int, str] = {}
    for k, r in enumerate(root):
        qid = _get(r, "question_id", (int, str), path, f"[{k}]")
        if qid in out:
            raise ValueError(f"{os.fspath(path)}: [{k}]: second answer for question_id {qid!r}")
        out[qid] = _get(r, "answer", str, path, f"[{k}]")
    return out


def write_vqa_results(path: PathLike, answers: Mapping[int, str] | Mapping[str, str]) -> None:
    _dump(path, [{"question_id": qid, "answer": ans} for qid, ans in answers.items()])


# ----------------------------------------------------------------------------- GQA


def read_gqa_questions(path: PathLike, require_answers: bool = True) -> list[GQAQuestion]:
    """GQA questions file: ``{question_id: {imageId, question, answer, ...}}``.

    The test (submission) split has no answers; read it with ``require_answers=False``.
    """
    root = _load(path)
    if not isinstance(root, dict):
        raise ValueError(f"{os.fspath(path)}: top level: expected a JSON object question_id -> question")
    out = []
    for qid, q in root.items():
        where = f"question '{qid}'"
        image_id = _get(q, "imageId", str, path, where)  # also checks that q is an object
        question = _get(q, "question", str, path, where)
        answer = _get(q, "answer", str, path, where) if require_answers or "answer" in q else None
        out.append(GQAQuestion(qid, image_id, question, answer))
    return out


def write_gqa_questions(path: PathLike, questions: Iterable[GQAQuestion]) -> None:
    out: dict[str, dict[str, str]] = {}
    for q in questions:
        entry = {"imageId": q.image_id, "question": q.question}
        if q.answer is not None:
            entry["answer"] = q.answer
        out[q.question_id] = entry
    _dump(path, out)


# ----------------------------------------------------------------------------- COCO / NoCaps captions


def _read_coco_format(path: PathLike, need_domain: bool) -> list[CaptionedImage]:
    root = _load(path)
    images: dict[int, CaptionedImage] = {}
    for k, im in enumerate(_list_field(root, "images", path)):
        where = f"images[{k}]"
        image_id = _get(im, "id", int, path, where)
        if image_id in images:
            raise ValueError(f"{os.fspath(path)}: {where}: duplicate image id {image_id}")
        domain = _get(im, "domain", str, path, where) if need_domain else None
        if need_domain and domain not in NOCAPS_DOMAINS:
            raise ValueError(
                f"{os.fspath(path)}: {where}: field 'domain' is {domain!r}, expected one of {NOCAPS_DOMAINS}"
            )
        images[image_id] = CaptionedImage(image_id, _get(im, "file_name", str, path, where), [], domain)
    # NoCaps test and COCO test2014 files have images but no annotations: captions stay empty
    for k, ann in enumerate(root.get("annotations", [])):
        where = f"annotations[{k}]"
        image_id = _get(ann, "image_id", int, path, where)
        if image_id not in images:
            raise ValueError(f"{os.fspath(path)}: {where}: image_id {image_id} is not in 'images'")
        images[image_id].captions.append(_get(ann, "caption", str, path, where))
    return list(images.values())


def _write_coco_format(path: PathLike, images: Iterable[CaptionedImage], with_domain: bool) -> None:
    img_out, ann_out = [], []
    for im in images:
        entry: dict[str, Any] = {"id": im.id, "file_name": im.file_name}
        if with_domain:
            if im.domain not in NOCAPS_DOMAINS:
                raise ValueError(f"{os.fspath(path)}: image {im.id}: domain {im.domain!r} not in {NOCAPS_DOMAINS}")
            entry["domain"] = im.domain
        img_out.append(entry)
        for c in im.captions:
            ann_out.append({"image_id": im.id, "id": len(ann_out), "caption": c})
    _dump(path, {"images": img_out, "annotations": ann_out})


def read_coco_captions(path: PathLike) -> list[CaptionedImage]:
    """COCO captions file (``captions_val2014.json``, LAVIS' ``coco_karpathy_test_gt.json``)."""
    return _read_coco_format(path, need_domain=False)


def write_coco_captions(path: PathLike, images: Iterable[CaptionedImage]) -> None:
    _write_coco_format(path, images, with_domain=False)


def read_nocaps(path: PathLike) -> list[CaptionedImage]:
    """NoCaps file: COCO format whose images carry ``domain`` (in-, near- or out-domain)."""
    return _read_coco_format(path, need_domain=True)


def write_nocaps(path: PathLike, images: Iterable[CaptionedImage]) -> None:
    _write_coco_format(path, images, with_domain=True)


def read_caption_results(path: PathLike) -> dict[int, str]:
    """COCO caption results file: ``[{image_id, caption}]``."""
    root = _load(path)
    if not isinstance(root, list):
        raise ValueError(f"{os.fspath(path)}: top level: expected a JSON list of {{image_id, caption}}")
    out: dict[int, str] = {}
    for k, r in enumerate(root):
        image_id = _get(r, "image_id", int, path, f"[{k}]")
        if image_id in out:
            raise ValueError(f"{os.fspath(path)}: [{k}]: second caption for image_id {image_id}")
        out[image_id] = _get(r, "caption", str, path, f"[{k}]")
    return out


def write_caption_results(path: PathLike, captions: Mapping[int, str]) -> None:
    _dump(path, [{"image_id": image_id, "caption": c} for image_id, c in captions.items()])


# ----------------------------------------------------------------------------- Karpathy / retrieval


def read_karpathy(path: PathLike) -> list[KarpathyEntry]:
    """LAVIS Karpathy split (``coco_karpathy_test.json``, ``flickr30k_test.json``): ``[{image, caption}]``.

    ``caption`` is a list in the val/test files; a single string (the train files' layout) is
    read as a one-caption list.
    """
    root = _load(path)
    if not isinstance(root, list):
        raise ValueError(f"{os.fspath(path)}: top level: expected a JSON list of {{image, caption}}")
    out = []
    for k, e in enumerate(root):
        where = f"[{k}]"
        image = _get(e, "image", str, path, where)
        caption = _get(e, "caption", (list, str), path, where)
        captions = [caption] if isinstance(caption, str) else _string_list(e, "caption", path, where)
        out.append(KarpathyEntry(image, captions))
    return out


def write_karpathy(path: PathLike, entries: Iterable[KarpathyEntry]) -> None:
    _dump(path, [{"image": e.image, "caption": list(e.captions)} for e in entries])


def read_retrieval(path: PathLike) -> RetrievalSet:
    """A Karpathy-format file as a retrieval set: texts numbered image by image, in file order."""
    entries = read_karpathy(path)
    images, texts, text_to_image = [], [], []
    for i, e in enumerate(entries):
        if not e.captions:
            raise ValueError(f"{os.fspath(path)}: [{i}]: field 'caption' is empty")
        images.append(e.image)
        texts.extend(e.captions)
        text_to_image.extend([i] * len(e.captions))
    return RetrievalSet(images, texts, text_to_image)


def write_retrieval(path: PathLike, data: RetrievalSet) -> None:
    if len(data.texts) != len(data.text_to_image):
        raise ValueError(
            f"{os.fspath(path)}: {len(data.texts)} texts but {len(data.text_to_image)} text_to_image entries"
        )
    write_karpathy(
        path,
        [
            KarpathyEntry(image, [data.texts[t] for t in ts])
            for image, ts in zip(data.images, data.image_to_texts, strict=True)
        ],
    )
