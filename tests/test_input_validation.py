"""Hostile files and options get a message naming the problem (exit 2 on the command line), never a traceback:
safetensors headers, config values, the server's numeric options."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from blip2.apps.cli import main
from blip2.checkpoint import CheckpointError, iter_checkpoint_tensors
from blip2.config import Blip2Config, ConfigError

from test_cli import write_image


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def read_all(directory: Path) -> list[str]:
    return [key for key, _ in iter_checkpoint_tensors(str(directory))]


def test_a_huge_header_length_is_refused_at_once(tmp_path):
    save_file({"w": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file: .*header too large"):
        read_all(tmp_path)
    assert time.perf_counter() - start < 1.0  # nothing of that size was allocated or read


@pytest.mark.parametrize("entry, problem", [
    # safetensors checks the header itself; the error names the file and says what safetensors found
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 48]}, r"invalid shape, data type, or offset for tensor"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}, r"invalid shape, data type, or offset for tensor"),
    ({"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}, r"invalid value: integer `-2`"),
    ({"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}, r"invalid offset for tensor `w`"),
    ({"dtype": "F33", "shape": [2, 3], "data_offsets": [0, 24]}, r"unknown variant `F33`"),
    ({"shape": [2, 3]}, r"missing field `dtype`"),
])
def test_each_header_entry_is_checked_against_the_file(tmp_path, entry, problem):
    write_safetensors(tmp_path / "model.safetensors", {"w": entry}, bytes(24))
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file: .*" + problem):
        read_all(tmp_path)


def test_a_header_that_is_not_an_object(tmp_path):
    raw = b"[1, 2]"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file: .*expected struct"):
        read_all(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"num_query_tokens": -5}, "config: field 'num_query_tokens' must be above 0, got -5"),
    ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}},
     "config: vision_config: field 'hidden_size' (30) must be a multiple of 'num_attention_heads' (4)"),
    ({"qformer_config": {"hidden_dropout_prob": 1.5}},
     "config: qformer_config: field 'hidden_dropout_prob' must be between 0 and 1, got 1.5"),
    ({"text_config": {"model_type": "opt", "num_hidden_layers": -1}},
     "config: text_config: field 'num_hidden_layers' must be 0 or more, got -1"),
    ({"text_config": {"model_type": "t5", "d_kv": 0}}, "config: text_config: field 'd_kv' must be above 0, got 0"),
])
def test_config_values_a_model_cannot_be_built_from(change, message):
    with pytest.raises(ConfigError) as e:
        Blip2Config.from_dict(change)
    assert str(e.value) == message


def bad_copy(tiny_model_dir: str, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    return model


def test_the_commands_say_what_is_wrong_with_a_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "a.png", seed=1)
    model = bad_copy(tiny_model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_query_tokens": -5}))
    assert main(["caption", "a.png", "--model", str(model), "--workers", "0"]) == 2
    assert capsys.readouterr().err == (f"blip2 caption: error: cannot load model '{model}': "
                                       f"{model / 'config.json'}: field 'num_query_tokens' must be above 0, got -5\n")

    (model / "config.json").write_text(json.dumps(config))
    weights = model / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    assert main(["caption", "a.png", "--model", str(model), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blip2 caption: error: cannot load model '{model}': {weights}: not a valid safetensors "
                          "file: ") and "header too large" in err and "Traceback" not in err


@pytest.mark.parametrize("option, value, message", [
    ("--port", "99999", "argument --port: a port is 0 (any free one) to 65535, got 99999"),
    ("--port", "-1", "argument --port: a port is 0 (any free one) to 65535, got -1"),
    ("--port", "http", "argument --port: invalid port value: 'http'"),
    ("--max-upload-mb", "inf", "argument --max-upload-mb: expected a finite number above 0, got inf"),
    ("--max-upload-mb", "nan", "argument --max-upload-mb: expected a finite number above 0, got nan"),
    ("--max-upload-mb", "0", "argument --max-upload-mb: expected a finite number above 0, got 0"),
    ("--timeout", "-3", "argument --timeout: expected a finite number above 0, got -3"),
    ("--max-wait-ms", "inf", "argument --max-wait-ms: expected a finite number of 0 or more, got inf"),
])
def test_serve_options_out_of_range_are_usage_errors(option, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"blip2 serve: error: {message}") and "Traceback" not in err
