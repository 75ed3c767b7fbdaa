"""The converted copy (blip2.converted): a load that converts a checkpoint's weights to another dtype writes them,
converted, to the layout cache; later loads map that file instead of converting, with the same weights bit for
bit and the same tokens; a file that does not match is ignored and written again; a changed checkpoint gets a
copy of its own; the model's tensors, trained while the copy is written, never reach it."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2VisionModel, checkpoint, layout_files
from blip2.mapped import unwritten
from conftest import break_file_header, count_calls, hf_blip2, truncate_file, zero_file_data
from test_fast_default import captions, inputs


@pytest.fixture(autouse=True)
def cache(layout_cache_folder):
    return layout_cache_folder


@pytest.fixture
def conversions(monkeypatch):
    """The dtypes of the tensors converted at load (``mapped.convert`` into another dtype) since the fixture began
    or was cleared."""
    return count_calls(monkeypatch, checkpoint, "convert",
                       lambda t, dtype, *args, **kwargs: (t.dtype, dtype) if t.dtype != dtype else None)


@pytest.fixture(params=["opt", "t5"])
def fp32_dir(request, tmp_path):
    d = tmp_path / f"ckpt_{request.param}"
    hf_blip2(request.param, seed=3).save_pretrained(d)
    return request.param, str(d)


def load(d: str, dtype=torch.bfloat16, wait: bool = True, **kwargs):
    model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype, **kwargs)
    if wait:
        layout_files.wait()
    return model


def converted(d: str, monkeypatch):
    """The checkpoint loaded in bf16 without the cache: converted at load."""
    with monkeypatch.context() as m:
        m.setenv("BLIP2_LAYOUT_CACHE", "0")
        return Blip2ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16)


def files(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)) for k in sa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_later_load_maps_the_copy_the_first_wrote(fp32_dir, cache, conversions, dtype):
    text, d = fp32_dir
    first = load(d, dtype)
    assert conversions  # the first converted the checkpoint...
    [name] = files(cache)  # ...and wrote its copy
    conversions.clear()
    later = load(d, dtype)
    assert not conversions
    assert later._origin.files[-1] == str(cache / name)  # beside the checkpoint's, whose fp32 tensors it maps
    assert same_weights(first, later)
    assert later.language_model.get_input_embeddings().weight.dtype == dtype
    assert later.qformer.layernorm.weight.dtype == torch.float32  # kept in fp32: mapped from the checkpoint
    mapped = torch.nn.Module.state_dict(later).values()  # (ours clones a tied alias)
    assert all(unwritten(t) for t in mapped if t.numel() * t.element_size() >= 4096)
    assert torch.equal(captions(later, text), captions(first, text))


def test_one_copy_per_dtype_and_none_where_little_converts(fp32_dir, cache, conversions, tmp_path):
    text, d = fp32_dir
    load(d, torch.float32)
    load(d, None)
    assert not files(cache)  # the files' own dtype: used in place
    load(d, torch.bfloat16)
    load(d, torch.float16)
    assert len(files(cache)) == 2
    load(d, "bfloat16")
    assert len(files(cache)) == 2  # (mapped, not written again)
    bf16 = tmp_path / "bf16"
    hf_blip2(text, seed=3).to(torch.bfloat16).save_pretrained(bf16)  # as transformers saves: all of it bf16
    conversions.clear()
    load(str(bf16))
    assert conversions and all(c == (torch.bfloat16, torch.float32) for c in conversions)  # the Q-Former alone
    assert len(files(cache)) == 2  # too little for a copy


def test_a_part_loaded_alone_has_a_copy_of_its_own(fp32_dir, cache, conversions):
    """A vision tower taken from a whole checkpoint: the copy holds its tensors alone, under the checkpoint's keys."""
    _, d = fp32_dir
    first = Blip2VisionModel.from_pretrained(d, dtype=torch.bfloat16)
    layout_files.wait()
    [name] = files(cache)
    conversions.clear()
    later = Blip2VisionModel.from_pretrained(d, dtype=torch.bfloat16)
    assert not conversions and same_weights(first, later)
    with open(cache / name, "rb") as f:
        keys = set(json.loads(f.read(int.from_bytes(f.read(8), "little")))) - {"__metadata__"}
    assert keys == {"vision_model." + k for k, t in first.state_dict().items() if t.is_floating_point()}
    load(d)  # the whole model's copy beside it
    assert len(files(cache)) == 2


def _one_value(path: str) -> None:
    """One bit of the last byte of the last tensor by name flipped (one of the tensors and ends checked)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        _, end = header[max(k for k in header if k != "__metadata__")]["data_offsets"]
        f.seek(8 + n + end - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))


def _another_key(path: str) -> None:
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        key = json.loads(header)["__metadata__"]["key"]
        f.seek(8)
        f.write(header.replace(key.encode(), b"0" * len(key)))


def _writable_by_others(path: str) -> None:
    os.chmod(path, 0o666)


def _in_another_dtype(path: str) -> None:
    """A well-formed copy under the right key whose language model's weights are fp32, not bf16."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t.float() if k.startswith("language_model") and t.is_floating_point() else t
               for k, t in tensors.items()}
    os.unlink(path)
    save_file(tensors, path, metadata=meta)
    os.chmod(path, 0o600)


@pytest.mark.parametrize("damage", [truncate_file, break_file_header, zero_file_data, _one_value, _another_key,
                                    _writable_by_others, _in_another_dtype])
def test_a_copy_that_does_not_match_is_ignored_and_written_again(fp32_dir, cache, conversions, caplog, damage):
    text, d = fp32_dir
    want = load(d)
    [name] = files(cache)
    damage(str(cache / name))
    conversions.clear()
    with caplog.at_level(logging.WARNING, logger="blip2.converted"):
        model = load(d)
    assert f"ignoring {cache / name}" in caplog.text
    assert conversions and same_weights(model, want)  # converted from the checkpoint again
    assert str(cache / name) not in model._origin.files
    assert files(cache) == [name]  # written again
    conversions.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="blip2.converted"):
        model = load(d)
    assert not conversions and not caplog.text and same_weights(model, want)
    assert torch.equal(captions(model, text), captions(want, text))


def test_a_changed_checkpoint_gets_a_copy_of_its_own(fp32_dir, cache, conversions, monkeypatch):
    _, d = fp32_dir
    load(d)
    [old] = files(cache)
    hf_blip2(fp32_dir[0], seed=4).save_pretrained(d)  # other weights, same names
    conversions.clear()
    model = load(d)
    assert conversions  # not the old copy
    assert same_weights(model, converted(d, monkeypatch))
    [new] = files(cache)  # the old one swept
    assert new != old
    conversions.clear()
    assert same_weights(load(d), model) and not conversions


def test_training_while_it_is_written_does_not_reach_it(fp32_dir, cache, monkeypatch):
    """The writer reads the checkpoint anew, never the model's tensors: a model trained in place as soon as it is
    loaded (here every weight doubled while the file is written slowly) leaves the copy the checkpoint's."""
    _, d = fp32_dir
    reference = converted(d, monkeypatch)
    monkeypatch.setattr(layout_files, "_FLUSH_BYTES", 4096)
    monkeypatch.setattr("blip2.converted._CHUNK_BYTES", 1024)
    model = load(d, wait=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    layout_files.wait()
    assert files(cache)
    assert same_weights(load(d), reference)


def test_a_checkpoint_changed_while_it_is_written_leaves_no_copy(fp32_dir, cache, monkeypatch):
    _, d = fp32_dir
    monkeypatch.setattr(layout_files, "_FLUSH_BYTES", 4096)
    load(d, wait=False)
    [f] = [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".safetensors")]
    os.utime(f, ns=(0, 0))
    layout_files.wait()
    assert not files(cache)


def test_the_environment_variable_turns_it_off(fp32_dir, cache, conversions, monkeypatch):
    _, d = fp32_dir
    monkeypatch.setenv("BLIP2_LAYOUT_CACHE", "0")
    load(d)
    assert not files(cache)
    monkeypatch.delenv("BLIP2_LAYOUT_CACHE")
    load(d)
    assert files(cache)
    monkeypatch.setenv("BLIP2_LAYOUT_CACHE", "0")
    conversions.clear()
    load(d)
    assert conversions  # the file there is not read either


def test_layouts_of_finds_the_copy_and_the_layout_made_from_it(fp32_dir, cache, tmp_path):
    """``layout_files.layouts_of`` (what the benchmarks clear) finds the checkpoint's copy, and the blocked layout
    made from the copy where the kernels lay bf16 out; once the checkpoint is gone, the next file written sweeps
    both."""
    from blip2 import fast
    from blip2.fast import kernels

    text, d = fp32_dir
    load(d)
    model = load(d, fast="none")
    blocked = kernels.load() and kernels.blocked_supports(torch.bfloat16)
    if blocked:
        fast.apply(model, "native")
        layout_files.wait()
    weights = [os.path.join(d, n) for n in os.listdir(d) if n.endswith(".safetensors")]
    assert sorted(p.name for p in layout_files.layouts_of(weights)) == files(cache)
    assert len(files(cache)) == (2 if blocked else 1)
    other = tmp_path / "other"
    hf_blip2(text, seed=5).save_pretrained(other)
    shutil.rmtree(d)
    load(str(other))
    assert len(files(cache)) == 1 and layout_files.layouts_of(weights) == []


def test_the_writer_waits_while_foreground_work_runs(fp32_dir, cache):
    """While a ``Foreground`` is held (``generate``, the server's busy spells) the writer writes nothing past the
    header; let go, it writes the file."""
    _, d = fp32_dir
    busy = layout_files.Foreground()
    with busy:
        load(d, wait=False)
        time.sleep(0.5)
        [tmp] = [f for f in os.listdir(cache) if f.endswith(".tmp")]
        assert os.path.getsize(cache / tmp) <= 64 << 10  # the header alone
        assert not [f for f in files(cache) if f.endswith(".safetensors")]
    layout_files.wait()
    assert [f for f in files(cache) if f.endswith(".safetensors")]


def test_loading_and_generate_hold_the_writers(fp32_dir, monkeypatch):
    """``from_pretrained`` and a model's ``generate`` are ``Foreground`` work from start to end, and let go after:
    a writer started by a load begins once the load has returned."""
    from blip2 import converted

    text, d = fp32_dir
    during_load: list[int] = []
    write = converted.ConvertedCopy.write

    def recorded(self, *args):
        during_load.append(layout_files._foreground[0])
        return write(self, *args)

    monkeypatch.setattr(converted.ConvertedCopy, "write", recorded)
    model = load(d, fast="none")
    assert during_load and during_load[0] >= 1 and layout_files._foreground[0] == 0
    held: list[int] = []

    class Streamer:
        def put(self, _value) -> None:
            held.append(layout_files._foreground[0])

        def end(self) -> None:
            pass

    captions_with = dict(inputs(text), max_new_tokens=3, streamer=Streamer())
    model.generate(**captions_with)
    assert held and all(n == 1 for n in held)
    assert layout_files._foreground[0] == 0


def test_retrieval_towers_hold_the_writers(tiny_retrieval_dir, monkeypatch):
    """An image-text model's towers (matching, search, embedding: the vision encoder and the Q-Former on text)
    are ``Foreground`` work while they run, as ``generate`` is."""
    from blip2 import Blip2ForImageTextRetrieval
    from blip2.models import qformer, vision

    model = Blip2ForImageTextRetrieval.from_pretrained(tiny_retrieval_dir, dtype=torch.bfloat16)
    held = {name: count_calls(monkeypatch, cls, "forward", lambda *args, **kwargs: layout_files._foreground[0])
            for name, cls in [("vision encoder", vision.Blip2VisionModel), ("Q-Former", qformer.Blip2QFormerModel)]}
    config = model.config.vision_config
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    ids = torch.tensor([[5, 6, 7, 8]] * 2)
    model(pixels, ids, use_image_text_matching_head=True)
    model(pixels, ids, use_image_text_matching_head=False)
    assert held["vision encoder"] == [1, 1]
    assert len(held["Q-Former"]) >= 3 and all(n == 1 for n in held["Q-Former"])  # queries over the image, text, pair
    assert layout_files._foreground[0] == 0


_EXITING = textwrap.dedent(
    """
    import sys, threading, time, torch
    sys.path.insert(0, {src!r})
    from blip2 import Blip2ForConditionalGeneration, layout_files

    def busy():  # a daemon thread's work that never ends: it must not keep the writer, nor the process, waiting
        with layout_files.Foreground():
            while True:
                time.sleep(1)

    threading.Thread(target=busy, daemon=True).start()
    Blip2ForConditionalGeneration.from_pretrained({d!r}, dtype=torch.bfloat16)
    print("loaded", flush=True)
    """
)


def test_a_process_finishes_its_copy_at_exit_and_says_so(fp32_dir, cache):
    _, d = fp32_dir
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    out = subprocess.run([sys.executable, "-c", _EXITING.format(src=src, d=d)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "BLIP2_LAYOUT_CACHE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "loaded"
    [name] = [f for f in files(cache) if f.endswith(".safetensors")]
    assert f"blip2 layout cache: finishing layouts/{name}" in out.stderr
    assert not [f for f in files(cache) if f.endswith(".tmp")]
