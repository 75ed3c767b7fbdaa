"""Whole decoding steps in one native call (``blip2.fast.kernels``: ``t5_step``, ``opt_step``) on CPU.

``blip2.fast.native`` and ``blip2.fast.compile_decoding`` put one in front of the Python step where they can: a
decoding step then runs the whole decoder (norms, products, one-query attention over the cache, the head) in
C++, one call per token for all rows; anything else (a model these steps do not cover) goes to the fallback
step. A compiled graph pays the graph's Python wrapper, dynamo's guards and a kernel call per small operation
around its products, an eager step its small operations one by one; a native step pays neither.

Covered: OPT (pre- or post-norm, project_in/out, any supported activation) and T5 (gated or not, tied or
not), in float32 or bfloat16. Weights in blip2's blocked layout (``fuse(model, "blocked")``, the CPU
default where the kernels load, what ``compile_decoding(batch > 1)`` and ``native`` choose there) take any number
of rows; the plain layout (``"dense"``), weight-only int8 (``"int8"``) and a model not fused at all (its own
``nn.Linear`` weights, q/k/v apart: no copy, what a large model decodes one row with, ``blip2.fast.lazy``) take
one row, larger batches going to the fallback. Not covered: fp16 (T5 keeps its FFN output projections in fp32
there), oneDNN's packed layout, int8-dynamic, anything off the CPU. Numerics follow the eager modules
(activations rounded to the model's dtype where a torch operation rounds them; norms, softmax and sums in fp32);
products accumulate in fp32 in another order than oneDNN's. Each row is computed on its own.

Greedy decoding (``generate``'s greedy loop without a repetition penalty, through the decoders'
``step_greedy``) takes the next tokens from ``greedy``: the step up to the head's input, then
``kernels.greedy_head``, which screens the vocabulary with a bfloat16 copy of an fp32 head and computes the
candidates it leaves exactly, so the tokens are the argmax of the full logits (``_NativeStep.greedy``).

The op reads its weights and scalars by name. Its schema is the C++'s own (``steps.cpp``: the names of the
slots of its weight list in list order, a layer's once as ``layers.<name>``, and of its scalars; the C++
reads each slot at an index found from its name while compiling), and ``blip2_kernels::step_schema(op)``
hands it to Python. A step builds dicts keyed by those names (a linear layer is three slots,
``<name>.weight``, ``.scale``, ``.bias``) and orders them by the schema once (``_bind``); a name the op reads
that Python does not give, or one Python gives that the op does not read, is a ``SchemaError`` naming it.
Every call sends the names with the lists and the op checks them against its schema before reading
anything, so a list built another way (reordered, a slot or scalar missing or extra) is an error naming the
slot, never a wrong read. Scalars travel as one list of floats, flags and counts included (``want_hidden``:
1 returns the head's input instead of the logits). The build's check runs once; the call's hands over and
compares a few dozen short names, some microseconds on a step of milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from blip2.fast import kernels
from blip2.fast.linear import BLOCKED_SOURCE, FusedLinear
from blip2.generation import masked_argmax

__all__ = ["NativeT5Step", "NativeOPTStep", "Unsupported", "SchemaError", "check", "try_native"]

ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_new": 2, "gelu_fast": 2, "gelu_pytorch_tanh": 2, "silu": 3, "swish": 3}
_FLOATS = (torch.float32, torch.bfloat16)
_NOTHING_BANNED = torch.empty(0, dtype=torch.long)  # greedy_head's banned ids past the minimum length


class Unsupported(ValueError):
    """The model is not one the native steps cover (the reason is the message)."""


class SchemaError(RuntimeError):
    """The Python step and the C++ op disagree on the names of the op's weight slots or scalars: a bug in
    this package, not a model the native steps do not cover (so never an ``Unsupported``)."""


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


def _screen(head: list[Tensor | None], layer: nn.Module | None) -> tuple[Tensor, Tensor] | None:
    """The bfloat16 screen of an fp32 head (``_linear``'s entries, of the module ``layer``) for
    ``kernels.greedy_head``, or None where the kernels cannot screen it (no AVX-512 BF16, a bf16 or int8 head).
    Taken from the checkpoint's cached layout where it holds one (``blip2.fast.layout_cache``)."""
    w, scale, bias = head
    if w is None or scale is not None or not kernels.screen_supports(w) \
            or (bias is not None and bias.dtype != torch.float32):
        return None
    source = BLOCKED_SOURCE.get()
    found = source.find_screen(layer) if source is not None and isinstance(layer, FusedLinear) else None
    return found if found is not None else kernels.screen_weight(w, bias.numel() if w.dim() == 3 else None)


_LAYER = "layers."  # the prefix of a layer's slots in an op's schema (slots.cpp)
_LINEAR_PARTS = ("weight", "scale", "bias")


def _schema(op: str) -> tuple[list[str], list[str]]:
    """The names ``op`` reads its weight list by, in order (a layer's slots once, as ``layers.<name>``), and
    its scalars': the C++ op's own (``blip2_kernels::step_schema``)."""
    slots, params = torch.ops.blip2_kernels.step_schema(op)
    return list(slots), list(params)


def _check_names(op: str, kind: str, wanted: list[str], given: dict[str, Any]) -> None:
    """Raises ``SchemaError`` naming what ``op`` reads that ``given`` lacks, and what it has that ``op`` does
    not read."""
    missing = [n for n in wanted if n not in given]
    extra = [n for n in given if n not in wanted]
    if missing or extra:
        parts = ([f"reads the {kind} {missing} the Python step does not give"] if missing else []) + \
                ([f"does not read the {kind} {extra} the Python step gives"] if extra else [])
        raise SchemaError(f"{op} {' and '.join(parts)} (blip2_kernels::step_schema({op!r}) names what it reads)")


def _ordered(op: str, slots: list[str], outer: dict[str, Tensor | None],
             layers: list[dict[str, Tensor | None]]) -> list[Tensor | None]:
    """``op``'s weight list: the slots ``slots`` names outside the layers from ``outer``, a layer's (named
    without the ``layers.`` prefix) from each of ``layers``, in the order of ``slots``."""
    per_layer = [n[len(_LAYER):] for n in slots if n.startswith(_LAYER)]
    start = next((i for i, n in enumerate(slots) if n.startswith(_LAYER)), len(slots))
    before, after = slots[:start], slots[start + len(per_layer):]
    _check_names(op, "slots", before + after, outer)
    for layer in layers:
        _check_names(op, "layer slots", per_layer, layer)
    return [outer[n] for n in before] + [layer[n] for layer in layers for n in per_layer] + [outer[n] for n in after]


def _values(op: str, params: list[str], scalars: dict[str, float]) -> list[float]:
    """``op``'s scalar values in the order of its names ``params``."""
    _check_names(op, "scalars", params, scalars)
    return [float(scalars[n]) for n in params]


class _NativeStep:
    """What both native steps share: the op's weight list and scalars built by name (``_bind``), the call
    (anything the op does not cover goes to ``fallback``), and ``greedy``.

    ``greedy``: greedy decoding's next tokens without the whole head (``kernels.greedy_head``: a bfloat16
    screen of the vocabulary, the few candidates it leaves computed exactly by the head's own code, so the
    tokens are the argmax of the fp32 logits): half the head's weight bytes and multiply-adds a token. fp32
    heads on CPUs with AVX-512 BF16; ``screen = None`` turns it off (it holds a bf16 copy of the head, half
    the head's size). ``exact`` holds the last call's count of logits computed exactly per row (the
    vocabulary size where it computed the whole row)."""

    op: str  # the blip2_kernels op
    dtype: torch.dtype
    fallback: Callable[..., Tensor]
    screen: tuple[Tensor, Tensor] | None = None
    exact: Tensor | None = None

    def __init__(self) -> None:
        self.products: list[list[Tensor | None]] = []  # every linear layer's entries (``_linear``)

    def _linear_slots(self, name: str, layer: nn.Module | None, optional: bool = False) -> dict[str, Tensor | None]:
        """A linear layer as its slots ``<name>.weight``, ``<name>.scale``, ``<name>.bias``."""
        self.products.append(_linear(layer, self.dtype, optional))
        return {f"{name}.{part}": t for part, t in zip(_LINEAR_PARTS, self.products[-1])}

    def _parts_slots(self, names: tuple[str, ...], fused: nn.Module | None,
                     parts: tuple[nn.Module, ...]) -> dict[str, Tensor | None]:
        """Layers that read one input, as the slots ``names`` (``_linear_slots`` each): the ``fused`` layer in
        the first and the others empty, or where there is none the model's own ``parts`` (read in place, one
        row a call, without a fused copy)."""
        layers = (fused,) + (None,) * (len(names) - 1) if fused is not None else parts
        return {k: t for i, (name, layer) in enumerate(zip(names, layers)) for k, t in
                self._linear_slots(name, layer, optional=i > 0).items()}

    def _bind(self, outer: dict[str, Tensor | None], layers: list[dict[str, Tensor | None]],
              scalars: dict[str, float], head: nn.Module, screen: bool) -> None:
        """The op's arguments after the decoding state, from the slots outside the layers (``outer``), each
        layer's and the scalars, all by name (``want_hidden`` set here): ``slots``, ``weights``, ``params``
        and ``values`` (the logits) or ``hidden_values`` (the head's input); ``head``: the module of the
        ``lm_head`` slots, whose screen the layout cache may hold; ``screen``: whether to screen it at all."""
        self.slots, self.params = _schema(self.op)
        self.weights = _ordered(self.op, self.slots, outer, layers)
        self.values = _values(self.op, self.params, {**scalars, "want_hidden": 0})
        self.hidden_values = _values(self.op, self.params, {**scalars, "want_hidden": 1})
        self.batched = _batched(self.products)  # any number of rows, else one
        self.head = [outer[f"lm_head.{part}"] for part in _LINEAR_PARTS]
        self.screen = _screen(self.head, head) if screen else None

    def covers(self, *args: Any) -> bool:
        """Whether the op runs a call with these arguments (else ``fallback`` does)."""
        raise NotImplementedError

    def _native_args(self, *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def _run(self, args: tuple[Any, ...], values: list[float]) -> Tensor:
        op = getattr(torch.ops.blip2_kernels, self.op)
        return op(*self._native_args(*args), self.slots, self.weights, self.params, values)

    def __call__(self, *args: Any) -> Tensor:
        if not self.covers(*args):
            return self.fallback(*args)
        return self._run(args, self.values)

    def greedy(self, banned: Tensor | None, *args: Any) -> Tensor:
        """The next tokens [N] of greedy decoding, ``banned`` ids left out; ``args`` as for a call."""
        if self.screen is None or not self.covers(*args):
            return masked_argmax(self(*args), banned)
        hidden = self._run(args, self.hidden_values)
        w, _, bias = self.head
        tokens, self.exact = kernels.greedy_head(hidden, *self.screen, w, bias,
                                                 _NOTHING_BANNED if banned is None else banned.cpu())
        return tokens.to(hidden.device)


def check(weight: Tensor) -> None:
    """Raises ``Unsupported`` unless a model with this (embedding) weight can take a native step as far
    as device, dtype and the kernels go (the layers are checked when the step is built)."""
    _dtype(weight)
    _usable()


class NativeT5Step(_NativeStep):
    """A T5 ``decode_step`` (``T5ForConditionalGeneration._decode_step``'s arguments): one token per row
    through ``blip2_kernels::t5_step`` (several rows where the weights are blocked: ``batched``), anything
    else through ``fallback``. ``greedy``: the next greedy tokens through the screened head (``screen=False``:
    the whole head). Weights fused or not (q/k/v and wi_0/wi_1 read where they are)."""

    op = "t5_step"

    def __init__(self, model: Any, fallback: Callable[..., Tensor], screen: bool = True) -> None:
        super().__init__()
        cfg, dec = model.config, model.decoder
        self.dtype = _dtype(model.shared.weight)
        _usable()
        if cfg.dense_act_fn not in ACTIVATIONS:
            raise Unsupported(f"activation {cfg.dense_act_fn!r}")
        self.fallback = fallback
        layers = [self._layer(blk) for blk in dec.block]
        outer = {"shared": _vector(model.shared.weight, self.dtype),
                 "final_norm.weight": _vector(dec.final_layer_norm.weight, self.dtype),
                 **self._linear_slots("lm_head", model.lm_head)}
        self._bind(outer, layers, {
            "eps": float(dec.final_layer_norm.eps),
            "out_scale": float(cfg.d_model**-0.5) if cfg.scale_decoder_outputs else 1.0,
            "heads": cfg.num_heads, "d_kv": cfg.d_kv, "activation": ACTIVATIONS[cfg.dense_act_fn],
            "gated": int(bool(cfg.is_gated_act))}, model.lm_head, screen)

    def _layer(self, blk: nn.Module) -> dict[str, Tensor | None]:
        sa, ca, ff = blk.layer[0], blk.layer[1], blk.layer[2]
        attn, dense = sa.SelfAttention, ff.DenseReluDense
        wi = getattr(dense, "wi_01", None) if dense.gated else dense.wi  # None: gated, wi_0 and wi_1 apart
        return {"self_attn_norm.weight": _vector(sa.layer_norm.weight, self.dtype),
                **self._parts_slots(("qkv", "k", "v"), getattr(attn, "qkv", None), (attn.q, attn.k, attn.v)),
                **self._linear_slots("o", attn.o),
                "cross_attn_norm.weight": _vector(ca.layer_norm.weight, self.dtype),
                **self._linear_slots("cross_q", ca.EncDecAttention.q),
                **self._linear_slots("cross_o", ca.EncDecAttention.o),
                "ffn_norm.weight": _vector(ff.layer_norm.weight, self.dtype),
                **self._parts_slots(("wi", "wi_1"), wi, (dense.wi_0, dense.wi_1) if wi is None else ()),
                **self._linear_slots("wo", dense.wo)}

    def covers(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]], cross_mask: Tensor,
               caches: list[Any], input_pos: Tensor) -> bool:
        # one slot for every row with the whole cache's mask [1, H, L, L] (generate), or a slot per row with
        # each row's own query row of it [N, H, 1, L] (continuous batching's rows)
        n = ids.shape[0]
        own_slots = input_pos.numel() == n and self_mask.shape[0] == n and self_mask.shape[2] == 1
        return ids.dim() == 2 and ids.shape[1] == 1 and (n == 1 or self.batched) \
            and (input_pos.numel() == 1 or own_slots) and self_mask.dtype in _FLOATS

    def _native_args(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]],
                     cross_mask: Tensor, caches: list[Any], input_pos: Tensor) -> tuple[Any, ...]:
        kv = [t for (k, v), cache in zip(cross_kv, caches) for t in (k, v, cache.k, cache.v)]
        return ids, input_pos, self_mask, cross_mask, kv


class NativeOPTStep(_NativeStep):
    """An OPT ``decode_step`` (``OPTForCausalLM._decode_step``'s arguments): one token per row through
    ``blip2_kernels::opt_step`` (several rows where the weights are blocked: ``batched``), anything else
    through ``fallback``. ``greedy``: the next greedy tokens through the screened head (``screen=False``: the
    whole head). Weights fused or not (q/k/v read where they are)."""

    op = "opt_step"

    def __init__(self, model: Any, fallback: Callable[..., Tensor], screen: bool = True) -> None:
        super().__init__()
        cfg, dec = model.config, model.model.decoder
        self.dtype = _dtype(dec.embed_positions.weight)  # (the token table may be the head's: decoding.table)
        _usable()
        if cfg.activation_function not in ACTIVATIONS:
            raise Unsupported(f"activation {cfg.activation_function!r}")
        norms = [layer.self_attn_layer_norm for layer in dec.layers] + [layer.final_layer_norm for layer in dec.layers]
        eps = {float(n.eps) for n in norms + ([dec.final_layer_norm] if dec.final_layer_norm is not None else [])}
        if len(eps) != 1:
            raise Unsupported(f"layer norms with different eps {sorted(eps)}")
        self.fallback = fallback
        final = dec.final_layer_norm
        outer = {"embed_positions": _vector(dec.embed_positions.weight, self.dtype),
                 **self._linear_slots("project_in", dec.project_in, optional=True)}
        layers = [self._layer(layer) for layer in dec.layers]
        outer |= {"final_norm.weight": _vector(final.weight, self.dtype) if final is not None else None,
                  "final_norm.bias": _vector(final.bias, self.dtype) if final is not None else None,
                  **self._linear_slots("project_out", dec.project_out, optional=True),
                  **self._linear_slots("lm_head", model.lm_head)}
        attn = dec.layers[0].self_attn
        self._bind(outer, layers, {
            "eps": eps.pop(), "scaling": float(attn.scaling), "heads": attn.num_heads,
            "activation": ACTIVATIONS[cfg.activation_function], "pre_norm": int(bool(cfg.do_layer_norm_before)),
            "has_final_norm": int(final is not None)}, model.lm_head, screen)

    def _layer(self, layer: nn.Module) -> dict[str, Tensor | None]:
        ln1, ln2, attn = layer.self_attn_layer_norm, layer.final_layer_norm, layer.self_attn
        return {"self_attn_norm.weight": _vector(ln1.weight, self.dtype),
                "self_attn_norm.bias": _vector(ln1.bias, self.dtype),
                **self._parts_slots(("qkv", "k", "v"), getattr(attn, "qkv", None),
                                    (attn.q_proj, attn.k_proj, attn.v_proj)),
                **self._linear_slots("out_proj", attn.out_proj),
                "ffn_norm.weight": _vector(ln2.weight, self.dtype), "ffn_norm.bias": _vector(ln2.bias, self.dtype),
                **self._linear_slots("fc1", layer.fc1), **self._linear_slots("fc2", layer.fc2)}

    def covers(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[Any], input_pos: Tensor) -> bool:
        # input_pos: one cache slot for every row, or one per row (rows of different lengths: continuous batching)
        return x.dim() == 3 and x.shape[1] == 1 and (x.shape[0] == 1 or self.batched) \
            and input_pos.numel() in (1, x.shape[0]) and mask.dtype == torch.bool and x.dtype == self.dtype

    def _native_args(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[Any],
                     input_pos: Tensor) -> tuple[Any, ...]:
        kv = [t for cache in caches for t in (cache.k, cache.v)]
        return x, positions, mask, kv, input_pos


def try_native(step_class: type[NativeT5Step] | type[NativeOPTStep], model: Any,
               fallback: Callable[..., Tensor]) -> NativeT5Step | NativeOPTStep | None:
    """``step_class(model, fallback)``, or None where the native steps do not cover ``model``."""
    try:
        return step_class(model, fallback)
    except Unsupported:
        return None
