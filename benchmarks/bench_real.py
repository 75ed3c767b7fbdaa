"""Real-size captioning against transformers: the published BLIP-2 architectures, random weights.

    python benchmarks/bench_real.py [--presets blip2-opt-2.7b blip2-flan-t5-xl] [--batches 1 8] [--dtype bf16]
                                    [--stored fp32] [--cold]

The checkpoints are written once, without any download: the published config (tests/data), random weights
(normal, std 0.02; norms 1, biases 0) written straight to sharded safetensors in the stored dtype (``--stored``,
the run's dtype unless given: the published checkpoints are fp32, which users load in bf16), the way a
Hub checkpoint is laid out. Each implementation runs in a process of its own (the peak memory is the
process's), transformers and ours alternately, for every batch:

- load: ``from_pretrained`` to a model ready to generate (ours: ``from_pretrained(fast=--fast)``; with the
  default, auto, a real-size language model decodes one image natively on the checkpoint's weights, and is laid
  out for several, or its cached layout mapped, by the second ``generate``, which pays for it);
- ours twice where the first process writes to the layout cache (the language model's blocked layout:
  ``blip2.fast.layout_cache``; the weights converted at load: ``blip2.converted``): the first process after the
  checkpoint's cached files are removed (it converts or lays the weights out, and writes them to the cache in
  the background, which it waits for at exit), then a later one, which maps what the first wrote;
- first: the first ``generate`` call (12 new greedy tokens, no prompt: the image tokens and BOS / ``</s>``);
- next: the median of the following calls, and the slowest of them (with the default on a CPU, the first process
  lays the language model out at its second call); time to first caption = load + first;
- peak RSS: the process's high-water mark (VmHWM), against the checkpoint's bytes (in the run's dtype), and against
  the weights the loaded model holds (its parameters and buffers: ours keeps the Q-Former in fp32 under bf16, as
  BLIP-2 was trained, transformers in bf16);
- % of floor: the fewest seconds a call can take (``blip2.apps.bench.floor_seconds``: every product's FLOPs at
  the best rate of a 1536^3 product in the run's dtype, each decoding step no faster than its weights' bytes at
  the best copy bandwidth) / next;
- decoding step: the steady decoding alone, timed by a streamer (transformers' ``put``/``end`` protocol, which
  both ``generate`` calls feed): the seconds from the first new token to the last over the steps between, the
  median over the next calls; its % of floor is ``step_floor_seconds`` (at one row, the weights' bytes at the
  copy bandwidth) over it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from common import BENCHMARKS, CACHE, DTYPES, Table, machine, write_results
from blip2 import Blip2Config
from blip2.fast import held_bytes, lazy
from blip2.apps.bench import (copy_bandwidth, decode_inputs, floor_seconds, matmul_rate, product_flops,
                              step_floor_seconds)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
NEW_TOKENS = 12
SHARD_BYTES = 2 * 2**30
PRESETS = ["blip2-opt-2.7b", "blip2-flan-t5-xl"]  # the tables' default; tests/data has blip2-opt-6.7b and -flan-t5-xxl


def markers(dtype: str, cold: bool = False, stored: str | None = None,
            presets: list[str] | None = None) -> tuple[str, str]:
    """The docs' markers of this dtype's table (one table per dtype, one with the files out of the page cache,
    one per stored dtype other than the run's, and one per set of presets other than the default)."""
    name = f"bench-real-{dtype}" + (f"-from-{stored}" if stored and stored != dtype else "") + ("-cold" if cold else "")
    if presets and presets != PRESETS:
        name += "-" + "-".join(p.removeprefix("blip2-") for p in presets)
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def checkpoint(preset: str, dtype: str, device: str = "cpu") -> str:
    """A directory with ``preset``'s published config and random ``dtype`` weights, written on first use, the
    numbers drawn on ``device`` (a GPU draws a real-size model's in a second where a CPU takes a minute; the
    values differ between devices, which no comparison here depends on: both implementations read one file)."""
    d = os.path.join(CACHE, f"{preset}-{dtype}-v2")  # v2: aliases written once
    if os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        return d
    from safetensors.torch import save_file

    from blip2 import Blip2ForConditionalGeneration

    config = Blip2Config.from_json_file(os.path.join(CONFIGS, f"{preset}-config.json"))
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
        # each tensor once: an alias (T5's embed_tokens of `shared`, a tied head) written as a tensor of its own
        # would hold other random values, which transformers loads as such and blip2 ties
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        saved = model.state_dict()
        shapes = {k: v.shape for k, v in tensors.items() if k in saved}
    os.makedirs(d, exist_ok=True)
    g = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, os.path.join(d, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for key, shape in shapes.items():
        if key.endswith("bias") or "position_ids" in key:
            t = torch.zeros(shape)
        elif any(n in key for n in ("norm.weight", "layernorm.weight", "LayerNorm.weight", "layer_norm.weight")):
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g, device=device) * 0.02
        shard[key] = t.to(DTYPES[dtype]).cpu()
        size += shard[key].numel() * shard[key].element_size()
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.save_pretrained(d)
    return d


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class StepClock:
    """A streamer (``put``/``end``, as transformers' ``generate`` feeds one): stamps each ``put``, the prompt's
    and then each new token's, so that the decoding steps are timed apart from the vision encoder and prefill."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self, new_tokens: int) -> float:
        """Seconds a decoding step took on average: from the first new token to the last."""
        if len(self.stamps) != new_tokens + 1:  # the prompt, then each new token
            raise RuntimeError(f"the streamer got {len(self.stamps)} puts, expected {new_tokens + 1}")
        return (self.stamps[-1] - self.stamps[1]) / (new_tokens - 1)


def worker(impl: str, d: str, batch: int, dtype: str, fast: str, calls: int) -> dict:
    """One implementation in this process: load, first call, ``calls - 1`` more; timings and peak memory."""
    config = Blip2Config.from_pretrained(d)
    pixels, ids, mask = decode_inputs(config, batch)
    t = time.perf_counter()
    if impl == "transformers":
        from transformers import Blip2ForConditionalGeneration as HF

        model = HF.from_pretrained(d, dtype=DTYPES[dtype]).eval()
        pixels = pixels.to(DTYPES[dtype])

        def call(clock: StepClock) -> torch.Tensor:
            return model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, streamer=clock)
    else:
        from blip2 import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(d, dtype=DTYPES[dtype], fast=fast)

        def call(clock: StepClock) -> torch.Tensor:
            return model.generate(pixels, ids, mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  streamer=clock)
    load = time.perf_counter() - t
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) \
        if impl == "transformers" else held_bytes(model)
    laid_out_at = 0 if impl != "transformers" and lazy.laid_out(model) else None  # (0: at load)
    times, steps = [], []
    with torch.no_grad():
        for i in range(calls):
            clock = StepClock()
            t = time.perf_counter()
            out = call(clock)
            times.append(time.perf_counter() - t)
            steps.append(clock.step_seconds(NEW_TOKENS))
            if laid_out_at is None and impl != "transformers" and lazy.laid_out(model):  # or mapped from the cache
                laid_out_at = i + 1
    from blip2 import layout_files

    t = time.perf_counter()
    layout_files.wait()  # what the process waits for at exit: the cache's files, written while it is idle
    writing = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"load": load, "writing": writing, "first": times[0],
            "next": sorted(times[1:])[len(times[1:]) // 2] if calls > 1 else None,
            "slowest": max(times[1:]) if calls > 1 else None,
            "step": sorted(steps[1:])[len(steps[1:]) // 2] if calls > 1 else None,
            "peak_rss": _peak_rss(), "held": held, "tokens": out[:, -NEW_TOKENS:].tolist(), "laid_out_at": laid_out_at,
            "page_faults": {"major": usage.ru_majflt, "minor": usage.ru_minflt}}


def _weight_files(d: str) -> list[str]:
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def _read_through(files: list[str]) -> None:
    """Read these files once, so that each worker finds them in the page cache (as far as memory allows): the
    first process would otherwise pay the disk for both."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _drop(files: list[str]) -> None:
    """Drop these files from the page cache, as after a reboot: each worker reads them from the disk."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _run_worker(impl: str, d: str, batch: int, dtype: str, fast: str, calls: int, threads: int,
                cold: bool = False) -> dict:
    from blip2 import layout_files

    files = _weight_files(d)
    layouts = layout_files.layouts_of(files)
    if impl != "ours-mapped":
        # out of the page cache for a process that does not read them: each first process, transformers' too,
        # then starts with the same memory free. (On a VM that hands free memory back to its host, what a
        # process fills costs 2.4x the time when it is free memory rather than the page cache's, reclaimed:
        # blip2-opt-2.7b's fp32 files loaded in bf16 took 11.0-11.8 s with 8 GB free, 4.4-5.0 s with the
        # page cache full, alternating, on the VM of the tables.)
        _drop([str(f) for f in layouts])
    if impl == "ours":  # a first process: no layout on disk yet
        for f in layouts:
            f.unlink()
        layouts = []
    if cold:
        _drop(files + [str(f) for f in layouts])
    else:
        _read_through(files + ([str(f) for f in layouts] if impl == "ours-mapped" else []))  # the layout last
    cmd = [sys.executable, __file__, "--worker", impl.removesuffix("-mapped"), "--dir", d, "--batches", str(batch),
           "--dtype", dtype, "--fast", fast, "--calls", str(calls), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{impl} {os.path.basename(d)} x{batch}: {json.dumps({k: v for k, v in r.items() if k != 'tokens'})}",
          file=sys.stderr)
    return r


def _weights_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def run(presets: list[str], batches: list[int], dtype: str, fast: str, calls: int, threads: int,
        cold: bool = False, stored: str | None = None) -> Table:
    from blip2 import layout_files
    from blip2.fast import kernels

    torch.set_num_threads(threads)
    kernels.load()  # as the workers do (built once per machine), so that the notes say whether they load
    stored = stored or dtype
    where = (f", from {stored} files" if stored != dtype else "") + \
        (", the files out of the page cache" if cold else "")
    table = Table(f"Real size: captioning, {NEW_TOKENS} new tokens, greedy, {dtype} (cpu, {threads} thread(s)"
                  f"{where})",
                  ["model", "images", "implementation", "load s", "first call s", "next call s",
                   "slowest next call s", "time to first caption s", "x transformers (first caption)",
                   "x transformers (next)",
                   "peak RSS / weights", "peak RSS / weights held", "% of floor", "decoding step ms",
                   "% of floor (decoding step)", "tokens"])
    laid_out_at: dict[str, set[int | None]] = {}  # ours' rows: the call after which the native step ran
    writing: list[str] = []  # ours' rows that wrote to the cache: the seconds they then waited for it
    rate = matmul_rate(dtype=DTYPES[dtype])
    bandwidth = copy_bandwidth()
    # the machine's best of the run, measured before the workers and after each batch's: a measurement that met
    # a busy host (a 1536^3 product takes milliseconds) read half the rate once, and its rows 130-160% of floor
    best_rate, best_bandwidth = rate(), bandwidth()
    for preset in presets:
        d = checkpoint(preset, stored)
        # the weights in the run's dtype (as loaded: a converting load's model holds these, not the file's bytes)
        weights = _weights_bytes(d) * DTYPES[dtype].itemsize // DTYPES[stored].itemsize
        config = Blip2Config.from_pretrained(d)
        for batch in batches:
            hf = _run_worker("transformers", d, batch, dtype, fast, calls, threads, cold)
            ours = _run_worker("ours", d, batch, dtype, fast, calls, threads, cold)
            rows = [("transformers", hf), (f"ours (fast={fast})", ours)]
            if layout_files.layouts_of(_weight_files(d)):  # the first process wrote to the cache: a later one maps it
                mapped = _run_worker("ours-mapped", d, batch, dtype, fast, calls, threads, cold)
                rows.append((f"ours (fast={fast}), later process", mapped))
            for name, r in rows[1:]:
                laid_out_at.setdefault(name, set()).add(r["laid_out_at"])
                if r["writing"] >= 0.5:
                    which = name.removeprefix(f"ours (fast={fast})").removeprefix(", ") or "first process"
                    writing.append(f"{preset} x{batch} {which} {r['writing']:.0f} s")
            ids = decode_inputs(config, batch)[1]
            flops = product_flops(config, ids.shape[1], NEW_TOKENS, batch)
            step_bytes = _decode_weight_bytes(config, dtype)
            best_rate, best_bandwidth = max(best_rate, rate()), max(best_bandwidth, bandwidth())
            floor = floor_seconds(flops, NEW_TOKENS, step_bytes, best_rate, best_bandwidth)
            step_floor = step_floor_seconds(flops, NEW_TOKENS, step_bytes, best_rate, best_bandwidth)
            for name, r in rows:
                ttfc = r["load"] + r["first"]
                table.add(preset, batch, name, f"{r['load']:.1f}", f"{r['first']:.1f}",
                          f"{r['next']:.1f}" if r["next"] else "-", f"{r['slowest']:.1f}" if r["next"] else "-",
                          f"{ttfc:.1f}",
                          f"{(hf['load'] + hf['first']) / ttfc:.2f}",
                          f"{hf['next'] / r['next']:.2f}" if r["next"] else "-",
                          f"{r['peak_rss'] / weights:.2f}", f"{r['peak_rss'] / r['held']:.2f}",
                          f"{100 * floor / r['next']:.0f}%" if r["next"] else "-",
                          f"{1e3 * r['step']:.0f}" if r["step"] else "-",
                          f"{100 * step_floor / r['step']:.0f}%" if r["step"] else "-",
                          "-" if r is hf else ("equal" if r["tokens"] == hf["tokens"] else "differ"))
        for f in layout_files.layouts_of(_weight_files(d)):  # this checkpoint's done: room for the next one's
            f.unlink()
    table.notes += [
        f"{machine()}. Random weights of the published architectures (tests/data configs), written to sharded "
        f"safetensors in {stored}" + (f" and loaded in {dtype} (converted at load; ours' first process writes the "
                                      f"converted tensors to the layout cache in the background: blip2.converted)"
                                      if stored != dtype else "") +
        "; each implementation in a process of its own, one after the other; "
        f"{calls} calls each, " + ("the checkpoint and any cached layout dropped from the page cache before each "
                                   "(as after a reboot: each reads from the disk). " if cold else
                                   "the checkpoint read through the page cache before each, any file cached from it "
                                   "dropped from there before each first process (so each starts with the same "
                                   "memory free). ") +
        "Peak RSS is the process's high-water mark over the checkpoint's bytes" + (
            f" as {dtype}" if stored != dtype else "") + ", and over the weights the loaded model holds (its "
        "parameters and buffers: ours keeps the Q-Former in fp32 under bf16, as BLIP-2 was trained; transformers "
        "in bf16). Both include the torch runtime (about 0.24 GB).",
        f"- % of floor: the fewest seconds a call can take at the best {dtype} 1536^3 product rate and the best "
        f"copy bandwidth of this run (blip2.apps.bench.floor_seconds) / the next call's time. The rate is torch's "
        f"(MKL's for fp32): a call whose products run faster than that (oneDNN's, the blocked kernel's) reads above "
        f"100%.",
        "- decoding step: the steady decoding alone, from the first new token to the last over the steps between "
        "(stamped by a streamer both generate calls feed; the median over the next calls). Its % of floor: the "
        "step's products at that rate or its weights' bytes at that bandwidth, whichever is slower (at one image, "
        "the bytes: the memory-bandwidth bound; the copy counts bytes read and written, a step only reads).",
        f"- ours (fast={fast}): " + ("from_pretrained's default: the fastest exact mode of the machine (native "
                                     "where the kernels build, AVX-512 or AVX2, else fuse; the vision encoder and "
                                     "Q-Former as loaded, routed by blip2.fast.route: their fp32 products through "
                                     "oneDNN, the vision encoder's bf16 attention through the native kernel where "
                                     "it pays). One "
                                     "image: every call decodes natively on the checkpoint's own weights, never laid "
                                     "out, its prefill's fp32 products through oneDNN (blip2.fast.lazy). Several: the "
                                     "first process of a checkpoint (its cached layout removed before) runs its first "
                                     "call as loaded (eagerly, routed the same way) and lays the language model out "
                                     "at its second, which writes that layout to the "
                                     "cache in the background (blip2.fast.layout_cache)" + (
                                         ". Loading the files in another dtype, a first process lays the language "
                                         "model out at load instead, for one image as for several, each weight "
                                         "converted straight into the layout (blip2.fast.lazy.deferred), and every "
                                         "call runs laid out."
                                         if stored != dtype else ".")
                                     if fast == "auto" else
                                     f"from_pretrained(fast={fast!r}), applied at load; the first process writes "
                                     f"the language model's layout to the cache (blip2.fast.layout_cache)."),
        "- later process: the same, once the first process's files are on disk" + (
            f": the {dtype} weights mapped at load from the converted copy, nothing converted; at eight images this "
            "one lays the language model out from the copy at its second call, and writes that layout; the first "
            "process's layout, made from the files' fp32 weights, is not cached, as a layout is cached under the "
            "files it was made from"
            if stored != dtype else
            ": the language model's blocked weights are mapped from its layout at the first call where the layout "
            "and the checkpoint fit 3/4 of the memory (blip2.fast.layout_cache.mappable), else at the second") + (
            " (read from the disk too)." if cold else " (the cached files read through the page cache before, after "
                                                      "the checkpoint)."),
        "- writing to the cache: a process writes its files while it is idle (not during a generate: "
        "blip2.layout_files.Foreground), so a first process writes them once its calls are done, and waits for "
        "that at exit; not in the times above: " + ("; ".join(writing) if writing else "none written") + ".",
        "- laid out (or mapped) at call: " + "; ".join(
            f"{name}: " + ", ".join(sorted("never" if c is None else "load" if c == 0 else str(c) for c in calls))
            for name, calls in laid_out_at.items()) + ".",
    ]
    if dtype == "bf16":
        table.notes += [
            "- On a CPU without bf16 units a bf16 1536^3 product runs far below what the models' products reach, "
            "so % of floor reads above 100% there: it means something only where the CPU multiplies bf16 natively.",
            "- tokens: bf16 random weights round differently in the two implementations, so greedy tokens may part "
            "after a few steps; the fp32 table compares them exactly."]
    return table


def _decode_weight_bytes(config: Blip2Config, dtype: str) -> int:
    """Bytes of language-model weights a decoding step reads (decoder layers and head), from the config."""
    from blip2 import Blip2ForConditionalGeneration
    from blip2.apps.bench import decode_bytes_per_token

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config).to(DTYPES[dtype])
    return decode_bytes_per_token(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--stored", choices=sorted(DTYPES), help="the checkpoint's dtype (default: --dtype)")
    p.add_argument("--fast", default="auto")
    # 4: "next" is the median of three calls, so a first process's second call of several rows, which lays the
    # language model out, is not it (with 3, the slower of two would be)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cold", action="store_true", help="drop the files from the page cache before each process")
    p.add_argument("--docs", action="store_true", help=f"write the table into {os.path.relpath(BENCHMARKS)}")
    p.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.worker, args.dir, args.batches[0], args.dtype, args.fast, args.calls)))
        return
    table = run(args.presets, args.batches, args.dtype, args.fast, args.calls, args.threads, args.cold, args.stored)
    print(table.markdown())
    if args.docs:
        write_results(table.markdown(), *markers(args.dtype, args.cold, args.stored, args.presets))


if __name__ == "__main__":
    main()
