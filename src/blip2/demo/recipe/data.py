"""Training data for the demo recipe: scenes from ``blip2.demo.world``, rendered and preprocessed in memory.

Images are kept as uint8 [N, 3, S, S] after the processor's resize (PIL bicubic to S x S), and
normalised per batch exactly as ``Blip2ImageProcessor`` does (rescale 1/255, CLIP mean/std). A share
of the images is drawn as one of ``world.VARIANTS`` (other canvas sizes and aspect ratios, padding,
JPEG, blur, brightness): the augmentation that makes the model robust to images not drawn by the
generator. Labels for the image encoder's pretraining come from the scene geometry:

- per patch: which object (if any) covers the patch centre in the *processed* image, as colour,
  shape and size classes and its place from the left (1, 2, 3; 0 = background everywhere);
- per slot (objects left to right, 3 slots) the same three classes (0 = no object), and the count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from blip2.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from blip2.demo.world import COLORS, DEFAULT_SIZE, SHAPES, SIZES, VARIANTS, Scene, _inside, caption, questions, render_variant, sample_scene

__all__ = ["SceneData", "make_scene_data", "normalize", "variant_layout", "MAX_OBJECTS"]

MAX_OBJECTS = 3
# Where the unit square lands on each variant's canvas before the processor resizes it: (width, height,
# content side, x offset, y offset) in canvas pixels. Perturbations of the 96 px render keep its layout,
# except padding onto a 128 px canvas.
_CLEAN = (DEFAULT_SIZE, DEFAULT_SIZE, DEFAULT_SIZE, 0.0, 0.0)
_LAYOUTS = {"canvas_80x60": (80, 60, 60, 10.0, 0.0), "canvas_128_pad": (128, 128, 96, 16.0, 16.0),
            "pad_128": (128, 128, 96, 16.0, 16.0)}


def variant_layout(name: str) -> tuple[int, int, int, float, float]:
    return _LAYOUTS.get(name, _CLEAN)


@dataclass
class SceneData:
    scenes: list[Scene]
    pixels: torch.Tensor  # uint8 [N, 3, S, S], as the processor resizes them
    patch_labels: torch.Tensor  # int64 [N, G*G, 4]: colour, shape, size, place from the left per patch (0 = background)
    occupancy: torch.Tensor  # bool [N, G*G, SUB*SUB]: which of SUB x SUB points spread over each patch an object covers
    slot_labels: torch.Tensor  # int64 [N, MAX_OBJECTS, 3]: the same per object left to right (0 = none)
    counts: torch.Tensor  # int64 [N]
    captions: list[str]
    qa: list[list[dict[str, str]]]  # per image: {"question", "answer", "type"}

    def __len__(self) -> int:
        return len(self.scenes)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the processor's float32 pixel_values (rescale, then CLIP mean/std)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


SUB = 4  # occupancy points per patch side


def _occupancy(scene: Scene, layout: tuple[int, int, int, float, float], grid: int) -> np.ndarray:
    """[grid*grid, SUB*SUB] bool: the object outline at sub-patch resolution (the pretraining target that
    teaches patch tokens the local geometry shapes are told apart by)."""
    w, h, side, ox, oy = layout
    u = (np.arange(grid * SUB) + 0.5) / (grid * SUB)
    x = (u * w - ox) / side
    y = (u * h - oy) / side
    covered = np.zeros((grid * SUB, grid * SUB), bool)
    for obj in scene.objects:
        covered |= _inside(obj, x[None, :], y[:, None])
    # [gy, sy, gx, sx] -> [gy, gx, sy, sx]
    return covered.reshape(grid, SUB, grid, SUB).transpose(0, 2, 1, 3).reshape(grid * grid, SUB * SUB)


def _patch_labels(scene: Scene, layout: tuple[int, int, int, float, float], grid: int) -> np.ndarray:
    """[grid*grid, 4] colour/shape/size classes and place from the left of the object under each patch
    centre (0 = none)."""
    w, h, side, ox, oy = layout
    u = (np.arange(grid) + 0.5) / grid  # patch centres in the processed (square) image, [0, 1]
    x = (u * w - ox) / side  # -> unit-square scene coordinates of the canvas
    y = (u * h - oy) / side
    out = np.zeros((grid, grid, 4), np.int64)
    for place, obj in enumerate(scene.objects, 1):  # stored left to right
        inside = _inside(obj, x[None, :], y[:, None])  # [grid, grid]
        out[inside] = (COLORS.index(obj.color) + 1, SHAPES.index(obj.shape) + 1, SIZES.index(obj.size) + 1, place)
    return out.reshape(grid * grid, 4)


def make_scene_data(n: int, seed: int, variant_share: float = 0.5, image_size: int = DEFAULT_SIZE,
                    patch_size: int = 8) -> SceneData:
    """``n`` random scenes (stream ``seed``), a ``variant_share`` of them drawn as a random variant."""
    rng = np.random.default_rng(seed)
    grid = image_size // patch_size
    scenes, pixels, patches, occupancy, slots, counts, caps, qas = [], [], [], [], [], [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        name = VARIANTS[1 + rng.integers(len(VARIANTS) - 1)] if rng.random() < variant_share else "clean"
        image = render_variant(scene, name, rng)
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        pixels.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
        patches.append(_patch_labels(scene, variant_layout(name), grid))
        occupancy.append(_occupancy(scene, variant_layout(name), grid))
        slot = np.zeros((MAX_OBJECTS, 3), np.int64)
        for k, o in enumerate(scene.objects):
            slot[k] = (COLORS.index(o.color) + 1, SHAPES.index(o.shape) + 1, SIZES.index(o.size) + 1)
        slots.append(slot)
        counts.append(len(scene.objects))
        scenes.append(scene)
        caps.append(caption(scene))
        qas.append(questions(scene))
    return SceneData(scenes, torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(patches)),
                     torch.from_numpy(np.stack(occupancy)), torch.from_numpy(np.stack(slots)), torch.tensor(counts), caps, qas)
