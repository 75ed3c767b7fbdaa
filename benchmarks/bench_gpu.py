"""fp16 batch captioning on a GPU against transformers on the same card (skipped without CUDA).

    python benchmarks/bench_gpu.py [--presets opt-125m flan-t5-small] [--batches 8 32] [--repeats 5]

Flan-T5 runs in bf16 instead (fp16 overflows in its FFN; transformers keeps ``wo`` in fp32 for it).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import Table, checkpoint, load_hf, load_ours, machine, ratios
from blip2.bench import decode_inputs, interleave

NEW_TOKENS = 24
OURS = {"ours": ("plain", False), "ours fuse()": ("fuse", False), "ours fuse() + compile()": ("fuse", True)}


def run(presets: list[str], batches: list[int], repeats: int) -> Table:
    table = Table(f"Batch captioning on a GPU, {NEW_TOKENS} new tokens, greedy",
                  ["LM", "dtype", "images", "implementation", "s / batch", "images/s", "x transformers"])
    if not torch.cuda.is_available():
        table.notes.append(f"No GPU in this run ({machine()}); `python benchmarks/bench_gpu.py` fills this table "
                           f"on a machine with CUDA.")
        return table
    for preset in presets:
        dtype = "fp16" if preset.startswith("opt") else "bf16"
        d = checkpoint(preset)
        models = {"transformers": load_hf(d, dtype, "cuda")}
        models.update({name: load_ours(d, dtype, "cuda", fast, comp) for name, (fast, comp) in OURS.items()})
        for batch in batches:
            pixels, ids, mask = decode_inputs(models["ours"].config, batch, "cuda")
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

            def call(name: str) -> None:
                with torch.no_grad():
                    if name == "transformers":
                        models[name].generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                              do_sample=False, **kw)
                    else:
                        models[name].generate(pixels, ids, mask, **kw)

            times = interleave({name: (lambda name=name: call(name)) for name in models}, repeats, "cuda")
            speedup = ratios(times, "transformers")
            for name, ts in times.items():
                t = statistics.median(ts)
                table.add(preset, dtype, batch, name, f"{t:.3f}", f"{batch / t:.1f}", f"{speedup[name]:.2f}")
        del models
        torch.cuda.empty_cache()
    table.notes.append(f"{machine()}. Median of {repeats} interleaved rounds (after a warm-up round, in which "
                       f"compile() compiles).")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["opt-125m", "flan-t5-small"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(run(args.presets, args.batches, args.repeats).markdown())


if __name__ == "__main__":
    main()
