"""The native row-product kernel (blip2.fast.kernels): its sums against float64, its build and cache, the
fallback where it cannot be built, and compiled decoding at batch 1 calling it with the plain path's
tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2.fast import kernels
from conftest import pixel_batch, prompts_with_images
from blip2 import fast


def _cpu_can_build() -> bool:
    flags = kernels.cpu_flags()
    return sys.platform.startswith("linux") and kernels.cpu_supported(flags) and kernels._compiler() is not None


needs_kernel = pytest.mark.skipif(not _cpu_can_build(),
                                  reason="needs Linux x86-64 with AVX-512 F/BW or AVX2/FMA and a C++ compiler")


@pytest.fixture(scope="module")
def loaded():
    assert kernels.load(), kernels.status()
    assert kernels.ready() and kernels.status().startswith("loaded from ")


def _reference(x, w, scale, bias):
    y = (x.double().reshape(-1) * w.double()).sum(-1)
    if scale is not None:
        y = y * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y


def _weight(dtype, n, k, g):
    if dtype == torch.int8:
        return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return torch.randn(n, k, generator=g).to(dtype)


# shapes: fewer rows than streams, rows not a multiple of the 4 streams, K not a multiple of a vector (16
# fp32 / 32 bf16) nor of the unrolled pair, and a layer-sized one
SHAPES = [(1, 1), (3, 5), (7, 33), (130, 100), (1001, 768), (64, 3072)]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("shape", SHAPES)
def test_row_product_equals_float64(loaded, dtype, shape):
    n, k = shape
    g = torch.Generator().manual_seed(n * 7 + k)
    xdtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    w = _weight(dtype, n, k, g)
    x = torch.randn(1, 1, k, generator=g).to(xdtype)
    scale = torch.rand(n, generator=g) / 50 if dtype == torch.int8 else None
    bias = torch.randn(n, generator=g).to(xdtype)
    assert kernels.row_product_supports(x, w, scale, bias)
    y = kernels.row_product(x, w, scale, bias)
    assert y.shape == (1, 1, n) and y.dtype == xdtype
    want = _reference(x, w, scale, bias)
    if xdtype == torch.float32:
        # fp32 sums in another order: a few ulps of the largest term's size
        tol = 1e-6 * (x.double().abs().reshape(-1) * w.double().abs()).sum(-1).max() * (scale.max() if scale is not None else 1)
        assert (y.double().reshape(-1) - want).abs().max() <= tol
    else:
        # bf16 x and w: the products are exact in fp32, the sum is fp32, one rounding to bf16 at the end;
        # against the exact sum rounded to bf16, at most one bf16 step apart (a sum on a rounding boundary)
        got, exact = y.reshape(-1).float(), want.to(torch.bfloat16).float()
        step = exact.abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((got - exact).abs() <= step).all()
        assert (got == exact).float().mean() >= 0.95


@needs_kernel
def test_row_product_takes_bf16_scale_and_bias_and_bf16_rows_of_int8(loaded):
    g = torch.Generator().manual_seed(3)
    w = _weight(torch.int8, 50, 70, g)
    x = torch.randn(70, generator=g).bfloat16()  # a 1-D row; bf16 activations on int8 weights
    scale, bias = (torch.rand(50, generator=g) / 50).bfloat16(), torch.randn(50, generator=g).bfloat16()
    y = kernels.row_product(x, w, scale, bias)
    assert y.shape == (50,) and y.dtype == torch.bfloat16
    want = _reference(x, w, scale, bias).to(torch.bfloat16).float()
    assert ((y.float() - want).abs() <= want.abs() * 2.0 ** -7).all()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_row_product_does_not_depend_on_the_threads(loaded, dtype):
    """Each output is one row's sum in a fixed order, whichever thread computes it: bit-equal results."""
    g = torch.Generator().manual_seed(5)
    w = _weight(dtype, 4099, 520, g)
    x = torch.randn(520, generator=g).to(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    scale = torch.rand(4099, generator=g) if dtype == torch.int8 else None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.row_product(x, w, scale)
        torch.set_num_threads(2)
        two = kernels.row_product(x, w, scale)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_row_product_refuses_what_it_does_not_take(loaded):
    w = torch.randn(8, 16)
    x = torch.randn(16)
    assert kernels.row_product_supports(x, w)
    assert not kernels.row_product_supports(torch.randn(2, 16), w)  # two rows
    assert not kernels.row_product_supports(x, torch.randn(16, 8).t())  # not contiguous
    assert not kernels.row_product_supports(x.bfloat16(), w)  # bf16 x on fp32 weights
    assert not kernels.row_product_supports(x.half(), w.half())  # fp16
    assert not kernels.row_product_supports(x, w.to(torch.int8))  # int8 without its scale
    assert not kernels.row_product_supports(x, w, bias=torch.randn(7))  # a bias of the wrong size
    assert not kernels.row_product_supports(x, w, bias=torch.randn(8, dtype=torch.float64))
    # called anyway: an error that names the problem, from the op's own checks
    with pytest.raises(RuntimeError, match="one row of 16"):
        kernels.row_product(torch.randn(2, 16), w)
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        kernels.row_product(x, w.to(torch.int8))
    with pytest.raises(RuntimeError, match="unsupported weight"):
        kernels.row_product(x.bfloat16(), w)


def _load_in_subprocess(env: dict[str, str]) -> list[str]:
    """Runs ``kernels.load()`` in a fresh process (load is once per process) with ``env`` added; returns
    [ready, status, whether it built]."""
    code = textwrap.dedent("""
        import logging, sys
        built = []
        class Catch(logging.Handler):
            def emit(self, record):
                built.append("building" in record.getMessage())
        logging.getLogger("blip2.fast.kernels").addHandler(Catch())
        logging.getLogger("blip2.fast.kernels").setLevel(logging.INFO)
        from blip2.fast import kernels
        ok = kernels.load()
        print(ok, any(built), sep="\\n")
        print(kernels.status())
        if ok:
            import torch
            x, w = torch.ones(3), torch.ones(5, 3)
            print(kernels.row_product(x, w).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("\n")


@needs_kernel
def test_build_is_cached_per_machine(tmp_path):
    """The first process builds into the cache; the next loads the same file without building."""
    cache = tmp_path / "cache"
    first = _load_in_subprocess({"BLIP2_CACHE_DIR": str(cache)})
    assert first[:2] == ["True", "True"] and first[3] == "[3.0, 3.0, 3.0, 3.0, 3.0]"
    built = list((cache / "kernels").glob("blip2_kernels-*.so"))
    assert len(built) == 1 and first[2] == f"loaded from {built[0]}"
    stamp = built[0].stat().st_mtime_ns
    second = _load_in_subprocess({"BLIP2_CACHE_DIR": str(cache)})
    assert second[:2] == ["True", "False"] and second[2] == first[2]
    assert built[0].stat().st_mtime_ns == stamp
    # no temporary left behind; the library's hash beside it, and the folder private
    assert sorted(p.name for p in (cache / "kernels").iterdir()) == [built[0].name, built[0].name + ".sha256"]
    assert (cache / "kernels").stat().st_mode & 0o777 == 0o700


@needs_kernel
def test_unwritable_cache_builds_for_the_process(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = _load_in_subprocess({"BLIP2_CACHE_DIR": str(blocker / "cache")})  # a path below a file
    assert out[0] == "True" and "blip2-kernels-" in out[2]


def test_without_the_kernel_load_says_why(tmp_path):
    """No kernel is never an error: load() is False and status() says why (the callers then keep their
    portable paths)."""
    off = _load_in_subprocess({"BLIP2_KERNELS": "0"})
    assert off[:3] == ["False", "False", "disabled by BLIP2_KERNELS"]
    if not _cpu_can_build():
        return
    broken = _load_in_subprocess({"BLIP2_CACHE_DIR": str(tmp_path), "CXX": "false"})
    assert broken[0] == "False" and broken[2].startswith("the build or load failed: false exited with 1")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left in the cache


# -- compiled decoding at batch 1 -------------------------------------------------------------------------


def _kernel_calls(fn, name: str = "blip2_kernels::row_product") -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == name)


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("text,how", [("opt", "fp32"), ("opt", "bf16"), ("opt", "int8"), ("t5", "fp32")])
def test_compiled_batch_one_step_runs_the_kernel_with_the_plain_tokens(hf_opt_dir, hf_t5_dir, text, how):
    """A real inductor compile laid out for one row: every product of a decoding step is the kernel (one
    call per fused layer and the head), and the tokens are the eager model's. int8: the eager int8 path
    rounds activations to bf16, so the reference is the compiled step without the kernel (the compiled
    reduction, fp32 activations as the kernel)."""
    from conftest import IMAGE_TOKEN, NUM_QUERY

    d = (hf_opt_dir if text == "opt" else hf_t5_dir)[1]
    dtype = torch.bfloat16 if how == "bf16" else torch.float32
    if text == "opt":
        ids, mask = prompts_with_images([[2, 11, 12, 13]])
    else:
        ids = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY + [11, 12, 13, 1]])
        mask = torch.ones_like(ids)
    pixels = pixel_batch(1, seed=7).to(dtype)

    def build():
        m = Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype)
        return fast.quantize_int8(m) if how == "int8" else m

    torch._dynamo.reset()
    if how == "int8":
        kernels.load()
        kernels._loaded = False  # the reference: the same compiled step on the compiled reduction
        try:
            want = fast.compile_decoding(build(), 1, native=False).generate(pixels, ids, mask, max_new_tokens=8)
        finally:
            kernels._loaded = True
    else:
        want = build().generate(pixels, ids, mask, max_new_tokens=8)
    model = fast.compile_decoding(build(), 1, native=False)  # the compiled graph (compile(1) would run the native step)
    got = model.generate(pixels, ids, mask, max_new_tokens=8)
    assert got.tolist() == want.tolist()
    lm = model.language_model
    layers = lm.config.num_hidden_layers if text == "opt" else lm.config.num_decoder_layers
    # per step: OPT qkv, out, fc1, fc2 and the head; T5 self qkv, self out, cross q, cross out, wi, wo, head
    per_step = 4 * layers + 1 if text == "opt" else 6 * layers + 1
    # 8 new tokens, compiled already for this length: a prefill (several rows, eager) and 7 one-row steps
    calls = _kernel_calls(lambda: model.generate(pixels, ids, mask, max_new_tokens=8))
    assert calls == 7 * per_step


@needs_kernel
@pytest.mark.slow
def test_bench_says_the_one_row_step_is_native(hf_opt_dir, capsys):
    from blip2.apps.bench import main

    torch._dynamo.reset()
    assert main(["--model", hf_opt_dir[1], "--compile", "--batch", "1", "--new-tokens", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "decoding step: native (blip2.fast.kernels, the whole decoder in one call per token, one row" in out
    assert "decoding, batch 1:" in out and "captioning, batch 1, 3 new tokens" in out


@needs_kernel
def test_bf16_without_avx512_bf16_widens_to_fp32(tmp_path):
    """CPUs with AVX-512 but without its BF16 dot products take the widening path (bf16 -> fp32, fp32
    multiply-adds): built here with ``-mno-avx512bf16`` and checked against float64 in a fresh process
    (the op's name is taken in this one)."""
    lib = tmp_path / "widen.so"
    cmd = kernels._command(kernels._compiler(), kernels._SOURCE, lib) + ["-mno-avx512bf16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    code = textwrap.dedent(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        g = torch.Generator().manual_seed(0)
        for n, k in [(3, 5), (130, 100), (1001, 768)]:
            w = torch.randn(n, k, generator=g).bfloat16()
            x = torch.randn(1, k, generator=g).bfloat16()
            b = torch.randn(n, generator=g).bfloat16()
            y = torch.ops.blip2_kernels.row_product(x, w, None, b)
            exact = ((x.double().reshape(-1) * w.double()).sum(-1) + b.double()).to(torch.bfloat16).float()
            assert y.shape == (1, n) and y.dtype == torch.bfloat16
            assert ((y.reshape(-1).float() - exact).abs() <= exact.abs() * 2.0 ** -7).all(), (n, k)
            assert (y.reshape(-1).float() == exact).float().mean() >= 0.95
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
