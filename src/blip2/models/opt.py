"""OPT, the decoder-only language model of the blip2-opt checkpoints.

Module and attribute names follow the Hugging Face state dict (``model.decoder.layers.{i}.self_attn.q_proj``,
...), so a ``transformers`` checkpoint loads with ``load_state_dict(strict=True)``.

Two entry points:

- ``OPTForCausalLM.forward(inputs_embeds, attention_mask) -> logits``: the whole sequence at once, no cache;
  this is the training path (gradients flow) and the reference for the cached path.
- ``OPTForCausalLM.start_decoding(...) -> OPTDecoding``: a preallocated KV cache for generation, with a
  prefill over the prompt and a one-token ``step`` (the ``Decoder`` protocol of ``blip2.generation``).

The one-token step is the attribute ``decode_step`` and the q/k/v projection the method
``OPTAttention.project_qkv``, so that ``blip2.fast`` can replace either from outside (a fused or quantized
product, a native or compiled step); nothing here knows about it.

Shapes: B batch, T query length, S key length (cache capacity when decoding), D hidden size, E
``word_embed_proj_dim`` (the width of the token embeddings and of ``lm_head``; equals D except in opt-350m),
H heads, Dh = D / H, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.config import OPTConfig
from blip2.generation import greedy_step
from blip2.models.layers import ACTIVATIONS, Embedding, KVCache, activation, attention, device_of

__all__ = ["OPTForCausalLM", "OPTDecoding"]

# The learned position table has two extra rows in front (a fairseq leftover): position p is row p + 2.
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        if d % self.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_attention_heads {self.num_heads}")
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        # in the reference's order, so that code walking the modules in order (PEFT creating LoRA adapters from
        # one seeded generator) meets them as it does there
        self.k_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.q_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=config.enable_bias)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> queries, keys, values [B, T, D] (one method, so the three can be fused into one product)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        # x [B, T, D]; mask [B, 1, T, S] bool, True = may attend; S = T without a cache
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = (t.view(B, T, H, Dh) for t in self.project_qkv(x))
        # the query is scaled before the product, as in the reference (same rounding)
        q, k, v = (q * self.scaling).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # [B, H, S, Dh]
        y = attention(q, k, v, mask, scale=1.0, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function {config.activation_function!r} is not supported "
                             f"(expected one of {sorted(ACTIVATIONS)})")
        self.act = activation(config.activation_function)
        # opt-350m normalises after each residual block (post-norm), every other size before (pre-norm)
        self.pre_norm = config.do_layer_norm_before
        self.dropout = config.dropout
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.fc1 = nn.Linear(d, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, d, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=affine)

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        # x [B, T, D] -> [B, T, D]
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + F.dropout(self.self_attn(h, mask, cache, input_pos), self.dropout, self.training)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + F.dropout(self.fc2(self.act(self.fc1(h))), self.dropout, self.training)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.embed_positions = Embedding(config.max_position_embeddings + _POSITION_OFFSET, d)
        # opt-350m embeds in 512 and runs in 1024
        self.project_in = nn.Linear(e, d, bias=False) if e != d else None
        self.project_out = nn.Linear(d, e, bias=False) if e != d else None
        # post-norm models, and checkpoints from before metaseq added it, have no final norm
        has_final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = (nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine)
                                 if has_final_norm else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, inputs_embeds: Tensor, positions: Tensor, mask: Tensor,
                caches: list[KVCache] | None = None, input_pos: Tensor | None = None) -> Tensor:
        # inputs_embeds [B, T, E]; positions [B, T] (-1 for padding); mask [B, 1, T, S] -> hidden [B, T, E]
        x = self.project_in(inputs_embeds) if self.project_in is not None else inputs_embeds
        x = x + self.embed_positions(positions + _POSITION_OFFSET)  # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, caches[i] if caches is not None else None, input_pos)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x


class OPTModel(nn.Module):
    """Holds ``decoder``; exists so the state-dict keys read ``model.decoder.*`` as in the reference."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


def _positions(mask: Tensor) -> Tensor:
    # mask [B, T] bool -> OPT position ids [B, T]: 0, 1, 2, ... over the real tokens, -1 on padding
    return mask.long().cumsum(1) * mask - 1


def prompt_mask(key_valid: Tensor, T: int, S: int, first: int = 0) -> Tensor:
    """key_valid [B, S] bool -> [B, 1, T, S]: query t, at slot ``first + t``, sees valid keys at slots up to its own.

    A query on leading left padding has no valid key before it; a fully masked row makes SDPA return NaN,
    and NaN leaks through zero attention weights into later layers. Such a row sees its own slot instead
    (a finite value nobody reads). Rows with any valid key are left as transformers has them, so even
    logits on padding (which a loss with shifted labels can read) match the reference."""
    slot = torch.arange(S, device=key_valid.device)
    query = first + torch.arange(T, device=key_valid.device)[:, None]
    causal = slot[None, :] <= query  # [T, S]
    seen = causal & key_valid[:, None, :]  # [B, T, S]
    own = slot[None, :] == query
    return (seen | (own & ~seen.any(-1, keepdim=True)))[:, None]


class OPTForCausalLM(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        self.reset_parameters()
        # the one-token decoding step; blip2.fast may put a native, compiled or graphed one here
        self.decode_step: Callable[..., Tensor] = self._decode_step

    def reset_parameters(self) -> None:
        """The reference's initialisation: normal(0, init_std) weights, zero biases, unit norms."""
        if self.lm_head.weight.is_meta:  # built on the meta device for a checkpoint to fill: nothing to draw
            return
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """inputs_embeds [B, T, E], attention_mask [B, T] (1/True = token, 0 = left padding) -> logits [B, T, V].

        Logits on padded positions are finite and meaningless."""
        return self.logits(self.hidden_states(inputs_embeds, attention_mask))

    def logits(self, h: Tensor) -> Tensor:
        """lm_head: hidden states [..., E] -> logits [..., V] (in the weights' dtype)."""
        return self.lm_head(h)

    def hidden_states(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The decoder output before ``lm_head`` [B, T, E] (transformers' ``base_model`` output)."""
        B, T, _ = inputs_embeds.shape
        valid = (torch.ones(B, T, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None
                 else attention_mask.bool())
        return self.model.decoder(inputs_embeds, _positions(valid), prompt_mask(valid, T, T))

    def start_decoding(self, inputs_embeds: Tensor, attention_mask: Tensor | None, expand: int,
                       max_new_tokens: int) -> OPTDecoding:
        """Decoding state for the prompts ``inputs_embeds`` [B, T, E] (left-padded), each row repeated
        ``expand`` times (row ``i * expand + j`` copies prompt ``i``), room for ``max_new_tokens``."""
        B, T, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=inputs_embeds.device)
        return OPTDecoding(self, inputs_embeds.repeat_interleave(expand, 0),
                           attention_mask.bool().repeat_interleave(expand, 0), max_new_tokens)

    def _decode_step(self, x: Tensor, positions: Tensor, mask: Tensor, caches: list[KVCache],
                     input_pos: Tensor) -> Tensor:
        # x [N, T, E] at cache slots input_pos [T] -> logits [N, V] float32 of the last position
        h = self.model.decoder(x, positions, mask, caches, input_pos)
        return self.logits(h[:, -1]).float()


class OPTDecoding:
    """The ``Decoder`` protocol for OPT: a preallocated KV cache, a prefill over the prompt, one-token steps.

    Cache slot s holds prompt position s for s < T and the (s - T)-th fed-back token after that. The last
    new token is never fed back, so T + max_new_tokens - 1 slots suffice."""

    def __init__(self, lm: OPTForCausalLM, inputs_embeds: Tensor, valid: Tensor, max_new_tokens: int) -> None:
        cfg = lm.config
        N, T, _ = inputs_embeds.shape
        S = T + max(max_new_tokens - 1, 0)
        longest = int(valid.sum(1).max()) + max_new_tokens - 1  # real tokens fed, padding not counted
        if longest > cfg.max_position_embeddings:
            raise ValueError(f"{longest} positions needed (prompt + max_new_tokens - 1), "
                             f"max_position_embeddings is {cfg.max_position_embeddings}")
        param = lm.model.decoder.embed_positions.weight  # the model's dtype and device (never laid out)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.lm = lm
        self.caches = [KVCache(N, cfg.num_attention_heads, S, head_dim, param.dtype, device_of(layer))
                       for layer in lm.model.decoder.layers]
        self.inputs_embeds = inputs_embeds
        self.key_valid = torch.zeros(N, S, dtype=torch.bool, device=param.device)  # [N, S]
        self.key_valid[:, :T] = valid
        self.positions = _positions(valid)  # [N, T]
        self.next_position = valid.sum(1, keepdim=True)  # [N, 1]: the position id of the next token
        self.length = 0  # filled cache slots
        self.input_pos = torch.tensor([T], device=param.device)  # [1]: the slot of the next token

    @torch.no_grad()
    def prefill(self) -> Tensor:
        """Run the prompt; logits [N, V] (float32) for the first new token."""
        T = self.inputs_embeds.shape[1]
        S = self.key_valid.shape[1]
        input_pos = torch.arange(T, device=self.key_valid.device)
        mask = prompt_mask(self.key_valid, T, S)  # [N, 1, T, S]
        logits = self.lm._decode_step(self.inputs_embeds, self.positions, mask, self.caches, input_pos)
        self.length = T
        self.inputs_embeds = None  # not needed any more
        return logits

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` [N]; logits [N, V] (float32) for the token after them."""
        return self._run(tokens, self.lm.decode_step)

    @torch.no_grad()
    def step_greedy(self, tokens: Tensor, banned: Tensor | None) -> Tensor:
        """Append ``tokens`` [N]; the next greedy tokens [N] (``banned`` ids left out)."""
        return self._run(tokens, greedy_step(self.lm.decode_step, banned))

    def _run(self, tokens: Tensor, step: Callable[..., Tensor]) -> Tensor:
        slot = self.length
        if slot >= self.key_valid.shape[1]:
            raise RuntimeError(f"KV cache full ({slot} slots): start_decoding got a smaller max_new_tokens")
        x = self.lm.model.decoder.embed_tokens(tokens)[:, None]  # [N, 1, E]
        self.key_valid[:, slot] = True
        mask = self.key_valid[:, None, None, :]  # [N, 1, 1, S]
        out = step(x, self.next_position, mask, self.caches, self.input_pos)
        self.next_position += 1
        self.input_pos += 1
        self.length = slot + 1
        return out

    @torch.no_grad()
    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` [N] (beam search), in place."""
        for cache in self.caches:
            cache.reorder(index, self.length)
        self.key_valid.copy_(self.key_valid[index])
        self.next_position.copy_(self.next_position[index])
