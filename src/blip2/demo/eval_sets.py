"""Synthetic benchmarks in the official formats, from the shapes world of ``blip2.demo.world``.

``write_world_benchmarks(out_dir, n, seed)`` renders ``n`` scenes with ``blip2.demo.world.write_dataset``
(split "test") and writes, next to them, one file per benchmark format that ``blip2 eval`` reads:

    out_dir/test/images/test_000000.png ...   the images (``--images out_dir/test/images`` for every task)
    vqav2_questions.json      VQAv2 / OK-VQA questions   {"questions": [{image_id, question, question_id}]}
    vqav2_annotations.json    VQAv2 / OK-VQA annotations {"annotations": [{question_id, answers x 10, ...}]}
    gqa_questions.json        GQA balanced questions     {question_id: {imageId, question, answer}}
    coco_karpathy_test.json   Karpathy caption split     [{image, caption: [...]}]
    nocaps_captions.json      NoCaps captions            {images: [{id, file_name, domain}], annotations}
    retrieval_test.json       Karpathy retrieval split   [{image, caption: [...]}], captions all distinct

Ids follow the official conventions: the image id is the number ending the file name (as COCO's
``COCO_val2014_000000391895.jpg``), a VQA question id is ``image_id * 1000 + k``, GQA ids are strings
(the image id is the file stem). Questions are capitalised as in the official files.

Annotator answers are stored as the official files store them, lower case with digits ("2", not
"two"). The 2016 (LAVIS) VQA rules map "two" -> "2" in the *prediction*, so a model that answers
"two" (as the world's text does) scores under ``--vqa-rules lavis``; the default 2021 rules leave a
unanimous answer untouched, so there it must say "2". Every question has 10 agreeing annotators (the world
has one true answer). GQA keeps the world's word answers, as GQA's own files use words.

NoCaps domains are stand-ins: one object is "in-domain", two "near-domain", three "out-domain".
The retrieval split keeps only the first image of each distinct caption, so every text has exactly
one correct image.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

from blip2.demo.world import COUNT_WORDS, write_dataset
from blip2.eval.formats import (
    CaptionedImage,
    GQAQuestion,
    KarpathyEntry,
    RetrievalSet,
    VQAAnnotation,
    VQAQuestion,
    write_gqa_questions,
    write_karpathy,
    write_nocaps,
    write_retrieval,
    write_vqa_annotations,
    write_vqa_questions,
)

__all__ = ["WorldBenchmarks", "main", "write_world_benchmarks"]

SPLIT = "test"
NUM_ANNOTATORS = 10  # as in VQAv2 and OK-VQA
# world question type -> (VQA answer_type, VQA question_type: the question's leading words, as officially)
_VQA_TYPES = {
    "color": ("other", "what color is the"),
    "shape": ("other", "what shape is the"),
    "count": ("number", "how many"),
    "count_color": ("number", "how many"),
}
_NOCAPS_DOMAIN = {1: "in-domain", 2: "near-domain", 3: "out-domain"}  # by number of objects


@dataclass(frozen=True)
class WorldBenchmarks:
    """Paths of the files ``write_world_benchmarks`` wrote (``images`` is the ``--images`` of every task)."""

    images: str
    vqa_questions: str
    vqa_annotations: str
    gqa_questions: str
    karpathy_test: str
    nocaps: str
    retrieval: str


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _official_answer(answer: str) -> str:
    """How an annotation file stores a world answer: count words as digits, the rest as is."""
    return str(COUNT_WORDS.index(answer)) if answer in COUNT_WORDS else answer


def _capitalise(question: str) -> str:
    return question[:1].upper() + question[1:]


def write_world_benchmarks(out_dir: str | os.PathLike, n: int, seed: int = 0) -> WorldBenchmarks:
    """Render ``n`` world scenes and write them in every official format; same arguments, same files."""
    out = os.fspath(out_dir)
    root = write_dataset(out, n, seed=seed, split=SPLIT)
    images_dir = os.path.join(root, "images")
    captions = _read_jsonl(os.path.join(root, "captions.jsonl"))  # one line per image, in order
    objects = {s["image"]: len(s["scene"]["objects"]) for s in _read_jsonl(os.path.join(root, "scenes.jsonl"))}

    def file_name(rel: str) -> str:  # "images/test_000007.png" -> "test_000007.png", relative to images_dir
        return os.path.basename(rel)

    def image_id(rel: str) -> int:  # the number ending the file name, as for COCO
        return int(os.path.splitext(file_name(rel))[0].rsplit("_", 1)[1])

    vqa_questions, vqa_annotations, gqa_questions = [], [], []
    per_image: dict[str, int] = {}
    for qa in _read_jsonl(os.path.join(root, "vqa.jsonl")):
        k = per_image.get(qa["image"], 0)
        per_image[qa["image"]] = k + 1
        iid = image_id(qa["image"])
        qid = iid * 1000 + k
        question = _capitalise(qa["question"])
        answer = _official_answer(qa["answer"])
        answer_type, question_type = _VQA_TYPES[qa["type"]]
        vqa_questions.append(VQAQuestion(qid, iid, question))
        vqa_annotations.append(VQAAnnotation(qid, iid, [answer] * NUM_ANNOTATORS, answer, answer_type, question_type))
        gqa_questions.append(GQAQuestion(str(qid), os.path.splitext(file_name(qa["image"]))[0], question, qa["answer"]))

    karpathy = [KarpathyEntry(file_name(c["image"]), [c["caption"]]) for c in captions]
    nocaps = [
        CaptionedImage(image_id(c["image"]), file_name(c["image"]), [c["caption"]], _NOCAPS_DOMAIN[objects[c["image"]]])
        for c in captions
    ]
    first_of_caption: dict[str, dict] = {}
    for c in captions:
        first_of_caption.setdefault(c["caption"], c)
    distinct = list(first_of_caption.values())  # dicts keep insertion order: file order
    retrieval = RetrievalSet([file_name(c["image"]) for c in distinct], [c["caption"] for c in distinct],
                             list(range(len(distinct))))

    paths = WorldBenchmarks(
        images=images_dir,
        vqa_questions=os.path.join(out, "vqav2_questions.json"),
        vqa_annotations=os.path.join(out, "vqav2_annotations.json"),
        gqa_questions=os.path.join(out, "gqa_questions.json"),
        karpathy_test=os.path.join(out, "coco_karpathy_test.json"),
        nocaps=os.path.join(out, "nocaps_captions.json"),
        retrieval=os.path.join(out, "retrieval_test.json"),
    )
    write_vqa_questions(paths.vqa_questions, vqa_questions)
    write_vqa_annotations(paths.vqa_annotations, vqa_annotations)
    write_gqa_questions(paths.gqa_questions, gqa_questions)
    write_karpathy(paths.karpathy_test, karpathy)
    write_nocaps(paths.nocaps, nocaps)
    write_retrieval(paths.retrieval, retrieval)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blip2.demo.eval_sets",
                                description="Write synthetic VQAv2, GQA, Karpathy, NoCaps and retrieval files "
                                            "from the shapes world, for `blip2 eval`.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    a = p.parse_args(argv)
    for name, path in vars(write_world_benchmarks(a.out, a.n, a.seed)).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
