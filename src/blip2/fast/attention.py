"""The vision encoder's self-attention in bf16 through the native kernel (``kernels.many_query_attention``).

torch's CPU attention for a ViT-g layer (257 tokens, 16 heads of 88) runs at about a third of the rate its
matrix products reach: measured on a 2-core AMD EPYC with AVX-512 BF16 (no AMX), 8 images, 25.4 ms a layer
(117 GFLOP/s) against the kernel's 13.3 (224), whose two products go through the blocked kernel; the error
against an fp32 reference is torch's own (the scores summed in fp32, the numerators rounded to bf16 for the
second product, as torch's flash kernel does). Per 8-image call of blip2-opt-2.7b that is about 0.5 s.

``route`` swaps the class of each ``Blip2Attention`` below a module for ``KernelAttention`` (nothing copied,
the same parameters and state dict), whose forward takes the kernel for inference on a CPU in bf16 and the
model's own forward for anything else: gradients, training, other dtypes and devices, attention weights being
recorded (``output_attentions``), compiling and tracing. ``unroute`` swaps the classes back.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from blip2.fast import kernels
from blip2.fast.linear import swap_class, walk
from blip2.models.layers import attention_recorded
from blip2.models.vision import Blip2Attention

__all__ = ["KernelAttention", "pays", "route", "unroute", "routed"]


class KernelAttention(Blip2Attention):
    """A ``Blip2Attention`` whose bf16 CPU inference runs ``kernels.many_query_attention`` (see the module)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or torch.is_grad_enabled() or self.training
                or not kernels.blocked_supports(torch.bfloat16) or attention_recorded()
                or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return super().forward(x)
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, d], views with a contiguous last dim
        return self.projection(kernels.many_query_attention(q, k, v, (D // self.num_heads) ** -0.5))


def _kernel_here() -> bool:
    # the kernel's products are the blocked kernel's in bf16
    return kernels.load() and kernels.blocked_supports(torch.bfloat16)


@functools.cache
def pays() -> bool:
    """Whether ``"auto"`` routes on this machine: the kernels load and multiply bf16 (AVX-512 BF16), and the CPU
    has no AMX, with which torch's own attention multiplies bf16 on tiles (not measured against this kernel)."""
    return _kernel_here() and "amx_bf16" not in kernels.cpu_flags()


def route(root: nn.Module, auto: bool = False) -> int:
    """Every ``Blip2Attention`` below ``root`` (``root`` included) swapped for ``KernelAttention``; returns how
    many. Nothing where the kernels do not multiply bf16, nor with ``auto`` where it does not pay (``pays``)."""
    if not (pays() if auto else _kernel_here()):
        return 0
    return swap_class(root, Blip2Attention, KernelAttention)


def unroute(root: nn.Module) -> None:
    """Undo ``route`` below ``root``."""
    swap_class(root, KernelAttention, Blip2Attention)


def routed(root: nn.Module) -> bool:
    """Whether any attention below ``root`` is routed."""
    return any(type(m) is KernelAttention for m in walk(root))
