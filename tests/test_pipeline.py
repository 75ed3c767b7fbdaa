"""Pipeline: the texts and scores equal what transformers computes on the same checkpoint directory,
batched or not; chat keeps history within the model's positions; options are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from blip2.apps.pipeline import (
    GenerationOptions,
    Pipeline,
    PipelineError,
    chat_prompt,
    question_prompt,
    resolve_device,
    resolve_dtype,
)


def picture(seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, transformers.Blip2Processor.from_pretrained(tiny_model_dir)


def reference_text(reference, image: Image.Image, prompt: str, **gen) -> str:
    """transformers' answer for one image, decoded the way its docs show (new tokens only)."""
    model, processor = reference
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **gen)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_captions_and_answers_equal_transformers(pipe, reference, num_beams):
    images = [picture(0), picture(1), picture(2)]
    options = GenerationOptions(max_new_tokens=6, num_beams=num_beams)
    prompts = ["", "w5 w6 w7", question_prompt("w8")]  # different lengths: left padding in one batch
    got = pipe.generate(images, prompts, options)
    want = [reference_text(reference, im, p, max_new_tokens=6, num_beams=num_beams) for im, p in zip(images, prompts)]
    assert got == want
    assert len(set(want)) == 3 and all(len(t.split()) == 6 for t in want)
    assert pipe.caption(images[:2], options=options) == [want[0], pipe.caption([images[1]], options=options)[0]]
    assert pipe.ask([images[2]], ["w8"], options) == [want[2]]


def test_t5_captions_batched_with_prompts_see_only_the_image_as_alone(tiny_t5_dir):
    """A Flan-T5 caption (empty prompt) batched with prompted rows gets the text it gets alone, where the encoder
    reads the queries only (``model.generate`` without input_ids), not the end token of an empty text.
    (transformers cannot run T5 without text: its generate asks the T5 config for a BOS id it lacks.)"""
    pipe = Pipeline.load(tiny_t5_dir, device="cpu")
    images, options = [picture(5), picture(6), picture(7)], GenerationOptions(max_new_tokens=6)
    prompts = ["", question_prompt("w8"), "w5 w6 w7"]
    got = pipe.generate(images, prompts, options)
    alone = [pipe.generate([im], [p], options)[0] for im, p in zip(images, prompts)]
    assert got == alone
    with torch.no_grad():
        out = pipe.model.generate(pixel_values=pipe.preprocess(images[:1]), max_new_tokens=6)
    assert got[0] == pipe.processor.decode(out[0].tolist(), skip_special_tokens=True).strip()
    assert len(set(got)) == 3


def test_preprocessed_pixels_give_the_same_texts(pipe):
    images = [picture(3), picture(4)]
    assert pipe.caption(pipe.preprocess(images)) == pipe.caption(images)


def test_chat_prompt_format():
    assert question_prompt(" what is it? ") == "Question: what is it? Answer:"
    assert chat_prompt([("what is it?", "a cat."), ("where?", " on a mat")], "why?") == (
        "Question: what is it? Answer: a cat. Question: where? Answer: on a mat. Question: why? Answer:")


def test_chat_drops_the_oldest_turns_that_do_not_fit(pipe):
    image, options = picture(5), GenerationOptions(max_new_tokens=5)
    history = [(f"w{10 + i}", f"w{30 + i} w{31 + i}") for i in range(12)]  # about 100 tokens: over the 64 positions
    with pytest.raises(PipelineError, match=r"prompt too long: \d+ tokens .* max_position_embeddings=64"):
        pipe.check_prompt(chat_prompt(history, "w9"), options)
    fits = next(k for k in range(len(history), -1, -1) if _fits(pipe, chat_prompt(history[-k:] if k else [], "w9")))
    assert 0 < fits < len(history)
    got = pipe.chat(image, history, "w9", options)
    assert got == pipe.generate([image], [chat_prompt(history[-fits:], "w9")], options)[0]
    with pytest.raises(PipelineError, match="prompt too long"):
        pipe.chat(image, [], "w5 " * 80, options)


def _fits(pipe: Pipeline, prompt: str) -> bool:
    try:
        pipe.check_prompt(prompt, GenerationOptions(max_new_tokens=5))
    except PipelineError:
        return False
    return True


def test_dtype_option_loads_bfloat16(tiny_model_dir):
    half = Pipeline.load(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert half.model.language_projection.weight.dtype == torch.bfloat16
    assert len(half.caption([picture(6)], options=GenerationOptions(max_new_tokens=4))[0].split()) == 4


def test_options_devices_and_dtypes_are_checked():
    with pytest.raises(ValueError, match="num_beams must be a positive integer, got 0"):
        GenerationOptions(num_beams=0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    # library errors name the argument (the command line names its option: see test_cli)
    with pytest.raises(PipelineError, match="^device='tpu': expected auto, cpu, cuda or cuda:N$") as e:
        resolve_device("tpu")
    assert (e.value.argument, e.value.value) == ("device", "tpu")
    with pytest.raises(PipelineError, match="^dtype='int8': expected one of auto, float32, bfloat16, float16, "
                                            "fp32, bf16, fp16$"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(PipelineError, match="^fast='turbo': expected one of none, auto, fuse, int8"):
        Pipeline.load(fast="turbo")
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="CUDA is not available"):
            resolve_device("cuda")


def test_match_equals_transformers_retrieval(tiny_retrieval_dir):
    pipe = Pipeline.load(tiny_retrieval_dir, device="cpu")
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(tiny_retrieval_dir).eval()
    processor = transformers.Blip2Processor.from_pretrained(tiny_retrieval_dir)
    images, texts = [picture(7), picture(8)], [["w5 w6", "w7 w8 w9"], ["w10"]]
    got = pipe.match_many(list(zip(images, texts)))
    for image, ts, scores in zip(images, texts, got):
        inputs = processor(images=[image] * len(ts), text=ts, padding=True, return_tensors="pt")
        with torch.no_grad():
            itm = model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()
        assert [s.text for s in scores] == ts
        torch.testing.assert_close(torch.tensor([s.itm for s in scores]), itm, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor([s.itc for s in scores]), itc, atol=1e-5, rtol=1e-4)
    alone = pipe.match(images[1], ["w10"])[0]
    assert (alone.text, alone.itm, alone.itc) == ("w10", pytest.approx(got[1][0].itm, abs=1e-6),
                                                  pytest.approx(got[1][0].itc, abs=1e-6))
    with pytest.raises(PipelineError, match="text generation needs a captioning checkpoint"):
        pipe.caption([images[0]])
