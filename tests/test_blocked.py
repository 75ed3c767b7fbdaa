"""The blocked-layout product (blip2.fast.kernels.blocked_linear) and the "blocked" weight format the language
models use on CPU: layout round trips, sums against float64 for every row count the kernel treats apart,
thread independence, refusals, and the format's place in fuse()/compile()/unfuse() and the state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blip2 import Blip2ForConditionalGeneration
from blip2.fast import kernels
from blip2.fast.linear import FusedLinear, decode_format, fused_format
from conftest import pixel_batch, prompts_with_images
from test_kernels import needs_kernel
from blip2 import fast


@pytest.fixture(scope="module")
def loaded():
    assert kernels.load(), kernels.status()


def _dtypes():
    return [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        "avx512_bf16" not in kernels.cpu_flags(), reason="bf16 blocked weights need AVX-512 BF16"))]


# (rows, N, K): one row, fewer rows than a register tile (8), a tile and one more, many rows (the prefill
# path: several tiles of rows, K cut in slices of 1024), N not a multiple of the 16-column block, odd K
# (bf16 pairs k: one zero pads), N = 1
CASES = [(1, 37, 19), (3, 100, 64), (8, 2304, 96), (9, 50, 33), (40, 70, 2100), (264, 130, 768), (5, 1, 1)]


@needs_kernel
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (16, 4), (17, 5), (100, 33)])
def test_block_weight_round_trip(loaded, dtype, n, k):
    w = torch.randn(n, k).to(dtype)
    b = kernels.block_weight(w)
    nb = -(-n // 16)
    assert b.shape == ((nb, k, 16) if dtype == torch.float32 else (nb, -(-k // 2), 16, 2))
    assert b.is_contiguous()
    assert torch.equal(kernels.unblock_weight(b, n, k), w)
    if dtype == torch.float32:  # the layout itself: block j // 16, step k, column j % 16
        j = n - 1
        assert torch.equal(b[j // 16, :, j % 16], w[j])
    ones = kernels.block_weight(torch.ones(n, k, dtype=dtype))
    assert ones.float().sum() == n * k  # the padding is zeros


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (15, 3), (16, 4), (17, 5), (100, 33), (64, 2048), (40, 2560)])
def test_the_native_layout_is_the_python_one(loaded, monkeypatch, dtype, n, k):
    """block_weight's C++ copy (blocked::block_weight_into, either dtype, on any CPU the kernels build on) lays
    out the same bytes as the strided copies in Python, padding rows and bf16's odd column zero."""
    w = torch.randn(n, k).to(dtype)
    native = kernels.block_weight(w)
    monkeypatch.setattr(kernels, "_loaded", False)  # the Python copies
    assert torch.equal(native, kernels.block_weight(w))
    # the C++ copy writes every element: into memory that is not zero, the same bytes
    out = torch.full(kernels.blocked_shape(n, k, dtype), 7.0, dtype=dtype)
    torch.ops.blip2_kernels.block_weight_into(w, out)
    assert torch.equal(out, native)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        torch.ops.blip2_kernels.block_weight_into(w, torch.empty(1, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes,k", [([32, 16, 48], 24), ([16, 7], 5), ([10, 7], 6), ([48], 3)])
def test_parts_blocked_in_pieces_equal_their_concatenation_blocked(dtype, sizes, k):
    """A fused weight is blocked part by part and a few rows at a time straight into the result (no concatenation
    where the parts fill whole blocks): the same bytes as blocking the concatenation, padding zero."""
    from blip2.fast.linear import _block

    parts = [torch.randn(n, k).to(dtype) for n in sizes]
    want = kernels.block_weight(torch.cat(parts))
    got = _block([p.clone() for p in parts], release=True, dtype=dtype, piece_bytes=16 * k * 2)  # a block or two
    assert got.shape == kernels.blocked_shape(sum(sizes), k, dtype) and torch.equal(got, want)
    assert torch.equal(kernels.unblock_weight(got, sum(sizes), k), torch.cat(parts))
    with pytest.raises(ValueError, match="out"):
        kernels.block_weight(parts[0], torch.empty(1, 1, 16, dtype=dtype))
    # fp32 parts laid out in ``dtype`` (a load that left the file's dtype to the layout): converted as .to() does
    wide = [torch.randn(n, k) for n in sizes]
    got = _block([p.clone() for p in wide], release=True, dtype=dtype, piece_bytes=16 * k * 4)
    assert torch.equal(got, kernels.block_weight(torch.cat(wide).to(dtype)))


@needs_kernel
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("rows,n,k", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_blocked_linear_equals_float64(loaded, dtype, rows, n, k, with_bias):
    g = torch.Generator().manual_seed(rows * 31 + n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(2, rows, k, generator=g).to(dtype)[1]  # a view: the kernel takes any layout of x
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    assert kernels.blocked_supports(dtype)
    y = kernels.blocked_linear(x, kernels.block_weight(w), bias, n)
    assert y.shape == (rows, n) and y.dtype == dtype
    want = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    if dtype == torch.float32:
        # fp32 sums: a few ulps of the largest term's size
        scale = (x.double().abs() @ w.double().abs().T).max()
        assert (y.double() - want).abs().max() <= 1e-6 * scale
    else:
        # bf16 products are exact in fp32, the sum is fp32 (a few ulps of the largest term), rounded once:
        # within one bf16 step of the exact sum rounded to bf16, and equal to it almost everywhere
        exact = want.to(torch.bfloat16).float()
        fp32_sum = 1e-6 * (x.double().abs() @ w.double().abs().T).float()
        step = exact.abs() * 2.0 ** -7 + fp32_sum
        assert ((y.float() - exact).abs() <= step).all()
        assert (y.float() == exact).float().mean() >= 0.95


@needs_kernel
def test_blocked_linear_keeps_leading_dims_and_empty_batches(loaded):
    w = torch.randn(40, 24)
    b = kernels.block_weight(w)
    x = torch.randn(2, 3, 24)
    y = kernels.blocked_linear(x, b, None, 40)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, x @ w.T, atol=1e-5, rtol=1e-5)
    assert kernels.blocked_linear(torch.randn(0, 24), b, None, 40).shape == (0, 40)


@needs_kernel
@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("rows", [8, 100])
def test_blocked_linear_does_not_depend_on_the_threads(loaded, dtype, rows):
    """Each output is summed in the plain order of k whichever thread computes its block: bit-equal."""
    g = torch.Generator().manual_seed(11)
    w = kernels.block_weight(torch.randn(3000, 1500, generator=g).to(dtype))
    x = torch.randn(rows, 1500, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.blocked_linear(x, w, None, 3000)
        torch.set_num_threads(2)
        two = kernels.blocked_linear(x, w, None, 3000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_blocked_linear_refuses_what_it_does_not_take(loaded):
    w = kernels.block_weight(torch.randn(20, 8))
    x = torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="x is BFloat16 but the weight is Float"):
        kernels.blocked_linear(x.bfloat16(), w, None, 20)
    with pytest.raises(RuntimeError, match="x has 9 features, the weight 8"):
        kernels.blocked_linear(torch.randn(3, 9), w, None, 20)
    with pytest.raises(RuntimeError, match="40 outputs do not fit 2 blocks"):
        kernels.blocked_linear(x, w, None, 40)
    with pytest.raises(RuntimeError, match="must be a contiguous blocked weight"):
        kernels.blocked_linear(x, torch.randn(20, 8), None, 20)
    with pytest.raises(RuntimeError, match="bias must be a contiguous float32/bfloat16 CPU tensor of 20"):
        kernels.blocked_linear(x, w, torch.randn(19), 20)
    with pytest.raises(ValueError, match="block_weight: expected a float32/bfloat16"):
        kernels.block_weight(torch.randn(4, 4).half())


# -- the "blocked" format ------------------------------------------------------------------------------


@needs_kernel
def test_fused_linear_blocked_format(loaded):
    layers = [nn.Linear(24, 10), nn.Linear(24, 7, bias=False)]
    weights = [layer.weight.detach().clone() for layer in layers]
    x = torch.randn(5, 24)
    with torch.no_grad():
        want = torch.cat([layer(x) for layer in layers], -1)
    fused = FusedLinear(layers, "blocked")  # the layers' own tensors emptied: the fused one holds their values
    assert all(layer.weight.numel() == 0 for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)
    # the plain weights come back exactly (a permutation), the padding to 32 outputs is not in them
    assert torch.equal(fused.part(0)[0], weights[0]) and torch.equal(fused.part(1)[0], weights[1])
    assert fused.part(1)[1] is None
    # with gradients on, a differentiable fallback
    xg = x.clone().requires_grad_()
    fused(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.cat(weights).sum(0).expand(5, -1))
    assert fused.to_linear(0) is layers[0] and torch.equal(layers[0].weight, weights[0])  # the same layer back
    with pytest.raises(ValueError, match="blocked format needs"):
        FusedLinear([nn.Linear(4, 4).half()], "blocked")


@needs_kernel
def test_language_models_fuse_blocked_and_tied_heads_tie_again(loaded, hf_opt_dir):
    """On CPU with the kernels, fuse() lays the language model out blocked (the vision encoder and Q-Former
    keep oneDNN's layout); OPT's head tied to the embeddings gets a blocked copy that writes the head's key
    as the tied model does, and unfuse() ties it to the embedding again."""
    _, d = hf_opt_dir
    plain = Blip2ForConditionalGeneration.from_pretrained(d)
    lm = plain.language_model
    assert lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    want = plain.state_dict()
    model = fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d))
    assert decode_format(lm.lm_head.weight) == "blocked"
    assert fused_format(model.language_model) == "blocked"
    assert fused_format(model.vision_model) == fused_format(model.qformer) != "blocked"
    head = model.language_model.lm_head
    assert isinstance(head, FusedLinear) and head.tied and head.fmt == "blocked"
    got = model.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())
    pixels = pixel_batch(3, seed=4)
    ids, mask = prompts_with_images([[2, 11, 12, 13], [2, 21], [2, 31, 32]])
    assert model.generate(pixels, ids, mask, max_new_tokens=6).tolist() == \
        plain.generate(pixels, ids, mask, max_new_tokens=6).tolist()
    fast.unfuse(model)
    lm = model.language_model
    assert isinstance(lm.lm_head, nn.Linear) and lm.lm_head.weight is lm.model.decoder.embed_tokens.weight
    # compile(batch > 1) and native() keep the blocked layout; compile(1) re-fuses plain for the one-row step
    assert fused_format(fast.compile_decoding(model, 3, backend="eager").language_model) == "blocked"
    assert fused_format(fast.compile_decoding(model, 1, backend="eager").language_model) == "dense"
    assert fused_format(fast.native(model).language_model) == "blocked"


def test_without_the_kernels_fuse_falls_back_to_onednn(tmp_path):
    """Where the kernels cannot load (here: BLIP2_KERNELS=0), fuse() lays the language model out in oneDNN's
    format and decodes as before, and native() says why it cannot run (a fresh process: load() is once
    per process)."""
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from blip2.config import OPTConfig
        from blip2 import fast
        from blip2.fast.linear import fused_format
        from blip2.fast.native import Unsupported
        from blip2.models.opt import OPTForCausalLM
        torch.manual_seed(0)
        lm = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                      num_attention_heads=4, max_position_embeddings=32)).eval()
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            want = lm(x)
            got = fast.fuse(lm)(x)
        print(fused_format(lm), bool(torch.allclose(got, want, atol=1e-5)))
        try:
            fast.native(fast.unfuse(lm))
        except Unsupported as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BLIP2_KERNELS": "0"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "onednn True"
    assert lines[1] == "refused: blip2.fast.kernels is not loaded: disabled by BLIP2_KERNELS"
