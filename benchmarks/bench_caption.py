"""Batch captioning against transformers: 8 and 1 images, 24 new greedy tokens, same weights and inputs.

    python benchmarks/bench_caption.py [--presets opt-125m flan-t5-small] [--batches 8 1] [--repeats 3]

Times whole ``generate`` calls (vision encoder, Q-Former, prefill, decoding), ours and transformers'
interleaved; "tokens" compares our output ids with transformers' (int8: the share of equal tokens).

"% of fp32 floor" (fp32 rows on CPU) = the fewest seconds a call can take with fp32 products / the call's
median time. The floor counts every product's floating-point operations (``blip2.apps.bench.product_flops``) at
the best rate of a 1536^3 fp32 matrix product measured in the same rounds, except that a decoding step takes
at least its weights' bytes (the fp32 decoder and head) over the best copy bandwidth measured with them.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common import Table, checkpoint, load_hf, load_ours, machine, threads
from blip2 import Blip2Config
from blip2.fast import Unsupported
from blip2.apps.bench import (copy_bandwidth, decode_bytes_per_token, decode_inputs, floor_seconds, interleave,
                         matmul_rate, product_flops)

NEW_TOKENS = 24


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    fast: str | None  # None: transformers; else a blip2.apps.bench fast path
    compile: bool = False
    batches: tuple[int, ...] = (8, 1)


VARIANTS = [
    Variant("transformers", "fp32", None),
    Variant("ours", "fp32", "plain"),
    Variant("ours fuse()", "fp32", "fuse"),
    Variant("ours quantize_int8()", "fp32", "int8"),
    # the native step (blip2.fast.native) for every row, weights blocked: nothing compiled. compile() on CPU
    # lays the weights out the same way and runs the same native step, so it is not timed twice
    Variant("ours native()", "fp32", "native"),
    # int8 products in the LM and the vision encoder: where the fp32 products are bound by arithmetic
    Variant("ours quantize_int8(dynamic, vision)", "fp32", "int8-dynamic", batches=(8, 1)),
    Variant("ours quantize_int8(dynamic, vision) + compile()", "fp32", "int8-dynamic", compile=True, batches=(8,)),
    Variant("transformers", "bf16", None, batches=(8,)),
    Variant("ours fuse()", "bf16", "fuse", batches=(8,)),
    Variant("ours native()", "bf16", "native", batches=(8,)),
]


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "equal"
    n = min(a.shape[1], b.shape[1])
    return f"{100 * (a[:, :n] == b[:, :n]).float().mean().item():.0f}% equal"


def run(presets: list[str], batches: list[int], repeats: int, device: str = "cpu",
        variants: list[Variant] = VARIANTS) -> Table:
    where = f"{device}, {torch.get_num_threads()} thread(s)" if device == "cpu" else device
    table = Table(f"Batch captioning, {NEW_TOKENS} new tokens, greedy ({where})",
                  ["LM", "images", "dtype", "implementation", "s / batch", "images/s", "tokens/s", "x transformers",
                   "% of fp32 floor", "tokens"])
    rate, bandwidth = matmul_rate(device=device), copy_bandwidth(device=device)  # measured in every round
    skipped: dict[str, str] = {}
    for preset in presets:
        d = checkpoint(preset)
        models = {}
        for v in variants:
            if not set(v.batches) & set(batches):
                continue
            try:
                models[v] = load_hf(d, v.dtype, device) if v.fast is None else \
                    load_ours(d, v.dtype, device, v.fast, v.compile, batch=max(v.batches))
            except Unsupported as e:  # a speed-up this machine cannot run: said in the notes, not measured
                skipped.setdefault(f"{v.name} ({v.dtype})", str(e))
        reference = {v.dtype: v for v in models if v.fast is None}
        config = Blip2Config.from_pretrained(d)
        plain = next((m for v, m in models.items() if (v.fast, v.dtype) == ("plain", "fp32")), None)
        step_bytes = decode_bytes_per_token(plain if plain is not None else load_ours(d, "fp32", device))
        for batch in batches:
            pixels, ids, mask = decode_inputs(config, batch, device)
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            outs: dict[Variant, torch.Tensor] = {}

            def call(v: Variant) -> None:
                with torch.no_grad():
                    if v.fast is None:
                        outs[v] = models[v].generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                                     do_sample=False, **kw)
                    else:
                        outs[v] = models[v].generate(pixels, ids, mask, **kw)

            here = [v for v in models if batch in v.batches]
            rates: list[float] = []
            bws: list[float] = []
            fns: dict[object, Callable[[], object]] = {v: (lambda v=v: call(v)) for v in here}
            fns["machine"] = lambda: (rates.append(rate()), bws.append(bandwidth()))
            times = interleave(fns, repeats, device)
            flops = product_flops(config, ids.shape[1], NEW_TOKENS, batch)
            floor = floor_seconds(flops, NEW_TOKENS, step_bytes, max(rates), max(bws))
            for v in here:
                ref = reference[v.dtype]
                t = statistics.median(times[v])
                speedup = statistics.median(r / x for r, x in zip(times[ref], times[v]))
                same = "-" if v is ref else _same(outs[v].cpu(), outs[ref].cpu())
                floats = v.dtype == "fp32" and v.fast in (None, "plain", "fuse", "native") and device == "cpu"
                table.add(preset, batch, v.dtype, v.name, f"{t:.2f}", f"{batch / t:.2f}",
                          f"{batch * NEW_TOKENS / t:.0f}", f"{speedup:.2f}",
                          f"{100 * floor / t:.0f}%" if floats else "-", same)
            if device == "cpu":
                table.notes.append(
                    f"{preset}, {batch} image(s): {sum(flops.values()) / 1e9:.1f} GFLOP of products (vision "
                    f"{flops['vision'] / 1e9:.1f}, Q-Former {flops['qformer'] / 1e9:.1f}, language model "
                    f"{(flops['lm_prefill'] + flops['lm_steps'] + flops['lm_head']) / 1e9:.1f}, its head "
                    f"{flops['lm_head'] / 1e9:.1f}), {step_bytes / 1e6:.0f} MB of weights per decoding step; "
                    f"fp32 products at best {max(rates) / 1e9:.0f} GFLOP/s, copies at best {max(bws) / 1e9:.1f} "
                    f"GB/s in these rounds: floor {floor:.2f} s.")
        del models
    table.notes += [f"Not measured on this machine: {name}: {why}." for name, why in skipped.items()]
    table.notes += [
        f"{machine()}. Median of {repeats} interleaved rounds; x transformers is the median of the per-round "
        f"ratios to transformers in the same dtype; % of fp32 floor: the floor (each preset's note) / the median "
        f"time, for the rows whose products are fp32 (a floor all of them share: ours native() screens the greedy "
        f"head in bf16 and could pass 100%); tokens compares the output ids with theirs.",
        "- ours: from_pretrained's default, nothing asked (fast=\"auto\": on a CPU where the kernels build, native() "
        "with the vision encoder and Q-Former as loaded, routed where that pays: blip2.fast.route; applied by the "
        "first generate call, in the untimed round).",
        "- bf16: the Q-Former stays fp32 in ours.",
        "- fuse(): the language model's weights in blip2's blocked layout (blocked_linear) where the kernels load, "
        "the vision encoder's and Q-Former's in oneDNN's.",
        "- native(): fuse() and the native decoding step (blip2.fast.native: the whole decoder in one C++ call per "
        "token, every row; greedy tokens from a bf16 screen of the fp32 head, the candidates it leaves computed "
        "exactly: blip2.fast.kernels.greedy_head), nothing compiled; compile() runs the same step on CPU (at one "
        "row on plain weights: the decoding table).",
        "- int8-dynamic + compile(): the compiled step, whose first call compiles (not timed).",
        "- quantize_int8(): int8 weights, products with bf16 inputs (the AVX-512 int8 kernel's), fp32 elsewhere.",
        "- quantize_int8(dynamic, vision): quantize_int8(dynamic=True, vision=True), int8 weights in the LM and the "
        "vision encoder and each product's input rounded to 8 bits per row, products in int32 (fbgemm), the "
        "Q-Former fp32.",
    ]
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["opt-125m", "flan-t5-small"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    threads(args.threads)
    print(run(args.presets, args.batches, args.repeats).markdown())


if __name__ == "__main__":
    main()
