"""Reading training examples: JSONL manifests and webdataset-style tar shards (``.tar``, ``.tar.gz``, brace
lists such as ``shards-{000..009}.tar``), as ``Record``s.

- JSONL manifest, one object per line: ``{"image": path, "caption": text}`` (captioning, stage 1 and 2)
  or ``{"image": path, "question": text, "answer": text}`` (VQA); paths relative to the manifest's
  directory. Other keys are ignored.
- Tar shards: members ``KEY.jpg``/``KEY.png``/... with ``KEY.json`` (an object with the fields above, no
  "image") or ``KEY.txt`` (a caption), as webdataset writes them. Read with the standard ``tarfile``
  module; the shards are indexed once (headers and the small text members) and images are then read by
  offset. A gzip-compressed shard (``.tar.gz``, ``.tgz``) cannot be read by offset: it is unpacked once into
  the cache (``blip2.cache.cache_dir()/shards``), keyed by its path, size and time.

A line or shard entry that cannot be used (bad JSON, missing field, no image or text) is skipped, counted
and logged with its file and line (or shard member); a file that cannot be read at all raises, naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from blip2.cache import cache_dir
from blip2.images import read_image

__all__ = ["Record", "decode_image", "expand_braces", "read_manifest", "read_shards", "record_fields"]

logger = logging.getLogger("blip2.train")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
GZIP_SHARDS = (".tar.gz", ".tgz")


@dataclass(frozen=True)
class Record:
    """One training example: the image file ``image``, or ``member`` = (offset, size) of the image inside
    the tar file ``image``, or row ``row`` of ``table``."""

    image: str
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    member: tuple[int, int] | None = None
    # stage 2 with ``TrainConfig.prefix_loss_weight``: a text the projected queries are pulled toward,
    # token by token (e.g. the image's description in the words the LM reads); None: no such loss
    prefix: str | None = None
    # stage 1: a caption that does not match the image (a hard negative, e.g. one word changed), which ITM
    # scores as a non-match besides the negatives drawn from the batch; None: only those
    negative: str | None = None
    # an image held in a table (a datasets.Dataset, a Parquet file): row ``row`` of ``table`` (a
    # ``tables.TableImages``); ``image`` then names the table for messages
    row: int | None = None
    table: Any = field(default=None, compare=False, repr=False)


def record_fields(obj: Any, task: str) -> dict[str, str] | None:
    """The text fields ``task`` needs from a JSON object, or None when they are missing or not strings."""
    if not isinstance(obj, dict):
        return None
    if task == "mixed":  # a question-answer pair when the object has one, else a caption
        qa = all(isinstance(obj.get(n), str) and obj[n].strip() for n in ("question", "answer"))
        task = "vqa" if qa else "caption"
    names = ("caption",) if task == "caption" else ("question", "answer")
    values = {n: obj.get(n) for n in names}
    if not all(isinstance(v, str) and v.strip() for v in values.values()):
        return None
    fields = {n: v.strip() for n, v in values.items()}
    for name in ("prefix", "negative"):  # optional: the prefix alignment text, a hard negative caption
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            fields[name] = value.strip()
    return fields


def _needs(task: str) -> str:
    return {"caption": '"caption"', "vqa": '"question" and "answer"'}.get(task, '"caption", or "question" and "answer"')


def read_manifest(path: str, task: str = "caption") -> tuple[list[Record], int]:
    """Records of a JSONL manifest and the number of lines skipped (blank lines are not counted)."""
    root = os.path.dirname(os.path.abspath(path))
    records: list[Record] = []
    skipped = 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is skipped on its own, not the whole file
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                logger.warning("%s:%d: skipped, not UTF-8 (byte %#04x at column %d)", path, lineno, raw[e.start],
                               e.start + 1)
                skipped += 1
                continue
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: skipped, not JSON (%s)", path, lineno, e)
                skipped += 1
                continue
            fields = record_fields(obj, task)
            image = obj.get("image") if isinstance(obj, dict) else None
            if fields is None or not isinstance(image, str) or not image:
                logger.warning("%s:%d: skipped, needs \"image\" and %s", path, lineno, _needs(task))
                skipped += 1
                continue
            records.append(Record(os.path.join(root, image), **fields))
    return records, skipped


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's naming: "dir/000123.jpg" -> ("dir/000123", "jpg"); the extension starts at the first dot."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def read_shards(paths: Sequence[str], task: str = "caption") -> tuple[list[Record], int]:
    """Records of tar shards (gzip-compressed ones are unpacked once, see the module doc) and the number of
    entries skipped."""
    records: list[Record] = []
    skipped = 0
    for path in paths:
        readable = unpack_gzip_shard(path) if _is_gzip(path) else path
        got, bad = _read_shard(readable, task, path)
        records += got
        skipped += bad
    return records, skipped


def _is_gzip(path: str) -> bool:
    """Does ``path`` start with gzip's magic number (whatever its name says)?"""
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read the shard ({e.strerror})") from None


def _read_shard(path: str, task: str, name: str) -> tuple[list[Record], int]:
    """One uncompressed shard ``path`` (``name``: what messages call it)."""
    groups: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                key, ext = _split_key(info.name)
                group = groups.setdefault(key, {})
                if ext in IMAGE_EXTENSIONS:
                    group["image"] = (info.offset_data, info.size)
                elif ext in ("json", "txt"):
                    data = tf.extractfile(info)
                    group[ext] = data.read() if data is not None else b""
    except (tarfile.ReadError, EOFError) as e:
        raise ValueError(f"{name}: not a readable tar shard ({e}); shards are .tar files, or gzip-compressed "
                         f"{' / '.join(GZIP_SHARDS)}") from None
    records: list[Record] = []
    skipped = 0
    for key, group in groups.items():
        fields: dict[str, str] | None = None
        try:
            if "json" in group:
                fields = record_fields(json.loads(group["json"]), task)
            elif "txt" in group and task in ("caption", "mixed"):
                fields = record_fields({"caption": group["txt"].decode("utf-8")}, task)
        except (json.JSONDecodeError, UnicodeDecodeError):
            fields = None
        if fields is None or "image" not in group:
            logger.warning("%s: %s skipped, needs an image and its text", name, key)
            skipped += 1
            continue
        records.append(Record(path, member=group["image"], **fields))
    return records, skipped


def unpack_gzip_shard(path: str) -> str:
    """An uncompressed copy of the gzip-compressed shard ``path`` in the cache, made once (keyed by the
    shard's absolute path, size and modification time; written under a temporary name, then renamed, so
    processes that unpack the same shard at once do not read a half-written file)."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.basename(path).removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar")
    target = cache_dir() / "shards" / f"{stem}-{key}.tar"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    logger.info("%s: unpacking the compressed shard once, to %s", path, target)
    try:
        with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        partial.unlink(missing_ok=True)
        raise ValueError(f"{path}: not a readable gzip-compressed tar shard ({e})") from None
    os.replace(partial, target)
    return str(target)


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard lists: ``{000..009}`` (a range, zero-padded as written) and ``{a,b}`` (alternatives),
    several or nested in one pattern; a pattern without braces (or with one left open) is itself."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, begin = 0, [], start + 1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if (pattern[i] == "," and depth == 1) or depth == 0:
            parts.append(pattern[begin:i])
            begin = i + 1
        if depth == 0:
            break
    else:
        return [pattern]
    head, tail = pattern[:start], pattern[i + 1:]
    span = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", parts[0]) if len(parts) == 1 else None
    if span:
        a, b = span.group(1), span.group(2)
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        parts = [str(n).zfill(width) for n in range(int(a), int(b) + step, step)]
    return [path for part in parts for choice in expand_braces(part) for path in expand_braces(head + choice + tail)]


def decode_image(data: bytes, name: str) -> Image.Image:
    """An image stored in a shard or a table, through the loader every command uses (its format allow-list
    and size limits)."""
    return read_image(io.BytesIO(data), name)


