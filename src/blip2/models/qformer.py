"""The Querying Transformer (Q-Former): a BERT-style encoder over [learned queries; text].

Every layer: self-attention over the whole sequence, then, on layers i % cross_attention_frequency == 0,
cross-attention from the *query* positions to the image features, then a feed-forward network that is
separate for query positions (``intermediate_query``/``output_query``) and text positions
(``intermediate``/``output``, present when ``use_qformer_text_input``). Post-norm (BERT) residuals.

The three ways BLIP-2 runs it (Q queries, T text tokens, L = Q + T):

- queries only (image features, the LM prefix):  ``qformer(query_tokens, image)``
- queries + text (image-text matching, ITM):     ``qformer(text_embeddings(ids, query_tokens), image,
  query_length=Q, attention_mask=mask)``; queries and text see each other (text padding masked)
- text only (text features, ITC):                ``qformer(text_embeddings(ids), query_length=0,
  attention_mask=mask)``; no cross-attention
- ``causal_text=True`` with queries + text (stage-1 image-grounded generation, ITG): queries see only
  queries, text sees all queries and the text up to itself.

Module attribute names equal the Hugging Face state-dict keys (``layernorm``,
``encoder.layer.{i}.attention.attention.query``, ...). In transformers' retrieval checkpoints the text
embeddings are a separate top-level module (``embeddings.word_embeddings``,
``embeddings.position_embeddings``); the embedding LayerNorm of the original BERT is the Q-Former's
``layernorm``, applied here to the whole [queries; text] sequence.

Shapes: B batch, L sequence, D hidden, N image tokens, Dv image width, h heads, d = D/h.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blip2.checkpoint import SubmodelMixin
from blip2.config import Blip2QFormerConfig
from blip2.models.layers import Embedding, activation, attention
from blip2.models.outputs import BaseModelOutputWithPoolingAndCrossAttentions, Recorder, finish

__all__ = ["Blip2QFormerModel", "Blip2QFormerTextEmbeddings"]


class Blip2QFormerTextEmbeddings(nn.Module):
    """Word + absolute position embeddings for the Q-Former's text input (no LayerNorm: see module doc)."""

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.word_embeddings = Embedding(config.vocab_size, D, padding_idx=config.pad_token_id)
        self.position_embeddings = Embedding(config.max_position_embeddings, D)

    def forward(
        self,
        input_ids: Tensor,
        query_embeds: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids [B, T] (+ query_embeds [B, Q, D]) -> [B, Q+T, D] = [queries; words + positions].

        Text positions count from 0 whether or not queries are prepended.
        """
        T = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device)[None]  # [1, T]
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)  # [B, T, D]
        if query_embeds is not None:
            x = torch.cat([query_embeds.to(x.dtype), x], dim=1)  # [B, Q+T, D]
        return x


class Blip2QFormerMultiHeadAttention(nn.Module):
    """q from the sequence; k, v from the sequence (self) or the image features (cross)."""

    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool) -> None:
        super().__init__()
        D = config.hidden_size
        if D % config.num_attention_heads:
            raise ValueError(f"hidden_size {D} is not a multiple of num_attention_heads {config.num_attention_heads}")
        kv_in = config.encoder_hidden_size if is_cross_attention else D
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(kv_in, D)
        self.value = nn.Linear(kv_in, D)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        """x [B, L, D], context [B, S, D or Dv], mask bool [B, 1, L or 1, S] (True = attend) -> [B, L, D]."""
        B, L, D = x.shape
        S = context.shape[1]
        h = self.num_heads
        q = self.query(x).view(B, L, h, D // h).transpose(1, 2)  # [B, h, L, d]
        k = self.key(context).view(B, S, h, D // h).transpose(1, 2)  # [B, h, S, d]
        v = self.value(context).view(B, S, h, D // h).transpose(1, 2)  # [B, h, S, d]
        y = attention(q, k, v, mask, scale=None, dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, L, D)


class Blip2QFormerAddNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(residual + dropout(dense(x)))."""

    def __init__(self, config: Blip2QFormerConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(x)))


class Blip2QFormerAttention(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, is_cross_attention: bool = False) -> None:
        super().__init__()
        self.attention = Blip2QFormerMultiHeadAttention(config, is_cross_attention)
        self.output = Blip2QFormerAddNorm(config, config.hidden_size)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.attention(x, context, mask), x)


class Blip2QFormerIntermediate(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class Blip2QFormerLayer(nn.Module):
    def __init__(self, config: Blip2QFormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Blip2QFormerAttention(config)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Blip2QFormerAttention(config, is_cross_attention=True)
        self.has_text_ffn = config.use_qformer_text_input
        if self.has_text_ffn:
            self.intermediate = Blip2QFormerIntermediate(config)
            self.output = Blip2QFormerAddNorm(config, config.intermediate_size)
        self.intermediate_query = Blip2QFormerIntermediate(config)
        self.output_query = Blip2QFormerAddNorm(config, config.intermediate_size)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor | None,
        query_length: int,
        image: Tensor | None,
        image_mask: Tensor | None,
    ) -> Tensor:
        x = self.attention(x, x, self_mask)  # [B, L, D]
        queries, text = x[:, :query_length], x[:, query_length:]  # [B, Q, D], [B, T, D]
        parts = []
        if query_length > 0:
            if self.has_cross_attention:
                queries = self.crossattention(queries, image, image_mask)  # image: [B, N, Dv]
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1] > 0:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class Blip2QFormerEncoder(nn.Module):
    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Blip2QFormerLayer(config, i) for i in range(config.num_hidden_layers))


def _self_attention_mask(
    attention_mask: Tensor | None, B: int, L: int, query_length: int, causal_text: bool, device: torch.device
) -> Tensor | None:
    """Boolean mask [B or 1, 1, L or 1, L] (True = may attend) for the self-attention, or None for 'all'."""
    mask = None
    if attention_mask is not None:
        if attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask must be [B, L] = [{B}, {L}], got {list(attention_mask.shape)}")
        mask = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, L] padding
    if causal_text:
        # Prefix-LM: row i may see column j iff j <= max(i, Q-1), i.e. every position sees all queries,
        # queries see nothing else, text sees the text up to itself.
        i = torch.arange(L, device=device)
        causal = i[None, :] <= i.clamp(min=query_length - 1)[:, None]  # [L, L]
        mask = causal[None, None] if mask is None else mask & causal
    return mask


class Blip2QFormerModel(SubmodelMixin, nn.Module):
    """The Q-Former. Computes in the dtype of its parameters (kept fp32 in BLIP-2; inputs are cast)."""

    config_class = Blip2QFormerConfig
    _blip2_config_key = "qformer_config"
    _blip2_prefix = "qformer."

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(config)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT initialisation, as transformers does for a fresh model."""
        if self.layernorm.weight.is_meta:  # built on the meta device for a checkpoint to fill: nothing to draw
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(
        self,
        query_embeds: Tensor,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        *,
        query_length: int | None = None,
        attention_mask: Tensor | None = None,
        causal_text: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> Any:
        """Run the Q-Former: ``last_hidden_state`` [B, L, D] and ``pooler_output`` (its first position) as a
        ``BaseModelOutputWithPoolingAndCrossAttentions`` (a tuple with ``return_dict=False``).

        query_embeds: [B, L, D], the first ``query_length`` positions learned queries, the rest text
            embeddings (see ``Blip2QFormerTextEmbeddings``); the name is transformers'.
        encoder_hidden_states: [B, N, Dv] image features; needed when query_length > 0.
        encoder_attention_mask: [B, N] 1/True for image tokens to attend to (None: all).
        query_length: Q; default L (all queries). 0 runs text only: no cross-attention.
        attention_mask: [B, L] 1/True for positions to attend to (text padding), over queries and text.
        causal_text: stage-1 ITG mask (queries see queries; text sees queries and earlier text).
        output_hidden_states: the normed input and each layer's output; output_attentions: the weights of
            every self-attention (``attentions``) and cross-attention (``cross_attentions``).
        """
        B, L, _ = query_embeds.shape
        Q = L if query_length is None else query_length
        if not 0 <= Q <= L:
            raise ValueError(f"query_length {Q} outside [0, {L}]")
        dtype = self.layernorm.weight.dtype
        if Q > 0 and encoder_hidden_states is None and self.config.num_hidden_layers > 0:
            raise ValueError("encoder_hidden_states (image features) are needed when query_length > 0")
        if Q < L and not self.config.use_qformer_text_input:
            raise ValueError("this Q-Former has no text feed-forward (config.use_qformer_text_input is False)")

        x = self.dropout(self.layernorm(query_embeds.to(dtype)))  # [B, L, D]
        self_mask = _self_attention_mask(attention_mask, B, L, Q, causal_text, x.device)
        image, image_mask = None, None
        if Q > 0:
            image = encoder_hidden_states.to(dtype)  # [B, N, Dv]
            if encoder_attention_mask is not None:
                image_mask = encoder_attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]

        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        with Recorder(self.encoder.layer, output_hidden_states, output_attentions) as rec:
            for layer in self.encoder.layer:
                if use_ckpt:
                    x = checkpoint(layer, x, self_mask, Q, image, image_mask, use_reentrant=False)
                else:
                    x = layer(x, self_mask, Q, image, image_mask)
        attentions = cross_attentions = None
        if output_attentions:  # recorded per layer: its self-attention, then its cross-attention if it ran one
            weights = iter(rec.attentions)
            attentions, cross_attentions = [], []
            for layer in self.encoder.layer:
                attentions.append(next(weights))
                if layer.has_cross_attention and Q > 0:
                    cross_attentions.append(next(weights))
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=x, pooler_output=x[:, 0], hidden_states=rec.hidden_states(x),
            attentions=None if attentions is None else tuple(attentions),
            cross_attentions=tuple(cross_attentions) if cross_attentions else None)
        return finish(out, return_dict)
