"""Evaluate the bundled demo models on held-out images of ``blip2.demo.world``.

    python -m blip2.demo.evaluate [--n 500] [--variant clean] [--readme docs/BENCHMARKS.md]

Generates ``n`` held-out scenes (split "test", a seed the recipe never trains on), then measures:

- caption accuracy: the caption (no prompt) names every object's colour and shape and nothing else
  (``world_eval.caption_scores(...)["objects_correct"]``); "exact" also needs every size right;
- VQA accuracy per question type, prompt "Question: {q} Answer:" (``world_eval.answer_correct``);
- text-to-image R@1 over the n images, one query per distinct caption: a hit when the top image has
  that caption (several images can share one). By ITC alone, and by ITC then ITM re-ranking of the top
  ``k`` (LAVIS: score = ITM match logit + ITC similarity).

``--readme`` rewrites the table between ``<!-- demo-eval:start -->`` and ``<!-- demo-eval:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections import defaultdict

import torch
from PIL import Image

from blip2.eval.retrieval import ranks_from_scores, recall_at_k, rerank_top_k
from blip2.generation import generated_texts
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor
from blip2.models.retrieval import Blip2ForImageTextRetrieval, itc_similarity
from blip2.demo.world import Scene, write_dataset
from blip2.demo.world_eval import answer_correct, caption_scores

__all__ = ["load_heldout", "caption_images", "answer_questions", "evaluate_generation", "evaluate_retrieval",
           "evaluate", "markdown_table", "update_readme", "main", "VQA_TYPES"]

VQA_TYPES = ("color", "shape", "count", "count_color")
START, END = "<!-- demo-eval:start -->", "<!-- demo-eval:end -->"
TEST_SEED = 20240501


def load_heldout(n: int, variant: str = "clean", seed: int = TEST_SEED) -> tuple[list[Image.Image], list[Scene], list[str], list[dict]]:
    """``n`` held-out images as written by ``world.write_dataset``: (images, scenes, captions, vqa rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(tmp, n, seed=seed, split="test", variant=variant)
        with open(os.path.join(root, "scenes.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(root, "captions.jsonl")) as f:
            captions = [json.loads(line)["caption"] for line in f]
        with open(os.path.join(root, "vqa.jsonl")) as f:
            vqa = [json.loads(line) for line in f]
        images = [Image.open(os.path.join(root, r["image"])).convert("RGB") for r in rows]
    index = {r["image"]: i for i, r in enumerate(rows)}
    for q in vqa:
        q["index"] = index[q.pop("image")]
    return images, [Scene.from_dict(r["scene"]) for r in rows], captions, vqa


@torch.no_grad()
def caption_images(model: Blip2ForConditionalGeneration, processor: Blip2Processor, images: list[Image.Image],
                   batch_size: int = 64) -> list[str]:
    """Greedy captions with no prompt (image tokens + BOS)."""
    out: list[str] = []
    for i in range(0, len(images), batch_size):
        pixels = processor(images=images[i:i + batch_size])["pixel_values"]
        ids = model.generate(pixels)
        out += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return out


@torch.no_grad()
def answer_questions(model: Blip2ForConditionalGeneration, processor: Blip2Processor, images: list[Image.Image],
                     questions: list[str], batch_size: int = 64) -> list[str]:
    """Greedy answers to "Question: {q} Answer:", one image per question, without the prompt."""
    from blip2.demo.recipe.tokenizer import vqa_prompt

    out: list[str] = []
    for i in range(0, len(images), batch_size):
        prompts = [vqa_prompt(q) for q in questions[i:i + batch_size]]
        inputs = processor(images=images[i:i + batch_size], text=prompts, padding=True)
        ids = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        out += generated_texts(processor, ids, inputs["input_ids"], model.config.use_decoder_only_language_model)
    return out


def evaluate_generation(model_dir: str, images: list[Image.Image], scenes: list[Scene], vqa: list[dict]) -> dict[str, float]:
    """Caption accuracy (objects / exact) and VQA accuracy per type, in percent."""
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    processor = Blip2Processor.from_pretrained(model_dir)
    captions = caption_images(model, processor, images)
    scores = [caption_scores(c, s) for c, s in zip(captions, scenes)]
    result = {"caption_objects": 100.0 * sum(s["objects_correct"] for s in scores) / len(scores),
              "caption_exact": 100.0 * sum(s["exact"] for s in scores) / len(scores)}
    answers = answer_questions(model, processor, [images[q["index"]] for q in vqa], [q["question"] for q in vqa])
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, a in zip(vqa, answers):
        hits[q["type"]].append(answer_correct(a, q["answer"]))
    for kind in VQA_TYPES:
        result[f"vqa_{kind}"] = 100.0 * sum(hits[kind]) / max(1, len(hits[kind]))
        result[f"vqa_{kind}_n"] = float(len(hits[kind]))
    return result


@torch.no_grad()
def evaluate_retrieval(model_dir: str, images: list[Image.Image], captions: list[str], k: int = 16,
                       batch_size: int = 64) -> dict[str, float]:
    """Text-to-image R@1 (percent) by ITC and by ITC + ITM re-ranking of the top ``k``."""
    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir)
    processor = Blip2Processor.from_pretrained(model_dir)
    feats, embeds = [], []
    for i in range(0, len(images), batch_size):
        f = model.vision_features(processor(images=images[i:i + batch_size])["pixel_values"])
        feats.append(f)
        embeds.append(model.image_embeds_from_features(f))
    image_feats, image_embeds = torch.cat(feats), torch.cat(embeds)  # [N, N_tok, Dv], [N, Q, E]
    queries = sorted(set(captions))
    text = processor(text=queries, padding=True)
    text_embeds = model.text_embeds(text["input_ids"], text["attention_mask"])  # [T, E]
    itc = itc_similarity(image_embeds, text_embeds).t()  # [T, N]
    positives = [[i for i, c in enumerate(captions) if c == q] for q in queries]

    def itm(t: int, candidates: torch.Tensor) -> torch.Tensor:
        ids = text["input_ids"][t].expand(len(candidates), -1)
        mask = text["attention_mask"][t].expand(len(candidates), -1)
        return model.itm_logits_from_features(image_feats[candidates], ids, mask)[:, 1]

    reranked = rerank_top_k(itc, k, itm)
    return {"t2i_r1_itc": recall_at_k(ranks_from_scores(itc, positives), (1,))[1],
            "t2i_r1_itc_itm": recall_at_k(ranks_from_scores(reranked, positives), (1,))[1],
            "t2i_queries": float(len(queries))}


def evaluate(model_dir: str, retrieval_dir: str, n: int = 500, variant: str = "clean") -> dict[str, float]:
    images, scenes, captions, vqa = load_heldout(n, variant)
    result = {"images": float(n)}
    result.update(evaluate_generation(model_dir, images, scenes, vqa))
    result.update(evaluate_retrieval(retrieval_dir, images, captions))
    return result


def markdown_table(result: dict[str, float], variant: str = "clean") -> str:
    n = int(result["images"])
    rows = [("Caption accuracy (every object's colour and shape, nothing invented)", result["caption_objects"]),
            ("Caption exact (sizes right too)", result["caption_exact"])]
    rows += [(f"VQA accuracy, `{kind}` questions (n={int(result[f'vqa_{kind}_n'])})", result[f"vqa_{kind}"])
             for kind in VQA_TYPES]
    rows += [(f"Text-to-image R@1, ITC ({int(result['t2i_queries'])} distinct captions)", result["t2i_r1_itc"]),
             ("Text-to-image R@1, ITC + ITM re-ranking", result["t2i_r1_itc_itm"])]
    lines = [f"Held-out: {n} generated images (`{variant}`), produced by `python benchmarks/eval_demo.py`.", "",
             "| Metric | % |", "|---|---:|"] + [f"| {name} | {value:.1f} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def update_readme(path: str, table: str) -> None:
    """Replace the text between the demo-eval markers of ``path`` with ``table``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{path}: no {START} ... {END} markers")
    text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{table}{END}", text, flags=re.S)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    from blip2.demo import DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL

    p = argparse.ArgumentParser(prog="python -m blip2.demo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="generation model directory (default: the bundled one)")
    p.add_argument("--retrieval-model", default=DEFAULT_RETRIEVAL_MODEL, help="retrieval model directory")
    p.add_argument("--n", type=int, default=500, help="held-out images (default 500)")
    p.add_argument("--variant", default="clean", help="how the images are drawn (a world.VARIANTS name or 'random')")
    p.add_argument("--readme", help="write the table into this markdown file (docs/BENCHMARKS.md) between the demo-eval markers")
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args(argv)
    start = time.time()
    result = evaluate(a.model, a.retrieval_model, a.n, a.variant)
    table = markdown_table(result, a.variant)
    print(table)
    print(f"({time.time() - start:.0f}s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    if a.readme:
        update_readme(a.readme, table)


if __name__ == "__main__":
    main()
