"""Fast by default (blip2.fast.lazy): ``from_pretrained(...).generate()`` lays the model out for the fastest exact
path at its first call, with the plain model's tokens, and anything that needs the plain modules (training, an
optimizer built before, moving, casting, reloading, PEFT, copying) finds them: the same modules and parameters."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import blip2.fast.lazy as lazy
from blip2 import Blip2ForConditionalGeneration, fast
from blip2.fast.linear import FusedLinear, walk
from conftest import hf_blip2, pixel_batch, prompts_with_images


@pytest.fixture(scope="module", params=["opt", "t5"])
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"lazy_{request.param}")
    hf_blip2(request.param, seed=3).save_pretrained(d)
    return request.param, str(d)


def fused_layers(model: nn.Module) -> list[FusedLinear]:
    """The model's FusedLinear layers (``walk``: a guarded model's own walks would undo them)."""
    return [m for m in walk(model) if isinstance(m, FusedLinear)]


def laid_out(model: nn.Module) -> bool:
    return bool(fused_layers(model))


def inputs(text: str) -> dict:
    if text == "opt":
        ids, mask = prompts_with_images([[2, 10, 11], [2, 20, 21]])
        return dict(pixel_values=pixel_batch(2, seed=5), input_ids=ids, attention_mask=mask)
    return dict(pixel_values=pixel_batch(2, seed=5))


def captions(model, text: str) -> torch.Tensor:
    return model.generate(**inputs(text), max_new_tokens=8)


def loss(model, text: str) -> torch.Tensor:
    x = inputs(text)
    if text == "opt":
        return model(**x, labels=x["input_ids"]).loss
    ids = torch.tensor([[11, 12, 1], [21, 22, 1]])
    return model(pixel_values=x["pixel_values"], input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss


def test_generate_lays_out_once_with_the_plain_tokens(checkpoint):
    text, d = checkpoint
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    assert model.fast == "auto" and not laid_out(model)
    want = captions(plain, text)
    assert not laid_out(plain)
    assert torch.equal(captions(model, text), want)
    layers = fused_layers(model)
    assert layers and type(model).__name__ == "Blip2ForConditionalGeneration"
    model.eval()  # eval() and later calls keep the layout: the very same layers
    assert torch.equal(captions(model, text), want)
    assert {id(m) for m in fused_layers(model)} == {id(m) for m in layers}
    beams = dict(num_beams=3, max_new_tokens=6)
    assert torch.equal(model.generate(**inputs(text), **beams), plain.generate(**inputs(text), **beams))


def test_opt_out_and_explicit_modes(checkpoint):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    captions(model, text)
    assert not laid_out(model)
    model = Blip2ForConditionalGeneration.from_pretrained(d, fast="fuse")  # applied at load, for good
    assert laid_out(model) and model.fast == "none" and "_fast_guard" not in model.__dict__
    with pytest.raises(ValueError, match="fast='fastest'.*expected one of"):
        Blip2ForConditionalGeneration.from_pretrained(d, fast="fastest")
    built = Blip2ForConditionalGeneration(model.config).eval()  # built in code: runs as written
    captions(built, text)
    assert not laid_out(built)


def test_training_mode_is_never_laid_out(checkpoint):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d).train()
    captions(model, text)
    assert not laid_out(model)


def test_optimizer_built_before_generate_still_trains_the_model(checkpoint):
    """An evaluation with generate between training steps (a Trainer with predict_with_generate): the
    optimizer's parameters are the model's again after train(), with their gradients, and the next
    generate runs with the trained weights."""
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    model.vision_model.requires_grad_(False)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD([p for p in params.values() if p.requires_grad], lr=0.01)
    model.eval()
    captions(model, text)
    assert laid_out(model)
    model.train()
    assert not laid_out(model)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    before = loss(model, text)
    before.backward()
    assert all(p.grad is not None for p in model.qformer.parameters())
    assert all(p.grad is not None for n, p in model.language_model.named_parameters() if "weight" in n)
    opt.step()
    assert loss(model, text).item() < before.item()
    model.eval()
    trained = captions(model, text)
    assert laid_out(model)
    reference = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    reference.load_state_dict(model.state_dict())  # the state dict reads the laid-out model's reference keys
    assert torch.equal(trained, captions(reference, text))


def test_the_parts_hand_back_their_parameters(checkpoint):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    want = {name: [n for n, _ in getattr(model, name).named_parameters()]
            for name in ("vision_model", "qformer", "language_model")}
    for name, names in want.items():
        captions(model, text)
        assert laid_out(model)
        assert [n for n, _ in getattr(model, name).named_parameters()] == names, name
        assert not laid_out(model)


@pytest.mark.parametrize("change", ["to", "half", "load_state_dict", "requires_grad_", "grad_forward", "deepcopy"])
def test_what_needs_the_plain_modules_finds_them(checkpoint, change):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    captions(model, text)
    assert laid_out(model)
    if change == "to":
        model.to(torch.float64)
        plain.to(torch.float64)
    elif change == "half":
        model.half().float()
        plain.half().float()
    elif change == "load_state_dict":
        other = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(0.9)
        model.load_state_dict(other.state_dict())
        plain = other
    elif change == "requires_grad_":
        model.requires_grad_(False)
        assert not any(p.requires_grad for p in model.parameters())
    elif change == "grad_forward":
        loss(model, text).backward()
        assert all(p.grad is not None for p in model.qformer.parameters())
    else:
        copied = copy.deepcopy(model)
        assert type(copied) is Blip2ForConditionalGeneration and not laid_out(copied)
        assert torch.equal(captions(copied, text), captions(plain, text))
    assert not laid_out(model)
    if change in ("to", "half"):
        x = {k: v.to(torch.float64) if v.is_floating_point() and change == "to" else v for k, v in inputs(text).items()}
        got, want = model.generate(**x, max_new_tokens=8), plain.generate(**x, max_new_tokens=8)
    else:
        got, want = captions(model, text), captions(plain, text)
    assert torch.equal(got, want)
    assert laid_out(model)  # laid out again by the next generate


def test_peft_after_generate(checkpoint):
    peft = pytest.importorskip("peft")
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    captions(model, text)
    targets = ["q_proj", "v_proj"] if text == "opt" else ["q", "v"]
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    assert not laid_out(model)
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) > 0
    loss(tuned, text).backward()
    tuned.eval()
    captions(model, text)  # an adapter: no speed-up applies, the model stays as it is
    assert not laid_out(model)


def test_save_pretrained_after_generate(checkpoint, tmp_path):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    want = captions(model, text)
    model.save_pretrained(tmp_path)
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path, fast="none")
    assert torch.equal(captions(again, text), want)


def test_first_generate_from_two_threads(checkpoint):
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    want = captions(Blip2ForConditionalGeneration.from_pretrained(d, fast="none"), text)
    applied, original = [], fast.apply
    results: list[torch.Tensor] = []

    def counting(*args, **kwargs):
        applied.append(1)
        return original(*args, **kwargs)

    lazy.apply = counting
    try:
        threads = [threading.Thread(target=lambda: results.append(captions(model, text))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        lazy.apply = original
    assert len(applied) == 1 and len(results) == 2
    assert all(torch.equal(r, want) for r in results)


def test_a_large_model_is_laid_out_at_its_second_generate(checkpoint, monkeypatch, caplog):
    """Past ``LATER_BYTES`` on a CPU the first generate runs as loaded and the second lays the model out, with
    the plain tokens throughout; ``lay_out`` does it at once."""
    text, d = checkpoint
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    want = captions(Blip2ForConditionalGeneration.from_pretrained(d, fast="none"), text)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    with caplog.at_level("INFO", logger="blip2.fast.lazy"):
        assert torch.equal(captions(model, text), want)
    assert not laid_out(model) and "laid out for the fast path at the next" in caplog.text
    assert torch.equal(captions(model, text), want)
    layers = fused_layers(model)
    assert layers
    model.train()
    model.eval()  # undone and laid out again: at the next generate, not one later
    assert torch.equal(captions(model, text), want) and laid_out(model)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    lazy.lay_out(model)
    assert laid_out(model) and torch.equal(captions(model, text), want)
    monkeypatch.setattr(lazy, "LATER_BYTES", 1 << 30)  # the tiny model: at its first generate
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    captions(model, text)
    assert laid_out(model)


def test_the_pipeline_keeps_the_layout_between_calls(tiny_model_dir):
    """The Pipeline leaves "auto" to generate, and nothing it does between calls (its device, its decoding)
    undoes the layout: the second call runs on the same layers."""
    from blip2.apps.pipeline import GenerationOptions, Pipeline

    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    assert pipe.model.fast == "auto" and not laid_out(pipe.model)
    plain = Pipeline.load(tiny_model_dir, device="cpu", fast="none")
    options = GenerationOptions(max_new_tokens=5)
    got = pipe.generate(pixel_batch(2, seed=4), ["", "a photo of"], options)
    layers = {id(m) for m in fused_layers(pipe.model)}
    assert layers and pipe.device == torch.device("cpu")
    assert pipe.generate(pixel_batch(2, seed=4), ["", "a photo of"], options) == got
    assert {id(m) for m in fused_layers(pipe.model)} == layers
    assert got == plain.generate(pixel_batch(2, seed=4), ["", "a photo of"], options)


def test_a_large_model_decodes_one_row_natively_on_the_weights_as_loaded(checkpoint, monkeypatch):
    """Past ``LATER_BYTES`` on a CPU, a generate of one row decodes natively on the checkpoint's own weights
    (q/k/v apart: nothing copied, no layout), at every such call; anything that needs the plain modules puts
    the eager step back. Several rows: the first such generate runs eager, the next lays out, and one row then
    runs on the layout. The plain tokens throughout."""
    from torch.profiler import ProfilerActivity, profile

    text, d = checkpoint
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    one = {k: v[:1] for k, v in inputs(text).items()}
    want, want_two = plain.generate(**one, max_new_tokens=8), captions(plain, text)
    op = f"blip2_kernels::{'opt' if text == 'opt' else 't5'}_step"

    def generate(model, **kw):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model.generate(**kw, max_new_tokens=8)
        return out, sum(e.count for e in prof.key_averages() if e.key == op)

    model = Blip2ForConditionalGeneration.from_pretrained(d)
    lm = model.language_model
    weights = {n: p.data_ptr() for n, p in lm.named_parameters()}
    steps = want.shape[1] - (one["input_ids"].shape[1] if text == "opt" else 1) - 1  # after the prefill
    for _ in range(2):
        got, calls = generate(model, **one)
        assert torch.equal(got, want) and calls == steps > 0
        assert lm.decode_step != lm._decode_step and not laid_out(model)
    assert {n: p.data_ptr() for n, p in nn.Module.named_parameters(lm)} == weights  # read in place
    model.train()
    assert lm.decode_step == lm._decode_step  # the eager step is back with the plain modules
    model.eval()
    got, calls = generate(model, **inputs(text))  # several rows: eager, the layout left to the next
    assert torch.equal(got, want_two) and calls == 0 and not laid_out(model)
    assert torch.equal(generate(model, **one)[0], want) and not laid_out(model)
    assert torch.equal(captions(model, text), want_two) and laid_out(model)
    got, calls = generate(model, **one)
    assert torch.equal(got, want) and calls == steps and laid_out(model)


def test_beams_of_one_image_count_as_several_rows(checkpoint, monkeypatch):
    """``generate`` tells the speed layer the rows it decodes: one image with two beams is two rows, which the
    step on the weights as loaded would decode eagerly, so the first such call runs as loaded and the next lays
    out; the plain tokens."""
    text, d = checkpoint
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    one = {k: v[:1] for k, v in inputs(text).items()}
    want = Blip2ForConditionalGeneration.from_pretrained(d, fast="none").generate(**one, max_new_tokens=6, num_beams=2)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    seen = []
    monkeypatch.setattr(lazy, "_lay_out", lambda model, wait, rows=None: seen.append(rows))
    model.generate(**one, max_new_tokens=2, num_beams=2)
    model.generate(**one, max_new_tokens=2, do_sample=True, num_return_sequences=3)
    model.generate(**inputs(text), max_new_tokens=2)
    assert seen == [2, 3, 2]
    monkeypatch.undo()
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    lm = model.language_model
    assert torch.equal(model.generate(**one, max_new_tokens=6, num_beams=2), want)
    assert lm.decode_step == lm._decode_step and not laid_out(model)
    assert torch.equal(model.generate(**one, max_new_tokens=6, num_beams=2), want) and laid_out(model)
