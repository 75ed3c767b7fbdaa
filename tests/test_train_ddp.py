"""A 2-process torchrun (gloo, CPU) stage-1 run equals a 1-process run on the same global batches.

Both start from the same BERT and image encoder (the command seeds the fresh weights), read the same
global batches (each rank its slice), draw the same hard negatives (sampled on the gathered similarity
with a generator every rank seeds alike) and normalise the losses by the global batch, so per-step losses
and final weights agree to float rounding: 1e-5 here.

Left out of the weight comparison: the attention key biases. Softmax ignores them, so their true gradient
is 0; what the backward pass returns is float noise, which differs between a batch of 8 and two of 4,
and Adam scales noise up to full-size steps. They cannot change any output.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from train_fixtures import (  # noqa: E402
    env_with_src,
    one_object_data,
    write_bert_dir,
    write_blip2_dir,
)

TOL = 1e-5
STEPS = 4


def command(out, dirs, *extra):
    return ["-m", "blip2.train", "stage1", "--vision", str(dirs["vision"]), "--bert", str(dirs["bert"]),
            "--num-query-tokens", "4", "--embed-dim", "16", "--data", str(dirs["data"] / "captions.jsonl"),
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "1",
            "--amp", "no", "--frozen-dtype", "fp32", "--max-txt-len", "12", "--log-every", "1", "--seed", "11", *extra]


def test_two_processes_equal_one(tmp_path):
    dirs = {"vision": write_blip2_dir(tmp_path / "vision", "opt", seed=1, vision_layers=1),
            "bert": write_bert_dir(tmp_path / "bert", seed=2),
            "data": one_object_data(tmp_path / "world", 64, seed=3)}
    env = env_with_src()
    one = subprocess.Popen([sys.executable, *command(tmp_path / "one", dirs)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *command(tmp_path / "two", dirs, "--num-workers", "1")], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for proc in (one, two):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]

    rows = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == list(range(1, STEPS + 1))  # rank 0 alone writes
    for a, b in zip(rows["one"], rows["two"]):
        for key in ("loss", "itc", "itm", "itg", "lr"):
            assert b[key] == pytest.approx(a[key], abs=TOL), (a["step"], key)
    assert rows["one"][-1]["loss"] != pytest.approx(rows["one"][0]["loss"], abs=1e-3)  # it did train

    from safetensors.torch import load_file

    for name in ("model.safetensors", "itg_head.safetensors"):
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys()
        for key in a:
            if not key.endswith("key.bias"):
                torch.testing.assert_close(b[key], a[key], atol=TOL, rtol=0, msg=key)
    temps = [json.loads((tmp_path / n / "config.json").read_text())["temperature"] for n in ("one", "two")]
    assert temps[1] == pytest.approx(temps[0], abs=TOL) and temps[0] != pytest.approx(0.07, abs=1e-4)
