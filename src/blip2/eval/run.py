"""``blip2 eval``: run a BLIP-2 checkpoint on a benchmark's official files and report the paper's metrics.

    blip2 eval --task vqav2 --model Salesforce/blip2-opt-2.7b --images val2014/ \\
        --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --output vqav2.json

Flow: read the inputs (``tasks.load_task``, before any model is loaded, so a bad path fails at once),
predict in batches, score (``tasks.score``), write the results file and print a summary table.

Resume: every finished batch is appended to ``<output>.partial`` (JSON lines: a settings header,
then one record per answer, caption or retrieval query). ``--resume`` continues from it, after
checking that everything that changes the predictions (task, model, dtype, preset, inputs, limit)
is the same; the batch size and device may differ. The partial file is removed once the results file
is written. ``--resume`` on a finished results file re-scores its predictions without the model.

Results file (JSON): ``task``, ``settings`` (as above), ``num_items``, ``metrics`` (None when the
inputs carry no answers, e.g. test-dev), ``metric_options``, and ``predictions``: the official
results layout for VQA / GQA / captions (``[{question_id, answer}]``, ``[{questionId, prediction}]``,
``[{image_id, caption}]``), or for retrieval ``{"text_to_image": [...], "image_to_text": [...]}``
with, per query (text or image index in file order), the 0-based ``rank`` of its best correct
candidate after re-ranking and its ``top`` 10 candidates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from blip2.apps.errors import cli_message
from blip2.apps.options import add_dtype_option
from blip2.apps.pipeline import model_class, resolve_device, resolve_dtype
from blip2.checkpoint import atomic_write
from blip2.hub import resolve_dir
from blip2.eval.caption import Tokenizer
from blip2.eval.partial import PartialResults, check_settings
from blip2.eval.retrieval import ranks_from_scores, rerank_top_k
from blip2.eval.vqa import VQA_RULES, Rules
from blip2.generation import generated_texts
from blip2.processing import Blip2Processor, ImageFiles, ImageLoadError
from blip2.eval.tasks import (
    PREDICTION_FIELDS,
    PRESETS,
    TASKS,
    Item,
    Key,
    Preset,
    RetrievalData,
    TaskData,
    load_task,
    official_predictions,
    pre_question,
    resolve_preset,
    retrieval_scores,
    score,
)

if TYPE_CHECKING:
    from blip2.models.blip2 import Blip2ForConditionalGeneration
    from blip2.models.retrieval import Blip2ForImageTextRetrieval

__all__ = ["EvalOptions", "build_parser", "evaluate", "generate_texts", "load_model", "main", "rank_retrieval",
           "summary_table"]

TOP = 10  # candidates kept per retrieval query in the results file (R@10 needs no more)


@dataclass
class EvalOptions:
    """Everything ``blip2 eval`` takes; the field names are the command's options."""

    task: str
    model: str
    images: str
    questions: str | None = None
    annotations: str | None = None
    preset: str | None = None  # None: the task's default
    output: str | None = None  # None: "<task>_results.json"
    batch_size: int = 16
    resume: bool = False
    limit: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    workers: int = 2
    predictions: str | None = None  # also write the official-format predictions here
    # preset overrides (None keeps the preset's value)
    prompt: str | None = None
    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    length_penalty: float | None = None
    rerank_k: int | None = None
    # caption metrics
    caption_tokenizer: Tokenizer = "auto"
    meteor: bool = True
    spice: bool = True
    vqa_rules: Rules = "official"

    @property
    def output_path(self) -> str:
        return self.output or f"{self.task}_results.json"


# ----------------------------------------------------------------------------- model


def load_model(checkpoint: str, retrieval: bool, device: torch.device, dtype: torch.dtype
               ) -> tuple[Blip2ForConditionalGeneration | Blip2ForImageTextRetrieval, Blip2Processor]:
    """(model, processor) from a checkpoint directory or Hub id; the class must suit the task."""
    directory = resolve_dir(checkpoint)
    cls = model_class(directory)
    if retrieval != (cls.__name__ == "Blip2ForImageTextRetrieval"):
        need = "an image-text retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g)" \
            if retrieval else "a captioning/VQA checkpoint (Blip2ForConditionalGeneration)"
        raise ValueError(f"this task needs {need}; {checkpoint} is a {cls.__name__}")
    model = cls.from_pretrained(directory, dtype=dtype, device=device)
    return model, Blip2Processor.from_pretrained(directory)


def _pixel_batches(paths: Sequence[str], processor: Blip2Processor, batch_size: int, workers: int
                   ) -> Iterator[torch.Tensor]:
    """pixel_values [B, 3, H, W] of ``paths``, ``batch_size`` at a time, decoded by DataLoader workers;
    an image that cannot be read stops the run, naming it."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, processor.image_processor), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    for batch in loader:
        for _, _, reason in batch:
            if reason is not None:
                raise ImageLoadError(reason)
        yield torch.stack([pixels for _, pixels, _ in batch])


def _chunks(xs: Sequence, n: int) -> list[Sequence]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


# ----------------------------------------------------------------------------- generation


def _prompts(items: Sequence[Item], preset: Preset) -> list[str]:
    if preset.kind == "question":
        return [preset.prompt.format(pre_question(it.question or "")) for it in items]
    return [preset.prompt] * len(items)


@torch.inference_mode()
def generate_texts(model: Blip2ForConditionalGeneration, processor: Blip2Processor, items: Sequence[Item], preset: Preset, batch_size: int,
                   workers: int = 0) -> Iterator[list[str]]:
    """Answers or captions for ``items``, one list per batch of ``batch_size``, with the preset's decoding.

    Decoder-only LMs get left-padded prompts, so every row's new tokens start at the same position;
    the text is what follows the prompt, stripped (as LAVIS returns it).
    """
    decoder_only = model.config.use_decoder_only_language_model
    batches = _chunks(list(items), batch_size)
    for batch, pixels in zip(batches, _pixel_batches([it.image for it in items], processor, batch_size, workers)):
        ids, mask = processor.prompt_inputs(_prompts(batch, preset), "left" if decoder_only else "right")
        out = model.generate(
            pixel_values=pixels.to(model.device), input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
            do_sample=False, num_return_sequences=1, repetition_penalty=1.0, num_beams=preset.num_beams,
            max_new_tokens=preset.max_new_tokens, min_new_tokens=preset.min_new_tokens,
            length_penalty=preset.length_penalty,
        )
        yield generated_texts(processor, out, ids, decoder_only)


# ----------------------------------------------------------------------------- retrieval


def _rerank_rows(scores: torch.Tensor, queries: Sequence[int], k: int,
                 pair_scores: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``rerank_top_k`` of rows ``queries`` of ``scores`` [n_queries, n_candidates] -> [len(queries), n_candidates];
    ``pair_scores(query, candidates [k])`` gives the ITM scores of one query's top-k candidates."""
    rows = torch.tensor(list(queries), device=scores.device)
    return rerank_top_k(scores[rows], k, lambda j, candidates: pair_scores(queries[j], candidates))


@torch.inference_mode()
def rank_retrieval(model: Blip2ForImageTextRetrieval, processor: Blip2Processor, data: RetrievalData, preset: Preset, batch_size: int,
                   workers: int = 0, skip: frozenset[tuple[str, int]] = frozenset()) -> Iterator[list[dict[str, Any]]]:
    """LAVIS' BLIP-2 retrieval evaluation: ITC similarity of every image with every text, then for
    each query the ``rerank_k`` best candidates re-scored ITM + ITC (``eval.retrieval.rerank_top_k``).

    Yields, per batch of queries, records ``{"direction": "t2i" | "i2t", "query", "rank", "top"}``;
    queries in ``skip`` ((direction, index) pairs, done before a resume) are not run again. The vision
    features of all images are kept ([n_images, N+1, Dv] in the model's dtype), as LAVIS keeps them.
    """
    from blip2.models.retrieval import itc_similarity

    split, dev = data.split, model.device
    feats, image_embeds = [], []
    for pixels in _pixel_batches(split.images, processor, batch_size, workers):
        f = model.vision_features(pixels.to(dev))  # [b, N+1, Dv]
        feats.append(f)
        image_embeds.append(model.image_embeds_from_features(f))  # [b, Q, E]
    image_feats = torch.cat(feats)
    enc = processor.tokenizer(split.texts, padding=True, truncation=True, max_length=preset.max_text_tokens,
                              padding_side="right", return_tensors="pt")
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)  # [n_texts, T]
    text_embeds = torch.cat([model.text_embeds(i, m) for i, m in zip(ids.split(batch_size), mask.split(batch_size))])
    itc = itc_similarity(torch.cat(image_embeds), text_embeds).float()  # [n_images, n_texts]

    def itm(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """ITM "match" logit (averaged over queries) of pairs (images[j], texts[j]), [n]."""
        out = [model.itm_logits_from_features(image_feats[i], ids[t], mask[t])[:, 1].float()
               for i, t in zip(images.split(batch_size), texts.split(batch_size))]
        return torch.cat(out)

    def same(q: int, n: int) -> torch.Tensor:
        return torch.full((n,), q, dtype=torch.long, device=dev)

    directions: list[tuple[str, torch.Tensor, list[list[int]], Callable[[int, torch.Tensor], torch.Tensor]]] = [
        ("t2i", itc.T, [[i] for i in split.text_to_image], lambda q, c: itm(c, same(q, len(c)))),
        ("i2t", itc, split.image_to_texts, lambda q, c: itm(same(q, len(c)), c)),
    ]
    for name, scores, positives, pair_scores in directions:
        todo = [q for q in range(scores.shape[0]) if (name, q) not in skip]
        for queries in _chunks(todo, batch_size):
            reranked = _rerank_rows(scores, queries, preset.rerank_k, pair_scores)
            ranks = ranks_from_scores(reranked, [positives[q] for q in queries])
            top = reranked.topk(min(TOP, reranked.shape[1]), dim=1).indices.tolist()
            yield [{"direction": name, "query": q, "rank": int(r), "top": t} for q, r, t in zip(queries, ranks, top)]


# ----------------------------------------------------------------------------- results


def _write_json_atomic(path: str, obj: Any) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")




def _settings(options: EvalOptions, preset: Preset, dtype: torch.dtype) -> dict[str, Any]:
    """What the predictions depend on: a resumed run must match it."""

    def where(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    model = os.path.abspath(options.model) if os.path.isdir(options.model) else options.model
    return {
        "task": options.task, "model": model, "dtype": str(dtype).removeprefix("torch."),
        "preset": {k: v for k, v in dataclasses.asdict(preset).items() if k != "description"}, "limit": options.limit,
        "inputs": {"images": where(options.images), "questions": where(options.questions),
                   "annotations": where(options.annotations)},
    }


def _records_from_results(data: TaskData, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The progress records a finished results file holds (to re-score it)."""
    preds = results["predictions"]
    if isinstance(data, RetrievalData):
        return [{"direction": d, **r} for d, key in (("t2i", "text_to_image"), ("i2t", "image_to_text"))
                for r in preds[key]]
    key_field, text_field = PREDICTION_FIELDS[data.task.kind]
    return [{"key": p[key_field], "text": p[text_field]} for p in preds]


def _num_items(data: TaskData) -> int:
    """Questions or images to caption; for retrieval, queries (every text and every image)."""
    if isinstance(data, RetrievalData):
        return len(data.split.texts) + len(data.split.images)
    return len(data.items)


class _Meter:
    """Progress lines on the log: at most one every 10 s, and one at the end."""

    def __init__(self, log: Callable[[str], None], task: str, done: int, total: int, unit: str) -> None:
        self.log, self.task, self.done, self.total, self.unit = log, task, done, total, unit
        self.start = self.last = time.monotonic()
        self.first = done

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.done == self.total or now - self.last >= 10.0:
            self.last = now
            rate = (self.done - self.first) / max(now - self.start, 1e-9)
            self.log(f"{self.task}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s)")


def _predict(options: EvalOptions, data: TaskData, preset: Preset, device: torch.device, dtype: torch.dtype,
             progress: PartialResults, log: Callable[[str], None]) -> None:
    """Run the model on what ``progress`` does not hold yet (loading it only if there is any)."""
    retrieval = isinstance(data, RetrievalData)
    total = _num_items(data)
    if retrieval:
        queries = [("t2i", t) for t in range(len(data.split.texts))] + [("i2t", i) for i in range(len(data.split.images))]
        done = {(r["direction"], r["query"]) for r in progress.records} & set(queries)
        unit = "queries"
    else:
        done = {r["key"] for r in progress.records} & {it.key for it in data.items}
        todo = [it for it in data.items if it.key not in done]
        unit = "images" if data.task.preset_kind == "caption" else "questions"
    if len(done) == total:
        return
    log(f"{data.task.name}: {len(done)}/{total} {unit} done; loading {options.model}")
    model, processor = load_model(options.model, retrieval, device, dtype)
    meter = _Meter(log, data.task.name, len(done), total, unit)
    if retrieval:
        for records in rank_retrieval(model, processor, data, preset, options.batch_size, options.workers,
                                      frozenset(done)):
            progress.add(records)
            meter.add(len(records))
        return
    texts = generate_texts(model, processor, todo, preset, options.batch_size, options.workers)
    for batch, answers in zip(_chunks(todo, options.batch_size), texts):
        progress.add([{"key": it.key, "text": t} for it, t in zip(batch, answers)])
        meter.add(len(batch))


def _metrics_and_predictions(options: EvalOptions, data: TaskData, records: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The task's metrics and the predictions as the results file holds them, in input order."""
    if isinstance(data, RetrievalData):
        by_query = {(r["direction"], r["query"]): r for r in records}
        ordered = {d: [by_query[(d, q)] for q in range(n)]
                   for d, n in (("t2i", len(data.split.texts)), ("i2t", len(data.split.images)))}
        metrics = retrieval_scores([r["rank"] for r in ordered["t2i"]], [r["rank"] for r in ordered["i2t"]])
        predictions = {name: [{k: v for k, v in r.items() if k != "direction"} for r in ordered[d]]
                       for d, name in (("t2i", "text_to_image"), ("i2t", "image_to_text"))}
        return metrics, predictions
    by_key: dict[Key, str] = {r["key"]: r["text"] for r in records}
    texts = {it.key: by_key[it.key] for it in data.items}
    metrics = score(data, texts, tokenizer=options.caption_tokenizer, meteor=options.meteor, spice=options.spice,
                    vqa_rules=options.vqa_rules)
    return metrics, official_predictions(data, texts)


def evaluate(options: EvalOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``options.task`` and write the results file; returns its content (see the module docstring)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if options.task not in TASKS:
        raise ValueError(f"unknown task {options.task!r}; choose from {', '.join(TASKS)}")
    if options.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {options.batch_size}")
    task = TASKS[options.task]
    preset = resolve_preset(task, options.preset, prompt=options.prompt, num_beams=options.num_beams,
                            max_new_tokens=options.max_new_tokens, min_new_tokens=options.min_new_tokens,
                            length_penalty=options.length_penalty, rerank_k=options.rerank_k)
    if options.predictions and task.kind == "retrieval":
        raise ValueError("--predictions writes official VQA/GQA/caption results; retrieval has no such format")
    data = load_task(task, options.images, options.questions, options.annotations, options.limit)
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    settings = _settings(options, preset, dtype)
    output = options.output_path

    finished = None
    if options.resume and os.path.exists(output):
        with open(output, encoding="utf-8") as f:
            finished = json.load(f)
        check_settings(finished.get("settings", {}), settings, output)
    progress = PartialResults(f"{output}.partial", settings, options.resume)
    if finished is not None:
        progress.add(_records_from_results(data, finished))
    _predict(options, data, preset, device, dtype, progress, log)

    metrics, predictions = _metrics_and_predictions(options, data, progress.records)
    results = {
        "task": task.name, "settings": settings, "num_items": _num_items(data), "metrics": metrics,
        "metric_options": {"caption_tokenizer": options.caption_tokenizer, "meteor": options.meteor,
                           "spice": options.spice, "vqa_rules": options.vqa_rules},
        "predictions": predictions,
    }
    if options.predictions:
        _write_json_atomic(options.predictions, predictions)
    _write_json_atomic(output, results)
    progress.remove()
    return results


# ----------------------------------------------------------------------------- summary


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)


_CAPTION_ROWS = (("BLEU-4", "Bleu_4"), ("METEOR", "METEOR"), ("CIDEr", "CIDEr"), ("SPICE", "SPICE"))


def _caption_cell(scores: dict[str, Any], key: str) -> str:
    value = scores.get(key)
    return "n/a" if value is None else f"{100 * value:.1f}"


def summary_table(results: dict[str, Any]) -> str:
    """The metrics as a text table (caption metrics x100, as papers print them)."""
    task = TASKS[results["task"]]
    preset = results["settings"]["preset"]["name"]
    title = f"{task.name} ({task.description}), preset {preset}, {results['num_items']} items"
    metrics = results["metrics"]
    notes: list[str] = []
    if metrics is None:
        return f"{title}\nno answers or references in the inputs: predictions only"
    if task.kind in ("vqa", "gqa"):
        rows = [["accuracy", f"{metrics['accuracy']:.2f}"]]
        rows += [[f"  {k}", f"{v:.2f}"] for k, v in sorted(metrics.get("per_answer_type", {}).items())]
        body = _table(["metric", "%"], rows)
    elif task.kind == "caption":
        body = _table(["metric", "score"], [[name, _caption_cell(metrics, key)] for name, key in _CAPTION_ROWS])
        notes = [f"{k}: {v}" for k, v in metrics["unavailable"].items()]
    elif task.kind == "nocaps":
        domains = list(metrics)
        body = _table(["metric", *domains],
                      [[name, *(_caption_cell(metrics[d], key) for d in domains)] for name, key in _CAPTION_ROWS])
        notes = [f"{k}: {v}" for k, v in metrics["entire"]["unavailable"].items()]
    else:
        rows = [[label, *(f"{metrics[f'{d}_r{k}']:.2f}" for k in (1, 5, 10)), f"{metrics[f'{d}_r_mean']:.2f}"]
                for label, d in (("text->image", "t2i"), ("image->text", "i2t"))]
        body = _table(["retrieval", "R@1", "R@5", "R@10", "mean"], rows) + f"\nmean recall {metrics['r_mean']:.2f}"
    return "\n".join([title, body, *notes])


# ----------------------------------------------------------------------------- command line


def build_parser(prog: str = "blip2 eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Evaluate a BLIP-2 checkpoint on VQAv2, OK-VQA, GQA, COCO / NoCaps captioning "
                               "or Flickr30K / COCO retrieval, from the official annotation files.")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--model", required=True, help="checkpoint directory or Hub id")
    p.add_argument("--images", required=True, help="image directory (see blip2.eval.tasks for how files are found)")
    p.add_argument("--questions", help="VQAv2/OK-VQA questions JSON, or GQA questions JSON")
    p.add_argument("--annotations", help="VQAv2/OK-VQA annotations; Karpathy or COCO captions; NoCaps captions; "
                                         "Karpathy retrieval split (flickr30k_test.json, coco_karpathy_test.json)")
    p.add_argument("--preset", choices=list(PRESETS), help="decoding settings (default: the task's paper setting)")
    p.add_argument("--batch-size", type=int, default=16, help="images/questions/queries per batch (default 16)")
    p.add_argument("--output", help="results JSON (default <task>_results.json)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same settings")
    p.add_argument("--limit", type=int, help="only the first N questions / images")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:N")
    add_dtype_option(p)
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2; 0: in this one)")
    p.add_argument("--predictions", help="also write the predictions in the official results format here")
    g = p.add_argument_group("preset overrides")
    g.add_argument("--prompt", help="prompt; for questions '{}' is the question")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--rerank-k", type=int, help="retrieval: ITC candidates re-ranked by ITM per query")
    m = p.add_argument_group("metrics")
    m.add_argument("--vqa-rules", choices=VQA_RULES, default="official",
                   help="VQA accuracy by the official script as fixed in 2021 (default) or by the 2016 one LAVIS "
                        "copies, which published BLIP-2 numbers used")
    m.add_argument("--caption-tokenizer", choices=["auto", "python", "java"], default="auto",
                   help="pycocoevalcap's Java PTB tokenizer, blip2's Python one, or auto: Java where it runs "
                        "(default)")
    m.add_argument("--no-meteor", dest="meteor", action="store_false", help="skip METEOR (Java)")
    m.add_argument("--no-spice", dest="spice", action="store_false", help="skip SPICE (Java, slow)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``blip2 eval``: 0 on success, 1 on bad inputs, 130 when interrupted (rerun with --resume)."""
    args = build_parser().parse_args(argv)
    options = EvalOptions(**vars(args))
    try:
        results = evaluate(options)
    except (ValueError, OSError) as e:
        print(f"error: {cli_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: finished batches are kept in {options.output_path}.partial; rerun with --resume",
              file=sys.stderr)
        return 130
    print(summary_table(results))
    print(f"results: {options.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
