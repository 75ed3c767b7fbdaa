"""fp16 batch captioning on a GPU against transformers on the same card.

    python benchmarks/bench_gpu.py [--presets opt-125m flan-t5-small] [--batches 8 32] [--repeats 5]
                                   [--record benchmarks/results/gpu.md] [--docs]

Flan-T5 runs in bf16 instead (fp16 overflows in its FFN; transformers keeps ``wo`` in fp32 for it).

A machine without CUDA cannot fill this table, so ``--record`` keeps the markdown of the last run on a
GPU in a file; ``run(...)`` on a machine without CUDA returns that recorded table (saying where and when
it was measured), which is how ``run_all.py`` puts it in docs/BENCHMARKS.md. A variant that fails (on a card
or torch version we have not seen) gets a row with its error, and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
from typing import Callable

import torch

from common import Table, checkpoint, load_hf, load_ours, machine, write_results
from blip2.apps.bench import decode_inputs, interleave

NEW_TOKENS = 24
OURS = {  # name: (fast path, compile(), cuda_graph())
    "ours": ("plain", False, False),
    "ours fuse()": ("fuse", False, False),
    "ours fuse() + compile()": ("fuse", True, False),
    "ours fuse() + cuda_graph()": ("fuse", False, True),
    "ours fuse() + compile() + cuda_graph()": ("fuse", True, True),
}
TITLE = f"Batch captioning on a GPU, {NEW_TOKENS} new tokens, greedy"
COLUMNS = ["LM", "dtype", "images", "implementation", "s / batch", "images/s", "x transformers", "peak MB",
           "tokens"]
START, END = "<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->"
RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.md")


def _error(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}".replace("|", "/")


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "equal"
    n = min(a.shape[1], b.shape[1])
    return f"{100 * (a[:, :n] == b[:, :n]).float().mean().item():.0f}% equal"


def recorded(path: str = RECORD) -> Table:
    """The table of the last GPU run, as ``--record`` wrote it (title and notes included)."""
    table = Table(TITLE, COLUMNS)
    if not os.path.exists(path):
        table.notes.append(f"No GPU in this run ({machine()}) and no recorded GPU run; `python "
                           f"benchmarks/bench_gpu.py --record benchmarks/results/gpu.md` fills this table on a "
                           f"machine with CUDA.")
        return table
    with open(path, encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| LM ")]
    table.rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in rows]
    table.notes = []
    new_note = True
    for ln in lines:  # the notes as Table.markdown wrote them: paragraphs and list items, wrapped
        if ln.startswith(("|", "**")):
            continue
        if not ln.strip():
            new_note = True
        elif new_note or ln.startswith("- "):
            table.notes.append(ln.strip())
            new_note = False
        else:
            table.notes[-1] += " " + ln.strip()
    table.notes.append("Written by `python benchmarks/bench_gpu.py --record benchmarks/results/gpu.md` on that "
                       "machine and copied from that file, since this run had no GPU.")
    return table


def _memory(device: str) -> tuple[Callable[[], None], Callable[[], float]]:
    """(start, peak): start a measurement; the MiB allocated at the peak since, beyond what was allocated
    at the start (nan off CUDA)."""
    if device != "cuda":
        return lambda: None, lambda: float("nan")
    before = [0]

    def start() -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before[0] = torch.cuda.memory_allocated()

    def peak() -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before[0]) / 2**20

    return start, peak


def run(presets: list[str], batches: list[int], repeats: int, log: str | None = None,
        device: str = "cuda") -> Table:
    """Measure on this machine's GPU; without one, the recorded table (``recorded``). ``device``: "cpu"
    only checks the script itself (with small sizes)."""
    if device == "cuda" and not torch.cuda.is_available():
        return recorded()
    table = Table(TITLE, COLUMNS)

    def add(*cells: object) -> None:
        table.add(*cells)
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(" | ".join(map(str, cells)) + "\n")

    for preset in presets:
        dtype = "fp16" if preset.startswith("opt") else "bf16"
        d = checkpoint(preset)
        models: dict[str, torch.nn.Module] = {}
        for name, load in [("transformers", lambda: load_hf(d, dtype, device))] + [
                (name, lambda fast=fast, comp=comp, graph=graph: load_ours(d, dtype, device, fast, comp,
                                                                           batch=max(batches), graph=graph))
                for name, (fast, comp, graph) in OURS.items() if device == "cuda" or not graph]:
            try:
                models[name] = load()
            except Exception as e:  # noqa: BLE001 - reported in the table
                add(preset, dtype, "-", name, _error(e), "", "", "", "")
        if "transformers" not in models:
            continue
        config = models["transformers"].config
        for batch in batches:
            pixels, ids, mask = decode_inputs(config, batch, device)
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            outs: dict[str, torch.Tensor] = {}
            peak: dict[str, float] = {}

            def call(name: str) -> None:
                with torch.no_grad():
                    if name == "transformers":
                        outs[name] = models[name].generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                                           do_sample=False, **kw)
                    else:
                        outs[name] = models[name].generate(pixels, ids, mask, **kw)

            here = {}
            start, peak_mib = _memory(device)
            for name in models:  # one untimed call each: compiles, and measures the peak memory of a call
                try:
                    start()
                    call(name)
                    peak[name] = peak_mib()
                    here[name] = lambda name=name: call(name)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    add(preset, dtype, batch, name, _error(e), "", "", "", "")
            if "transformers" not in here:
                continue
            times = interleave(here, repeats, device)
            ref = outs["transformers"].cpu()
            for name, ts in times.items():
                t = statistics.median(ts)
                speedup = statistics.median(r / x for r, x in zip(times["transformers"], ts))
                same = "-" if name == "transformers" else _same(outs[name].cpu(), ref)
                add(preset, dtype, batch, name, f"{t:.3f}", f"{batch / t:.0f}", f"{speedup:.2f}",
                    f"{peak[name]:.0f}", same)
        del models
        if device == "cuda":
            torch.cuda.empty_cache()
    table.notes.append(f"{machine()}; measured {datetime.date.today().isoformat()}. Median of {repeats} "
                       f"interleaved rounds after an untimed call each (in which compile() compiles); cuda_graph() "
                       f"records a graph at the first step of every call, timed; x transformers "
                       f"is the median of the per-round ratios. Peak MB: the most GPU memory a generate call "
                       f"allocated beyond what was allocated before it (weights of all loaded models excluded). "
                       f"tokens: our output ids against transformers' in the same dtype (half precision: the "
                       f"two sum in different orders, so a near-tie can go either way).")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["opt-125m", "flan-t5-small"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--record",
                   help="write the table's markdown to this file (run_all.py reads benchmarks/results/gpu.md)")
    p.add_argument("--log", help="append each row to this file as it is measured")
    p.add_argument("--device", default="cuda", help='"cpu" checks the script on a machine without CUDA')
    p.add_argument("--docs", action="store_true",
                   help="write the table into docs/BENCHMARKS.md (between <!-- bench-gpu:start --> and "
                        "<!-- bench-gpu:end -->)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"No CUDA device here ({machine()}); the recorded run ({os.path.relpath(RECORD)}):\n")
        table = recorded()
    else:
        table = run(args.presets, args.batches, args.repeats, args.log, args.device)
        if args.record:
            os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
            with open(args.record, "w", encoding="utf-8") as f:
                f.write(table.markdown() + "\n")
    print(table.markdown())
    if args.docs:
        write_results(table.markdown(), START, END)


if __name__ == "__main__":
    main()
