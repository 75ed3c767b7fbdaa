"""BLIP-2 with Flan-T5 against transformers: logits, loss, tokens, round trip, shapes."""

from __future__ import annotations


import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from conftest import IMAGE_TOKEN, NUM_QUERY, pixel_batch

# T5 prompts end with </s> (id 1) and are right-padded with 0, after the image tokens
PROMPTS = [[11, 12, 13, 14, 15, 1], [21, 1], [31, 32, 33, 1]]


def t5_inputs(prompts: list[list[int]], image_token: int | None = IMAGE_TOKEN) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    img = [image_token] * NUM_QUERY if image_token is not None else []
    ids = torch.tensor([img + p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(img) + [1] * len(p) + [0] * (width - len(p)) for p in prompts])
    return ids, mask


@pytest.fixture(scope="module")
def pair(hf_t5_dir):
    hf, d = hf_t5_dir
    return hf, Blip2ForConditionalGeneration.from_pretrained(d), d


def test_logits_and_loss_match_reference(pair):
    hf, ours, _ = pair
    pixels = pixel_batch(3, seed=1)
    ids, mask = t5_inputs(PROMPTS)
    labels = torch.tensor([[41, 42, 43, 1], [51, 1, -100, -100], [61, 62, 1, -100]])  # padded with -100
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(pixels, ids, mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=0)
    assert ref.loss.item() > 1.0


def test_decoder_input_ids_path_matches_reference(pair):
    hf, ours, _ = pair
    pixels = pixel_batch(3, seed=2)
    ids, mask = t5_inputs(PROMPTS)
    dec = torch.tensor([[0, 41, 42], [0, 51, 0], [0, 61, 62]])
    dec_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                 decoder_attention_mask=dec_mask).logits
        out = ours(pixels, ids, mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_tokens_match_reference(pair, num_beams):
    hf, ours, _ = pair
    pixels = pixel_batch(3, seed=7)
    ids, mask = t5_inputs(PROMPTS)
    kw = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kw)
    out = ours.generate(pixels, ids, mask, **kw)
    assert out.tolist() == ref.tolist()
    assert out[:, 0].tolist() == [0, 0, 0]  # decoder_start_token_id first, as transformers returns


def test_batch_equals_each_prompt_alone(pair):
    _, ours, _ = pair
    pixels = pixel_batch(3, seed=9)
    ids, mask = t5_inputs(PROMPTS)
    batched = ours.generate(pixels, ids, mask, max_new_tokens=8, num_beams=3)
    for i, p in enumerate(PROMPTS):
        one_ids, one_mask = t5_inputs([p])
        alone = ours.generate(pixels[i:i + 1], one_ids, one_mask, max_new_tokens=8, num_beams=3)
        n = alone.shape[1]
        assert batched[i, :n].tolist() == alone[0].tolist()


def test_legacy_path_equals_image_token_path(pair):
    _, ours, _ = pair
    pixels = pixel_batch(3, seed=11)
    ids, mask = t5_inputs(PROMPTS)
    legacy_ids, legacy_mask = t5_inputs(PROMPTS, image_token=None)
    a = ours.generate(pixels, ids, mask, max_new_tokens=6)
    b = ours.generate(pixels, legacy_ids, legacy_mask, max_new_tokens=6)
    assert a.tolist() == b.tolist()


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    from transformers import Blip2ForConditionalGeneration as HF

    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = HF.from_pretrained(tmp_path).eval()
    pixels = pixel_batch(2, seed=13)
    ids, mask = t5_inputs(PROMPTS[:2])
    dec = torch.tensor([[0, 5], [0, 6]])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = back(pixel_values=pixels, input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(ref, got)


def test_bf16_logits_agree_with_fp32(pair):
    _, ours, d = pair
    half = Blip2ForConditionalGeneration.from_pretrained(d, torch_dtype="bfloat16")
    assert half.language_model.shared.weight.dtype == torch.bfloat16
    pixels = pixel_batch(2, seed=3)
    ids, mask = t5_inputs(PROMPTS[:2])
    with torch.no_grad():
        a = ours(pixels, ids, mask, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits.float()
        b = half(pixels, ids, mask, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits.float()
    assert torch.isfinite(b).all()
    # bf16 keeps ~3 significant digits and a random net amplifies rounding: compare directions
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert cos.min().item() > 0.995, cos


def test_fp16_keeps_t5_wo_in_fp32(pair):
    _, _, d = pair
    half = Blip2ForConditionalGeneration.from_pretrained(d, torch_dtype=torch.float16)
    ff = half.language_model.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.weight.dtype == torch.float32 and ff.wi_0.weight.dtype == torch.float16
    out = half.generate(pixel_batch(1), max_new_tokens=3)
    assert out.shape[0] == 1 and out.shape[1] >= 2
