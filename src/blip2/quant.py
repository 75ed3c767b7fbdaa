"""Int8 weight-only quantization: symmetric, one scale per output channel.

A weight W [N, K] becomes ``q`` int8 [N, K] and ``scale`` [N] with ``W ~= q * scale[:, None]``; activations
stay in floating point. Weight-only int8 is what pays off for decoding, which is bound by the bytes of
weights read per token: a quarter of fp32's, half of bf16's.

``int8_linear`` picks the kernel: on CPU, ``torch.ops.aten._weight_int8pack_mm`` (AVX-512) when K is a
multiple of 16; it takes bf16 activations (its fp32 variant has no vectorised path and is several times
slower than fp32 itself), so the product is computed with bf16 inputs and returned in the input's dtype.
Elsewhere (CUDA, odd K) the weight is dequantized to the activation dtype and multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["quantize_weight", "dequantize_weight", "int8_linear"]


@torch.no_grad()
def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] float -> (q int8 [N, K], scale float32 [N]), round to nearest, range [-127, 127]."""
    w = weight.float()
    # an all-zero row keeps scale 1 (any scale would do; 0 would give 0/0)
    scale = (w.abs().amax(dim=1) / 127.0).masked_fill_(w.abs().amax(dim=1) == 0, 1.0)  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_weight(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(q [N, K], scale [N]) -> weight [N, K] in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (q * scale).T + bias``: x [..., K] float, q [N, K] int8, scale [N] -> [..., N] in x's dtype."""
    K = q.shape[1]
    if x.device.type == "cpu" and K % 16 == 0:  # the kernel crashes on other K (torch 2.13)
        x2 = x.reshape(-1, K).to(torch.bfloat16)  # [M, K]
        y = torch.ops.aten._weight_int8pack_mm(x2, q, scale.to(torch.bfloat16)).to(x.dtype)
        y = y.view(*x.shape[:-1], q.shape[0])
    else:
        # (x @ q.T) * scale == x @ (q * scale).T; the int8 -> float cast is the only temporary
        y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias
