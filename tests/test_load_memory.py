"""Loading builds on the meta device and assigns tensors: peak memory stays near the weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration
from conftest import tiny_hf_config

_MEASURE = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {src!r})
    import blip2
    from blip2 import Blip2ForConditionalGeneration
    torch.zeros(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = Blip2ForConditionalGeneration.from_pretrained({d!r})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) * 1024)
    """
)


def test_peak_memory_of_loading_is_near_weight_bytes(tmp_path):
    import os

    # an LM of ~60 MB so the measurement is not drowned by allocator noise
    raw = tiny_hf_config("opt", hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8,
                         vocab_size=2000).to_dict()
    cfg = Blip2Config.from_dict(raw)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(tmp_path)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    out = subprocess.run([sys.executable, "-c", _MEASURE.format(src=os.path.abspath(src), d=str(tmp_path))],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert weight_bytes > 50e6
    # one copy of the weights plus some slack for the safetensors reader: never two copies
    assert growth < 1.3 * weight_bytes, (growth, weight_bytes)


_MEASURE_HWM = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {src!r})
    import blip2.checkpoint
    from blip2 import Blip2ForConditionalGeneration
    blip2.checkpoint._CONVERT_CHUNK = 2**20
    torch.nn.init.normal_(torch.empty(1, device="meta"))  # torch's lazy import of its meta kernels

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:  # peak := current
        f.write("5")
    base = status("VmRSS")
    m = Blip2ForConditionalGeneration.from_pretrained({d!r}, dtype=torch.bfloat16)
    print(status("VmHWM") - base)
    """
)


def test_loading_in_bf16_converts_piece_by_piece(tmp_path):
    """fp32 file, bf16 model: the peak holds the bf16 weights, not also a whole fp32 tensor (here the
    embedding matrix, as big as all the bf16 weights together)."""
    import os

    if not os.path.exists("/proc/self/clear_refs"):
        import pytest

        pytest.skip("needs Linux /proc to reset the peak resident size")
    raw = tiny_hf_config("opt", hidden_size=512, ffn_dim=512, num_hidden_layers=2, num_attention_heads=8,
                         vocab_size=60000).to_dict()
    model = Blip2ForConditionalGeneration(Blip2Config.from_dict(raw))
    model.save_pretrained(tmp_path)
    bf16_bytes = sum(p.numel() * (4 if "qformer" in n or n == "query_tokens" else 2)
                     for n, p in model.named_parameters())
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    out = subprocess.run([sys.executable, "-c", _MEASURE_HWM.format(src=os.path.abspath(src), d=str(tmp_path))],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 1.2 * bf16_bytes, (growth, bf16_bytes)
