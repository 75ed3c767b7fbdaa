"""Int8 weight-only quantization: symmetric, one scale per output channel.

A weight W [N, K] becomes ``q`` int8 [N, K] and ``scale`` [N] with ``W ~= q * scale[:, None]``; activations
stay in floating point. Weight-only int8 is what pays off for decoding, which is bound by the bytes of
weights read per token: a quarter of fp32's, half of bf16's.

``int8_linear`` picks the kernel: on CPU, ``torch.ops.aten._weight_int8pack_mm`` (AVX-512) when K is a
multiple of 16; it takes bf16 activations (its fp32 variant has no vectorised path and is several times
slower than fp32 itself), so the product is computed with bf16 inputs and returned in the input's dtype.
Elsewhere (CUDA, odd K) the weight is dequantized to the activation dtype and multiplied.

Dynamic int8 (``pack_dynamic``/``dynamic_int8_linear``, CPU only): the same int8 weights, and each
product's input rounded to 8 bits when it is computed (one scale per row), so the product itself runs on
the CPU's integer units (fbgemm's kernels; AVX-512 VNNI does four int8 multiply-adds where fp32 does one).
That pays where products are bound by arithmetic, not by weight bytes: the vision encoder, the prefill,
decoding several images at once (docs/BENCHMARKS.md). The price is a second rounding, of the activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2._compat import custom_op
from blip2.fast.kernels import cpu_flags

__all__ = ["quantize_weight", "dequantize_weight", "int8_linear", "dynamic_int8_available", "dynamic_int8_levels",
           "pack_dynamic", "unpack_dynamic", "dynamic_int8_kernel", "dynamic_int8_linear"]


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


@custom_op("blip2::int8pack_mm", mutates_args=())
def _int8pack_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    # inductor's own lowering of this op fails on a computed input (torch 2.13); as a custom op it stays
    # an opaque call inside a compiled graph
    return torch.ops.aten._weight_int8pack_mm(x, q, scale)


@_int8pack_mm.register_fake
def _(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ (q * scale).T + bias``: x [..., K] float, q [N, K] int8, scale [N] -> [..., N] in x's dtype."""
    K = q.shape[1]
    if x.device.type == "cpu" and K % 16 == 0:  # the kernel crashes on other K (torch 2.13)
        x2 = x.reshape(-1, K).to(torch.bfloat16)  # [M, K]
        mm = _int8pack_mm if torch.compiler.is_compiling() else torch.ops.aten._weight_int8pack_mm
        y = mm(x2, q, scale.to(torch.bfloat16)).to(x.dtype)
        y = y.view(*x.shape[:-1], q.shape[0])
    else:
        # (x @ q.T) * scale == x @ (q * scale).T; the int8 -> float cast is the only temporary
        y = F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)
    return y if bias is None else y + bias


# -- dynamic int8: int8 weights and activations, integer products (CPU) ---------------------------------


def _has_vnni() -> bool:
    return any("vnni" in flag for flag in cpu_flags())  # avx512_vnni, avx_vnni


# (reduce_range, levels): the kernel's flag and the integer range [-levels, levels] activations are rounded
# to. Without VNNI, x86 kernels add pairs of u8 x s8 products in 16 bits, which saturate for 8-bit
# activations, so they take 7 ("reduce range"); with VNNI the sums are 32-bit and all 8 bits are used.
# Which one this machine's kernel computes exactly is tried once (``dynamic_int8_available``), in this
# order (None: the order for this CPU, VNNI or not, worked out then).
_CANDIDATES: tuple[tuple[bool, int], ...] | None = None
_CONFIG: tuple[bool, int] | None = None
_TRIED = False
_SENTINELS: dict[tuple[int, int], Tensor] = {}


def dynamic_int8_available() -> bool:
    """Whether this torch has dynamic int8 kernels (an x86 or ARM CPU build with fbgemm/qnnpack) that compute
    the rounded rows exactly: tried once on a small layer, for each activation range. torch 2.13 marks its
    quantized tensors deprecated; a release without them makes this False, and ``int8-dynamic`` then
    refuses with a clear error."""
    global _CONFIG, _TRIED
    if not _TRIED:
        _TRIED = True
        g = torch.Generator().manual_seed(0)
        q, s = quantize_weight(torch.randn(16, 32, generator=g))
        x = torch.randn(3, 32, generator=g)
        candidates = _CANDIDATES or (((False, 127), (True, 63)) if _has_vnni() else ((True, 63), (False, 127)))
        for config in candidates:
            try:
                _CONFIG = config
                y = dynamic_int8_linear(x, dynamic_int8_kernel(pack_dynamic(q, s)), None, 16).double()
                row_scale = x.abs().amax(1, keepdim=True).double() / config[1]
                want = (torch.round(x.double() / row_scale) @ q.double().T) * s.double() * row_scale
                if torch.allclose(y, want, rtol=1e-5, atol=1e-5):
                    break
            except Exception:  # any failure means: not usable here
                pass
            _CONFIG = None
    return _CONFIG is not None


def _config() -> tuple[bool, int]:
    if _CONFIG is None and not dynamic_int8_available():
        raise RuntimeError("this torch has no working dynamic int8 kernels")
    return _CONFIG


def dynamic_int8_levels() -> int:
    """The integer range [-L, L] that ``dynamic_int8_linear`` rounds each row to (127 with VNNI, else 63)."""
    return _config()[1]


@torch.no_grad()
def pack_dynamic(q: Tensor, scale: Tensor) -> Any:
    """(q int8 [N, K], scale [N]) -> the kernel's packed weight (an opaque object); the bias stays outside."""
    zero = torch.zeros(q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # torch 2.13 warns on every quantized tensor it creates (deprecated)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(q.cpu(), scale.double().cpu(), zero, 0)
        return torch.ops.quantized.linear_prepack(qw, None)


@torch.no_grad()
def unpack_dynamic(packed: Any) -> tuple[Tensor, Tensor]:
    """The packed weight -> (q int8 [N, K], scale float32 [N]) as ``quantize_weight`` made them."""
    qw, _ = torch.ops.quantized.linear_unpack(packed)
    return qw.int_repr(), qw.q_per_channel_scales().float()


def _sentinel(K: int, levels: int) -> Tensor:
    # two extra input rows holding the lowest and the highest integer level: the kernel quantizes its whole
    # input with one scale and zero point from the input's range, which these rows pin to scale 1, so the
    # integers of every other row pass through exactly
    rows = None if torch.compiler.is_compiling() else _SENTINELS.get((K, levels))  # (made while tracing: fake)
    if rows is None:
        rows = torch.zeros(2, K)
        rows[0, 0], rows[1, 0] = -(levels + 1), levels
        if not torch.compiler.is_compiling():
            _SENTINELS[K, levels] = rows
    return rows


def dynamic_int8_kernel(packed: Any) -> Callable[[Tensor], Tensor]:
    """The integer product for ``dynamic_int8_linear``: rounded rows [M + 2, K] -> [M + 2, N] float32."""
    reduce_range = _config()[0]
    return lambda levels: torch.ops.quantized.linear_dynamic(levels, packed, reduce_range)


def dynamic_int8_linear(x: Tensor, kernel: Callable[[Tensor], Tensor], bias: Tensor | None,
                        out_features: int) -> Tensor:
    """``x @ (q * scale).T + bias`` with x rounded to 8 bits first, one scale per row (per token: a row's
    result does not depend on the other rows of the batch): x [..., K] float on CPU -> [..., N] in x's
    dtype. ``kernel``: ``dynamic_int8_kernel(packed)``, or a custom op calling it inside a compiled graph.
    The rounded rows go to the kernel as integers, its product is exact in int32, and the row and channel
    scales are applied to that."""
    K, top = x.shape[-1], _config()[1]
    x2 = x.reshape(-1, K).float()  # the kernel takes fp32 (no copy when x is fp32)
    M = x2.shape[0]
    # one buffer for the kernel's input, used first for |x|: fewer large temporaries (measured faster on a
    # vision encoder's 2056 rows, by 8 to 33% between runs)
    levels = x2.new_empty(M + 2, K)
    row_max = torch.abs(x2, out=levels[:M]).amax(1, keepdim=True)  # [M, 1] (faster than an inf-norm)
    inverse = top / row_max.clamp_min_(1e-30)  # an all-zero row: finite, so 0 * inverse is 0
    torch.mul(x2, inverse, out=levels[:M]).round_()
    levels[M:] = _sentinel(K, top)
    y = kernel(levels)[:M].div_(inverse)
    if bias is not None:
        y = y.add_(bias)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)
