"""Training never destroys work: a restart into a run's directory refuses without --resume or --overwrite, the
saved model keeps the frozen weights bit for bit as loaded, and a bad manifest line costs only that line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from train_fixtures import (  # noqa: E402
    NUM_QUERY,
    one_object_data,
    write_bert_dir,
    write_blip2_dir,
    write_vision_preprocessor,
)

from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.processing import Blip2Processor  # noqa: E402
from blip2.train import TrainConfig, build_stage1, load_records, train_stage1, train_stage2  # noqa: E402
from blip2.train.command import main as train_main  # noqa: E402
from blip2.train.loop import CHECKPOINT_FILE  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_guards")
    out = {"opt": write_blip2_dir(root / "opt", "opt", seed=1, vision_layers=1), "bert": write_bert_dir(root / "bert")}
    write_vision_preprocessor(out["opt"])
    out["train"] = one_object_data(root / "world", 16, seed=0) / "captions.jsonl"
    return {k: str(v) for k, v in out.items()}


def small(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(batch_size=4, lr=1e-3, augment=False, log_every=1, seed=3, amp="no"), **kw})


def checkpoint_step(out) -> int:
    return int(torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"])


def test_a_restart_into_a_run_refuses_unless_resume_or_overwrite(dirs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["stage2", "--init", dirs["opt"], "--data", dirs["train"], "--out", str(out), "--batch-size", "4",
            "--amp", "no", "--no-augment", "--log-every", "1"]
    assert train_main(args + ["--max-steps", "4"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert checkpoint_step(out) == 4 and len(before.splitlines()) == 4

    assert train_main(args + ["--max-steps", "2"]) == 2  # the mistake the issue describes: not a silent restart
    assert capsys.readouterr().err.endswith(
        f"blip2 train: error: {out} already holds a training run (checkpoint/state.pt, metrics.jsonl, config.json): "
        "pass --resume to continue it, or --overwrite to start again\n")
    assert (out / "metrics.jsonl").read_text() == before and checkpoint_step(out) == 4

    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])  # the library refuses too
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    with pytest.raises(ValueError, match="already holds a training run"):
        train_stage2(model, processor, dirs["train"], small(max_steps=2, out_dir=str(out)))

    assert train_main(args + ["--max-steps", "2", "--resume", "--overwrite"]) == 2
    assert "resume and overwrite exclude each other" in capsys.readouterr().err
    assert train_main(args + ["--max-steps", "2", "--overwrite"]) == 0  # started again, from step 0
    assert checkpoint_step(out) == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_overwrite_deletes_the_earlier_checkpoint_first(dirs, tmp_path, monkeypatch):
    """A run started with --overwrite and killed before its first checkpoint leaves none of the earlier run's
    for a later --resume to continue by mistake."""
    out = tmp_path / "run"
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    train_stage2(model, processor, dirs["train"], small(max_steps=3, out_dir=str(out)))
    assert checkpoint_step(out) == 3

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("blip2.train.loop._optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train_stage2(model, processor, dirs["train"], small(max_steps=6, out_dir=str(out), overwrite=True))
    assert not (out / CHECKPOINT_FILE).exists()


def test_stage1_output_keeps_the_frozen_encoder_as_loaded(dirs, tmp_path):
    """With frozen_dtype=bf16 (the presets' setting) the ViT runs in bf16, but the saved checkpoint holds it
    in fp32 as loaded, bit for bit; the trained parts are saved as trained."""
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    vision = stage1.model.vision_model
    loaded = {f"vision_model.{k}": v.clone() for k, v in vision.state_dict().items()
              if k.startswith(("embeddings.", "encoder."))}
    assert loaded and all(v.dtype == torch.float32 for v in loaded.values())
    train_stage1(stage1, processor, dirs["train"], small(max_steps=2, frozen_dtype="bf16", out_dir=str(tmp_path)))
    assert vision.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16  # it did run in bf16
    saved = load_file(tmp_path / "model.safetensors")
    for key, value in loaded.items():
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], value), key
    trained = "vision_model.post_layernorm.weight"  # ln_vision, trained with the Q-Former
    assert torch.equal(saved[trained], vision.post_layernorm.weight.detach())
    assert torch.equal(saved["query_tokens"], stage1.model.query_tokens.detach())


def test_a_manifest_line_that_is_not_utf8_is_skipped_with_its_line(dirs, tmp_path, caplog):
    good = json.loads(open(dirs["train"]).readline())
    image = str(Path(dirs["train"]).parent / good["image"])
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join([json.dumps({"image": image, "caption": "a red circle"}).encode(),
                                     b'{"image": "x.png", "caption": "caf\xe9"}',
                                     json.dumps({"image": image, "caption": "a blue square"}).encode()]) + b"\n")
    with caplog.at_level(logging.WARNING, logger="blip2.train"):
        records, skipped = load_records(str(manifest))
    assert [r.caption for r in records] == ["a red circle", "a blue square"] and skipped == 1
    assert f"{manifest}:2: skipped, not UTF-8 (byte 0xe9 at column 35)" in caplog.text
