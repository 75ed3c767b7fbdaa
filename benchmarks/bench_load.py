"""Peak memory of loading a checkpoint, ours and transformers', in fresh processes.

    python benchmarks/bench_load.py [--presets opt-125m flan-t5-small]

Each load runs in its own Python process: the growth of the peak resident memory (``VmHWM``, reset after
the imports, torch's start-up and its lazy import of the meta-tensor kernels) across ``from_pretrained`` and
one read of every weight, against the bytes of the loaded weights. The read matters for transformers, which
maps the file: its pages become resident when the weights are first used, not at load. (``ru_maxrss``
would do, but Linux carries it over from the parent process through fork and exec.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from common import Table, checkpoint, machine

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
_MEASURE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {src!r})
    import torch
    from {module} import Blip2ForConditionalGeneration

    def status(key):  # kB -> bytes, from /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    torch.zeros(1)
    # the last import: torch loads its meta-tensor kernels (~75 MB of Python) at the first random
    # initialisation of a meta tensor, which building a model on the meta device does
    torch.nn.init.normal_(torch.empty(1, device="meta"))
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident size
        f.write("5")
    base = status("VmRSS")
    model = Blip2ForConditionalGeneration.from_pretrained({directory!r}, dtype=getattr(torch, {dtype!r}))
    tensors = {{id(t): t for t in (*model.parameters(), *model.buffers())}}
    with torch.no_grad():  # read every weight once, as the first forward would (pages of a mapped file)
        for t in tensors.values():
            t.sum()
    print(json.dumps({{"growth": status("VmHWM") - base,
                      "weights": sum(t.numel() * t.element_size() for t in tensors.values())}}))
""")


def measure(module: str, directory: str, dtype: str) -> dict[str, int]:
    """{"growth": peak RSS growth in bytes, "weights": bytes of the loaded tensors} of one load."""
    code = _MEASURE.format(src=os.path.abspath(_SRC), module=module, directory=directory, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(presets: list[str]) -> Table:
    table = Table("Loading a checkpoint: peak memory",
                  ["checkpoint", "loaded as", "implementation", "weights", "peak RSS growth", "/ weights"])
    for preset in presets:
        d = checkpoint(preset)
        for dtype in ("float32", "bfloat16"):
            for name, module in (("transformers", "transformers"), ("ours", "blip2")):
                r = measure(module, d, dtype)
                table.add(f"{preset} (fp32 safetensors)", dtype, name, f"{r['weights'] / 1e6:.0f} MB",
                          f"{r['growth'] / 1e6:.0f} MB", f"{r['growth'] / r['weights']:.2f}")
    table.notes.append(f"{machine()}. One fresh process per load; growth of the peak resident memory across "
                       "from_pretrained and one read of every weight (transformers maps the file: its pages load "
                       "on first use).")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["opt-125m", "flan-t5-small"])
    print(run(p.parse_args().presets).markdown())


if __name__ == "__main__":
    main()
