"""Training data: JSONL manifests and webdataset-style tar shards, augmentation, global batches.

Sources (``load_records``):

- JSONL manifest, one object per line: ``{"image": path, "caption": text}`` (captioning, stage 1 and 2)
  or ``{"image": path, "question": text, "answer": text}`` (VQA); paths relative to the manifest's
  directory. Other keys are ignored.
- Tar shards (``*.tar``, or a directory of them): members ``KEY.jpg``/``KEY.png``/... with ``KEY.json``
  (an object with the fields above, no "image") or ``KEY.txt`` (a caption), as webdataset writes them.
  Read with the standard ``tarfile`` module; the shards are indexed once (headers and the small text
  members) and images are then read by offset, so shards need to be uncompressed ``.tar`` files.

A line or shard entry that cannot be used (bad JSON, missing field, no image or text) is skipped and
counted; an image that cannot be decoded at training time is replaced by the next record and counted.
Neither stops a run.

Every sample is addressed by a global key ``epoch * len(dataset) + index``; its augmentation draws from
a generator seeded by (seed, key). So a sample looks the same whatever rank, worker or resumed run reads
it, which makes runs reproducible and resumable bit for bit.

``GlobalBatchSampler`` cuts the data into global batches (one shuffle per epoch, from the seed) and gives
each rank its contiguous slice: rank r of W reads rows ``r*b .. r*b+b-1`` of each global batch of
``W*b``, so the gathered batch is the same as a single process would read.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from blip2.images import Blip2ImageProcessor, ImageLoadError, load_image, read_image

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

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_IMAGE_RETRIES = 16  # consecutive undecodable images before a batch gives up


@dataclass(frozen=True)
class Record:
    """One training example. ``member`` = (offset, size) of the image inside the tar file ``image``."""

    image: str
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    member: tuple[int, int] | None = None
    # stage 2 with ``TrainConfig.prefix_loss_weight``: a text the projected queries are pulled toward,
    # token by token (e.g. the image's description in the words the LM reads); None: no such loss
    prefix: str | None = None
    # stage 1: a caption that does not match the image (a hard negative, e.g. one word changed), which ITM
    # scores as a non-match besides the negatives drawn from the batch; None: only those
    negative: str | None = None


def _fields(obj: Any, task: str) -> dict[str, str] | None:
    """The text fields ``task`` needs from a JSON object, or None when they are missing or not strings."""
    if not isinstance(obj, dict):
        return None
    if task == "mixed":  # a question-answer pair when the object has one, else a caption
        qa = all(isinstance(obj.get(n), str) and obj[n].strip() for n in ("question", "answer"))
        task = "vqa" if qa else "caption"
    names = ("caption",) if task == "caption" else ("question", "answer")
    values = {n: obj.get(n) for n in names}
    if not all(isinstance(v, str) and v.strip() for v in values.values()):
        return None
    fields = {n: v.strip() for n, v in values.items()}
    for name in ("prefix", "negative"):  # optional: the prefix alignment text, a hard negative caption
        value = obj.get(name)
        if isinstance(value, str) and value.strip():
            fields[name] = value.strip()
    return fields


def _needs(task: str) -> str:
    return {"caption": '"caption"', "vqa": '"question" and "answer"'}.get(task, '"caption", or "question" and "answer"')


def read_manifest(path: str, task: str = "caption") -> tuple[list[Record], int]:
    """Records of a JSONL manifest and the number of lines skipped (blank lines are not counted)."""
    root = os.path.dirname(os.path.abspath(path))
    records: list[Record] = []
    skipped = 0
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is skipped on its own, not the whole file
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                logger.warning("%s:%d: skipped, not UTF-8 (byte %#04x at column %d)", path, lineno, raw[e.start],
                               e.start + 1)
                skipped += 1
                continue
            except json.JSONDecodeError as e:
                logger.warning("%s:%d: skipped, not JSON (%s)", path, lineno, e)
                skipped += 1
                continue
            fields = _fields(obj, task)
            image = obj.get("image") if isinstance(obj, dict) else None
            if fields is None or not isinstance(image, str) or not image:
                logger.warning("%s:%d: skipped, needs \"image\" and %s", path, lineno, _needs(task))
                skipped += 1
                continue
            records.append(Record(os.path.join(root, image), **fields))
    return records, skipped


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's naming: "dir/000123.jpg" -> ("dir/000123", "jpg"); the extension starts at the first dot."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def read_shards(paths: Sequence[str], task: str = "caption") -> tuple[list[Record], int]:
    """Records of uncompressed tar shards and the number of entries skipped."""
    records: list[Record] = []
    skipped = 0
    for path in paths:
        groups: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    if not info.isfile():
                        continue
                    key, ext = _split_key(info.name)
                    group = groups.setdefault(key, {})
                    if ext in IMAGE_EXTENSIONS:
                        group["image"] = (info.offset_data, info.size)
                    elif ext in ("json", "txt"):
                        data = tf.extractfile(info)
                        group[ext] = data.read() if data is not None else b""
        except tarfile.ReadError as e:
            raise ValueError(f"{path}: not an uncompressed tar shard ({e}); compressed shards cannot be read "
                             "by offset, unpack them to .tar") from None
        for key, group in groups.items():
            fields: dict[str, str] | None = None
            try:
                if "json" in group:
                    fields = _fields(json.loads(group["json"]), task)
                elif "txt" in group and task in ("caption", "mixed"):
                    fields = _fields({"caption": group["txt"].decode("utf-8")}, task)
            except (json.JSONDecodeError, UnicodeDecodeError):
                fields = None
            if fields is None or "image" not in group:
                logger.warning("%s: %s skipped, needs an image and its text", path, key)
                skipped += 1
                continue
            records.append(Record(path, member=group["image"], **fields))
    return records, skipped


def load_records(sources: Sequence[str] | str, task: str = "caption") -> tuple[list[Record], int]:
    """Records from manifests (``*.jsonl``/``*.json``), tar shards (``*.tar``) and directories of shards."""
    if isinstance(sources, str):
        sources = [sources]
    records: list[Record] = []
    skipped = 0
    for source in sources:
        if os.path.isdir(source):
            shards = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".tar"))
            if not shards:
                raise ValueError(f"{source}: a directory without .tar shards")
            got, bad = read_shards(shards, task)
        elif source.endswith(".tar"):
            got, bad = read_shards([source], task)
        else:
            got, bad = read_manifest(source, task)
        records += got
        skipped += bad
    if not records:
        raise ValueError(f"no usable training examples in {list(sources)} ({skipped} skipped)")
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
        if record.member is None:
            return load_image(record.image)  # type: ignore[return-value]  # a path gives a PIL image
        if self._pid != os.getpid():  # file handles are per process (DataLoader workers fork)
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(record.image)
        if f is None:
            f = self._files[record.image] = open(record.image, "rb")
        offset, size = record.member
        f.seek(offset)
        return read_image(io.BytesIO(f.read(size)), f"{record.image}@{offset}")

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
