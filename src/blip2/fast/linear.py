"""Linear layers in an inference format: several projections fused into one product, weights laid out for the
fastest kernel, or int8.

``fuse_linears(owner, name, parts, fmt)`` replaces the ``nn.Linear`` children ``parts`` of ``owner`` (say
``q_proj, k_proj, v_proj``) by one ``FusedLinear`` stored as ``owner.<name>`` that computes all of them
in one product; the old names become ``LinearView``s of it. ``pack_linears(root, fmt)`` turns every
remaining ``nn.Linear`` below ``root`` into a one-part ``FusedLinear`` in place.

The state dict does not change: a ``LinearView``, or a one-part ``FusedLinear``, writes ``weight`` and
``bias`` under its own name, rebuilt in the reference layout (int8: dequantized), so ``save_pretrained``
still writes the reference keys. The weights are buffers, not parameters: this is for inference only.
``unfuse_linears`` puts the ``nn.Linear`` layers back: the same modules and parameter objects, which are empty
while fused (their values live in the fused layer).

Formats (``fmt``; their speeds are measured in docs/BENCHMARKS.md):
- ``"onednn"``: CPU, fp32/bf16. The weight is reordered once into oneDNN's blocked layout and multiplied
  by ``torch.ops.mkldnn._linear_pointwise``; ``F.linear``'s BLAS repacks the weight on every call, which
  costs most where a call has few rows (decoding).
- ``"blocked"``: CPU, fp32 (bf16 where the CPU has AVX-512 BF16), the native kernels loaded. blip2's own
  blocked layout (``blip2.fast.kernels.block_weight``: 16 output columns a block, stored k by k) multiplied by
  ``blip2.fast.kernels.blocked_linear``, built for the few rows of a decoding batch. The language models'
  default on CPU (``decode_format``); the vision encoder and Q-Former keep oneDNN's, which multiplies their
  hundreds of rows as fast.
- ``"dense"``: a plain [N, K] weight; on CPU it still goes through oneDNN (no repacking per call). In a
  compiled graph, a product with one row streams the weight (``_row_product``: the native kernel of
  ``blip2.fast.kernels`` where it is built, else a fused reduction): the layout for decoding one row.
- ``"int8"``: weight-only int8 (``blip2.fast.quant``); in a compiled graph, one row as for "dense".
- ``"int8-dynamic"``: CPU. int8 weights packed for fbgemm, and each input rounded to 8 bits as it comes, one
  scale per row (``blip2.fast.quant.dynamic_int8_linear``): the product runs on integer units, which pays
  where products are bound by arithmetic (many rows: a vision encoder, a prefill, decoding several images).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.fast import kernels
from blip2._compat import custom_op
from blip2.mapped import Ahead, convert, prefetch_pages, release_pages
from blip2.fast.quant import (dequantize_weight, dynamic_int8_available, dynamic_int8_kernel, dynamic_int8_linear,
                     int8_linear, pack_dynamic, quantize_weight, unpack_dynamic)

__all__ = ["FORMATS", "FusedLinear", "INT8_FORMATS", "LinearView", "decode_format", "default_format", "fused_format",
           "fuse_linears", "pack_linears", "unfuse_linears", "walk"]

FORMATS = ("onednn", "blocked", "dense", "int8", "int8-dynamic")
INT8_FORMATS = ("int8", "int8-dynamic")
# formats that keep their own copy of a head tied to the embeddings (the embedding needs the plain matrix)
COPY_TIED = (*INT8_FORMATS, "blocked")
# oneDNN picks its blocked layout for an expected number of rows; 64 measured best for 1 to 264 rows
_PACK_ROWS = 64

# asked once: torch.compile does not trace into torch.backends
_MKLDNN = torch.backends.mkldnn.is_available()
# bf16 only where the CPU has bf16 instructions (AVX-512 BF16 / AMX); elsewhere oneDNN emulates it
_MKLDNN_BF16 = _MKLDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_ok(x: Tensor) -> bool:
    if x.device.type != "cpu" or not _MKLDNN:
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _MKLDNN_BF16)


@custom_op("blip2::onednn_linear", mutates_args=())
def _onednn_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    # inductor cannot lower `_linear_pointwise` with a weight it did not pack itself; as a custom op
    # it stays an opaque call inside a compiled graph
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
    if torch.compiler.is_compiling():
        return _onednn_linear_op(x, weight, bias, out_features)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# the integer products of live "int8-dynamic" layers by handle: a compiled graph calls one through a custom
# op, which cannot take the packed weight (an opaque object) as an argument, so it takes the layer's handle
_KERNELS: dict[int, Callable[[Tensor], Tensor]] = {}
_HANDLES = itertools.count()


@custom_op("blip2::dynamic_int8_product", mutates_args=())
def _dynamic_int8_op(levels: Tensor, handle: int, out_features: int) -> Tensor:
    return _KERNELS[handle](levels)


@_dynamic_int8_op.register_fake
def _(levels: Tensor, handle: int, out_features: int) -> Tensor:
    return levels.new_empty(levels.shape[0], out_features, dtype=torch.float32)


def _row_product(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """x [..., K] holding one row, weight [N, K] (float or int8 with ``scale`` [N]) -> [..., N].

    Written as an elementwise product and a sum, which the compiler fuses into one streaming pass over
    the weight, int8 converted on the fly: near the copy bandwidth, where a matrix-vector kernel reaches
    about 60% of it. Used only inside a compiled graph, for one row (decoding at batch 1); compile with
    ``compile_step`` so x is computed before that loop, not inside it once per output row.

    Where the native kernel is loaded (``blip2.fast.kernels``) it computes the same sums with several accumulators
    and weight streams at once: the compiled reduction's one accumulator per output row holds bf16 to about 20 GB/s
    (benchmarks/bench_decode.py with ``BLIP2_KERNELS=0`` measures the step without the kernel)."""
    if kernels.row_product_supports(x, weight, scale, bias):
        return kernels.row_product(x, weight, scale, bias)
    y = (x.reshape(1, -1).float() * weight.float()).sum(-1)  # [N], accumulated in fp32 as a matmul does
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _compiling_one_row(x: Tensor, in_features: int) -> bool:
    return torch.compiler.is_compiling() and x.numel() == in_features


def _autograd(x: Tensor, weight: Tensor | None = None) -> bool:
    """Whether a product must be differentiable: the fast kernels have no backward (stage-2 training's frozen
    language model passes gradients to its inputs)."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))


# bytes of fp32 rows quantized at a time: quantize_weight's temporaries are a few times their rows' size
_QUANTIZE_CHUNK = 2**20


def _quantize(parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``quantize_weight(torch.cat(parts))`` (one scale per row, so rows quantize on their own), a few rows at a
    time and without the concatenated copy."""
    n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
    q = torch.empty(n, k, dtype=torch.int8, device=parts[0].device)
    scale = torch.empty(n, dtype=torch.float32, device=parts[0].device)
    rows, start = max(1, _QUANTIZE_CHUNK // (4 * k)), 0
    for part in parts:
        for i in range(0, part.shape[0], rows):
            piece = part[i:i + rows]
            q[start:start + len(piece)], scale[start:start + len(piece)] = quantize_weight(piece)
            start += len(piece)
    return q, scale


def _release(weights: Sequence[Tensor]) -> None:
    for weight in weights:
        release_pages(weight)


def _block(parts: Sequence[Tensor], release: bool, dtype: torch.dtype, piece_bytes: int = 4 << 20) -> Tensor:
    """``kernels.block_weight(torch.cat(parts).to(dtype))`` without the concatenation, a few MB of rows at a time
    straight into the result (faulted just ahead: ``mapped.Ahead``), each piece released once copied where
    ``release`` (a mapped weight copied whole held its copy and all its pages at once). Parts whose rows do not fill
    whole blocks (but the last) are concatenated; parts of another dtype converted a piece at a time into one
    buffer (a new one each piece faults fresh memory)."""
    if any(p.shape[0] % 16 for p in parts[:-1]):
        whole = torch.cat(list(parts))
        if release:
            _release(parts)
        parts, release = [whole], False
    n, k = sum(p.shape[0] for p in parts), parts[0].shape[1]
    out = Ahead(kernels.blocked_shape(n, k, dtype), dtype)  # (blocked weights are CPU only)
    rows = max(16, piece_bytes // max(1, k * parts[0].element_size()) // 16 * 16)  # whole blocks
    converted = torch.empty(rows * k, dtype=dtype) if parts[0].dtype != dtype else None
    block = 0
    for part in parts:
        prefetch_pages(part)
        for i in range(0, part.shape[0], rows):
            piece = part[i:i + rows]
            blocks = -(-piece.shape[0] // 16)
            kernels.block_weight(piece if converted is None else  # (rounded as the load's conversion rounds)
                                 converted[:piece.numel()].view(piece.shape).copy_(piece),
                                 out.upto(block + blocks)[block:block + blocks])
            block += blocks
            if release:
                release_pages(piece)
    return out.t


class BlockedSource(Protocol):
    def find(self, layers: Sequence[nn.Linear], weights: Sequence[Tensor], shape: tuple[int, ...]) -> Tensor | None:
        """The blocked weight of ``layers`` (plain weights ``weights``), already laid out, or None."""

    def find_screen(self, head: FusedLinear) -> tuple[Tensor, Tensor] | None:
        """The greedy head's screen of the blocked ``head`` (``kernels.screen_weight``), already made, or None."""


# the dtype to lay weights out in (None: theirs): set by blip2.fast.lazy to convert a load's weights into the layout
LAY_OUT_DTYPE: ContextVar[torch.dtype | None] = ContextVar("lay_out_dtype", default=None)

# where blocked weights may already be laid out: set by blip2.fast.layout_cache while it lays out a model it has
# the layout of on disk (a context variable: one model's layout in a thread does not reach another's)
BLOCKED_SOURCE: ContextVar[BlockedSource | None] = ContextVar("blocked_source", default=None)


_MALLOC_TRIM: list[Callable[[int], int] | None] = []  # glibc's malloc_trim, looked up once (None: not glibc)


def _trim_heap() -> None:
    """Give the memory freed in the C heap back to the system. glibc keeps freed blocks below its mmap
    threshold (which rises to 32 MB as large blocks are freed) resident for reuse, and a layer's temporaries
    (the concatenation, int8's float rows) then pile up across a model laid out layer by layer: fusing 16 fp32
    layers of width 768 (tests/test_load_memory.py) peaked at 1.25x the weights, 1.03x with the trim."""
    if not _MALLOC_TRIM:
        import ctypes

        _MALLOC_TRIM.append(getattr(ctypes.CDLL(None), "malloc_trim", None))
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


def default_format(weight: Tensor) -> str:
    """The fastest float format for a weight's device and dtype, for products of many rows (a vision
    encoder, a Q-Former)."""
    return "onednn" if _onednn_ok(weight) else "dense"


def decode_format(weight: Tensor) -> str:
    """The fastest float format for a language model's products, which decode a few rows per call: on a CPU
    where the native kernels load (built on first use, once per machine), ``"blocked"``; else
    ``default_format``."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and kernels.load():
        if kernels.blocked_supports(weight.dtype):
            return "blocked"
    return default_format(weight)


class FusedLinear(nn.Module):
    """``y = x @ W.T + b`` for one or several ``nn.Linear`` with the same input, concatenated along the output.

    ``forward`` returns [..., sum of out_features]; ``part(i)`` rebuilds the i-th layer's weight and bias.
    A one-part ``FusedLinear`` stands in for its ``nn.Linear`` in the state dict (unless ``in_state_dict``
    is False: an int8 copy of a head tied to the embeddings, which cannot rebuild the embedding's values).
    ``tied``: stands for a head tied to the embeddings (a copy of its matrix, or the embedding's own).
    """

    def __init__(self, layers: Sequence[nn.Linear], fmt: str, in_state_dict: bool = True, tied: bool = False) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"weight format {fmt!r}: expected one of {FORMATS}")
        weights = [layer.weight.detach() for layer in layers]
        w = weights[0]  # all parts share its dtype, device and in_features
        dtype = LAY_OUT_DTYPE.get() or w.dtype
        if fmt == "onednn" and not _onednn_ok(w):
            raise ValueError(f"onednn format needs fp32/bf16 weights on CPU, got {w.dtype} on {w.device}")
        if fmt == "blocked" and (w.device.type != "cpu" or not kernels.blocked_supports(dtype)):
            raise ValueError(f"blocked format needs the native kernels (blip2.fast.kernels: {kernels.status()}) and "
                             f"fp32 weights (bf16 with AVX-512 BF16) on CPU, got {dtype} on {w.device}")
        if fmt == "int8-dynamic" and (w.device.type != "cpu" or not dynamic_int8_available()):
            raise ValueError(f"int8-dynamic format needs a CPU with torch's int8 kernels (fbgemm/qnnpack); the "
                             f"weights are on {w.device}" + ("" if w.device.type != "cpu" else
                                                            f", quantized engine {torch.backends.quantized.engine}"))
        self.splits = [layer.out_features for layer in layers]
        self.has_bias = [layer.bias is not None for layer in layers]
        self.in_features, self.out_features = w.shape[1], sum(self.splits)
        self.fmt, self.dtype, self.in_state_dict, self.tied = fmt, dtype, in_state_dict, tied
        b = None
        if any(self.has_bias):
            b = torch.cat([layer.bias.detach().to(dtype) if layer.bias is not None
                           else w.new_zeros(layer.out_features, dtype=dtype) for layer in layers])  # [N]
        self.handle, self.packed_bytes = None, 0  # int8-dynamic: the packed weight's handle and size
        w, scale = self._lay_out(layers, weights)
        self.register_buffer("w", w, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("scale", scale, persistent=False)  # [N], int8 only
        # the layers themselves, their tensors emptied (a tied head's matrix is the embedding's, kept): unfusing
        # hands back these very modules and parameters, so an optimizer or hook holding them still reaches the model
        self._layers = tuple(layers)  # a tuple: not registered as children
        del weights
        if not tied:
            for layer in layers:
                for p in (layer.weight, layer.bias):
                    if p is not None:
                        p.data = p.data.new_empty(0, dtype=dtype)  # (the dtype unfusing gives it)
        _trim_heap()

    def _lay_out(self, layers: Sequence[nn.Linear], weights: list[Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """The parts' plain weights [n_i, K] -> the stored weight in ``self.fmt`` (None for int8-dynamic, whose
        packed copy the kernel holds) and int8's scales [N].

        A loaded model's weights are views of the checkpoint's mapping, whose pages stay resident while any
        tensor of the file lives: each part is released (``release_pages``) as soon as it is copied, so laying
        a model out layer by layer holds about one copy of its weights, plus one layer. (A tied head's matrix
        stays the embedding's, whose lookups map back only the rows they read.) A blocked weight already laid
        out on disk (``BLOCKED_SOURCE``: ``blip2.fast.layout_cache``) is taken from there, mapped, not copied."""
        fmt = self.fmt
        if fmt != "blocked" and weights[0].dtype != self.dtype:  # (blocked: converted as it is laid out)
            weights = [convert(w, self.dtype) for w in weights]
        if fmt in INT8_FORMATS:
            q, scale = _quantize(weights)
            _release(weights)
            if fmt == "int8":
                return q, scale
            self.handle, self.packed_bytes = next(_HANDLES), q.numel() + 4 * q.shape[0]
            self._packed = pack_dynamic(q, scale)
            self._kernel = _KERNELS[self.handle] = dynamic_int8_kernel(self._packed)
            weakref.finalize(self, _KERNELS.pop, self.handle, None)
            return None, None  # the packed copy is the only one
        if fmt == "blocked":
            source = BLOCKED_SOURCE.get()
            shape = kernels.blocked_shape(self.out_features, self.in_features, self.dtype)
            found = None if source is None else source.find(layers, weights, shape)
            return (found if found is not None else _block(weights, release=True, dtype=self.dtype)), None
        w = torch.cat(weights) if len(weights) > 1 else weights[0]  # [N, K]
        if len(weights) > 1:
            _release(weights)
        if fmt == "dense":
            return w, None
        laid = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_ROWS)
        if len(weights) == 1:  # (a concatenation is freed on return)
            _release(weights)
        return laid, None

    def forward(self, x: Tensor) -> Tensor:
        # x [..., K] -> [..., N]
        if _autograd(x):  # slow but differentiable: the plain weight, rebuilt
            return F.linear(x, self.dense_weight(), self.b)
        if self.fmt == "int8-dynamic":
            if torch.compiler.is_compiling():  # the rounding compiles; the integer product stays opaque
                handle, n = self.handle, self.out_features
                return dynamic_int8_linear(x, lambda levels: _dynamic_int8_op(levels, handle, n), self.b, n)
            return dynamic_int8_linear(x, self._kernel, self.b, self.out_features)
        if self.fmt == "blocked":
            if x.dtype == self.dtype and x.device.type == "cpu":
                return kernels.blocked_linear(x, self.w, self.b, self.out_features)
            return F.linear(x, self.dense_weight(), self.b)  # as nn.Linear would: a dtype mismatch raises
        if self.fmt != "onednn" and _compiling_one_row(x, self.in_features):
            return _row_product(x, self.w, self.scale, self.b)
        if self.fmt == "int8":
            return int8_linear(x, self.w, self.scale, self.b)
        if _onednn_ok(x) and x.dtype == self.dtype:  # always so for "onednn"
            return _onednn_linear(x, self.w, self.b, self.out_features)
        return F.linear(x, self.w, self.b)

    def dense_weight(self) -> Tensor:
        """The fused weight [N, K] in the plain layout and the original dtype."""
        if self.fmt == "int8":
            return dequantize_weight(self.w, self.scale, self.dtype)
        if self.fmt == "int8-dynamic":
            return dequantize_weight(*unpack_dynamic(self._packed), self.dtype)
        if self.fmt == "blocked":
            return kernels.unblock_weight(self.w, self.out_features, self.in_features)
        return self.w.to_dense() if self.w.is_mkldnn else self.w

    def part(self, i: int) -> tuple[Tensor, Tensor | None]:
        """Weight [n_i, K] and bias [n_i] (or None) of the i-th fused layer, as fresh tensors."""
        start = sum(self.splits[:i])
        rows = slice(start, start + self.splits[i])
        w = self.dense_weight()[rows]  # fresh but for "dense"/"onednn" (cloning it held one more layer at the peak)
        b = self.b[rows].clone() if self.has_bias[i] else None
        return (w.clone() if len(self.splits) > 1 or self.fmt in ("dense", "onednn") else w), b

    def to_linear(self, i: int) -> nn.Linear:
        """The i-th fused layer: the ``nn.Linear`` it was made from, its parameters holding the weights again
        (int8: dequantized). A tied head's is the embedding's matrix, which it never gave up."""
        layer = self._layers[i]
        if not self.tied:
            w, b = self.part(i)
            layer.weight.data = w
            if b is not None:
                layer.bias.data = b
        return layer

    def write_part(self, i: int, destination: dict[str, Tensor], prefix: str) -> None:
        w, b = self.part(i)
        destination[prefix + "weight"] = w
        if b is not None:
            destination[prefix + "bias"] = b

    def _save_to_state_dict(self, destination: dict[str, Tensor], prefix: str, keep_vars: bool) -> None:
        if len(self.splits) == 1 and self.in_state_dict:
            self.write_part(0, destination, prefix)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        _refuse_load(self, state_dict, prefix)

    def _apply(self, fn: object, recurse: bool = True) -> FusedLinear:
        raise RuntimeError("a fused model cannot be moved or cast: call blip2.fast.unfuse(model) first, or move or "
                           "cast before the speed-up")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, splits={self.splits}, fmt={self.fmt!r}, dtype={self.dtype}"


class LinearView(nn.Module):
    """Stands where a fused ``nn.Linear`` was: no tensors of its own, but its ``weight``/``bias`` keys in
    the state dict, rebuilt from the ``FusedLinear`` that computes it."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self._fused = (fused,)  # a tuple, so nn.Module does not register the fused layer a second time
        self.index = index

    @property
    def fused(self) -> FusedLinear:
        return self._fused[0]

    dtype = property(lambda self: self.fused.dtype)

    def _save_to_state_dict(self, destination: dict[str, Tensor], prefix: str, keep_vars: bool) -> None:
        self.fused.write_part(self.index, destination, prefix)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        _refuse_load(self, state_dict, prefix)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.fused.splits}"


def _refuse_load(module: nn.Module, state_dict: dict[str, Tensor], prefix: str) -> None:
    if any(k.startswith(prefix) for k in state_dict):
        raise RuntimeError(f"{prefix.rstrip('.')}: the model is fused for inference; call blip2.fast.unfuse(model) "
                           f"before load_state_dict")


def walk(root: nn.Module) -> list[nn.Module]:
    """``root`` and the modules below it, found through ``_modules``: a model ``blip2.fast.lazy`` guards undoes its
    layout when its own walks (``modules()``, ``children()``) are called."""
    out, todo = [], [root]
    while todo:
        out.append(todo.pop())
        todo += [c for c in out[-1]._modules.values() if c is not None]
    return out


def swap_class(root: nn.Module, old: type, new: type, which: Callable[[nn.Module], bool] | None = None) -> int:
    """Every module below ``root`` (``walk``) of class exactly ``old`` (that ``which`` picks, if given) given class
    ``new`` (a subclass or its base: the same parameters and state dict); returns how many."""
    found = [m for m in walk(root) if type(m) is old and (which is None or which(m))]
    for m in found:
        m.__class__ = new
    return len(found)


def fused_format(root: nn.Module) -> str | None:
    """The weight format of the ``FusedLinear`` layers below ``root``, None when there are none."""
    return next((m.fmt for m in root.modules() if isinstance(m, FusedLinear)), None)


def fuse_linears(owner: nn.Module, name: str, parts: Sequence[str], fmt: str) -> None:
    """Compute ``owner``'s ``nn.Linear`` children ``parts`` as one ``FusedLinear`` at ``owner.<name>``."""
    fused = FusedLinear([getattr(owner, p) for p in parts], fmt)
    setattr(owner, name, fused)
    for i, p in enumerate(parts):
        setattr(owner, p, LinearView(fused, i))


def pack_linears(root: nn.Module, fmt: str, tied: Sequence[nn.Module] = ()) -> None:
    """Every ``nn.Linear`` below ``root`` becomes a one-part ``FusedLinear`` in ``fmt``; those in ``tied``
    (heads sharing the embedding matrix) keep multiplying by the embedding's own matrix ("dense") unless
    ``fmt`` is an int8 one or "blocked", where they get a copy in that format, the embedding keeping the
    plain matrix. A blocked copy writes the head's key as the tied model does (the same values); an int8 one
    stays out of the state dict, as tied checkpoints leave the head out. (The copy costs a second head's memory;
    the head is the largest product of a decoding step.)"""
    slots = _slots(root, nn.Linear)
    # tied heads last: a copy adds to the model's memory, which the other layers' new layouts may have shrunk
    slots.sort(key=lambda slot: any(getattr(*slot) is t for t in tied))
    for owner, child_name in slots:
        child = getattr(owner, child_name)
        if any(child is t for t in tied):
            if fmt in COPY_TIED:
                setattr(owner, child_name, FusedLinear([child], fmt, in_state_dict=fmt not in INT8_FORMATS, tied=True))
            else:  # the embedding's own matrix, not a copy, multiplied as a plain weight (oneDNN on CPU)
                setattr(owner, child_name, FusedLinear([child], "dense", tied=True))
        else:
            setattr(owner, child_name, FusedLinear([child], fmt))


def _slots(root: nn.Module, kind: type | tuple[type, ...]) -> list[tuple[nn.Module, str]]:
    """(owner, name) of every child of type ``kind`` below ``root``. Names, not the layers: a loop replacing
    them drops each old layer as it goes, so a model holds one layer in both layouts at a time, never
    all of them."""
    return [(owner, name) for owner in root.modules() for name, child in owner.named_children()
            if isinstance(child, kind)]


def unfuse_linears(root: nn.Module) -> None:
    """Undo ``fuse_linears``/``pack_linears`` below ``root``: the ``nn.Linear`` modules and parameters that were
    fused, holding their weights again (a head tied to the embeddings shares their matrix, as before)."""
    for owner, child_name in _slots(root, (LinearView, FusedLinear)):
        child = getattr(owner, child_name)
        if isinstance(child, LinearView):
            setattr(owner, child_name, child.fused.to_linear(child.index))
        elif len(child.splits) == 1:
            setattr(owner, child_name, child.to_linear(0))
        else:
            delattr(owner, child_name)  # the fused holder (after its views: added last), its views Linears now
        _trim_heap()  # each layer's unblocked temporaries piled up, as laying out's do: +0.7x the weights
