"""List or clear what blip2 keeps in its cache folder ($BLIP2_CACHE_DIR, else ~/.cache/blip2).

blip2 writes there without being asked: a checkpoint's converted copy when a load converts its weights
(``blip2.converted``: 7.5 GB for blip2-opt-2.7b's fp32 files loaded in bf16), a language model's blocked layout
(``blip2.fast.layout_cache``: 5.3 GB for the same in bf16), the native kernels it builds, the tar shards it
unpacks for training. Each is made again when needed, so any of them may be removed at any time; a file another
process has mapped stays readable to it until it lets go. A file still being written by a live process is listed
and left alone.

    blip2 cache                         list the files, largest first, with what each was made from
    blip2 cache clear                   remove them all
    blip2 cache clear --model DIR       remove what was made from this checkpoint folder's files (and what was
                                        made from that); the folder may be gone
    blip2 cache clear --kind layouts    only converted copies and layouts (kernels, shards: the others)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blip2 import layout_files
from blip2.cache import cache_dir

__all__ = ["Entry", "entries", "main"]


@dataclass(frozen=True)
class Entry:
    """One file of the cache (the native kernels' builds: one entry for all)."""

    kind: str  # "converted copy bf16", "layout bf16", "kernels", "shard", "being written", "unfinished", ...
    folder: str  # its --kind
    paths: tuple[Path, ...]
    size: int
    written: float  # modification time
    sources: tuple[str, ...]  # the files it was made from, where it says (converted copies and layouts)

    @property
    def removable(self) -> bool:
        return self.kind != "being written"


def entries(root: Path | None = None) -> list[Entry]:
    """The files of the cache folder ``root`` (default: ``cache_dir()``), largest first."""
    root = root or cache_dir()
    found = [e for folder, read in _FOLDERS.items() if (root / folder).is_dir() for e in read(root / folder)]
    return sorted(found, key=lambda e: -e.size)


def _layouts(d: Path) -> list[Entry]:
    found = []
    for f in sorted(d.iterdir()):
        if f.name.endswith(".tmp"):
            found.append(_temporary(f, "layouts"))
        elif f.suffix == ".safetensors":
            meta, dtypes = _header(f)
            fmt = meta.get("format", "")
            kind = "layout" if fmt.startswith("blocked") else "converted copy" if fmt.startswith("converted") \
                else "unknown"
            found.append(_entry(f"{kind} {dtypes}".strip(), "layouts", [f], tuple(layout_files.sources(f, meta) or ())))
    return found


def _header(f: Path) -> tuple[dict[str, str], str]:
    """The metadata of safetensors file ``f``, and the dtypes of its tensors ("bf16", "bf16/fp32"), read from its
    header; empty for a file safetensors refuses (listed, what it holds unknown)."""
    from safetensors import safe_open

    names = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
    try:
        with safe_open(str(f), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            found = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    except Exception:  # safetensors' errors have no common base
        return {}, ""
    return meta, "/".join(sorted(names.get(d, d.lower()) for d in found))


def _kernels(d: Path) -> list[Entry]:
    files = sorted(d.iterdir())  # each build of the kernels (one per version of their source) with its checksum
    return [_entry("kernels", "kernels", files)] if files else []


def _shards(d: Path) -> list[Entry]:
    return [_temporary(f, "shards") if f.name.endswith(".partial") else _entry("shard", "shards", [f])
            for f in sorted(d.iterdir())]


def _temporary(f: Path, folder: str) -> Entry:
    """A file a process writes under a temporary name: being written while that process runs."""
    pid = layout_files.writer_pid(f)
    return _entry("being written" if pid is not None and layout_files.alive(pid) else "unfinished", folder, [f])


def _entry(kind: str, folder: str, paths: list[Path], sources: tuple[str, ...] = ()) -> Entry:
    stats = [p.lstat() for p in paths]
    return Entry(kind, folder, tuple(paths), sum(s.st_size for s in stats), max(s.st_mtime for s in stats), sources)


# the cache's folders (each a --kind), and how each is read
_FOLDERS = {"layouts": _layouts, "kernels": _kernels, "shards": _shards}


def made_from(checkpoints: Sequence[str], found: Sequence[Entry]) -> list[Entry]:
    """The entries of ``found`` made from files inside one of the folders ``checkpoints``, or from a cached file
    that was (a layout made from a converted copy)."""
    roots = [os.path.realpath(c) for c in checkpoints]
    made = {e.paths[0]: e.sources for e in found if e.sources}
    chosen = set(layout_files.derived({s for m in made.values() for s in m if _inside(s, roots)}, made))
    return [e for e in found if e.paths[0] in chosen]


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


def _where(entry: Entry) -> str:
    """What the entry was made from, in a few words: the checkpoint folder(s), whether they are gone."""
    if not entry.sources:
        return ""
    cached = str(entry.paths[0].parent)
    checkpoint = sorted({os.path.dirname(s) for s in entry.sources if os.path.dirname(s) != cached})
    text = ", ".join(checkpoint) or "a cached file"
    if any(os.path.dirname(s) == cached for s in entry.sources):
        text += " (through its converted copy)"
    if not all(os.path.exists(s) for s in entry.sources):
        text += " [gone: removed at the next write]"
    return text


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def list_cache(root: Path) -> int:
    found = entries(root)
    print(f"{root}: {size_text(sum(e.size for e in found))} in {len(found)} entr{'y' if len(found) == 1 else 'ies'}")
    if not found:
        return 0
    rows = [(e.kind, size_text(e.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(e.written)),
             e.paths[0].relative_to(root).as_posix() if len(e.paths) == 1 else f"{e.folder}/ ({len(e.paths)} files)",
             _where(e)) for e in found]
    header = ("KIND", "SIZE", "WRITTEN", "FILE", "MADE FROM")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def clear_cache(root: Path, checkpoints: Sequence[str], kinds: Sequence[str], found: list[Entry]) -> int:
    """Remove the entries of ``found`` (the cache's, read once) made from ``checkpoints`` (all: none given) in the
    folders ``kinds`` (all: none given)."""
    chosen = [e for e in (made_from(checkpoints, found) if checkpoints else found) if not kinds or e.folder in kinds]
    freed = removed = 0
    for e in chosen:
        if not e.removable:
            print(f"kept {e.paths[0]}: being written by a running process", file=sys.stderr)
            continue
        gone = 0
        for p in e.paths:
            try:
                size = p.lstat().st_size
                p.unlink()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            except OSError as err:
                print(f"blip2 cache: could not remove {p}: {err.strerror}", file=sys.stderr)
                continue
            freed, gone = freed + size, gone + 1
        removed += gone > 0
    what = f"{removed} entr{'y' if removed == 1 else 'ies'}" if removed else "nothing"
    print(f"removed {what} from {root}" + (f", {size_text(freed)} freed" if removed else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2 cache", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the files, largest first (the default)")
    c = sub.add_parser("clear", help="remove files (all, or those --model and --kind choose)")
    c.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="only what was made from this checkpoint folder's files (repeatable)")
    c.add_argument("--kind", action="append", default=[], choices=sorted(_FOLDERS),
                   help="only this folder of the cache (repeatable): layouts (converted copies and layouts), "
                        "kernels, shards")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = cache_dir()
    if args.action != "clear":
        return list_cache(root)
    models, found = [os.path.expanduser(m) for m in args.model], entries(root)
    for m in models:
        folder = [os.path.realpath(m)]
        if not os.path.isdir(m) and not any(_inside(s, folder) for e in found for s in e.sources):
            print(f"blip2 cache: --model {m}: no such folder, and nothing in the cache was made from one",
                  file=sys.stderr)
            return 2
    return clear_cache(root, models, args.kind, found)
