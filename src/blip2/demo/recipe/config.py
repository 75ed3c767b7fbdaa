"""Sizes and schedules of the demo recipe: ``full`` (the bundled model) and ``quick`` (a seconds-long check)."""

from __future__ import annotations

from dataclasses import dataclass

from blip2.config import Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

__all__ = ["RecipeConfig", "full", "quick"]


@dataclass
class RecipeConfig:
    vision: Blip2VisionConfig
    qformer: Blip2QFormerConfig
    lm: OPTConfig
    num_query_tokens: int
    n_train: int  # training scenes, rendered once (each step samples batches from them)
    n_val: int  # held-out scenes for the progress reports
    variant_share: float = 0.5  # share of training images drawn as a robustness variant
    seed: int = 0
    # (steps, batch size, peak learning rate) of each training step of the recipe
    vision_schedule: tuple[int, int, float] = (8000, 48, 1e-3)
    lm_schedule: tuple[int, int, float] = (5000, 32, 2e-3)
    stage1_schedule: tuple[int, int, float] = (1500, 32, 1e-3)
    stage2_schedule: tuple[int, int, float] = (4000, 32, 1e-3)
    log_every: int = 250


def _vision(hidden: int, layers: int, heads: int, patch: int) -> Blip2VisionConfig:
    # initializer_range 0.02: a ViT trained from scratch (EVA's 1e-10 is for loading checkpoints)
    return Blip2VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=96, patch_size=patch, initializer_range=0.02)


def _qformer(hidden: int, layers: int, heads: int, vocab: int, vision_width: int) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=64,
                              cross_attention_frequency=1, encoder_hidden_size=vision_width,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_qformer_text_input=True)


def _opt(hidden: int, layers: int, heads: int, ffn: int, vocab: int) -> OPTConfig:
    return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn,
                     num_attention_heads=heads, max_position_embeddings=96, dropout=0.0,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)


def full(vocab: int) -> RecipeConfig:
    """The bundled demo model (about 2.6M parameters)."""
    return RecipeConfig(vision=_vision(128, 4, 4, 12), qformer=_qformer(96, 4, 4, vocab, 128),
                        lm=_opt(128, 3, 4, 512, vocab), num_query_tokens=16, n_train=10000, n_val=200)


def quick(vocab: int) -> RecipeConfig:
    """Tiny sizes and a few steps of every stage: the whole pipeline in seconds (tests, smoke runs)."""
    return RecipeConfig(vision=_vision(32, 1, 2, 12), qformer=_qformer(32, 2, 2, vocab, 32),
                        lm=_opt(32, 1, 2, 64, vocab), num_query_tokens=4, n_train=64, n_val=16,
                        vision_schedule=(3, 8, 1e-3), lm_schedule=(3, 8, 1e-3), stage1_schedule=(3, 8, 1e-3),
                        stage2_schedule=(3, 8, 1e-3), log_every=1)
