"""T5 encoder-decoder (T5, T5 v1.1, Flan-T5): the language model of the BLIP-2 Flan-T5 checkpoints.

Module names equal the Hugging Face state-dict keys (``shared``, ``encoder.block.{i}.layer.0.SelfAttention.q``,
``decoder.block.{i}.layer.1.EncDecAttention.k``, ``layer.{-1}.DenseReluDense.wo``, ``lm_head``, ...).

What makes T5 T5:
- RMS norm (no mean, no bias), its variance always computed in fp32.
- No 1/sqrt(d) scaling of the attention scores; instead a learned bias per head and *bucketed*
  relative position (key - query), owned by block 0 of each stack and shared by all its blocks.
  The encoder buckets both directions, the decoder only the past. Cross-attention has no bias.
- The bias enters ``scaled_dot_product_attention`` as a float mask: ``where(keep, bias, finfo.min)``.
- ``scale_decoder_outputs`` (original, tied T5): the decoder output is scaled by d_model**-0.5 before
  ``lm_head``. T5 v1.1 / Flan-T5 have an untied ``lm_head`` and no scaling.
- fp16: Flan-T5 was trained in bf16 and its FFN overflows fp16. transformers keeps every ``wo`` in fp32
  when loading in fp16 (which also turns the residual stream fp32 after the first FFN, by type
  promotion) and clamps the residual stream after each sub-layer while it is fp16. We do the same
  (``set_dtype``); bf16 needs neither.

Decoding (``start_decoding``) runs the encoder once on the unexpanded batch, computes every layer's
cross-attention K/V once, and keeps decoder self-attention K/V in a preallocated cache.

The one-token step is the attribute ``decode_step``; the projections that read the same input are
methods (``T5Attention.project_qkv``/``project_kv``, ``T5DenseReluDense.expand``), so that ``blip2.fast``
can replace them from outside (fused or quantized products, a native or compiled step); nothing here
knows about it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.config import T5Config
from blip2.generation import greedy_step
from blip2.models.layers import ACTIVATIONS, Embedding, KVCache, activation, attention, device_of

__all__ = ["T5Decoding", "T5ForConditionalGeneration", "relative_position_bucket", "seq2seq_lm_loss",
           "shift_right"]

def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket of each relative position (key - query), as Mesh TensorFlow's T5.

    Half of the buckets (per direction) are exact small distances, the rest are log-spaced up to
    ``max_distance``; everything farther shares the last bucket. The decoder (``bidirectional=False``)
    only has buckets for keys at or before the query.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # in fp32 as the reference computes it, so the bucket boundaries agree exactly
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


def shift_right(labels: Tensor, decoder_start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: ``[start, labels[:-1]]`` with -100 replaced by the pad id."""
    shifted = torch.cat([labels.new_full((*labels.shape[:-1], 1), decoder_start_token_id), labels[..., :-1]], -1)
    return shifted.masked_fill(shifted == -100, pad_token_id)


def seq2seq_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean token cross-entropy, labels -100 ignored (transformers' T5 loss; computed in the logits' dtype)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


def _clamp_fp16(x: Tensor) -> Tensor:
    # transformers' fp16 overflow guard: clamp to the fp16 range, 1000 below it once anything is inf
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


def _dtype_of(layer: nn.Module) -> torch.dtype:
    """The compute dtype of an ``nn.Linear``, of a stand-in that ``blip2.fast`` put there (its ``dtype``), or of a
    wrapper around one (PEFT's LoRA layers show their base layer's ``weight``)."""
    if isinstance(layer, nn.Linear) or not hasattr(layer, "dtype"):
        return layer.weight.dtype
    return layer.dtype


def _float_mask(keep: Tensor, bias: Tensor | float, dtype: torch.dtype) -> Tensor:
    """Additive SDPA mask: ``bias`` where ``keep``, the dtype's most negative finite value elsewhere; contiguous
    (the position bias comes as a permuted view; torch 2.6's CPU attention gives a permuted mask results a few
    ulps from those of the contiguous one transformers passes, which bf16 rounding then carries on)."""
    bias = bias.to(dtype) if isinstance(bias, Tensor) else torch.tensor(bias, dtype=dtype, device=keep.device)
    return torch.where(keep, bias, torch.finfo(dtype).min).contiguous()


class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x^2) + eps)``; the mean square in fp32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # fp32 (promoted)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; block 0 also holds the relative position bias table."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False) -> None:
        super().__init__()
        self.n_heads, self.d_kv, self.dropout = config.num_heads, config.d_kv, config.dropout_rate
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(config.relative_attention_num_buckets, config.num_heads)

    def _heads(self, x: Tensor, n: int = 1) -> Tensor:  # [B, T, n*H*Dk] -> [B, H, T, Dk] (n == 1), [n, B, H, T, Dk]
        y = x.view(*x.shape[:2], n, self.n_heads, self.d_kv).permute(2, 0, 3, 1, 4)
        return y[0] if n == 1 else y

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention: x [B, T, D] -> queries, keys, values [B, H, T, Dk]."""
        return self._heads(self.q(x)), *self.project_kv(x)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, S, D] -> keys, values [B, H, S, Dk]."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q [B, H, T, Dk] attends to k, v [B, H, S, Dk] under the float mask [B|1, H|1, T, S] -> [B, T, D]."""
        y = attention(q, k, v, mask, scale=1.0, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Cross-attention: x [B, T, D] attends to k, v [B, H, S, Dk] -> [B, T, D]."""
        return self.attend(self._heads(self.q(x)), k, v, mask)


class T5DenseReluDense(nn.Module):
    """The FFN: ``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1 / Flan-T5)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"T5 dense_act_fn {config.dense_act_fn!r} is not supported (one of {sorted(ACTIVATIONS)})")
        self.act = activation(config.dense_act_fn)
        self.gated = bool(config.is_gated_act)
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout_rate

    def expand(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> the activated hidden layer [B, T, F] (one method, so wi_0 and wi_1 can be fused)."""
        if self.gated:
            return self.act(self.wi_0(x)) * self.wi_1(x)
        return self.act(self.wi(x))

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.expand(x), self.dropout, self.training)
        return self.wo(h.to(_dtype_of(self.wo)))  # wo may be kept in fp32 (see set_dtype)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None, input_pos: Tensor | None) -> Tensor:
        q, k, v = self.SelfAttention.project_qkv(self.layer_norm(x))
        if cache is not None:
            k, v = cache.update(input_pos, k, v)
        return x + F.dropout(self.SelfAttention.attend(q, k, v, mask), self.dropout, self.training)


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return x + F.dropout(self.EncDecAttention(self.layer_norm(x), k, v, mask), self.dropout, self.training)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate

    def forward(self, x: Tensor) -> Tensor:
        return x + F.dropout(self.DenseReluDense(self.layer_norm(x)), self.dropout, self.training)


class T5Block(nn.Module):
    """layer = [self-attention, (cross-attention,) FFN], each pre-norm with a residual."""

    def __init__(self, config: T5Config, is_decoder: bool, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        sublayers: list[nn.Module] = [T5LayerSelfAttention(config, has_relative_attention_bias)]
        if is_decoder:
            sublayers.append(T5LayerCrossAttention(config))
        sublayers.append(T5LayerFF(config))
        self.layer = nn.ModuleList(sublayers)

    def forward(self, x: Tensor, mask: Tensor, cross_kv: tuple[Tensor, Tensor] | None = None,
                cross_mask: Tensor | None = None, cache: KVCache | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        x = _clamp_fp16(self.layer[0](x, mask, cache, input_pos))
        if self.is_decoder:
            x = _clamp_fp16(self.layer[1](x, *cross_kv, cross_mask))
        return _clamp_fp16(self.layer[-1](x))


class T5Stack(nn.Module):
    """The encoder or the decoder: embeddings (shared), blocks, final RMS norm."""

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, is_decoder: bool) -> None:
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens  # the model's `shared`, registered again under this name
        n_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([T5Block(config, is_decoder, i == 0) for i in range(n_layers)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = config.dropout_rate
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    @property
    def attn_dtype(self) -> torch.dtype:
        """dtype of queries and keys, hence of the SDPA float masks."""
        return _dtype_of(self.block[0].layer[0].SelfAttention.q)

    def position_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Learned bias for query positions [Tq] against key positions [Tk] -> [1, H, Tq, Tk]."""
        rel = k_pos[None, :] - q_pos[:, None]
        bucket = relative_position_bucket(rel, not self.is_decoder, self.num_buckets, self.max_distance)
        return self.block[0].layer[0].SelfAttention.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def cross_kv(self, encoder_out: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per decoder layer, the cross-attention keys/values of the encoder output [B, S, D] -> [B, H, S, Dk]."""
        return [blk.layer[1].EncDecAttention.project_kv(encoder_out) for blk in self.block]

    def forward(self, x: Tensor, mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]] | None = None,
                cross_mask: Tensor | None = None, caches: list[KVCache] | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        """x [B, T, D] embeddings, mask [B|1, H, T, S] (bias + masking) -> [B, T, D] normed output."""
        x = F.dropout(x, self.dropout, self.training)
        for i, blk in enumerate(self.block):
            x = blk(x, mask, cross_kv[i] if cross_kv is not None else None, cross_mask,
                    caches[i] if caches is not None else None, input_pos)
        return F.dropout(self.final_layer_norm(x), self.dropout, self.training)


class T5ForConditionalGeneration(nn.Module):
    """T5 with a language-model head; state-dict keys and shapes equal transformers'."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared, is_decoder=False)
        self.decoder = T5Stack(config, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self._register_load_state_dict_pre_hook(self._adapt_checkpoint)
        # the one-token decoding step; blip2.fast may put a native, compiled or graphed one here
        self.decode_step: Callable[..., Tensor] = self._decode_step

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def _decode_step(self, ids: Tensor, self_mask: Tensor, cross_kv: list[tuple[Tensor, Tensor]],
                     cross_mask: Tensor, caches: list[KVCache], input_pos: Tensor) -> Tensor:
        # ids [N, T] at cache positions input_pos [T]; self_mask [1, H, L, L] for the whole cache
        # -> logits [N, V] float32 of the last position
        h = self.decoder(self.shared(ids), self_mask[:, :, input_pos], cross_kv, cross_mask, caches, input_pos)
        return self.logits(h[:, -1]).float()

    def set_dtype(self, dtype: torch.dtype) -> T5ForConditionalGeneration:
        """Cast to ``dtype``; in fp16 every FFN ``wo`` stays fp32, as transformers loads T5 in fp16."""
        keep = {id(m.wo.weight) for m in self.modules() if isinstance(m, T5DenseReluDense)}
        with torch.no_grad():
            for p in self.parameters():
                # wo straight from its stored precision, not rounded through fp16
                p.data = p.data.to(torch.float32 if dtype == torch.float16 and id(p) in keep else dtype)
        return self

    def _adapt_checkpoint(self, state_dict: dict[str, Tensor], prefix: str, *args: object) -> None:
        # What checkpoints in the wild look like, as transformers reads them:
        # - transformers 5 writes tied tensors once: only `shared.weight` (embed_tokens/lm_head are copies);
        # - old files carry an unused cross-attention bias on decoder block 0 (transformers ignores it);
        # - transformers 5 configs say `tie_word_embeddings: true` for Flan-T5 too, and the model unties
        #   when the file's `lm_head.weight` differs from `shared.weight`.
        state_dict.pop(prefix + "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight", None)
        shared = state_dict.get(prefix + "shared.weight")
        if shared is None:
            return
        for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            state_dict.setdefault(prefix + key, shared)
        head = state_dict[prefix + "lm_head.weight"]
        if self.lm_head.weight is self.shared.weight and head is not shared and not torch.equal(head, shared):
            self.lm_head.weight = nn.Parameter(torch.empty_like(self.shared.weight))

    def logits(self, h: Tensor) -> Tensor:
        """lm_head: decoder output [..., D] -> logits [..., V]."""
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model**-0.5
        return self.lm_head(h)

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """inputs_embeds [B, S, D], attention_mask [B, S] (1/True = keep; any side padded) -> [B, S, D]."""
        B, S, _ = inputs_embeds.shape
        pos = torch.arange(S, device=inputs_embeds.device)
        keep = torch.ones(B, 1, 1, S, dtype=torch.bool, device=pos.device)
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
        mask = _float_mask(keep, self.encoder.position_bias(pos, pos), self.encoder.attn_dtype)  # [B, H, S, S]
        return self.encoder(inputs_embeds, mask)

    def _cross_mask(self, attention_mask: Tensor | None, encoder_out: Tensor) -> Tensor:
        B, S, _ = encoder_out.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=encoder_out.device)
        return _float_mask(attention_mask.bool()[:, None, None, :], 0.0, self.decoder.attn_dtype)  # [B, 1, 1, S]

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        """Teacher-forced logits [B, Td, V]. Without ``decoder_input_ids`` they are ``labels`` shifted right.
        For the loss, apply ``seq2seq_lm_loss(logits, labels)``."""
        enc = self.encode(inputs_embeds, attention_mask)
        return self.logits(self.decode(enc, attention_mask, decoder_input_ids, decoder_attention_mask, labels))

    def decode(self, encoder_out: Tensor, attention_mask: Tensor | None, decoder_input_ids: Tensor | None,
               decoder_attention_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """The decoder's output [B, Td, D] (before ``logits``) over the encoder output [B, S, D], teacher-forced
        with ``decoder_input_ids`` (default: ``labels`` shifted right)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5 forward needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        T = decoder_input_ids.shape[1]
        pos = torch.arange(T, device=encoder_out.device)
        keep = (pos[None, :] <= pos[:, None])[None, None]  # [1, 1, T, T] causal
        if decoder_attention_mask is not None:
            keep = keep & decoder_attention_mask.bool()[:, None, None, :]
        mask = _float_mask(keep, self.decoder.position_bias(pos, pos), self.decoder.attn_dtype)
        return self.decoder(self.shared(decoder_input_ids), mask, self.decoder.cross_kv(encoder_out),
                            self._cross_mask(attention_mask, encoder_out))

    @torch.no_grad()
    def start_decoding(self, inputs_embeds: Tensor, attention_mask: Tensor | None, expand: int,
                       max_new_tokens: int, decoder_input_ids: Tensor | None = None) -> T5Decoding:
        """Decoding state for ``generate``: row ``i * expand + j`` continues input row ``i``.

        ``decoder_input_ids`` ([B, P] or [B * expand, P]) default to ``decoder_start_token_id``."""
        enc = self.encode(inputs_embeds, attention_mask)  # once, on the B unexpanded rows
        cross_kv = [(k.repeat_interleave(expand, 0), v.repeat_interleave(expand, 0))
                    for k, v in self.decoder.cross_kv(enc)]
        cross_mask = self._cross_mask(attention_mask, enc).repeat_interleave(expand, 0)
        B, N = enc.shape[0], enc.shape[0] * expand
        if decoder_input_ids is None:
            decoder_input_ids = torch.full((N, 1), self.config.decoder_start_token_id, device=enc.device)
        decoder_input_ids = decoder_input_ids.to(enc.device)
        if decoder_input_ids.shape[0] == B:
            decoder_input_ids = decoder_input_ids.repeat_interleave(expand, 0)
        elif decoder_input_ids.shape[0] != N:
            raise ValueError(f"decoder_input_ids has {decoder_input_ids.shape[0]} rows, expected {B} or {N}")
        return T5Decoding(self, cross_kv, cross_mask, decoder_input_ids, max_new_tokens)


class T5Decoding:
    """One generate call's decoding state (the ``blip2.generation.Decoder`` protocol).

    Self-attention K/V live in a preallocated cache of ``P + max_new_tokens`` positions (rounded up to a
    multiple of 8 for aligned SDPA masks); every step attends over the whole cache with the not-yet-written
    positions masked, so shapes stay static."""

    def __init__(self, model: T5ForConditionalGeneration, cross_kv: list[tuple[Tensor, Tensor]],
                 cross_mask: Tensor, decoder_input_ids: Tensor, max_new_tokens: int) -> None:
        self.model, self.cross_kv, self.cross_mask = model, cross_kv, cross_mask
        self.prefix = decoder_input_ids  # [N, P]
        self.pos = 0
        N, P = decoder_input_ids.shape
        self.length = P + max_new_tokens  # one spare: a loop may feed its last token
        dec, cfg, device = model.decoder, model.config, cross_mask.device
        pos = torch.arange(-(-self.length // 8) * 8, device=device)
        causal = (pos[None, :] <= pos[:, None])[None, None]
        self.self_mask = _float_mask(causal, dec.position_bias(pos, pos), dec.attn_dtype)  # [1, H, L, L]
        self.caches = [KVCache(N, cfg.num_heads, len(pos), cfg.d_kv, dec.attn_dtype, device_of(block))
                       for block in dec.block]

    def _run(self, ids: Tensor, step: Callable[..., Tensor]) -> Tensor:
        # ids [N, T] -> logits [N, V] of the last position
        T = ids.shape[1]
        if self.pos + T > self.length:
            raise RuntimeError(f"T5Decoding: past its {self.length} preallocated positions")
        input_pos = torch.arange(self.pos, self.pos + T, device=self.cross_mask.device)
        logits = step(ids, self.self_mask, self.cross_kv, self.cross_mask, self.caches, input_pos)
        self.pos += T
        return logits

    @torch.no_grad()
    def prefill(self) -> Tensor:
        """Feed the decoder prefix (the start token); logits [N, V] float32 of the first new token."""
        return self._run(self.prefix, self.model._decode_step)

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """tokens [N]: append one token per row; logits [N, V] float32 for the next."""
        return self._run(tokens[:, None], self.model.decode_step)

    @torch.no_grad()
    def step_greedy(self, tokens: Tensor, banned: Tensor | None) -> Tensor:
        """tokens [N]: append one token per row; the next greedy tokens [N] (``banned`` ids left out)."""
        return self._run(tokens[:, None], greedy_step(self.model.decode_step, banned))

    @torch.no_grad()
    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (beam search): self-attention caches, cross K/V and encoder mask."""
        for cache in self.caches:
            cache.reorder(index)
        self.cross_kv = [(k.index_select(0, index.to(k.device)), v.index_select(0, index.to(k.device)))
                         for k, v in self.cross_kv]
        self.cross_mask = self.cross_mask.index_select(0, index)
