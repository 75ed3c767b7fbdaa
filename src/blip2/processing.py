"""``Blip2Processor``: the image processor and the text tokenizer together, equal to transformers' 5.x one.

Directories written by transformers (4.x or 5.x layout) load here, and ours load in transformers:

    processor_config.json      {"num_query_tokens": Q, "processor_class": "Blip2Processor"}
                               (5.x may nest the image processor config under "image_processor")
    preprocessor_config.json   the image processor (see images.py)
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the tokenizer (see tokenizer.py)
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import AddedToken

from blip2.hub import read_json as _read_json, resolve_dir
from blip2.images import (
    BatchFeature,
    Blip2ImageProcessor,
    DEFAULT_MAX_PIXELS,
    ImageInput,
    ImageLoadError,
    _write_json,
    load_image,
)
from blip2.tokenizer import TextTokenizer, as_tensors

__all__ = [
    "BatchFeature",
    "Blip2ImageProcessor",
    "Blip2Processor",
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "TextTokenizer",
    "load_image",
]

# what a call passes on to the tokenizer and to the image processor, by transformers' names
TEXT_OPTIONS = ("padding", "truncation", "max_length", "add_special_tokens", "padding_side", "return_attention_mask",
                "return_token_type_ids", "pad_to_multiple_of")
IMAGE_OPTIONS = tuple(f.name for f in dataclasses.fields(Blip2ImageProcessor) if f.name != "extra")


def _route(flat: dict[str, Any], text: dict[str, Any] | None, images: dict[str, Any] | None,
           common: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """A processor call's options as transformers routes them: (tokenizer options, image processor options,
    return_tensors). Later sources win: ``common_kwargs``, then ``text_kwargs`` / ``images_kwargs``, then flat
    ones (an option both flat and in ``text_kwargs`` or ``images_kwargs`` is refused, as the reference does)."""
    text_options: dict[str, Any] = {}
    image_options: dict[str, Any] = {}
    return_tensors: str | None = "pt"
    for where, nested in (("text_kwargs", text), ("images_kwargs", images)):
        twice = sorted(set(nested or {}) & set(flat))
        if twice:
            raise ValueError(f"Blip2Processor: {twice[0]} was passed twice: in {where} and as a keyword argument")
    for where, options in (("common_kwargs", common), ("text_kwargs", text), ("images_kwargs", images), ("", flat)):
        for key, value in (options or {}).items():
            if key == "return_tensors":
                return_tensors = value
            elif key in TEXT_OPTIONS and where != "images_kwargs":
                text_options[key] = value
            elif key in IMAGE_OPTIONS and where != "text_kwargs":
                image_options[key] = value
            else:
                accepted = TEXT_OPTIONS if where == "text_kwargs" else IMAGE_OPTIONS if where == "images_kwargs" \
                    else TEXT_OPTIONS + IMAGE_OPTIONS + ("return_tensors",)
                raise TypeError(f"Blip2Processor: unknown option {(where + '.' if where else '') + key!r}; "
                                f"accepted: {', '.join(accepted)}")
    return text_options, image_options, return_tensors


class Blip2Processor:
    """transformers' ``Blip2Processor``: images -> ``pixel_values``, text -> ``input_ids``/``attention_mask``.

    With both images and text and ``num_query_tokens`` set, each row starts with ``num_query_tokens``
    ``<image>`` tokens (before BOS, and before any left padding), which are never padded or truncated;
    the model writes the projected queries over their embeddings.
    """

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer: TextTokenizer,
                 num_query_tokens: int | None = None) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        # As the reference: reuse a declared image token, else add "<image>" as a special token.
        self.image_token: str = tokenizer.special_tokens.get("image_token", "<image>")
        if "image_token" not in tokenizer.special_tokens:
            tokenizer.add_tokens([AddedToken(self.image_token, normalized=False, special=True)], special_tokens=True)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, images: ImageInput | Sequence[ImageInput] | None = None, text: str | Sequence[str] | None = None,
                 *, text_kwargs: dict[str, Any] | None = None, images_kwargs: dict[str, Any] | None = None,
                 common_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> BatchFeature:
        """``input_ids``/``attention_mask`` [B, Q + T] (when text is given) and ``pixel_values`` [B, 3, H, W].

        Options, by transformers' names, flat or in ``text_kwargs`` / ``images_kwargs`` / ``common_kwargs``
        (flat ones and the per-modality dicts win over the common one): the tokenizer's ``TEXT_OPTIONS``
        (padding, truncation, max_length, padding_side, ...), the image processor's fields (do_resize, size,
        do_normalize, ...) and ``return_tensors`` ("pt" unless given: tensors; "np"; None: lists). Anything
        else raises TypeError (the reference warns and ignores it). ``max_length`` counts the Q image tokens: the text gets ``max_length - Q``;
        like the reference, this subtraction also applies to text-only calls whenever ``num_query_tokens`` is set.
        """
        if images is None and text is None:
            raise ValueError("give images, text, or both")
        text_options, image_options, return_tensors = _route(kwargs, text_kwargs, images_kwargs, common_kwargs)
        out = BatchFeature()
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a non-empty list of strings")
            if text_options.get("max_length") is not None and self.num_query_tokens is not None:
                text_options["max_length"] -= self.num_query_tokens
            encoding = self.tokenizer(texts, **text_options)
            out.update(as_tensors(self._image_tokens_first(encoding) if images is not None else encoding,
                                  return_tensors))
        if images is not None:
            image_processor = dataclasses.replace(self.image_processor, **image_options) if image_options \
                else self.image_processor
            out.update(image_processor(images, return_tensors=return_tensors))
        return out

    def prompt_inputs(self, prompts: Sequence[str], padding_side: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids / attention_mask [B, Q + T] of ``prompts`` as ``self(images=..., text=prompts, padding=True)``
        lays them out (the Q image tokens first, when declared, then the padded text) but without the images,
        for pixel_values made elsewhere (in DataLoader workers). Decoder-only LMs want ``padding_side="left"``,
        so every row's new tokens start at the same position."""
        encoding = self.tokenizer(list(prompts), padding=True, padding_side=padding_side)
        out = as_tensors(self._image_tokens_first(encoding), "pt")
        return out["input_ids"], out["attention_mask"]

    def _image_tokens_first(self, encoding: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        """Each row of ``encoding`` after ``num_query_tokens`` image tokens (unchanged when there is no such
        number): image ids, mask 1, token type 0."""
        if self.num_query_tokens is None:
            return encoding
        q = self.num_query_tokens
        first = {"input_ids": [self.image_token_id] * q, "attention_mask": [1] * q, "token_type_ids": [0] * q}
        return {key: [first[key] + row for row in rows] for key, rows in encoding.items()}

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        return self.tokenizer.decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> Blip2Processor:
        """From a directory or Hub id written by transformers (4.x or 5.x layout) or by us; ``revision``,
        ``cache_dir``, ``token``, ``local_files_only``: as transformers' (Hub ids only)."""
        directory = resolve_dir(path_or_id, revision=revision, cache_dir=cache_dir, token=token,
                                local_files_only=local_files_only)
        processor_file = os.path.join(directory, "processor_config.json")
        config = _read_json(processor_file) if os.path.isfile(processor_file) else {}
        return cls(Blip2ImageProcessor.from_pretrained(directory), TextTokenizer.from_pretrained(directory),
                   num_query_tokens=config.get("num_query_tokens"))

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write processor_config.json, preprocessor_config.json and the tokenizer files (4.x layout, which 5.x reads)."""
        os.makedirs(directory, exist_ok=True)
        processor_file = os.path.join(directory, "processor_config.json")
        _write_json(processor_file, {"num_query_tokens": self.num_query_tokens, "processor_class": "Blip2Processor"})
        self.tokenizer.processor_class = "Blip2Processor"
        return [processor_file, self.image_processor.save_pretrained(directory, processor_class="Blip2Processor"),
                *self.tokenizer.save_pretrained(directory)]


class ImageFiles(torch.utils.data.Dataset):
    """One image file per item, decoded and preprocessed where it is read (a DataLoader worker):
    ``(path, pixel_values [3, H, W], None)``, or ``(path, None, reason)`` when the file cannot be used.

    Whatever one file does costs only that file: only regular files are opened (a FIFO or a device named
    ``x.png`` would block the reader or never end), and running out of memory or an OS error while decoding
    or resizing one (a 100M x 1 pixel PNG is 12 KB) is that file's reason, not the job's end."""

    def __init__(self, paths: Sequence[str], image_processor: Blip2ImageProcessor) -> None:
        self.paths = list(paths)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        path = self.paths[i]
        try:
            mode = os.stat(path).st_mode  # checked just before opening: a file swapped in between still blocks
            if not stat.S_ISREG(mode):
                kind = _SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
                return path, None, f"cannot read image {path!r}: not a regular file but a {kind}"
            pixels = self.image_processor([load_image(path)], return_tensors="pt")["pixel_values"][0]
        except ImageLoadError as e:
            return path, None, str(e)
        except MemoryError:
            return path, None, f"cannot read image {path!r}: out of memory decoding or resizing it"
        except OSError as e:  # gone since it was listed, unreadable, or an I/O error
            return path, None, f"cannot read image {path!r}: {e.strerror or e}"
        return path, pixels, None


_SPECIAL_FILES = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
                  stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory"}
