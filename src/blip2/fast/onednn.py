"""fp32 products of a model's own weights through oneDNN, by swapping classes: ``route(root)``, ``unroute(root)``.

On a CPU ``F.linear`` multiplies fp32 with torch's BLAS (MKL in the official x86 builds), which on an AMD CPU runs
well below the machine. Measured on an AMD EPYC with AVX-512, 2 threads, the same plain weights through oneDNN's
product (``torch.ops.mkldnn._linear_pointwise``) against ``F.linear``: blip2-opt-2.7b's prefill products (33
rows) 154-161 GFLOP/s against 86-101, eight rows (several images decoded eagerly) 66-83 against 38-41, the vision
encoder's 257 rows 204-212 against 155-186; blip2-opt-2.7b's first fp32 caption of one image 7.1 s against 8.5
before (docs/BENCHMARKS.md, "Real size"). bf16 products go through oneDNN in torch already, so only fp32 is routed.

Routing copies and reorders nothing (oneDNN packs panels of the weight as it multiplies), so it costs nothing to
apply, holds no memory, and runs on a checkpoint's mapped pages: what ``"auto"`` uses, where it pays (``pays``:
MKL on an AMD CPU; MKL is Intel's own, and no other machine was measured), for the parts it leaves as loaded (the
vision encoder and Q-Former; a large language model's prefill, ``blip2.fast.lazy``). A routed layer is its
``nn.Linear`` with another class (``OneDNNLinear``, a subclass): the same parameters, state dict and hooks; a
product that records gradients, runs in a compiled or traced graph, or is not fp32 on the CPU goes through
``F.linear`` as before. The sums run in oneDNN's order, not MKL's: fp32 rounding apart, the same values.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.fast.linear import _MKLDNN, _autograd, swap_class, walk

__all__ = ["MIN_WEIGHTS", "OneDNNLinear", "pays", "route", "routed", "unroute"]

# a layer of fewer weights is left to F.linear: oneDNN's call costs about 15 us more, which a small product does not
# win back (measured on the AMD EPYC: 512 x 512 weights 0.80-1.17x F.linear's speed at 1-257 rows, 768 x 768 and up
# 1.09-2.09x; a 0.1 GB demo model's one-image caption took 15% longer with every layer routed)
MIN_WEIGHTS = 1 << 19


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` whose fp32 CPU products for inference go through oneDNN (see the module)."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight, self.bias
        if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
                and w.device.type == "cpu" and self.in_features > 0 and not _autograd(x, w)
                and (b is None or b.dtype == torch.float32) and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing()):  # a traced or exported graph keeps torch's own op
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)


@functools.cache
def pays() -> bool:
    """Whether ``"auto"`` routes on this machine: torch's fp32 products are MKL's and the CPU is AMD's."""
    if not _MKLDNN or not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return "AuthenticAMD" in vendor


def route(root: nn.Module, auto: bool = False) -> int:
    """Every plain ``nn.Linear`` of at least ``MIN_WEIGHTS`` weights below ``root`` (``root`` included) routed
    through oneDNN; returns how many. Nothing where torch is built without oneDNN, nor with ``auto`` (what
    ``"auto"`` routes) where it does not pay (``pays``)."""
    if not _MKLDNN or (auto and not pays()):
        return 0
    return swap_class(root, nn.Linear, OneDNNLinear, lambda m: m.weight.numel() >= MIN_WEIGHTS)


def unroute(root: nn.Module) -> None:
    """Undo ``route`` below ``root``: plain ``nn.Linear`` classes again."""
    swap_class(root, OneDNNLinear, nn.Linear)


def routed(root: nn.Module) -> bool:
    """Whether any layer below ``root`` is routed."""
    return any(type(m) is OneDNNLinear for m in walk(root))
