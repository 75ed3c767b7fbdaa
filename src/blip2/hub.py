"""Checkpoint directories: where one is (a local directory or a Hugging Face Hub snapshot), the names of
its files, and reading its JSON files.

Imports nothing of ``blip2``, so ``config`` and ``checkpoint`` (and everything above them) can use it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

__all__ = ["BIN_INDEX", "BIN_SINGLE", "CONFIG_FILE", "SAFE_INDEX", "SAFE_SINGLE", "read_config", "read_json",
           "resolve_dir"]

CONFIG_FILE = "config.json"
SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# what the Hub accepts as a repo id: "name" alone is a local path to us, "org/name" may be either
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_dir(path_or_id: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
                token: str | bool | None = None, local_files_only: bool = False, force_download: bool = False) -> str:
    """A local directory for ``path_or_id``: the directory itself, or a Hub snapshot.

    Hub ids (``org/name``) need the optional ``huggingface_hub`` package and a network
    connection; everything is checked here so the caller gets one clear error.
    """
    s = os.path.expanduser(os.fspath(path_or_id))
    if os.path.isdir(s):
        return s
    if os.path.exists(s):
        raise FileNotFoundError(f"{s}: expected a checkpoint directory, got a file")
    if not _HUB_ID.fullmatch(s) or ".." in s:
        raise FileNotFoundError(f"{s}: no such checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{s}: not a local directory, and it looks like a Hub id but huggingface_hub is not installed "
            f"(pip install 'blip2[hub]')"
        ) from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only,
               force_download=force_download)
    try:
        d = snapshot_download(s, allow_patterns=patterns, **hub)
        # legacy checkpoints have only pytorch_model.bin: fetch it when no safetensors came
        if not _has_weights(d) and not os.path.exists(os.path.join(d, "preprocessor_config.json")):
            d = snapshot_download(s, allow_patterns=patterns + ["*.bin"], **hub)
    except Exception as e:  # network, auth, missing repo: all reach the user as one message
        raise FileNotFoundError(f"{s}: not a local directory, and fetching it from the Hub failed: {e}") from None
    return d


def _has_weights(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX))


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in file ``path``. A missing file, bad JSON or a value other than an object raises
    ``error`` (the caller's kind: ``ConfigError``, ``CheckpointError``, ...) naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_config(directory: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The content of a checkpoint directory's ``config.json`` (errors as ``read_json``)."""
    return read_json(os.path.join(os.fspath(directory), CONFIG_FILE), error)
