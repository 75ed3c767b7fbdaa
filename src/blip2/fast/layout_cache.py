"""The language model's blocked layout written to disk once, and memory-mapped by later loads of the checkpoint.

Laying a real-size language model out for the native step (``linear._block``) is bound by the memory it fills: for
blip2-opt-2.7b in fp32, 11 GB of fresh pages touched for the first time, about 10 s of the ``generate`` that lays it
out (the second of several rows: ``blip2.fast.lazy``). The layout depends on nothing but the checkpoint's bytes,
the dtype and the code that lays it out, so the first process to lay a checkpoint out writes the blocked weights to
``cache_dir()/layouts`` (one safetensors file per checkpoint and dtype), and later processes map that file
(safetensors' ``safe_open``: views of a private mapping, nothing copied) instead of blocking: their weights come
from the page cache, as the checkpoint's own do.

What is cached: the language model's ``"blocked"`` weights (the native step's, which ``"auto"`` picks on a CPU where
the kernels load, and ``"fuse"``'s there), and the native step's greedy-head screen where it has one (an fp32 head
on a CPU with AVX-512 BF16: ``kernels.screen_weight``, half the head's bytes). The vision encoder's and Q-Former's
oneDNN layout is opaque to us (its blocking depends on the oneDNN build and the CPU), and the biases and norms are
used as loaded.

Safety, in the order checked (each failure is one log line and the model laid out as before; never an error):
- Only for a model ``from_pretrained`` loaded (``Origin``), whose weight files are still the ones it mapped, and
  whose language-model weights are all still the files' mapped tensors, never written into (``Origin.holds``:
  the address at load, no anonymous page). A model trained, reloaded, converted at load or edited before its
  first ``generate`` neither reads nor writes the cache.
- The file's name hashes the key: the weight files (resolved path, device, inode, size, modification time), the
  dtype, the kernels' build (their library's name hashes their sources, torch, the compiler and the CPU's
  flags), the Python code that names and lays out the weights, and ``VERSION``; the key itself is checked
  against the file's metadata.
- Each mapped tensor must have the name, dtype and shape the layout would give it, and three of its blocks must
  equal the checkpoint's rows bit for bit, or a screen's what its head's rows make (a few KB read, which catches a
  file of another checkpoint or of zeros). A file that fails any check, or that safetensors cannot read (truncated,
  a bad header), is ignored with a warning, the weights are laid out as before (those already taken from it passed
  their checks), and the file is written again.
- The folder is private (0700, this user's, as the kernels' is); a file is written under a temporary name,
  fsync'ed and renamed, so a reader sees a whole file or none (``_write_file`` writes the safetensors format
  itself, to pace the writing; safetensors reads it). Writing is skipped when the disk has less than
  twice the file's size free.

Writing happens in a background thread once the layout is done, from the laid-out weights, at the lowest CPU
priority and the disk's pace, and only while the process is idle (``blip2.layout_files``: it pauses while a
``generate`` runs, whose calls it slowed by seconds on a 2-core VM), so no ``generate`` waits for it (the
process does, at exit); it drops what it has flushed from the page cache (this process holds the layout in its
own memory; cached, the file pushed out the checkpoint pages the next calls read). Each write removes the
checkpoint's older layouts (another key), layouts of checkpoints that are gone and temporary files of dead
processes. ``BLIP2_LAYOUT_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2 import layout_files
from blip2.cache import private_dir
from blip2.fast import decoding, kernels, linear
from blip2.fast.linear import BLOCKED_SOURCE, FusedLinear, walk
from blip2.layout_files import directory, enabled, layouts_of, wait
from blip2.mapped import Origin, as_bits, release_pages

__all__ = ["VERSION", "directory", "enabled", "laying_out", "layouts_of", "mappable", "wait"]

log = logging.getLogger("blip2.fast.layout_cache")

VERSION = 1  # of the file's contents: changed whenever what a name holds changes in a way the code hash misses
# modes whose layout of the language model is blocked where the kernels load
_BLOCKED_MODES = ("auto", "native", "fuse", "compile")
# a cached layout is mapped at a model's first generate where it and the weight files take at most this share of
# the memory (``mappable``); where they do not, the first generate's pages push out the second's
MAPPED_SHARE = 0.75
# the names of a greedy head's screen (``kernels.screen_weight``) in the file: the head's name and these
_SCREEN = (":screen", ":screen-norms")


@contextmanager
def laying_out(model: nn.Module, mode: str) -> Iterator[None]:
    """Around ``blip2.fast.apply(model, mode)``: for a model ``from_pretrained`` loaded, its language model's blocked
    weights taken from the cached file where one matches, and written to it afterwards where none does."""
    cached = _open(model, mode)
    if cached is None:
        yield
        return
    token = BLOCKED_SOURCE.set(cached)
    try:
        yield
    finally:
        BLOCKED_SOURCE.reset(token)
        cached.close()
    cached.finish()


def mappable(model: nn.Module, mode: str) -> bool:
    """Whether laying ``model`` out for ``mode`` would map its language model's blocked weights from a file in the
    cache (its name matches; ``laying_out`` checks its contents) that the page cache can keep beside the weight
    files: the two within ``MAPPED_SHARE`` of the machine's memory. Says nothing."""
    layout = _open(model, mode, quiet=True)
    if layout is None or not layout.path.is_file():
        return False
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        size = layout.path.stat().st_size + sum(os.path.getsize(f) for f in layout.files)
    except (ValueError, OSError):
        return False
    return size <= MAPPED_SHARE * memory


def _open(model: nn.Module, mode: str, quiet: bool = False) -> _Layout | None:
    info = (lambda *args: None) if quiet else log.info
    if not enabled() or mode not in _BLOCKED_MODES or not hasattr(model, "language_model"):
        return None
    lm = model.language_model
    weight = decoding.table(lm)
    if weight.device.type != "cpu" or not kernels.load() or not kernels.blocked_supports(weight.dtype):
        return None  # not laid out in blocks here
    origin = model.__dict__.get("_origin")
    if not isinstance(origin, Origin):
        info("blip2 layout cache: not used, the model was not loaded from weight files (from_pretrained)")
        return None
    if not origin.unchanged():
        info("blip2 layout cache: not used, the weight files changed since the model was loaded")
        return None
    layers = {name: m for name, m in nn.Module.named_modules(lm) if isinstance(m, nn.Linear)}
    for name, layer in layers.items():
        if not origin.holds(f"language_model.{name}.weight", layer.weight):
            info("blip2 layout cache: not used, language_model.%s.weight is not the checkpoint's tensor as "
                 "loaded (converted at load, replaced or written into since)", name)
            return None
    try:
        folder = private_dir(directory())
    except OSError as e:
        info("blip2 layout cache: not used (%s)", e)
        return None
    return _Layout(folder, origin, lm, layers, read=not quiet)


@functools.cache  # the same for the process's life; asked for at each first generate and layout
def _code_hash() -> str:
    """The Python code that names the blocked weights and lays them out."""
    h = hashlib.sha256()
    for module in (linear, decoding, kernels):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


class _Layout:
    """One model's layout in the cache: the file's tensors handed to ``FusedLinear`` as it lays the model out
    (``find``), and the layout written once it is done (``finish``) where the file was missing or wrong."""

    def __init__(self, folder: Path, origin: Origin, lm: nn.Module, layers: dict[str, nn.Linear],
                 read: bool = True) -> None:
        dtype = decoding.table(lm).dtype
        what = {"version": VERSION, "format": "blocked", "dtype": str(dtype), "kernels": kernels.build_key(),
                "code": _code_hash(), "files": [[f, *st] for f, st in zip(origin.files, origin.stats)]}
        self.key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        source = hashlib.sha256(json.dumps([origin.files, str(dtype)]).encode()).hexdigest()
        self.path = folder / f"{source[:16]}-{self.key[:32]}.safetensors"
        self.files, self.lm = origin.files, lm
        self.names = {id(layer): name for name, layer in layers.items()}
        self.found: set[str] = set()  # the names taken from the file
        self.file: Any = None  # safetensors' handle while the file is used
        self.stored: set[str] = set()
        self.rejected = False
        if read and self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            self.file = layout_files.open_checked(self.path, self.key)
            self.stored = set(self.file.keys())
        except Exception as e:  # safetensors' own errors (a truncated file, a bad header) have no common base
            self._reject(str(e))

    def _reject(self, why: str) -> None:
        log.warning("blip2 layout cache: ignoring %s (%s); laying the weights out again and writing it anew",
                    self.path, why)
        self.file, self.rejected = None, True

    def _name(self, layers: Sequence[nn.Linear]) -> str | None:
        """The name of a blocked weight: its layers' names in the language model, joined by "+"."""
        names = [self.names.get(id(layer)) for layer in layers]
        return None if None in names else "+".join(names)  # type: ignore[arg-type]

    def find(self, layers: Sequence[nn.Linear], weights: Sequence[Tensor], shape: tuple[int, ...]) -> Tensor | None:
        name = self._name(layers)
        if self.file is None or name is None:
            return None
        if name not in self.stored:
            self._reject(f"no tensor {name!r}")
            return None
        t = self.file.get_tensor(name)
        if t.dtype != weights[0].dtype or tuple(t.shape) != tuple(shape):
            self._reject(f"{name!r} is {t.dtype} {tuple(t.shape)}, the layout gives {weights[0].dtype} {tuple(shape)}")
            return None
        if not _agrees(t, weights):
            self._reject(f"{name!r} does not hold the checkpoint's values")
            return None
        self.found.add(name)
        return t

    def find_screen(self, head: FusedLinear) -> tuple[Tensor, Tensor] | None:
        name = self._name(head._layers)
        if self.file is None or name is None:
            return None
        names = [name + suffix for suffix in _SCREEN]
        if any(n not in self.stored for n in names):
            self._reject(f"no screen of {name!r}")
            return None
        screen, norms = (self.file.get_tensor(n) for n in names)
        n, k = head.out_features, head.in_features
        for t, dtype, shape in ((screen, torch.bfloat16, kernels.blocked_shape(n, k, torch.bfloat16)),
                                (norms, torch.float32, (2, n))):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                self._reject(f"the screen of {name!r} has a {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
                return None
        if not _screen_agrees(head.w, n, screen, norms):
            self._reject(f"the screen of {name!r} is not its head's")
            return None
        self.found.update(names)
        return screen, norms

    def close(self) -> None:
        self.file = None  # the tensors taken keep their mapping

    def finish(self) -> None:
        """After the layout: nothing where every blocked weight came from the file, else the layout written."""
        tensors: dict[str, Tensor] = {}
        for layer in _blocked_layers(self.lm):
            name = self._name(layer._layers)
            if name is None:
                log.info("blip2 layout cache: not written, a blocked layer is not one of the language model's")
                return
            tensors[name] = layer.w
        if not tensors:
            return
        # a native step's greedy-head screen (bf16 CPUs, fp32 heads), of the language model's lm_head
        screen, head = getattr(self.lm.decode_step, "screen", None), getattr(self.lm, "lm_head", None)
        name = self._name(head._layers) if screen is not None and isinstance(head, FusedLinear) else None
        if name is not None:  # last, the norms after the screen: only their size may not be whole 64-byte blocks
            tensors |= {name + suffix: t for suffix, t in zip(_SCREEN, screen)}
        if not self.rejected and self.found == self.stored == set(tensors):
            log.info("blip2 layout cache: %d blocked weights mapped from %s", len(tensors), self.path)
            return
        if self.stored and not self.rejected:  # every name found, but the file holds others too
            self._reject(f"it holds {len(self.stored)} weights, the layout {len(tensors)}")
        entries = [(name, t.dtype, tuple(t.shape), layout_files.tensor_parts(t)) for name, t in tensors.items()]
        layout_files.write(self.path, entries,
                           {"key": self.key, "files": json.dumps(self.files), "format": f"blocked v{VERSION}"})


def _blocked_layers(root: nn.Module) -> list[FusedLinear]:
    """The blocked ``FusedLinear`` layers below ``root`` (``walk``: not the guarded walks, which undo the layout)."""
    return [m for m in walk(root) if isinstance(m, FusedLinear) and m.fmt == "blocked"]


def _agrees(t: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether the first, middle and last blocks of blocked weight ``t`` hold the plain ``weights``' rows, bit
    for bit."""
    n, k, per = sum(w.shape[0] for w in weights), weights[0].shape[1], t.shape[2]
    for b in sorted({0, t.shape[0] // 2, t.shape[0] - 1}):
        lo, hi = b * per, min((b + 1) * per, n)
        if hi <= lo:
            return False
        want = _rows(weights, lo, hi)
        got = kernels.unblock_weight(t[b:b + 1], hi - lo, k)
        if not torch.equal(as_bits(got), as_bits(want)):
            return False
    return True


def _screen_agrees(w: Tensor, n: int, screen: Tensor, norms: Tensor) -> bool:
    """Whether the first, middle and last blocks of a stored ``screen`` and their ``norms`` are, bit for bit,
    what ``kernels.screen_weight`` makes of those rows of the blocked head ``w`` (of ``n`` rows)."""
    per = screen.shape[2]
    for b in sorted({0, screen.shape[0] // 2, screen.shape[0] - 1}):
        rows = slice(b * per, min((b + 1) * per, n))
        made, made_norms = torch.empty_like(screen[b:b + 1]), torch.empty_like(norms[:, rows])
        kernels.screen_blocks(w, n, b, b + 1, made, made_norms)
        if not (torch.equal(as_bits(made), as_bits(screen[b:b + 1]))
                and torch.equal(as_bits(made_norms), as_bits(norms[:, rows]))):
            return False
    return True


def _rows(weights: Sequence[Tensor], lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of the concatenated ``weights``. Each weight's file pages are released once read: the kernel
    maps a file's pages in runs around the one read (large folios), and the weight is not needed again."""
    pieces, start = [], 0
    for w in weights:
        a, b = max(lo, start), min(hi, start + w.shape[0])
        if a < b:
            pieces.append(w[a - start:b - start].clone())
            release_pages(w)
        start += w.shape[0]
    return torch.cat(pieces)
