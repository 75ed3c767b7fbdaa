"""The BLIP-2 image encoder: an EVA-style ViT (ViT-g/14 in the published checkpoints).

Pre-norm transformer blocks over [CLS; patches] with learned absolute position embeddings.
Module attribute names equal the Hugging Face state-dict keys (``embeddings.*``,
``encoder.layers.{i}.*``, ``post_layernorm``), so a ``transformers`` checkpoint loads with
``load_state_dict(strict=True)``.

Shapes: B batch, N = (H/p)*(W/p) patches, D = hidden_size, h heads, d = D/h.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from blip2.checkpoint import SubmodelMixin
from blip2.config import Blip2VisionConfig
from blip2.models.layers import activation, attention
from blip2.models.outputs import BaseModelOutputWithPooling, Recorder, finish

__all__ = ["Blip2VisionModel"]


class Blip2VisionEmbeddings(nn.Module):
    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, D))
        self.patch_embedding = nn.Conv2d(3, D, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, D))

    def position_table(self, grid_h: int, grid_w: int, interpolate: bool) -> Tensor:
        """Position embeddings [1, 1 + grid_h*grid_w, D] for a grid_h x grid_w patch grid."""
        table = self.position_embedding  # [1, 1+S*S, D], stored for a square S x S grid
        n_stored = table.shape[1] - 1
        if grid_h * grid_w == n_stored and grid_h == grid_w:
            return table
        if not interpolate:
            side = math.isqrt(n_stored)
            raise ValueError(
                f"image gives a {grid_h}x{grid_w} patch grid but the position embeddings are for {side}x{side}; "
                "pass interpolate_pos_encoding=True"
            )
        # Bicubic resize of the patch part, CLS position kept (as DINO/transformers do).
        side = math.isqrt(n_stored)
        D = table.shape[-1]
        grid = table[:, 1:].reshape(1, side, side, D).permute(0, 3, 1, 2)  # [1, D, S, S]
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, D)  # [1, gh*gw, D]
        return torch.cat([table[:, :1], grid], dim=1)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False) -> Tensor:
        B, _, H, W = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))  # [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.to(dtype).expand(B, 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, N+1, D]
        pos = self.position_table(H // self.patch_size, W // self.patch_size, interpolate_pos_encoding)
        return x + pos.to(dtype)


class Blip2Attention(nn.Module):
    """Self-attention with a fused qkv projection.

    EVA has a query and a value bias but no key bias; checkpoints store the fused bias as
    cat(q_bias, zeros, v_bias). We keep it as one ordinary bias (as transformers does), so whatever a
    checkpoint holds in the middle third is used. A key bias cannot change the output anyway: it adds
    q . b_k to every logit of a row, and softmax ignores a per-row constant.
    """

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        D = config.hidden_size
        if D % config.num_attention_heads:
            raise ValueError(f"hidden_size {D} is not a multiple of num_attention_heads {config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)
        self.projection = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, d]
        y = attention(q, k, v, None, scale=None, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.projection(y)


class Blip2MLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.act = activation(config.hidden_act)
        self.act_in_place = activation(config.hidden_act, in_place=True)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        # without autograd, fc1's fresh output is overwritten (no second tensor of [B, L, 4D])
        return self.fc2(self.act(h) if torch.is_grad_enabled() else self.act_in_place(h))


class Blip2EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(D, eps=eps)
        self.self_attn = Blip2Attention(config)
        self.layer_norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = Blip2MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            x = x + self.self_attn(self.layer_norm1(x))
            return x + self.mlp(self.layer_norm2(x))
        # inference: each branch's fresh output takes the residual sum in place (the same sums, x untouched)
        x = self.self_attn(self.layer_norm1(x)).add_(x)
        return self.mlp(self.layer_norm2(x)).add_(x)


class Blip2Encoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Blip2EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor, gradient_checkpointing: bool = False) -> Tensor:
        for layer in self.layers:
            if gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class Blip2VisionModel(SubmodelMixin, nn.Module):
    """The image encoder. Computes in the dtype of its parameters (pixel values are cast to it)."""

    config_class = Blip2VisionConfig
    _blip2_config_key = "vision_config"
    _blip2_prefix = "vision_model."

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Blip2VisionEmbeddings(config)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as transformers does for a fresh model (checkpoints overwrite all of it)."""
        if self.post_layernorm.weight.is_meta:  # built on the meta device for a checkpoint to fill: nothing to draw
            return
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=std)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=std)

    def forward(self, pixel_values: Tensor, interpolate_pos_encoding: bool = False,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None) -> Any:
        """pixel_values [B, 3, H, W] -> ``last_hidden_state`` [B, N+1, D], ``pooler_output`` [B, D] (a
        ``BaseModelOutputWithPooling``; a tuple with ``return_dict=False``).

        ``interpolate_pos_encoding`` resizes the position embeddings (bicubic) for an image size other
        than the one they were trained for; without it such an image is an error.

        As in transformers, ``post_layernorm`` normalises every token of ``last_hidden_state`` and
        then, for ``pooler_output``, the CLS token once more: the pooler is ln(ln(x_cls)). ``hidden_states``
        (asked for) are the embeddings and each layer's output, the last before ``post_layernorm``.
        """
        x = self.embeddings(pixel_values, interpolate_pos_encoding)  # [B, N+1, D]
        with Recorder(self.encoder.layers, output_hidden_states, output_attentions) as rec:
            x = self.encoder(x, gradient_checkpointing=self.gradient_checkpointing and self.training)
        hidden_states = rec.hidden_states(x)
        x = self.post_layernorm(x)  # [B, N+1, D]
        pooled = self.post_layernorm(x[:, 0])  # [B, D]
        return finish(BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled,
                                                 hidden_states=hidden_states, attentions=rec.attentions),
                      return_dict)
