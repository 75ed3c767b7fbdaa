"""PEFT LoRA adapters: trained on our model they load into transformers' with the same outputs, and the reverse;
every speed-up of blip2.fast refuses a model with an adapter (it would drop it) and keeps a merged one exactly."""

from __future__ import annotations

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, fast
from conftest import IMAGE_TOKEN, pixel_batch, prompts_with_images

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "fc1", "q", "v", "wo"]  # OPT's and T5's names; PEFT takes those present


def adapter(model, seed: int = 0):
    """A LoRA adapter whose B matrices are not zero (at initialisation LoRA changes nothing)."""
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def opt_inputs():
    ids, mask = prompts_with_images([[2, 10, 11, 12], [2, 20, 21, 22]])
    return dict(pixel_values=pixel_batch(2, seed=9), input_ids=ids, attention_mask=mask)


def t5_inputs():
    ids = torch.tensor([[IMAGE_TOKEN] * 4 + [11, 12, 1], [IMAGE_TOKEN] * 4 + [21, 22, 1]])
    return dict(pixel_values=pixel_batch(2, seed=9), input_ids=ids, attention_mask=torch.ones_like(ids),
                decoder_input_ids=torch.tensor([[0, 41, 42], [0, 51, 52]]))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_adapters_move_between_transformers_and_blip2(request, text, tmp_path):
    import transformers

    d = request.getfixturevalue(f"hf_{text}_dir")[1]
    inputs = opt_inputs() if text == "opt" else t5_inputs()
    base = logits(Blip2ForConditionalGeneration.from_pretrained(d), inputs)
    # trained on ours -> transformers
    ours = adapter(Blip2ForConditionalGeneration.from_pretrained(d), seed=1)
    with_adapter = logits(ours, inputs)
    assert (with_adapter - base).abs().max() > 0.1  # the adapter matters
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(transformers.Blip2ForConditionalGeneration.from_pretrained(d),
                                            tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, inputs), with_adapter, atol=1e-4, rtol=1e-4)
    # trained on transformers' -> ours
    hf = adapter(transformers.Blip2ForConditionalGeneration.from_pretrained(d), seed=2)
    hf.save_pretrained(tmp_path / "hf")
    loaded = peft.PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(d), tmp_path / "hf").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(hf, inputs), atol=1e-4, rtol=1e-4)


def test_a_lora_fine_tuning_step_trains_only_the_adapter(hf_opt_dir):
    model = adapter(Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1])).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    inputs = opt_inputs()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
    model.base_model.model.gradient_checkpointing_enable()  # as the PEFT notebooks do
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert all(g is not None and g.abs().max() > 0 for g in grads)


SPEED_UPS = {
    "fuse": fast.fuse,
    "quantize_int8": fast.quantize_int8,
    "native": fast.native,
    "compile_decoding": fast.compile_decoding,
    "cuda_graph": fast.cuda_graph,
    "apply-int8-dynamic": lambda m: fast.apply(m, "int8-dynamic"),
}


@pytest.mark.parametrize("name", SPEED_UPS)
def test_every_speed_up_refuses_an_active_adapter(hf_opt_dir, name):
    model = adapter(Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1]))
    before = logits(model, opt_inputs())
    with pytest.raises(fast.Unsupported, match=r"carries a PEFT adapter.*merge_and_unload"):
        SPEED_UPS[name](model)
    torch.testing.assert_close(logits(model, opt_inputs()), before, atol=0, rtol=0)  # nothing changed


def test_auto_leaves_a_model_with_an_adapter_as_it_is(hf_opt_dir):
    """The commands' default (--fast auto) falls back quietly where no speed-up applies: the adapter is kept."""
    model = adapter(Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1]))
    before = logits(model, opt_inputs())
    assert fast.apply(model, "auto") is model
    torch.testing.assert_close(logits(model, opt_inputs()), before, atol=0, rtol=0)


def test_a_merged_adapter_is_kept_by_the_speed_ups(hf_opt_dir):
    model = adapter(Blip2ForConditionalGeneration.from_pretrained(hf_opt_dir[1]))
    pixels = opt_inputs()["pixel_values"]
    want = model.generate(pixel_values=pixels, max_new_tokens=8)
    merged = model.merge_and_unload()
    assert torch.equal(merged.generate(pixels, max_new_tokens=8), want)
    fast.fuse(merged)
    assert torch.equal(merged.generate(pixels, max_new_tokens=8), want)
