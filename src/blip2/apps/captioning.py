"""Captioning a collection at scale: the job behind ``blip2 caption``.

Inputs are files, folders, globs and list files; images are decoded by DataLoader workers while the
model runs; results are appended to a JSONL file and flushed per batch, so a killed run loses at most
the batch in flight and ``--resume`` skips what is done. Under ``torchrun`` each rank captions every
N-th image into a part file and rank 0 folds the parts into one output, in input order.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from blip2.apps.errors import CliError
from blip2.apps.index import IMAGE_EXTENSIONS, list_images
from blip2.apps.pipeline import GenerationOptions, Pipeline, resolve_device
from blip2.processing import ImageFiles

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
            files = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
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
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read list file {path!r}: {e}") from None
    return [os.path.join(base, line) for line in lines if line and not line.startswith("#")]


def _key(path: str) -> str:
    """Identity of an image across runs (the resume key): its absolute path."""
    return os.path.abspath(path)


# -- the results file -------------------------------------------------------------------------------


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
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CliError(f"{path}: line {number} is not valid JSON ({e.msg}); fix or remove it") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise CliError(f"{path}: line {number} has no \"image\" field")
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


def _fold_parts(output: str, order: dict[str, int]) -> None:
    """Move the per-rank part files into ``output``: records not already there, in input order, then delete them."""
    done = {_key(r["image"]) for r in read_results(output)[0]}
    new: dict[str, dict[str, Any]] = {}
    for part in _part_paths(output):
        for record in read_results(part)[0]:
            if _key(record["image"]) not in done:
                new.setdefault(_key(record["image"]), record)
    _append(output, sorted(new.values(), key=lambda r: order.get(_key(r["image"]), len(order))))
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


# -- progress ---------------------------------------------------------------------------------------


class ProgressLine:
    """``12/40 images (30%) 8.1 images/s ETA 0:03`` on stderr: redrawn in place on a terminal,
    otherwise a line every ``every`` seconds and at the end."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, every: float = 10.0) -> None:
        self.total, self.stream, self.every = total, stream, every
        self.done = 0
        self.start = self.last = time.monotonic()
        self.tty = stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line() + "\033[K")
            self.stream.flush()
        elif now - self.last >= self.every:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100 * self.done // max(self.total, 1)
        return (f"{self.done}/{self.total} images ({pct}%) {rate:.1f} images/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(self.line(), file=self.stream, flush=True)


def caption_job(ranks: Ranks, paths: list[str], model: str | None, device: str, dtype: str, prompt: str,
                batch_size: int, options: GenerationOptions, output: str | None, resume: bool, overwrite: bool,
                workers: int, fast: str = "none") -> int:
    """Caption ``paths`` on this rank's share; returns the exit code (1 when any image failed)."""
    lead = ranks.rank == 0
    started = time.monotonic()
    images, problems = expand_inputs(paths)
    if lead:
        for arg, reason in problems:
            print(f"error: {arg}: {reason}", file=sys.stderr)
    order = {_key(p): i for i, p in enumerate(images)}
    done: set[str] = set()
    if output is not None:
        has_results = (os.path.exists(output) and os.path.getsize(output) > 0) or bool(_part_paths(output))
        if has_results and not (resume or overwrite):
            raise CliError(f"{output} already has results: pass --resume to continue it, or --overwrite to start again")
        if lead:
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
        done = {_key(r["image"]) for r in read_results(output)[0]}
    todo = [p for p in images if _key(p) not in done]
    mine = todo[ranks.rank::ranks.world]
    skipped = len(images) - len(todo)

    if ranks.world > 1 and device in ("auto", "cuda") and resolve_device(device).type == "cuda":
        device = f"cuda:{ranks.local_rank}"
    pipe = Pipeline.load(model, device=device, dtype=dtype, fast=fast) if mine else None
    if pipe is not None:
        pipe.check_prompt(prompt, options)  # a retrieval checkpoint or an over-long prompt fails here, not per batch
    sink = output if output is None or ranks.world == 1 else f"{output}.rank{ranks.rank}.part"
    captioned = failed = 0
    progress = ProgressLine(len(mine)) if lead and mine else None
    if pipe is not None:
        loader = torch.utils.data.DataLoader(ImageFiles(mine, pipe.processor.image_processor), batch_size=batch_size,
                                             num_workers=workers, collate_fn=list)
        for batch in loader:
            good = [(path, pixels) for path, pixels, _ in batch if pixels is not None]
            for path, _, reason in batch:
                if reason is not None:
                    print(f"error: {reason}", file=sys.stderr, flush=True)
            failed += len(batch) - len(good)
            records = []
            if good:
                texts = pipe.caption(torch.stack([px for _, px in good]), prompt, options)
                records = [{"image": path, **({"prompt": prompt} if prompt else {}), "caption": text}
                           for (path, _), text in zip(good, texts)]
                print("".join(f"{r['image']}\t{' '.join(r['caption'].splitlines())}\n" for r in records), end="",
                      flush=True)
                if sink is not None:
                    _append(sink, records)
            captioned += len(records)
            if progress is not None:
                progress.update(len(batch))
        if progress is not None:
            progress.close()
    ranks.barrier()
    if lead and output is not None and ranks.world > 1:
        _fold_parts(output, order)
    captioned, failed = ranks.sum([captioned, failed])
    failed += len(problems)
    if lead:
        counts = [f"{captioned} captioned"] + ([f"{skipped} already in {output}"] if skipped else []) + [f"{failed} failed"]
        where = f"; results in {output}" if output else ""
        print(f"done: {', '.join(counts)} in {time.monotonic() - started:.1f} s{where}", file=sys.stderr)
    return 1 if failed else 0
