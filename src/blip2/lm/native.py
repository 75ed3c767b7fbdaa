"""Whole decoding steps in one native call (``blip2.kernels``: ``t5_step``, ``opt_step``) on CPU.

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from .fused import FusedLinear

__all__ = ["NativeT5Step", "NativeOPTStep", "Unsupported", "check", "try_native"]

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_fast": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3}
_FLOATS = (torch.float32, torch.bfloat16)


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
        raise Unsupported(f"blip2.kernels is not loaded: {kernels.status()}")


def _batched(products: list[list[Tensor | None]]) -> bool:
    """Whether every product (``_linear``'s entries) has a blocked weight, read once for all rows: then a
    step takes several rows."""
    return all(w is None or w.dim() != 2 for w, _, _ in products)


def check(weight: Tensor) -> None:
    """Raises ``Unsupported`` unless a model with this (embedding) weight can take a native step as far
    as device, dtype and the kernels go (the layers are checked when the step is built)."""
    _dtype(weight)
    _usable()


class NativeT5Step:
    """A T5 ``decode_step`` (``T5ForConditionalGeneration._decode_step``'s arguments): one token per row
    through ``blip2_kernels::t5_step`` (several rows where the weights are blocked: ``batched``), anything
    else through ``fallback``."""

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
            if sa.SelfAttention.qkv is None:
                raise Unsupported("self-attention q/k/v not fused (call fuse() first)")
            if dense.gated and dense.wi_01 is None:
                raise Unsupported("the gated FFN's wi_0/wi_1 not fused (call fuse() first)")
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

    def __call__(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]], cross_mask: Tensor,
                 caches: list[Any], input_pos: Tensor) -> Tensor:
        if ids.dim() != 2 or ids.shape[1] != 1 or (ids.shape[0] != 1 and not self.batched) \
                or input_pos.numel() != 1 or self_mask.dtype not in _FLOATS:
            return self.fallback(ids, self_mask, cross_kv, cross_mask, caches, input_pos)
        kv = [t for (k, v), cache in zip(cross_kv, caches) for t in (k, v, cache.k, cache.v)]
        return torch.ops.blip2_kernels.t5_step(ids, input_pos, self_mask, cross_mask, kv, self.weights,
                                               self.fparams, self.iparams)


class NativeOPTStep:
    """An OPT ``decode_step`` (``OPTForCausalLM._decode_step``'s arguments): one token per row through
    ``blip2_kernels::opt_step`` (several rows where the weights are blocked: ``batched``), anything else
    through ``fallback``."""

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
            if layer.self_attn.qkv is None:
                raise Unsupported("q/k/v not fused (call fuse() first)")
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

    def __call__(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[Any], input_pos: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != 1 or (x.shape[0] != 1 and not self.batched) or input_pos.numel() != 1 \
                or mask.dtype != torch.bool or x.dtype != self.dtype:
            return self.fallback(x, positions, mask, caches, input_pos)
        kv = [t for cache in caches for t in (cache.k_cache, cache.v_cache)]
        return torch.ops.blip2_kernels.opt_step(x, positions, mask, kv, input_pos, self.weights, self.fparams,
                                                self.iparams)


def try_native(step_class: type[NativeT5Step] | type[NativeOPTStep], model: Any,
               fallback: Callable[..., Tensor]) -> NativeT5Step | NativeOPTStep | None:
    """``step_class(model, fallback)``, or None where the native steps do not cover ``model``."""
    try:
        return step_class(model, fallback)
    except Unsupported:
        return None
