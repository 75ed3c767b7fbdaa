"""Loading holds one copy of the weights, and so do the speed-ups' layouts: peak resident memory, measured in
fresh processes, at most 1.05x the loaded weights (docs/ARCHITECTURE.md, "Loading").

Each measurement runs in its own process: the growth of the peak resident size (``VmHWM``, reset after the
imports and the first oneDNN call) across ``from_pretrained``, one read of every weight (a mapped file's pages
become resident when first used, not at load) and the speed-up, against the bytes of the loaded weights."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import cached_pages, cached_share, tiny_hf_config
from random_weights import write_random_checkpoint

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux /proc to reset the peak resident size")

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))

_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {src!r})
    import blip2.converted, blip2.mapped
    from blip2 import Blip2ForConditionalGeneration, fast, layout_files
    from blip2.fast.linear import FusedLinear, decode_format, default_format, walk
    blip2.mapped._CONVERT_CHUNK = blip2.converted._CHUNK_BYTES = {chunk}
    if {at_load!r}:  # the language model counts as large: a converting load lays it out (blip2.fast.lazy)
        import blip2.fast.lazy
        blip2.fast.lazy.LATER_BYTES = 0
    torch.nn.init.normal_(torch.empty(1, device="meta"))  # torch's lazy import of its meta kernels
    with torch.no_grad():  # each layout's first use (oneDNN's caches, the native kernels' library)
        for fmt in ("int8", default_format(torch.ones(1)), decode_format(torch.ones(1))):
            FusedLinear([torch.nn.Linear(64, 64)], fmt)(torch.ones(2, 64))

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:  # peak := current
        f.write("5")
    base = status("VmRSS")
    model = Blip2ForConditionalGeneration.from_pretrained({d!r}, dtype=getattr(torch, {dtype!r}))
    layout_files.wait()  # a converted copy written (where the layout cache is on), with the model held
    loaded = status("VmHWM") - base
    # the tensors the model holds, found without its own walks (a model laid out at load would undo the layout)
    tensors = {{id(t): t for m in walk(model) for t in (*m._parameters.values(), *m._buffers.values())
               if t is not None and t.numel()}}.values()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    with torch.no_grad():  # read every weight, as a first forward would
        for t in tensors:
            t.sum()
    read = status("VmHWM") - base
    del tensors  # (held here, a layout undone below would stay beside the plain weights)
    if {speedup!r} != "none":
        getattr(fast, {speedup!r})(model)
    # the native step's bf16 screen of an fp32 head (AVX-512 BF16 CPUs): a weight of its own, half the head's size
    screen = getattr(model.language_model.decode_step, "screen", None) or ()
    print(json.dumps({{"weights": weights, "loaded": loaded, "read": read, "peak": status("VmHWM") - base,
                      "held": fast.held_bytes(model),  # the plain weights, a table tied to the head once
                      "screen": sum(t.numel() * t.element_size() for t in screen),
                      "fused": [str(m.dtype) for m in walk(model.language_model) if isinstance(m, FusedLinear)]}}))
    """
)


def measure(directory, dtype: str, speedup: str = "none", chunk: int = 16 * 2**20,
            cache=None, at_load: bool = False) -> dict[str, float]:
    """Bytes of the loaded weights, and the peak growth after loading, after reading and after ``speedup``
    (a function of ``blip2.fast``), each over the weights. ``cache``: a folder for the layout cache, which is
    then on. ``at_load``: the language model as large as a real one (laid out at load where that converts)."""
    code = _MEASURE.format(src=SRC, d=str(directory), dtype=dtype, speedup=speedup, chunk=chunk, at_load=at_load)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env |= {"BLIP2_LAYOUT_CACHE": "1", "BLIP2_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"weights": r["weights"], "fused": r["fused"],
            **{k: r[k] / r["weights"] for k in ("loaded", "read", "peak", "screen", "held")}}


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """An OPT language model of 16 layers of width 768 (~480 MB of fp32 weights): every layer small beside the
    whole (2%), as in a real model (0.7% at 2.7B), so that one layer held in two layouts at once, and the few
    pages around each tensor that mapping it touches, stay in the measurement's slack."""
    raw = tiny_hf_config("opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=16, num_attention_heads=12,
                         vocab_size=8000, max_position_embeddings=128).to_dict()
    d = tmp_path_factory.mktemp("fp32_checkpoint")
    write_random_checkpoint(raw, str(d), torch.float32)
    return d


def test_a_mapped_load_reads_nothing_and_holds_one_copy(fp32_checkpoint):
    """Loading in the stored dtype uses the file's mapped tensors in place: nothing is read at load, and
    reading every weight brings in one copy (the page cache's pages), never a second."""
    r = measure(fp32_checkpoint, "float32")
    assert r["weights"] > 400e6
    # (0.4%: the model's Python objects; a whole copy would be 1.0. Before the views were made without touching
    # a tensor's first page, the kernel mapped 64 KB around each: 1.5% with 290 tensors of 1.6 MB on average)
    assert r["loaded"] < 0.01, r
    assert r["read"] < 1.05, r


def _drop_from_page_cache(directory) -> None:
    for f in directory.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # (dirty pages are not dropped)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert cached_pages(f) < os.path.getsize(f) // 4096 // 100, "the file is still in the page cache"


def _wait_for_read_ahead() -> None:
    """Join the threads reading weights ahead after a load (``mapped.prefetch_in_background``)."""
    for thread in threading.enumerate():
        if thread.name == "blip2-prefetch":
            thread.join(timeout=60)


def test_loading_a_file_not_in_the_page_cache_reads_none_of_it(fp32_checkpoint):
    """A load after the files left the page cache (a reboot, a fresh download, a big machine's other work) reads
    nothing but the headers: every weight is read when first used, and weights a cached layout replaces never.
    safetensors' own tensors touched each one's first page, and the kernel read megabytes ahead of each touch:
    5.6 GB of blip2-opt-2.7b's 15.5, 4-6 s of its load."""
    from blip2 import Blip2ForConditionalGeneration

    _drop_from_page_cache(fp32_checkpoint)
    model = Blip2ForConditionalGeneration.from_pretrained(fp32_checkpoint)
    [f] = fp32_checkpoint.glob("*.safetensors")
    # (the header's reads bring in a few MB at the start of the file; safetensors' tensors brought in 96% of it)
    assert cached_pages(f) * 4096 < 16 << 20, "the load read the file"
    weight = model.language_model.model.decoder.layers[3].fc1.weight  # 9 MB, read now from disk
    assert weight.abs().sum() > 0 and cached_pages(f) >= weight.numel() * 4 // 4096  # (what the check sees)
    _wait_for_read_ahead()
    del model, weight
    gc.collect()  # unmapped: the next test can drop the file from the page cache again


@pytest.mark.parametrize("speedup", ["fuse", "quantize_int8", "native", "native_as_loaded"])
def test_speedup_layouts_hold_one_copy(fp32_checkpoint, speedup):
    """The speed-ups lay weights out layer by layer and release each mapped original once copied: the peak
    stays near one copy of the weights even with every original resident (read once) before. fp32 here, so
    "fuse" copies every weight into oneDNN's layout (or the blocked one) on CPU. Before, the originals'
    pages stayed with their copies: 1.4x for "fuse", 1.2x for int8 at 3.5 GB. The native step on the weights
    as loaded copies nothing (and screens no head)."""
    if speedup.startswith("native"):
        from blip2.fast import kernels

        if not kernels.load():
            pytest.skip(f"native needs the kernels (AVX-512 or AVX2): {kernels.status()}")
    r = measure(fp32_checkpoint, "float32", speedup)
    assert r["peak"] < 1.05 + r["screen"], r  # the screen: 2.6% of this model's weights, 1.7% of blip2-opt-2.7b's
    if speedup == "native_as_loaded":
        assert r["screen"] == 0 and r["peak"] < r["read"] + 0.01, r


def test_converting_load_holds_one_copy_then_int8(fp32_checkpoint):
    """fp32 file, bf16 model: each tensor is converted 1 MB at a time and the read pages released, so the
    peak is the bf16 weights, never also the fp32 ones; int8 then lays the converted (anonymous) weights out
    one layer at a time, freeing each original as it goes."""
    r = measure(fp32_checkpoint, "bfloat16", "quantize_int8", chunk=2**20)
    assert r["read"] < 1.05, r
    # 1.05 is the goal at real size; here the weights are 240 MB, and the quantizer's per-layer buffers and
    # the allocator's arenas (a few MB) move the ratio between 1.01 and 1.06 from run to run
    assert r["peak"] < 1.08, r


@pytest.mark.parametrize("stored,dtype", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_a_load_laying_out_as_it_converts_holds_one_copy(fp32_checkpoint, tmp_path, stored, dtype):
    """A language model past ``LATER_BYTES`` that the load converts is laid out at once, each weight converted
    straight from the file's pages into the blocked layout, the pages released (blip2.fast.lazy.deferred): the
    peak is the weights the model holds (the blocked language model, the rest converted), never the file's
    weights beside them nor a converted copy beside the layout."""
    from blip2.fast import kernels

    if not kernels.load() or not kernels.blocked_supports(getattr(torch, dtype)):
        pytest.skip(f"no blocked {dtype} kernels here: {kernels.status()}")
    d = fp32_checkpoint
    if stored != "float32":
        raw = json.loads((fp32_checkpoint / "config.json").read_text())
        write_random_checkpoint(raw, str(tmp_path), getattr(torch, stored))
        d = tmp_path
    r = measure(d, dtype, chunk=2**20, at_load=True)
    assert set(r["fused"]) == {f"torch.{dtype}"} and len(r["fused"]) > 16 * 4, r  # laid out, in the dtype asked for
    # undone (training, an optimizer, PEFT), layer by layer: each blocked weight freed once unblocked, though
    # the native step held them all (the model held in both layouts at once: 2x the language model)
    undone = measure(d, dtype, "unfuse", chunk=2**20, at_load=True)
    assert not undone["fused"] and undone["peak"] < 1.05 + r["screen"], undone
    assert r["weights"] > (200e6 if dtype == "bfloat16" else 400e6), r
    # the tensors held are the plain weights' bytes: OPT's embedding table (5% of this model) is the tied head's
    # blocked copy, not also a plain matrix (blip2.fast.decoding.BlockedEmbedding; 0.95 when it was both)
    assert 0.995 < r["held"] < 1.005, r
    # (the screen: the native step's bf16 copy of an fp32 head, half its bytes, as test_speedup_layouts_hold_one_copy)
    assert r["loaded"] < 1.05 + r["screen"] and r["read"] < 1.05 + r["screen"], r


def test_writing_the_converted_copy_and_loading_it_hold_one_copy(fp32_checkpoint, tmp_path):
    """fp32 file, bf16 model, the layout cache on: the first load converts and writes the converted copy
    (``blip2.converted``) from the checkpoint read anew 1 MB at a time, its pages released; the peak stays the bf16
    weights. The next load maps the copy: nothing resident until read, then the weights once."""
    first = measure(fp32_checkpoint, "bfloat16", chunk=2**20, cache=tmp_path)
    assert len(list((tmp_path / "layouts").glob("*.safetensors"))) == 1
    # (the writer thread's stack, malloc arena and buffer: ~4 MB, 1.6% of these 240 MB, 0.05% of blip2-opt-2.7b's)
    assert first["loaded"] < 1.05 + 8e6 / first["weights"] and first["read"] < 1.05 + 8e6 / first["weights"], first
    later = measure(fp32_checkpoint, "bfloat16", chunk=2**20, cache=tmp_path)
    assert later["weights"] == first["weights"]
    assert later["loaded"] < 0.05 and later["read"] < 1.05, later


def test_the_weights_a_first_call_reads_first_are_read_ahead(fp32_checkpoint, tmp_path):
    """The vision encoder's and the Q-Former's weights, which a first call reads first, are read ahead in the
    background after a load; the language model's are not (a cached layout may replace them). The file is
    written again with them last (safetensors orders by name), far from the header's reads."""
    from safetensors.torch import load_file, save_file

    from blip2 import Blip2ForConditionalGeneration

    [f] = fp32_checkpoint.glob("*.safetensors")
    save_file(load_file(f), tmp_path / f.name, metadata={"format": "pt"})
    (tmp_path / "config.json").write_bytes((fp32_checkpoint / "config.json").read_bytes())
    _drop_from_page_cache(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    _wait_for_read_ahead()
    first = [t for part in (model.vision_model, model.qformer) for t in part.state_dict().values()]
    assert min(t.data_ptr() for t in first) - min(p.data_ptr() for p in model.parameters()) > 400e6  # (last)
    deadline = time.monotonic() + 10  # (the reads asked for may still be under way)
    while cached_share(first) < 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cached_share(first) == 1.0
    lm = [t for t in model.language_model.state_dict().values() if t.numel() * t.element_size() > 2**20]
    assert cached_share(lm) < 0.05
    del model, first, lm
    gc.collect()


def test_converting_a_file_read_from_disk_holds_one_copy(fp32_checkpoint):
    """The converting load with the file out of the page cache, as on a first load: read from disk, the kernel
    makes large folios of it, and a fault maps the whole folio around the page read, pages of the tensors
    converted (and released) before it included. Those are released with each piece too; before, they stayed:
    1.058x (1.023x with the file cached), failing the test above in CI once the file had been reclaimed."""
    _drop_from_page_cache(fp32_checkpoint)
    r = measure(fp32_checkpoint, "bfloat16", chunk=2**20)
    assert r["read"] < 1.03, r


def test_converting_an_embedding_heavy_model_converts_piece_by_piece(tmp_path):
    """fp32 file, bf16 model, where one tensor (the embedding matrix) is as big as all the other bf16 weights
    together: converting it whole would show as 1.5x."""
    raw = tiny_hf_config("opt", hidden_size=512, ffn_dim=512, num_hidden_layers=2, num_attention_heads=8,
                         vocab_size=60000).to_dict()
    write_random_checkpoint(raw, str(tmp_path), torch.float32)
    r = measure(tmp_path, "bfloat16", chunk=2**20)
    assert r["read"] < 1.05, r


_BLOCK_MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {src!r})
    from blip2.fast import kernels, linear
    from blip2.mapped import safetensors_views
    kernels.load()

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    w = safetensors_views({path!r})("w")  # mapped, as a loaded weight
    w.sum()  # read in: resident, as a weight a first call has used
    with open("/proc/self/clear_refs", "w") as f:  # peak := current
        f.write("5")
    base = status("VmRSS")
    out = linear._block([w], release=True, dtype=torch.bfloat16)
    del w
    print(json.dumps({{"peak": status("VmHWM") - base, "out": out.numel() * out.element_size()}}))
    """
)


def test_a_large_blocked_weight_is_faulted_in_just_ahead_of_its_copy(tmp_path):
    """A weight laid out in blocks fills fresh memory a chunk at a time just ahead of the copy (mapped.Ahead), so
    while it is made the process holds its source and a chunk of it, not the whole of both: faulted whole first,
    laying out blip2-opt-2.7b's head (tied to its 0.26 GB table, read by the first call) held 0.26 GB more than the
    model after. Here a mapped fp32 matrix of 384 MB, read in, blocked into bf16 (192 MB)."""
    from blip2.fast import kernels
    from safetensors.torch import save_file

    if not kernels.load() or not kernels.blocked_supports(torch.bfloat16):
        pytest.skip(f"no blocked bf16 kernels here: {kernels.status()}")
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(12288, 8192)}, str(path))
    code = _BLOCK_MEASURE.format(src=SRC, path=str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # each piece of the source released once copied: the peak is a chunk (32 MB) and a piece of a few MB over the
    # start (faulted whole: the layout's 192 MB)
    assert r["peak"] < 0.3 * r["out"], r
