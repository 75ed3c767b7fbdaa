"""Real size on a GPU against transformers: the published BLIP-2 architectures, random weights, one run.

    python benchmarks/bench_gpu_real.py [--presets blip2-opt-2.7b blip2-flan-t5-xl] [--batches 1 8 32]
                                        [--quant-batches 8] [--repeats 3] [--deadline-s 480]
                                        [--record benchmarks/results/gpu-real.md] [--log FILE] [--device cpu]

What a device session has minutes for, in the order that matters if the deadline cuts it short (1 and 2 for
each preset, then 3):

1. captioning (12 new greedy tokens, no prompt), OPT in fp16 and Flan-T5 in bf16 (fp16 overflows its FFN), at
   every ``--batches``: transformers and ours (``from_pretrained``'s default, ``fast="auto"``: the CUDA-graph step)
   loaded from the same files onto the GPU, called in interleaved rounds: load, first call, time to first caption
   (load + first call, at the first batch), s / batch, images/s, the decoding step alone (stamped by a streamer,
   ``bench_real.StepClock``) and its share of the HBM bound (the step's weight bytes at the best device-to-device
   copy rate), GPU memory (weights; the most a call allocated beyond them), tokens against transformers';
2. the vision encoder alone (the same two models, at the batches above one), its products' TFLOP/s against the
   best rate of an 8192^3 product in the same dtype on this card (the tensor-core peak as this card reaches it);
3. ``quantization_config`` rows at ``--quant-batches``: bitsandbytes 8-bit (LLM.int8) and 4-bit (nf4), torchao
   int8 and int4 weight-only (tile-packed: torch's own kernel), the same config object given to both
   implementations' ``from_pretrained``, each compared with transformers under the same config.

A variant that fails (a library missing, a card or version we have not seen) gets a row with its error, and the
rest still runs; ``--log`` gets each row as it is measured, so a run stopped at its limit keeps what it measured.

On a device machine (nothing can be downloaded there), bitsandbytes and torchao travel with the tree, unpacked:
here, ``python benchmarks/bench_gpu_real.py --prepare-site .site`` (pip downloads the wheels for the device
image's Python 3.12 and unpacks them, bitsandbytes with its CUDA 13 libraries alone: 27 MiB, where the
wheels are 46, which with the tree would crowd the 64 MiB that travels), ``/.site/`` in ``.git/info/exclude``;
then a device call with ``carry=[".site"]``, ``timeout_s=560`` and ``PYTHONPATH=.site PYTHONUNBUFFERED=1 python3
benchmarks/bench_gpu_real.py --deadline-s 420 --record $OUT/gpu-real.md --log $OUT/rows.log`` (the deadline leaves
it time to finish the group in hand and write), then copy gpu-real.md to benchmarks/results/ here (``run_all.py``
and ``--docs`` read it from there on machines without CUDA).
``--device cpu`` checks the script on a machine without CUDA (with a small preset: tests do).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import bench_real
from bench_gpu import _error, _memory, _same
from common import DTYPES, Table, machine, wrap, write_results
from blip2 import Blip2Config
from blip2.apps.bench import (copy_bandwidth, decode_inputs, interleave, matmul_rate, product_flops,
                              step_floor_seconds)

NEW_TOKENS = bench_real.NEW_TOKENS
RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu-real.md")
START, END = "<!-- bench-gpu-real:start -->", "<!-- bench-gpu-real:end -->"
CAPTION = Table(f"Real size on a GPU: captioning, {NEW_TOKENS} new tokens, greedy",
                ["model", "dtype", "images", "implementation", "load s", "first call s", "time to first caption s",
                 "x transformers (first caption)", "s / batch", "images/s", "x transformers", "decoding step ms",
                 "% of HBM bound (decoding step)", "weights GiB", "peak GiB over weights", "tokens"])
VISION = Table("Real size on a GPU: the vision encoder alone",
               ["model", "dtype", "images", "implementation", "ms", "TFLOP/s", "% of tensor-core peak"])


def quantization_configs() -> dict[str, Callable[[torch.dtype], Any]]:
    """The rows' quantization_config objects (transformers' classes, which both implementations take) for the
    model's dtype, built when their row runs, so that a missing library fails that row alone."""
    def bnb(bits: int) -> Callable[[torch.dtype], Any]:
        def build(dtype: torch.dtype) -> Any:
            from transformers import BitsAndBytesConfig

            if bits == 8:
                return BitsAndBytesConfig(load_in_8bit=True)
            # products in the model's dtype, as users set it (transformers' default is fp32; ours the weights')
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return build

    def torchao(bits: int) -> Callable[[torch.dtype], Any]:
        def build(dtype: torch.dtype) -> Any:
            from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            # int4: the tile-packed layout, whose kernel (tinygemm) is torch's own; the default, plain, needs
            # fbgemm-gpu-genai, which neither the device image nor most users have
            return TorchAoConfig(Int8WeightOnlyConfig() if bits == 8 else
                                 Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d"))
        return build

    return {"bitsandbytes 8-bit": bnb(8), "bitsandbytes 4-bit nf4": bnb(4),
            "torchao int8 weight-only": torchao(8), "torchao int4 weight-only": torchao(4)}


@dataclass
class Loaded:
    """One implementation on the device: its model, how long loading took, what its weights hold."""
    impl: str  # "transformers" or "ours"
    name: str  # as the rows show it
    model: Any
    load: float
    weights: float  # GiB the device held after loading, beyond before
    first: float | None = None  # seconds of the first generate call
    out: dict[int, torch.Tensor] = field(default_factory=dict)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _allocated(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")


def load(impl: str, d: str, dtype: str, device: str, quantization: Any = None, label: str = "") -> Loaded:
    """transformers' or our ``from_pretrained`` onto ``device`` (our default fast mode), timed."""
    kw = {"dtype": DTYPES[dtype], "device_map": device}
    if quantization is not None:
        kw["quantization_config"] = quantization
    before = _allocated(device)
    t = time.perf_counter()
    if impl == "transformers":
        from transformers import Blip2ForConditionalGeneration as HF

        model = HF.from_pretrained(d, **kw).eval()
    else:
        from blip2 import Blip2ForConditionalGeneration

        model = Blip2ForConditionalGeneration.from_pretrained(d, **kw)
    _sync(device)
    return Loaded(impl, _name(impl, label), model, time.perf_counter() - t, _allocated(device) - before)


def generate(m: Loaded, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             clock: bench_real.StepClock) -> torch.Tensor:
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, streamer=clock)
    with torch.no_grad():
        if m.impl == "transformers":
            return m.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        return m.model.generate(pixels, ids, mask, **kw)


class Run:
    """The tables of one run, a deadline, and the log every row goes to as it is measured."""

    def __init__(self, device: str, repeats: int, deadline_s: float | None, log: str | None) -> None:
        self.device, self.repeats, self.log = device, repeats, log
        self.deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self.caption = Table(CAPTION.title, CAPTION.columns)
        self.vision = Table(VISION.title, VISION.columns)
        self.skipped: list[str] = []
        self.rates: dict[str, float] = {}
        self.bandwidth = copy_bandwidth(nbytes=2**30 if device == "cuda" else 64 * 2**20, device=device)

    def rate(self, dtype: str) -> float:
        """The best rate of an 8192^3 product in ``dtype`` on this device (512^3 on a CPU, which only checks)."""
        n = 8192 if self.device == "cuda" else 512
        self.rates[dtype] = max(self.rates.get(dtype, 0.0), matmul_rate(n, self.device, dtype=DTYPES[dtype])())
        return self.rates[dtype]

    def late(self, what: str) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append(what)
            return True
        return False

    def add(self, table: Table, *cells: object) -> None:
        table.add(*cells)
        if self.log:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(f"{table.title}: " + " | ".join(map(str, cells)) + "\n")

    def captions(self, preset: str, dtype: str, d: str, config: Blip2Config, batches: list[int],
                 label: str = "", quantization: Callable[[torch.dtype], Any] | None = None,
                 vision_batches: list[int] = ()) -> None:
        """Rows for transformers and ours at each batch, loaded with ``quantization`` (a builder) if given;
        then the vision encoders' rows at ``vision_batches``, on the same models."""
        group = f"{preset} {label or 'captions'}"
        if self.late(group):
            if vision_batches:
                self.skipped.append(f"{preset} vision")
            return
        models: list[Loaded] = []
        try:
            config_object = quantization(DTYPES[dtype]) if quantization else None  # one object, given to both
        except Exception as e:  # noqa: BLE001 - reported in the table (a library missing)
            for impl in ("transformers", "ours"):
                self.add(self.caption, preset, dtype, "-", _name(impl, label), _error(e), *[""] * 11)
            return
        for impl in ("transformers", "ours"):
            try:
                models.append(load(impl, d, dtype, self.device, config_object, label))
            except Exception as e:  # noqa: BLE001 - reported in the table
                self.add(self.caption, preset, dtype, "-", _name(impl, label), _error(e), *[""] * 11)
        if not models or models[0].impl != "transformers":
            return
        # the HBM bound of the unquantized rows (a quantized step reads the library's formats)
        step_bytes = None if label else bench_real._decode_weight_bytes(config, dtype)
        for batch in batches:
            if self.late(f"{group} x{batch}"):
                break
            self._batch(preset, dtype, config, batch, models, step_bytes)
        if vision_batches and not self.late(f"{preset} vision"):
            self.vision_encoder(preset, dtype, config, models, vision_batches)
        del models
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _batch(self, preset: str, dtype: str, config: Blip2Config, batch: int, models: list[Loaded],
               step_bytes: int | None) -> None:
        pixels, ids, mask = decode_inputs(config, batch, self.device)
        pixels = pixels.to(DTYPES[dtype])
        start, peak = _memory(self.device)
        peaks, fns, clocks = {}, {}, {}
        for m in list(models):
            try:
                start()
                t = time.perf_counter()
                m.out[batch] = generate(m, pixels, ids, mask, bench_real.StepClock())
                _sync(self.device)
                if m.first is None:
                    m.first = time.perf_counter() - t
                peaks[m.name] = peak() / 1024
                clocks[m.name] = []
                fns[m.name] = lambda m=m: clocks[m.name].append(_timed_step(m, pixels, ids, mask))
            except Exception as e:  # noqa: BLE001 - reported in the table
                self.add(self.caption, preset, dtype, batch, m.name, _error(e), *[""] * 11)
                models.remove(m)
        if not models or models[0].impl != "transformers":
            return
        try:
            times = interleave(fns, self.repeats, self.device)  # its warm-up round's steps are left out below
        except Exception as e:  # noqa: BLE001 - reported in the table (out of memory in a timed round, say)
            self.add(self.caption, preset, dtype, batch, "-", _error(e), *[""] * 11)
            return
        ref = models[0]
        flops = product_flops(config, ids.shape[1], NEW_TOKENS, batch)
        bound = None if step_bytes is None else step_floor_seconds(flops, NEW_TOKENS, step_bytes, float("inf"),
                                                                   self.bandwidth())
        for m in models:
            t, step = statistics.median(times[m.name]), statistics.median(clocks[m.name][1:])
            first_row = batch == min(m.out)
            ttfc = m.load + m.first if first_row else None
            ref_ttfc = ref.load + ref.first
            self.add(self.caption, preset, dtype, batch, m.name,
                     f"{m.load:.1f}" if first_row else "-", f"{m.first:.2f}" if first_row else "-",
                     f"{ttfc:.1f}" if ttfc else "-", f"{ref_ttfc / ttfc:.2f}" if ttfc else "-",
                     f"{t:.4g}", f"{batch / t:.1f}",
                     f"{statistics.median(r / x for r, x in zip(times[ref.name], times[m.name])):.2f}",
                     f"{1e3 * step:.2f}", f"{100 * bound / step:.0f}%" if bound else "-",
                     f"{m.weights:.2f}", f"{peaks[m.name]:.2f}",
                     "-" if m is ref else _same(m.out[batch].cpu(), ref.out[batch].cpu()))

    def vision_encoder(self, preset: str, dtype: str, config: Blip2Config, models: list[Loaded],
                       batches: list[int]) -> None:
        peak = self.rate(dtype)
        for batch in batches:
            if self.late(f"{preset} vision x{batch}"):
                break
            pixels = decode_inputs(config, batch, self.device)[0].to(DTYPES[dtype])
            flops = product_flops(config, 1, 1, batch)["vision"]
            fns = {m.name: lambda m=m: _vision(m, pixels) for m in models}
            try:
                times = interleave(fns, self.repeats, self.device)
            except Exception as e:  # noqa: BLE001 - reported in the table
                self.add(self.vision, preset, dtype, batch, "-", _error(e), "", "")
                continue
            for name, ts in times.items():
                t = statistics.median(ts)
                self.add(self.vision, preset, dtype, batch, name, f"{1e3 * t:.1f}", f"{flops / t / 1e12:.3g}",
                         f"{100 * flops / t / peak:.0f}%")


def _name(impl: str, label: str) -> str:
    return f"{impl} + {label}" if label else impl


def _timed_step(m: Loaded, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> float:
    clock = bench_real.StepClock()
    generate(m, pixels, ids, mask, clock)
    return clock.step_seconds(NEW_TOKENS)


def _vision(m: Loaded, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        m.model.vision_model(pixel_values=pixels) if m.impl == "transformers" else m.model.vision_model(pixels)


def run(presets: list[str], batches: list[int], quant_batches: list[int], repeats: int, device: str = "cuda",
        deadline_s: float | None = None, log: str | None = None) -> list[Table]:
    """The two tables of this machine's run (see the module's text); ``device="cpu"`` checks the script."""
    r = Run(device, repeats, deadline_s, log)
    prepared = []
    for preset in presets:
        dtype = "fp16" if "opt" in preset else "bf16"
        if device == "cpu":
            dtype = "fp32"  # the check: CPUs multiply half precision slowly or not at all
        d = bench_real.checkpoint(preset, dtype, device)
        prepared.append((preset, dtype, d, Blip2Config.from_pretrained(d)))
    for preset, dtype, d, config in prepared:
        r.captions(preset, dtype, d, config, batches, vision_batches=[b for b in batches if b > 1] or batches)
    for preset, dtype, d, config in prepared:
        for label, build in quantization_configs().items():
            r.captions(preset, dtype, d, config, quant_batches, label, build)
    _notes(r, repeats, device)
    return [r.caption, r.vision]


def _notes(r: Run, repeats: int, device: str) -> None:
    r.caption.notes += [
        f"{machine()}; measured {datetime.date.today().isoformat()}. Random weights of the published "
        f"architectures (tests/data configs) in sharded safetensors, " + (
            "OPT in fp16 and Flan-T5 in bf16" if device == "cuda" else "in fp32 (a check of the script)") + ", both "
        f"implementations loaded from the same files onto the {device} (device_map) and called in {repeats} "
        f"interleaved rounds after a first call each: s / batch is the median, x transformers the median of the "
        f"per-round ratios.",
        "- ours: from_pretrained's default (fast=\"auto\": on a GPU the fused one-token step replayed as a CUDA "
        "graph). With a quantization_config the language model's layers are the library's, which the speed-ups "
        "do not read, so ours decodes with its plain step; x transformers is then against transformers under the "
        "same config.",
        "- load and first call: the first batch's rows; time to first caption = load + first call.",
        "- decoding step: from the first new token to the last over the steps between (stamped by a streamer), "
        f"the median over rounds; % of HBM bound: the step's weight bytes at the best copy rate of "
        f"{r.bandwidth() / 1e12:.3g} TB/s (bytes read and written; a step reads) over the step.",
        "- weights GiB: the device memory held after loading; peak GiB: the most a call allocated beyond that.",
        "- tokens: ours against transformers' in the same dtype and quantization (half precision: the two sum in "
        "different orders, so a near-tie can go either way)."]
    r.vision.notes.append(f"The vision encoder's products (blip2.apps.bench.product_flops) over the median of "
                          f"{repeats} interleaved calls, against the best rate of an 8192^3 product in the same "
                          f"dtype on this card (" + ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in r.rates.items())
                          + ").")
    if r.skipped:
        r.caption.notes.append(f"Not measured (past the deadline): {', '.join(r.skipped)}.")


def recorded(path: str = RECORD) -> str:
    """The markdown of the last run on a GPU, as ``--record`` wrote it, or a line saying there is none."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return wrap("No real-size GPU run recorded yet: no session with a GPU has run it. `python "
                "benchmarks/bench_gpu_real.py --record benchmarks/results/gpu-real.md` fills this on a machine with "
                "CUDA (the script's text says how, within one device session).")


SITE_PACKAGES = ("bitsandbytes==0.50.2", "torchao==0.18.0")


def prepare_site(directory: str, python: str = "3.12") -> int:
    """Download ``SITE_PACKAGES``' wheels for the device image (CPython ``python``, manylinux x86-64) and unpack
    them into ``directory``, an import path, leaving out bitsandbytes' libraries for CUDA other than 13 (the
    image's torch is built for CUDA 13.0) and for ROCm and XPU. Returns the bytes written."""
    import subprocess
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as wheels:
        platforms = [a for tag in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                                   "manylinux2014_x86_64") for a in ("--platform", tag)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", *platforms, "-d", wheels,
                        *SITE_PACKAGES], check=True)
        written = 0
        for wheel in sorted(os.listdir(wheels)):
            with zipfile.ZipFile(os.path.join(wheels, wheel)) as z:
                for info in z.infolist():
                    name = os.path.basename(info.filename)
                    if name.startswith("libbitsandbytes_") and not name.startswith(("libbitsandbytes_cpu",
                                                                                    "libbitsandbytes_cuda13")):
                        continue
                    z.extract(info, directory)
                    written += info.file_size
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["blip2-opt-2.7b", "blip2-flan-t5-xl"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--quant-batches", nargs="+", type=int, default=[8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--deadline-s", type=float, help="start nothing new after this many seconds")
    p.add_argument("--record", help=f"write the tables' markdown to this file ({os.path.relpath(RECORD)} is read "
                                    f"where there is no GPU)")
    p.add_argument("--log", help="append each row to this file as it is measured")
    p.add_argument("--device", default="cuda", help='"cpu" checks the script on a machine without CUDA')
    p.add_argument("--docs", action="store_true", help="write the tables into docs/BENCHMARKS.md")
    p.add_argument("--prepare-site", metavar="DIR",
                   help="unpack bitsandbytes and torchao for the device machine into DIR, and stop")
    args = p.parse_args()
    if args.prepare_site:
        print(f"{prepare_site(args.prepare_site) / 2**20:.0f} MiB in {args.prepare_site}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        text = recorded()
    else:
        tables = run(args.presets, args.batches, args.quant_batches, args.repeats, args.device, args.deadline_s,
                     args.log)
        text = "\n\n".join(t.markdown() for t in tables)
        if args.record:
            os.makedirs(os.path.dirname(os.path.abspath(args.record)), exist_ok=True)
            with open(args.record, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    print(text)
    if args.docs:
        write_results(text, START, END)


if __name__ == "__main__":
    main()
