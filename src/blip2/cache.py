"""Where blip2 keeps what it builds or unpacks once per machine (the native kernels, unpacked tar shards)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$BLIP2_CACHE_DIR``, else ``$XDG_CACHE_HOME/blip2``, else ``~/.cache/blip2``."""
    if os.environ.get("BLIP2_CACHE_DIR"):
        return Path(os.environ["BLIP2_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2"
