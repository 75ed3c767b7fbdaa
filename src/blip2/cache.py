"""Where blip2 keeps what it builds or unpacks once per machine (the native kernels, unpacked tar shards, the
language models' blocked layouts)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["cache_dir", "private_dir"]


def cache_dir() -> Path:
    """``$BLIP2_CACHE_DIR``, else ``$XDG_CACHE_HOME/blip2``, else ``~/.cache/blip2``."""
    if os.environ.get("BLIP2_CACHE_DIR"):
        return Path(os.environ["BLIP2_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2"


def private_dir(directory: Path) -> Path:
    """``directory``, created 0700 if it is not there; PermissionError if another user owns it or others can
    write in it (they could put their own file under a name this user loads: a library, a layout)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = directory.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{directory} belongs to user {st.st_uid}, not to this one ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"others can write in {directory} (mode {stat.S_IMODE(st.st_mode):o})")
    return directory
