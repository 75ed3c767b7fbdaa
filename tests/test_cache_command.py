"""``blip2 cache``: the cache folder's files listed with their kind, size and source checkpoint; ``clear`` removes
all of them, or those made from one checkpoint (and the layouts made from its converted copy), or one folder of
the cache, never a file a live process is still writing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from blip2 import Blip2ForConditionalGeneration, layout_files
from blip2.apps import cache_command, cli
from conftest import hf_blip2


@pytest.fixture
def root(layout_cache_folder):
    return layout_cache_folder.parent


def cached(root, name: str, sources: list[str], fmt: str, nbytes: int = 4096):
    """A file as the cache's writers leave one: its metadata names its key, sources and format."""
    path = root / "layouts" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(nbytes // 4)}, str(path), metadata={"key": "k", "files": json.dumps(sources),
                                                                     "format": fmt})
    return path


def checkpoint_dir(tmp_path, name: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    return str(d / "model.safetensors")


def dead_pid() -> int:
    pid = 2**22 - 1
    while layout_files.alive(pid):
        pid -= 1
    return pid


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["cache", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_converted_copy_is_listed_with_its_size_and_checkpoint_then_cleared(tmp_path, root, capsys):
    d = tmp_path / "ckpt"
    hf_blip2("opt", seed=3).save_pretrained(d)
    Blip2ForConditionalGeneration.from_pretrained(str(d), dtype=torch.bfloat16)
    layout_files.wait()
    [copy] = list((root / "layouts").iterdir())
    code, out, _ = run(capsys)
    assert code == 0
    [row] = [line for line in out.splitlines() if line.startswith("converted copy bf16 ")]
    assert f"layouts/{copy.name}" in row and str(d) in row
    assert cache_command.size_text(copy.stat().st_size) in row
    assert out.splitlines()[0] == f"{root}: {cache_command.size_text(copy.stat().st_size)} in 1 entry"

    code, out, _ = run(capsys, "clear", "--model", str(d))
    assert code == 0 and "removed 1 entry" in out
    assert not copy.exists()


def test_clear_model_takes_its_files_and_the_layouts_made_from_them(tmp_path, root, capsys):
    a, b = checkpoint_dir(tmp_path, "a"), checkpoint_dir(tmp_path, "b")
    copy_a = cached(root, "s1-k1.safetensors", [a], "converted v1", 8192)
    layout_a = cached(root, "s2-k2.safetensors", [a, str(copy_a)], "blocked v3")  # made from a's converted copy
    layout_b = cached(root, "s3-k3.safetensors", [b], "blocked v3")
    layout_c = cached(root, "s4-k4.safetensors", [str(layout_a)], "blocked v3")  # (a chain: its sources, cached)

    code, out, _ = run(capsys)
    assert "(through its converted copy)" in next(r for r in out.splitlines() if layout_a.name in r)
    assert next(r for r in out.splitlines() if copy_a.name in r).startswith("converted copy")

    code, out, _ = run(capsys, "clear", "--model", os.path.dirname(a))
    assert code == 0 and "removed 3 entries" in out
    assert not copy_a.exists() and not layout_a.exists() and not layout_c.exists() and layout_b.exists()


def test_a_checkpoint_folder_that_is_gone_is_still_cleared_by_name(tmp_path, root, capsys):
    a = checkpoint_dir(tmp_path, "a")
    copy_a = cached(root, "s1-k1.safetensors", [a], "converted v1")
    shutil.rmtree(os.path.dirname(a))
    code, out, _ = run(capsys)
    assert "[gone: removed at the next write]" in out
    code, out, _ = run(capsys, "clear", "--model", os.path.dirname(a))
    assert code == 0 and not copy_a.exists()


def test_an_unknown_model_folder_is_an_error_naming_it(tmp_path, root, capsys):
    cached(root, "s1-k1.safetensors", [checkpoint_dir(tmp_path, "a")], "converted v1")
    code, out, err = run(capsys, "clear", "--model", str(tmp_path / "nope"))
    assert code == 2 and f"--model {tmp_path / 'nope'}: no such folder" in err
    assert len(list((root / "layouts").iterdir())) == 1  # nothing removed


def test_clear_kind_and_files_being_written(tmp_path, root, capsys):
    a = checkpoint_dir(tmp_path, "a")
    copy_a = cached(root, "s1-k1.safetensors", [a], "converted v1")
    writing = root / "layouts" / f".s9-k9.safetensors.abc.{os.getpid()}.tmp"  # this process: alive
    left = root / "layouts" / f".s8-k8.safetensors.abc.{dead_pid()}.tmp"
    writing.write_bytes(b"x" * 100)
    left.write_bytes(b"x" * 100)
    (root / "kernels").mkdir()
    (root / "kernels" / "blip2_kernels-abc.so").write_bytes(b"x" * 1000)
    (root / "kernels" / "blip2_kernels-abc.so.sha256").write_bytes(b"x" * 64)

    code, out, _ = run(capsys)
    kinds = {line.split("  ")[0].strip(): line for line in out.splitlines()[2:]}
    assert set(kinds) == {"converted copy fp32", "being written", "unfinished", "kernels"}
    assert "kernels/ (2 files)" in kinds["kernels"] and "1.1 kB" in kinds["kernels"]

    code, out, _ = run(capsys, "clear", "--kind", "kernels")
    assert code == 0 and "removed 1 entry" in out and "1.1 kB freed" in out
    assert not list((root / "kernels").iterdir()) and copy_a.exists()

    code, out, err = run(capsys, "clear")
    assert code == 0 and "removed 2 entries" in out
    assert f"kept {writing}: being written by a running process" in err
    assert writing.exists() and not left.exists() and not copy_a.exists()


def test_an_empty_or_missing_cache_lists_nothing(root, capsys):
    code, out, _ = run(capsys)
    assert code == 0 and out.splitlines() == [f"{root}: 0 B in 0 entries"]
    code, out, _ = run(capsys, "clear")
    assert code == 0 and "removed nothing" in out
