"""End-to-end ``blip2 eval``: each task run through ``main`` on synthetic world benchmarks in the
official formats, its numbers checked against a direct computation.

The model is the bundled demo (``src/blip2/assets/demo``) once it exists; until then a tiny random
BLIP-2-OPT (and a tiny random retrieval model) saved by transformers with a processor whose
word-level tokenizer knows the world's words. A random model answers nonsense, so for it the
annotation files are rigged from its own direct answers (k annotators agree with it) to make the
expected accuracies non-trivial and known in closed form; the demo model is scored on the true
annotations and must score high.

"Direct" means: one image at a time through ``Blip2Processor`` and ``model.generate`` (or the
retrieval model's ITC/ITM methods on the whole set at once), then the metric functions of
``blip2.eval`` -- no code of ``blip2.eval.run`` involved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip2.demo import DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL
from blip2.eval import (
    CaptionedImage,
    GQAQuestion,
    VQAAnnotation,
    evaluate_captions,
    evaluate_nocaps,
    gqa_accuracy,
    normalize_answer,
    ranks_from_scores,
    read_gqa_questions,
    read_karpathy,
    read_nocaps,
    read_retrieval,
    read_vqa_annotations,
    read_vqa_questions,
    rerank_top_k,
    retrieval_recall,
    run,
    vqa_accuracy,
    write_coco_captions,
    write_gqa_questions,
    write_vqa_annotations,
)
from blip2.demo.eval_sets import write_world_benchmarks
from blip2.eval.tasks import PRESETS, TASKS, pre_caption, pre_question, trailing_number
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor
from blip2.demo.world import COLORS, COUNT_WORDS, SHAPES, SIZES
from conftest import IMAGE_TOKEN, VOCAB, hf_blip2, randomize_, tiny_hf_config

DEMO = Path(DEFAULT_MODEL)
DEMO_RETRIEVAL = Path(DEFAULT_RETRIEVAL_MODEL)
N_IMAGES = 8
# What the bundled demo must reach on these small synthetic sets of N_IMAGES images (percent; caption
# scores on pycocoevalcap's scale): "clearly better than chance" on 8 images; the held-out numbers on
# 500 images are the demo table in docs/BENCHMARKS.md (benchmarks/eval_demo.py).
DEMO_MIN = {"vqa": 50.0, "gqa": 50.0, "Bleu_4": 0.2, "CIDEr": 0.5, "t2i_r1": 20.0, "i2t_r1": 20.0}
# The demo was trained to caption with no prompt and to answer "Question: {q} Answer:". It also reads
# the paper's "a photo of" and "Short answer:" (its LM saw them), but the caption preset's
# min_new_tokens=8 would force one-object captions (4 words) to invent more, so its runs use these.
DEMO_PROMPTS = {"vqa": "Question: {} Answer:", "caption": ""}


def _architectures(directory: Path) -> list[str]:
    return json.loads((directory / "config.json").read_text()).get("architectures") or []


def demo_dir(retrieval: bool) -> str | None:
    """The bundled demo checkpoint for generation or retrieval, when present."""
    for d in (DEMO, DEMO_RETRIEVAL):
        if (d / "config.json").exists() and (("Blip2ForImageTextRetrieval" in _architectures(d)) == retrieval):
            return str(d)
    return None


USE_DEMO = demo_dir(retrieval=False) is not None


# ----------------------------------------------------------------------------- tiny models


def world_tokenizer(padding_side: str):
    """Word-level tokenizer over the world's words (ids as the tiny configs expect: pad 1, BOS 2, EOS 3,
    filler up to 98, so the processor adds ``<image>`` as 99)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    prompts_and_questions = ["what", "color", "is", "the", "shape", "object", "how", "many", "shapes", "are", "there",
                             "and", "a", "question", "short", "answer", "photo", "of", "?", ",", ":"]
    words = [*SHAPES, *COLORS, *SIZES, *COUNT_WORDS, *"0123", *prompts_and_questions]
    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3}
    vocab.update({w: len(vocab) + i for i, w in enumerate(dict.fromkeys(words))})
    vocab.update({f"w{i}": i for i in range(len(vocab), IMAGE_TOKEN)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side=padding_side)


def save_processor(directory: str, padding_side: str) -> None:
    from transformers import Blip2Processor as HFBlip2Processor
    from transformers import BlipImageProcessor

    processor = HFBlip2Processor(image_processor=BlipImageProcessor(size={"height": 28, "width": 28}),
                                 tokenizer=world_tokenizer(padding_side), num_query_tokens=4)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    processor.save_pretrained(directory)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> str:
    if USE_DEMO:
        return demo_dir(retrieval=False)
    d = str(tmp_path_factory.mktemp("tiny_opt"))
    hf_blip2("opt", seed=1).save_pretrained(d)
    save_processor(d, "left")
    return d


@pytest.fixture(scope="module")
def ret_dir(tmp_path_factory) -> str:
    pytest.importorskip("blip2.models.retrieval")
    if USE_DEMO:
        found = demo_dir(retrieval=True)
        if found is None:
            pytest.skip("the demo has no retrieval checkpoint")
        return found
    import transformers

    config = tiny_hf_config()
    config.qformer_config.use_qformer_text_input = True
    config.qformer_config.vocab_size = VOCAB
    config.image_text_hidden_size = 16
    torch.manual_seed(3)
    d = str(tmp_path_factory.mktemp("tiny_itm"))
    randomize_(transformers.Blip2ForImageTextRetrieval(config), 3).eval().save_pretrained(d)
    save_processor(d, "right")
    return d


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return write_world_benchmarks(tmp_path_factory.mktemp("bench"), N_IMAGES, seed=0)


# ----------------------------------------------------------------------------- direct computations


@torch.no_grad()
def direct_generate(model_dir: str, jobs: list[tuple[str, str]], preset: str) -> list[str]:
    """(image path, prompt) one at a time through the processor and generate, with the preset's decoding."""
    p = PRESETS[preset]
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    processor = Blip2Processor.from_pretrained(model_dir)
    out = []
    for image, prompt in jobs:
        inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
        ids = model.generate(**inputs, num_beams=p.num_beams, max_new_tokens=p.max_new_tokens,
                             min_new_tokens=p.min_new_tokens, length_penalty=p.length_penalty)
        # OPT returns the prompt then the answer; T5 its decoder start token then the answer
        start = inputs["input_ids"].shape[1] if model.config.use_decoder_only_language_model else 1
        out.append(processor.decode(ids[0, start:], skip_special_tokens=True).strip())
    return out


def vqa_jobs(bench, limit: int | None = None) -> tuple[list[int], list[tuple[str, str]]]:
    """Question ids and (image, prompt) of the synthetic VQA questions, prompted as the paper does."""
    questions = read_vqa_questions(bench.vqa_questions)[:limit]
    return [q.question_id for q in questions], [(os.path.join(bench.images, f"test_{q.image_id:06d}.png"),
                                                 vqa_prompt(q.question.lower())) for q in questions]


def vqa_prompt(question: str) -> str:
    return (DEMO_PROMPTS["vqa"] if USE_DEMO else PRESETS["vqa-zeroshot"].prompt).format(question)


@pytest.fixture(scope="module")
def direct_answers(gen_dir, bench) -> dict[int, str]:
    ids, jobs = vqa_jobs(bench)
    return dict(zip(ids, direct_generate(gen_dir, jobs, "vqa-zeroshot")))


@pytest.fixture(scope="module")
def direct_captions(gen_dir, bench) -> dict[int, str]:
    entries = read_karpathy(bench.karpathy_test)
    prompt = DEMO_PROMPTS["caption"] if USE_DEMO else PRESETS["caption"].prompt
    jobs = [(os.path.join(bench.images, e.image), prompt) for e in entries]
    return dict(zip([trailing_number(e.image) for e in entries], direct_generate(gen_dir, jobs, "caption")))


def vqa_question_score(m: int) -> float:
    """Official accuracy when m of 10 annotators gave the predicted answer: mean over the 10 leave-one-out
    sets of min(#matches among the other 9 / 3, 1)."""
    return (m * min(1.0, (m - 1) / 3) + (10 - m) * min(1.0, m / 3)) / 10


@pytest.fixture(scope="module")
def vqa_setup(bench, direct_answers, tmp_path_factory) -> tuple[str, float | None]:
    """(annotations file, expected accuracy in closed form or None for the demo's true annotations).

    Random model: question j gets m = j % 5 annotators giving the model's own (normalised) answer and
    the rest an answer it never gives."""
    if USE_DEMO:
        return bench.vqa_annotations, None
    rigged, expected = [], []
    for j, a in enumerate(read_vqa_annotations(bench.vqa_annotations)):
        m = j % 5
        answers = [normalize_answer(direct_answers[a.question_id])] * m + ["zzz"] * (10 - m)
        rigged.append(VQAAnnotation(a.question_id, a.image_id, answers, answers[0], a.answer_type, a.question_type))
        expected.append(vqa_question_score(m))
    path = str(tmp_path_factory.mktemp("rigged") / "vqa_annotations.json")
    write_vqa_annotations(path, rigged)
    return path, 100 * sum(expected) / len(expected)


def run_main(argv: list[str]) -> int:
    if USE_DEMO and "--prompt" not in argv and "--task" in argv:
        task = argv[argv.index("--task") + 1]
        kind = {"vqav2": "vqa", "okvqa": "vqa", "gqa": "vqa", "coco_caption": "caption", "nocaps": "caption"}
        if task in kind:
            argv = [*argv, "--prompt", DEMO_PROMPTS[kind[task]]]
    return run.main([*argv, "--workers", "0"])


def vqa_argv(gen_dir, bench, annotations, output) -> list[str]:
    return ["--task", "vqav2", "--model", gen_dir, "--images", bench.images, "--questions", bench.vqa_questions,
            "--annotations", annotations, "--batch-size", "3", "--output", str(output)]


# ----------------------------------------------------------------------------- converter and presets


def test_world_benchmarks_in_official_formats(bench, tmp_path):
    questions = read_vqa_questions(bench.vqa_questions)
    annotations = read_vqa_annotations(bench.vqa_annotations)
    assert [a.question_id for a in annotations] == [q.question_id for q in questions]
    assert all(q.question_id // 1000 == q.image_id and q.question[0].isupper() for q in questions)
    assert all(len(a.answers) == 10 and len(set(a.answers)) == 1 for a in annotations)
    # counts stored as the official files store them (digits); the world's word answers still score 100
    numbers = [a for a in annotations if a.answer_type == "number"]
    assert numbers and all(a.multiple_choice_answer in "0123" for a in numbers)
    gqa = read_gqa_questions(bench.gqa_questions)
    words = {q.question_id: q.answer for q in gqa}
    assert {words[str(a.question_id)] for a in numbers} <= set(COUNT_WORDS)
    # ... by the 2016 rules, which normalise the prediction ("two" -> "2"); the 2021 ones normalise nothing
    # when the annotators agree, so there the count questions' words miss their digits
    assert vqa_accuracy({int(k): v for k, v in words.items()}, annotations, rules="lavis").overall == 100.0
    assert vqa_accuracy({int(k): v for k, v in words.items()}, annotations).overall == pytest.approx(
        100.0 * (len(annotations) - len(numbers)) / len(annotations))
    assert gqa_accuracy(words, gqa) == 100.0
    karpathy = read_karpathy(bench.karpathy_test)
    assert len(karpathy) == N_IMAGES and all(os.path.isfile(os.path.join(bench.images, e.image)) for e in karpathy)
    nocaps = read_nocaps(bench.nocaps)
    assert [im.id for im in nocaps] == list(range(N_IMAGES))
    assert all(im.domain == ("in-domain", "near-domain", "out-domain")[im.captions[0].count(" a ")]
               for im in nocaps)  # the domain stands for the number of objects
    retrieval = read_retrieval(bench.retrieval)
    assert len(set(retrieval.texts)) == len(retrieval.texts) == len(retrieval.images)
    # same arguments, same bytes
    again = write_world_benchmarks(tmp_path, N_IMAGES, seed=0)
    for name in ("vqa_questions", "vqa_annotations", "gqa_questions", "karpathy_test", "nocaps", "retrieval"):
        assert Path(getattr(again, name)).read_bytes() == Path(getattr(bench, name)).read_bytes(), name


def test_presets_are_the_papers():
    vqa, cap, ret = PRESETS["vqa-zeroshot"], PRESETS["caption"], PRESETS["retrieval"]
    assert (vqa.prompt, vqa.num_beams, vqa.max_new_tokens, vqa.min_new_tokens, vqa.length_penalty) == \
        ("Question: {} Short answer:", 5, 10, 1, -1.0)
    assert (cap.prompt, cap.num_beams, cap.max_new_tokens, cap.min_new_tokens, cap.length_penalty) == \
        ("a photo of", 5, 30, 8, 1.0)
    assert (ret.rerank_k, ret.max_text_tokens) == (128, 35)
    assert {t: TASKS[t].preset for t in TASKS} == {
        "vqav2": "vqa-zeroshot", "okvqa": "vqa-zeroshot", "gqa": "vqa-zeroshot", "coco_caption": "caption",
        "nocaps": "caption", "flickr_retrieval": "retrieval", "coco_retrieval": "retrieval"}
    # LAVIS' text processors
    assert pre_question('What "color" is the circle?') == "what color is the circle?"
    assert pre_caption("A dog;  running. (Outside)") == "a dog running outside"


# ----------------------------------------------------------------------------- VQA / OK-VQA / GQA


def test_vqav2_end_to_end(gen_dir, bench, vqa_setup, direct_answers, tmp_path, capsys):
    annotations, closed_form = vqa_setup
    out = tmp_path / "vqa.json"
    official = tmp_path / "vqa_predictions.json"
    assert run_main([*vqa_argv(gen_dir, bench, annotations, out), "--predictions", str(official)]) == 0
    results = json.loads(out.read_text())
    predictions = {p["question_id"]: p["answer"] for p in results["predictions"]}
    # batched (3 per batch, left-padded prompts) = one question at a time
    assert predictions == direct_answers
    assert json.loads(official.read_text()) == results["predictions"]
    expected = vqa_accuracy(direct_answers, read_vqa_annotations(annotations))
    assert results["metrics"]["accuracy"] == pytest.approx(expected.overall, abs=1e-9)
    assert results["metrics"]["per_answer_type"] == pytest.approx(expected.per_answer_type)
    if closed_form is not None:
        assert results["metrics"]["accuracy"] == pytest.approx(closed_form, abs=1e-9)
    # re-scored from the results file by the 2016 rules (LAVIS's: the demo's count words match their digits)
    assert run_main([*vqa_argv(gen_dir, bench, annotations, out), "--resume", "--vqa-rules", "lavis"]) == 0
    rescored = json.loads(out.read_text())
    assert (results["metric_options"]["vqa_rules"], rescored["metric_options"]["vqa_rules"]) == ("official", "lavis")
    lavis = vqa_accuracy(direct_answers, read_vqa_annotations(annotations), rules="lavis").overall
    assert rescored["metrics"]["accuracy"] == pytest.approx(lavis, abs=1e-9)
    assert rescored["metrics"]["accuracy"] >= (DEMO_MIN["vqa"] if closed_form is None else closed_form)
    assert results["settings"]["preset"]["name"] == "vqa-zeroshot"
    assert results["num_items"] == len(direct_answers)
    assert not Path(f"{out}.partial").exists()
    printed = capsys.readouterr().out
    # values are right-aligned to the widest one ("100.00" when a type is all right)
    assert ["accuracy", f"{results['metrics']['accuracy']:.2f}"] in [line.split() for line in printed.splitlines()]


def test_okvqa_is_the_vqa_metric_with_limit(gen_dir, bench, vqa_setup, direct_answers, tmp_path):
    annotations, _ = vqa_setup
    out = tmp_path / "okvqa.json"
    argv = vqa_argv(gen_dir, bench, annotations, out)
    argv[1] = "okvqa"
    assert run_main([*argv, "--limit", "7"]) == 0
    results = json.loads(out.read_text())
    first = [q.question_id for q in read_vqa_questions(bench.vqa_questions)[:7]]
    assert [p["question_id"] for p in results["predictions"]] == first
    kept = [a for a in read_vqa_annotations(annotations) if a.question_id in first]
    expected = vqa_accuracy({q: direct_answers[q] for q in first}, kept).overall
    assert results["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert results["num_items"] == 7 and results["settings"]["limit"] == 7


def test_gqa_end_to_end(gen_dir, bench, direct_answers, tmp_path):
    questions = read_gqa_questions(bench.gqa_questions)
    if not USE_DEMO:  # the random model's own answer is right for every third question
        questions = [GQAQuestion(q.question_id, q.image_id, q.question,
                                 direct_answers[int(q.question_id)] if j % 3 == 0 else "zzz")
                     for j, q in enumerate(questions)]
    path = tmp_path / "gqa.json"
    write_gqa_questions(path, questions)
    out = tmp_path / "gqa_results.json"
    assert run_main(["--task", "gqa", "--model", gen_dir, "--images", bench.images, "--questions", str(path),
                     "--batch-size", "4", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    predictions = {p["questionId"]: p["prediction"] for p in results["predictions"]}
    assert predictions == {str(k): v for k, v in direct_answers.items()}
    assert results["metrics"]["accuracy"] == pytest.approx(gqa_accuracy(predictions, questions), abs=1e-9)
    if USE_DEMO:
        assert results["metrics"]["accuracy"] >= DEMO_MIN["gqa"]
    else:
        assert results["metrics"]["accuracy"] == pytest.approx(100 * len(range(0, len(questions), 3)) / len(questions))


def test_vqa_without_annotations_writes_predictions_only(gen_dir, bench, direct_answers, tmp_path, capsys):
    out = tmp_path / "testdev.json"
    assert run_main(["--task", "vqav2", "--model", gen_dir, "--images", bench.images, "--questions",
                     bench.vqa_questions, "--limit", "4", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["metrics"] is None
    assert results["predictions"] == [{"question_id": q, "answer": direct_answers[q]} for q in list(direct_answers)[:4]]
    assert "predictions only" in capsys.readouterr().out


def test_t5_batched_right_padded_equals_single(bench, tmp_path):
    """Flan-T5 checkpoints: prompts right-padded into the encoder, the answer after the start token."""
    model_dir = str(tmp_path / "t5")
    hf_blip2("t5", seed=2).save_pretrained(model_dir)
    save_processor(model_dir, "right")
    ids, jobs = vqa_jobs(bench, limit=6)
    out = tmp_path / "t5.json"
    assert run_main(["--task", "vqav2", "--model", model_dir, "--images", bench.images, "--questions",
                     bench.vqa_questions, "--limit", "6", "--batch-size", "4", "--output", str(out)]) == 0
    predictions = {p["question_id"]: p["answer"] for p in json.loads(out.read_text())["predictions"]}
    assert predictions == dict(zip(ids, direct_generate(model_dir, jobs, "vqa-zeroshot")))
    assert len(set(predictions.values())) > 1  # the questions get different answers: rows are not mixed up


# ----------------------------------------------------------------------------- resume


def test_resume_after_interruption_gives_the_same_file(gen_dir, bench, vqa_setup, tmp_path, monkeypatch):
    annotations, _ = vqa_setup
    reference = tmp_path / "reference.json"
    assert run_main(vqa_argv(gen_dir, bench, annotations, reference)) == 0
    n_questions = json.loads(reference.read_text())["num_items"]
    n_batches = -(-n_questions // 3)

    calls = []
    original = Blip2ForConditionalGeneration.generate

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Blip2ForConditionalGeneration, "generate", interrupted)
    out = tmp_path / "run.json"
    assert run_main(vqa_argv(gen_dir, bench, annotations, out)) == 130
    partial = Path(f"{out}.partial")
    assert not out.exists() and len(partial.read_text().splitlines()) == 1 + 2 * 3  # header + two batches
    with open(partial, "a") as f:
        f.write('{"key": 12')  # a record torn by the interruption
    calls.clear()
    calls.extend([1] * 10)  # no more interruptions
    assert run_main([*vqa_argv(gen_dir, bench, annotations, out), "--resume"]) == 0
    assert len(calls) - 10 == n_batches - 2  # only what was left
    assert out.read_bytes() == reference.read_bytes()  # same predictions, once each, same metrics
    assert not partial.exists()

    # a finished file is re-scored without the model
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert run_main([*vqa_argv(gen_dir, bench, annotations, out), "--resume"]) == 0
    assert out.read_bytes() == reference.read_bytes()
    # other decoding settings cannot resume this file
    assert run_main([*vqa_argv(gen_dir, bench, annotations, out), "--resume", "--num-beams", "3"]) == 1


# ----------------------------------------------------------------------------- captions


def test_coco_caption_end_to_end(gen_dir, bench, direct_captions, tmp_path, capsys):
    entries = read_karpathy(bench.karpathy_test)
    references = {trailing_number(e.image): e.captions for e in entries}
    if not USE_DEMO:  # the random model's caption is among the references of every other image
        references = {k: v + [direct_captions[k]] if k % 2 == 0 else v for k, v in references.items()}
    images = [CaptionedImage(k, e.image, references[k]) for k, e in zip(references, entries)]
    coco = tmp_path / "captions_test.json"  # COCO format this time (the Karpathy list is read in test_nocaps)
    write_coco_captions(coco, images)
    out = tmp_path / "caption.json"
    assert run_main(["--task", "coco_caption", "--model", gen_dir, "--images", bench.images, "--annotations",
                     str(coco), "--batch-size", "3", "--output", str(out), "--no-meteor", "--no-spice"]) == 0
    results = json.loads(out.read_text())
    captions = {p["image_id"]: p["caption"] for p in results["predictions"]}
    assert captions == direct_captions
    expected = evaluate_captions(references, direct_captions, meteor=False, spice=False)
    metrics = results["metrics"]
    assert {k: metrics[k] for k in expected.as_dict()} == pytest.approx(expected.as_dict())
    assert metrics["METEOR"] is None and metrics["unavailable"]["METEOR"] == "not requested"
    if USE_DEMO:
        assert metrics["Bleu_4"] >= DEMO_MIN["Bleu_4"] and metrics["CIDEr"] >= DEMO_MIN["CIDEr"]
    else:
        assert metrics["Bleu_1"] > 0.3  # half the captions are exact references
    assert ["CIDEr", f"{100 * metrics['CIDEr']:.1f}"] in [line.split() for line in capsys.readouterr().out.splitlines()]


def test_nocaps_per_domain(gen_dir, bench, direct_captions, tmp_path, capsys):
    out = tmp_path / "nocaps.json"
    assert run_main(["--task", "nocaps", "--model", gen_dir, "--images", bench.images, "--annotations",
                     bench.nocaps, "--batch-size", "5", "--output", str(out), "--no-meteor", "--no-spice"]) == 0
    results = json.loads(out.read_text())
    assert {p["image_id"]: p["caption"] for p in results["predictions"]} == direct_captions
    expected = evaluate_nocaps(read_nocaps(bench.nocaps), direct_captions, meteor=False, spice=False)
    assert set(results["metrics"]) == set(expected) == {"in-domain", "near-domain", "out-domain", "entire"}
    for domain, scores in expected.items():
        assert results["metrics"][domain]["CIDEr"] == pytest.approx(scores.cider)
        assert results["metrics"][domain]["Bleu_4"] == pytest.approx(scores.bleu[3])
        assert results["metrics"][domain]["num_images"] == scores.num_images
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header == ["metric", "in-domain", "near-domain", "out-domain", "entire"]


# ----------------------------------------------------------------------------- retrieval


@torch.no_grad()
def direct_retrieval(model_dir: str, images: list[str], texts: list[str], text_to_image: list[int], k: int):
    """LAVIS' evaluation written out on the whole set at once: ITC matrix, ITM + ITC on each query's top k."""
    from blip2.models.retrieval import Blip2ForImageTextRetrieval, itc_similarity

    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir)
    processor = Blip2Processor.from_pretrained(model_dir)
    pixels = processor.image_processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    enc = processor.tokenizer(texts, padding=True, truncation=True, max_length=35, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    itc = itc_similarity(model.image_embeds(pixels), model.text_embeds(ids, mask))  # [images, texts]
    i2t = rerank_top_k(itc, k, lambda i, c: model.itm_scores(pixels[i].expand(len(c), -1, -1, -1), ids[c], mask[c]))
    t2i = rerank_top_k(itc.T, k, lambda t, c: model.itm_scores(pixels[c], ids[t].expand(len(c), -1),
                                                                mask[t].expand(len(c), -1)))
    return t2i, i2t


@pytest.mark.parametrize("task,limit", [("flickr_retrieval", None), ("coco_retrieval", 6)])
def test_retrieval_end_to_end(ret_dir, bench, tmp_path, task, limit, capsys):
    split = read_retrieval(bench.retrieval)
    n_images = len(split.images) if limit is None else limit
    texts = [t for t, i in enumerate(split.text_to_image) if i < n_images]
    k = 3  # re-rank fewer candidates than there are, so ITC decides what ITM sees
    out = tmp_path / f"{task}.json"
    argv = ["--task", task, "--model", ret_dir, "--images", bench.images, "--annotations", bench.retrieval,
            "--batch-size", "3", "--rerank-k", str(k), "--output", str(out)]
    assert run_main(argv + (["--limit", str(limit)] if limit else [])) == 0
    results = json.loads(out.read_text())
    t2i, i2t = direct_retrieval(ret_dir, [os.path.join(bench.images, im) for im in split.images[:n_images]],
                                [pre_caption(split.texts[t]) for t in texts],
                                [split.text_to_image[t] for t in texts], k)
    text_to_image = [split.text_to_image[t] for t in texts]
    expected = retrieval_recall(t2i, text_to_image, i2t)
    assert results["metrics"] == pytest.approx(expected)
    got = results["predictions"]
    assert [r["rank"] for r in got["text_to_image"]] == ranks_from_scores(t2i, [[i] for i in text_to_image]).tolist()
    assert [r["query"] for r in got["image_to_text"]] == list(range(n_images))
    assert [r["top"][0] for r in got["image_to_text"]] == i2t.argmax(1).tolist()
    if USE_DEMO:
        assert expected["t2i_r1"] >= DEMO_MIN["t2i_r1"] and expected["i2t_r1"] >= DEMO_MIN["i2t_r1"]
    assert f"{expected['t2i_r1']:.2f}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- errors


def test_checkpoint_class_must_suit_the_task(gen_dir, ret_dir, bench, tmp_path, capsys):
    assert run_main(["--task", "flickr_retrieval", "--model", gen_dir, "--images", bench.images,
                     "--annotations", bench.retrieval, "--output", str(tmp_path / "r.json")]) == 1
    assert "needs an image-text retrieval checkpoint (Blip2ForImageTextRetrieval" in capsys.readouterr().err
    assert run_main(["--task", "coco_caption", "--model", ret_dir, "--images", bench.images,
                     "--annotations", bench.karpathy_test, "--output", str(tmp_path / "c.json")]) == 1
    assert "needs a captioning/VQA checkpoint (Blip2ForConditionalGeneration)" in capsys.readouterr().err


def test_bad_inputs_fail_before_loading_the_model(gen_dir, bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = ["--output", str(tmp_path / "never.json")]
    assert run_main(["--task", "vqav2", "--model", gen_dir, "--images", str(tmp_path),
                     "--questions", bench.vqa_questions, *out]) == 1
    assert "no image file for image_id 0" in capsys.readouterr().err
    assert run_main(["--task", "gqa", "--model", gen_dir, "--images", bench.images, *out]) == 1
    assert "needs --questions" in capsys.readouterr().err
    assert run_main(["--task", "vqav2", "--model", gen_dir, "--images", bench.images, "--questions",
                     bench.vqa_questions, "--preset", "caption", *out]) == 1
    assert "preset 'caption' is for caption tasks" in capsys.readouterr().err
    assert run_main(["--task", "flickr_retrieval", "--model", gen_dir, "--images", bench.images, "--annotations",
                     bench.retrieval, "--predictions", str(tmp_path / "p.json"), *out]) == 1
    assert "retrieval has no such format" in capsys.readouterr().err
    assert not (tmp_path / "never.json.partial").exists()
