"""Loaded weights are the checkpoint's mapped tensors, copy-on-write: used in place when the dtype matches,
writable without touching the file, released only where no value changes; broken files fail naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import torch

import blip2.mapped
from blip2 import Blip2Config, Blip2ForConditionalGeneration, fast
from blip2.checkpoint import CheckpointError
from blip2.mapped import empty, release_pages
from conftest import randomize_, tiny_hf_config

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and pagemap")


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _mapped_from(t: torch.Tensor) -> str | None:
    """The file whose mapping holds ``t``'s data (/proc/self/maps), None for anonymous memory."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


def _resident_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny BLIP-2 (OPT) saved as safetensors and as pytorch_model.bin, with its state dict."""
    raw = tiny_hf_config("opt", hidden_size=64, ffn_dim=256, vocab_size=4096).to_dict()
    model = randomize_(Blip2ForConditionalGeneration(Blip2Config.from_dict(raw)), std=0.05)
    root = tmp_path_factory.mktemp("mapped")
    model.save_pretrained(root / "safetensors")
    (root / "bin").mkdir()
    with open(root / "bin" / "config.json", "w") as f:
        json.dump(raw, f)
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")
    return root, {k: v.clone() for k, v in model.state_dict().items()}


@linux_only
@pytest.mark.parametrize("kind, file", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_writing_into_a_loaded_weight_never_reaches_the_file(saved, kind, file):
    root, state = saved
    path = root / kind / file
    before = _digest(path)
    model = Blip2ForConditionalGeneration.from_pretrained(root / kind)
    w = model.language_model.model.decoder.layers[0].fc1.weight
    assert _mapped_from(w) == str(path)  # used in place: a view of the file, no copy
    with torch.no_grad():
        w.add_(1.0)  # an in-place write, as training or a user's edit does
    assert torch.equal(w.detach(), state["language_model.model.decoder.layers.0.fc1.weight"] + 1.0)
    assert _digest(path) == before
    again = Blip2ForConditionalGeneration.from_pretrained(root / kind)
    assert torch.equal(again.language_model.model.decoder.layers[0].fc1.weight,
                       state["language_model.model.decoder.layers.0.fc1.weight"])
    # a step of training writes every weight it updates: still the model's alone
    opt = torch.optim.SGD(again.language_projection.parameters(), lr=0.1)
    loss = again.language_projection(torch.ones(1, again.config.qformer_config.hidden_size)).square().sum()
    loss.backward()
    opt.step()
    assert not torch.equal(again.language_projection.weight.detach(), state["language_projection.weight"])
    assert _digest(path) == before


def test_saving_over_the_loaded_checkpoint_keeps_both_models_whole(saved, tmp_path):
    """save_pretrained into the directory a model was mapped from: the files are replaced, never rewritten under
    the mapping (which would change or cut off the pages the model reads), so the model keeps its values and the
    directory gets the edited ones."""
    import shutil

    root, state = saved
    d = tmp_path / "ckpt"
    shutil.copytree(root / "safetensors", d)
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    key = "language_model.model.decoder.layers.0.fc1.weight"
    with torch.no_grad():
        model.language_model.model.decoder.layers[0].fc1.weight.add_(1.0)
    model.save_pretrained(d)
    for k, v in model.state_dict().items():  # every page still readable, edited or not
        assert torch.equal(v, state[k] + 1.0 if k == key else state[k]), k
    again = Blip2ForConditionalGeneration.from_pretrained(d)
    assert torch.equal(again.state_dict()[key], state[key] + 1.0)


def test_the_mapped_views_are_safetensors_tensors_each_with_its_own_storage(tmp_path):
    """Every dtype, shape and offset as safetensors reads it (odd sizes put tensors at unaligned offsets; a
    dtype we leave to safetensors comes from it), each view a storage of its own bytes: ``torch.save`` of one
    writes that tensor, not the file."""
    import io

    from safetensors.torch import load_file, save_file

    from blip2.checkpoint import iter_checkpoint_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(3, generator=g).double(),
               "i64": torch.arange(5), "i32": torch.arange(3, dtype=torch.int32),
               "i16": torch.arange(-3, 4, dtype=torch.int16), "i8": torch.arange(-5, 6, dtype=torch.int8),
               "u8": torch.arange(9, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
               "big": torch.randn(256, 1024, generator=g)}
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(5, generator=g).to(torch.float8_e4m3fn)
    if hasattr(torch, "uint16"):
        tensors["u16"] = torch.arange(4, dtype=torch.int32).to(torch.uint16)  # left to safetensors
    save_file(tensors, tmp_path / "model.safetensors")
    want = load_file(tmp_path / "model.safetensors")
    got = dict(iter_checkpoint_tensors(str(tmp_path)))
    assert got.keys() == want.keys()
    view = blip2.mapped.safetensors_views(str(tmp_path / "model.safetensors"))
    assert [key for key in got if view(key) is None] == (["u16"] if "u16" in got else [])  # the rest are ours
    for key, t in got.items():
        assert t.dtype == want[key].dtype and t.shape == want[key].shape, key
        assert torch.equal(t.reshape(-1).view(torch.uint8), want[key].reshape(-1).view(torch.uint8)), key  # bytes
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key
    buffer = io.BytesIO()
    torch.save(got["f32"], buffer)
    assert len(buffer.getvalue()) < 4096  # (the file is 1 MB)


def test_where_torch_cannot_map_the_file_safetensors_reads_it(saved, monkeypatch):
    """The views need ``torch.UntypedStorage.from_file``; where it fails, safetensors' own tensors are loaded."""
    import blip2.checkpoint

    def refuse(path):
        raise OSError(f"{path}: no mapping here")

    root, state = saved
    monkeypatch.setattr(blip2.checkpoint, "safetensors_views", refuse)
    model = Blip2ForConditionalGeneration.from_pretrained(root / "safetensors")
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())


@linux_only
def test_converted_weights_are_copies_and_in_place_ones_are_not(saved):
    root, state = saved
    model = Blip2ForConditionalGeneration.from_pretrained(root / "safetensors", dtype=torch.bfloat16)
    lm_weight = model.language_model.model.decoder.layers[0].fc1.weight  # fp32 file -> bf16: converted
    assert lm_weight.dtype == torch.bfloat16 and _mapped_from(lm_weight) is None
    assert torch.equal(lm_weight, state["language_model.model.decoder.layers.0.fc1.weight"].bfloat16())
    query = model.qformer.encoder.layer[0].attention.attention.query.weight  # kept fp32: the file's own bytes
    assert query.dtype == torch.float32 and _mapped_from(query) == str(root / "safetensors" / "model.safetensors")


def _vm_flags(t: torch.Tensor) -> list[str]:
    """The VmFlags of the mapping that holds ``t``'s first byte (/proc/self/smaps)."""
    addr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


@linux_only
def test_fresh_large_tensors_ask_for_huge_pages_and_go_back_when_freed(monkeypatch):
    """mapped.empty (the blocked layout's memory): a large tensor is its own anonymous mapping
    advised for 2 MB pages (VmFlags "hg"), holds what is written, and is unmapped with its last view; a small one
    comes from torch's allocator."""
    big = empty((64, 1 << 17), torch.float32)  # 32 MB
    thp = os.path.exists("/sys/kernel/mm/transparent_hugepage")  # a kernel built without them refuses the advice
    assert ("hg" in _vm_flags(big)) == thp and _mapped_from(big) is None
    big.copy_(torch.arange(big.numel(), dtype=torch.float32).view(big.shape))
    assert big[63, -1].item() == big.numel() - 1
    view, addr = big[1:2], big.data_ptr()
    del big
    assert view[0, 0].item() == 1 << 17  # a view keeps the mapping
    del view
    with open("/proc/self/maps") as f:
        assert not any(int(line.split("-")[0], 16) <= addr < int(line.split()[0].split("-")[1], 16) for line in f)
    maps = []
    monkeypatch.setattr(blip2.mapped.mmap, "mmap", lambda *a, **k: maps.append(a))
    small = empty((4, 4), torch.bfloat16)
    assert small.dtype == torch.bfloat16 and small.shape == (4, 4) and not maps  # torch's allocator


@linux_only
def test_release_drops_pages_of_a_mapped_weight_and_keeps_written_ones(saved):
    root, state = saved
    model = Blip2ForConditionalGeneration.from_pretrained(root / "safetensors")
    emb = model.language_model.model.decoder.embed_tokens.weight  # 4096 x 64 fp32: 1 MB
    key = "language_model.model.decoder.embed_tokens.weight"
    emb.sum()  # resident
    resident = _resident_file_kb()
    release_pages(emb)
    assert resident - _resident_file_kb() > 900  # ~1 MB of the file's pages gone ...
    assert torch.equal(emb, state[key])  # ... and read again from the page cache
    with torch.no_grad():
        emb[100:200] += 1.0  # some pages now hold the only copy of their values
    release_pages(emb)
    expected = state[key].clone()
    expected[100:200] += 1.0
    assert torch.equal(emb, expected)
    anonymous = torch.randn(1000, 1000)  # ordinary memory: never released
    copy = anonymous.clone()
    release_pages(anonymous)
    assert torch.equal(anonymous, copy)


def _pagemap(t: torch.Tensor):
    """The /proc/self/pagemap entries of the pages wholly inside CPU tensor ``t`` (numpy uint64)."""
    import numpy as np

    lo, hi = -(-t.data_ptr() // 4096) * 4096, (t.data_ptr() + t.numel() * t.element_size()) // 4096 * 4096
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        return np.frombuffer(os.pread(f.fileno(), (hi - lo) // 4096 * 8, lo // 4096 * 8), dtype="<u8")


def _present(t: torch.Tensor) -> int:
    """How many of the pages wholly inside ``t`` are mapped in this process (pagemap bit 63)."""
    return int((_pagemap(t) >> 63).sum())


@linux_only
def test_release_reaches_back_over_neighbours_already_copied(tmp_path):
    """``back`` releases that many bytes before the tensor too: the pages of neighbours already copied that a
    read of the tensor mapped again (a fault maps the whole folio around the page read)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "ab.safetensors")
    want = {"a": torch.randn(512, 512), "b": torch.randn(512, 512)}
    save_file(want, path)  # 1 MB each, back to back
    f = safe_open(path, framework="pt")
    a, b = f.get_tensor("a"), f.get_tensor("b")
    assert b.data_ptr() == a.data_ptr() + 2**20
    a.sum(), b.sum()
    assert _present(a) > 250 and _present(b) > 250
    release_pages(b, back=2**19)  # b and the second half of a
    assert _present(b) == 0
    assert _present(a[:256]) >= 127  # (512 KB: 128 pages, 127 wholly inside where a starts mid-page)
    assert _present(a[256:]) == 0
    assert torch.equal(a, want["a"]) and torch.equal(b, want["b"])  # read again from the page cache


def _active_pages(t: torch.Tensor) -> tuple[int, int]:
    """(pages of ``t``'s file in the page cache's active list, pages looked at): the page frames from
    /proc/self/pagemap, their flags from /proc/kpageflags (KPF_ACTIVE, bit 6)."""
    frames = _pagemap(t) & ((1 << 55) - 1)
    with open("/proc/kpageflags", "rb", buffering=0) as f:
        flags = [int.from_bytes(os.pread(f.fileno(), 8, int(x) * 8), "little") for x in frames if x]
    return sum(fl >> 6 & 1 for fl in flags), len(flags)


@pytest.mark.skipif(not os.access("/proc/kpageflags", os.R_OK), reason="page flags need root")
def test_released_pages_are_the_first_the_kernel_reclaims(tmp_path):
    """release_pages marks the file's pages cold (MADV_COLD) before unmapping them: copied, they are needed less
    than the pages the next calls read, which the kernel would otherwise evict first (read once, against twice)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "w.safetensors")
    save_file({"w": torch.randn(1024, 1024)}, path)
    for _ in range(3):  # read more than once: the page cache's active list
        with open(path, "rb") as f:
            f.read()
    w = safe_open(path, framework="pt").get_tensor("w")
    w.sum()
    active, seen = _active_pages(w)
    assert seen > 1000 and active > seen // 2  # (the kernel activates pages read again)
    release_pages(w)
    w2 = safe_open(path, framework="pt").get_tensor("w")
    w2.sum()  # mapped again, from the page cache: the same pages, now inactive
    active, seen = _active_pages(w2)
    assert seen > 1000 and active < seen // 10


@linux_only
def test_fuse_after_an_in_place_edit_keeps_the_edit(saved):
    """Fusing releases each original once copied; an edit made since loading (pages that hold the only copy of
    their values) reaches the fused layer, and unfusing gives the same parameter objects back with it. While
    fused, the original parameters are empty: the fused layer holds their values."""
    root, state = saved
    model = Blip2ForConditionalGeneration.from_pretrained(root / "safetensors")
    layer = model.language_model.model.decoder.layers[0]
    q, fc1 = layer.self_attn.q_proj.weight, layer.fc1.weight
    with torch.no_grad():
        q.mul_(2.0)
    fast.fuse(model)
    prefix = "language_model.model.decoder.layers.0."
    assert q.numel() == 0 and fc1.numel() == 0
    fused = model.state_dict()
    assert torch.equal(fused[prefix + "self_attn.q_proj.weight"], state[prefix + "self_attn.q_proj.weight"] * 2.0)
    assert torch.equal(fused[prefix + "fc1.weight"], state[prefix + "fc1.weight"])
    fast.unfuse(model)
    assert layer.self_attn.q_proj.weight is q and layer.fc1.weight is fc1
    assert torch.equal(q, state[prefix + "self_attn.q_proj.weight"] * 2.0)
    assert torch.equal(fc1, state[prefix + "fc1.weight"])


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    from safetensors.torch import save

    blob = save(tensors)
    n = int.from_bytes(blob[:8], "little")
    return blob[8:8 + n], blob[8 + n:]


def _with_header(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def _broken_files() -> dict[str, bytes]:
    header, data = _safetensors_bytes({"a": torch.arange(10.0), "b": torch.ones(3, 4)})
    n = len(header)
    parsed = json.loads(header)

    def edited(key: str, field: str, value) -> bytes:
        h = json.loads(header)
        h[key][field] = value
        return _with_header(h, data)

    return {
        "header length 2**40": (2**40).to_bytes(8, "little") + header + data,
        "header length past the end": (n + 10**6).to_bytes(8, "little") + header + data,
        "bad JSON": n.to_bytes(8, "little") + b"{" + header[1:-1] + b"!" + data,
        "not UTF-8": n.to_bytes(8, "little") + b"\xff" * n + data,
        "header not an object": _with_header([1, 2], data),
        "offsets past the end": edited("b", "data_offsets", [40, 10**12]),
        "overlapping offsets": edited("b", "data_offsets", [0, 48]),
        "shape against offsets": edited("b", "shape", [3, 5]),
        "huge shape": edited("b", "shape", [2**40, 2**40]),
        "unknown dtype": edited("b", "dtype", "Q7"),
        "truncated data": (n.to_bytes(8, "little") + header + data)[:-7],
        "shorter than a header": b"\x10\x00\x00",
        "empty": b"",
        "valid": _with_header(parsed, data),  # the control: the same bytes as written by safetensors
    }


@pytest.mark.parametrize("case", list(_broken_files()))
def test_a_malformed_safetensors_file_is_an_error_naming_it(tmp_path, case):
    from safetensors import safe_open

    from blip2.checkpoint import iter_checkpoint_tensors

    path = tmp_path / "model.safetensors"
    path.write_bytes(_broken_files()[case])
    if case == "valid":
        with safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == ["a", "b"]
        assert [k for k, _ in iter_checkpoint_tensors(str(tmp_path))] == ["a", "b"]
        return
    cut_short = case in ("header length past the end", "truncated data", "shorter than a header", "empty")
    message = rf"^{tmp_path}/model\.safetensors: not a valid safetensors file" + (": truncated" if cut_short else "")
    with pytest.raises(CheckpointError, match=message):
        dict(iter_checkpoint_tensors(str(tmp_path)))


def test_a_malformed_shard_fails_from_pretrained_naming_it(saved, tmp_path):
    root, _ = saved
    with open(root / "safetensors" / "config.json") as f:
        (tmp_path / "config.json").write_text(f.read())
    blob = (root / "safetensors" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file: truncated"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 3)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
