"""The vision encoder's bf16 self-attention through the native kernel (blip2.fast.attention): the kernel's error
against an fp32 reference is torch's own, views of a fused qkv give the contiguous result bit for bit, bad input
is refused by name; routed models call it for bf16 inference only, and undoing the speed-ups puts the class
back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from blip2 import Blip2ForConditionalGeneration, fast
from blip2.fast import attention, kernels
from blip2.fast.linear import walk
from blip2.models.layers import record_attention_weights
from blip2.models.vision import Blip2Attention
from conftest import hf_blip2, pixel_batch

HERE = kernels.load() and kernels.blocked_supports(torch.bfloat16)
pytestmark = pytest.mark.skipif(not HERE, reason="needs the native kernels with AVX-512 BF16")
OP = "blip2_kernels::many_query_attention"


def views(B, H, L, D, seed=0):
    """q, k, v [B, H, L, D] bf16 as a vision encoder makes them: strided views of one fused qkv."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(torch.bfloat16)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def heads_side_by_side(o):
    B, H, L, D = o.shape
    return o.transpose(1, 2).reshape(B, L, H * D)


@pytest.mark.parametrize("shape", [(2, 3, 37, 22), (1, 2, 5, 21), (2, 16, 257, 88), (1, 1, 1, 2)])
def test_the_kernel_errs_as_torch_does(shape):
    q, k, v = views(*shape)
    scale = shape[3] ** -0.5
    exact = heads_side_by_side(F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    torch_err = (heads_side_by_side(F.scaled_dot_product_attention(q, k, v)).float() - exact).abs().max()
    ours = kernels.many_query_attention(q, k, v, scale)
    assert ours.shape == (shape[0], shape[2], shape[1] * shape[3]) and ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() <= 1.5 * torch_err + 1e-6
    # the layout of the inputs changes nothing
    assert torch.equal(kernels.many_query_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale), ours)


def test_the_kernel_refuses_what_it_does_not_take():
    q, k, v = views(1, 2, 5, 8)
    with pytest.raises(RuntimeError, match="bfloat16 CPU tensors"):
        kernels.many_query_attention(q.float(), k.float(), v.float(), 0.3)
    with pytest.raises(RuntimeError, match=r"\[B, H, L, D\] of one shape"):
        kernels.many_query_attention(q, k[:, :, :4], v, 0.3)
    with pytest.raises(RuntimeError, match="scale must be positive"):
        kernels.many_query_attention(q, k, v, 0.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision_attention")
    hf_blip2("opt", seed=5).save_pretrained(d)
    return str(d)


def kernel_calls(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key == OP)


def test_a_routed_vision_encoder_runs_the_kernel_for_bf16_inference_only(checkpoint):
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, fast="none")
    vision = model.vision_model
    pixels = pixel_batch(3)
    with torch.no_grad():
        plain = vision(pixels).last_hidden_state
        with record_attention_weights([]):
            plain_recorded = vision(pixels).last_hidden_state
    keys = list(model.state_dict())
    assert attention.route(model) == len(vision.encoder.layers)
    assert all(type(m) is attention.KernelAttention for m in walk(vision) if isinstance(m, Blip2Attention))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        routed, calls = kernel_calls(lambda: vision(pixels).last_hidden_state)
    assert calls == len(vision.encoder.layers)  # one kernel call per layer: it ran
    # torch's own rounding scheme (at this size the same bits, at ViT-g's within a bf16 step: the kernel test)
    assert (routed.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()
    # gradients, recorded attention weights, fp32: the model's own attention, bit for bit
    out, calls = kernel_calls(lambda: vision(pixels).last_hidden_state)
    assert calls == 0 and torch.equal(out.detach(), plain)
    with torch.no_grad(), record_attention_weights([]) as weights:
        out, calls = kernel_calls(lambda: vision(pixels).last_hidden_state)
    assert calls == 0 and torch.equal(out, plain_recorded) and len(weights) == len(vision.encoder.layers)
    model.float()
    with torch.no_grad():
        out, calls = kernel_calls(lambda: vision(pixels).last_hidden_state)
    assert calls == 0
    # undoing the speed-ups puts the model's own class back
    fast.unfuse(model)
    assert not attention.routed(model)


def test_auto_routes_where_it_pays(checkpoint, monkeypatch):
    model = Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, fast="none")
    monkeypatch.setattr(attention, "pays", lambda: False)
    fast.route(model, auto=True)
    assert not attention.routed(model)
    monkeypatch.setattr(attention, "pays", lambda: True)
    fast.route(model, auto=True)
    assert attention.routed(model.vision_model)


def test_native_routes_the_attention_of_the_towers_it_packs(checkpoint, monkeypatch):
    monkeypatch.setattr(attention, "pays", lambda: True)
    model = fast.native(Blip2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.bfloat16, fast="none"))
    assert attention.routed(model.vision_model)
    with torch.no_grad():
        _, calls = kernel_calls(lambda: model.vision_model(pixel_batch(2)))
    assert calls == len(model.vision_model.encoder.layers)
    fast.unfuse(model)
    assert not attention.routed(model)
