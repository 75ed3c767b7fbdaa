"""What the model files share: the activation table, scaled-dot-product attention, the KV cache, an embedding
table that skips drawing values a checkpoint will replace."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Embedding", "KVCache", "activation", "attention", "attention_recorded", "device_of",
           "record_attention_weights"]


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# Activation names as they appear in Hugging Face configs (`hidden_act`, `activation_function`,
# `dense_act_fn`). transformers' NewGELU and FastGELU are the tanh approximation written out: same function.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

# The same functions computed in place (the same kernels, the same values): for inference, where the input
# is a fresh product output nobody else holds. A batch of images makes tensors of several MB per layer, and
# each fresh one costs page faults and zeroed pages.
_IN_PLACE: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": torch.ops.aten.gelu_,
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_fast": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "quick_gelu": lambda x: x.mul_(torch.sigmoid(1.702 * x)),
    "relu": torch.relu_,
    "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "tanh": torch.tanh_,
}


def activation(name: str, in_place: bool = False) -> Callable[[Tensor], Tensor]:
    """The activation function a Hugging Face config names (``"gelu"`` is the exact erf GELU);
    ``in_place``: the version that overwrites its input (not for tensors autograd records)."""
    try:
        return (_IN_PLACE if in_place else ACTIVATIONS)[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} (known: {sorted(ACTIVATIONS)})") from None


# The list that attention weights go to while a forward pass records them (output_attentions=True), else None.
# A context variable, so concurrent requests (threads, tasks) on one model do not see each other's.
_RECORDED_WEIGHTS: ContextVar[list[Tensor] | None] = ContextVar("blip2_attention_weights", default=None)


@contextmanager
def record_attention_weights(into: list[Tensor]) -> Iterator[list[Tensor]]:
    """While inside, every ``attention`` call computes its weights explicitly and appends them to ``into``."""
    token = _RECORDED_WEIGHTS.set(into)
    try:
        yield into
    finally:
        _RECORDED_WEIGHTS.reset(token)


def attention_recorded() -> bool:
    """Whether attention weights are being recorded here (``record_attention_weights``): a speed-up that
    computes attention its own way steps aside then."""
    return _RECORDED_WEIGHTS.get() is not None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
              dropout_p: float = 0.0) -> Tensor:
    """``F.scaled_dot_product_attention``: q [B, H, T, Dh], k, v [B, H, S, Dh], mask (bool, True = attend, or
    float, added) broadcastable to [B, H, T, S] -> [B, H, T, Dh]. ``scale`` None: Dh**-0.5.

    Inside ``torch.compile``, one query (a decoding step) is written as elementwise products, a softmax and a
    sum, which the compiler fuses: at that size the attention kernel's fixed cost is several times the work.
    While ``record_attention_weights`` listens, the weights are computed explicitly and recorded."""
    if torch.compiler.is_compiling():
        if q.shape[-2] == 1 and dropout_p == 0.0:
            return _one_query(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale)
    else:
        recorded = _RECORDED_WEIGHTS.get()
        if recorded is not None:
            return _with_weights(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale, dropout_p, recorded)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    scores = (q.float() * k.float()).sum(-1) * scale  # [B, H, S], in fp32 as the kernel computes
    if mask is not None:
        m = mask.squeeze(-2)  # [B|1, H|1, S]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    p = scores.softmax(-1)
    return (p[..., None] * v.float()).sum(-2, keepdim=True).to(q.dtype)  # [B, H, 1, Dh]


def _with_weights(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, dropout_p: float,
                  recorded: list[Tensor]) -> Tensor:
    # the weights transformers' eager attention returns: softmax in fp32, after dropout; masked keys get the
    # dtype's most negative value, not -inf, so a row with nothing to attend stays finite
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None:
        scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                  else scores + mask)
    weights = F.dropout(scores.softmax(-1, dtype=torch.float32).to(q.dtype), dropout_p)
    recorded.append(weights)
    return torch.matmul(weights, v)


class Embedding(nn.Embedding):
    """``nn.Embedding`` that draws no initial values on the meta device, where ``from_pretrained`` builds a model
    for its checkpoint to fill: PyTorch's first random draw on meta imports ``torch._refs``, about 1.5 s of
    every load."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter or buffer): a layer's KV cache is made there."""
    return next(itertools.chain(module.parameters(), module.buffers())).device  # the first, not a list of all


class KVCache:
    """Keys and values of one attention layer for ``length`` positions, allocated once: [N, H, L, Dh] each.

    Updated and reordered in place, so a recorded CUDA graph that reads them stays valid across steps."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        # zeros, not empty: unwritten slots are masked out, but 0 * NaN garbage would still be NaN
        self.k = torch.zeros(batch, heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos [T]; k, v [N, H, T, Dh] -> the whole cache [N, H, L, Dh]
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v

    def reorder(self, index: Tensor, length: int | None = None) -> None:
        """Keep rows ``index`` [N] (beam search); only the first ``length`` slots (all: None) hold anything."""
        n = self.k.shape[2] if length is None else length
        index = index.to(self.k.device)  # a model split over GPUs keeps each layer's cache on its device
        self.k[:, :, :n] = self.k[index, :, :n]
        self.v[:, :, :n] = self.v[index, :, :n]
