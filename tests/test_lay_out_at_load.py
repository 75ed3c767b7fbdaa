"""A load that converts a large language model lays it out at once (blip2.fast.lazy.deferred): each weight goes
from the file's pages straight into the blocked layout in the dtype asked for, instead of being converted at load
and laid out again at the second generate of several rows. The model then is what "auto" makes of a model loaded
plainly: the same blocked weights bit for bit, the same scores, the plain state dict and parameters."""

from __future__ import annotations

import pytest
import torch

import blip2.fast.lazy as lazy
from blip2 import Blip2ForConditionalGeneration, fast
from blip2.fast import kernels
from blip2.fast.linear import FusedLinear, walk
from conftest import count_calls, hf_blip2, pixel_batch, prompts_with_images

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"needs the native kernels: {kernels.status()}")

# (stored, loaded): fp32 files in bf16, as users load the published checkpoints (blocked bf16 needs AVX-512 BF16);
# bf16 files in fp32, which every CPU the kernels build on lays out
DIRECTIONS = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.fixture(scope="module", params=[(t, s, d) for t in ("opt", "t5") for s, d in DIRECTIONS],
                ids=lambda p: f"{p[0]}-{str(p[1])[6:]}-in-{str(p[2])[6:]}")
def checkpoint(request, tmp_path_factory):
    text, stored, dtype = request.param
    if not kernels.blocked_supports(dtype):
        pytest.skip(f"no blocked {dtype} kernels on this CPU")
    d = tmp_path_factory.mktemp(f"at_load_{text}")
    hf_blip2(text, seed=3).to(stored).save_pretrained(d)
    return text, str(d), dtype


def inputs(text: str, dtype: torch.dtype, rows: int = 2) -> dict:
    pixels = pixel_batch(2, seed=5).to(dtype)[:rows]
    if text == "opt":
        ids, mask = prompts_with_images([[2, 10, 11], [2, 20, 21]])
        return dict(pixel_values=pixels, input_ids=ids[:rows], attention_mask=mask[:rows])
    return dict(pixel_values=pixels)


def fused(model) -> list[FusedLinear]:
    return [m for m in walk(model.language_model) if isinstance(m, FusedLinear)]


def load(d: str, dtype: torch.dtype, **kwargs) -> Blip2ForConditionalGeneration:
    return Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype, **kwargs)


def scores(model, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model.generate(**kw, max_new_tokens=8, output_scores=True, return_dict_in_generate=True)
    return out.sequences, list(out.scores)


def assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True))


def test_a_converting_load_lays_the_language_model_out_once(checkpoint, monkeypatch):
    """Past ``LATER_BYTES``: laid out by ``from_pretrained`` in the dtype asked for, each weight blocked once (none
    converted to the plain layout first); the blocked weights, tokens and scores of every generate those of the
    same model laid out at its first generate (a small one, which lays out there), for several rows and one."""
    text, d, dtype = checkpoint
    reference = load(d, dtype)  # small: laid out at its first generate, from weights converted at load
    want_two, want_one = scores(reference, **inputs(text, dtype)), scores(reference, **inputs(text, dtype, rows=1))
    assert fused(reference)
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    blocks = count_calls(monkeypatch, fast.linear, "_block")
    model = load(d, dtype)
    layers = fused(model)
    assert layers and len(blocks) == len(layers)  # each laid out once, at load
    assert {m.dtype for m in layers} == {dtype} and all(m.fmt == "blocked" for m in layers)
    for mine, theirs in zip(layers, fused(reference), strict=True):
        assert torch.equal(mine.w, theirs.w) and (mine.b is None or torch.equal(mine.b, theirs.b))
    assert_same(scores(model, **inputs(text, dtype, rows=1)), want_one)
    assert_same(scores(model, **inputs(text, dtype)), want_two)
    assert {id(m) for m in fused(model)} == {id(m) for m in layers} and len(blocks) == len(layers)  # kept


def test_the_model_hands_back_the_plain_weights(checkpoint, monkeypatch):
    """The state dict, and the parameters that undo the layout, hold the values and dtypes a plain load gives
    (fast="none", which converts at load), bit for bit; the next generate lays out again."""
    text, d, dtype = checkpoint
    plain = load(d, dtype, fast="none")
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    model = load(d, dtype)
    assert fused(model)
    want, got = plain.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    params = dict(model.named_parameters())  # undoes the layout
    assert not fused(model)
    for name, p in plain.named_parameters():
        assert params[name].dtype == p.dtype and torch.equal(params[name], p), name
    model.generate(**inputs(text, dtype), max_new_tokens=2)
    model.generate(**inputs(text, dtype), max_new_tokens=2)
    assert fused(model)


def test_what_is_not_laid_out_is_converted_as_the_load_would(checkpoint, monkeypatch):
    """Where the native step does not take the model after all, the weights the load left in the files' dtype are
    converted then: every parameter as a plain load gives it, the model laid out by its generates as usual."""
    text, d, dtype = checkpoint
    plain = load(d, dtype, fast="none")
    monkeypatch.setattr(lazy, "LATER_BYTES", 0)

    def refuse(model, towers=True):
        raise fast.Unsupported("refused by the test")

    monkeypatch.setattr(lazy, "native", refuse)
    model = load(d, dtype)
    assert not fused(model)
    params = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        assert params[name].dtype == p.dtype and torch.equal(params[name], p), name
    monkeypatch.undo()
    want = plain.generate(**inputs(text, dtype, rows=1), max_new_tokens=8)
    assert torch.equal(model.generate(**inputs(text, dtype, rows=1), max_new_tokens=8), want)


@pytest.mark.parametrize("case", ["stored dtype", "fast none", "small", "converted copy"])
def test_loads_that_are_not_laid_out(checkpoint, monkeypatch, layout_cache_folder, case):
    """Nothing converted (the files' own dtype), fast="none", a language model at most ``LATER_BYTES``, and a
    load that maps the converted copy a first load wrote (blip2.converted: nothing converted) keep the weights as
    loaded; the copy holds the converted weights, so the later load's model is the plain one."""
    from blip2 import layout_files

    text, d, dtype = checkpoint
    monkeypatch.setattr(lazy, "LATER_BYTES", 1 << 30 if case == "small" else 0)
    kwargs = {"stored dtype": dict(dtype=None), "fast none": dict(fast="none")}.get(case, {})
    if case == "converted copy":
        assert fused(load(d, dtype))  # the first load lays out and writes the copy
        layout_files.wait()
        assert len(list(layout_cache_folder.glob("*.safetensors"))) == 1
    model = Blip2ForConditionalGeneration.from_pretrained(d, **{"dtype": dtype, **kwargs})
    assert not fused(model)
    if case == "converted copy":
        plain = load(d, dtype, fast="none")
        want = plain.state_dict()
        for name, t in model.state_dict().items():
            assert t.dtype == want[name].dtype and torch.equal(t, want[name]), name
