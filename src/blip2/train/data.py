"""Training data: where examples come from, augmentation, global batches.

Sources (``load_records``; reading each kind: ``sources.py`` and ``tables.py``):

- JSONL manifests (``*.jsonl``, ``*.json``): one object per line, ``{"image": path, "caption": text}`` or
  ``{"image": path, "question": text, "answer": text}``, paths relative to the manifest.
- Tar shards as webdataset writes them: ``*.tar``, gzip-compressed ``*.tar.gz`` / ``*.tgz``, a directory of
  them, or a brace list (``shards-{000..009}.tar``).
- Tables with an image column: ``*.csv`` (image paths), ``*.parquet`` (paths or bytes), a Hugging Face
  ``datasets.Dataset`` (or ``DatasetDict``: its train split) in Python, a folder written by its ``save_to_disk``.

A line, entry or row that cannot be used is skipped and counted, and logged with its file and line or row;
an image that cannot be decoded at training time is replaced by the next record and counted. Neither stops a
run. A source that cannot be read at all raises, naming the file.

Every sample is addressed by a global key ``epoch * len(dataset) + index``; its augmentation draws from
a generator seeded by (seed, key). So a sample looks the same whatever rank, worker or resumed run reads
it, which makes runs reproducible and resumable bit for bit.

``GlobalBatchSampler`` cuts the data into global batches (one shuffle per epoch, from the seed) and gives
each rank its contiguous slice: rank r of W reads rows ``r*b .. r*b+b-1`` of each global batch of
``W*b``, so the gathered batch is the same as a single process would read.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from blip2.images import Blip2ImageProcessor, ImageLoadError, load_image
from blip2.train.sources import GZIP_SHARDS, Record, decode_image, expand_braces, read_manifest, read_shards
from blip2.train.tables import is_dataset, is_saved_dataset, read_csv, read_dataset, read_parquet

__all__ = [
    "FeatureDataset",
    "GlobalBatchSampler",
    "ImageTextDataset",
    "Record",
    "TrainTransform",
    "collate",
    "load_records",
    "read_manifest",
    "read_shards",
]

logger = logging.getLogger("blip2.train")

MAX_IMAGE_RETRIES = 16  # consecutive undecodable images before a batch gives up
SHARDS = (".tar", *GZIP_SHARDS)


def load_records(sources: Any, task: str = "caption", columns: dict[str, str] | None = None
                 ) -> tuple[list[Record], int]:
    """Records from one source or a list of them (see the module doc): file paths, directories, brace
    patterns, ``datasets.Dataset`` objects. ``columns`` names the columns of tables (``tables.py``).
    Returns (records, how many lines / entries / rows were skipped)."""
    if isinstance(sources, (str, os.PathLike)) or is_dataset(sources):
        sources = [sources]
    records: list[Record] = []
    skipped = 0
    for source in sources:
        got, bad = _read_source(source, task, columns)
        records += got
        skipped += bad
    if not records:
        names = [s if isinstance(s, str) else type(s).__name__ for s in sources]
        raise ValueError(f"no usable training examples in {names} ({skipped} skipped)")
    return records, skipped


def _read_source(source: Any, task: str, columns: dict[str, str] | None) -> tuple[list[Record], int]:
    if is_dataset(source):
        return read_dataset(source, task, columns)
    source = os.fspath(source)
    paths = expand_braces(source)
    if len(paths) > 1 or paths[0] != source:  # a brace list: each file must be there
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no such file (from {source}, {len(missing)} of {len(paths)} missing)")
        return _read_files(paths, task, columns)
    if is_saved_dataset(source):
        return read_dataset(source, task, columns)
    if os.path.isdir(source):
        shards = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(SHARDS))
        if not shards:
            raise ValueError(f"{source}: a directory without tar shards ({', '.join(SHARDS)}) that datasets' "
                             "save_to_disk did not write either")
        return read_shards(shards, task)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    return _read_files([source], task, columns)


def _read_files(paths: list[str], task: str, columns: dict[str, str] | None) -> tuple[list[Record], int]:
    records: list[Record] = []
    skipped = 0
    for path in paths:
        if path.endswith(SHARDS):
            got, bad = read_shards([path], task)
        elif path.endswith(".csv"):
            got, bad = read_csv(path, task, columns)
        elif path.endswith(".parquet"):
            got, bad = read_parquet(path, task, columns)
        else:
            got, bad = read_manifest(path, task)
        records += got
        skipped += bad
    return records, skipped


# -- images ---------------------------------------------------------------------------------------------


def random_resized_crop(image: Image.Image, size: tuple[int, int], scale: tuple[float, float],
                        rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop (area fraction in ``scale``, aspect in ``ratio``), bicubic, to (W, H)."""
    W, H = image.size
    area = W * H
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            x = int(rng.integers(0, W - w + 1))
            y = int(rng.integers(0, H - h + 1))
            break
    else:  # no fit in 10 tries: the largest centred crop with a clamped aspect ratio
        aspect = W / H
        if aspect < ratio[0]:
            w, h = W, int(round(W / ratio[0]))
        elif aspect > ratio[1]:
            w, h = int(round(H * ratio[1])), H
        else:
            w, h = W, H
        x, y = (W - w) // 2, (H - h) // 2
    return image.resize(size, Image.Resampling.BICUBIC, box=(x, y, x + w, y + h))


class TrainTransform:
    """The paper's training augmentation, then the model's image processor (resize, rescale, normalise).

    LAVIS ``blip2_image_train``: RandomResizedCrop(scale=(0.5, 1.0), bicubic) and a horizontal flip with
    probability 0.5. ``hflip=False`` for data whose text depends on left and right (the synthetic world's
    captions list objects left to right). ``augment=False``: the processor alone, as at evaluation.
    """

    def __init__(self, image_processor: Blip2ImageProcessor, *, augment: bool = True, hflip: bool = True,
                 scale: tuple[float, float] = (0.5, 1.0)) -> None:
        self.image_processor = image_processor
        self.augment, self.hflip, self.scale = augment, hflip, tuple(scale)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if self.augment:
            size = (self.image_processor.size["width"], self.image_processor.size["height"])
            image = random_resized_crop(image, size, self.scale, rng)  # type: ignore[arg-type]
            if self.hflip and rng.random() < 0.5:
                image = ImageOps.mirror(image)
        return torch.from_numpy(self.image_processor.preprocess(image))  # [3, H, W]


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset over ``Record``s; item ``key`` = ``epoch * len(self) + index`` (see module doc).

    ``skipped``: records already dropped while reading the sources, reported with the run's metrics.
    """

    def __init__(self, records: Sequence[Record], transform: TrainTransform, seed: int = 0, skipped: int = 0) -> None:
        if not records:
            raise ValueError("an ImageTextDataset needs at least one record")
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.skipped = skipped
        self._files: dict[str, Any] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, record: Record) -> Image.Image:
        if record.table is not None:
            return record.table.image(record.row)
        if record.member is None:
            return load_image(record.image)  # type: ignore[return-value]  # a path gives a PIL image
        if self._pid != os.getpid():  # file handles are per process (DataLoader workers fork)
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(record.image)
        if f is None:
            f = self._files[record.image] = open(record.image, "rb")
        offset, size = record.member
        f.seek(offset)
        return decode_image(f.read(size), f"{record.image}@{offset}")

    def __getitem__(self, key: int) -> dict[str, Any]:
        n = len(self.records)
        index = key % n
        bad = 0
        for attempt in range(MAX_IMAGE_RETRIES):
            record = self.records[(index + attempt) % n]
            try:
                image = self._read(record)
                break
            except (ImageLoadError, OSError) as e:
                logger.warning("skipped an image: %s", e)
                bad += 1
        else:
            raise RuntimeError(f"{MAX_IMAGE_RETRIES} unreadable images in a row from record {index}: check the data")
        pixels = self.transform(image, np.random.default_rng([self.seed, key]))
        return {"pixel_values": pixels, "caption": record.caption, "question": record.question,
                "answer": record.answer, "prefix": record.prefix, "negative": record.negative, "key": key,
                "bad": bad}


class FeatureDataset(torch.utils.data.Dataset):
    """Records with the frozen image encoder's output computed once: ``vision_states`` instead of pixels.

    With a frozen encoder the training gradients are the same as running it every step, at a fraction of
    the cost; the price is no augmentation (each image is seen as encoded). vision_states [N_images, N+1, Dv]
    are the encoder's hidden states before its output LayerNorm (``common.vision_states``; that
    LayerNorm trains in both stages). ``image_index[i]``: the row of record i (several records, e.g. a
    caption and questions, may share an image); default: record i is row i.
    """

    def __init__(self, vision_states: torch.Tensor, records: Sequence[Record],
                 image_index: Sequence[int] | None = None) -> None:
        if not records:
            raise ValueError("a FeatureDataset needs at least one record")
        index = list(range(len(records))) if image_index is None else [int(i) for i in image_index]
        if len(index) != len(records):
            raise ValueError(f"image_index has {len(index)} entries for {len(records)} records")
        bad = [i for i in index if not 0 <= i < len(vision_states)]
        if bad:
            raise ValueError(f"image_index {bad[0]} is outside the {len(vision_states)} rows of vision_states")
        self.vision_states, self.records, self.image_index = vision_states, list(records), index
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int) -> dict[str, Any]:
        index = key % len(self.records)
        r = self.records[index]
        return {"vision_states": self.vision_states[self.image_index[index]], "caption": r.caption,
                "question": r.question, "answer": r.answer, "prefix": r.prefix, "negative": r.negative,
                "key": key, "bad": 0}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pixel values [b, 3, H, W] (or cached vision states [b, N+1, Dv]); text fields as lists;
    keys [b]; ``bad`` summed."""
    images = "pixel_values" if "pixel_values" in samples[0] else "vision_states"
    return {
        images: torch.stack([s[images] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "question": [s["question"] for s in samples],
        "answer": [s["answer"] for s in samples],
        "prefix": [s.get("prefix") for s in samples],
        "negative": [s.get("negative") for s in samples],
        "key": torch.tensor([s["key"] for s in samples], dtype=torch.long),
        "bad": sum(s["bad"] for s in samples),
    }


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's keys of every global batch, without end, starting at micro-batch ``start``.

    Global batch j of epoch e holds positions ``j*G .. j*G+G-1`` of a permutation of the dataset drawn
    from (seed, e); an epoch is ``len // G`` batches (the remainder is dropped, as LAVIS's sampler does).
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 start: int = 0) -> None:
        if global_batch % world:
            raise ValueError(f"the global batch {global_batch} must be a multiple of the world size {world}")
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} examples are fewer than one global batch of {global_batch}")
        self.n, self.G, self.rank, self.world, self.seed, self.start = num_samples, global_batch, rank, world, seed, start
        self.per_epoch = num_samples // global_batch

    def __iter__(self) -> Iterator[list[int]]:
        local = self.G // self.world
        epoch, perm = -1, np.empty(0, dtype=np.int64)
        batch = self.start
        while True:
            e, j = divmod(batch, self.per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([self.seed, 1, e]).permutation(self.n)
            rows = perm[j * self.G + self.rank * local: j * self.G + (self.rank + 1) * local]
            yield [epoch * self.n + int(i) for i in rows]
            batch += 1
