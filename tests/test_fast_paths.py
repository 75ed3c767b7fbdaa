"""The fast inference paths give the plain path's tokens: fused/packed weights, bf16, batching, compiled
decoding; int8 agrees on >= 95% of tokens with >= 1.5x less language-model memory."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2.apps.bench import module_bytes
from blip2.fast.linear import FusedLinear, decode_format, default_format, fused_format
from blip2 import fast
from blip2.fast.native import check as native_check
from conftest import IMAGE_TOKEN, NUM_QUERY, pixel_batch, prompts_with_images

OPT_PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 21], [2, 31, 32, 33]]  # BOS + text, left-padded in a batch
T5_PROMPTS = [[11, 12, 13, 14, 15, 1], [21, 1], [31, 32, 33, 1]]  # text + </s>, right-padded


def t5_inputs(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY + p + [0] * (width - len(p)) for p in prompts])
    mask = torch.tensor([[1] * (NUM_QUERY + len(p)) + [0] * (width - len(p)) for p in prompts])
    return ids, mask


def inputs(text: str, prompts: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if text == "opt":
        return prompts_with_images(prompts or OPT_PROMPTS)
    return t5_inputs(prompts or T5_PROMPTS)


@pytest.fixture(scope="module", params=["opt", "t5"])
def case(request, hf_opt_dir, hf_t5_dir):
    """(text, checkpoint directory, plain model)."""
    d = (hf_opt_dir if request.param == "opt" else hf_t5_dir)[1]
    return request.param, d, Blip2ForConditionalGeneration.from_pretrained(d)


@pytest.fixture(scope="module")
def fused(case):
    return fast.fuse(Blip2ForConditionalGeneration.from_pretrained(case[1]))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fused_tokens_equal_plain(case, fused, num_beams):
    text, _, plain = case
    pixels = pixel_batch(3, seed=7)
    ids, mask = inputs(text)
    want = plain.generate(pixels, ids, mask, max_new_tokens=10, num_beams=num_beams)
    got = fused.generate(pixels, ids, mask, max_new_tokens=10, num_beams=num_beams)
    assert got.tolist() == want.tolist()
    prefix = ids.shape[1] if text == "opt" else 1  # T5 returns the decoder start token first
    assert want.shape[1] - prefix >= 5  # not a trivially short output


def test_auto_picks_the_fastest_exact_mode_and_keeps_the_tokens(case):
    """apply(model, "auto"): native where the kernels run (the vision encoder and Q-Former as loaded: packing
    them costs seconds at real size for no faster call), else fuse (CPU); the plain path's tokens."""
    text, d, plain = case
    model = fast.apply(Blip2ForConditionalGeneration.from_pretrained(d), "auto")
    try:
        native_check(model.language_model.get_input_embeddings().weight)
        want_native = True
    except fast.Unsupported:
        want_native = False
    assert (type(model.language_model.decode_step).__name__.startswith("Native")) == want_native
    assert fused_format(model.language_model) is not None
    for tower in (model.vision_model, model.qformer):
        assert (fused_format(tower) is None) == want_native
    pixels = pixel_batch(2, seed=3)
    ids, mask = inputs(text)
    ids, mask = ids[:2], mask[:2]
    assert model.generate(pixels, ids, mask, max_new_tokens=6).tolist() == \
        plain.generate(pixels, ids, mask, max_new_tokens=6).tolist()


def test_apply_refuses_before_changing_anything(case, tiny_retrieval_dir):
    from blip2 import Blip2ForImageTextRetrieval

    _, d, _ = case
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    with pytest.raises(fast.Unsupported, match="CUDA graphs need a CUDA device"):
        fast.apply(model, "cuda-graph")
    assert fused_format(model) is None  # nothing was fused on the way to the refusal
    with pytest.raises(ValueError, match="fast mode 'turbo': expected one of none, auto, fuse"):
        fast.apply(model, "turbo")
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(tiny_retrieval_dir)
    with pytest.raises(fast.Unsupported, match="Blip2ForImageTextRetrieval has no language model"):
        fast.apply(retrieval, "fuse")
    assert fast.apply(retrieval, "auto") is retrieval and fused_format(retrieval) is None  # auto: quietly none
    assert fast.apply(model, "none") is model and fused_format(model) is None


def test_fused_forward_logits_match_plain(case, fused):
    text, _, plain = case
    pixels = pixel_batch(3, seed=2)
    ids, mask = inputs(text)
    kw = {} if text == "opt" else {"decoder_input_ids": torch.tensor([[0, 41, 42], [0, 51, 52], [0, 61, 62]])}
    with torch.no_grad():
        a = plain(pixels, ids, mask, **kw).logits
        b = fused(pixels, ids, mask, **kw).logits
    valid = mask.bool() if text == "opt" else slice(None)
    torch.testing.assert_close(b[valid], a[valid], atol=1e-4, rtol=0)


def _assert_batch_equals_each_prompt_alone(text: str, model: Blip2ForConditionalGeneration) -> None:
    prompts = OPT_PROMPTS if text == "opt" else T5_PROMPTS
    pixels = pixel_batch(3, seed=9)
    ids, mask = inputs(text)
    batched = model.generate(pixels, ids, mask, max_new_tokens=8)
    for i, p in enumerate(prompts):
        one_ids, one_mask = inputs(text, [p])
        alone = model.generate(pixels[i:i + 1], one_ids, one_mask, max_new_tokens=8)
        if text == "opt":  # the prompt is returned first, padded in the batch: compare the new tokens
            assert batched[i, ids.shape[1]:].tolist()[:alone.shape[1] - one_ids.shape[1]] == \
                alone[0, one_ids.shape[1]:].tolist()
        else:
            assert batched[i, :alone.shape[1]].tolist() == alone[0].tolist()


def test_fused_batch_equals_each_prompt_alone(case, fused):
    _assert_batch_equals_each_prompt_alone(case[0], fused)


def test_fused_state_dict_is_the_reference_one(case, fused, tmp_path):
    """Fusing keeps keys, shapes and values; a fused model saves a checkpoint that loads back equal,
    and unfuse() gives nn.Linear parameters back."""
    _, d, plain = case
    want = plain.state_dict()
    got = fused.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    fused.save_pretrained(tmp_path)
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        assert torch.equal(v, want[k]), k
    again = fast.unfuse(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d)))
    assert not any(isinstance(m, FusedLinear) for m in again.modules())
    assert {k: tuple(p.shape) for k, p in again.named_parameters()} == \
        {k: tuple(p.shape) for k, p in plain.named_parameters()}


def test_gradients_reach_the_inputs_of_a_fused_language_model(case, fused):
    """The fast kernels have no backward: with gradients on, products fall back to differentiable ones
    (stage-2 training backpropagates through the frozen LM into the projection)."""
    text, _, plain = case
    ids, mask = inputs(text)
    grads = []
    for model in (plain, fused):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        lm = model.language_model
        out = lm(embeds, mask) if text == "opt" else lm(embeds, mask, decoder_input_ids=ids[:, -3:])
        out.float().square().mean().backward()
        grads.append(embeds.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_fused_model_refuses_to_move_or_reload(case, fused):
    with pytest.raises(RuntimeError, match="unfuse"):
        fused.to(torch.float64)
    with pytest.raises(RuntimeError, match="unfuse"):
        fused.load_state_dict(case[2].state_dict())
    with pytest.raises(RuntimeError, match="already fused"):
        fast.fuse(fused.language_model)


def test_bf16_fused_tokens_equal_bf16_plain(case):
    text, d, _ = case
    plain = Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16)
    fused_model = fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16))
    assert fused_model.qformer.layernorm.weight.dtype == torch.float32  # the Q-Former stays fp32
    pixels = pixel_batch(3, seed=4)
    ids, mask = inputs(text)
    want = plain.generate(pixels, ids, mask, max_new_tokens=10)
    assert fused_model.generate(pixels, ids, mask, max_new_tokens=10).tolist() == want.tolist()


# -- int8 -------------------------------------------------------------------------------------


def _agreement_case(hf_opt_dir: tuple) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(checkpoint, pixel_values, input_ids, attention_mask) to measure int8 agreement on: the bundled demo
    model captioning its example images when it is there, else the tiny random BLIP-2-OPT with eight
    prompts (its greedy continuations use many different tokens: see the test)."""
    try:
        from blip2.demo import DEFAULT_MODEL
    except ImportError:
        DEFAULT_MODEL = None
    images = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "images", "*.png")))
    if DEFAULT_MODEL and os.path.exists(os.path.join(DEFAULT_MODEL, "model.safetensors")) and images:
        from PIL import Image

        from blip2 import Blip2Processor

        processor = Blip2Processor.from_pretrained(DEFAULT_MODEL)
        pixels = processor(images=[Image.open(p).convert("RGB") for p in images])["pixel_values"]
        return DEFAULT_MODEL, pixels, None, None
    ids, mask = prompts_with_images(OPT_PROMPTS * 2 + [[2, 5], [2, 6, 7]])
    return hf_opt_dir[1], pixel_batch(8, seed=7), ids, mask


def _teacher_forced_agreement(plain: Blip2ForConditionalGeneration, quant: Blip2ForConditionalGeneration,
                              pixels: torch.Tensor, ids: torch.Tensor | None, mask: torch.Tensor | None,
                              new: int) -> tuple[float, int]:
    """Greedy-decode with ``plain``; then, fed the same tokens, how often ``quant``'s next-token argmax equals
    ``plain``'s (per position, so one early difference does not spoil the rest). Also the number of
    distinct tokens generated, to show the continuations are not degenerate."""
    out = plain.generate(pixels, ids, mask, max_new_tokens=new, min_new_tokens=new)
    P = out.shape[1] - new
    full_mask = torch.ones_like(out) if mask is None else torch.cat([mask, torch.ones_like(out[:, P:])], 1)
    with torch.no_grad():
        a = plain(pixels, out, full_mask).logits[:, P - 1:-1].argmax(-1)
        b = quant(pixels, out, full_mask).logits[:, P - 1:-1].argmax(-1)
    return (a == b).float().mean().item(), out[:, P:].unique().numel()


def test_int8_agrees_and_shrinks_the_language_model(hf_opt_dir):
    d, pixels, ids, mask = _agreement_case(hf_opt_dir)
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d))
    agreement, distinct = _teacher_forced_agreement(plain, quant, pixels, ids, mask, new=20)
    assert distinct >= 10
    assert agreement >= 0.95, agreement
    assert module_bytes(plain.language_model) >= 1.5 * module_bytes(quant.language_model)
    # what the memory ratios divide by: the int8 weights, scales and biases the model holds, not their plain size
    assert fast.held_bytes(quant) == module_bytes(quant) < fast.held_bytes(plain) == module_bytes(plain)
    # generation runs through the int8 kernels end to end
    assert quant.generate(pixels, ids, mask, max_new_tokens=5).shape[0] == pixels.shape[0]


@pytest.fixture(scope="module")
def hf_t5_mild_dir(tmp_path_factory) -> str:
    """A tiny random BLIP-2-T5 drawn with std 0.15: the suite's usual 0.3 makes this T5 chaotic (bf16 alone
    flips 7% of its tokens), smaller ones make it repeat a few tokens."""
    import transformers

    from conftest import randomize_, tiny_hf_config

    torch.manual_seed(0)
    model = randomize_(transformers.Blip2ForConditionalGeneration(tiny_hf_config("t5")), seed=1, std=0.15).eval()
    d = tmp_path_factory.mktemp("hf_t5_mild")
    model.save_pretrained(d)
    return str(d)


def test_int8_t5_agrees(hf_t5_mild_dir):
    plain = Blip2ForConditionalGeneration.from_pretrained(hf_t5_mild_dir)
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(hf_t5_mild_dir))
    pixels = pixel_batch(16, seed=5)
    ids, mask = t5_inputs(T5_PROMPTS * 5 + [[5, 1]])
    out = plain.generate(pixels, ids, mask, max_new_tokens=16, min_new_tokens=16)
    with torch.no_grad():  # teacher-forced, as for OPT: the next-token argmax at every position
        a = plain(pixels, ids, mask, decoder_input_ids=out[:, :-1]).logits.argmax(-1)
        b = quant(pixels, ids, mask, decoder_input_ids=out[:, :-1]).logits.argmax(-1)
    assert out[:, 1:].unique().numel() >= 10
    assert (a == b).float().mean().item() >= 0.95
    assert module_bytes(plain.language_model) >= 1.5 * module_bytes(quant.language_model)
    # what the memory ratios divide by: the int8 weights, scales and biases the model holds, not their plain size
    assert fast.held_bytes(quant) == module_bytes(quant) < fast.held_bytes(plain) == module_bytes(plain)
    assert quant.generate(pixels[:2], ids[:2], mask[:2], max_new_tokens=5).shape[0] == 2


# -- dynamic int8 (int8 products) ----------------------------------------------------------------


def test_dynamic_int8_product_is_exact_on_the_rounded_rows():
    """The kernel gets each row rounded to integers with its own scale and returns their exact product
    with the int8 weights: equal, to fp32 rounding, to the same product in float64; a row's result does
    not depend on the other rows; an all-zero row gives the bias."""
    from blip2.fast.quant import (dynamic_int8_kernel, dynamic_int8_levels, dynamic_int8_linear, pack_dynamic,
                             quantize_weight)

    QMAX = dynamic_int8_levels()
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    x = torch.randn(5, 64) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [0.0]])
    q, s = quantize_weight(w)
    kernel = dynamic_int8_kernel(pack_dynamic(q, s))
    y = dynamic_int8_linear(x, kernel, b, 48)
    row_scale = (x.abs().amax(1, keepdim=True) / QMAX).clamp_min(1e-30).double()
    want = (torch.round(x.double() / row_scale) @ q.double().T) * s.double() * row_scale + b.double()
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-6)
    assert not torch.allclose(y, x @ w.T + b, atol=1e-3)  # it is rounded: not the float product
    for i in range(5):
        assert torch.equal(dynamic_int8_linear(x[i:i + 1], kernel, b, 48), y[i:i + 1])
    assert torch.equal(y[4], b)
    # a batch of [B, T, K] rows, bf16 in and out
    x3 = x[:4].reshape(2, 2, 64).bfloat16()
    y3 = dynamic_int8_linear(x3, kernel, b, 48)
    assert y3.shape == (2, 2, 48) and y3.dtype == torch.bfloat16
    # one input feature (the pinning rows still fit)
    q1, s1 = quantize_weight(w[:, :1])
    torch.testing.assert_close(dynamic_int8_linear(x[:2, :1], dynamic_int8_kernel(pack_dynamic(q1, s1)), None, 48),
                               (x[:2, :1].double() @ (q1.double() * s1.double()[:, None]).T).float(), atol=1e-4,
                               rtol=1e-5)


def test_dynamic_int8_takes_the_activation_range_its_kernel_computes_exactly(monkeypatch):
    """The activation range is chosen by trying the kernel: a range the kernel does not reproduce exactly
    (63 levels without "reduce range": its scale is not 1) is passed over; none that works -> unavailable."""
    import blip2.fast.quant as quant

    monkeypatch.setattr(quant, "_TRIED", False)
    monkeypatch.setattr(quant, "_CONFIG", None)
    monkeypatch.setattr(quant, "_SENTINELS", {})
    assert quant.dynamic_int8_available()
    working = quant._CONFIG  # (False, 127) with VNNI; (True, 63) where AVX2 products saturate at 127 levels
    monkeypatch.setattr(quant, "_TRIED", False)
    monkeypatch.setattr(quant, "_SENTINELS", {})
    monkeypatch.setattr(quant, "_CANDIDATES", ((False, 63), working))
    assert quant.dynamic_int8_available() and quant._CONFIG == working
    monkeypatch.setattr(quant, "_TRIED", False)
    monkeypatch.setattr(quant, "_SENTINELS", {})
    monkeypatch.setattr(quant, "_CANDIDATES", ((False, 63),))
    assert not quant.dynamic_int8_available()
    with pytest.raises(RuntimeError, match="no working dynamic int8 kernels"):
        quant.dynamic_int8_levels()


def test_dynamic_int8_layer_refuses_where_it_cannot_run(monkeypatch):
    import blip2.fast.linear as fused

    with pytest.raises(ValueError, match="int8-dynamic format needs a CPU.*meta"):
        FusedLinear([torch.nn.Linear(16, 8, device="meta")], "int8-dynamic")
    monkeypatch.setattr(fused, "dynamic_int8_available", lambda: False)
    with pytest.raises(ValueError, match="int8-dynamic format needs a CPU with torch's int8 kernels"):
        FusedLinear([torch.nn.Linear(16, 8)], "int8-dynamic")


def test_int8_dynamic_agrees_and_shrinks(hf_opt_dir):
    d, pixels, ids, mask = _agreement_case(hf_opt_dir)
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True, vision=True)
    assert fused_format(quant.language_model) == fused_format(quant.vision_model) == "int8-dynamic"
    assert fused_format(quant.qformer) == default_format(plain.qformer.layernorm.weight)  # never quantized
    agreement, distinct = _teacher_forced_agreement(plain, quant, pixels, ids, mask, new=20)
    assert distinct >= 10
    assert agreement >= 0.95, agreement
    assert module_bytes(plain.language_model) >= 1.5 * module_bytes(quant.language_model)
    # what the memory ratios divide by: the int8 weights, scales and biases the model holds, not their plain size
    assert fast.held_bytes(quant) == module_bytes(quant) < fast.held_bytes(plain) == module_bytes(plain)
    assert module_bytes(plain.vision_model) >= 3 * module_bytes(quant.vision_model)
    assert quant.generate(pixels, ids, mask, max_new_tokens=5).shape[0] == pixels.shape[0]


def test_int8_dynamic_t5_agrees(hf_t5_mild_dir):
    plain = Blip2ForConditionalGeneration.from_pretrained(hf_t5_mild_dir)
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(hf_t5_mild_dir), dynamic=True, vision=True)
    pixels = pixel_batch(16, seed=5)
    ids, mask = t5_inputs(T5_PROMPTS * 5 + [[5, 1]])
    out = plain.generate(pixels, ids, mask, max_new_tokens=16, min_new_tokens=16)
    with torch.no_grad():
        a = plain(pixels, ids, mask, decoder_input_ids=out[:, :-1]).logits.argmax(-1)
        b = quant(pixels, ids, mask, decoder_input_ids=out[:, :-1]).logits.argmax(-1)
    assert out[:, 1:].unique().numel() >= 10
    assert (a == b).float().mean().item() >= 0.95
    assert module_bytes(plain.language_model) >= 1.5 * module_bytes(quant.language_model)
    # what the memory ratios divide by: the int8 weights, scales and biases the model holds, not their plain size
    assert fast.held_bytes(quant) == module_bytes(quant) < fast.held_bytes(plain) == module_bytes(plain)


def test_int8_dynamic_state_dict_and_batches(case, tmp_path):
    """The state dict has the weight-only int8 model's keys and values (the same rounding),
    saves and loads back; a prompt's tokens do not depend on the rest of its batch (one activation scale
    per row); unfuse() gives nn.Linear layers back."""
    text, d, plain = case
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True, vision=True)
    weight_only = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), vision=True)
    got, want = quant.state_dict(), weight_only.state_dict()
    assert list(got) == list(want)  # the reference keys (a tied head's copy left out, as weight-only int8 does)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    quant.save_pretrained(tmp_path)
    back = Blip2ForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert set(want) <= set(back)
    for k, v in want.items():
        assert torch.equal(back[k], v), k

    _assert_batch_equals_each_prompt_alone(text, quant)

    fast.unfuse(quant)
    assert not any(isinstance(m, FusedLinear) for m in quant.modules())
    assert all(torch.equal(p, want[k]) for k, p in quant.named_parameters() if k in want)


def test_compiled_int8_dynamic_step_tokens_equal_eager(case):
    """compile() keeps the int8-dynamic layers (the rounding is traced, the integer product is a custom op
    that finds the layer's packed weight by handle): the same tokens as eager, at one row and several."""
    text, d, _ = case
    torch._dynamo.reset()
    eager = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True)
    pixels = pixel_batch(3, seed=7)
    ids, mask = inputs(text)
    want = eager.generate(pixels, ids, mask, max_new_tokens=8)
    for batch in (1, 3):
        model = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True)
        fast.compile_decoding(model, batch, backend="eager", fullgraph=True)
        assert fused_format(model.language_model) == "int8-dynamic"
        assert model.language_model.decode_step != model.language_model._decode_step  # the compiled step runs
        assert model.generate(pixels, ids, mask, max_new_tokens=8).tolist() == want.tolist()


@pytest.mark.slow
def test_compiled_int8_dynamic_inductor_agrees(hf_opt_dir):
    """A real inductor compile of the int8-dynamic step (a C++ build). The float work around the products
    is compiled too, and a last-bit difference there can move a value across a rounding boundary of the
    8-bit levels (measured on the OPT-125m preset: equal tokens at 3 rows, 98-99.6% at 8), so agreement,
    not equality, with the eager path."""
    _, d = hf_opt_dir
    torch._dynamo.reset()
    eager = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True)
    model = fast.compile_decoding(fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True), 3)
    pixels = pixel_batch(3, seed=7)
    ids, mask = prompts_with_images(OPT_PROMPTS)
    want = eager.generate(pixels, ids, mask, max_new_tokens=8, min_new_tokens=8)[:, ids.shape[1]:]
    got = model.generate(pixels, ids, mask, max_new_tokens=8, min_new_tokens=8)[:, ids.shape[1]:]
    assert (got == want).float().mean().item() >= 0.9


# -- compiled decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_step_tokens_equal_plain_eager_backend(case, batch):
    """The compile wiring (static shapes, caches as graph inputs, no recompiles) with the cheap "eager"
    backend, for both language models, with the weights laid out for one row (plain) or several (blip2's
    blocked layout on CPU where the kernels load, else oneDNN's packed one)."""
    text, d, plain = case
    torch._dynamo.reset()
    model = fast.compile_decoding(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d)), batch, backend="eager", fullgraph=True)
    want_format = "dense" if batch == 1 else decode_format(plain.language_projection.weight)
    assert fused_format(model.language_model) == want_format
    pixels = pixel_batch(3, seed=7)
    ids, mask = inputs(text)
    want = plain.generate(pixels, ids, mask, max_new_tokens=8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = model.generate(pixels, ids, mask, max_new_tokens=8)
    assert got.tolist() == want.tolist()


def test_compiled_steps_of_two_models_stay_apart(case):
    """The compiled step skips dynamo's guards on the model's modules: a step compiled for one model must
    not run for another (float and int8 here), and fuse/unfuse put the eager step back."""
    text, d, plain = case
    torch._dynamo.reset()
    pixels = pixel_batch(3, seed=7)
    ids, mask = inputs(text)
    float_model = fast.compile_decoding(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d)), backend="eager")
    int8_model = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d))
    int8_want = int8_model.generate(pixels, ids, mask, max_new_tokens=8)
    fast.compile_decoding(int8_model, backend="eager")
    assert float_model.generate(pixels, ids, mask, max_new_tokens=8).tolist() == \
        plain.generate(pixels, ids, mask, max_new_tokens=8).tolist()
    assert int8_model.generate(pixels, ids, mask, max_new_tokens=8).tolist() == int8_want.tolist()
    lm = float_model.language_model
    assert lm.decode_step != lm._decode_step
    fast.unfuse(float_model)
    assert lm.decode_step == lm._decode_step
    fast.compile_decoding(fast.fuse(lm), backend="eager")
    fast.fuse(fast.unfuse(lm))
    assert lm.decode_step == lm._decode_step



def test_compile_on_a_torch_without_graph_isolation(case, monkeypatch):
    """torch before 2.13 has no ``torch.compile(isolate_recompiles=...)`` (found on a GPU machine with
    torch 2.11, where compile() raised TypeError): there the module guards stay and the keyword is not
    passed; the compiled step still gives the plain tokens."""
    import blip2.fast.decoding as fused

    text, d, plain = case
    torch._dynamo.reset()
    seen = []
    real = torch.compile

    def old_compile(fn, **kwargs):
        seen.append(kwargs)
        assert "isolate_recompiles" not in kwargs and "guard_filter_fn" not in kwargs.get("options", {})
        return real(fn, **kwargs)

    monkeypatch.setattr(fused, "_can_isolate_graphs", lambda: False)
    monkeypatch.setattr(torch, "compile", old_compile)
    model = fast.compile_decoding(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d)), backend="eager")
    assert len(seen) == 1
    pixels = pixel_batch(3, seed=7)
    ids, mask = inputs(text)
    assert model.generate(pixels, ids, mask, max_new_tokens=8).tolist() == \
        plain.generate(pixels, ids, mask, max_new_tokens=8).tolist()

@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_step_tokens_equal_plain_inductor(hf_opt_dir, batch):
    """A real inductor compile (a C++ build: about a minute here) of the fused OPT step, laid out for one
    row (streamed plain weights) or several (oneDNN's packed ones, called from the compiled graph)."""
    _, d = hf_opt_dir
    torch._dynamo.reset()
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    model = fast.compile_decoding(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d)), batch)
    pixels = pixel_batch(3, seed=7)
    ids, mask = prompts_with_images(OPT_PROMPTS)
    want = plain.generate(pixels, ids, mask, max_new_tokens=8)
    assert model.generate(pixels, ids, mask, max_new_tokens=8).tolist() == want.tolist()


# -- blip2.apps.bench ------------------------------------------------------------------------------


def test_bytes_read_per_token_follow_the_weight_format(hf_opt_dir, capsys):
    from blip2.apps.bench import decode_bytes_per_token, main

    _, d = hf_opt_dir
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    sd = plain.state_dict()
    # the decoder layers, the final norm and the head (tied to the embeddings: that matrix once)
    want = sum(v.numel() * 4 for k, v in sd.items()
               if k.startswith(tuple(f"language_model.model.decoder.{m}." for m in
                                     ("layers", "final_layer_norm", "embed_tokens"))))
    assert decode_bytes_per_token(plain) == want
    # a layout change reads the same bytes; the blocked layout (CPU) pads each matrix to whole blocks of 16
    # outputs: 2% more on this tiny model, nothing on real ones (their widths are multiples of 16)
    fused = decode_bytes_per_token(fast.fuse(plain))
    assert want <= fused <= 1.025 * want
    if fused_format(plain.language_model) != "blocked":
        assert fused == want
    quant = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d))
    assert decode_bytes_per_token(quant) < 0.35 * want  # int8 weights, fp32 biases, norms and scales
    dynamic = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d), dynamic=True)
    # the packed int8 weights live inside the kernel's objects, counted all the same
    assert 0.25 * want < decode_bytes_per_token(dynamic) < 0.35 * want
    assert main(["--model", d, "--fast", "int8", "--batch", "2", "--new-tokens", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert f"read per token {decode_bytes_per_token(quant) / 1e3:.0f} kB" in out
    assert "captioning, batch 2, 3 new tokens" in out


def test_t5_bytes_read_per_token_leave_out_the_cross_attention_keys_and_values(hf_t5_dir):
    """A T5 step reads the decoder's weights but not cross-attention's k/v (projected once per image), plain
    or fused (where k and v are one fused layer)."""
    from blip2.apps.bench import decode_bytes_per_token

    plain = Blip2ForConditionalGeneration.from_pretrained(hf_t5_dir[1])
    sd = plain.state_dict()
    want = sum(v.numel() * 4 for k, v in sd.items()
               if k.startswith(("language_model.decoder.block.", "language_model.decoder.final_layer_norm.",
                                "language_model.lm_head.")) and ".EncDecAttention.k." not in k
               and ".EncDecAttention.v." not in k)
    assert decode_bytes_per_token(plain) == want
    fused = decode_bytes_per_token(fast.fuse(plain))
    assert want <= fused <= 1.025 * want


@pytest.mark.slow
def test_compiled_int8_batch_uses_the_int8_kernel(hf_opt_dir):
    """Several rows in a compiled int8 step go through the same int8 kernel as eager: the same tokens."""
    _, d = hf_opt_dir
    torch._dynamo.reset()
    eager = fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d))
    model = fast.compile_decoding(fast.quantize_int8(Blip2ForConditionalGeneration.from_pretrained(d)))
    pixels = pixel_batch(3, seed=7)
    ids, mask = prompts_with_images(OPT_PROMPTS)
    want = eager.generate(pixels, ids, mask, max_new_tokens=6)
    assert model.generate(pixels, ids, mask, max_new_tokens=6).tolist() == want.tolist()
