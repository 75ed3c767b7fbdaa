"""What the speed-ups do to a language model (OPT or T5): fuse the projections that read the same input,
lay the weights out for the number of rows decoded at once, and compile the one-token step.

The model files know nothing of this. Two things there let it work from outside:
- the projections that read one input are computed by one method each (``OPTAttention.project_qkv``,
  ``T5Attention.project_qkv``/``project_kv``, ``T5DenseReluDense.expand``); fusing switches such a module to
  a subclass whose method runs the one fused product instead (``_FUSED``), and unfusing switches it back;
- the one-token step is the model's ``decode_step`` attribute (its ``_decode_step`` method by default), which
  a native, compiled or graphed step replaces.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from blip2 import layout_files
from blip2.fast import kernels
from blip2.fast.linear import (INT8_FORMATS, FusedLinear, decode_format, fuse_linears, fused_format, pack_linears,
                               unfuse_linears)
from blip2.mapped import discard
from blip2.models.layers import Embedding
from blip2.models.opt import OPTAttention, OPTForCausalLM
from blip2.models.t5 import T5Attention, T5DenseReluDense, T5ForConditionalGeneration

__all__ = ["BlockedEmbedding", "LanguageModel", "compile_format", "compile_step", "fuse_language_model", "lay_out_for",
           "table", "unfuse_language_model"]

LanguageModel = OPTForCausalLM | T5ForConditionalGeneration

# bytes of a tied head's blocked copy unblocked at a time into the embedding table
_PIECE_BYTES = 4 << 20
# inductor's threshold of elementwise ops above which a producer is computed once, not inlined (CPU)
_OPCOUNT_KEY = "realize_cpu_opcount_threshold"


class _FusedOPTAttention(OPTAttention):
    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.qkv(x).chunk(3, dim=-1)  # each [B, T, D]


class _FusedT5SelfAttention(T5Attention):
    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._heads(self.qkv(x), 3).unbind(0)  # each [B, H, T, Dk]


class _FusedT5CrossAttention(T5Attention):
    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._heads(self.kv(x), 2).unbind(0)  # each [B, H, S, Dk]


class _FusedT5GatedFFN(T5DenseReluDense):
    def expand(self, x: Tensor) -> Tensor:
        gate, up = self.wi_01(x).chunk(2, dim=-1)  # [B, T, F] each
        return self.act(gate) * up


class BlockedEmbedding(Embedding):
    """OPT's token embeddings while the head tied to them is laid out in blocks: the head needs a copy of the
    matrix in its own layout (``linear.COPY_TIED``), and keeping the plain matrix beside it held the largest table
    of the model twice (blip2-opt-2.7b in bf16: 0.26 GB, 3.4% of its weights). Lookups read their rows from the
    head's copy instead (row r: block r // 16, column r % 16; the same values). The parameter stays, empty, of
    the model's dtype and device (``table``); reading ``weight`` brings the plain matrix back (unblocked from the
    copy) and gives the module its own class again; the state dict holds the plain matrix as before.
    Not for T5, whose native step reads ``shared`` as a plain table."""

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        self.restore()
        return self._parameters["weight"]

    def restore(self, free_copy: bool = False) -> None:
        """The plain matrix back in the parameter, the module's own class again. ``free_copy``: the head's copy is
        freed next (unfusing), so its pages are given back as each piece is unblocked and the model never holds the
        table twice (not while a cache writer may still be reading it)."""
        self._parameters["weight"].data = self._plain(free_copy and not layout_files.writing())
        self.__class__ = self.__dict__.pop("plain_class")
        del self.__dict__["head"]

    def _plain(self, free_copy: bool = False) -> Tensor:
        w = self.__dict__["head"][0].w
        n, k = self.num_embeddings, self.embedding_dim
        plain = torch.empty(n, k, dtype=w.dtype)
        step, block = max(1, _PIECE_BYTES // w[0].nbytes), w.shape[2]  # blocks a piece
        for b in range(0, w.shape[0], step):
            piece, rows = w[b:b + step], plain[b * block:(b + step) * block]
            columns = piece.transpose(1, 2)  # [blocks, 16, K] (bf16: [blocks, 16, K / 2, 2]): the rows in order
            if rows.numel() == columns.numel():  # straight in (unblocked into a temporary, one more piece was held)
                rows.view(columns.shape).copy_(columns)
            else:  # the last block's padding rows, or an odd K's padding column
                rows.copy_(kernels.unblock_weight(piece, len(rows), k))
            if free_copy:
                discard(piece)
        return plain

    def forward(self, ids: Tensor) -> Tensor:
        w = self.__dict__["head"][0].w  # fp32 [blocks, K, 16], bf16 [blocks, K / 2, 16, 2] (pairs of k)
        flat = ids.reshape(-1)
        low, high = (int(v) for v in torch.aminmax(flat)) if flat.numel() else (0, 0)
        if low < 0 or high >= self.num_embeddings:
            # (the last block's padding rows would read as zeros, a negative id as a row from the end)
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {low}...{high}")
        block = w.shape[2]
        rows = w[flat // block, :, flat % block].reshape(flat.numel(), -1)  # [n, K] (bf16: K rounded up to even)
        return rows[:, :self.embedding_dim].reshape(*ids.shape, self.embedding_dim)

    def _save_to_state_dict(self, destination: dict[str, Tensor], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self._plain()


def table(lm: LanguageModel) -> Tensor:
    """The input embeddings' parameter as stored, for the model's dtype and device: empty while a blocked head
    holds the matrix (``BlockedEmbedding``, whose ``weight`` would bring it back)."""
    return lm.get_input_embeddings()._parameters["weight"]


def _hold_table(lm: LanguageModel) -> None:
    """Let a tied head's blocked copy hold OPT's embedding table (``BlockedEmbedding``) and empty the plain one."""
    head, embedding = lm.lm_head, lm.get_input_embeddings()
    if not (isinstance(lm, OPTForCausalLM) and isinstance(head, FusedLinear) and head.tied and head.fmt == "blocked"
            and type(embedding) in (Embedding, nn.Embedding)):  # (``resize_token_embeddings`` makes an nn.Embedding)
        return
    embedding.__dict__["plain_class"] = type(embedding)
    embedding.__class__ = BlockedEmbedding
    embedding.__dict__["head"] = (head,)  # a tuple: not registered as a child
    p = embedding._parameters["weight"]
    p.data = p.data.new_empty(0, dtype=head.dtype)  # (the head's dtype: a load laying out converts into it)


def _fuse(owner: nn.Module, name: str, parts: tuple[str, ...], fmt: str, fused_class: type[nn.Module]) -> None:
    fuse_linears(owner, name, parts, fmt)
    owner.__class__ = fused_class


def _fusion_groups(lm: LanguageModel) -> list[tuple[nn.Module, str, tuple[str, ...], type[nn.Module]]]:
    """(module, fused name, its projections, the module's class while fused) for every group of projections
    of ``lm`` that read the same input."""
    if isinstance(lm, OPTForCausalLM):
        return [(layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj"), _FusedOPTAttention)
                for layer in lm.model.decoder.layers]
    groups = []
    for stack in (lm.encoder, lm.decoder):
        for blk in stack.block:
            groups.append((blk.layer[0].SelfAttention, "qkv", ("q", "k", "v"), _FusedT5SelfAttention))
            if stack.is_decoder:
                groups.append((blk.layer[1].EncDecAttention, "kv", ("k", "v"), _FusedT5CrossAttention))
            ff = blk.layer[-1].DenseReluDense
            if ff.gated:
                groups.append((ff, "wi_01", ("wi_0", "wi_1"), _FusedT5GatedFFN))
    return groups


def _tied_head(lm: LanguageModel) -> bool:
    return isinstance(lm.lm_head, nn.Linear) and lm.lm_head.weight is table(lm)


@torch.no_grad()
def fuse_language_model(lm: LanguageModel, fmt: str | None = None) -> None:
    """The projections that read the same input in one product each, every projection in weight format ``fmt``
    (``blip2.fast.linear``; None: ``decode_format``, the fastest float one for decoding on the device). A head
    tied to the embeddings keeps sharing it, except in formats that need their own copy."""
    if any(isinstance(m, FusedLinear) for m in lm.modules()):
        raise RuntimeError("already fused; unfuse it first to change the format")
    fmt = fmt or decode_format(table(lm))
    for owner, name, parts, fused_class in _fusion_groups(lm):
        _fuse(owner, name, parts, fmt, fused_class)
    pack_linears(lm, fmt, tied=[lm.lm_head] if _tied_head(lm) else [])
    _hold_table(lm)
    lm.decode_step = lm._decode_step  # a compiled or native step was built for the old layers


@torch.no_grad()
def unfuse_language_model(lm: LanguageModel) -> None:
    """Back to plain ``nn.Linear`` layers with parameters (int8 weights stay rounded) and the eager step."""
    lm.decode_step = lm._decode_step  # first: a native step holds every laid-out weight, which then outlived its
    embedding = lm.get_input_embeddings()  # layer, and unfusing held the model in both layouts at once
    if isinstance(embedding, BlockedEmbedding):
        embedding.restore(free_copy=True)  # (from the head's copy, which unfusing frees)
    unfuse_linears(lm)
    for module in lm.modules():
        if type(module) in (_FusedOPTAttention, _FusedT5SelfAttention, _FusedT5CrossAttention, _FusedT5GatedFFN):
            module.__class__ = type(module).__bases__[0]


def compile_format(current: str | None, weight: Tensor, batch: int | None) -> str:
    """The weight format a decoding step of ``batch`` rows (None: any number, the native step) runs fastest
    with, given the current one (None: not fused) and a weight of the model (its device and dtype). One
    row: the plain layout, which the native steps and a compiled one-row product stream whole (the blocked
    layout's one-row products read a single cache line per stream and step). Several: the language models'
    fastest float layout (``decode_format``: blip2's blocked one on CPU; else oneDNN's packed one, since
    with a plain weight oneDNN repacks it on every call). Any number: blocked where the CPU takes it (the
    native steps read it for every batch), else plain. int8 (either kind) stays as it is."""
    if current in INT8_FORMATS:
        return current
    if batch is None:
        return "blocked" if decode_format(weight) == "blocked" else "dense"
    return "dense" if batch == 1 else decode_format(weight)


def lay_out_for(lm: LanguageModel, batch: int | None) -> None:
    """Fuse ``lm`` in the format ``compile_format`` picks for ``batch`` decoded rows (None: any), re-fusing
    if it is in another one."""
    current = fused_format(lm)
    fmt = compile_format(current, table(lm), batch)
    if current != fmt:
        if current is not None:
            unfuse_language_model(lm)
        fuse_language_model(lm, fmt)


def compile_step(fn: Callable[..., Tensor], device: torch.device, **compile_kwargs: Any) -> Callable[..., Tensor]:
    """``torch.compile(fn, **compile_kwargs)`` for a decoding step on ``device``.

    On CPU, inductor inlines a cheap elementwise producer (a layer norm, an activation) into the loop that
    consumes it; inside a one-row product's loop over the weight that recomputes it for every output row.
    A lower "opcount" threshold makes inductor compute such producers once. Only for the default inductor
    backend and when the caller sets no mode or options.

    The step is a method of the language model, and dynamo guards every attribute of every submodule it
    reads (a few thousand checks a call). The callers freeze the model's structure while the compiled step
    is in use (the weights are fused, so it cannot be cast, moved or reloaded, and fusing or unfusing puts
    the eager step back), so the guards on the modules are left out
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``); those on the step's arguments (shapes, dtypes
    of the inputs and caches) stay. Without module guards, a graph compiled for one model would match
    another model's call of the same method, so each compiled step keeps its graphs to itself
    (``isolate_recompiles``). Not when the caller sets a mode, nor on a torch without those two (before
    2.13: the guards stay)."""
    import torch._inductor.config as inductor_config

    if device.type == "cpu":
        kernels.load()  # the one-row product kernel (built once per machine), before tracing
    if "mode" in compile_kwargs:
        return torch.compile(fn, **compile_kwargs)
    options = dict(compile_kwargs.get("options") or {})
    plain_inductor = compile_kwargs.get("backend", "inductor") == "inductor" and "options" not in compile_kwargs
    if device.type == "cpu" and plain_inductor and hasattr(inductor_config, _OPCOUNT_KEY):
        options[_OPCOUNT_KEY] = 4
    if _can_isolate_graphs():
        options.setdefault("guard_filter_fn", torch.compiler.skip_guard_on_all_nn_modules_unsafe)
        compile_kwargs = {"isolate_recompiles": True, **compile_kwargs}
    return torch.compile(fn, **{**compile_kwargs, "options": options})


def _can_isolate_graphs() -> bool:
    """Whether this torch can drop the module guards safely: ``torch.compile(isolate_recompiles=...)``
    (torch 2.13) and ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``."""
    return ("isolate_recompiles" in inspect.signature(torch.compile).parameters
            and hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"))
