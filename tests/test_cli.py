"""The `blip2` command, run as users run it (a subprocess), against a tiny random checkpoint.

Expected texts come from the Pipeline called directly in this process, one image at a time."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.apps.cli import expand_inputs, main, read_results
from blip2.apps.pipeline import GenerationOptions, Pipeline
from blip2.processing import load_image

TOKENS = 5
OPTIONS = GenerationOptions(max_new_tokens=TOKENS)


def cli_env() -> dict[str, str]:
    src = str(Path(blip2.__file__).resolve().parents[1])  # the blip2 these tests imported
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_blip2(*args: str, cwd: Path, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip2", *args], cwd=cwd, env=cli_env(), input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_image(path: Path, seed: int, size: tuple[int, int] = (36, 30)) -> Path:
    rng = np.random.RandomState(seed)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + rng.randint(0, 256, 3).astype(np.uint8)
    pixels[rng.randint(0, size[1]):, : rng.randint(1, size[0])] = rng.randint(0, 256, 3)  # a block of colour
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_truncated_png(path: Path) -> Path:
    write_image(path, seed=99, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def retrieval(tiny_retrieval_dir) -> Pipeline:
    return Pipeline.load(tiny_retrieval_dir, device="cpu")


@pytest.fixture()
def photos(tmp_path) -> Path:
    """photos/{a.png, b.jpg, nested/c.png} readable; broken.png truncated; fake.jpg text; notes.md ignored."""
    root = tmp_path / "photos"
    write_image(root / "a.png", 1)
    write_image(root / "b.jpg", 2)
    write_image(root / "nested" / "c.png", 3)
    write_truncated_png(root / "broken.png")
    (root / "fake.jpg").write_text("this is not a JPEG")
    (root / "notes.md").write_text("not an image, not listed")
    return root


def expected_captions(pipe: Pipeline, paths: list[str], cwd: Path, prompt: str = "") -> dict[str, str]:
    return {p: pipe.caption([load_image(cwd / p)], prompt, OPTIONS)[0] for p in paths}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_expand_inputs_files_folders_globs_lists(photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.txt").write_text("# chosen\nphotos/a.png\n\nphotos/nested/c.png\n")
    found, problems = expand_inputs(["photos/nested", "photos/*.png", "list.txt", "photos/a.png", "nope.png",
                                     "photos/*.gif"])
    assert found == ["photos/nested/c.png", "photos/a.png", "photos/broken.png"]
    assert problems == [("nope.png", "no such file or folder"), ("photos/*.gif", "no file matches this pattern")]
    found, _ = expand_inputs(["photos"])
    assert found == ["photos/a.png", "photos/b.jpg", "photos/broken.png", "photos/fake.jpg", "photos/nested/c.png"]


def test_caption_folder_writes_jsonl_and_reports_bad_files(pipe, tiny_model_dir, photos):
    cwd = photos.parent
    r = run_blip2("caption", "photos", "missing.png", "--model", tiny_model_dir, "--device", "cpu",
                  "--max-new-tokens", str(TOKENS), "--batch-size", "2", "--workers", "2", "-o", "out.jsonl", cwd=cwd)
    assert r.returncode == 1, r.stderr
    good = ["photos/a.png", "photos/b.jpg", "photos/nested/c.png"]
    want = expected_captions(pipe, good, cwd)
    assert jsonl(cwd / "out.jsonl") == [{"image": p, "caption": want[p]} for p in good]
    assert r.stdout.splitlines() == [f"{p}\t{want[p]}" for p in good]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == "error: missing.png: no such file or folder"
    assert len(errors) == 3
    assert "'photos/broken.png'" in errors[1] and "truncated" in errors[1]
    assert "'photos/fake.jpg'" in errors[2]
    assert "5/5 images (100%)" in r.stderr and "images/s" in r.stderr
    assert "done: 3 captioned, 3 failed in" in r.stderr


def test_caption_prompt_glob_list_file_and_output_protection(pipe, tiny_model_dir, photos):
    cwd = photos.parent
    (cwd / "list.txt").write_text("photos/b.jpg\n")
    args = ["caption", "photos/*.png", "list.txt", "--model", tiny_model_dir, "--device", "cpu", "--prompt", "w5 w6",
            "--max-new-tokens", str(TOKENS), "--workers", "0", "-o", "out.jsonl"]
    (cwd / "out.jsonl").write_text('{"image": "old.png", "caption": "kept"}\n')
    r = run_blip2(*args, cwd=cwd)
    assert r.returncode == 2
    assert r.stderr.strip() == ("blip2 caption: error: out.jsonl already has results: pass --resume to continue it, "
                                "or --overwrite to start again")
    assert (cwd / "out.jsonl").read_text() == '{"image": "old.png", "caption": "kept"}\n'

    os.remove(photos / "broken.png")
    r = run_blip2(*args, "--overwrite", cwd=cwd)
    assert r.returncode == 0, r.stderr
    order = ["photos/a.png", "photos/b.jpg"]
    want = expected_captions(pipe, order, cwd, prompt="w5 w6")
    assert want != expected_captions(pipe, order, cwd)  # the prompt is used
    assert jsonl(cwd / "out.jsonl") == [{"image": p, "prompt": "w5 w6", "caption": want[p]} for p in order]
    assert "done: 2 captioned, 0 failed in" in r.stderr


def test_killed_run_resumed_loses_nothing_and_repeats_nothing(pipe, tiny_model_dir, tmp_path):
    n = 48
    for i in range(n):
        write_image(tmp_path / "many" / f"{i:03d}.png", seed=i % 6)
    args = ["caption", "many", "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "1", "--workers", "1",
            "--max-new-tokens", "30", "-o", "out.jsonl"]
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "blip2", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    before = out.read_text().splitlines()
    assert 3 <= len(before) < n
    with open(out, "a") as f:  # as if the kill had landed in the middle of a write
        f.write('{"image": "many/0')

    r = run_blip2(*args, "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dropping an incomplete last line" in r.stderr
    assert f"{len(before)} already in out.jsonl" in r.stderr and f"{n - len(before)} captioned" in r.stderr
    lines = out.read_text().splitlines()
    assert lines[: len(before)] == before
    records = [json.loads(line) for line in lines]
    assert sorted(r["image"] for r in records) == [f"many/{i:03d}.png" for i in range(n)]  # each exactly once
    want = {f"many/{i:03d}.png": pipe.caption([load_image(tmp_path / "many" / f"{i:03d}.png")],
                                               options=GenerationOptions(max_new_tokens=30))[0] for i in range(6)}
    assert all(r["caption"] == want[f"many/{int(r['image'][5:8]) % 6:03d}.png"] for r in records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_one_line_per_image(pipe, tiny_model_dir, tmp_path):
    n = 7
    for i in range(n):
        write_image(tmp_path / "set" / f"{i}.png", seed=10 + i)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "blip2", "caption", "set", "--model", tiny_model_dir,
           "--device", "cpu", "--batch-size", "2", "--workers", "1", "--max-new-tokens", str(TOKENS), "-o", "out.jsonl"]
    env = {**cli_env(), "GLOO_SOCKET_IFNAME": "lo"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    order = [f"set/{i}.png" for i in range(n)]
    want = expected_captions(pipe, order, tmp_path)
    assert jsonl(tmp_path / "out.jsonl") == [{"image": p, "caption": want[p]} for p in order]
    assert sorted(r.stdout.splitlines()) == sorted(f"{p}\t{want[p]}" for p in order)  # each rank prints its share
    assert not list(tmp_path.glob("out.jsonl.rank*"))
    assert "done: 7 captioned, 0 failed" in r.stderr


def test_ask_and_chat_keep_history(pipe, tiny_model_dir, tmp_path, monkeypatch, capsys):
    image = write_image(tmp_path / "q.png", seed=5)
    r = run_blip2("ask", "q.png", "w5 w6", "w7", "--model", tiny_model_dir, "--device", "cpu",
                  "--max-new-tokens", str(TOKENS), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    picture = load_image(image)
    assert r.stdout.splitlines() == [pipe.ask([picture], [q], OPTIONS)[0] for q in ("w5 w6", "w7")]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("w5 w6\n\nw7\n"))  # a blank line is skipped; EOF ends the chat
    assert main(["chat", "q.png", "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", str(TOKENS)]) == 0
    first = pipe.chat(picture, [], "w5 w6", OPTIONS)
    second = pipe.chat(picture, [("w5 w6", first)], "w7", OPTIONS)
    assert second != pipe.chat(picture, [], "w7", OPTIONS)  # the history changes the answer
    assert capsys.readouterr().out.splitlines() == [first, second]


def test_match_prints_itm_and_itc(retrieval, tiny_retrieval_dir, tmp_path, capsys):
    image = write_image(tmp_path / "m.png", seed=6)
    assert main(["match", str(image), "w5 w6", "w7 w8 w9", "--model", tiny_retrieval_dir, "--device", "cpu"]) == 0
    scores = retrieval.match(load_image(image), ["w5 w6", "w7 w8 w9"])
    assert capsys.readouterr().out.splitlines() == [f"itm={s.itm:.4f}\titc={s.itc:.4f}\t{s.text}" for s in scores]


@pytest.mark.parametrize("command", ["caption", "ask", "chat", "match", "search", "embed", "serve"])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: blip2 {command}")
    assert "--model DIR_OR_HUB_ID" in out and "--device auto|cpu|cuda" in out


def test_a_command_whose_module_is_broken_breaks_no_other(pipe, tiny_model_dir, photos, capsys, monkeypatch):
    """The delegated commands (train, eval, bench) import their module only when chosen."""
    for name in [m for m in sys.modules if m == "blip2.train" or m.startswith("blip2.train.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "blip2.train", None)  # import blip2.train -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "train" in capsys.readouterr().out
    monkeypatch.chdir(photos.parent)
    want = expected_captions(pipe, ["photos/a.png"], photos.parent)
    assert main(["caption", "photos/a.png", "--model", tiny_model_dir, "--device", "cpu", "--workers", "0",
                 "--max-new-tokens", str(TOKENS)]) == 0
    assert capsys.readouterr().out == f"photos/a.png\t{want['photos/a.png']}\n"
    assert main(["train", "--preset", "x"]) == 2
    assert capsys.readouterr().err == ("blip2 train: error: this command is unavailable: importing blip2.train failed "
                                       "(ModuleNotFoundError: import of blip2.train halted; None in sys.modules)\n")


@pytest.mark.parametrize("command", ["caption", "ask", "chat", "match", "search", "embed", "serve", "eval", "bench"])
def test_every_command_spells_dtype_and_fast_alike(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps lines where it likes
    assert "--dtype {auto,float32,bfloat16,float16,fp32,bf16,fp16}" in usage
    if command in ("caption", "ask", "chat", "serve", "bench"):
        assert "--fast {none,auto,fuse,int8,int8-dynamic,native,cuda-graph}" in usage


def test_eval_is_handed_its_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: blip2 eval [-h] --task")
    assert main(["eval", "--task", "gqa", "--model", "m", "--images", "nowhere"]) == 1  # eval's own exit code
    assert capsys.readouterr().err.startswith("error: ")


def test_usage_errors_are_messages_not_tracebacks(tiny_model_dir, tiny_retrieval_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_truncated_png(tmp_path / "bad.png")
    write_image(tmp_path / "ok.png", seed=1)
    assert main(["ask", "bad.png", "what?", "--model", tiny_model_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blip2 ask: error: cannot read image 'bad.png'") and "Traceback" not in err

    monkeypatch.setattr("blip2.apps.pipeline.DEFAULT_MODEL", str(tmp_path / "no-demo"))
    assert main(["ask", "ok.png", "what?"]) == 2
    assert capsys.readouterr().err == (
        f"blip2 ask: error: --model: no model given and the bundled demo model is not installed "
        f"({tmp_path / 'no-demo'}); give a checkpoint directory or Hub id, e.g. Salesforce/blip2-opt-2.7b\n")

    assert main(["ask", "ok.png", "what?", "--model", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"blip2 ask: error: cannot load model '{tmp_path / 'nowhere'}': ")

    assert main(["caption", "ok.png", "--model", tiny_retrieval_dir, "--workers", "0"]) == 2
    assert capsys.readouterr().err.startswith("blip2 caption: error: text generation needs a captioning checkpoint")
    assert main(["ask", "ok.png", "q", "--model", tiny_model_dir, "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "blip2 ask: error: max_new_tokens must be a positive integer, got 0\n"
    assert main(["caption", "ok.png", "-o", "new/out.jsonl"]) == 2
    assert capsys.readouterr().err == f"blip2 caption: error: new/out.jsonl: the folder {tmp_path / 'new'} does not exist\n"
    assert main(["caption", "ok.png", "--resume"]) == 2
    assert capsys.readouterr().err == "blip2 caption: error: --resume and --overwrite need --output\n"
    assert main(["match", "ok.png", "w5", "--model", tiny_model_dir]) == 2
    assert capsys.readouterr().err.startswith("blip2 match: error: image-text matching needs an image-text retrieval")


def test_read_results_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"image": "a.png", "caption": "x"}\nnot json\n{"image": "b.png", "caption": "y"}\n')
    with pytest.raises(Exception, match=r"r.jsonl: line 2 is not valid JSON"):
        read_results(str(path))
    path.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.p')
    records, complete = read_results(str(path))
    assert records == [{"image": "a.png", "caption": "x"}] and complete == len('{"image": "a.png", "caption": "x"}\n')


def test_library_imports_neither_transformers_nor_the_server(tmp_path):
    code = ("import sys, blip2, blip2.apps.cli, blip2.apps.pipeline; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'fastapi', 'uvicorn', 'starlette'}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                       timeout=120, check=False)
    assert (r.returncode, r.stdout) == (0, "[]\n"), r.stderr


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "blip2.apps.server" or m.startswith(("blip2.apps.server.", "fastapi"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ModuleNotFoundError
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err == ("blip2 serve: error: blip2 serve needs the serve extra (fastapi is missing): "
                                       "pip install 'blip2[serve]'\n")


def test_search_indexes_a_folder_once_then_only_new_images(retrieval, tiny_retrieval_dir, photos, capsys,
                                                           monkeypatch):
    monkeypatch.chdir(photos.parent)
    args = ["search", "photos", "w5 w6", "--model", tiny_retrieval_dir, "--k", "3", "--rerank-k", "0"]
    assert main(args) == 1  # broken.png and fake.jpg are reported and left out
    out, err = capsys.readouterr()
    good = ["photos/a.png", "photos/b.jpg", "photos/nested/c.png"]
    itc = {p: retrieval.match(load_image(p), ["w5 w6"])[0].itc for p in good}  # ITC-only ranking = match's itc
    ranked = sorted(good, key=lambda p: -itc[p])
    assert out.splitlines() == [f"{itc[p]:.4f}\t{p}" for p in ranked]
    assert "error: cannot read image 'photos/broken.png'" in err
    assert "indexed 3 new images in photos/.blip2-index (3 in all)" in err
    assert (photos / ".blip2-index" / "index.json").is_file()

    write_image(photos / "d.png", 4)
    for bad in ("broken.png", "fake.jpg"):
        os.remove(photos / bad)
    assert main(args[:3] + ["--model", tiny_retrieval_dir, "--k", "3", "--rerank-k", "4"]) == 0
    out, err = capsys.readouterr()
    assert "indexed 1 new images in photos/.blip2-index (4 in all)" in err
    assert len(out.splitlines()) == 3 and {line.split("\t")[1] for line in out.splitlines()} < {*good, "photos/d.png"}
    assert main(args[:3] + ["--model", tiny_retrieval_dir, "--k", "3", "--rerank-k", "4"]) == 0
    again, err = capsys.readouterr()
    assert again == out and "indexed" not in err  # nothing new: the saved index is reused as it is
    assert main(["search", "photos/.blip2-index", "w5 w6", "--model", tiny_retrieval_dir, "--k", "3",
                 "--rerank-k", "4"]) == 0
    assert capsys.readouterr().out == out
    assert main(["search", "photos", "w5", "--model", tiny_retrieval_dir, "--k", "3", "--rerank-k", "2"]) == 2
    assert capsys.readouterr().err == ("blip2 search: error: --k and --batch-size must be at least 1, --rerank-k 0 "
                                       "(ITC only) or at least --k\n")


def test_embed_writes_safetensors_consistent_with_match(retrieval, tiny_retrieval_dir, photos, capsys, monkeypatch):
    from safetensors import safe_open

    monkeypatch.chdir(photos.parent)
    args = ["embed", "photos", "--text", "w5 w6", "--text", "w7", "-o", "f.safetensors", "--model", tiny_retrieval_dir]
    assert main(args) == 1
    assert capsys.readouterr().err.endswith("done: 3 images and 2 texts embedded, 2 failed; wrote f.safetensors\n")
    with safe_open("f.safetensors", "pt") as f:
        meta = f.metadata()
        images, texts = f.get_tensor("image_embeds"), f.get_tensor("text_embeds")
    good = ["photos/a.png", "photos/b.jpg", "photos/nested/c.png"]
    assert json.loads(meta["images"]) == good and json.loads(meta["texts"]) == ["w5 w6", "w7"]
    assert meta["model"] == tiny_retrieval_dir
    assert images.shape == (3, 4, 16) and texts.shape == (2, 16)
    assert torch_allclose(images.norm(dim=-1), 1.0) and torch_allclose(texts.norm(dim=-1), 1.0)
    for i, path in enumerate(good):
        scores = retrieval.match(load_image(path), ["w5 w6", "w7"])
        for j in range(2):
            assert float((images[i] @ texts[j]).max()) == pytest.approx(scores[j].itc, abs=1e-5)
    assert main(args) == 2
    assert capsys.readouterr().err == "blip2 embed: error: f.safetensors exists: pass --overwrite to replace it\n"


def torch_allclose(t, value: float) -> bool:
    return bool(((t - value).abs() < 1e-5).all())


def test_convert_lavis_checkpoint_then_caption(pipe, tmp_path, capsys, monkeypatch):
    import torch
    from conftest import hf_blip2, tiny_processor
    from test_convert_lavis import to_lavis, zero_key_bias_

    monkeypatch.chdir(tmp_path)
    ref = hf_blip2("opt", seed=6)
    zero_key_bias_(ref)  # EVA has no key bias, so LAVIS cannot hold one
    ref.save_pretrained(tmp_path / "hf")
    tiny_processor().save_pretrained(tmp_path / "hf")
    torch.save(to_lavis(ref, "opt"), tmp_path / "lavis.pth")
    capsys.readouterr()

    assert main(["convert", "lavis.pth", "-o", "preset", "--kind", "opt"]) == 2  # a tiny model is not OPT-2.7b
    assert capsys.readouterr().err.startswith(
        "blip2 convert: error: the LAVIS state dict lacks weights for: ['vision_model.encoder.layers.2.")
    assert not (tmp_path / "preset").exists()

    assert main(["convert", "lavis.pth", "-o", "out", "--kind", "opt", "--config", "hf/config.json",
                 "--processor", "hf"]) == 0
    assert capsys.readouterr().err == "wrote out\n"
    image = [load_image(write_image(tmp_path / "x.png", 3))]
    converted, original = Pipeline.load("out", device="cpu"), Pipeline.load("hf", device="cpu")
    assert converted.caption(image, "w5", OPTIONS) == original.caption(image, "w5", OPTIONS)


def test_fast_option_same_captions_and_errors(pipe, tiny_model_dir, photos, capsys, monkeypatch):
    """--fast fuse gives the plain captions; int8 quantizes the LM; cuda-graph needs CUDA."""
    from blip2.fast.linear import fused_format

    monkeypatch.chdir(photos.parent)
    paths = ["photos/a.png", "photos/b.jpg"]
    want = expected_captions(pipe, paths, photos.parent)
    assert main(["caption", *paths, "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", str(TOKENS),
                 "--workers", "0", "--fast", "fuse"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{want[p]}" for p in paths]
    fused = Pipeline.load(tiny_model_dir, device="cpu", fast="fuse")
    assert fused.caption([load_image(photos / "a.png")], "", OPTIONS) == [want["photos/a.png"]]
    assert fused_format(Pipeline.load(tiny_model_dir, device="cpu", fast="int8").model.language_model) == "int8"
    assert main(["ask", "photos/a.png", "what ?", "--model", tiny_model_dir, "--device", "cpu",
                 "--fast", "cuda-graph"]) == 2
    assert "error: --fast cuda-graph: needs a CUDA device; the model is on cpu\n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", "photos", "--fast", "turbo"])
    assert "invalid choice: 'turbo'" in capsys.readouterr().err


def test_fast_native_same_captions_and_errors(pipe, tiny_model_dir, photos, capsys, monkeypatch):
    """--fast native: one image and a batch decode with the native step (the same captions as plain); where
    the kernels cannot load, the command says why."""
    from blip2.fast import kernels
    from blip2.fast.native import NativeOPTStep, NativeT5Step
    from test_kernels import _cpu_can_build

    if not _cpu_can_build():
        pytest.skip("needs Linux x86-64 with AVX-512 F/BW or AVX2/FMA and a C++ compiler")
    monkeypatch.chdir(photos.parent)
    paths = ["photos/a.png", "photos/b.jpg"]
    want = expected_captions(pipe, paths, photos.parent)
    fast = Pipeline.load(tiny_model_dir, device="cpu", fast="native")
    step = fast.model.language_model.decode_step
    assert isinstance(step, (NativeOPTStep, NativeT5Step)) and step.batched
    for p in paths:  # one image: native steps
        assert fast.caption([load_image(photos.parent / p)], "", OPTIONS) == [want[p]]
    assert main(["caption", *paths, "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", str(TOKENS),
                 "--workers", "0", "--fast", "native"]) == 0  # a batch of two, natively too
    assert capsys.readouterr().out.splitlines() == [f"{p}\t{want[p]}" for p in paths]
    monkeypatch.setattr(kernels, "_loaded", False)
    monkeypatch.setattr(kernels, "_tried", True)
    monkeypatch.setattr(kernels, "_status", "disabled by BLIP2_KERNELS")
    assert main(["caption", *paths, "--model", tiny_model_dir, "--device", "cpu", "--fast", "native"]) == 2
    assert "--fast native: blip2.fast.kernels is not loaded: disabled by BLIP2_KERNELS" in capsys.readouterr().err


def test_fast_int8_dynamic_captions_and_errors(tiny_model_dir, photos, capsys, monkeypatch):
    """--fast int8-dynamic puts the language model and the vision encoder in int8-dynamic and captions;
    where the kernels are missing, the command says so instead of failing deep inside."""
    import blip2.fast.linear as fused
    from blip2.fast.linear import fused_format

    monkeypatch.chdir(photos.parent)
    pipe = Pipeline.load(tiny_model_dir, device="cpu", fast="int8-dynamic")
    assert fused_format(pipe.model.language_model) == fused_format(pipe.model.vision_model) == "int8-dynamic"
    paths = ["photos/a.png", "photos/b.jpg"]
    assert main(["caption", *paths, "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", str(TOKENS),
                 "--workers", "0", "--fast", "int8-dynamic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert lines == [f"{p}\t{c}" for p, c in zip(paths, pipe.caption([load_image(p) for p in paths], "", OPTIONS))]
    monkeypatch.setattr(fused, "dynamic_int8_available", lambda: False)
    assert main(["caption", *paths, "--model", tiny_model_dir, "--device", "cpu", "--fast", "int8-dynamic"]) == 2
    assert "--fast int8-dynamic: int8-dynamic format needs a CPU with torch's int8 kernels" in capsys.readouterr().err
