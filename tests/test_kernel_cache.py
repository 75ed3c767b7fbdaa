"""The native-kernel cache loads only a library this user built: a private folder, atomic writes, the library's
hash checked before loading. Runs on any machine: a fake compiler writes the "library" and loading is recorded
instead of done (tests/test_kernels.py builds and loads the real one where the CPU has AVX-512 or AVX2)."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest

from blip2.cache import private_dir
from blip2.fast import kernels


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A machine that can build: AVX-512 flags, a compiler that writes a counted "library", loading recorded."""
    compiler = tmp_path / "fake-c++"
    compiler.write_text('#!/bin/sh\n'
                        'while [ "$1" != "-o" ]; do shift; done\n'
                        'echo built >> "$(dirname "$0")/builds"\n'
                        'printf "library %s" "$(wc -l < "$(dirname "$0")/builds")" > "$2"\n')
    compiler.chmod(0o755)
    loaded: list[str] = []
    monkeypatch.setenv("BLIP2_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("BLIP2_KERNELS", "1")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx512f", "avx512bw"})
    monkeypatch.setattr(kernels, "_compiler", lambda: str(compiler))
    monkeypatch.setattr(kernels.torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(kernels, "_register_fake", lambda: None)
    monkeypatch.setattr(kernels.sys, "platform", "linux")
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    for name, value in (("_tried", False), ("_loaded", False), ("_status", ""), ("_bf16_dot", False),
                        ("_library_name", None)):
        monkeypatch.setattr(kernels, name, value)

    def load() -> tuple[bool, int]:
        """A fresh process's load(): whether it loaded, and how many builds there have been."""
        kernels._tried = False
        ok = kernels.load()
        builds = tmp_path / "builds"
        return ok, len(builds.read_text().splitlines()) if builds.exists() else 0

    return tmp_path / "cache" / "kernels", loaded, load


def test_the_cache_is_private_and_the_library_carries_its_hash(fake):
    folder, loaded, load = fake
    assert load() == (True, 1)
    [library] = folder.glob("*.so")
    assert loaded == [str(library)] and kernels.status() == f"loaded from {library}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not library.stat().st_mode & 0o077  # the linker's umask-given mode is not kept
    assert (folder / (library.name + ".sha256")).read_text() == hashlib.sha256(library.read_bytes()).hexdigest() + "\n"
    assert sorted(p.name for p in folder.iterdir()) == [library.name, library.name + ".sha256"]  # no temporaries
    assert load() == (True, 1)  # the next process loads it without building
    assert loaded == [str(library)] * 2


def test_a_library_changed_since_its_build_is_built_again(fake):
    folder, loaded, load = fake
    load()
    [library] = folder.glob("*.so")
    library.write_bytes(b"someone else's code")
    library.chmod(0o700)
    assert load() == (True, 2)  # rebuilt, then loaded
    assert library.read_bytes() == b"library 2" and loaded[-1] == str(library)


@pytest.mark.parametrize("spoil", ["no hash", "a link", "writable by others"])
def test_a_library_that_cannot_be_trusted_is_built_again(fake, tmp_path, spoil):
    folder, loaded, load = fake
    load()
    [library] = folder.glob("*.so")
    if spoil == "no hash":  # a build killed between its two renames
        os.remove(folder / (library.name + ".sha256"))
    elif spoil == "a link":
        (tmp_path / "elsewhere.so").write_bytes(library.read_bytes())
        library.unlink()
        library.symlink_to(tmp_path / "elsewhere.so")
    else:
        library.chmod(0o666)
    assert load() == (True, 2)
    assert not library.is_symlink() and library.read_bytes() == b"library 2"


@pytest.mark.parametrize("how", ["writable by others", "owned by someone else"])
def test_a_cache_folder_that_is_not_private_is_not_used(fake, monkeypatch, caplog, how):
    folder, loaded, load = fake
    load()
    [library] = folder.glob("*.so")
    if how == "writable by others":
        folder.chmod(0o777)
        reason = f"others can write in {folder} (mode 777)"
    else:
        uid = os.getuid()
        monkeypatch.setattr(kernels.os, "getuid", lambda: uid + 1)
        reason = f"{folder} belongs to user {uid}, not to this one ({uid + 1})"
    modes = []  # the private folder's mode when the library is loaded from it
    monkeypatch.setattr(kernels.torch.ops, "load_library",
                        lambda p: (loaded.append(p), modes.append(stat.S_IMODE(Path(p).parent.stat().st_mode))))
    with caplog.at_level(logging.WARNING, logger="blip2.fast.kernels"):
        assert load() == (True, 2)  # built again, elsewhere
    assert f"blip2 kernels: not using the cache ({reason}); building them for this process only" in caplog.text
    private = Path(loaded[-1]).parent
    assert private != folder and private.name.startswith("blip2-kernels-")
    assert modes == [0o700]
    assert not private.exists()  # removed once loaded: one process's folder, nothing left behind in /tmp
    assert library.read_bytes() == b"library 1"  # the cache was not written either


def test_a_new_cache_folder_is_created_private(tmp_path):
    folder = private_dir(tmp_path / "a" / "kernels")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
