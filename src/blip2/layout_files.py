"""The files of the layout cache, whatever they hold: where they are, how a reader checks one is this user's, how
one is written (in the background, at the disk's pace, while the process is idle) and which are swept away.

Two kinds of file live in ``cache_dir()/layouts``, each a safetensors file made from a checkpoint's weight files
and named ``<source>-<key>.safetensors`` (``source`` hashes what it is made from, ``key`` everything it depends
on): a language model's blocked layout (``blip2.fast.layout_cache``) and the tensors a load converted to another
dtype, converted (``blip2.converted``). Each file's metadata lists the files it was made from
(``"files"``), so that a file whose sources are gone is removed, and a layout made from a converted copy goes
with it. ``BLIP2_LAYOUT_CACHE=0`` turns both off.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import ContextDecorator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip2.cache import cache_dir
from blip2.mapped import SAFETENSORS_DTYPES

__all__ = ["Foreground", "alive", "derived", "directory", "enabled", "layouts_of", "metadata", "open_checked",
           "sources", "tensor_parts", "wait", "write", "writer_pid", "writing"]

log = logging.getLogger("blip2.layout_files")

_writers: list[threading.Thread] = []
# safetensors' name of each dtype a cached tensor may have
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# bytes written between two flushes to disk: what the writing adds to the page cache's dirty pages at most
_FLUSH_BYTES = 256 << 20
# bytes a writer writes at once: it pauses between pieces while a ``foreground`` call runs
_PIECE_BYTES = 16 << 20

# one tensor of a file to write: its name, dtype, shape, and a function giving its bytes in pieces, in order
# (called in the writing thread, so that a piece can be made as it is written)
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], Iterable[np.ndarray]]]


def enabled() -> bool:
    """Whether the cache is used: not with ``BLIP2_LAYOUT_CACHE=0``."""
    return os.environ.get("BLIP2_LAYOUT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def directory() -> Path:
    """Where the files are kept: ``cache_dir()/layouts``."""
    return cache_dir() / "layouts"


def wait() -> None:
    """Wait for the files this process is writing."""
    while _writers:
        _writers.pop().join()


def writing() -> bool:
    """Whether this process is writing a file (whose writer may still read the tensors it was given)."""
    return any(w.is_alive() for w in _writers)


def _finish_at_exit() -> None:
    """At exit, once the program is done: say why the process has not ended yet, and finish the files."""
    running = [w for w in _writers if w.is_alive()]
    if running:
        log.warning("blip2 layout cache: finishing %s before exiting (written once; later loads map it; "
                    "`blip2 cache` lists the cache; BLIP2_LAYOUT_CACHE=0 turns it off)",
                    ", ".join(w.name.split(" ", 1)[1] for w in running))
    wait()


atexit.register(_finish_at_exit)


_busy = threading.Condition()
_foreground = [0]  # work under way that the writers wait for, in any thread


class Foreground(ContextDecorator):
    """Work someone waits for (``generate``, the server's busy spells): while any is held, in any thread, the
    writers pause between pieces, so that a file is written while the process is idle or exiting. Written
    beside the calls, the writing (and the kernel's writeback and reclaim for it) slowed them: blip2-opt-2.7b's
    first eight-image call from fp32 files took 26.8 s instead of ~18 on a 2-core VM while its converted copy
    was written. A context manager or decorator (re-entrant, thread-safe), or ``hold`` / ``release``."""

    def __init__(self) -> None:
        self.depth = 0

    def hold(self) -> None:
        with _busy:
            self.depth += 1
            _foreground[0] += 1

    def release(self) -> None:
        with _busy:
            if self.depth:
                self.depth -= 1
                _foreground[0] -= 1
                _busy.notify_all()

    def __enter__(self) -> Foreground:
        self.hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _when_idle() -> None:
    """Return once no ``Foreground`` work is held, or the interpreter is exiting (a daemon thread's call never
    keeps the process from ending)."""
    with _busy:
        while _foreground[0] and threading.main_thread().is_alive():
            _busy.wait(timeout=1.0)


def open_checked(path: Path, key: str) -> Any:
    """safetensors' handle of the cached file ``path``, after checking that it is a file of this user's that only
    they can write, written for ``key``. Raises with the reason otherwise (safetensors' own errors for a
    truncated file or a bad header, which have no common base)."""
    from safetensors import safe_open

    st = path.lstat()
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError("not a file of this user's that only they can write")
    handle = safe_open(str(path), framework="pt")
    if (handle.metadata() or {}).get("key") != key:
        raise ValueError("written for another key")
    return handle


def tensor_parts(t: torch.Tensor) -> Callable[[], Iterable[np.ndarray]]:
    """The bytes of CPU tensor ``t`` (its own memory, not copied), in pieces of at most ``_PIECE_BYTES``."""
    def parts() -> Iterable[np.ndarray]:
        data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
        return (data[i:i + _PIECE_BYTES] for i in range(0, len(data), _PIECE_BYTES))
    return parts


def write(path: Path, entries: Sequence[Entry], metadata: dict[str, str], what: str = "layout",
          valid: Callable[[], bool] | None = None) -> None:
    """Write ``entries`` to ``path`` from a thread of its own (``_write_file``), once older files are swept; not
    where the disk has less than twice their size free. ``metadata`` must name the ``key`` and the source
    ``files`` (a JSON list); ``valid``, asked once all is written, whether the sources are still what the
    entries were made from (else the file is dropped)."""
    size = sum(torch.Size(shape).numel() * dtype.itemsize for _, dtype, shape, _ in entries)
    sweep(path)
    free = shutil.disk_usage(path.parent).free
    if free < 2 * size:
        log.info("blip2 layout cache: not written, %.1f GB free in %s and the %s takes %.1f GB", free / 1e9,
                 path.parent, what, size / 1e9)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp")
    os.close(fd)
    # a daemon that the process waits for at exit (``_finish_at_exit``), after saying so, rather than leave the
    # file unwritten: a non-daemon thread is waited for silently
    writer = threading.Thread(target=_write_file, args=(Path(tmp), path, entries, metadata, valid),
                              name=f"blip2-layout-writer {path.parent.name}/{path.name} ({size / 1e9:.1f} GB)",
                              daemon=True)
    writer.start()
    _writers.append(writer)


def _write_file(tmp: Path, path: Path, entries: Sequence[Entry], metadata: dict[str, str],
                valid: Callable[[], bool] | None = None) -> None:
    """Write ``entries`` as a safetensors file at ``tmp``, flush it to disk and rename it to ``path``.

    In the safetensors format (an 8-byte header length, the JSON header, the tensors' bytes), written here
    rather than by ``safetensors.torch.save_file`` so that the writing can be paced: written whole at once, 11 GB
    of dirty pages filled the page cache while the first ``generate`` ran beside it (blip2-opt-2.7b on a 2-core
    VM). Here the thread runs at the lowest CPU priority, flushes every 256 MB and pauses between 16 MB pieces
    while ``Foreground`` work runs, so it takes the disk's pace and the process's idle time.
    safetensors' ``safe_open`` reads the file (and checks its header and size) like any other."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
    except (AttributeError, OSError):
        pass
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in entries:
        n = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    # spaces up to a page: the first tensor starts on a page of the file and the next on 64 bytes where the sizes
    # before it are whole 64-byte blocks (the writers put those first), so a mapped weight is as aligned as an
    # allocated one (8-byte aligned, as safetensors pads, the blocked products ran 8% slower)
    blob += b" " * (-(8 + len(blob)) % 4096)
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            unflushed = 0
            for name, dtype, shape, parts in entries:
                written = 0
                _when_idle()
                for part in parts():
                    f.write(part)
                    written += len(part)
                    unflushed += len(part)
                    if unflushed >= _FLUSH_BYTES:
                        f.flush()
                        os.fdatasync(f.fileno())
                        _drop_cached(f)
                        unflushed = 0
                    _when_idle()  # before the next piece is read or made
                if written != torch.Size(shape).numel() * dtype.itemsize:
                    raise ValueError(f"{name!r} gave {written} bytes, its header says {dtype} {tuple(shape)}")
            f.flush()
            os.fsync(f.fileno())  # the bytes on disk before the name: a reader never maps a file of holes
            _drop_cached(f)
        if valid is not None and not valid():
            raise ValueError("its sources changed while it was written")
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("blip2 layout cache: wrote %s (%.1f GB)", path, os.path.getsize(path) / 1e9)
    except Exception as e:  # a full disk, a folder removed, sources changed: the next load makes it again
        log.warning("blip2 layout cache: could not write %s (%s)", path, e)
        tmp.unlink(missing_ok=True)


def _drop_cached(f: Any) -> None:
    """Drop what is written and flushed of ``f`` from the page cache. This process holds the weights in its own
    memory, and kept cached the written file pushed out the pages the first calls read next (the vision
    encoder's, mapped from the checkpoint): with blip2-opt-2.7b's 15 GB checkpoint and 11 GB layout in 23 GB,
    the first call's vision encoder took 18.6 s instead of 4.3."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sweep(path: Path) -> None:
    """Remove from ``path``'s folder what no load will use: files of the same source under other keys, files
    whose sources are gone (a layout made from a converted copy removed here goes with it), and temporary files
    of processes that are gone."""
    source, kept = path.name.split("-")[0], []
    for f in path.parent.iterdir():
        if f.name.endswith(".tmp"):
            pid = writer_pid(f)
            if pid is not None and not alive(pid):
                _remove(f)
        elif f.name.endswith(".safetensors") and f != path:
            if f.name.startswith(source + "-"):
                _remove(f)
            else:
                kept.append(f)
    while gone := [f for f in kept if not _sources_exist(f)]:  # again once files were removed: their layouts
        for f in gone:
            _remove(f)
            kept.remove(f)


def _remove(f: Path) -> None:
    try:
        f.unlink()
    except OSError:
        pass


def writer_pid(f: Path) -> int | None:
    """The process that writes (or wrote) the temporary file ``f`` (``<name>.<pid>.<suffix>``: ``.tmp`` here,
    ``.partial`` for an unpacked shard), where it says."""
    pid = f.name.rsplit(".", 2)[-2] if f.name.count(".") >= 2 else ""
    return int(pid) if pid.isdigit() else None


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _sources_exist(f: Path) -> bool:
    made_from = sources(f)
    return made_from is not None and all(os.path.exists(p) for p in made_from)


def metadata(f: Path) -> dict[str, str]:
    """The metadata of the cached file ``f`` (its key, source files, format); empty where it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:
        return {}


def sources(f: Path, read: dict[str, str] | None = None) -> list[str] | None:
    """The files a cached file was made from (None: not one of ours, or unreadable); ``read``: its metadata,
    where read already."""
    try:
        return list(json.loads((metadata(f) if read is None else read)["files"]))
    except (KeyError, TypeError, ValueError):
        return None


def layouts_of(files: Sequence[str]) -> list[Path]:
    """The cached files made from any of these weight files (any kind, dtype or key), and the layouts made from
    those: to read them ahead, or remove them."""
    folder = directory()
    if not folder.is_dir():
        return []
    return derived(files, {f: sources(f) or [] for f in sorted(folder.glob("*.safetensors"))})


def derived(files: Iterable[str], made_from: dict[Path, Sequence[str]]) -> list[Path]:
    """The cached files of ``made_from`` (each with the files it was made from) made from any of ``files``, or
    from a cached file so found (a layout made from a converted copy), in the order of ``made_from``."""
    wanted = {os.path.realpath(f) for f in files}
    found: list[Path] = []
    while more := [f for f, made in made_from.items() if f not in found and wanted & set(made)]:
        found += more
        wanted |= {os.path.realpath(f) for f in more}
    return [f for f in made_from if f in found]
