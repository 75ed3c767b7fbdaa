"""The bundled demo model: it captions and answers correctly, transformers loads it and agrees, it is
robust to images drawn differently, and the bundle stays small."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from blip2.demo import DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL
from blip2.demo.evaluate import answer_questions, caption_images, markdown_table, update_readme
from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor
from blip2.demo.recipe.tokenizer import vqa_prompt
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.demo.world import VARIANTS, caption, render_variant, sample_scene
from blip2.demo.world_eval import caption_scores, parse_caption

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "images")
# Share of 50 redrawn / perturbed images captioned right. Measured on the bundled model: 0.94, and 0.98
# on the same 50 scenes drawn clean.
ROBUSTNESS_FLOOR = 0.9
bundled = pytest.mark.skipif(not os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")),
                             reason="no bundled demo model")


@pytest.fixture(scope="module")
def ours():
    return Blip2ForConditionalGeneration.from_pretrained(DEFAULT_MODEL), Blip2Processor.from_pretrained(DEFAULT_MODEL)


def _examples():
    from PIL import Image

    with open(os.path.join(EXAMPLES, "captions.json")) as f:
        truth = json.load(f)
    return [Image.open(os.path.join(EXAMPLES, name)).convert("RGB") for name in truth], list(truth.values())


@bundled
def test_bundle_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for root in (DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL)
                for d, _, files in os.walk(root) for f in files)
    assert total <= 25_000_000


@bundled
def test_examples_captioned_and_answered(ours):
    model, processor = ours
    images, truth = _examples()
    captions = caption_images(model, processor, images)
    # every object's colour and shape, left to right, in every example; sizes too in all but one (the
    # bundled model calls the last example's small orange square large)
    assert [[(c, s) for _, c, s in parse_caption(x)] for x in captions] == [[(c, s) for _, c, s in parse_caption(x)] for x in truth]
    assert sum(c == t for c, t in zip(captions, truth)) >= 5
    assert [len(parse_caption(t)) for t in truth] == [1, 1, 2, 2, 3, 3]
    answers = answer_questions(model, processor, [images[2], images[4], images[0]],
                               ["how many shapes are there?", "how many shapes are there?", "what color is the square?"])
    assert answers == ["two", "three", "orange"]


@bundled
def test_transformers_loads_the_bundle_and_agrees(ours):
    transformers = pytest.importorskip("transformers")
    model, processor = ours
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    hf_processor = transformers.Blip2Processor.from_pretrained(DEFAULT_MODEL)
    images, _ = _examples()
    hf_inputs = hf_processor(images=images, return_tensors="pt")
    assert torch.equal(hf_inputs["pixel_values"], processor(images=images)["pixel_values"])
    with torch.no_grad():
        hf_ids = hf.generate(pixel_values=hf_inputs["pixel_values"])
    hf_captions = [t.strip() for t in hf_processor.batch_decode(hf_ids, skip_special_tokens=True)]
    assert hf_captions == caption_images(model, processor, images)

    prompts = [vqa_prompt("how many shapes are there?"), vqa_prompt("what color is the square?")]
    hf_inputs = hf_processor(images=images[3:5], text=prompts, padding=True, return_tensors="pt")
    inputs = processor(images=images[3:5], text=prompts, padding=True)
    assert torch.equal(hf_inputs["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        hf_ids = hf.generate(**hf_inputs)
    assert torch.equal(hf_ids, model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]))


@bundled
def test_transformers_loads_the_retrieval_bundle_and_agrees():
    transformers = pytest.importorskip("transformers")
    model = Blip2ForImageTextRetrieval.from_pretrained(DEFAULT_RETRIEVAL_MODEL)
    processor = Blip2Processor.from_pretrained(DEFAULT_RETRIEVAL_MODEL)
    hf = transformers.Blip2ForImageTextRetrieval.from_pretrained(DEFAULT_RETRIEVAL_MODEL).eval()
    images, truth = _examples()
    inputs = processor(images=images, text=truth, padding=True)
    with torch.no_grad():
        itm = hf(**inputs, use_image_text_matching_head=True).logits_per_image
        itc = hf(**inputs).logits_per_image
    torch.testing.assert_close(itm, model.itm_logits(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]),
                               atol=1e-4, rtol=1e-4)
    ours_itc = model.itc_scores(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    torch.testing.assert_close(itc, ours_itc, atol=1e-4, rtol=1e-4)
    assert torch.equal(ours_itc.argmax(0), torch.arange(6))  # every example caption finds its image
    # and the true pairs are matches, but for one: the bundled ITM scores example_5's pair (a small green
    # square, a small red square and a large orange circle) 1.3 below its "no match" logit
    assert int((itm[:, 1] > itm[:, 0]).sum()) >= 5


@bundled
def test_heldout_floors():
    """Issue 6's floor on docs/BENCHMARKS.md's held-out set (500 clean images, the eval script's): captions and
    every VQA type >= 90%, text-to-image R@1 >= 80% by ITC and by ITC + ITM. Measured: captions 99.2,
    VQA colour 100.0, shape 99.5, count 99.4, colour count 99.3; R@1 88.1 (ITC), 83.2 (ITC + ITM)."""
    from blip2.demo.evaluate import evaluate

    result = evaluate(DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL, n=500)
    assert result["images"] == 500 and result["t2i_queries"] >= 300
    floors = {"caption_objects": 90, "vqa_color": 90, "vqa_shape": 90, "vqa_count": 90, "vqa_count_color": 90,
              "t2i_r1_itc": 80, "t2i_r1_itc_itm": 80}
    assert {k: result[k] for k in floors if result[k] < floors[k]} == {}
    assert min(result[f"vqa_{k}_n"] for k in ("color", "shape", "count", "count_color")) >= 500


@bundled
def test_robust_to_images_drawn_differently(ours):
    """50 held-out scenes, each drawn as a non-clean variant in turn (other canvas sizes and aspect
    ratios, padding, resizing, JPEG, blur, brightness): captions name the objects right."""
    model, processor = ours
    rng = np.random.default_rng(777)
    names = [v for v in VARIANTS if v != "clean"]
    scenes = [sample_scene(rng) for _ in range(50)]
    images = [render_variant(s, names[i % len(names)], rng) for i, s in enumerate(scenes)]
    captions = caption_images(model, processor, images)
    accuracy = np.mean([caption_scores(c, s)["objects_correct"] for c, s in zip(captions, scenes)])
    assert accuracy >= ROBUSTNESS_FLOOR, list(zip(captions, [caption(s) for s in scenes]))


def test_markdown_table_and_readme_markers(tmp_path):
    result = {"images": 500.0, "caption_objects": 97.0, "caption_exact": 90.5, "t2i_r1_itc": 88.0,
              "t2i_r1_itc_itm": 93.25, "t2i_queries": 300.0}
    for i, kind in enumerate(("color", "shape", "count", "count_color")):
        result[f"vqa_{kind}"], result[f"vqa_{kind}_n"] = 95.0 + i, 100.0 + i
    table = markdown_table(result)
    assert "| Caption accuracy (every object's colour and shape, nothing invented) | 97.0 |" in table
    assert "| VQA accuracy, `count_color` questions (n=103) | 98.0 |" in table
    assert "| Text-to-image R@1, ITC + ITM re-ranking | 93.2 |" in table
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- demo-eval:start -->\nold\n<!-- demo-eval:end -->\ntail\n")
    update_readme(str(readme), table)
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- demo-eval:end -->\ntail\n") and table in text
