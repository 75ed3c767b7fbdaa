"""Pieces both training stages share: which parts are frozen, the image encoder pass, data and files."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from blip2.images import Blip2ImageProcessor
from blip2.processing import Blip2Processor
from blip2.models.vision import Blip2VisionModel
from blip2.train.data import FeatureDataset, ImageTextDataset, TrainTransform, load_records
from blip2.train.presets import TrainConfig

__all__ = ["autocast", "encode_image", "frozen_vision_modules", "image_inputs", "make_dataset", "save_processor",
           "vision_states"]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for ``dtype`` on the device's type; no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def frozen_vision_modules(vision: Blip2VisionModel) -> list[nn.Module]:
    """What "frozen image encoder" freezes: the ViT, not its output LayerNorm.

    LAVIS freezes ``visual_encoder`` and trains ``ln_vision``, the LayerNorm on the ViT output that the
    Q-Former reads; in the Hugging Face layout that LayerNorm is ``vision_model.post_layernorm``.
    """
    return [vision.embeddings, vision.encoder]


def encode_image(vision: Blip2VisionModel, pixel_values: Tensor | None, autocast_dtype: torch.dtype | None,
                 states: Tensor | None = None) -> Tensor:
    """The image features the Q-Former attends to, [B, N+1, Dv] in the dtype of ``post_layernorm``.

    The ViT runs under autocast, and without building a graph when it is frozen; ``post_layernorm``
    (trained in both stages) runs outside autocast. ``states``: the frozen ViT's output computed
    beforehand (``vision_states``, e.g. by a ``FeatureDataset``), used instead of ``pixel_values``.
    """
    device = vision.post_layernorm.weight.device
    if states is None:
        if pixel_values is None:
            raise ValueError("encode_image needs pixel_values or precomputed vision states")
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in vision.encoder.parameters())
        with autocast(device, autocast_dtype), torch.set_grad_enabled(trains):
            x = vision.embeddings(pixel_values.to(device))  # [B, N+1, Dv]
            states = vision.encoder(x, gradient_checkpointing=vision.gradient_checkpointing and vision.training)
    elif any(p.requires_grad for p in vision.encoder.parameters()):
        raise ValueError("precomputed vision states need a frozen image encoder (freeze_vision=True)")
    return vision.post_layernorm(states.to(device, vision.post_layernorm.weight.dtype))


@torch.no_grad()
def vision_states(vision: Blip2VisionModel, pixel_values: Tensor, batch_size: int = 64) -> Tensor:
    """The frozen ViT's hidden states before ``post_layernorm`` for pixel_values [N, 3, H, W] -> [N, N_tok, Dv]
    (on the CPU): what a ``FeatureDataset`` holds."""
    was_training = vision.training
    vision.eval()
    device = vision.post_layernorm.weight.device
    out = [vision.encoder(vision.embeddings(pixel_values[i:i + batch_size].to(device))).cpu()
           for i in range(0, len(pixel_values), batch_size)]
    vision.train(was_training)
    return torch.cat(out)


def image_inputs(batch: dict) -> dict[str, Tensor | None]:
    """The image arguments of a trainee's forward for a collated batch: pixels, or cached states."""
    if "vision_states" in batch:
        return {"pixel_values": None, "vision_states": batch["vision_states"]}
    return {"pixel_values": batch["pixel_values"]}


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model")


def save_processor(processor: Blip2Processor, directory: str, source: str | None = None) -> None:
    """The processor files of a trained model: copied unchanged from ``source`` (the checkpoint training
    started from) when it has them, else written by ``processor.save_pretrained``."""
    copied = False
    if source is not None:
        for name in PROCESSOR_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(os.path.join(directory, name)):
                shutil.copyfile(path, os.path.join(directory, name))
                copied = copied or name == "tokenizer.json"
    if not copied:
        processor.save_pretrained(directory)


def make_dataset(data: ImageTextDataset | FeatureDataset | Sequence[str] | str, image_processor: Blip2ImageProcessor,
                 config: TrainConfig) -> ImageTextDataset | FeatureDataset:
    """``data`` as a dataset: an ImageTextDataset or FeatureDataset as it is, or manifests / tar shards read for ``config.task``
    with the training augmentation of ``config`` in front of ``image_processor``."""
    if isinstance(data, FeatureDataset) and not config.freeze_vision:
        raise ValueError("a FeatureDataset holds a frozen encoder's output: it needs freeze_vision=True")
    if isinstance(data, (ImageTextDataset, FeatureDataset)):
        return data
    records, skipped = load_records(data, config.task)
    transform = TrainTransform(image_processor, augment=config.augment, hflip=config.hflip, scale=config.crop_scale)
    return ImageTextDataset(records, transform, seed=config.seed, skipped=skipped)
