"""Whole decoding steps in one native call (``blip2.fast.kernels``: ``t5_step``, ``opt_step``) on CPU.

``compile()`` and ``native()`` put one in front of the Python step where they can: a decoding step then
runs the whole decoder (norms, products, one-query attention over the cache, the head) in C++, one call
per token for all rows; anything else (a model these steps do not cover) goes to the fallback step. What a
compiled graph adds around its products (the graph's Python wrapper, dynamo's guards, a kernel call per
small operation) is about 0.8 ms a token on one core, a fifth of a Flan-T5-small bf16 step at one row;
an eager step at 8 rows spends several ms a token on its small operations. A native step pays neither.

Covered: OPT (pre- or post-norm, project_in/out, any supported activation) and T5 (gated or not, tied or
not), in float32 or bfloat16. Weights in blip2's blocked layout (``fuse("blocked")``, the CPU default
where the kernels load, what ``compile(batch > 1)`` and ``native()`` choose there) take any number of rows; the
plain layout (``fuse("dense")``) and weight-only int8 (``fuse("int8")``) take one row, larger batches going
to the fallback. Not covered: fp16 (T5 keeps its FFN output projections in fp32 there), oneDNN's packed layout,
int8-dynamic, anything off the CPU. Numerics follow the eager modules (activations rounded to the model's
dtype where a torch operation rounds them; norms, softmax and sums in fp32); products accumulate in fp32
in another order than oneDNN's. Each row is computed on its own.

Greedy decoding (``generate``'s greedy loop without a repetition penalty, through the decoders'
``step_greedy``) takes the next tokens from ``greedy``: the step up to the head's input, then
``kernels.greedy_head``, which screens the vocabulary with a bfloat16 copy of an fp32 head and computes the
candidates it leaves exactly, so the tokens are the argmax of the full logits (``_Greedy``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from blip2.fast import kernels
from blip2.generation import masked_argmax
from blip2.fast.linear import FusedLinear

__all__ = ["NativeT5Step", "NativeOPTStep", "Unsupported", "check", "try_native"]

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_fast": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3}
_FLOATS = (torch.float32, torch.bfloat16)
_NOTHING_BANNED = torch.empty(0, dtype=torch.long)  # greedy_head's banned ids past the minimum length


class Unsupported(ValueError):
    """The model is not one the native steps cover (the reason is the message)."""


_FORMATS = ("dense", "int8", "blocked")


def _linear(layer: nn.Module | None, dtype: torch.dtype, optional: bool = False) -> list[Tensor | None]:
    """A linear layer as the three list entries the native steps read: weight [N, K] or blocked, scale,
    bias (a blocked weight always has one, in fp32, zeros where the layer has none: it gives the output
    count)."""
    if layer is None:
        if optional:
            return [None, None, None]
        raise Unsupported("a projection is missing")
    if isinstance(layer, FusedLinear) and layer.fmt == "blocked":
        if layer.dtype != dtype:
            raise Unsupported(f"a {layer.dtype} weight in a {dtype} model")
        if dtype == torch.bfloat16 and layer.in_features % 2:
            raise Unsupported(f"a blocked bf16 weight of {layer.in_features} (odd) inputs")
        # fp32 (exact for a bf16 bias), zeros where the layer has none: the kernel adds it in place
        bias = layer.b.float() if layer.b is not None else torch.zeros(layer.out_features)
        return [layer.w, None, bias]
    if isinstance(layer, FusedLinear):
        if layer.fmt not in _FORMATS:
            raise Unsupported(f"weights in the {layer.fmt!r} format "
                              f"(native steps read {', '.join(map(repr, _FORMATS))})")
        w, scale, bias = layer.w, layer.scale, layer.b
    elif isinstance(layer, nn.Linear):
        w, scale, bias = layer.weight.detach(), None, None if layer.bias is None else layer.bias.detach()
    else:
        raise Unsupported(f"a {type(layer).__name__} where a linear layer was expected")
    if w.device.type != "cpu" or not w.is_contiguous() or w.dim() != 2:
        raise Unsupported("a weight that is not a contiguous CPU matrix")
    if w.dtype != torch.int8 and w.dtype != dtype:
        raise Unsupported(f"a {w.dtype} weight in a {dtype} model")
    for t in (scale, bias):
        if t is not None and (t.dtype not in _FLOATS or not t.is_contiguous()):
            raise Unsupported("a scale or bias that is not a contiguous float32/bfloat16 vector")
    return [w, scale, bias]


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise Unsupported(f"a table or norm weight of {t.dtype} on {t.device} in a {dtype} model")
    return t


def _dtype(weight: Tensor) -> torch.dtype:
    if weight.device.type != "cpu":
        raise Unsupported(f"the model is on {weight.device}")
    if weight.dtype not in _FLOATS:
        raise Unsupported(f"{weight.dtype} activations (native steps run float32 or bfloat16)")
    return weight.dtype


def _usable() -> None:
    if not kernels.load():
        raise Unsupported(f"blip2.fast.kernels is not loaded: {kernels.status()}")


def _batched(products: list[list[Tensor | None]]) -> bool:
    """Whether every product (``_linear``'s entries) has a blocked weight, read once for all rows: then a
    step takes several rows."""
    return all(w is None or w.dim() != 2 for w, _, _ in products)


def _screen(head: list[Tensor | None]) -> tuple[Tensor, Tensor] | None:
    """The bfloat16 screen of an fp32 head (``_linear``'s entries) for ``kernels.greedy_head``, or None
    where the kernels cannot screen it (no AVX-512 BF16, a bf16 or int8 head)."""
    w, scale, bias = head
    if w is None or scale is not None or not kernels.screen_supports(w) \
            or (bias is not None and bias.dtype != torch.float32):
        return None
    if w.dim() == 3:  # blocked: the plain weight back, for the bf16 copy and the norms
        w = kernels.unblock_weight(w, bias.numel(), w.shape[1])
    return kernels.screen_weight(w)


class _Greedy:
    """Greedy decoding's next tokens from a native step without the whole head (``kernels.greedy_head``:
    a bfloat16 screen of the vocabulary, the few candidates it leaves computed exactly by the head's own
    code, so the tokens are the argmax of the fp32 logits): half the head's weight bytes and multiply-adds
    a token. fp32 heads on CPUs with AVX-512 BF16; ``screen = None`` turns it off (it holds a bf16 copy of
    the head, half the head's size). ``exact`` holds the last call's count of logits computed exactly per
    row (the vocabulary size where it computed the whole row)."""

    screen: tuple[Tensor, Tensor] | None = None
    exact: Tensor | None = None
    weights: list[Tensor | None]
    fparams: list[float]
    iparams: list[int]

    def _op(self) -> Callable[..., Tensor]:
        raise NotImplementedError

    def _covers(self, *args: Any) -> bool:
        raise NotImplementedError

    def _native_args(self, *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def greedy(self, banned: Tensor | None, *args: Any) -> Tensor:
        """The next tokens [N] of greedy decoding, ``banned`` ids left out; ``args`` as for a call."""
        if self.screen is None or not self._covers(*args):
            return masked_argmax(self(*args), banned)  # type: ignore[operator]
        hidden = self._op()(*self._native_args(*args), self.weights, self.fparams, [*self.iparams, 1])
        w, _, bias = self.weights[-3:]
        tokens, self.exact = kernels.greedy_head(hidden, *self.screen, w, bias,
                                                 _NOTHING_BANNED if banned is None else banned.cpu())
        return tokens.to(hidden.device)


def check(weight: Tensor) -> None:
    """Raises ``Unsupported`` unless a model with this (embedding) weight can take a native step as far
    as device, dtype and the kernels go (the layers are checked when the step is built)."""
    _dtype(weight)
    _usable()


class NativeT5Step(_Greedy):
    """A T5 ``decode_step`` (``T5ForConditionalGeneration._decode_step``'s arguments): one token per row
    through ``blip2_kernels::t5_step`` (several rows where the weights are blocked: ``batched``), anything
    else through ``fallback``. ``greedy``: the next greedy tokens through the screened head (``_Greedy``)."""

    def __init__(self, model: Any, fallback: Callable[..., Tensor]) -> None:
        cfg, dec = model.config, model.decoder
        dtype = _dtype(model.shared.weight)
        _usable()
        if cfg.dense_act_fn not in ACTIVATIONS:
            raise Unsupported(f"activation {cfg.dense_act_fn!r}")
        products: list[list[Tensor | None]] = []

        def linear(layer: nn.Module | None) -> list[Tensor | None]:
            products.append(_linear(layer, dtype))
            return products[-1]

        weights: list[Tensor | None] = [_vector(model.shared.weight, dtype)]
        for blk in dec.block:
            sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[2]
            dense = ff.DenseReluDense
            if getattr(sa.SelfAttention, "qkv", None) is None:
                raise Unsupported("self-attention q/k/v not fused (blip2.fast.fuse first)")
            if dense.gated and getattr(dense, "wi_01", None) is None:
                raise Unsupported("the gated FFN's wi_0/wi_1 not fused (blip2.fast.fuse first)")
            weights += [_vector(sa.layer_norm.weight, dtype), *linear(sa.SelfAttention.qkv),
                        *linear(sa.SelfAttention.o),
                        _vector(ca.layer_norm.weight, dtype), *linear(ca.EncDecAttention.q),
                        *linear(ca.EncDecAttention.o),
                        _vector(ff.layer_norm.weight, dtype),
                        *linear(dense.wi_01 if dense.gated else dense.wi), *linear(dense.wo)]
        weights += [_vector(dec.final_layer_norm.weight, dtype), *linear(model.lm_head)]
        self.weights = weights
        self.batched = _batched(products)  # any number of rows, else one
        self.fparams = [float(dec.final_layer_norm.eps),
                        float(cfg.d_model**-0.5) if cfg.scale_decoder_outputs else 1.0]
        self.iparams = [cfg.num_heads, cfg.d_kv, ACTIVATIONS[cfg.dense_act_fn], int(bool(cfg.is_gated_act))]
        self.fallback = fallback
        self.dtype = dtype
        self.screen = _screen(products[-1])

    def _op(self) -> Callable[..., Tensor]:
        return torch.ops.blip2_kernels.t5_step

    def _covers(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]], cross_mask: Tensor,
                caches: list[Any], input_pos: Tensor) -> bool:
        return ids.dim() == 2 and ids.shape[1] == 1 and (ids.shape[0] == 1 or self.batched) \
            and input_pos.numel() == 1 and self_mask.dtype in _FLOATS

    def _native_args(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]],
                     cross_mask: Tensor, caches: list[Any], input_pos: Tensor) -> tuple[Any, ...]:
        kv = [t for (k, v), cache in zip(cross_kv, caches) for t in (k, v, cache.k, cache.v)]
        return ids, input_pos, self_mask, cross_mask, kv

    def __call__(self, *args: Any) -> Tensor:
        if not self._covers(*args):
            return self.fallback(*args)
        return self._op()(*self._native_args(*args), self.weights, self.fparams, self.iparams)


class NativeOPTStep(_Greedy):
    """An OPT ``decode_step`` (``OPTForCausalLM._decode_step``'s arguments): one token per row through
    ``blip2_kernels::opt_step`` (several rows where the weights are blocked: ``batched``), anything else
    through ``fallback``. ``greedy``: the next greedy tokens through the screened head (``_Greedy``)."""

    def __init__(self, model: Any, fallback: Callable[..., Tensor]) -> None:
        cfg, dec = model.config, model.model.decoder
        dtype = _dtype(dec.embed_tokens.weight)
        _usable()
        if cfg.activation_function not in ACTIVATIONS:
            raise Unsupported(f"activation {cfg.activation_function!r}")
        norms = [layer.self_attn_layer_norm for layer in dec.layers] + [layer.final_layer_norm for layer in dec.layers]
        eps = {float(n.eps) for n in norms + ([dec.final_layer_norm] if dec.final_layer_norm is not None else [])}
        if len(eps) != 1:
            raise Unsupported(f"layer norms with different eps {sorted(eps)}")
        products: list[list[Tensor | None]] = []

        def linear(layer: nn.Module | None, optional: bool = False) -> list[Tensor | None]:
            products.append(_linear(layer, dtype, optional))
            return products[-1]

        weights: list[Tensor | None] = [_vector(dec.embed_positions.weight, dtype),
                                        *linear(dec.project_in, optional=True)]
        for layer in dec.layers:
            if getattr(layer.self_attn, "qkv", None) is None:
                raise Unsupported("q/k/v not fused (blip2.fast.fuse first)")
            ln1, ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
            weights += [_vector(ln1.weight, dtype), _vector(ln1.bias, dtype), *linear(layer.self_attn.qkv),
                        *linear(layer.self_attn.out_proj),
                        _vector(ln2.weight, dtype), _vector(ln2.bias, dtype), *linear(layer.fc1),
                        *linear(layer.fc2)]
        final = dec.final_layer_norm
        weights += [_vector(final.weight, dtype) if final is not None else None,
                    _vector(final.bias, dtype) if final is not None else None,
                    *linear(dec.project_out, optional=True), *linear(model.lm_head)]
        self.weights = weights
        self.batched = _batched(products)  # any number of rows, else one
        attn = dec.layers[0].self_attn
        self.fparams = [eps.pop(), float(attn.scaling)]
        self.iparams = [attn.num_heads, ACTIVATIONS[cfg.activation_function], int(bool(cfg.do_layer_norm_before)),
                        int(final is not None)]
        self.fallback = fallback
        self.dtype = dtype
        self.screen = _screen(products[-1])

    def _op(self) -> Callable[..., Tensor]:
        return torch.ops.blip2_kernels.opt_step

    def _covers(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[Any], input_pos: Tensor) -> bool:
        return x.dim() == 3 and x.shape[1] == 1 and (x.shape[0] == 1 or self.batched) and input_pos.numel() == 1 \
            and mask.dtype == torch.bool and x.dtype == self.dtype

    def _native_args(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[Any],
                     input_pos: Tensor) -> tuple[Any, ...]:
        kv = [t for cache in caches for t in (cache.k, cache.v)]
        return x, positions, mask, kv, input_pos

    def __call__(self, *args: Any) -> Tensor:
        if not self._covers(*args):
            return self.fallback(*args)
        return self._op()(*self._native_args(*args), self.weights, self.fparams, self.iparams)


def try_native(step_class: type[NativeT5Step] | type[NativeOPTStep], model: Any,
               fallback: Callable[..., Tensor]) -> NativeT5Step | NativeOPTStep | None:
    """``step_class(model, fallback)``, or None where the native steps do not cover ``model``."""
    try:
        return step_class(model, fallback)
    except Unsupported:
        return None
