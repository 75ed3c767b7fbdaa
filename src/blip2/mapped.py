"""Tensors mapped from checkpoint files: converting one without holding it whole twice, and handing its pages
back once it has been copied (a mapping stays resident as long as any tensor of its file lives)."""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Ahead", "Origin", "SAFETENSORS_DTYPES", "as_bits", "convert", "discard", "empty", "file_stat",
           "prefetch_in_background", "prefetch_pages", "release_pages", "safetensors_views", "unwritten"]


# bytes converted at a time: the source pages of each piece are released before the next is read
_CONVERT_CHUNK = 16 * 2**20


def convert(t: torch.Tensor, dtype: torch.dtype, device: torch.device | str = "cpu", back: int = 0) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``: ``t`` itself where both match (a mapped tensor is used in place), else
    a new tensor filled piece by piece, each piece of ``t`` released after it is copied (``release_pages``),
    so a tensor mapped from a file is never resident whole next to its converted copy. ``back``: bytes just
    before ``t`` in its mapping that are already copied and may be released with it (the converted tensors
    before it in its file): reading a piece maps the file's pages around it, some of them before it."""
    device = torch.device(device)
    if t.dtype == dtype and t.device == device:
        return t
    if not t.is_contiguous():  # (a strided view saved by torch.save) converted whole
        return t.to(device=device, dtype=dtype)
    out = torch.empty(t.shape, dtype=dtype, device=device)
    src, dst = t.reshape(-1), out.view(-1)
    step = max(1, _CONVERT_CHUNK // t.element_size())
    for i in range(0, src.numel(), step):
        dst[i:i + step].copy_(src[i:i + step])
        release_pages(src[i:i + step], back=back + i * t.element_size())
    return out


# below this, a tensor comes from torch's allocator as any other
_HUGE_PAGES_FROM = 32 << 20


def _own_mapping(nbytes: int) -> bool:
    """Whether ``empty`` gives a tensor of ``nbytes`` an anonymous mapping of its own (else torch's allocator)."""
    return nbytes >= _HUGE_PAGES_FROM and hasattr(mmap, "MADV_HUGEPAGE")


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, backed by 2 MB pages where the kernel gives them (``MADV_HUGEPAGE``): what
    costs in filling fresh memory is faulting its pages in one by one (blip2-opt-2.7b's blocked layout in fp32
    is 11 GB of them), and a 2 MB page faults once for 512 small ones. Filling 2 GB took 1.1-2.0 s in 4 KB pages
    and 0.25 s in 2 MB ones on a 2-core VM, the whole layout of that model 8.5-10.3 s instead of 11.2-13.9
    (memory full of page cache: the kernel reclaims and compacts for each). Nothing is faulted in here: ``Ahead``
    faults it for a writer. Small tensors, and systems without the advice, get torch's allocator. The memory goes
    back to the system when the last view of it is freed."""
    n = torch.Size(shape).numel() * dtype.itemsize
    if not _own_mapping(n):
        return torch.empty(shape, dtype=dtype)
    pages = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        pages.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # transparent huge pages compiled out: small pages, as torch's would be
        pass
    return torch.frombuffer(pages, dtype=dtype).view(shape)  # the tensor holds the mapping


class Ahead:
    """A fresh tensor (``empty``) for a writer that fills it in order along its first dimension, its pages faulted
    in a chunk at a time just ahead of the writing (``upto``), by torch's zero_ on every thread: a writer filling it
    a few MB at a time (``linear._block``) faulted them one at a time on one thread, and laying blip2-opt-2.7b's
    language model out from its fp32 files took 11-18 s instead of 6-9 on a 2-core VM. Faulted whole first, all
    of it was resident beside the source pages a copy reads and releases as it goes: laying out that model's head,
    tied to its embeddings, took 0.26 GB more at the peak than the model after."""

    def __init__(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, chunk_bytes: int = 32 << 20) -> None:
        self.t = empty(shape, dtype)
        self.step = max(1, chunk_bytes // max(1, self.t[0].nbytes))
        self.done = 0 if _own_mapping(self.t.nbytes) else len(self.t)  # (torch's allocator's: nothing to fault)

    def upto(self, end: int) -> torch.Tensor:
        """The tensor, its first ``end`` rows faulted in."""
        while self.done < end:
            self.t[self.done:self.done + self.step].zero_()
            self.done += self.step
        return self.t


# safetensors' dtype names; a tensor of another (unsigned wider than 8 bits, ...) is left to safetensors
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool,
                       **({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
                          if hasattr(torch, "float8_e5m2") else {})}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width, to compare float tensors bit for bit (NaNs and signed zeros
    included)."""
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def safetensors_views(path: str) -> Callable[[str], torch.Tensor | None]:
    """For a safetensors file whose header safetensors has checked: ``view(key)``, the tensor under ``key`` as a
    view of one private (copy-on-write) mapping of the file, None for a dtype left to safetensors. Each view
    has a storage of its own bytes alone (what ``torch.save`` of it writes), and making it reads nothing: a
    tensor made from the bytes (``torch.asarray``, as safetensors does) touches its first page."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = torch.UntypedStorage.from_file(path, shared=False, nbytes=os.path.getsize(path))
    data = 8 + n

    def view(key: str) -> torch.Tensor | None:
        entry = header[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        begin, end = entry["data_offsets"]
        return torch.empty(0, dtype=dtype).set_(base[data + begin:data + end], 0, entry["shape"])

    return view


@dataclass(frozen=True)
class Origin:
    """The weight files a model was loaded from, as they were then, and the address of each of its tensors:
    what tells, later, that a tensor still holds the file's values (``holds``). ``from_pretrained`` records it
    as the model's ``_origin``; ``blip2.fast.layout_cache`` reads it."""

    files: tuple[str, ...]  # resolved paths
    stats: tuple[tuple[int, int, int, int], ...]  # each file's device, inode, size, modification time (ns)
    addresses: dict[str, int]  # state-dict key -> data_ptr at load

    @classmethod
    def of(cls, files: list[str], model: nn.Module) -> Origin:
        resolved = tuple(os.path.realpath(f) for f in files)
        tensors = nn.Module.state_dict(model, keep_vars=True)
        return cls(resolved, tuple(file_stat(f) for f in resolved),
                   {k: t.data_ptr() for k, t in tensors.items() if t is not None and t.device.type == "cpu"})

    def unchanged(self) -> bool:
        """Whether the files are still the ones loaded (a file changed in place changes what the pages of its
        mapping not yet read hold)."""
        try:
            return tuple(file_stat(f) for f in self.files) == self.stats
        except OSError:
            return False

    def holds(self, key: str, t: torch.Tensor) -> bool:
        """Whether ``t``, the model's tensor under ``key``, is the one loaded, mapped from the files and never
        written into (in place, by training, ``load_state_dict``, ...). Conservative: False for a tensor
        converted at load (another dtype: new memory), replaced, or written into since."""
        return self.addresses.get(key) == t.data_ptr() and t.numel() > 0 and unwritten(t)


def file_stat(path: str) -> tuple[int, int, int, int]:
    """What tells that a file is the one it was: its device, inode, size and modification time (ns)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_PAGE = mmap.PAGESIZE
# /proc/self/pagemap: one little-endian 64-bit entry per page of the address space
_PRESENT, _SWAPPED, _FILE_PAGE = 1 << 63, 1 << 62, 1 << 61
_MADV_COLD = 20  # Linux's (Python's mmap module may not name it)
_MADVISE: list[Callable[[int, int, int], int] | None] = []  # libc's madvise, looked up once (None: not here)


def release_pages(t: torch.Tensor, back: int = 0) -> None:
    """Drop the pages of CPU tensor ``t`` from this process's resident memory, where that changes no value.

    For a tensor mapped from a file (the loaded weights) once it has been copied into another dtype or layout:
    the mapping lives as long as any tensor of its file, and with it every page read through it, so dropping
    the tensor frees nothing. ``madvise(MADV_DONTNEED)`` unmaps the pages; a later read maps them again from
    the page cache. Before that ``MADV_COLD`` makes the file's pages the first the kernel reclaims under
    memory pressure: copied, they are needed less than the pages the next calls read (laying blip2-opt-2.7b out
    beside its 15 GB checkpoint in 23 GB, the kernel evicted the vision encoder's pages, read once, and kept
    the language model's, read twice, and the first call's vision encoder took 17-20 s instead of ~5 in half
    the runs). Only if every page of ``t`` is a file's page: a private mapping's page written into (by
    training, say) is anonymous memory holding the only copy of its values, and anonymous memory is never
    released. Pages ``t`` shares with its neighbours at either end are kept. Does nothing for a strided
    view, nor where ``/proc/self/pagemap`` or ``madvise`` are missing (not Linux).

    ``back``: bytes just before ``t`` in its mapping that the caller has copied too (up to one huge page of them
    are released with ``t``). A fault maps the whole folio around the page read (large folios, up to a huge
    page, when the file is read from disk), so reading ``t`` maps pages of its neighbours again after they
    were released: converting a 480 MB fp32 file not in the page cache kept 8 MB of them resident, 3.5% of
    the bf16 weights."""
    span, madvise = _pages(t, inner=True, back=min(back, _folio_bytes())), _madvise()
    if span is not None and madvise is not None and _only_file_pages(*span):
        madvise(span[0], span[1] - span[0], _MADV_COLD)  # (refused before Linux 5.4: then only unmapped)
        madvise(span[0], span[1] - span[0], mmap.MADV_DONTNEED)


def discard(t: torch.Tensor) -> None:
    """Give the pages of CPU tensor ``t`` back to the system, its values lost (zeros after, or the file's where it
    is mapped from one): for a copy about to be freed piece by piece as it is read, whose memory would otherwise
    stay until its last piece is read. Pages shared with its neighbours at either end are kept."""
    span, madvise = _pages(t, inner=True), _madvise()
    if span is not None and madvise is not None:
        madvise(span[0], span[1] - span[0], mmap.MADV_DONTNEED)


def unwritten(t: torch.Tensor) -> bool:
    """Whether no page of CPU tensor ``t``, a view of a file mapped copy-on-write, has been written into since
    it was mapped (``/proc/self/pagemap``: none of its pages is anonymous memory), so that its values are the
    file's. False where that cannot be told (not Linux, a strided view)."""
    span = _pages(t, inner=False)
    return span is not None and _madvise() is not None and _only_file_pages(*span)


def _pages(t: torch.Tensor, inner: bool, back: int = 0) -> tuple[int, int] | None:
    """The page-aligned addresses [lo, hi) of CPU tensor ``t``'s bytes: the pages wholly inside them (``inner``)
    or every page they touch; None where there is no such page, or for a tensor whose memory is not its
    elements in order (oneDNN's, a strided view)."""
    if t.device.type != "cpu" or t.is_mkldnn or not t.is_contiguous():
        return None
    start, end = t.data_ptr() - back, t.data_ptr() + t.numel() * t.element_size()
    if inner:
        lo, hi = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    else:
        lo, hi = start // _PAGE * _PAGE, -(-end // _PAGE) * _PAGE
    return (lo, hi) if hi > lo else None


def _only_file_pages(lo: int, hi: int) -> bool:
    """Whether every page of the addresses [lo, hi) (page-aligned) is a file's page or not resident; False
    where ``/proc/self/pagemap`` cannot be read."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), (hi - lo) // _PAGE * 8, lo // _PAGE * 8)
    except OSError:
        return False
    import numpy as np

    entries = np.frombuffer(raw, dtype="<u8")
    anonymous = (entries & np.uint64(_PRESENT | _FILE_PAGE)) == np.uint64(_PRESENT)
    return len(entries) == (hi - lo) // _PAGE and not anonymous.any() and not (entries & np.uint64(_SWAPPED)).any()


def prefetch_pages(t: torch.Tensor) -> None:
    """Ask the kernel to read the pages of CPU tensor ``t`` ahead (``MADV_WILLNEED``): a mapped weight about to
    be copied whole otherwise faults its file's pages in a few at a time. Does nothing where ``madvise`` is
    missing."""
    span, madvise = _pages(t, inner=False), _madvise()
    if span is not None and madvise is not None:
        madvise(span[0], span[1] - span[0], mmap.MADV_WILLNEED)


_FOLIO: list[int] = []  # the largest folio a fault maps at once, looked up once


def _folio_bytes() -> int:
    """The size of a huge page (Linux's page cache makes no larger folio), 2 MB where it cannot be read."""
    if not _FOLIO:
        try:
            with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
                _FOLIO.append(int(f.read()))
        except (OSError, ValueError):
            _FOLIO.append(2 << 20)
    return _FOLIO[0]


def prefetch_in_background(tensors: Iterable[torch.Tensor]) -> threading.Thread:
    """``prefetch_pages`` of each CPU tensor of ``tensors``, in order, from a thread of its own (for a file not in
    the page cache each request waits on the disk): what ``from_pretrained`` does for the weights a first call
    reads first, the vision encoder's. Read by the call's page faults instead, the kernel reads a little
    ahead of each (blip2-opt-2.7b's vision encoder took 13.4-13.7 s in the first call after its file left the
    page cache, 9.8-11.6 s with its 4 GB read ahead, 4.4 s from the page cache)."""
    todo = [t for t in tensors if t.device.type == "cpu"]
    thread = threading.Thread(target=lambda: [prefetch_pages(t) for t in todo], name="blip2-prefetch", daemon=True)
    thread.start()
    return thread


def _madvise() -> Callable[[int, int, int], int] | None:
    if not _MADVISE:
        import ctypes
        import ctypes.util

        fn = None
        if hasattr(mmap, "MADV_DONTNEED") and os.path.exists("/proc/self/pagemap"):
            fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _MADVISE.append(fn)
    return _MADVISE[0]
