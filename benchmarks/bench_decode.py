"""Decoding at batch 1 against the memory-bandwidth bound, fp32 and bf16 (and int8), ours and transformers.

    python benchmarks/bench_decode.py [--presets opt-125m flan-t5-small] [--repeats 3] [--no-compile]

A step reads every decoder weight once, so ms per token >= bytes of weights read per token / bandwidth.
The bandwidth is a 256 MB tensor copy, (read + written) / time, the best of three in every round,
measured between the decoding calls; "% of bandwidth bound" is the median over rounds of each round's bound
over its time per token, so a busy minute slows the copy and the steps it is compared with alike.
ms per token = (time of generate with 24 new tokens - with 1) / 23 for every implementation alike, so
vision, Q-Former and prefill cancel out.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import Table, checkpoint, load_hf, load_ours, machine, ratios, threads
from blip2.apps.bench import copy_bandwidth, decode_bytes_per_token, decode_inputs, interleave

NEW_TOKENS = 24


def _variants(dtype: str, compile: bool) -> dict[str, tuple[str, bool, bool]]:
    """name -> (fast path, compiled, native step) of our rows for ``dtype``. compile() at one row on CPU runs
    the native step (blip2.fast.native); in bf16 the compiled graph it stands in front of is timed too."""
    out = {"ours fuse()": ("fuse", False, False)}
    if compile:
        out["ours fuse() + compile()"] = ("fuse", True, True)
        if dtype == "bf16":
            out["ours fuse() + compile(native=False)"] = ("fuse", True, False)
    if dtype == "fp32":
        out["ours quantize_int8()"] = ("int8", False, False)
        if compile:
            out["ours quantize_int8() + compile()"] = ("int8", True, True)
    return out


def run(presets: list[str], dtypes: list[str], repeats: int, compile: bool = True, device: str = "cpu") -> Table:
    where = f"{device}, {torch.get_num_threads()} thread(s)" if device == "cpu" else device
    table = Table(f"Decoding at batch 1 ({where})",
                  ["LM", "dtype", "implementation", "ms / token", "tokens/s", "weights read / token",
                   "% of bandwidth bound", "x transformers"])
    for preset in presets:
        d = checkpoint(preset)
        for dtype in dtypes:
            models = {"transformers": load_hf(d, dtype, device)}
            models.update({name: load_ours(d, dtype, device, fast, comp, **({} if native or not comp else
                                                                             {"native": False}))
                           for name, (fast, comp, native) in _variants(dtype, compile).items()})
            # the weights a step reads: the float model's for transformers, each format's for ours
            nbytes = {name: decode_bytes_per_token(m if name != "transformers" else load_ours(d, dtype, device))
                      for name, m in models.items()}
            pixels, ids, mask = decode_inputs(models["ours fuse()"].config, 1, device)

            def gen(name: str, n: int) -> None:
                m = models[name]
                with torch.no_grad():
                    if name == "transformers":
                        m.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=n, min_new_tokens=n)
                    else:
                        m.generate(pixels, ids, mask, max_new_tokens=n, min_new_tokens=n)

            bandwidth = copy_bandwidth(device=device)
            bws: list[float] = []
            fns = {"copy": lambda: bws.append(bandwidth())}
            for name in models:
                fns[name + "|1"] = lambda name=name: gen(name, 1)
                fns[name + "|n"] = lambda name=name: gen(name, NEW_TOKENS)
            times = interleave(fns, repeats, device)
            per_token = {name: [(a - b) / (NEW_TOKENS - 1) for a, b in zip(times[name + "|n"], times[name + "|1"])]
                         for name in models}
            speedup = ratios(per_token, "transformers")
            rounds = bws[1:]  # the first is the untimed warm-up round's
            for name, ts in per_token.items():
                t = statistics.median(ts)
                # each round's steps against the same round's copies, as x transformers pairs each round
                share = statistics.median(nbytes[name] / bw / x for bw, x in zip(rounds, ts))
                table.add(preset, dtype, name, f"{t * 1e3:.1f}", f"{1 / t:.1f}", f"{nbytes[name] / 1e6:.0f} MB",
                          f"{100 * share:.0f}%", f"{speedup[name]:.2f}")
            table.notes.append(f"{preset} {dtype}: copy bandwidth {min(rounds) / 1e9:.1f}-{max(rounds) / 1e9:.1f} "
                               f"GB/s over the rounds (read + write, each round's the best of 3 copies of 256 MB "
                               f"made between its timed calls).")
            del models
    table.notes += [
        f"{machine()}. Median of {repeats} interleaved rounds. % of bound = (weights read per token / copy "
        f"bandwidth) / ms per token, each round's copies with its steps, the median over rounds; generate's "
        f"greedy steps are timed, and where they screen the head (compile(): blip2.fast.kernels.greedy_head) the "
        f"weights read count its bf16 screen instead of it.",
        "- compile(): on CPU at one row the native step (the whole decoder in one C++ call per token, "
        "blip2.fast.native), nothing compiled.",
        "- compile(native=False): the torch.compile'd step (inductor), whose first call compiles (not timed).",
    ]
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["opt-125m", "flan-t5-small"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args()
    threads(args.threads)
    print(run(args.presets, args.dtypes, args.repeats, args.compile).markdown())


if __name__ == "__main__":
    main()
