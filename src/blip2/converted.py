"""The weights a load converts to another dtype, written to the layout cache once and memory-mapped by later loads.

The published BLIP-2 checkpoints are fp32, and users load them in bf16 or fp16: every load converts every
weight, which on a CPU is bound by the fresh memory it fills (blip2-opt-2.7b: 15 GB read, 7.5 GB written,
4.4-18.6 s on a 2-core VM, most of a first caption's time; transformers' load converts the same way). What the
conversion gives depends on nothing but the files' bytes and the dtype, so the first load of a checkpoint in a
dtype writes the tensors it converted, converted, to ``cache_dir()/layouts`` (``blip2.layout_files``), and later
loads take them from that file in place of the checkpoint's, as they would from a checkpoint stored in that
dtype: nothing converted or copied, the weights read from the page cache when first used. The tensors the load
takes as stored (the Q-Former, kept in fp32 under bf16) stay the checkpoint's. A model loaded so has the copy
among its weight files (``Origin``), so the language model's blocked layout (``blip2.fast.layout_cache``) is
made from it, and cached, too.

Used by ``from_pretrained`` onto the CPU, without ``device_map`` or quantization, where the ``dtype`` asked for
converts most of the weights' bytes (a bf16 checkpoint whose Q-Former alone is kept in fp32 gets no copy: its
conversion costs less than a file). The key hashes the weight files (resolved path, device, inode, size,
modification time), the model's class, the checkpoint's key prefix (a part of BLIP-2 loaded alone), the dtype
and ``VERSION``.

Safety: a file that fails any check is ignored with a warning, the checkpoint loaded as before and the file
written again; never an error. The file must be this user's, written for the key; the load through it must
convert nothing (every tensor the copy lacks, or holds in another dtype, would be) and take every tensor it
holds; and three of them must hold the checkpoint's first and last elements, converted. The writer reads the
checkpoint anew through a mapping of its own, not the model's tensors (the caller may train them while the file
is written), 16 MB at a time, in a background thread while the process is idle, and keeps the file only if the
weight files are unchanged once it is written. Writing is skipped where the disk has less than twice the file's
size free. ``BLIP2_LAYOUT_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from blip2 import layout_files
from blip2.cache import private_dir
from blip2.mapped import as_bits, file_stat, release_pages, safetensors_views

__all__ = ["VERSION", "ConvertedCopy", "PlanEntry"]

log = logging.getLogger("blip2.converted")

VERSION = 1  # of the file's contents
# tensors whose first and last elements are compared with the checkpoint's at each load of a copy, and how many
_CHECKED, _ENDS = 3, 256
# elements of the checkpoint converted at a time by the writer (its pages released before the next are read)
_CHUNK_BYTES = 16 << 20

# one tensor a load took from the weight files: its key there, its key in the model, its dtype there, the dtype the
# model took it in, its shape (``checkpoint.load_into``'s ``plan``)
PlanEntry = tuple[str, str, torch.dtype, torch.dtype, tuple[int, ...]]
Sources = Callable[[], Iterable[tuple[str, torch.Tensor]]]  # the checkpoint's (key, mapped tensor) pairs, anew


class ConvertedCopy:
    """The converted copy of one checkpoint for one model class, key prefix and dtype: its path, whether it is
    there, its checks, and its writing."""

    def __init__(self, folder: Path, model_class: type, files: list[str], prefix: str, dtype: torch.dtype) -> None:
        self.files = [os.path.realpath(f) for f in files]
        self.stats = [file_stat(f) for f in self.files]
        name = f"{model_class.__module__}.{model_class.__qualname__}"
        what = {"version": VERSION, "format": "converted", "dtype": str(dtype), "class": name, "prefix": prefix,
                "files": [[f, *st] for f, st in zip(self.files, self.stats)]}
        self.key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        source = hashlib.sha256(json.dumps([self.files, str(dtype), "converted", name, prefix]).encode()).hexdigest()
        self.path = folder / f"{source[:16]}-{self.key[:32]}.safetensors"

    @classmethod
    def of(cls, model_class: type, files: list[str], prefix: str, dtype: torch.dtype | None) -> ConvertedCopy | None:
        """The copy for a load of ``files`` in ``dtype``; None where the cache is off or cannot be used."""
        if dtype is None or not layout_files.enabled():
            return None
        try:
            return cls(private_dir(layout_files.directory()), model_class, files, prefix, dtype)
        except OSError as e:
            log.info("blip2 layout cache: no converted copy (%s)", e)
            return None

    def load(self, read: Callable[[Iterable[tuple[str, torch.Tensor]], list[PlanEntry]], None],
             sources: Sources) -> bool:
        """Load a model from the checkpoint with the copy's tensors in place of those it converts
        (``read(tensors, plan)``: ``checkpoint.load_into`` of those pairs, which fills ``plan``), and check what it
        took; False, with a warning, where the file is refused."""
        try:
            with layout_files.open_checked(self.path, self.key) as handle:
                stored = list(handle.keys())
            view = safetensors_views(str(self.path))
        except Exception as e:  # safetensors' own errors (a truncated file, a bad header) have no common base
            self.reject(str(e))
            return False
        copied, names = set(stored), sorted(stored)
        picked = {names[i * (len(names) - 1) // (_CHECKED - 1)] for i in range(_CHECKED)} if names else set()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the copy's, the checkpoint's) of the picked tensors

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key, t in sources():
                if key in copied:
                    copied.discard(key)
                    mine = view(key)
                    if key in picked:
                        pairs.append((mine, t))
                    t = mine
                yield key, t

        plan: list[PlanEntry] = []
        try:
            read(tensors(), plan)
            why = self._check(plan, copied, pairs)
        except (ValueError, RuntimeError, OSError) as e:  # (CheckpointError: a key missing, unexpected, mis-shaped)
            why = str(e)
        if why is not None:
            self.reject(why)
        return why is None

    @staticmethod
    def _check(plan: list[PlanEntry], unused: set[str],
               pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> str | None:
        """Why a load through the copy did not give the model the checkpoint's tensors in the dtypes asked for
        (None: it did): nothing may have been converted (a tensor the copy lacks, or holds in another dtype),
        every tensor of the copy must have been taken, and the picked ones must hold the checkpoint's first and
        last elements converted, bit for bit."""
        for src, _, stored, target, _ in plan:
            if stored != target:
                return f"{src!r} came as {stored}, the model takes it in {target}"
        if unused:
            return f"it holds {len(unused)} tensors the load does not take, such as {min(unused)!r}"
        for mine, theirs in pairs:
            mine, theirs = mine.reshape(-1), theirs.reshape(-1)
            for part in (slice(0, _ENDS), slice(max(0, theirs.numel() - _ENDS), theirs.numel())):
                if not torch.equal(as_bits(mine[part]), as_bits(theirs[part].to(mine.dtype))):
                    return "it does not hold the checkpoint's values"
        return None

    def reject(self, why: str) -> None:
        log.warning("blip2 layout cache: ignoring %s (%s); loading the checkpoint and writing it anew",
                    self.path, why)

    def write(self, plan: list[PlanEntry], sources: Sources) -> None:
        """After a load from the checkpoint (``plan``: what it took), the tensors it converted written in the
        background, converted from the checkpoint read anew, where they are most of the weights' bytes (a few
        tensors converted, as a bf16 checkpoint's Q-Former kept in fp32, cost less than a file). Under the
        checkpoint's keys: a load takes them in place of the checkpoint's."""
        converted = [e for e in plan if e[2] != e[3]]
        if 2 * sum(map(_nbytes, converted)) < sum(map(_nbytes, plan)):
            return
        # whole 64-byte blocks first: every tensor up to the first odd one then starts on 64 bytes of the file
        ordered = sorted(converted, key=lambda e: _nbytes(e) % 64 != 0)
        views: dict[str, torch.Tensor] = {}
        wanted = {src for src, *_ in ordered}

        def source(src: str) -> torch.Tensor:
            if not views:  # in the writing thread: the checkpoint mapped anew, nothing read yet
                views.update((k, t) for k, t in sources() if k in wanted)
            return views.pop(src)  # dropped once written: a file's mapping goes with its last tensor

        entries = [(src, target, shape, _converted_parts(source, src, target)) for src, _, _, target, shape in ordered]
        layout_files.write(self.path, entries, {"key": self.key, "files": json.dumps(self.files),
                                                "format": f"converted v{VERSION}"},
                           what="converted copy", valid=lambda: [file_stat(f) for f in self.files] == self.stats)


def _nbytes(entry: PlanEntry) -> int:
    """The bytes of a tensor the load took, in the dtype the model took it in."""
    *_, target, shape = entry
    return torch.Size(shape).numel() * target.itemsize


def _converted_parts(source: Callable[[str], torch.Tensor], src: str,
                     dtype: torch.dtype) -> Callable[[], Iterator[np.ndarray]]:
    """The bytes of the checkpoint's tensor ``src`` in ``dtype``, 16 MB of it converted at a time into one buffer
    (each piece written before the next is made), the mapped pages of each piece released once read."""
    def parts() -> Iterator[np.ndarray]:
        t = source(src).reshape(-1)
        step = max(1, _CHUNK_BYTES // t.element_size())
        buffer = torch.empty(min(step, t.numel()), dtype=dtype)
        for i in range(0, t.numel(), step):
            piece = t[i:i + step]
            out = buffer[:piece.numel()]
            out.copy_(piece)
            release_pages(piece, back=i * t.element_size())  # (and the folio around it read before)
            yield out.view(-1).view(torch.uint8).numpy()
    return parts
