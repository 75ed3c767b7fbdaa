"""Image loading and the BLIP-2 pixel pipeline, numerically equal to transformers' BLIP image processor.

The reference is transformers' ``BlipImageProcessor`` with its PIL backend (``BlipImageProcessorPil``,
what transformers 5.x uses without torchvision and what 4.x always used). Every step below repeats
the reference's exact operations, dtypes included, so ``pixel_values`` match bit for bit:

    any input -> RGB uint8 (PIL conversion, alpha composited onto white)
              -> PIL resize to (height, width)             uint8 [3, H, W]
              -> x.astype(float64) * rescale_factor        -> float32
              -> (x - mean) / std in float32               float32 [3, H, W]
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2.hub import read_json, resolve_dir

__all__ = [
    "BatchFeature",
    "Blip2ImageProcessor",
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "IMAGE_FORMATS",
    "ImageInput",
    "ImageLimits",
    "ImageLoadError",
    "ImageTooLarge",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "load_image",
    "make_image_list",
    "preprocess_image",
    "read_image",
    "UnsupportedImage",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (about 179M pixels); we stop there too.
DEFAULT_MAX_PIXELS = 2 * int(1024 * 1024 * 1024 // 4 // 3)
# Sides past any camera's or panorama's; an aspect ratio past any picture a model could read once squashed.
DEFAULT_MAX_SIDE = 32768
DEFAULT_MAX_ASPECT = 50.0
# The formats decoded at all (PIL's names), and how a message names them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
IMAGE_FORMAT_NAMES = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")

ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, str, os.PathLike]


class ImageLoadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason, ``reason`` is the reason
    alone (for a caller that names the file its own way, as the server does for an upload)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason

    @classmethod
    def about(cls, name: str | None, reason: str) -> ImageLoadError:
        return cls(reason if name is None else f"cannot read image {name!r}: {reason}", reason)

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers pickle it
        return type(self), (str(self), self.reason)


class UnsupportedImage(ImageLoadError):
    """Not an image, or one in a format outside ``IMAGE_FORMATS``."""


class ImageTooLarge(ImageLoadError):
    """An image over one of ``ImageLimits``, told from its header."""


class BatchFeature(dict):
    """The processors' output: a dict of tensors (or lists) with attribute access and ``.to``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> BatchFeature:
        """Move every tensor to ``device``; cast only floating tensors to ``dtype`` (ids stay int64).

        ``batch.to(torch.float16)`` casts without moving, like the reference.
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for key, value in self.items():
            if not isinstance(value, torch.Tensor):
                continue
            if dtype is not None and value.is_floating_point():
                self[key] = value.to(device=device, dtype=dtype)
            elif device is not None:
                self[key] = value.to(device=device)
        return self


def load_image(source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image | np.ndarray | torch.Tensor:
    """An image object the processor accepts.

    A file path is decoded as transformers decodes a path given to its processor: EXIF orientation
    applied, then ``convert("RGB")`` (so an alpha channel is dropped, not composited). PIL images,
    numpy arrays and torch tensors are returned unchanged: the processor converts them itself.
    Raises ImageLoadError (a ValueError naming the file) for a missing, unreadable, truncated or
    too large file, or one in a format outside ``IMAGE_FORMATS``; ``max_pixels=None`` lifts our pixel
    limit (PIL's own ``Image.MAX_IMAGE_PIXELS`` still applies, and so do ``ImageLimits``' side and aspect limits).
    """
    if isinstance(source, (Image.Image, np.ndarray, torch.Tensor)):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.startswith(("http://", "https://")):
            raise ImageLoadError.about(path, "URLs are not fetched, download the file first")
        return read_image(path, path, ImageLimits(max_pixels=max_pixels))
    raise TypeError(f"expected a PIL image, numpy array, torch tensor or file path, got {type(source).__name__}")


@dataclass(frozen=True)
class ImageLimits:
    """What an image may cost, checked from its header before any pixel is decoded.

    ``max_side`` bounds the work of resizing one row or column (a 40,000,000 x 1 PNG of a few KB would
    otherwise cost gigabytes there), ``max_aspect`` the longer side over the shorter, ``max_pixels`` the
    decoded size; None lifts a limit. Only ``formats`` (PIL format names) are opened at all: no other
    decoder of PIL's ever sees the data (EPS would run Ghostscript)."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS
    max_side: int | None = DEFAULT_MAX_SIDE
    max_aspect: float | None = DEFAULT_MAX_ASPECT
    formats: tuple[str, ...] = IMAGE_FORMATS

    def check(self, width: int, height: int) -> None:
        """Raise ImageTooLarge (naming the limit) when a ``width`` x ``height`` image is over one."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise ImageTooLarge.about(None, f"{width}x{height} = {width * height} pixels exceeds max_pixels="
                                      f"{self.max_pixels} (decompression bomb guard)")
        if self.max_side is not None and max(width, height) > self.max_side:
            raise ImageTooLarge.about(None, f"{width}x{height}: a side over max_side={self.max_side}")
        if self.max_aspect is not None and max(width, height) > self.max_aspect * max(1, min(width, height)):
            raise ImageTooLarge.about(None, f"{width}x{height}: aspect ratio over max_aspect={self.max_aspect:g}")


def read_image(file: str | BinaryIO, name: str | None = None, limits: ImageLimits = ImageLimits(),
               reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Decode one image file (a path or a binary file object) to RGB, EXIF orientation applied.

    ``reduce_to`` (width, height): for callers that resize anyway, a large image is decoded or shrunk to no
    less than this (JPEG at 1/2, 1/4 or 1/8 scale, which skips most of the decoding; any other format reduced
    by a whole factor per side), which makes decoding and resizing cheap at a small cost in fidelity; None
    decodes every pixel, as transformers does. ImageLoadError naming ``name`` for anything unusable:
    UnsupportedImage (format), ImageTooLarge (``limits``), or the base class (missing, unreadable, corrupt),
    with no PIL traceback attached."""
    error: type[ImageLoadError] = ImageLoadError
    try:
        return _decode(file, limits, reduce_to)
    except ImageLoadError as e:
        error, reason = type(e), e.reason
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "is a directory"
    except PermissionError:
        reason = "permission denied"
    except UnidentifiedImageError:
        error, reason = UnsupportedImage, f"not an image in an accepted format ({', '.join(IMAGE_FORMAT_NAMES)})"
    except Image.DecompressionBombError as e:
        error, reason = ImageTooLarge, f"decompression bomb guard: {e}"
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, MemoryError, ...
        reason = f"corrupt or truncated image data ({type(e).__name__}: {e})"
    raise error.about(name, reason)


def _decode(file: str | BinaryIO, limits: ImageLimits, reduce_to: tuple[int, int] | None) -> Image.Image:
    if isinstance(file, (str, os.PathLike)):
        try:
            mode = os.stat(file).st_mode
        except OSError:
            mode = None  # missing or unreadable: Image.open says which
        if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ImageLoadError.about(None, "not a regular file")  # a FIFO or a device: opening it could block
    with Image.open(file, formats=limits.formats) as image:
        limits.check(image.width, image.height)  # from the header: nothing decoded yet
        if reduce_to is not None:
            image.draft("RGB", reduce_to)  # JPEG only: decode at a reduced scale, never below reduce_to
        image.load()  # decode now so truncated data fails here, with the file's name
        rgb = ImageOps.exif_transpose(image)
    rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    if reduce_to is not None:
        factor = (max(1, rgb.width // reduce_to[0]), max(1, rgb.height // reduce_to[1]))
        if factor != (1, 1):
            rgb = rgb.reduce(factor)  # a box filter per side: the resize after it then costs little
    return rgb


def make_image_list(images: Any) -> list[Image.Image | np.ndarray | torch.Tensor | str | os.PathLike]:
    """Flatten the reference's accepted layouts into a list of single images.

    One image; a list of images; a list of lists (flattened); a 4-D array or tensor [B, ...]
    (split along B). A 2-D or 3-D array is one image.
    """
    single = (Image.Image, str, os.PathLike)
    if isinstance(images, single):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim in (2, 3):
            return [images]
        raise ValueError(f"an image array must have 2, 3 or 4 (batch) dimensions, got shape {tuple(images.shape)}")
    if isinstance(images, (list, tuple)) and images:
        flat: list[Any] = []
        for item in images:
            if isinstance(item, (list, tuple)):
                flat.extend(make_image_list(item))
            elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                flat.extend(item)
            elif isinstance(item, (*single, np.ndarray, torch.Tensor)):
                flat.append(item)
            else:
                raise TypeError(f"unsupported image type {type(item).__name__}")
        return flat
    raise TypeError(f"expected an image or a non-empty list of images, got {type(images).__name__}")


def preprocess_image(
    image: Image.Image | np.ndarray | torch.Tensor,
    *,
    do_convert_rgb: bool,
    do_resize: bool,
    size: tuple[int, int],
    resample: int,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> np.ndarray:
    """One image -> float32 [C, H, W] (C = 3 after RGB conversion), the reference's pipeline step by step."""
    height, width = size
    if isinstance(image, Image.Image):
        if do_convert_rgb:
            image = _pil_to_rgb(image)
        if do_resize and image.mode == "RGB":
            # Same pixels as the reference's PIL -> array -> PIL round trip, without the copies.
            pixels = np.moveaxis(np.array(image.resize((width, height), resample=resample)), -1, 0)
            do_resize = False
        else:
            pixels = np.array(image)
            pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
    else:
        pixels = _array_to_chw(image, do_convert_rgb)
    if do_resize:
        pixels = _resize_chw(pixels, height, width, resample)
    if do_rescale:
        pixels = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    if do_normalize:
        pixels = _normalize(pixels, image_mean, image_std)
    return pixels.astype(np.float32, copy=False)


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited onto white (alpha band or a palette/tRNS transparency entry)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_chw(image: np.ndarray | torch.Tensor, do_convert_rgb: bool) -> np.ndarray:
    """An [H, W], [C, H, W] or [H, W, C] array (C in 1, 3, 4) -> [C', H, W]; RGB conversion as the reference does it."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        # The reference's rule: channels first when the first axis could be channels, even if the last could too.
        if array.shape[0] in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"cannot tell the channel axis of an image of shape {array.shape}: expected 1, 3 or 4 channels")
    else:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    if do_convert_rgb:
        array = _hwc_to_rgb(array)
    return np.moveaxis(array, -1, 0)


def _hwc_to_rgb(array: np.ndarray) -> np.ndarray:
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels != 4:
        return array
    is_int = np.issubdtype(array.dtype, np.integer)
    if not is_int and (array.min() < 0.0 or array.max() > 1.0):
        raise ValueError(f"an RGBA float image must lie in [0, 1], got [{array.min()}, {array.max()}]")
    white = 255 if is_int else 1.0
    alpha = array[..., 3:4] / white  # float64
    composite = alpha * array[..., :3] + (1 - alpha) * white
    return np.round(composite).astype(array.dtype) if is_int else composite.astype(array.dtype)


def _resize_chw(pixels: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize through PIL as the reference does: to uint8 (x255 first if the values lie in [0, 1]), resize, back."""
    hwc = np.moveaxis(pixels, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = hwc[..., 0]
    scaled = _needs_scaling_to_255(hwc)
    if scaled:
        hwc = (hwc.astype(np.float64) * 255).astype(np.float32)  # float32 step kept: it decides the uint8 rounding
    resized = np.array(Image.fromarray(hwc.astype(np.uint8)).resize((width, height), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    resized = np.moveaxis(resized, -1, 0)
    if scaled:
        resized = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return resized


def _needs_scaling_to_255(array: np.ndarray) -> bool:
    """uint8 or whole numbers in [0, 255] go to PIL as they are; floats in [0, 1] are scaled by 255 first."""
    if array.dtype == np.uint8:
        return False
    if np.allclose(array, array.astype(int)):
        if np.all(array >= 0) and np.all(array <= 255):
            return False
        raise ValueError(f"image values must lie in [0, 255] to resize, got [{array.min()}, {array.max()}]")
    if np.all(array >= 0) and np.all(array <= 1):
        return True
    raise ValueError(f"float image values must lie in [0, 1] to resize, got [{array.min()}, {array.max()}]")


def _normalize(pixels: np.ndarray, mean: Sequence[float] | float, std: Sequence[float] | float) -> np.ndarray:
    # The reference computes in the image's float dtype (float32 after rescaling), mean/std cast to it.
    if not np.issubdtype(pixels.dtype, np.floating):
        pixels = pixels.astype(np.float32)
    channels = pixels.shape[0]
    mean_values = list(mean) if isinstance(mean, Sequence) else [mean] * channels
    std_values = list(std) if isinstance(std, Sequence) else [std] * channels
    if len(mean_values) != channels or len(std_values) != channels:
        raise ValueError(f"image_mean/image_std have {len(mean_values)}/{len(std_values)} values for {channels} channels")
    mean_arr = np.array(mean_values, dtype=pixels.dtype)[:, None, None]
    std_arr = np.array(std_values, dtype=pixels.dtype)[:, None, None]
    return (pixels - mean_arr) / std_arr


# Keys of the reference's preprocessor_config.json that we model; any other key is kept and written back.
_IMAGE_KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
               "image_std", "do_convert_rgb")
_IMAGE_BOOKKEEPING = {"image_processor_type", "_processor_class", "processor_class"}


@dataclass
class Blip2ImageProcessor:
    """transformers' ``BlipImageProcessor`` as BLIP-2 checkpoints configure it (defaults: 224 px, CLIP mean/std).

    ``size`` is ``{"height": H, "width": W}`` (an int means a square). ``resample`` is a PIL filter
    number (3 = bicubic). Output ``pixel_values`` are float32 [B, 3, H, W].
    """

    do_resize: bool = True
    size: dict[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = Image.Resampling.BICUBIC.value
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.size = {"height": self.size, "width": self.size}
        if not (isinstance(self.size, dict) and isinstance(self.size.get("height"), int)
                and isinstance(self.size.get("width"), int)):
            raise ValueError(f"size must be {{'height': H, 'width': W}} or an int, got {self.size!r}")
        self.size = {"height": self.size["height"], "width": self.size["width"]}
        self.image_mean = tuple(self.image_mean) if isinstance(self.image_mean, (list, tuple)) else self.image_mean
        self.image_std = tuple(self.image_std) if isinstance(self.image_std, (list, tuple)) else self.image_std

    def __call__(self, images: Any, return_tensors: str | None = "pt") -> BatchFeature:
        """``images``: one image or a (nested) list of PIL images, arrays, tensors or file paths.

        ``pixel_values``: a float32 tensor [B, 3, H, W] ("pt"), an array ("np"), or a list of [3, H, W] arrays (None).
        """
        pixels = [self.preprocess(load_image(image)) for image in make_image_list(images)]
        if return_tensors is None:
            return BatchFeature(pixel_values=pixels)
        if len({p.shape for p in pixels}) > 1:
            raise ValueError(f"images of different sizes {sorted({p.shape for p in pixels})} cannot be stacked "
                             "(do_resize is off)")
        stacked = np.stack(pixels)
        if return_tensors == "np":
            return BatchFeature(pixel_values=stacked)
        if return_tensors == "pt":
            return BatchFeature(pixel_values=torch.from_numpy(stacked))
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")

    def preprocess(self, image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
        """One decoded image -> float32 [3, H, W]."""
        return preprocess_image(
            image, do_convert_rgb=self.do_convert_rgb, do_resize=self.do_resize,
            size=(self.size["height"], self.size["width"]), resample=self.resample, do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor, do_normalize=self.do_normalize, image_mean=self.image_mean,
            image_std=self.image_std,
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Blip2ImageProcessor:
        known = {k: config[k] for k in _IMAGE_KEYS if k in config}
        extra = {k: v for k, v in config.items() if k not in known and k not in _IMAGE_BOOKKEEPING}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The reference's preprocessor_config.json content (sorted keys, lists for mean/std)."""
        out: dict[str, Any] = dict(self.extra)
        for key in _IMAGE_KEYS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        out["size"] = dict(self.size)
        out["image_processor_type"] = "BlipImageProcessor"
        return dict(sorted(out.items()))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike) -> Blip2ImageProcessor:
        """From a preprocessor_config.json file, or a directory / Hub id holding one.

        Like the reference, a processor_config.json with a nested "image_processor" (transformers 5.x
        layout) takes priority over preprocessor_config.json (4.x layout).
        """
        path = os.fspath(path_or_id)
        if os.path.isfile(path):
            return cls.from_dict(read_json(path))
        directory = resolve_dir(path)
        nested = os.path.join(directory, "processor_config.json")
        if os.path.isfile(nested):
            config = read_json(nested).get("image_processor")
            if isinstance(config, dict):
                return cls.from_dict(config)
        legacy = os.path.join(directory, "preprocessor_config.json")
        if not os.path.isfile(legacy):
            raise FileNotFoundError(f"{directory}: no preprocessor_config.json (nor an image_processor entry in "
                                    "processor_config.json)")
        return cls.from_dict(read_json(legacy))

    def save_pretrained(self, directory: str | os.PathLike, processor_class: str | None = None) -> str:
        """Write preprocessor_config.json (optionally tagged with the owning processor's class); returns its path."""
        os.makedirs(directory, exist_ok=True)
        config = self.to_dict()
        if processor_class is not None:
            config["processor_class"] = processor_class
        path = os.path.join(directory, "preprocessor_config.json")
        _write_json(path, config)
        return path


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
