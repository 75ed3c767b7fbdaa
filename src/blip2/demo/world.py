"""A synthetic world of coloured shapes: scenes, images, captions, questions, datasets.

We train the default small BLIP-2 on it, so everything here is deterministic and checkable.

- A scene holds 1 to 3 non-overlapping objects; each is a circle, square or triangle, one of
  six colours, small or large, on a plain light background. Geometry lives in normalized
  coordinates: the scene is the unit square, x to the right, y down, so it renders at any size.
- Default image: 96x96 px. A ViT with patch 8 sees 12x12 patches; a small object is about
  17 px (2 patches) across, a large one about 33 px (4 patches): size reads clearly.
- Rendering is analytic coverage: each pixel is 4x4 subsamples (box filter), so edges are
  anti-aliased and the pixels come from the same geometry as ``object_mask``.
- Captions name every object in one canonical order, **left to right by centre x**. Any two
  centres are at least ``MIN_DX`` apart in x, so the order is visible in the image.
  Form: "a large red circle", "a large red circle and a small blue square",
  "a small green triangle, a large yellow circle and a small purple square".
- Questions (``type``): ``color`` ("what color is the circle?", asked only when that shape
  occurs once), ``shape`` ("what shape is the blue object?", only when that colour occurs once),
  ``count`` ("how many shapes are there?" -> "two") and ``count_color`` ("how many red shapes
  are there?"), asked for every colour present and, in one scene of three, for one absent
  colour (answer "zero": about 1 in 6 count_color answers). Counts are answered as words.

Checking a model's answers against a scene (``parse_caption``, ``caption_scores``,
``answer_correct``) lives in ``blip2.demo.world_eval``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

__all__ = [
    "SHAPES", "COLORS", "SIZES", "PALETTE", "DEFAULT_SIZE", "COUNT_WORDS", "PERTURBATIONS", "VARIANTS",
    "SceneObject", "Scene", "sample_scene", "object_mask", "render", "caption", "questions",
    "perturb", "render_variant", "write_dataset", "write_examples", "main",
]

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# Nominal fills. Closest pair (yellow/orange) is ~92 apart in RGB; each object's fill is jittered
# by at most COLOR_JITTER per channel (norm <= 26), so it stays nearest its own name, and every
# fill is > 140 from any background (light greys/tints, every channel >= 197).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 50, 170),
    "orange": (245, 125, 20),
}
COLOR_JITTER = 15
# Half-width of an object's bounding box, as a fraction of the scene side: large ~1.9x small.
EXTENT = {"small": (0.085, 0.095), "large": (0.16, 0.18)}
MIN_DX = 0.10  # centres differ by >= this in x (~10 px at 96): left-to-right order is unambiguous
GAP = 0.03  # bounding boxes are >= this apart (in x or in y), so objects never touch
MARGIN = 0.03  # bounding boxes stay this far inside the image
DEFAULT_SIZE = 96
SUPERSAMPLE = 4
COUNT_WORDS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class SceneObject:
    shape: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # one of SIZES
    center: tuple[float, float]  # (x, y) in the unit square, y down
    extent: float  # half-width of the axis-aligned bounding box (unit-square units)
    rgb: tuple[int, int, int]  # fill: PALETTE[color] plus this object's jitter


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # stored left to right
    background: tuple[int, int, int]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objs = tuple(
            SceneObject(o["shape"], o["color"], o["size"], tuple(o["center"]), o["extent"], tuple(o["rgb"]))
            for o in d["objects"]
        )
        return cls(objs, tuple(d["background"]))


# ----------------------------------------------------------------------------- sampling


def _boxes_apart(a: SceneObject, b: SceneObject) -> bool:
    # Each shape lies inside its bounding box, so boxes GAP apart mean shapes GAP apart.
    dx = abs(a.center[0] - b.center[0]) - a.extent - b.extent
    dy = abs(a.center[1] - b.center[1]) - a.extent - b.extent
    return max(dx, dy) >= GAP and abs(a.center[0] - b.center[0]) >= MIN_DX


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """Draw a scene: 1-3 objects (uniform); shape, colour, size and fill jitter uniform and
    independent; positions uniform subject to no overlap (rejection sampling, so crowded
    attribute draws are not under-represented). The result depends only on ``rng``'s state."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
    level = rng.integers(205, 246)  # light tone, slightly tinted
    background = tuple(int(min(255, level + t)) for t in rng.integers(-8, 9, size=3))
    attrs = []
    for _ in range(n):
        shape, color, size = SHAPES[rng.integers(3)], COLORS[rng.integers(6)], SIZES[rng.integers(2)]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(PALETTE[color], jitter))
        attrs.append((shape, color, size, float(rng.uniform(*EXTENT[size])), rgb))
    while True:  # a placement that paints itself into a corner starts over
        objs: list[SceneObject] = []
        for shape, color, size, extent, rgb in attrs:
            lo, hi = MARGIN + extent, 1.0 - MARGIN - extent
            for _ in range(100):
                obj = SceneObject(shape, color, size, (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))), extent, rgb)
                if all(_boxes_apart(obj, o) for o in objs):
                    objs.append(obj)
                    break
            else:
                break
        if len(objs) == n:
            return Scene(tuple(sorted(objs, key=lambda o: o.center[0])), background)


# ----------------------------------------------------------------------------- rendering


def _inside(obj: SceneObject, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean: which points (unit-square coords, broadcastable arrays) the object covers."""
    dx, dy, h = x - obj.center[0], y - obj.center[1], obj.extent
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # triangle: apex (0, -h), base corners (+-h, +h) around the centre; 2|dx| <= dy + h
    return (dy <= h) & (2.0 * np.abs(dx) <= dy + h)


def _layout(size: int | tuple[int, int], content: int | None) -> tuple[int, int, float, float, float]:
    w, h = (size, size) if isinstance(size, int) else size
    side = float(min(w, h) if content is None else content)
    return w, h, side, (w - side) / 2.0, (h - side) / 2.0


def object_mask(obj: SceneObject, size: int | tuple[int, int] = DEFAULT_SIZE, content: int | None = None) -> np.ndarray:
    """[H, W] bool: pixels whose centre the object covers, in the layout ``render`` uses."""
    w, h, side, ox, oy = _layout(size, content)
    x = ((np.arange(w) + 0.5) - ox) / side
    y = ((np.arange(h) + 0.5) - oy) / side
    return _inside(obj, x[None, :], y[:, None])


def render(
    scene: Scene, size: int | tuple[int, int] = DEFAULT_SIZE, content: int | None = None,
    supersample: int = SUPERSAMPLE,
) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` (int or (width, height)).

    The unit square is drawn as a centred square of ``content`` px (default: the shorter side);
    the rest is background, so other aspect ratios or padding never distort or crop a shape.
    """
    w, h, side, ox, oy = _layout(size, content)
    s = supersample
    img = np.empty((h, w, 3), np.float64)
    img[:] = scene.background
    for obj in scene.objects:
        # Only pixels in the object's bounding box (+1 px) change. Coverage = fraction of the
        # s x s subsample centres inside the shape (box filter); objects never overlap, so
        # blending each with the background in turn is exact.
        cx, cy, e = ox + obj.center[0] * side, oy + obj.center[1] * side, obj.extent * side
        x0, x1 = max(0, int(cx - e) - 1), min(w, int(cx + e) + 2)
        y0, y1 = max(0, int(cy - e) - 1), min(h, int(cy + e) + 2)
        x = ((np.arange(x0 * s, x1 * s) + 0.5) / s - ox) / side
        y = ((np.arange(y0 * s, y1 * s) + 0.5) / s - oy) / side
        inside = _inside(obj, x[None, :], y[:, None])  # [(y1-y0)*s, (x1-x0)*s]
        cover = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))[..., None]
        region = img[y0:y1, x0:x1]
        region += cover * (np.asarray(obj.rgb, np.float64) - region)
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- text


def _phrase(o: SceneObject) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def caption(scene: Scene) -> str:
    """Every object, left to right by centre x: "a, b and c" (no Oxford comma, no period)."""
    p = [_phrase(o) for o in sorted(scene.objects, key=lambda o: o.center[0])]
    return p[0] if len(p) == 1 else ", ".join(p[:-1]) + " and " + p[-1]


def questions(scene: Scene) -> list[dict[str, str]]:
    """All questions with their short answers; a pure function of the scene."""
    shapes = Counter(o.shape for o in scene.objects)
    colors = Counter(o.color for o in scene.objects)
    qa = [
        {"question": f"what color is the {o.shape}?", "answer": o.color, "type": "color"}
        for o in scene.objects if shapes[o.shape] == 1
    ]
    qa += [
        {"question": f"what shape is the {o.color} object?", "answer": o.shape, "type": "shape"}
        for o in scene.objects if colors[o.color] == 1
    ]
    qa.append({"question": "how many shapes are there?", "answer": COUNT_WORDS[len(scene.objects)], "type": "count"})
    # "zero" stays rare but covers every colour: one scene in three also gets one absent colour
    # (about 1 in 6 count_color answers is "zero"); which scenes and colours hangs on a hash of
    # the random positions, so this stays a pure function of the scene.
    asked = [c for c in COLORS if c in colors]
    h = zlib.crc32(repr([o.center for o in scene.objects]).encode())
    if h % 3 == 0:
        absent = [c for c in COLORS if c not in colors]
        asked.append(absent[(h // 3) % len(absent)])
    for c in asked:
        qa.append({"question": f"how many {c} shapes are there?", "answer": COUNT_WORDS[colors[c]], "type": "count_color"})
    return qa


# ----------------------------------------------------------------------------- robustness


def _resize(w: int, h: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    return lambda im, rng: im.resize((w, h), Image.Resampling.LANCZOS)


def _pad(side: int) -> Callable[[Image.Image, np.random.Generator], Image.Image]:
    def pad(im: Image.Image, rng: np.random.Generator) -> Image.Image:
        out = Image.new("RGB", (max(side, im.width), max(side, im.height)), im.getpixel((0, 0)))
        out.paste(im, ((out.width - im.width) // 2, (out.height - im.height) // 2))
        return out
    return pad


def _jpeg(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(30, 71)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _blur(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.4, 1.0))))


def _brightness(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    shift = int(rng.choice([-1, 1]) * rng.integers(8, 21))  # never a no-op
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + shift, 0, 255).astype(np.uint8), "RGB")


# Image-level perturbations: name -> fn(image, rng) -> RGB image. Sizes change only as named.
PERTURBATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "resize_80x60": _resize(80, 60),  # other aspect ratio (stretches the picture)
    "resize_64": _resize(64, 64),
    "resize_128": _resize(128, 128),
    "pad_128": _pad(128),  # centred on a 128x128 canvas of the background colour
    "jpeg": _jpeg,  # quality 30..70
    "blur": _blur,  # Gaussian, radius 0.4..1.0 px
    "brightness": _brightness,  # all channels shifted by +-(8..20)
}
# Scene-level redraws (no resampling; aspect-preserving): name -> (canvas size, content side)
_REDRAWS: dict[str, tuple[tuple[int, int], int | None]] = {
    "canvas_80x60": ((80, 60), None),
    "canvas_128_pad": ((128, 128), DEFAULT_SIZE),
    "canvas_64": ((64, 64), None),
}
VARIANTS = ("clean",) + tuple(_REDRAWS) + tuple(PERTURBATIONS)


def perturb(image: Image.Image, rng: np.random.Generator, name: str | None = None) -> Image.Image:
    """Apply the named perturbation (one drawn uniformly from ``PERTURBATIONS`` when None)."""
    name = list(PERTURBATIONS)[rng.integers(len(PERTURBATIONS))] if name is None else name
    return PERTURBATIONS[name](image.convert("RGB"), rng)


def render_variant(scene: Scene, name: str, rng: np.random.Generator, size: int = DEFAULT_SIZE) -> Image.Image:
    """The scene drawn as variant ``name`` (one of ``VARIANTS``): clean, redrawn on another
    canvas, or rendered at ``size`` and then perturbed."""
    if name == "clean":
        return render(scene, size)
    if name in _REDRAWS:
        return render(scene, *_REDRAWS[name])
    if name in PERTURBATIONS:
        return perturb(render(scene, size), rng, name)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


# ----------------------------------------------------------------------------- datasets


def _scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One independent stream per image: image i does not depend on n, and splits differ.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def write_dataset(
    out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train",
    size: int = DEFAULT_SIZE, variant: str = "clean",
) -> str:
    """Write ``n`` images with manifests under ``out_dir/split``; return that directory.

    Files: ``images/{split}_{i:06d}.png``, ``captions.jsonl`` (``{"image", "caption"}``),
    ``vqa.jsonl`` (``{"image", "question", "answer", "type"}``), ``scenes.jsonl``
    (``{"image", "variant", "scene"}`` for checking answers). Image paths are relative to
    the manifests' directory. Same arguments -> byte-identical files. ``variant`` (one of
    ``VARIANTS``, or "random" for one drawn per image) changes only how the scenes are
    drawn: the same seed and split give the same scenes, captions and questions.
    """
    if variant != "random" and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS} or 'random'")
    root = os.path.join(os.fspath(out_dir), split)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with (open(os.path.join(root, "captions.jsonl"), "w") as fc,
          open(os.path.join(root, "vqa.jsonl"), "w") as fq,
          open(os.path.join(root, "scenes.jsonl"), "w") as fs):
        for i in range(n):
            scene = sample_scene(_scene_rng(seed, split, i))
            # a separate stream for drawing, so the variant never changes the scene
            draw_rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i, 1])
            name = VARIANTS[1 + draw_rng.integers(len(VARIANTS) - 1)] if variant == "random" else variant
            rel = f"images/{split}_{i:06d}.png"
            render_variant(scene, name, draw_rng, size).save(os.path.join(root, rel), "PNG")
            fc.write(json.dumps({"image": rel, "caption": caption(scene)}) + "\n")
            for qa in questions(scene):
                fq.write(json.dumps({"image": rel, **qa}) + "\n")
            fs.write(json.dumps({"image": rel, "variant": name, "scene": scene.to_dict()}) + "\n")
    return root


def write_examples(out_dir: str | os.PathLike, seed: int = 2, size: int = DEFAULT_SIZE) -> dict[str, str]:
    """Six example images (two each with 1, 2, 3 objects) plus ``captions.json``; returns it.
    (Seed 2, the default and the bundled set, shows every colour, shape and size.)"""
    os.makedirs(out_dir, exist_ok=True)
    captions = {}
    for k in range(6):
        scene = sample_scene(np.random.default_rng([seed, 7, k]), n_objects=k // 2 + 1)
        name = f"example_{k + 1}.png"
        render(scene, size).save(os.path.join(out_dir, name), "PNG")
        captions[name] = caption(scene)
    with open(os.path.join(out_dir, "captions.json"), "w") as f:
        json.dump(captions, f, indent=2)
        f.write("\n")
    return captions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m blip2.demo.world",
        description="Write a synthetic shapes dataset: OUT/SPLIT/images/*.png, captions.jsonl, vqa.jsonl, scenes.jsonl.",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0; 2 with --examples)")
    p.add_argument("--split", default="train", help="split name, also a subdirectory (default train)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"image side in px (default {DEFAULT_SIZE})")
    p.add_argument("--variant", default="clean", choices=VARIANTS + ("random",),
                   help="how scenes are drawn, for robustness evaluation (default clean)")
    p.add_argument("--examples", action="store_true", help="write the six example images and captions.json to OUT instead")
    a = p.parse_args(argv)
    if a.examples:
        for name, text in write_examples(a.out, 2 if a.seed is None else a.seed, a.size).items():
            print(f"{name}: {text}")
    else:
        print(write_dataset(a.out, a.n, a.seed or 0, a.split, a.size, a.variant))


if __name__ == "__main__":
    main()
