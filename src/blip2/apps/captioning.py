"""Captioning a collection at scale: the job behind ``blip2 caption``.

Inputs are files, folders, globs and list files; images are decoded by DataLoader workers while the
model runs; results are appended to a JSONL file and flushed per batch, so a killed run loses at most
the batch in flight and ``--resume`` skips what is done. Under ``torchrun`` each rank captions every
N-th image into a part file and rank 0 folds the parts into one output, in input order.

No file stops the job: one that cannot be read (not an image, truncated, too large, not a regular file,
out of memory) is reported and counted, and the rest go on. A run holds an exclusive lock on its output
for as long as it writes it, so a second run on the same output refuses instead of doubling every line.

File names that are not UTF-8 (Linux allows any bytes) are written losslessly: ``"image"`` then holds a
readable form with each undecodable byte as ``\\xNN``, and ``"path_bytes"`` the name's exact bytes in
base64, which is what identifies the image (``--resume`` reads it back).
"""

from __future__ import annotations

import base64
import binascii
import functools
import glob
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch

from blip2.apps.errors import CliError
from blip2.apps.index import IMAGE_EXTENSIONS, list_images
from blip2.apps.pipeline import GenerationOptions, Pipeline, resolve_device
from blip2.apps.progress import Progress
from blip2.processing import ImageFiles

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a run there does not lock its output
    fcntl = None  # type: ignore[assignment]

LIST_EXTENSIONS = (".txt", ".lst")


# -- inputs -----------------------------------------------------------------------------------------


def expand_inputs(args: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths from files, folders (recursive), globs and list files (``*.txt``/``*.lst``: one path per
    line, relative to the list's folder, ``#`` comments); and ``(argument, reason)`` for those that gave none.
    Each image appears once, in the order given (folders and globs sorted)."""
    found: list[str] = []
    problems: list[tuple[str, str]] = []
    for arg in args:
        if os.path.isdir(arg):
            files = list_images(arg)
            if not files:
                problems.append((arg, f"folder has no images ({' '.join(IMAGE_EXTENSIONS)})"))
            found += files
        elif os.path.isfile(arg) and arg.lower().endswith(LIST_EXTENSIONS):
            found += _read_list(arg)
        elif os.path.exists(arg):
            found.append(arg)
        elif glob.has_magic(arg):
            # not only regular files: a FIFO or device that matches is reported when it is read
            files = sorted(p for p in glob.glob(arg, recursive=True) if not os.path.isdir(p))
            if not files:
                problems.append((arg, "no file matches this pattern"))
            found += files
        else:
            problems.append((arg, "no such file or folder"))
    seen: set[str] = set()
    unique = []
    for path in found:
        if _key(path) not in seen:
            seen.add(_key(path))
            unique.append(path)
    return unique, problems


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(path)
    try:  # bytes that are not UTF-8 name files as the OS gives such names to Python (surrogateescape)
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise CliError(f"cannot read list file {path!r}: {e}") from None
    return [os.path.join(base, line) for line in lines if line and not line.startswith("#")]


def _key(path: str) -> str:
    """Identity of an image across runs (the resume key): its absolute path."""
    return os.path.abspath(path)


# -- the results file -------------------------------------------------------------------------------


def path_fields(path: str) -> dict[str, str]:
    """How a record names ``path``: ``{"image": path}``, or for a name that is not UTF-8 a readable
    ``"image"`` (undecodable bytes as ``\\xNN``) and its exact bytes in base64 as ``"path_bytes"``."""
    raw = os.fsencode(path)
    try:
        return {"image": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"image": raw.decode("utf-8", "backslashreplace"), "path_bytes": base64.b64encode(raw).decode("ascii")}


def record_path(record: dict[str, Any]) -> str:
    """The image path a record names (``path_fields``'s inverse)."""
    if "path_bytes" in record:
        return os.fsdecode(base64.b64decode(record["path_bytes"]))
    return record["image"]


def _check_record(record: Any) -> str | None:
    """What is wrong with a parsed results line, or None."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return 'has no "image" field'
    if "path_bytes" in record:
        try:
            base64.b64decode(record["path_bytes"], validate=True)
        except (TypeError, ValueError, binascii.Error):
            return 'has a "path_bytes" field that is not base64'
    return None


def read_results(path: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSONL results file and the byte length of its complete lines.

    A last line without its newline is a write cut short by a kill: it is not counted (the caller
    truncates it). Any other line that is not a JSON object is an error naming the line."""
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    records: list[dict[str, Any]] = []
    complete = data.rfind(b"\n") + 1
    for number, line in enumerate(data[:complete].splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CliError(f"{path}: line {number} is not valid UTF-8 (byte {line[e.start]:#04x} at column "
                           f"{e.start + 1}); fix or remove it") from None
        except json.JSONDecodeError as e:
            raise CliError(f"{path}: line {number} is not valid JSON ({e.msg}); fix or remove it") from None
        problem = _check_record(record)
        if problem:
            raise CliError(f"{path}: line {number} {problem}")
        records.append(record)
    return records, complete


def _drop_partial_line(path: str) -> None:
    _, complete = read_results(path)
    if os.path.exists(path) and os.path.getsize(path) > complete:
        print(f"note: {path}: dropping an incomplete last line (a write interrupted by a kill)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(complete)


def _part_paths(output: str) -> list[str]:
    return sorted(glob.glob(glob.escape(output) + ".rank*.part"))


def _append(path: str, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _done(output: str) -> set[str]:
    return {_key(record_path(r)) for r in read_results(output)[0]}


def _fold_parts(output: str, order: dict[str, int]) -> None:
    """Move the per-rank part files into ``output``: records not already there, in input order, then delete them."""
    done = _done(output)
    new: dict[str, dict[str, Any]] = {}
    for part in _part_paths(output):
        for record in read_results(part)[0]:
            if _key(record_path(record)) not in done:
                new.setdefault(_key(record_path(record)), record)
    _append(output, sorted(new.values(), key=lambda r: order.get(_key(record_path(r)), len(order))))
    for part in _part_paths(output):
        os.remove(part)


# -- torchrun ---------------------------------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one); collectives go over gloo."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        dist.init_process_group("gloo")
        return cls(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: list[int]) -> list[int]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()



# -- the job ----------------------------------------------------------------------------------------


def _lock(output: str) -> IO[str] | None:
    """An exclusive lock on ``output`` (created if need be), held while the returned file stays open."""
    handle = open(output, "a", encoding="utf-8")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise CliError(f"{output} is being written by another run (it holds the file's lock): wait for it to "
                       "end, or give another --output") from None
    return handle


def _open_output(ranks: Ranks, output: str, resume: bool, overwrite: bool, order: dict[str, int]
                 ) -> tuple[IO[str] | None, set[str]]:
    """Lock ``output`` (rank 0), check it may be written, finish what an interrupted run left behind;
    returns the lock and the keys of the images already captioned there."""
    lock, refusal = None, ""
    if ranks.rank == 0:
        try:
            lock = _lock(output)
        except CliError as e:
            refusal = str(e)
    if ranks.sum([int(bool(refusal))])[0]:  # every rank refuses, not only the one that found the lock held
        raise CliError(refusal or f"{output} is being written by another run")
    try:
        has_results = os.path.getsize(output) > 0 or bool(_part_paths(output))
        if has_results and not (resume or overwrite):
            raise CliError(f"{output} already has results: pass --resume to continue it, or --overwrite to start again")
        if ranks.rank == 0:
            if overwrite:
                open(output, "w").close()
                for part in _part_paths(output):
                    os.remove(part)
            else:  # resume (or a new file): finish what an interrupted run left behind
                for path in [output, *_part_paths(output)]:
                    if os.path.exists(path):
                        _drop_partial_line(path)
                _fold_parts(output, order)
        ranks.barrier()
        return lock, _done(output)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _caption_batch(pipe: Pipeline, good: list[tuple[str, torch.Tensor]], prompt: str, options: GenerationOptions
                   ) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, caption) for the batch, and the reasons of the images that failed: a batch that runs out of
    memory is retried one image at a time, so only an image that fails alone is lost."""
    try:
        texts = pipe.caption(torch.stack([px for _, px in good]), prompt, options)
        return [(path, text) for (path, _), text in zip(good, texts)], []
    except (MemoryError, torch.cuda.OutOfMemoryError) as e:
        if len(good) == 1:
            return [], [f"cannot caption {good[0][0]!r}: out of memory ({type(e).__name__})"]
    done, failed = [], []
    for item in good:
        one, reasons = _caption_batch(pipe, [item], prompt, options)
        done += one
        failed += reasons
    return done, failed


def _close_in_worker(fd: int, identity: tuple[int, int], worker_id: int) -> None:
    """Close the lock's descriptor in a DataLoader worker forked with it (a spawned one never had it)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == identity:
        os.close(fd)


def _run_batches(pipe: Pipeline, mine: list[str], prompt: str, batch_size: int, options: GenerationOptions,
                 sink: str | None, workers: int, progress: Progress, lock: IO[str] | None) -> tuple[int, int]:
    """Caption ``mine`` batch by batch: each record printed and appended to ``sink``; returns (captioned, failed)."""
    captioned = failed = 0
    # DataLoader workers are forked holding the lock's descriptor: they close it, so the lock ends with this
    # process (the workers of a killed run linger a few seconds and must not keep --resume out meanwhile)
    forget = None
    if lock is not None:
        st = os.fstat(lock.fileno())
        forget = functools.partial(_close_in_worker, lock.fileno(), (st.st_dev, st.st_ino))
    loader = torch.utils.data.DataLoader(ImageFiles(mine, pipe.processor.image_processor), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list, worker_init_fn=forget)
    for batch in loader:
        reasons = [reason for _, _, reason in batch if reason is not None]
        good = [(path, pixels) for path, pixels, _ in batch if pixels is not None]
        done, lost = _caption_batch(pipe, good, prompt, options) if good else ([], [])
        reasons += lost
        if reasons:
            progress.write("".join(f"error: {reason}\n" for reason in reasons), sys.stderr)
        records = [{**path_fields(path), **({"prompt": prompt} if prompt else {}), "caption": text}
                   for path, text in done]
        if records:
            progress.write("".join(f"{r['image']}\t{' '.join(r['caption'].splitlines())}\n" for r in records),
                           sys.stdout)
            if sink is not None:
                _append(sink, records)
        captioned += len(records)
        failed += len(reasons)
        progress.update(len(batch))
    return captioned, failed


def caption_job(ranks: Ranks, paths: list[str], model: str | None, device: str, dtype: str, prompt: str,
                batch_size: int, options: GenerationOptions, output: str | None, resume: bool, overwrite: bool,
                workers: int, fast: str = "auto") -> int:
    """Caption ``paths`` on this rank's share; returns the exit code (1 when any image failed)."""
    lead = ranks.rank == 0
    started = time.monotonic()
    images, problems = expand_inputs(paths)
    if lead:
        for arg, reason in problems:
            print(f"error: {arg}: {reason}", file=sys.stderr)
    order = {_key(p): i for i, p in enumerate(images)}
    lock, done = _open_output(ranks, output, resume, overwrite, order) if output is not None else (None, set())
    try:
        todo = [p for p in images if _key(p) not in done]
        mine = todo[ranks.rank::ranks.world]
        if ranks.world > 1 and device in ("auto", "cuda") and resolve_device(device).type == "cuda":
            device = f"cuda:{ranks.local_rank}"
        captioned = failed = 0
        if mine:
            pipe = Pipeline.load(model, device=device, dtype=dtype, fast=fast)
            pipe.check_prompt(prompt, options)  # a retrieval checkpoint or an over-long prompt fails here, not per batch
            sink = output if output is None or ranks.world == 1 else f"{output}.rank{ranks.rank}.part"
            progress = Progress(len(mine), sys.stderr if lead else None)
            try:
                captioned, failed = _run_batches(pipe, mine, prompt, batch_size, options, sink, workers, progress,
                                                 lock)
            finally:  # also before an interruption's or a failure's message, which must not run into the line
                progress.close()
        ranks.barrier()
        if lead and output is not None and ranks.world > 1:
            _fold_parts(output, order)
    finally:
        if lock is not None:
            lock.close()
    captioned, failed = ranks.sum([captioned, failed])
    failed += len(problems)
    if lead:
        skipped = len(images) - len(todo)
        counts = [f"{captioned} captioned"] + ([f"{skipped} already in {output}"] if skipped else []) + [f"{failed} failed"]
        where = f"; results in {output}" if output else ""
        print(f"done: {', '.join(counts)} in {time.monotonic() - started:.1f} s{where}", file=sys.stderr)
    return 1 if failed else 0
