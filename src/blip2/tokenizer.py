"""The text tokenizer: transformers' fast tokenizer (``TokenizersBackend``) over the ``tokenizers`` library.

It runs tokenizer.json as it is, as transformers 5.x does (it loads the Salesforce BLIP-2 checkpoints that
way). Padding and truncation are delegated to the backend with the settings transformers gives it, so ids
and masks match by construction. Files read and written:

    tokenizer.json             the ``tokenizers`` pipeline, run unchanged
    tokenizer_config.json      special tokens, padding/truncation side, model_max_length, ...
    special_tokens_map.json    4.x only; read when tokenizer_config.json has no "added_tokens_decoder"
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

from blip2.hub import read_json as _read_json, resolve_dir
from blip2.images import BatchFeature, _write_json

__all__ = ["TextTokenizer", "as_tensors"]

# transformers' sentinels: model_max_length defaults to 1e30 ("no limit"); above 1e20 it is not used.
_VERY_LARGE_INTEGER = int(1e30)
_LARGE_INTEGER = int(1e20)
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TRUNCATION = {"longest_first", "only_first", "only_second"}
# tokenizer_config.json keys not kept verbatim: load-time bookkeeping transformers may leave there,
# and the keys we model and write back ourselves. Every other key is kept and written back.
_TOKENIZER_REWRITTEN = {
    "name_or_path", "tokenizer_file", "special_tokens_map_file", "is_local", "local_files_only", "files_loaded",
    "_commit_hash", "vocab_file", "merges_file", "tokenizer_class", "added_tokens_decoder",
    "additional_special_tokens", "extra_special_tokens", "padding_side", "truncation_side", "model_max_length",
    "clean_up_tokenization_spaces", "processor_class",
}


def _token_content(value: Any) -> str:
    """A special token as written in a config: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return str(value["content"])
    if isinstance(value, AddedToken):
        return value.content
    return str(value)


def _added_token(value: Any, special: bool) -> AddedToken:
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, dict):
        flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
        return AddedToken(str(value["content"]), special=special or bool(value.get("special", False)), **flags)
    return AddedToken(str(value), special=special)


class TextTokenizer:
    """transformers' fast tokenizer (``TokenizersBackend``) for BLIP-2's OPT (byte-level BPE) and Flan-T5 (Unigram).

    ``config`` is tokenizer_config.json's content. Attributes users set: ``padding_side``,
    ``truncation_side`` ("left" / "right"), ``model_max_length``.
    """

    def __init__(self, backend: Tokenizer, config: dict[str, Any] | None = None) -> None:
        config = dict(config or {})
        self.backend = backend
        self._lock = threading.Lock()  # padding/truncation are set on the shared backend per call
        json_padding = backend.padding or {}
        json_truncation = backend.truncation or {}
        self.padding_side: str = config.get("padding_side") or json_padding.get("direction", "right")
        self.truncation_side: str = config.get("truncation_side") or json_truncation.get("direction", "right")
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding/truncation side must be 'left' or 'right', got {side!r}")
        max_len = config.get("model_max_length")
        self.model_max_length: int = int(max_len) if max_len is not None else _VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces: bool = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers skips the clean-up for BPE models unless this (sic) flag is set.
        self._clean_up_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"))
        self.backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.processor_class: str | None = config.get("processor_class")

        # Named special tokens: bos, eos, ..., and model-specific ones such as "image_token" (any other
        # "*_token" key holding a token, or 5.x's "extra_special_tokens" dict); unnamed extras: a list.
        if "pad_token" not in config and json_padding.get("pad_token"):
            config["pad_token"] = json_padding["pad_token"]
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        raw_special: dict[str, Any] = {
            key: value for key, value in config.items()
            if key.endswith("_token") and (isinstance(value, str) or (isinstance(value, dict) and "content" in value))
        }
        if isinstance(extra, dict):
            raw_special.update(extra)
            extra = []
        self.special_tokens: dict[str, str] = {k: _token_content(v) for k, v in raw_special.items()}
        self.extra_special_tokens: list[str] = [_token_content(v) for v in extra]

        # As transformers does: re-add the config's added tokens (their flags win), then register every
        # special token missing from the added vocabulary as a special AddedToken.
        to_add = [_added_token(v, special=False)
                  for _, v in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0]))]
        present = {t.content for t in backend.get_added_tokens_decoder().values()} | {t.content for t in to_add}
        for value in [*raw_special.values(), *extra]:
            if _token_content(value) not in present:
                to_add.append(_added_token(value, special=True))
                present.add(_token_content(value))
        if to_add:
            backend.add_tokens(to_add)
        self.config = {k: v for k, v in config.items() if k not in _TOKENIZER_REWRITTEN and k not in raw_special}

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike) -> TextTokenizer:
        """From a directory (or Hub id) holding tokenizer.json and optionally tokenizer_config.json."""
        directory = resolve_dir(path_or_id)
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{directory}: no tokenizer.json (slow-tokenizer files alone are not supported)")
        try:
            backend = Tokenizer.from_file(tokenizer_file)
        except Exception as e:
            raise ValueError(f"{tokenizer_file}: not a tokenizers file ({e})") from None
        config_file = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(config_file) if os.path.isfile(config_file) else {}
        map_file = os.path.join(directory, "special_tokens_map.json")
        if "added_tokens_decoder" not in config and os.path.isfile(map_file):
            config.update(_read_json(map_file))  # 4.x legacy: the map overrides the config, as in transformers
        return cls(backend, config)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by transformers 4.x and 5.x)."""
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, name)
                 for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
        # The last call's padding/truncation settings would be saved into tokenizer.json: clear them.
        with self._lock:
            self.backend.no_padding()
            self.backend.no_truncation()
            self.backend.save(paths[0])
        config: dict[str, Any] = dict(self.config)
        config.update(self.special_tokens)
        if self.extra_special_tokens:
            # "additional_special_tokens": the list key both 4.x and 5.x read (5.x's "extra_special_tokens" is a dict in 4.x).
            config["additional_special_tokens"] = list(self.extra_special_tokens)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # runs tokenizer.json unchanged in 4.x and 5.x
        config["padding_side"] = self.padding_side
        config["truncation_side"] = self.truncation_side
        config["model_max_length"] = self.model_max_length
        config["clean_up_tokenization_spaces"] = self.clean_up_tokenization_spaces
        if self.processor_class is not None:
            config["processor_class"] = self.processor_class
        _write_json(paths[1], config)
        special_map: dict[str, Any] = {k: v for k, v in self.special_tokens.items() if k in _NAMED_SPECIAL}
        if self.extra_special_tokens:
            special_map["additional_special_tokens"] = list(self.extra_special_tokens)
        _write_json(paths[2], special_map)
        return paths

    # ---- vocabulary ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of tokens; an unknown token maps to ``unk_token_id`` (None when there is none)."""
        if isinstance(tokens, str):
            index = self.backend.token_to_id(tokens)
            unk = self.special_tokens.get("unk_token")
            return index if index is not None or unk is None else self.backend.token_to_id(unk)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    # bos_token / bos_token_id ... pad_token / pad_token_id: the special tokens transformers names, None if unset
    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    def add_tokens(self, tokens: str | AddedToken | Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens not yet in the vocabulary (at its end); returns how many were new. As in transformers."""
        if isinstance(tokens, (str, AddedToken)):
            tokens = [tokens]
        if special_tokens:
            return self.backend.add_special_tokens(list(tokens))
        return self.backend.add_tokens(list(tokens))

    # ---- encoding -----------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_token_type_ids: bool | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> BatchFeature:
        """``input_ids`` and ``attention_mask`` for a string or a list of strings, as transformers computes them.

        padding: False / "do_not_pad", True / "longest", "max_length" (to ``max_length``, else
        ``model_max_length``), rounded up to ``pad_to_multiple_of`` when given. truncation: None / False,
        True / "longest_first" / "only_first"; a ``max_length`` alone turns it on. ``return_tensors``: None
        (lists; a single string gives flat lists), "pt" (int64 tensors [B, T]) or "np".
        ``return_attention_mask=False`` leaves the mask out; ``return_token_type_ids=True`` adds
        ``token_type_ids`` (0 for a single text).
        """
        batched = not isinstance(text, str)
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        pad_to, truncate, max_length = self._strategies(padding, truncation, max_length)
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        with self._lock:
            if truncate is None:
                self.backend.no_truncation()
            else:
                self.backend.enable_truncation(max_length, stride=0, strategy=truncate, direction=self.truncation_side)
            if pad_to is None:
                self.backend.no_padding()
            else:
                self.backend.enable_padding(direction=side, pad_id=self.pad_token_id, pad_type_id=0,
                                            pad_token=self.pad_token, pad_to_multiple_of=pad_to_multiple_of,
                                            length=max_length if pad_to == "max_length" else None)
            encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        features = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            features["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask is not False:
            features["attention_mask"] = [e.attention_mask for e in encodings]
        if return_tensors is None and not batched:
            return BatchFeature({k: v[0] for k, v in features.items()})
        return as_tensors(features, return_tensors)

    def _strategies(self, padding: bool | str, truncation: bool | str | None,
                    max_length: int | None) -> tuple[str | None, str | None, int | None]:
        """transformers' resolution of padding/truncation/max_length -> (pad mode, truncation strategy, length)."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # a max_length alone truncates
        if padding is True or padding == "longest":
            pad_to: str | None = "longest"
        elif padding is False or padding == "do_not_pad":
            pad_to = None
        elif padding == "max_length":
            pad_to = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is True:
            truncate: str | None = "longest_first"
        elif truncation is None or truncation is False or truncation == "do_not_truncate":
            truncate = None
        elif truncation in _TRUNCATION:
            truncate = str(truncation)
        else:
            raise ValueError(f"truncation must be a bool or one of {sorted(_TRUNCATION)}, got {truncation!r}")
        if max_length is None:
            # Without max_length, model_max_length is used, unless it is the "no limit" sentinel.
            limited = self.model_max_length <= _LARGE_INTEGER
            if pad_to == "max_length":
                pad_to = pad_to if limited else None
                max_length = self.model_max_length if limited else None
            if truncate is not None:
                truncate = truncate if limited else None
                max_length = self.model_max_length if limited else None
        if pad_to is not None and (self.pad_token is None or self.pad_token_id is None):
            raise ValueError("asked to pad but the tokenizer has no pad_token")
        return pad_to, truncate, max_length

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, token_ids: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
               skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """Text of one sequence of ids; a batch (2-D) gives a list of texts, as transformers 5.x does."""
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        return self._decode_one(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
                     skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Texts of a batch of id sequences."""
        seqs = _to_list(sequences)
        if not seqs:
            return []
        if not isinstance(seqs[0], list):
            seqs = [seqs]
        return [self._decode_one(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in seqs]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, clean_up: bool | None) -> str:
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        # transformers skips this WordPiece-era clean-up for BPE models: it would eat real spaces.
        if clean_up and (not isinstance(self.backend.model, BPE) or self._clean_up_bpe):
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text


def _to_list(ids: Any) -> Any:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_list(i) for i in ids]
    return int(ids)


def as_tensors(features: dict[str, list[list[int]]], return_tensors: str | None) -> BatchFeature:
    if return_tensors is None:
        return BatchFeature(features)
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
    lengths = {len(row) for rows in features.values() for row in rows}
    if len(lengths) > 1:
        raise ValueError(f"sequences have different lengths {sorted(lengths)}: pass padding=True to make a tensor")
    arrays = {k: np.array(v, dtype=np.int64).reshape(len(v), -1) for k, v in features.items()}
    if return_tensors == "np":
        return BatchFeature(arrays)
    return BatchFeature({k: torch.from_numpy(v) for k, v in arrays.items()})
