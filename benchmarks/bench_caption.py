"""Batch captioning against transformers: 8 and 1 images, 24 new greedy tokens, same weights and inputs.

    python benchmarks/bench_caption.py [--presets opt-125m flan-t5-small] [--batches 8 1] [--repeats 3]

Times whole ``generate`` calls (vision encoder, Q-Former, prefill, decoding), ours and transformers'
interleaved; "tokens" compares our output ids with transformers' (int8: the share of equal tokens).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import Table, checkpoint, load_hf, load_ours, machine, ratios, threads
from blip2.bench import decode_inputs, interleave

NEW_TOKENS = 24
OURS = {"ours": ("plain", False), "ours fuse()": ("fuse", False), "ours quantize_int8()": ("int8", False)}


def _same(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape == b.shape and torch.equal(a, b):
        return "equal"
    n = min(a.shape[1], b.shape[1])
    return f"{100 * (a[:, :n] == b[:, :n]).float().mean().item():.0f}% equal"


def run(presets: list[str], batches: list[int], repeats: int, device: str = "cpu", dtype: str = "fp32") -> Table:
    table = Table(f"Batch captioning, {dtype}, {NEW_TOKENS} new tokens, greedy ({device})",
                  ["LM", "images", "implementation", "s / batch", "images/s", "tokens/s", "x transformers",
                   "tokens"])
    for preset in presets:
        d = checkpoint(preset)
        models = {"transformers": load_hf(d, dtype, device)}
        models.update({name: load_ours(d, dtype, device, fast, comp) for name, (fast, comp) in OURS.items()})
        for batch in batches:
            pixels, ids, mask = decode_inputs(models["ours"].config, batch, device)
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            outs: dict[str, torch.Tensor] = {}

            def call(name: str) -> None:
                m = models[name]
                with torch.no_grad():
                    if name == "transformers":
                        outs[name] = m.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                                do_sample=False, **kw)
                    else:
                        outs[name] = m.generate(pixels, ids, mask, **kw)

            times = interleave({name: (lambda name=name: call(name)) for name in models}, repeats, device)
            speedup = ratios(times, "transformers")
            for name, ts in times.items():
                t = statistics.median(ts)
                same = "-" if name == "transformers" else _same(outs[name].cpu(), outs["transformers"].cpu())
                table.add(preset, batch, name, f"{t:.2f}", f"{batch / t:.2f}", f"{batch * NEW_TOKENS / t:.0f}",
                          f"{speedup[name]:.2f}", same)
        del models
    table.notes.append(f"{machine()}. Median of {repeats} interleaved rounds; x transformers is the median of "
                       f"the per-round ratios.")
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
