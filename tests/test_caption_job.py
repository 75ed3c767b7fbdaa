"""`blip2 caption` against hostile folders and faults: no file stops the job, no run harms another's output.

Most cases run the command in this process (``main``) with ``--workers 0`` so that a fault can be planted with
monkeypatch; the terminal and the lock's end with a killed run need a real process."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

from blip2.apps.cli import main, read_results
from blip2.apps.errors import CliError
from blip2.apps.pipeline import Pipeline
from blip2.processing import load_image

from test_cli import OPTIONS, TOKENS, cli_env, write_image, write_truncated_png


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


def caption_args(model: str, *paths: str, batch: int = 2) -> list[str]:
    return ["caption", *paths, "--model", model, "--device", "cpu", "--max-new-tokens", str(TOKENS),
            "--batch-size", str(batch), "--workers", "0"]


def want(pipe: Pipeline, path: Path) -> str:
    return pipe.caption([load_image(path)], "", OPTIONS)[0]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


def test_a_file_name_that_is_not_utf8_is_written_losslessly_and_resumed(pipe, tiny_model_dir, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    raw = b"photos/caf\xe9 \xff.png"  # Latin-1 and a byte no encoding gives
    write_image(tmp_path / os.fsdecode(raw), seed=4)
    write_image(tmp_path / "photos" / "plain.png", seed=5)
    args = caption_args(tiny_model_dir, "photos", "-o", "out.jsonl")
    assert main(args) == 0
    out = capsys.readouterr().out
    records = lines(tmp_path / "out.jsonl")
    caption = want(pipe, tmp_path / os.fsdecode(raw))
    assert records == [
        {"image": "photos/caf\\xe9 \\xff.png", "path_bytes": base64.b64encode(raw).decode(), "caption": caption},
        {"image": "photos/plain.png", "caption": want(pipe, tmp_path / "photos" / "plain.png")},
    ]
    assert out.splitlines()[0] == f"photos/caf\\xe9 \\xff.png\t{caption}"
    assert os.fsencode(os.fsdecode(base64.b64decode(records[0]["path_bytes"]))) == raw  # the exact bytes back

    assert main(args + ["--resume"]) == 0  # recognised as done: nothing captioned twice
    assert "done: 0 captioned, 2 already in out.jsonl, 0 failed" in capsys.readouterr().err
    assert len(lines(tmp_path / "out.jsonl")) == 2


def test_a_fifo_is_skipped_not_opened(pipe, tiny_model_dir, tmp_path):
    """A FIFO named like an image, in a folder, given by name and matched by a glob: reported, never opened
    (opening one blocks until a writer comes)."""
    write_image(tmp_path / "photos" / "a.png", seed=1)
    os.mkfifo(tmp_path / "photos" / "x.png")
    os.mkfifo(tmp_path / "y.png")
    (tmp_path / "more").mkdir()
    os.mkfifo(tmp_path / "more" / "z.png")
    r = subprocess.run([sys.executable, "-m", "blip2", *caption_args(tiny_model_dir, "photos", "y.png", "more/*.png")],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    assert r.stdout == f"photos/a.png\t{want(pipe, tmp_path / 'photos' / 'a.png')}\n"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: cannot read image 'photos/x.png': not a regular file but a FIFO",
                      "error: cannot read image 'y.png': not a regular file but a FIFO",
                      "error: cannot read image 'more/z.png': not a regular file but a FIFO"]
    assert "done: 1 captioned, 3 failed" in r.stderr


def test_memory_and_os_errors_cost_only_their_image(pipe, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for name, seed in (("a.png", 1), ("huge.png", 2), ("b.png", 3), ("gone.png", 4)):
        write_image(tmp_path / name, seed=seed)
    real = load_image

    def faulty(path, *a, **kw):  # what a 100M x 1 PNG does to the resize, and a disk error
        if str(path).endswith("huge.png"):
            raise MemoryError()
        if str(path).endswith("gone.png"):
            raise OSError(5, "Input/output error")
        return real(path, *a, **kw)

    monkeypatch.setattr("blip2.processing.load_image", faulty)
    assert main(caption_args(tiny_model_dir, "a.png", "huge.png", "b.png", "gone.png", "-o", "out.jsonl")) == 1
    err = capsys.readouterr().err
    assert "error: cannot read image 'huge.png': out of memory decoding or resizing it" in err
    assert "error: cannot read image 'gone.png': Input/output error" in err
    assert "done: 2 captioned, 2 failed" in err
    assert [r["image"] for r in lines(tmp_path / "out.jsonl")] == ["a.png", "b.png"]


def test_a_batch_out_of_memory_is_retried_image_by_image(pipe, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    names = ["a.png", "b.png", "c.png"]
    for i, name in enumerate(names):
        write_image(tmp_path / name, seed=i)
    expected = [f"{n}\t{want(pipe, tmp_path / n)}" for n in ("a.png", "b.png")]
    too_big = pipe.preprocess([load_image(tmp_path / "c.png")])
    real = Pipeline.caption

    def tight(self, images, prompt="", options=OPTIONS):  # memory for one image only; c.png fails even alone
        if len(images) > 1 or torch.equal(images, too_big):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(self, images, prompt, options)

    monkeypatch.setattr(Pipeline, "caption", tight)
    assert main(caption_args(tiny_model_dir, *names, batch=3)) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == expected
    assert "error: cannot caption 'c.png': out of memory (OutOfMemoryError)" in captured.err
    assert "done: 2 captioned, 1 failed" in captured.err


def test_an_internal_failure_has_its_own_exit_code(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    write_truncated_png(tmp_path / "bad.png")

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(Pipeline, "caption", broken)
    assert main(caption_args(tiny_model_dir, "bad.png", "a.png")) == 3  # not 1: that means unreadable images
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug in the model" in err
    assert err.rstrip().endswith("blip2 caption: internal error (exit code 3; the traceback above says where): "
                                 "results written so far are kept")


def test_a_second_run_on_the_same_output_refuses(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    (tmp_path / "out.jsonl").write_text('{"image": "old.png", "caption": "kept"}\n')
    with open(tmp_path / "out.jsonl") as other:  # another run writing this output holds its lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(caption_args(tiny_model_dir, "a.png", "-o", "out.jsonl", *extra)) == 2
            assert capsys.readouterr().err == (
                "blip2 caption: error: out.jsonl is being written by another run (it holds the file's lock): "
                "wait for it to end, or give another --output\n")
        assert (tmp_path / "out.jsonl").read_text() == '{"image": "old.png", "caption": "kept"}\n'
    assert main(caption_args(tiny_model_dir, "a.png", "-o", "out.jsonl", "--resume")) == 0  # the lock is gone
    assert [r["image"] for r in lines(tmp_path / "out.jsonl")] == ["old.png", "a.png"]
    assert main(caption_args(tiny_model_dir, "a.png", "-o", "out.jsonl", "--resume")) == 0  # and ours went too


def test_bad_results_lines_are_messages(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"image": "b.png", "caption": "x"}\n{"image": "c.png", "caption": "caf\xe9"}\n')
    assert main(caption_args(tiny_model_dir, "a.png", "-o", "out.jsonl", "--resume")) == 2
    assert capsys.readouterr().err == ("blip2 caption: error: out.jsonl: line 2 is not valid UTF-8 (byte 0xe9 at "
                                       "column 35); fix or remove it\n")
    out.write_text('{"image": "b.png", "path_bytes": "not base64!", "caption": "x"}\n')
    with pytest.raises(CliError, match=r'out.jsonl: line 1 has a "path_bytes" field that is not base64'):
        read_results(str(out))


def test_a_prompt_that_is_not_utf8_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    assert main(caption_args(tiny_model_dir, "a.png", "--prompt", os.fsdecode(b"a \xff photo"))) == 2
    assert capsys.readouterr().err == "blip2 caption: error: --prompt 'a \\udcff photo': not valid UTF-8\n"


# -- on a terminal ----------------------------------------------------------------------------------------


def terminal_screen(raw: str) -> list[str]:
    """The rows a terminal shows after ``raw``: carriage return, line feed and erase-to-end-of-line."""
    rows, row, col, i = [""], 0, 0, 0
    while i < len(raw):
        if raw.startswith("\033[K", i):
            rows[row] = rows[row][:col]
            i += 3
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            rows.append("")
        else:
            rows[row] = rows[row][:col].ljust(col) + ch + rows[row][col + 1:]
            col += 1
        i += 1
    return [r for r in rows if r]


def run_on_terminal(args: list[str], cwd: Path, columns: int = 200) -> str:
    """What ``blip2 ARGS`` writes to a terminal (stdout and stderr both on one pseudo-terminal)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "blip2", *args], cwd=cwd, env=cli_env(), stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the other side has closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=120) == 1
    return b"".join(chunks).decode("utf-8")


def test_progress_never_runs_into_the_captions_on_a_terminal(pipe, tiny_model_dir, tmp_path):
    names = [f"photos/{i}.png" for i in range(5)]
    for i, name in enumerate(names):
        write_image(tmp_path / name, seed=i)
    write_truncated_png(tmp_path / "photos" / "3b.png")
    raw = run_on_terminal(caption_args(tiny_model_dir, "photos", batch=1), tmp_path)
    assert "\r" in raw.replace("\r\n", "") and "images/s" in raw  # the progress was drawn in place
    rows = terminal_screen(raw)
    captions = [f"{n}\t{want(pipe, tmp_path / n)}" for n in names]
    assert [r for r in rows if "\t" in r] == captions  # each caption alone on its row, in order
    errors = [r for r in rows if r.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot read image 'photos/3b.png': ")
    others = [r for r in rows if "\t" not in r and not r.startswith("error:")]
    assert len(others) == 2 and others[0].startswith("6/6 images (100%)") and others[1].startswith(
        "done: 5 captioned, 1 failed")
