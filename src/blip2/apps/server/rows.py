"""The language model's side of continuous batching (``engine``): a pool of ``max_rows`` rows of decoder cache,
prompts prefilled together and copied into free rows, and one decoding step of every running row, each at its
own cache slot.

OPT (``DecoderOnlyRows``): a row's cache holds its left-padded prompt, then its tokens; its position ids come
from its own mask, so padding changes nothing. Where the prefix cache (``prefixcache``) holds how a prompt
begins, the row gets those keys and values copied and only the rest of its prompt runs (padding may then sit
between the two parts; it is masked like any other). T5 (``EncoderDecoderRows``): the encoder runs once, at prefill,
over each request's own input (query tokens, then its prompt's tokens when it has one, as ``generate`` builds it
alone); each row keeps its cross-attention keys and values (rows' encoder lengths differ: a step pads the
shorter ones and masks the padding) and its decoder self-attention cache. A T5 row's decoder position is its
slot (every row starts with the decoder start token at slot 0), so its relative position bias follows from it.

Both call the language model's own layers (``decoder``) with the caches of this module: speed-ups that change
layers (fuse, int8) apply. Of those that replace the whole step, both take the native one (``opt_step`` and
``t5_step`` write each row at its own slot); compiled and CUDA-graph steps stay eager here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import pad as _pad

from blip2.apps.server.prefixcache import IMAGE, PrefixCache
from blip2.fast.native import NativeOPTStep, NativeT5Step
from blip2.models.layers import KVCache, device_of
from blip2.models.opt import prompt_mask

log = logging.getLogger("blip2.apps.server")


class RowCaches:
    """Keys and values of every layer for ``rows`` rows of ``slots`` slots: [rows, H, slots, Dh] each. A step
    writes each running row at its own slot (``update`` gets one slot per row) and attends over the first
    ``span`` slots. The layers call ``update`` as they call ``KVCache.update``."""

    class Layer:
        def __init__(self, owner: RowCaches, i: int) -> None:
            self.owner, self.i = owner, i

        @property
        def k(self) -> Tensor:  # this step's keys [n, H, span, Dh], as a native step reads a cache
            return self.owner.k[self.i][: self.owner.n, :, : self.owner.span]

        @property
        def v(self) -> Tensor:
            return self.owner.v[self.i][: self.owner.n, :, : self.owner.span]

        def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            # input_pos [n]: each row's slot; k, v [n, H, 1, Dh] -> [n, H, span, Dh]
            n, span = k.shape[0], self.owner.span
            K, V = self.owner.k[self.i][:n], self.owner.v[self.i][:n]
            index = input_pos.view(n, 1, 1, 1).expand_as(k)  # scatter_ is several times faster than index_put_
            K.scatter_(2, index, k)
            V.scatter_(2, index, v)
            return K[:, :, :span], V[:, :, :span]

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = (rows, heads, 64, head_dim)
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.valid = torch.zeros(rows, 64, dtype=torch.bool, device=device)  # [rows, slots]: keys to attend
        self.span = self.n = 0  # this step's slots read and rows
        self.layers = [self.Layer(self, i) for i in range(layers)]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def reserve(self, slots: int) -> None:
        """Room for ``slots`` slots per row (the pool doubles as needed, keeping what it holds)."""
        if slots <= self.slots:
            return
        new = max(slots, 2 * self.slots)
        self.k = [_pad(t, (0, 0, 0, new - self.slots)) for t in self.k]  # [rows, H, slots, Dh]
        self.v = [_pad(t, (0, 0, 0, new - self.slots)) for t in self.v]
        self.valid = _pad(self.valid, (0, new - self.slots))

    def load(self, row: int, keys: list[Tensor], values: list[Tensor], valid: Tensor) -> None:
        """Row ``row`` holds a prefilled prompt: ``keys``/``values`` [H, T, Dh] per layer, ``valid`` [T]."""
        T = valid.shape[0]
        self.reserve(T + 1)
        for K, V, k, v in zip(self.k, self.v, keys, values):
            K[row, :, :T] = k[:, :T]
            V[row, :, :T] = v[:, :T]
        self.valid[row] = False
        self.valid[row, :T] = valid

    def move(self, src: int, dst: int, length: int) -> None:
        """Row ``dst`` takes row ``src``'s first ``length`` slots."""
        for K, V in zip(self.k, self.v):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]
        self.valid[dst] = self.valid[src]

    def start_step(self, slots: list[int]) -> Tensor:
        """Before a step of rows ``0 .. len(slots)-1`` writing at ``slots``: mark those slots valid, set ``span``;
        the slots as a tensor [n]."""
        self.reserve(max(slots) + 1)
        dev = self.valid.device
        slot = torch.tensor(slots, device=dev)
        self.valid[torch.arange(len(slots), device=dev), slot] = True
        self.span, self.n = max(slots) + 1, len(slots)
        return slot


@dataclass
class Start:
    """Where a prefilled row starts: ``length`` cache slots filled, ``position`` the position id of its next token,
    ``prefix`` the ids ``generate`` counts as already generated (the history its score processing reads),
    ``items`` what its valid cache slots hold, in order (``prefixcache``; OPT rows only)."""

    length: int
    position: int
    prefix: list[int]
    items: list[int] = field(default_factory=list)


Prefilled = tuple[Tensor, list[Start], Callable[[int, int], None]]  # logits [b, V], starts, load(j, row)


class DecoderOnlyRows:
    """OPT rows (see the module doc), with the prefix cache ``prefixes`` (None: none)."""

    def __init__(self, pipe: Any, max_rows: int, prefixes: PrefixCache | None = None) -> None:
        self.pipe, self.lm, self.prefixes = pipe, pipe.model.language_model, prefixes
        cfg = self.lm.config
        weight = self.lm.model.decoder.embed_positions.weight  # (never laid out: the token table may be)
        self.caches = RowCaches(cfg.num_hidden_layers, max_rows, cfg.num_attention_heads,
                                cfg.hidden_size // cfg.num_attention_heads, weight.dtype, weight.device)

    def prefill(self, lm_inputs: Tensor, prompts: Sequence[str], keys: Sequence[str]) -> Prefilled:
        """The prompts after their images (``lm_inputs`` [b, Q, D], ``keys`` the images' keys): left-padded
        together, as ``Pipeline.generate`` batches them, or, where the prefix cache holds how some of them begin,
        only what follows that."""
        pipe = self.pipe
        ids, mask = pipe.processor.prompt_inputs(list(prompts), "left")
        ids, mask = ids.to(pipe.device), mask.to(pipe.device)
        embeds, valid = pipe.model.merge_image_inputs(lm_inputs, ids, mask)
        valid = valid.bool()
        texts = [ids[j][mask[j].bool()].tolist() for j in range(len(prompts))]
        queries = [IMAGE] * (embeds.shape[1] - ids.shape[1])  # prepended when the prompts have no <image> tokens
        items = [queries + text for text in texts]
        found = [(0, None)] * len(prompts)
        if self.prefixes is not None:
            found = [self.prefixes.find(key, row) for key, row in zip(keys, items)]
        if all(n == 0 for n, _ in found):
            decoding = self.lm.start_decoding(embeds, valid, expand=1, max_new_tokens=1)
            logits = decoding.prefill()  # [b, V]
            caches = decoding.caches
        else:
            logits, caches, valid = self._prefill_tails(embeds, valid, items, found)
        starts = [Start(valid.shape[1], len(items[j]), texts[j], items[j]) for j in range(len(prompts))]

        def load(j: int, row: int) -> None:
            self.caches.load(row, [c.k[j] for c in caches], [c.v[j] for c in caches], valid[j])

        return logits, starts, load

    def _prefill_tails(self, embeds: Tensor, valid: Tensor, items: list[list[int]],
                       found: list[tuple[int, Any]]) -> tuple[Tensor, list[KVCache], Tensor]:
        """Row j's first ``found[j][0]`` items copied from the prefix cache, the rest run. Slots: the copied
        prefixes right-aligned in the first M, the tails right-aligned in the next T (padding masked), so every
        row's last item is in the last slot, whose logits the step returns. Logits [b, V], the caches, which
        slots are valid [b, M + T]."""
        b, dev = embeds.shape[0], embeds.device
        M = max(n for n, _ in found)
        T = max(len(row) - n for row, (n, _) in zip(items, found))
        layers = self.lm.model.decoder.layers
        dtype, (_, H, _, Dh) = self.caches.k[0].dtype, self.caches.shape
        caches = [KVCache(b, H, M + T, Dh, dtype, device_of(layer)) for layer in layers]
        key_valid = torch.zeros(b, M + T, dtype=torch.bool, device=dev)
        x = embeds.new_zeros(b, T, embeds.shape[2])
        positions = torch.full((b, T), -1, dtype=torch.long, device=dev)
        for j, (n, entry) in enumerate(found):
            L = len(items[j])
            if n:
                for cache, k, v in zip(caches, entry.keys, entry.values):
                    cache.k[j, :, M - n : M] = k[:, :n]
                    cache.v[j, :, M - n : M] = v[:, :n]
                key_valid[j, M - n : M] = True
            x[j, T - (L - n) :] = embeds[j][valid[j]][n:]
            positions[j, T - (L - n) :] = torch.arange(n, L, device=dev)
            key_valid[j, M + T - (L - n) :] = True
        mask = prompt_mask(key_valid, T, M + T, first=M)
        logits = self.lm._decode_step(x, positions, mask, caches, torch.arange(M, M + T, device=dev))
        return logits, caches, key_valid

    def keep(self, row: int, length: int, key: str, items: list[int]) -> None:
        """Leave what row ``row``'s first ``length`` slots hold (``items``, after the image ``key``) in the prefix
        cache."""
        if self.prefixes is None or not self.prefixes.max_bytes:
            return
        slots = self.caches.valid[row, :length].nonzero().squeeze(1)
        if slots.numel() != len(items):  # a row this module did not fill; keep nothing rather than wrong
            log.warning("prefix cache: row %d has %d valid slots for %d items; not kept", row, slots.numel(),
                        len(items))
            return
        self.prefixes.add(key, items, [K[row][:, slots] for K in self.caches.k],
                          [V[row][:, slots] for V in self.caches.v])

    def step(self, tokens: list[int], slots: list[int], positions: list[int]) -> Tensor:
        """Feed rows ``0 .. n-1`` one token each at their slots and positions; logits [n, V] float32."""
        caches, n = self.caches, len(tokens)
        slot = caches.start_step(slots)
        dev = slot.device
        mask = caches.valid[:n, None, None, : caches.span]  # [n, 1, 1, span]
        x = self.lm.get_input_embeddings()(torch.tensor(tokens, device=dev))[:, None]  # [n, 1, E]
        # the native step takes every row at its own slot (one C++ call); a compiled or graphed step was built
        # for generate's caches, so those rows go through the eager step
        step = self.lm.decode_step if isinstance(self.lm.decode_step, NativeOPTStep) else self.lm._decode_step
        return step(x, torch.tensor(positions, device=dev)[:, None], mask, caches.layers, slot)

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches.move(src, dst, length)


class EncoderDecoderRows:
    """T5 rows (see the module doc): the decoder caches of ``RowCaches`` and, per row, every decoder layer's
    cross-attention keys and values [rows, H, S, Dk] over its first ``enc_len[row]`` encoder positions."""

    def __init__(self, pipe: Any, max_rows: int) -> None:
        self.pipe, self.lm = pipe, pipe.model.language_model
        cfg, dec = self.lm.config, self.lm.decoder
        self.dtype = dec.attn_dtype
        device = self.lm.shared.weight.device
        self.caches = RowCaches(len(dec.block), max_rows, cfg.num_heads, cfg.d_kv, self.dtype, device)
        shape = (max_rows, cfg.num_heads, 64, cfg.d_kv)
        self.cross_k = [torch.zeros(shape, dtype=self.dtype, device=device) for _ in dec.block]
        self.cross_v = [torch.zeros_like(t) for t in self.cross_k]
        self.enc_len = [0] * max_rows

    def _inputs(self, lm_inputs: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Each request's encoder input as ``generate`` builds it alone (the queries, then the prompt's tokens when
        there is a prompt), right-padded together: embeddings [b, S, D] and mask [b, S]."""
        pipe, device = self.pipe, self.pipe.device
        rows = []
        for j, prompt in enumerate(prompts):
            queries = lm_inputs[j : j + 1]
            if prompt:
                ids, mask = pipe.processor.prompt_inputs([prompt], "right")
                queries, _ = pipe.model.merge_image_inputs(queries, ids.to(device), mask.to(device))
            rows.append(queries[0])
        S = max(r.shape[0] for r in rows)
        embeds = torch.stack([_pad(r, (0, 0, 0, S - r.shape[0])) for r in rows])
        mask = torch.stack([torch.arange(S, device=device) < r.shape[0] for r in rows]).long()
        return embeds, mask

    def prefill(self, lm_inputs: Tensor, prompts: Sequence[str], keys: Sequence[str]) -> Prefilled:
        """As ``DecoderOnlyRows.prefill``, always whole: the encoder sees each input at once, so a shared beginning
        has other states when what follows differs."""
        embeds, mask = self._inputs(lm_inputs, prompts)
        decoding = self.lm.start_decoding(embeds, mask, expand=1, max_new_tokens=1)
        logits = decoding.prefill()  # [b, V]: the decoder start token, at slot 0 of every row
        start_id = int(decoding.prefix[0, 0])
        lengths = mask.sum(1).tolist()
        starts = [Start(1, 1, [start_id]) for _ in prompts]
        one = torch.ones(1, dtype=torch.bool, device=mask.device)

        def load(j: int, row: int) -> None:
            self.caches.load(row, [c.k[j] for c in decoding.caches], [c.v[j] for c in decoding.caches], one)
            S = lengths[j]
            self._reserve(S)
            for K, V, (k, v) in zip(self.cross_k, self.cross_v, decoding.cross_kv):
                K[row, :, :S] = k[j, :, :S]
                V[row, :, :S] = v[j, :, :S]
            self.enc_len[row] = S

        return logits, starts, load

    def _reserve(self, S: int) -> None:
        have = self.cross_k[0].shape[2]
        if S > have:
            grow = (0, 0, 0, max(S, 2 * have) - have)
            self.cross_k = [_pad(t, grow) for t in self.cross_k]
            self.cross_v = [_pad(t, grow) for t in self.cross_v]

    def step(self, tokens: list[int], slots: list[int], positions: list[int]) -> Tensor:
        """Feed rows ``0 .. n-1`` one token each at their slots (their positions); logits [n, V] float32."""
        caches, dec, n = self.caches, self.lm.decoder, len(tokens)
        slot = caches.start_step(slots)
        dev, low = slot.device, torch.finfo(self.dtype).min
        # each row's query at its own position: bias [1, H, n, span] -> [n, H, 1, span], unwritten slots masked
        bias = dec.position_bias(slot, torch.arange(caches.span, device=dev)).permute(2, 1, 0, 3)
        self_mask = torch.where(caches.valid[:n, None, None, : caches.span], bias.to(self.dtype), low).contiguous()
        S = max(self.enc_len[:n])
        enc_len = torch.tensor(self.enc_len[:n], device=dev)
        keep = torch.arange(S, device=dev)[None] < enc_len[:, None]  # [n, S]
        cross_mask = torch.where(keep[:, None, None, :], torch.zeros((), dtype=self.dtype, device=dev), low)
        cross_kv = [(K[:n, :, :S], V[:n, :, :S]) for K, V in zip(self.cross_k, self.cross_v)]
        ids = torch.tensor(tokens, device=dev)[:, None]  # [n, 1]
        step = self.lm.decode_step  # the native step takes each row's own mask row and slot (one C++ call)
        if isinstance(step, NativeT5Step) and step.covers(ids, self_mask, cross_kv, cross_mask, caches.layers, slot):
            return step(ids, self_mask, cross_kv, cross_mask, caches.layers, slot)
        h = dec(self.lm.shared(ids), self_mask, cross_kv, cross_mask, caches.layers, slot)
        return self.lm.logits(h[:, -1]).float()

    def move(self, src: int, dst: int, length: int) -> None:
        self.caches.move(src, dst, length)
        S = self.enc_len[src]
        for K, V in zip(self.cross_k, self.cross_v):
            K[dst, :, :S] = K[src, :, :S]
            V[dst, :, :S] = V[src, :, :S]
        self.enc_len[dst] = S

    def keep(self, row: int, length: int, key: str, items: list[int]) -> None:
        """Nothing to keep (see ``prefill``)."""


def row_model(pipe: Any, max_rows: int, prefixes: PrefixCache | None = None) -> DecoderOnlyRows | EncoderDecoderRows:
    """The rows of ``pipe``'s language model: OPT's (using the prefix cache ``prefixes``) or T5's."""
    if pipe.model.config.use_decoder_only_language_model:
        return DecoderOnlyRows(pipe, max_rows, prefixes)
    return EncoderDecoderRows(pipe, max_rows)
