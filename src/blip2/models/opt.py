"""OPT, the decoder-only language model of the blip2-opt checkpoints.

Module and attribute names follow the Hugging Face state dict (``model.decoder.layers.{i}.self_attn.q_proj``,
...), so a ``transformers`` checkpoint loads with ``load_state_dict(strict=True)``.

Two entry points:

- ``OPTForCausalLM.forward(inputs_embeds, attention_mask) -> logits``: the whole sequence at once, no cache;
  this is the training path (gradients flow) and the reference for the cached path.
- ``OPTForCausalLM.start_decoding(...) -> OPTDecoding``: a preallocated KV cache for generation, with a
  prefill over the prompt and a one-token ``step`` (the ``Decoder`` protocol of ``blip2.generation``).

For inference, ``fuse()`` computes q/k/v in one matmul and stores every projection in the fastest format
for the device (or int8, ``fuse("int8")``), keeping the state-dict keys (``blip2.fast.linear``);
``compile()`` compiles the one-token step. Outside autograd, plain ``nn.Linear`` layers go through
``fused.linear`` (oneDNN on CPU).

Shapes: B batch, T query length, S key length (cache capacity when decoding), D hidden size, E
``word_embed_proj_dim`` (the width of the token embeddings and of ``lm_head``; equals D except in opt-350m),
H heads, Dh = D / H, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2.config import OPTConfig
from blip2.fast.graphs import graph_step
from blip2.fast.native import NativeOPTStep, greedy_step, try_native
from blip2.fast.native import check as native_check
from blip2.fast.linear import (FusedLinear, attention, compile_step, decode_format, fuse_linears, lay_out_for, linear,
                    pack_linears, unfuse_linears)

__all__ = ["OPTForCausalLM", "OPTDecoding", "KVCache"]

# The learned position table has two extra rows in front (a fairseq leftover): position p is row p + 2.
_POSITION_OFFSET = 2

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


class KVCache(nn.Module):
    """Keys and values of one attention layer for ``max_len`` positions, allocated once."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        # zeros, not empty: unwritten slots are masked out, but 0 * NaN garbage would still be NaN
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos [T]; k, v [B, H, T, Dh] -> the whole cache [B, H, S, Dh]
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache

    def reorder(self, index: Tensor, length: int) -> None:
        # keep rows `index` (beam search); only the first `length` slots hold anything
        self.k_cache[:, :, :length] = self.k_cache[index, :, :length]
        self.v_cache[:, :, :length] = self.v_cache[index, :, :length]


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
        self.q_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.k_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.v_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.out_proj = nn.Linear(d, d, bias=config.enable_bias)
        self.qkv: FusedLinear | None = None  # q, k, v in one matmul, after fuse()

    def forward(self, x: Tensor, mask: Tensor, cache: KVCache | None = None,
                input_pos: Tensor | None = None) -> Tensor:
        # x [B, T, D]; mask [B, 1, T, S] bool, True = may attend; S = T without a cache
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        if self.qkv is not None:
            q, k, v = self.qkv(x).view(B, T, 3, H, Dh).unbind(2)  # each [B, T, H, Dh]
        else:
            q, k, v = (linear(x, p).view(B, T, H, Dh) for p in (self.q_proj, self.k_proj, self.v_proj))
        # the query is scaled before the product, as in the reference (same rounding)
        q, k, v = (q * self.scaling).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # [B, H, S, Dh]
        y = attention(q, k, v, mask, scale=1.0, dropout_p=self.dropout if self.training else 0.0)
        return linear(y.transpose(1, 2).reshape(B, T, D), self.out_proj)


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d, affine = config.hidden_size, config.layer_norm_elementwise_affine
        if config.activation_function not in _ACTIVATIONS:
            raise ValueError(f"activation_function {config.activation_function!r} is not supported "
                             f"(expected one of {sorted(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[config.activation_function]
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
        x = x + F.dropout(linear(self.act(linear(h, self.fc1)), self.fc2), self.dropout, self.training)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        d, e = config.hidden_size, config.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + _POSITION_OFFSET, d)
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
        x = linear(inputs_embeds, self.project_in) if self.project_in is not None else inputs_embeds
        x = x + self.embed_positions(positions + _POSITION_OFFSET)  # [B, T, D]
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, caches[i] if caches is not None else None, input_pos)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return linear(x, self.project_out) if self.project_out is not None else x


class OPTModel(nn.Module):
    """Holds ``decoder``; exists so the state-dict keys read ``model.decoder.*`` as in the reference."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)


def _positions(mask: Tensor) -> Tensor:
    # mask [B, T] bool -> OPT position ids [B, T]: 0, 1, 2, ... over the real tokens, -1 on padding
    return mask.long().cumsum(1) * mask - 1


def _prompt_mask(key_valid: Tensor, T: int, S: int) -> Tensor:
    """key_valid [B, S] bool -> [B, 1, T, S]: query t sees valid keys at slots <= t.

    A query on leading left padding has no valid key before it; a fully masked row makes SDPA return NaN,
    and NaN leaks through zero attention weights into later layers. Such a row sees its own slot instead
    (a finite value nobody reads). Rows with any valid key are left as transformers has them, so even
    logits on padding (which a loss with shifted labels can read) match the reference."""
    slot = torch.arange(S, device=key_valid.device)
    query = torch.arange(T, device=key_valid.device)[:, None]
    causal = slot[None, :] <= query  # [T, S]: the T queries sit in the first T slots
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
        # the one-token decoding step; compile() swaps in a compiled version
        self.decode_step: Callable[..., Tensor] = self._decode_step

    def reset_parameters(self) -> None:
        """The reference's initialisation: normal(0, init_std) weights, zero biases, unit norms."""
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
        return linear(h, self.lm_head)

    def hidden_states(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The decoder output before ``lm_head`` [B, T, E] (transformers' ``base_model`` output)."""
        B, T, _ = inputs_embeds.shape
        valid = (torch.ones(B, T, dtype=torch.bool, device=inputs_embeds.device) if attention_mask is None
                 else attention_mask.bool())
        return self.model.decoder(inputs_embeds, _positions(valid), _prompt_mask(valid, T, T))

    def start_decoding(self, inputs_embeds: Tensor, attention_mask: Tensor | None, expand: int,
                       max_new_tokens: int) -> OPTDecoding:
        """Decoding state for the prompts ``inputs_embeds`` [B, T, E] (left-padded), each row repeated
        ``expand`` times (row ``i * expand + j`` copies prompt ``i``), room for ``max_new_tokens``."""
        B, T, _ = inputs_embeds.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=inputs_embeds.device)
        return OPTDecoding(self, inputs_embeds.repeat_interleave(expand, 0),
                           attention_mask.bool().repeat_interleave(expand, 0), max_new_tokens)

    # -- inference formats ----------------------------------------------------------------------

    def _tied_head(self) -> bool:
        return isinstance(self.lm_head, nn.Linear) and self.lm_head.weight is self.model.decoder.embed_tokens.weight

    @torch.no_grad()
    def fuse(self, fmt: str | None = None) -> OPTForCausalLM:
        """Prepare for inference: q/k/v in one matmul, every projection in weight format ``fmt``.

        ``fmt``: None picks the fastest float format for decoding on the device (``fused.decode_format``: on CPU
        blip2's blocked layout, ``"blocked"``, where the native kernels load, built on first use; else
        oneDNN's),
        ``"dense"`` keeps the plain layout (``compile()``'s choice), ``"int8"`` quantizes weights (per output
        channel, activations stay float; a head tied to the embeddings gets an int8 copy, which the state
        dict leaves out as tied checkpoints do), ``"int8-dynamic"`` also rounds each product's input to
        8 bits and multiplies in integers (CPU; ``blip2.fast.quant.dynamic_int8_linear``). The state dict keeps the reference keys and shapes (int8:
        dequantized). For inference: the weights become buffers
        (gradients reach the inputs only, through slow fallbacks); move and cast before fusing.
        ``unfuse()`` restores plain ``nn.Linear`` layers. Returns self."""
        if any(isinstance(m, FusedLinear) for m in self.modules()):
            raise RuntimeError("already fused; call unfuse() first to change the format")
        fmt = fmt or decode_format(self.model.decoder.embed_tokens.weight)
        for layer in self.model.decoder.layers:
            fuse_linears(layer.self_attn, "qkv", ("q_proj", "k_proj", "v_proj"), fmt)
        pack_linears(self, fmt, tied=[self.lm_head] if self._tied_head() else [])
        self.decode_step = self._decode_step  # a compiled step was traced for the old layers
        return self

    @torch.no_grad()
    def unfuse(self) -> OPTForCausalLM:
        """Back to ``nn.Linear`` layers with parameters (int8 weights stay rounded). Returns self."""
        unfuse_linears(self, self.model.decoder.embed_tokens)
        self.decode_step = self._decode_step
        return self

    def compile(self, batch: int = 1, native: bool = True, **compile_kwargs: Any) -> OPTForCausalLM:
        """Compile the one-token decoding step with ``torch.compile(**compile_kwargs)``. Shapes are static
        within a ``generate`` call (the cache is preallocated), so it compiles once per batch size and
        length. ``batch``: the rows decoded at once (images x beams) to lay the weights
        out for (``fused.compile_format``): one row, plain weights (the native step's, and in a compiled step
        ``fused._row_product``: the kernel of ``blip2.fast.kernels``, built here on first use, once per machine,
        else a compiled reduction); several, ``fused.decode_format``'s layout (blip2's blocked one on CPU);
        int8 stays int8. Any batch still runs, only slower. Until ``unfuse()`` or ``fuse()`` (which put the eager
        step back) the model cannot be cast, moved or reloaded.

        ``native``: on CPU, a step runs as one native call where ``blip2.fast.native`` covers the model
        (float32/bfloat16, the kernels loaded; blocked weights for any number of rows, plain or int8 ones
        for one row): the whole decoder in C++, without the compiled graph's per-token overhead and without
        compiling; other calls use the compiled step, compiled when first needed. False: always the compiled
        step. Returns self."""
        lay_out_for(self, self.model.decoder.embed_tokens.weight, batch)
        device = self.model.decoder.embed_tokens.weight.device
        step = compile_step(self._decode_step, device, **compile_kwargs)
        self.decode_step = (native and try_native(NativeOPTStep, self, step)) or step
        return self

    def native(self) -> OPTForCausalLM:
        """CPU: decode with the native step (``blip2.fast.native``: the whole decoder in one C++ call per token,
        for all rows); nothing is compiled. Lays the weights out first (``fused.compile_format(.., None)``):
        blocked where the kernels take the dtype, so any number of rows (images x beams) runs natively;
        else plain, and int8 stays int8: one row natively, several with the eager step. (At one row in bf16,
        ``compile()``'s plain layout is 5-15% faster.) Raises
        ``blip2.fast.native.Unsupported`` (a ``ValueError``) saying why where the native steps do not cover
        the model. ``fuse()``, ``unfuse()`` and ``compile()`` replace the step. Returns self."""
        native_check(self.model.decoder.embed_tokens.weight)  # before changing the layout
        lay_out_for(self, self.model.decoder.embed_tokens.weight, None)
        self.decode_step = NativeOPTStep(self, self._decode_step)
        return self

    def cuda_graph(self) -> OPTForCausalLM:
        """Replay the one-token decoding step (eager, or compiled by ``compile()`` before) as a CUDA graph:
        one launch instead of hundreds of small kernels per token (``blip2.fast.graphs``). A graph is recorded
        at the first step of each ``generate`` call. CUDA only; ``fuse()``, ``unfuse()`` and ``compile()``
        put the plain step back. Returns self."""
        self.decode_step = graph_step(self.decode_step, self.model.decoder.embed_tokens.weight.device)
        return self

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
        param = lm.model.decoder.embed_tokens.weight  # dtype and device of the model (never fused)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.lm = lm
        self.caches = [KVCache(N, cfg.num_attention_heads, S, head_dim, param.dtype, param.device)
                       for _ in range(cfg.num_hidden_layers)]
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
        mask = _prompt_mask(self.key_valid, T, S)  # [N, 1, T, S]
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
