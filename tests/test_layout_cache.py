"""The layout cache (blip2.fast.layout_cache): the first generate of a checkpoint writes the language model's
blocked weights to disk, later loads map them instead of laying the weights out again, with the same tokens;
a file that does not match is ignored and written again; a model whose weights changed neither reads nor
writes it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2 import converted, layout_files
from blip2.fast import kernels, layout_cache, linear
from blip2.fast.layout_cache import _blocked_layers
from blip2.mapped import unwritten
from conftest import (break_file_header, cached_pages, count_calls, hf_blip2, pixel_batch, tiny_hf_config,
                      truncate_file, zero_file_data)
from test_fast_default import captions, inputs

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"the blocked layout needs the native kernels "
                                                           f"(AVX-512 or AVX2): {kernels.status()}")


# an fp32 head is screened in bf16 here (kernels.screen_weight), and its screen is cached with the layout
SCREENS = kernels.screen_supports(torch.zeros(16, 4))


@pytest.fixture(autouse=True)
def cache(layout_cache_folder):
    """A cache folder of the test's own (the kernels are loaded already, from the machine's cache)."""
    return layout_cache_folder


@pytest.fixture
def blocks(monkeypatch):
    """How many weights were laid out in blocks (``linear._block``) since the fixture began or was cleared."""
    return count_calls(monkeypatch, linear, "_block")


@pytest.fixture(params=["opt", "t5"])
def checkpoint(request, tmp_path):
    d = tmp_path / f"ckpt_{request.param}"
    hf_blip2(request.param, seed=3).save_pretrained(d)
    return request.param, str(d)


def plain_captions(d: str, text: str) -> torch.Tensor:
    return captions(Blip2ForConditionalGeneration.from_pretrained(d, fast="none"), text)


def first_generate(d: str, text: str) -> torch.Tensor:
    """Load and caption (which writes the layout), and wait for the file."""
    out = captions(Blip2ForConditionalGeneration.from_pretrained(d), text)
    layout_cache.wait()
    return out


def layouts(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_later_load_maps_the_layout(checkpoint, cache, blocks):
    text, d = checkpoint
    want = plain_captions(d, text)
    assert torch.equal(first_generate(d, text), want)
    assert blocks and len(layouts(cache)) == 1
    written = len(blocks)
    blocks.clear()

    model = Blip2ForConditionalGeneration.from_pretrained(d)
    assert torch.equal(captions(model, text), want)
    assert not blocks  # nothing laid out: every blocked weight is the file's
    layers = _blocked_layers(model.language_model)
    assert len(layers) == written
    # the file's pages, mapped: none of them anonymous memory (a blocked copy would be all anonymous)
    assert all(unwritten(layer.w) for layer in layers)
    assert all(layer.w.untyped_storage().data_ptr() != 0 for layer in layers)
    if SCREENS:  # the greedy head's screen too
        screen = model.language_model.decode_step.screen
        assert screen is not None and all(unwritten(t) for t in screen)

    # releasing hands back the parameters, with the plain weights; the next layout is made from them (they are
    # no longer the checkpoint's mapped tensors), with the same tokens
    params = dict(model.named_parameters())
    reference = dict(Blip2ForConditionalGeneration.from_pretrained(d, fast="none").named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in params.items())
    model.eval()
    assert torch.equal(captions(model, text), want)
    assert blocks


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise and mincore")
def test_the_written_layout_leaves_the_page_cache(checkpoint, cache, monkeypatch):
    """The first process holds its layout in its own memory; the file it writes is dropped from the page cache as
    it is flushed (kept there, it pushed out the checkpoint pages the first calls read next)."""
    monkeypatch.setattr(layout_files, "_FLUSH_BYTES", 4096)  # flushed and dropped piece by piece
    text, d = checkpoint
    first_generate(d, text)
    (name,) = layouts(cache)
    path = cache / name
    assert os.path.getsize(path) > 8 * 4096
    assert cached_pages(path) == 0
    with open(path, "rb") as f:
        f.read()
    assert cached_pages(path) > 0  # (what the check reads)


def test_every_way_of_laying_out_uses_it(checkpoint, cache, blocks):
    """blip2.fast.apply holds the cache: a mode applied at load or by hand maps what the default generate wrote."""
    from blip2 import fast

    text, d = checkpoint
    want = plain_captions(d, text)
    first_generate(d, text)
    blocks.clear()
    by_hand = fast.apply(Blip2ForConditionalGeneration.from_pretrained(d, fast="none"), "native")
    at_load = Blip2ForConditionalGeneration.from_pretrained(d, fast="native")
    assert torch.equal(captions(by_hand, text), want) and torch.equal(captions(at_load, text), want)
    assert not blocks


def test_the_pipeline_uses_it(tiny_model_dir, cache, blocks):
    """The Pipeline (the commands, the server) lays "auto" out at its first generate, native at load: the first
    process writes, the next maps."""
    from blip2.apps.pipeline import GenerationOptions, Pipeline

    pipe = Pipeline.load(tiny_model_dir, device="cpu", dtype="float32", fast="auto")
    assert not blocks
    pipe.generate(pixel_batch(1, seed=2), [""], GenerationOptions(max_new_tokens=3))
    layout_cache.wait()
    assert blocks and layouts(cache)
    blocks.clear()
    Pipeline.load(tiny_model_dir, device="cpu", dtype="float32", fast="native")
    assert not blocks


@pytest.mark.parametrize("fits", [True, False], ids=["memory-for-both", "short-of-memory"])
def test_a_large_model_writes_the_layout_at_its_second_generate_and_maps_it_where_memory_allows(
        checkpoint, cache, blocks, monkeypatch, fits):
    """Where laying out waits for the second generate (``lazy.LATER_BYTES``), the first process lays out and
    writes the layout there. A later one maps it at its first generate where the memory can keep it cached beside
    the checkpoint (``layout_cache.MAPPED_SHARE`` of it), else at its second. The plain tokens at every call."""
    from blip2.fast import lazy
    from test_fast_default import laid_out

    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    monkeypatch.setattr(layout_cache, "MAPPED_SHARE", 0.75 if fits else 0.0)
    text, d = checkpoint
    want = plain_captions(d, text)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    assert torch.equal(captions(model, text), want)
    assert not blocks and not laid_out(model) and not layouts(cache)  # no layout to map: the first as loaded
    assert torch.equal(captions(model, text), want)
    layout_cache.wait()
    assert laid_out(model) and blocks and len(layouts(cache)) == 1
    blocks.clear()

    later = Blip2ForConditionalGeneration.from_pretrained(d)
    assert layout_cache.mappable(later, "auto") == fits
    assert torch.equal(captions(later, text), want)
    assert laid_out(later) == fits
    assert torch.equal(captions(later, text), want)
    assert laid_out(later) and not blocks  # mapped, at the first generate or the second


def test_the_key_follows_the_checkpoint_files(checkpoint, cache, blocks, tmp_path):
    text, d = checkpoint
    first_generate(d, text)
    [old] = layouts(cache)
    os.utime(os.path.join(d, "model.safetensors"))  # the same bytes, a new modification time: another key
    first_generate(d, text)
    [touched] = layouts(cache)
    assert touched != old  # (the older layout of the checkpoint removed as the new one is written)

    other = tmp_path / "other"
    hf_blip2(text, seed=4).save_pretrained(other)
    os.replace(other / "model.safetensors", os.path.join(d, "model.safetensors"))  # other weights, same path
    want = plain_captions(d, text)
    blocks.clear()
    assert torch.equal(first_generate(d, text), want)
    assert blocks  # laid out from the new weights, not mapped from the old layout
    [new] = layouts(cache)
    assert new not in (old, touched)


def _renamed_tensor(path: str) -> None:
    """A well-formed file whose names are not the layout's: one tensor renamed (the header's length kept)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        name = next(k for k in json.loads(header) if k != "__metadata__")
        f.seek(8)
        f.write(header.replace(f'"{name}"'.encode(), f'"X{name[1:]}"'.encode()))


@pytest.mark.parametrize("damage", [truncate_file, zero_file_data, break_file_header, _renamed_tensor])
def test_a_damaged_file_is_ignored_and_written_again(checkpoint, cache, blocks, caplog, damage):
    text, d = checkpoint
    want = plain_captions(d, text)
    first_generate(d, text)
    [name] = layouts(cache)
    damage(str(cache / name))
    blocks.clear()
    with caplog.at_level(logging.WARNING, logger="blip2.fast.layout_cache"):
        assert torch.equal(first_generate(d, text), want)
    assert f"ignoring {cache / name}" in caplog.text
    assert blocks  # laid out again (all of it, or what came after the bad tensor)
    assert layouts(cache) == [name]
    blocks.clear()
    assert torch.equal(first_generate(d, text), want)
    assert not blocks  # the file written again is whole


@pytest.mark.skipif(not SCREENS, reason="the greedy head's screen needs AVX-512 BF16")
def test_a_screen_that_is_not_its_heads_is_ignored(checkpoint, cache, caplog):
    """A file whose blocked weights are right but whose screen is not what the head makes (a byte of its
    middle block changed) is ignored and written again; the tokens stay the plain model's."""
    text, d = checkpoint
    want = plain_captions(d, text)
    first_generate(d, text)
    [name] = layouts(cache)
    path = cache / name
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(n))["lm_head:screen"]
        start, end = entry["data_offsets"]
        f.seek(8 + n + (start + end) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    with caplog.at_level(logging.WARNING, logger="blip2.fast.layout_cache"):
        model = Blip2ForConditionalGeneration.from_pretrained(d)
        assert torch.equal(captions(model, text), want)
        layout_cache.wait()
    assert "the screen of 'lm_head' is not its head's" in caplog.text
    assert not unwritten(model.language_model.decode_step.screen[0])  # made anew
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    assert torch.equal(captions(model, text), want)
    assert unwritten(model.language_model.decode_step.screen[0])  # the file written again


def test_the_environment_variable_turns_it_off(checkpoint, cache, blocks, monkeypatch):
    text, d = checkpoint
    monkeypatch.setenv("BLIP2_LAYOUT_CACHE", "0")
    first_generate(d, text)
    assert not layouts(cache)
    monkeypatch.delenv("BLIP2_LAYOUT_CACHE")
    first_generate(d, text)
    assert layouts(cache)
    monkeypatch.setenv("BLIP2_LAYOUT_CACHE", "0")
    blocks.clear()
    first_generate(d, text)
    assert blocks  # the file there is not read either


def _scale_in_place(model) -> None:
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(2.0)  # (the OPT head: the embeddings too)


def _load_other_weights(model) -> None:
    model.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})


def _train_one_step(model) -> None:
    model.train()
    x = inputs("opt" if model.config.use_decoder_only_language_model else "t5")
    if "input_ids" not in x:
        ids = torch.tensor([[11, 12, 1], [21, 22, 1]])
        x.update(input_ids=ids, attention_mask=torch.ones_like(ids))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize("change", [_scale_in_place, _load_other_weights, _train_one_step])
def test_a_model_changed_before_its_first_generate_neither_reads_nor_writes(checkpoint, cache, blocks, change):
    text, d = checkpoint
    plain = Blip2ForConditionalGeneration.from_pretrained(d, fast="none")
    change(plain)
    want = captions(plain, text)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    change(model)
    assert torch.equal(captions(model, text), want)
    layout_cache.wait()
    assert not layouts(cache)

    first_generate(d, text)  # the unchanged checkpoint's layout on disk, which the changed model must not read
    [written] = layouts(cache)
    blocks.clear()
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    change(model)
    assert torch.equal(captions(model, text), want)
    assert blocks
    layout_cache.wait()
    assert layouts(cache) == [written]


def test_a_model_converted_at_load_or_built_in_code_writes_nothing(checkpoint, cache, tmp_path):
    text, d = checkpoint
    bf16 = tmp_path / "bf16"
    Blip2ForConditionalGeneration.from_pretrained(d, fast="none").to(torch.bfloat16).save_pretrained(bf16)
    model = Blip2ForConditionalGeneration.from_pretrained(bf16, dtype=torch.float32)  # converted: new memory
    want = captions(Blip2ForConditionalGeneration.from_pretrained(bf16, dtype=torch.float32, fast="none"), text)
    assert torch.equal(captions(model, text), want)
    built = Blip2ForConditionalGeneration(model.config).eval()
    built.fast = "auto"
    captions(built, text)
    layout_cache.wait()
    # the weights converted at load are cached as they are (blip2.converted), but no layout made from them
    assert [layout_files.metadata(cache / name)["format"] for name in layouts(cache)] == [
        f"converted v{converted.VERSION}"]


_MEASURE = textwrap.dedent(
    """
    import json, resource, sys, torch
    sys.path.insert(0, {src!r})
    from blip2 import Blip2ForConditionalGeneration
    from blip2.apps.bench import decode_inputs
    from blip2.fast import kernels, layout_cache

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    kernels.load()
    model = Blip2ForConditionalGeneration.from_pretrained({d!r}, fast="none")
    pixels, ids, mask = decode_inputs(model.config, 1)
    model.generate(pixels, ids, mask, max_new_tokens=2)  # oneDNN's and the allocator's first use
    weights = sum(p.numel() * p.element_size() for p in {{p.data_ptr(): p for p in model.parameters()}}.values())
    del model
    import gc; gc.collect()  # (the model's mapping goes with it)
    with open("/proc/self/clear_refs", "w") as f:  # peak := current
        f.write("5")
    anon, base = status("RssAnon"), status("VmRSS")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model = Blip2ForConditionalGeneration.from_pretrained({d!r})
    model.generate(pixels, ids, mask, max_new_tokens=2)
    screen = getattr(model.language_model.decode_step, "screen", None) or ()  # (AVX-512 BF16 CPUs)
    print(json.dumps({{"weights": weights, "anon": status("RssAnon") - anon, "peak": status("VmHWM") - base,
                      "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
                      "screen": sum(t.numel() * t.element_size() for t in screen)}}))
    layout_cache.wait()
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_a_mapped_layout_copies_nothing(tmp_path):
    """A language model of ~480 MB: laid out, its blocked weights are new memory (anonymous pages); mapped from
    the cache, they are the file's pages and the process's anonymous memory does not grow by them. Each load in
    a fresh process: the first lays out and writes, the second maps; both within 1.05x the weights (and the screen)."""
    from random_weights import write_random_checkpoint

    raw = tiny_hf_config("opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=16, num_attention_heads=12,
                         vocab_size=8000, max_position_embeddings=128).to_dict()
    write_random_checkpoint(raw, str(tmp_path / "ckpt"), torch.float32)
    code = _MEASURE.format(src=os.path.join(os.path.dirname(__file__), "..", "src"), d=str(tmp_path / "ckpt"))

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, later = run(), run()
    assert first["weights"] > 400e6
    assert first["anon"] > 0.8 * first["weights"], first  # the blocked copy
    assert later["anon"] < 0.05 * later["weights"], later  # the file's pages
    # the greedy head's bf16 screen is a weight of its own (2.6% of these weights; mapped in the later process)
    assert first["peak"] < 1.05 * first["weights"] + first["screen"], first
    assert later["peak"] < 1.05 * later["weights"] + later["screen"], later
