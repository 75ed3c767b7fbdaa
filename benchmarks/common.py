"""What the benchmarks share: the preset checkpoints (built once with transformers and cached), both
implementations loaded from the same files, timing against transformers, and the table format.

Timing rules: ours and transformers run in the same process, interleaved round by round
(``blip2.apps.bench.interleave``), and a speed-up is the median over rounds of the per-round ratio, so a change
in the machine's load between rounds cancels out. The default is one CPU thread: on a shared two-core
machine a second OpenMP thread waits at every barrier for a core someone else holds (measured: 10x slower
steps), which says nothing about either implementation.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.apps.bench import PRESETS, apply_fast_path  # noqa: E402
from blip2.fast import cuda_graph  # noqa: E402

BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "BENCHMARKS.md")
CACHE = os.environ.get("BLIP2_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "blip2-bench"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint(preset: str) -> str:
    """A directory with a random transformers BLIP-2 of ``preset``'s size (transformers' own initialisation,
    seed 0), written by ``save_pretrained`` on first use."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration as HF

    d = os.path.join(CACHE, preset)
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        torch.manual_seed(0)
        HF(Blip2Config.from_dict(PRESETS[preset])).save_pretrained(d)
    return d


def load_hf(d: str, dtype: str = "fp32", device: str = "cpu") -> torch.nn.Module:
    from transformers import Blip2ForConditionalGeneration as HF

    return HF.from_pretrained(d, dtype=DTYPES[dtype]).to(device).eval()


def load_ours(d: str, dtype: str = "fp32", device: str = "cpu", fast: str = "plain",
              compile: bool = False, batch: int = 1, graph: bool = False,
              native: bool = True) -> Blip2ForConditionalGeneration:
    """Our model with fast path ``fast``; ``compile``: its decoding step compiled for ``batch`` rows
    (``native``: compile(native=...)); ``graph``: the step replayed as a CUDA graph (``cuda_graph()``)."""
    model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=DTYPES[dtype], device=device)
    model = apply_fast_path(model, fast, compile, batch=batch, **({} if native else {"native": False}))
    return cuda_graph(model) if graph else model


def ratios(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Median over rounds of reference time / time: how many times faster than the reference."""
    return {k: statistics.median(r / t for r, t in zip(times[reference], v)) for k, v in times.items()}


# a word that would make a line a list item, quote, heading or heading underline if it began the line
_BLOCK_START = re.compile(r"[-+*>]$|#|\d+[.)]$|=+$|-+$")


def wrap(note: str, width: int = 120) -> str:
    """A note as markdown lines of about ``width`` characters; a note that starts with "- " is a list item,
    its further lines indented under it. No line but the first starts with a word markdown would read as
    the start of a block (see ``_BLOCK_START``): such a word stays at the end of the line before."""
    indent = "  " if note.startswith("- ") else ""
    lines: list[str] = []
    for word in note.split():
        if lines and (len(lines[-1]) + 1 + len(word) <= width or _BLOCK_START.match(word)):
            lines[-1] += " " + word
        else:
            lines.append((indent if lines else "") + word)
    return "\n".join(lines)


@dataclass
class Table:
    """A markdown table with a title and notes, as docs/BENCHMARKS.md shows it. A note is a paragraph, or
    a list item when it starts with "- " (consecutive items form one list)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{self.title}: a row of {len(cells)} cells, the table has {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        previous = ""
        for note in self.notes:
            if not (note.startswith("- ") and previous.startswith("- ")):
                lines.append("")  # a new paragraph or list
            lines.append(wrap(note))
            previous = note
        return "\n".join(lines)


def threads(n: int) -> int:
    torch.set_num_threads(n)
    return torch.get_num_threads()


def machine() -> str:
    """One line about the machine: CPU model, cores, threads used, bf16 instructions."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        cpu += f" ({', '.join(extras) or 'no AVX-512'})"
    except (OSError, StopIteration):
        pass
    from blip2.fast import kernels

    native = "loaded" if kernels.ready() else f"not loaded ({kernels.status()})"  # compile() loads them
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} thread(s) used; torch {torch.__version__}; "
            f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}; "
            f"blip2 native kernels: {native}")


def write_results(body: str, start: str, end: str, path: str = BENCHMARKS) -> None:
    """Replace what is between the markers ``start`` and ``end`` (which must be there) with ``body``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {start} ... {end} block to fill")
    new = pattern.sub(lambda _: f"{start}\n{body}\n{end}", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
