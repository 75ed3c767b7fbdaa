"""Each request is checked on its own before it meets a model (``Pipeline.check_prompt``, ``check_texts``): what
the model would refuse in the middle of a batch (an ``<image>`` token in a prompt, a token outside the
vocabulary, a text past the Q-Former's positions) is a PipelineError naming the problem, for the server (422)
and for every command (exit 2)."""

from __future__ import annotations

import pytest
from PIL import Image

from blip2.apps.cli import main
from blip2.apps.pipeline import GenerationOptions, Pipeline, PipelineError
from blip2.demo import DEFAULT_MODEL, DEFAULT_RETRIEVAL_MODEL

OPTIONS = GenerationOptions(max_new_tokens=4)
RED = Image.new("RGB", (96, 96), (210, 35, 35))


@pytest.fixture(scope="module")
def captioner() -> Pipeline:
    return Pipeline.load(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def retrieval() -> Pipeline:
    return Pipeline.load(DEFAULT_RETRIEVAL_MODEL, device="cpu")


@pytest.mark.parametrize("prompt", ["<image>", "Question: what is <image> here? Answer:", "a<image>b"])
def test_a_prompt_with_the_image_token_is_refused_before_the_model(captioner, prompt):
    with pytest.raises(PipelineError, match="^the prompt holds the image token '<image>': the model places the "
                                            "image itself, remove it from the text$"):
        captioner.check_prompt(prompt, OPTIONS)
    with pytest.raises(PipelineError, match="image token"):  # generate checks too, before any forward pass
        captioner.generate([RED, RED], ["a red", prompt], OPTIONS)
    assert captioner.generate([RED], ["a red"], OPTIONS)[0] != ""  # the same prompt without it runs


def test_prompt_length_counts_image_tokens_prompt_and_new_tokens(captioner):
    limit = captioner.model.config.text_config.max_position_embeddings  # 96; 16 image tokens
    fits = "red " * (limit - 16 - 1 - OPTIONS.max_new_tokens)  # + BOS
    captioner.check_prompt(fits.strip(), OPTIONS)
    with pytest.raises(PipelineError, match=f"^prompt too long: {limit + 1} tokens \\(image, prompt and "
                                            f"max_new_tokens=4\\) exceed the model's max_position_embeddings={limit}$"):
        captioner.check_prompt(fits + "red", OPTIONS)


def test_a_token_outside_the_vocabulary_is_refused():
    """A tokenizer can hold more tokens than the model's embedding table (transformers' processor adds <image>
    to the Q-Former's BERT vocabulary, one past its table): such a token is refused, not an IndexError."""
    pipe = Pipeline.load(DEFAULT_RETRIEVAL_MODEL, device="cpu")
    size = pipe.model.embeddings.word_embeddings.num_embeddings
    pipe.processor.tokenizer.add_tokens(["zebra"])
    with pytest.raises(PipelineError, match=f"^text 2 of 2 holds the token 'zebra' \\(id {size}\\), outside the "
                                            f"model's vocabulary of {size}$"):
        pipe.match(RED, ["a red circle", "a zebra"])


def test_a_text_past_the_qformer_positions_is_refused(retrieval):
    limit = retrieval.model.embeddings.position_embeddings.num_embeddings  # 64: CLS, the words, SEP
    words = ["red"] * (limit - 2)
    assert len(retrieval.match(RED, [" ".join(words)])) == 1  # exactly at the limit: scored
    with pytest.raises(PipelineError, match=f"^the text is {limit + 1} tokens long, over the {limit} text positions "
                                            "of the model's Q-Former: shorten it$"):
        retrieval.match(RED, [" ".join(words + ["circle"])])
    with pytest.raises(PipelineError, match="^text 2 of 2 is"):
        retrieval.text_embeds(["red", " ".join(words + ["circle"])])


def test_blip2_match_names_an_over_long_text_and_exits_2(tmp_path, capsys):
    image = tmp_path / "red.png"
    RED.save(image)
    long_text = "a large red circle and a small blue square " * 8
    assert main(["match", str(image), "a red circle", long_text, "--model", DEFAULT_RETRIEVAL_MODEL,
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == ("blip2 match: error: text 2 of 2 is 74 tokens long, over the 64 text positions of the model's "
                   "Q-Former: shorten it\n")
