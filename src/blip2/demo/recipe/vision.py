"""Pretraining the image encoder: supervised prediction of the scene from the pixels.

The encoder is our ``Blip2VisionModel`` (so it loads as the BLIP-2 vision tower). Two linear heads,
dropped after pretraining, read its output (``last_hidden_state``, what the Q-Former attends to):

- every patch token predicts the colour, shape and size of the object under it and its place from the
  left (first, second, third), or background;
- the CLS token predicts each object slot left to right (colour, shape, size, or "no object") and the count.

Dense labels teach colour, shape and order everywhere; slot labels teach them per object and the count.
The place label puts the left-to-right order into every patch token: a Q-Former query then finds "the
second object" by content, which is what captions (objects named left to right) need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import Blip2VisionConfig
from blip2.models.vision import Blip2VisionModel
from blip2.demo.world import COLORS, SHAPES, SIZES
from blip2.demo.recipe.data import MAX_OBJECTS, SUB, SceneData, normalize
from blip2.demo.recipe.pretraining import pretraining_loop

__all__ = ["VisionPretrainer", "pretrain_vision", "evaluate_vision"]

# class counts: background / no object + the attribute values
_CLASSES = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
_PATCH_CLASSES = _CLASSES + (MAX_OBJECTS + 1,)  # + place from the left


def sincos_position_table(grid: int, dim: int) -> torch.Tensor:
    """[1 + grid*grid, dim]: 0 for the CLS, then 2D sine-cosine codes of each patch (half the channels
    code the row, half the column, at geometric frequencies), as MAE initialises its ViT."""
    quarter = dim // 4
    freq = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # [dim/4]
    pos = torch.arange(grid, dtype=torch.float64)
    angle = pos[:, None] * freq[None, :]  # [grid, dim/4]
    code = torch.cat([angle.sin(), angle.cos()], dim=1)  # [grid, dim/2]
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)  # [grid*grid, dim or less]
    out = torch.zeros(1 + grid * grid, dim, dtype=torch.float64)
    out[1:, : table.shape[1]] = table
    return out.float()


class VisionPretrainer(nn.Module):
    """The encoder plus the pretraining heads."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.encoder = Blip2VisionModel(config)
        # a ViT trained from scratch on 10k images learns where things are much sooner from 2D sine-cosine
        # positions than from random ones (still trained)
        grid = config.image_size // config.patch_size
        with torch.no_grad():
            self.encoder.embeddings.position_embedding.copy_(sincos_position_table(grid, D)[None])
        self.patch_head = nn.Linear(D, sum(_PATCH_CLASSES) + SUB * SUB)
        self.slot_head = nn.Linear(D, MAX_OBJECTS * sum(_CLASSES) + MAX_OBJECTS + 1)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> patch logits [B, N, C + SUB*SUB] (classes, then occupancy), slot logits [B, MAX_OBJECTS, C],
        count logits [B, MAX_OBJECTS+1]."""
        h = self.encoder(pixel_values).last_hidden_state  # [B, N+1, D]
        patch = self.patch_head(h[:, 1:])
        s = self.slot_head(h[:, 0])
        C = sum(_CLASSES)
        return patch, s[:, : MAX_OBJECTS * C].view(-1, MAX_OBJECTS, C), s[:, MAX_OBJECTS * C:]


def _attribute_losses(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """logits [..., sum(classes)] split by attribute, labels [..., len(classes)] -> mean cross-entropy."""
    parts = logits.split(classes, dim=-1)
    return sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), labels[..., i].reshape(-1))
               for i, p in enumerate(parts)) / len(classes)


def _loss(model: VisionPretrainer, data: SceneData, index: torch.Tensor) -> torch.Tensor:
    patch, slots, count = model(normalize(data.pixels[index]))
    C = sum(_PATCH_CLASSES)
    occupancy = F.binary_cross_entropy_with_logits(patch[..., C:], data.occupancy[index].float())
    return (_attribute_losses(patch[..., :C], data.patch_labels[index], _PATCH_CLASSES) + occupancy
            + _attribute_losses(slots, data.slot_labels[index], _CLASSES) + F.cross_entropy(count, data.counts[index]))


def pretrain_vision(config: Blip2VisionConfig, data: SceneData, steps: int, batch_size: int, lr: float,
                    seed: int = 0, log_every: int = 50) -> VisionPretrainer:
    """Train encoder + heads for ``steps`` batches (``config.initializer_range`` sets the init: use a
    ViT's 0.02, not EVA's 1e-10). The encoder is ``.encoder``; the heads are only for pretraining."""
    torch.manual_seed(seed)
    model = VisionPretrainer(config)
    g = torch.Generator().manual_seed(seed)

    def loss_at(step: int) -> torch.Tensor:
        return _loss(model, data, torch.randint(len(data), (batch_size,), generator=g))

    return pretraining_loop(model, loss_at, steps, lr, 0.05, "vision", log_every)


@torch.no_grad()
def evaluate_vision(model: VisionPretrainer, data: SceneData, batch_size: int = 128) -> dict[str, float]:
    """Accuracy of the pretraining heads: every slot attribute right, and the count right (per image)."""
    model.eval()
    slots_ok, count_ok = 0, 0
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        _, slots, count = model(normalize(data.pixels[index]))
        pred = torch.stack([p.argmax(-1) for p in slots.split(_CLASSES, dim=-1)], dim=-1)  # [B, S, 3]
        slots_ok += int((pred == data.slot_labels[index]).all(-1).all(-1).sum())
        count_ok += int((count.argmax(-1) == data.counts[index]).sum())
    return {"scene_exact": slots_ok / len(data), "count": count_ok / len(data)}
