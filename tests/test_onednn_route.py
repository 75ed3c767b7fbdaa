"""blip2.fast.route: the fp32 products of a model's own weights through oneDNN, by swapping the layers' class
(blip2.fast.onednn); what ``auto`` runs as loaded is routed where that pays, and undoing the speed-ups puts the
classes back."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import blip2.fast.lazy as lazy
from blip2 import Blip2ForConditionalGeneration, fast
from blip2.fast import onednn
from blip2.fast.linear import FusedLinear, walk
from conftest import hf_blip2, pixel_batch, prompts_with_images

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

ONEDNN = "mkldnn::_linear_pointwise"


def onednn_calls(fn):
    """fn()'s result and how many oneDNN products it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == ONEDNN)


def linears(model: nn.Module) -> dict[str, list[type]]:
    """The classes of the linear layers of each part, found without the guarded walks."""
    parts = {"vision": model.vision_model, "qformer": model.qformer, "lm": model.language_model}
    return {k: [type(m) for m in walk(p) if isinstance(m, (nn.Linear, FusedLinear))] for k, p in parts.items()}


@pytest.fixture
def any_size(monkeypatch):
    """Layers of any size are routed (the tiny models' are all below ``MIN_WEIGHTS``)."""
    monkeypatch.setattr(onednn, "MIN_WEIGHTS", 0)


@pytest.fixture
def pays(any_size, monkeypatch):
    """Routing pays (an AMD CPU with MKL), whatever this machine is."""
    monkeypatch.setattr(onednn, "pays", lambda: True)


@pytest.fixture(scope="module", params=["opt", "t5"])
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"route_{request.param}")
    hf_blip2(request.param, seed=4).save_pretrained(d)
    return request.param, str(d)


def inputs(text: str, n: int = 2) -> dict:
    if text == "opt":
        ids, mask = prompts_with_images([[2, 10, 11], [2, 20, 21]][:n])
        return dict(pixel_values=pixel_batch(n, seed=6), input_ids=ids, attention_mask=mask)
    return dict(pixel_values=pixel_batch(n, seed=6))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (64,), (0, 64), "transposed"])
def test_a_routed_layer_is_the_same_layer_with_onednn_products(shape, bias, any_size):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=bias)
    plain = nn.Linear(64, 48, bias=bias)
    plain.load_state_dict(layer.state_dict())
    params = list(layer.parameters())
    x = torch.randn(64, 5).t() if shape == "transposed" else torch.randn(*shape)
    assert onednn.route(layer) == 1 and type(layer) is onednn.OneDNNLinear and onednn.routed(layer)
    assert list(layer.parameters()) == params and isinstance(layer, nn.Linear)  # the very parameters
    assert layer.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        got, calls = onednn_calls(lambda: layer(x))
        want = plain(x)
    assert got.shape == want.shape and calls == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    onednn.unroute(layer)
    assert type(layer) is nn.Linear and not onednn.routed(layer)


def test_small_layers_stay_with_f_linear():
    """Below ``MIN_WEIGHTS`` oneDNN's call costs more than it wins: such layers are not routed."""
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(1024, 512), nn.Linear(512, 1024, bias=False))
    assert onednn.MIN_WEIGHTS == 512 * 1024 and onednn.route(model) == 2
    assert [type(m) for m in model] == [nn.Linear, onednn.OneDNNLinear, onednn.OneDNNLinear]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors", "ignore:`torch.jit.trace")
def test_what_a_routed_layer_leaves_to_f_linear(any_size):
    """Gradients, bf16, an empty input dimension: F.linear's own results, bit for bit."""
    torch.manual_seed(1)
    layer, plain = nn.Linear(32, 16), nn.Linear(32, 16)
    plain.load_state_dict(layer.state_dict())
    onednn.route(layer)
    x = torch.randn(4, 32)
    (got, calls) = onednn_calls(lambda: layer(x))  # gradients enabled, the weight requires them
    got.square().sum().backward()
    plain(x).square().sum().backward()
    assert calls == 0 and torch.equal(layer.weight.grad, plain.weight.grad)
    bf = layer.to(torch.bfloat16)
    assert type(bf) is onednn.OneDNNLinear
    with torch.no_grad():
        xb = x.bfloat16()
        got, calls = onednn_calls(lambda: bf(xb))
        assert calls == 0 and torch.equal(got, F.linear(xb, bf.weight, bf.bias))
        empty = onednn.OneDNNLinear(0, 3)
        assert torch.equal(empty(torch.randn(2, 0)), empty.bias.expand(2, 3))
    assert pickle.loads(pickle.dumps(layer)).weight.dtype == torch.bfloat16  # a class of the package's
    big = nn.Linear(16, 8)
    onednn.route(big)
    big.eval().requires_grad_(False)
    exported = torch.export.export(big, (torch.randn(2, 16),)).graph
    traced = torch.jit.trace(big, torch.randn(2, 16)).graph
    for graph in (str(exported), str(traced)):  # torch's own op, which exporters know
        assert "mkldnn" not in graph and "linear" in graph


def test_auto_routes_the_towers_and_lays_out_the_language_model(checkpoint, pays):
    text, d = checkpoint
    want = Blip2ForConditionalGeneration.from_pretrained(d, fast="none").generate(**inputs(text), max_new_tokens=8)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    got, calls = onednn_calls(lambda: model.generate(**inputs(text), max_new_tokens=8))
    assert torch.equal(got, want)
    kinds = linears(model)
    assert set(kinds["vision"]) == set(kinds["qformer"]) == {onednn.OneDNNLinear}
    assert FusedLinear in kinds["lm"] and onednn.OneDNNLinear not in kinds["lm"]
    assert calls >= len(kinds["vision"]) + len(kinds["qformer"]) - 1  # (the Q-Former's text FFN is not run)
    model.parameters()  # the plain modules: every class back
    assert {c for k in linears(model).values() for c in k} == {nn.Linear}


def test_a_large_model_runs_as_loaded_through_onednn(checkpoint, pays, monkeypatch):
    """Past ``LATER_BYTES``: one row decodes natively on the weights as loaded and everything else (vision
    encoder, Q-Former, the prefill) is routed, guarded; a first call of several rows runs routed and eager; its
    next lays the language model out. The plain tokens throughout; releasing leaves no routed class."""
    text, d = checkpoint
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    want_one, want_two = (plain.generate(**inputs(text, n), max_new_tokens=8) for n in (1, 2))
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    lm = model.language_model
    got, calls = onednn_calls(lambda: model.generate(**inputs(text, 1), max_new_tokens=8))
    assert torch.equal(got, want_one) and lm.decode_step != lm._decode_step
    kinds = linears(model)
    assert {c for k in kinds.values() for c in k} == {onednn.OneDNNLinear}
    # each layer once (the prefill: OPT's prompt, T5's encoder and first decoder token; the decoder's one-row
    # steps run natively), and the language projection, which is no part's
    assert calls == sum(map(len, kinds.values())) + 1
    model.train()
    assert {c for k in linears(model).values() for c in k} == {nn.Linear}
    model.eval()
    got, calls = onednn_calls(lambda: model.generate(**inputs(text), max_new_tokens=8))  # several rows: eager
    assert torch.equal(got, want_two) and {c for c in linears(model)["lm"]} == {onednn.OneDNNLinear}
    assert calls > 8 * len(linears(model)["lm"]) // 2  # the eager steps' products too
    assert torch.equal(model.generate(**inputs(text), max_new_tokens=8), want_two)  # laid out now
    kinds = linears(model)
    assert FusedLinear in kinds["lm"] and set(kinds["vision"]) == {onednn.OneDNNLinear}
    fast.unfuse(model)
    assert {c for k in linears(model).values() for c in k} == {nn.Linear}


def test_route_refuses_what_the_speed_ups_do_not_cover(checkpoint):
    peft = pytest.importorskip("peft")
    text, d = checkpoint
    model = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    targets = ["q_proj", "v_proj"] if text == "opt" else ["q", "v"]
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    with pytest.raises(fast.Unsupported, match="PEFT adapter"):
        fast.route(tuned.base_model.model)
    assert not onednn.routed(model)


def test_auto_routes_nothing_where_it_does_not_pay(checkpoint, monkeypatch):
    """Where MKL is at home (an Intel CPU) or unmeasured, ``auto`` keeps torch's own fp32 products."""
    text, d = checkpoint
    monkeypatch.setattr(onednn, "pays", lambda: False)
    for later in (1 << 40, 0):  # a small language model (laid out at once), a large one (one row as loaded)
        monkeypatch.setattr(lazy, "LATER_BYTES", later)
        model = Blip2ForConditionalGeneration.from_pretrained(d)
        model.generate(**inputs(text, 1), max_new_tokens=4)
        model.generate(**inputs(text), max_new_tokens=4)
        assert not onednn.routed(model)
    assert onednn.route(nn.Linear(1024, 512)) == 1  # asked for, it routes anyway


def test_route_by_hand_keeps_the_logits_and_the_state_dict(checkpoint, any_size):
    text, d = checkpoint
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    model = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    n = sum(1 for m in model.modules() if type(m) is nn.Linear)
    assert fast.route(model) is model and sum(type(m) is onednn.OneDNNLinear for m in model.modules()) == n > 0
    x = inputs(text)
    if text == "t5":
        ids = torch.tensor([[11, 12, 1], [21, 22, 1]])
        x.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    with torch.no_grad():
        got, calls = onednn_calls(lambda: model(**x).logits)
        want = plain(**x).logits
    assert calls >= n - 2  # every product the forward runs (not the Q-Former's text FFN)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    sd, want_sd = model.state_dict(), plain.state_dict()
    assert sd.keys() == want_sd.keys() and all(torch.equal(sd[k], want_sd[k]) for k in sd)
    fast.unfuse(model)
    assert not onednn.routed(model)


def test_a_retrieval_pipeline_routes_where_it_pays(tiny_retrieval_dir, pays, monkeypatch):
    """A retrieval checkpoint has no generate to lay it out: ``Pipeline.load`` routes it (``fast="auto"``), with
    the scores of the plain model."""
    from PIL import Image

    from blip2.apps.pipeline import Pipeline

    routed, plain = (Pipeline.load(tiny_retrieval_dir, device="cpu", fast=f) for f in ("auto", "none"))
    assert onednn.routed(routed.model) and not onednn.routed(plain.model)
    image = Image.fromarray((pixel_batch(1, seed=9)[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy())
    got, calls = onednn_calls(lambda: routed.match(image, ["w5 w6", "w10"]))
    want = plain.match(image, ["w5 w6", "w10"])
    assert calls > 0
    for g, w in zip(got, want):
        assert g.text == w.text and g.itm == pytest.approx(w.itm, abs=1e-5) and g.itc == pytest.approx(w.itc, abs=1e-5)
    monkeypatch.setattr(onednn, "pays", lambda: False)
    assert not onednn.routed(Pipeline.load(tiny_retrieval_dir, device="cpu").model)
