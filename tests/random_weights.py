"""Checkpoints of random weights at any size, written one tensor at a time: a model as big as the machine's
memory can be written and then loaded, never held twice. For the memory and loading tests (and by hand, for
figures at real size: ``python tests/random_weights.py DIR --text-layers 12 --vision-layers 12``)."""

from __future__ import annotations

import json
import os
import sys

import torch

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from blip2 import Blip2Config, Blip2ForConditionalGeneration  # noqa: E402
from blip2.checkpoint import tied_parameters  # noqa: E402

OPT_27B_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "blip2-opt-2.7b-config.json")
_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def opt_27b_config(text_layers: int = 32, vision_layers: int = 39, qformer_layers: int = 12) -> dict:
    """The published blip2-opt-2.7b config (as a dict), with fewer layers where asked."""
    with open(OPT_27B_CONFIG, encoding="utf-8") as f:
        raw = json.load(f)
    raw["text_config"]["num_hidden_layers"] = text_layers
    raw["vision_config"]["num_hidden_layers"] = vision_layers
    raw["qformer_config"]["num_hidden_layers"] = qformer_layers
    return raw


def write_random_checkpoint(raw_config: dict, directory: str, dtype: torch.dtype = torch.bfloat16,
                            std: float = 0.02, seed: int = 0) -> int:
    """``config.json`` and ``model.safetensors`` of random normal weights (``std``) in ``dtype`` for a
    ``Blip2ForConditionalGeneration`` of ``raw_config``: the model is built on the meta device for its keys and
    shapes, and each tensor is drawn and written on its own. Tied aliases are left out, as writers do. Returns
    the bytes of the weights written."""
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(Blip2Config.from_dict(raw_config))
    tied = tied_parameters(model)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items() if k not in tied}
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned, as safetensors writes it
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw_config, f)
    g = torch.Generator().manual_seed(seed)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for shape in shapes.values():
            t = torch.empty(shape, dtype=dtype).normal_(std=std, generator=g)
            f.write(t.view(torch.uint8).numpy().data)
    return offset


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory")
    p.add_argument("--text-layers", type=int, default=32)
    p.add_argument("--vision-layers", type=int, default=39)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    n = write_random_checkpoint(opt_27b_config(a.text_layers, a.vision_layers), a.directory, getattr(torch, a.dtype))
    print(f"{a.directory}: {n / 1e9:.2f} GB of weights")
