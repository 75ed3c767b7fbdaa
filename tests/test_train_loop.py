"""The training loop and data: schedule, data sources and skipping, sampling, augmentation, frozen parts,
precision, accumulation, learning on the synthetic world, resumption (in process and after a kill)."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from train_fixtures import (  # noqa: E402
    NUM_QUERY,
    env_with_src,
    one_object_data,
    write_bert_dir,
    write_blip2_dir,
    write_vision_preprocessor,
)

from blip2.images import Blip2ImageProcessor  # noqa: E402
from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.processing import Blip2Processor  # noqa: E402
from blip2.train import (  # noqa: E402
    Blip2Stage2,
    GlobalBatchSampler,
    ImageTextDataset,
    Stage1Text,
    Stage2Text,
    TrainConfig,
    TrainTransform,
    build_stage1,
    load_records,
    lr_at,
    train_stage1,
    train_stage2,
)
from blip2.train.command import _settings, build_parser  # noqa: E402
from blip2.train.common import make_dataset  # noqa: E402
from blip2.train.data import collate  # noqa: E402
from blip2.train.loop import CHECKPOINT_FILE  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_loop")
    out = {"opt": write_blip2_dir(root / "opt", "opt", seed=1, vision_layers=0),
           "opt_drop": write_blip2_dir(root / "opt_drop", "opt", seed=1, vision_layers=1, dropout=0.1),
           "bert": write_bert_dir(root / "bert", seed=3), "bert_drop": write_bert_dir(root / "bert_drop", seed=3, dropout=0.1)}
    write_vision_preprocessor(out["opt"])
    write_vision_preprocessor(out["opt_drop"])
    out["train"] = one_object_data(root / "world", 320, seed=0, split="train")
    out["val"] = one_object_data(root / "world", 48, seed=1, split="val")
    return {k: str(v) for k, v in out.items()}


def small(**kw) -> TrainConfig:
    base = dict(batch_size=8, lr=5e-3, min_lr=5e-4, warmup_lr=5e-4, warmup_steps=2, augment=False, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def stage1_model(dirs, bert: str = "bert", vision: str = "opt"):
    torch.manual_seed(0)
    return build_stage1(dirs[vision], dirs[bert], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)


# -- schedule -----------------------------------------------------------------------------------------


def test_lr_schedule_numbers():
    cfg = TrainConfig(lr=1e-3, warmup_lr=1e-5, warmup_steps=10, min_lr=1e-4)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(5, cfg, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.9e-3 / 2)  # half-way down the cosine
    assert lr_at(85, cfg, 110) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)


def test_presets_and_config_precedence(tmp_path):
    assert TrainConfig.preset("stage1").lr == 1e-4 and TrainConfig.preset("stage2").min_lr == 5e-5
    assert TrainConfig.preset("finetune_caption").freeze_vision is False
    (tmp_path / "c.yaml").write_text("preset: stage2\nlr: 3.0e-4\nbatch_size: 16\ndata: a.jsonl\nout: o\n")
    args = build_parser().parse_args(["stage2", "--config", str(tmp_path / "c.yaml"), "--batch-size", "4"])
    cfg, paths = _settings(args)
    assert (cfg.lr, cfg.batch_size, cfg.min_lr, cfg.out_dir) == (3e-4, 4, 5e-5, "o")  # file < flag; preset kept
    assert paths["data"] == ["a.jsonl"]
    args = build_parser().parse_args(["finetune", "--data", "x", "--out", "y", "--task", "vqa"])
    cfg, _ = _settings(args)
    assert cfg.prompt == "Question: {} Answer:" and cfg.freeze_vision is False
    (tmp_path / "bad.json").write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        _settings(build_parser().parse_args(["stage1", "--config", str(tmp_path / "bad.json"), "--data", "x", "--out", "y"]))


# -- data -----------------------------------------------------------------------------------------------


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def test_manifest_skips_and_counts_bad_lines_and_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "img" / "blue.png").write_bytes(png_bytes((0, 0, 255)))
    (tmp_path / "img" / "broken.png").write_bytes(png_bytes((0, 255, 0))[:40])  # truncated
    lines = [json.dumps({"image": "img/red.png", "caption": "red"}), "{not json",
             json.dumps({"image": "img/red.png"}), json.dumps({"caption": "no image"}), "",
             json.dumps({"image": "img/broken.png", "caption": "broken"}),
             json.dumps({"image": "img/missing.png", "caption": "missing"}),
             json.dumps({"image": "img/blue.png", "caption": "blue", "extra": 1})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    records, skipped = load_records(str(tmp_path / "m.jsonl"))
    assert [r.caption for r in records] == ["red", "broken", "missing", "blue"] and skipped == 3
    assert records[0].image == str(tmp_path / "img" / "red.png")  # relative to the manifest
    ip = Blip2ImageProcessor(size=8)
    ds = ImageTextDataset(records, TrainTransform(ip, augment=False), skipped=skipped)
    item = ds[1]  # broken, then missing, are replaced by the next readable record
    assert item["bad"] == 2 and item["caption"] == "blue"
    assert torch.equal(item["pixel_values"], ds[3]["pixel_values"])
    assert ds[0]["bad"] == 0
    vqa = [json.dumps({"image": "img/red.png", "question": "what color?", "answer": "red"}),
           json.dumps({"image": "img/red.png", "question": "what?"})]
    (tmp_path / "q.jsonl").write_text("\n".join(vqa))
    records, skipped = load_records(str(tmp_path / "q.jsonl"), task="vqa")
    assert [(r.question, r.answer) for r in records] == [("what color?", "red")] and skipped == 1


def test_tar_shards_read_like_the_manifest(dirs, tmp_path):
    manifest = Path(dirs["train"]) / "captions.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()[:6]]
    shard = tmp_path / "000.tar"
    with tarfile.open(shard, "w") as tf:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i, row in enumerate(rows):
            add(f"s/{i:03d}.png", (Path(dirs["train"]) / row["image"]).read_bytes())
            if i == 0:
                add(f"s/{i:03d}.txt", row["caption"].encode())
            else:
                add(f"s/{i:03d}.json", json.dumps({"caption": row["caption"]}).encode())
        add("s/100.json", json.dumps({"caption": "no image"}).encode())  # skipped
        add("s/101.png", b"not a png")  # no text: skipped
    records, skipped = load_records([str(tmp_path)])  # a directory of shards
    assert [r.caption for r in records] == [r["caption"] for r in rows] and skipped == 2
    ip = Blip2ImageProcessor(size=32)
    from_tar = ImageTextDataset(records, TrainTransform(ip, augment=False))
    from_manifest = make_dataset(str(manifest), ip, TrainConfig(augment=False))
    for i in range(len(rows)):
        assert torch.equal(from_tar[i]["pixel_values"], from_manifest[i]["pixel_values"])


def test_global_batches_split_over_ranks_and_resume():
    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    single = take(GlobalBatchSampler(10, 4, seed=1), 5)
    r0, r1 = take(GlobalBatchSampler(10, 4, 0, 2, seed=1), 5), take(GlobalBatchSampler(10, 4, 1, 2, seed=1), 5)
    assert [a + b for a, b in zip(r0, r1)] == single
    epoch0 = [k for batch in single[:2] for k in batch]  # 10 // 4 = 2 batches per epoch, 2 samples dropped
    assert len(set(epoch0)) == 8 and all(k < 10 for k in epoch0)
    assert all(10 <= k < 20 for k in single[2] + single[3])  # epoch 1 keys, a new permutation
    assert take(GlobalBatchSampler(10, 4, seed=1, start=3), 2) == single[3:5]
    with pytest.raises(ValueError):
        GlobalBatchSampler(10, 3, 0, 2)


def test_augmentation_is_a_function_of_the_key_and_flip_switches(dirs):
    image = Image.open(Path(dirs["train"]) / "images" / "00000.png").convert("RGB")
    ip = Blip2ImageProcessor(size=32)
    plain = torch.from_numpy(ip.preprocess(image))
    mirrored = torch.from_numpy(ip.preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    assert not torch.equal(plain, mirrored)
    # scale (1, 1): every crop try fails its aspect ratio, so the crop is the whole image; only the flip is random
    flip = TrainTransform(ip, scale=(1.0, 1.0))
    outs = [flip(image, np.random.default_rng([0, k])) for k in range(20)]
    kinds = [torch.equal(o, mirrored) for o in outs]
    assert all(torch.equal(o, plain) or torch.equal(o, mirrored) for o in outs) and 3 < sum(kinds) < 17
    no_flip = TrainTransform(ip, scale=(1.0, 1.0), hflip=False)
    assert all(torch.equal(no_flip(image, np.random.default_rng([0, k])), plain) for k in range(20))
    crop = TrainTransform(ip)
    a, b = crop(image, np.random.default_rng([0, 5])), crop(image, np.random.default_rng([0, 5]))
    assert torch.equal(a, b) and not torch.equal(a, crop(image, np.random.default_rng([0, 6])))


# -- frozen parts, precision, checkpointing, accumulation -------------------------------------------------


def test_stage1_frozen_vision_is_bitwise_unchanged(dirs):
    stage1, processor = stage1_model(dirs, vision="opt_drop")
    vision = stage1.model.vision_model
    frozen = {k: v.clone() for k, v in vision.state_dict().items() if not k.startswith("post_layernorm")}
    trained = {k: v.clone() for k, v in stage1.state_dict().items() if not k.startswith("model.vision_model.")}
    trained["post_layernorm"] = vision.post_layernorm.weight.clone()
    train_stage1(stage1, processor, dirs["train"] + "/captions.jsonl", small(max_steps=3))
    for k, v in vision.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert all(not p.requires_grad for p in vision.encoder.parameters())
    assert not vision.encoder.training and not vision.embeddings.training and stage1.model.qformer.training
    # LAVIS trains ln_vision (= post_layernorm) with the Q-Former
    assert not torch.equal(vision.post_layernorm.weight, trained.pop("post_layernorm"))
    changed = [k for k, v in stage1.state_dict().items() if k in trained and not torch.equal(v, trained[k])]
    assert "model.query_tokens" in changed and "temp" in changed and "itg_head.bias" in changed
    assert any(k.startswith("model.qformer.") for k in changed)


def test_stage2_frozen_lm_and_vision_bitwise_unchanged_no_optimizer_state(dirs, tmp_path):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt_drop"])
    processor = Blip2Processor.from_pretrained(dirs["opt_drop"])
    lm = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vit = {k: v.clone() for k, v in model.vision_model.encoder.state_dict().items()}
    proj = model.language_projection.weight.clone()
    train_stage2(model, processor, dirs["train"] + "/captions.jsonl", small(max_steps=3, out_dir=str(tmp_path)))
    for k, v in model.language_model.state_dict().items():
        assert torch.equal(v, lm[k]), k
    for k, v in model.vision_model.encoder.state_dict().items():
        assert torch.equal(v, vit[k]), k
    assert not model.language_model.training and not torch.equal(model.language_projection.weight, proj)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    names = set(state["trainable"])
    assert not any(n.startswith(("model.language_model.", "model.vision_model.encoder.")) for n in names)
    assert "model.language_projection.weight" in names and "model.vision_model.post_layernorm.weight" in names
    assert len(state["optimizer"]["state"]) == len(names)  # Adam moments for the trained parameters only


def test_bf16_autocast_keeps_qformer_fp32(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    seen: dict[str, torch.dtype] = {}
    model.qformer.register_forward_hook(lambda m, i, o: seen.__setitem__("qformer", o.last_hidden_state.dtype))
    model.language_model.register_forward_hook(lambda m, i, o: seen.__setitem__("lm", o.dtype))
    model.vision_model.encoder.register_forward_hook(lambda m, i, o: seen.__setitem__("vit", o.dtype))
    metrics = train_stage2(model, processor, dirs["train"] + "/captions.jsonl",
                           small(max_steps=2, amp="bf16", frozen_dtype="bf16"))
    assert seen == {"qformer": torch.float32, "lm": torch.bfloat16, "vit": torch.bfloat16}
    assert model.qformer.layernorm.weight.dtype == torch.float32 and model.query_tokens.dtype == torch.float32
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert all(math.isfinite(m["loss"]) for m in metrics)


def test_logged_gradient_norm_is_the_true_norm_fp32_and_fp16(dirs):
    """The norm the loop clips is that of the real gradient of the first batch; under fp16 it is taken after
    the loss scale is divided out (else it would read 65536 times too large)."""
    norms = {}
    for amp in ("no", "fp16"):
        model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
        processor = Blip2Processor.from_pretrained(dirs["opt"])
        metrics = train_stage2(model, processor, dirs["train"] + "/captions.jsonl",
                               small(max_steps=1, amp=amp, max_grad_norm=1e-3))
        norms[amp] = metrics[0]["grad_norm"]
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    ds = make_dataset(dirs["train"] + "/captions.jsonl", processor.image_processor, small())
    batch = collate([ds[k] for k in next(iter(GlobalBatchSampler(len(ds), 8, seed=3)))])
    trainee = Blip2Stage2(model)
    model.language_model.requires_grad_(False)
    model.vision_model.encoder.requires_grad_(False)
    model.vision_model.embeddings.requires_grad_(False)
    trainee(batch["pixel_values"], **Stage2Text(processor.tokenizer, model)(batch))["loss"].backward()
    true = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norms["no"] == pytest.approx(float(true), rel=1e-5)
    assert norms["fp16"] == pytest.approx(float(true), rel=2e-2)


def test_gradient_checkpointing_gives_the_same_gradients(dirs):
    stage1, processor = stage1_model(dirs, vision="opt_drop")
    stage1.train()
    ds = make_dataset(dirs["train"] + "/captions.jsonl", processor.image_processor, TrainConfig(augment=False))
    batch = collate([ds[i] for i in range(6)])
    text = Stage1Text(processor.tokenizer, 12)(batch["caption"])
    grads = []
    for flag in (False, True):
        stage1.model.vision_model.gradient_checkpointing = flag
        stage1.model.qformer.gradient_checkpointing = flag
        stage1.zero_grad()
        stage1(batch["pixel_values"], **text, negatives_seed=0)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in stage1.named_parameters() if p.grad is not None})
    assert "model.vision_model.encoder.layers.0.mlp.fc1.weight" in grads[0]  # the vision encoder trains here
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5)


def test_gradient_accumulation_equals_the_larger_batch(dirs):
    """Every caption here has the same number of tokens, so two micro-batches of 8 are one batch of 16.

    Attention key biases are left out: softmax ignores them, their true gradient is 0, and Adam turns the
    float noise that stands in for it into full-size steps (harmless: they cannot change any output)."""
    weights = []
    for batch_size, accum in ((16, 1), (8, 2)):
        model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
        processor = Blip2Processor.from_pretrained(dirs["opt"])
        train_stage2(model, processor, dirs["train"] + "/captions.jsonl",
                     small(max_steps=3, batch_size=batch_size, grad_accum=accum))
        weights.append(model.state_dict())
    for k, v in weights[0].items():
        if not k.endswith("key.bias"):
            torch.testing.assert_close(weights[1][k], v, atol=2e-6, rtol=1e-5)


# -- it learns --------------------------------------------------------------------------------------------


def test_learns_the_synthetic_world(dirs):
    """Stage 1: ITC retrieval among 8 images of held-out scenes from chance to well above it; stage 2: the
    held-out LM loss drops clearly. Tiny models, one-object scenes of blip2.demo.world, CPU, well under a minute."""
    stage1, processor = stage1_model(dirs)
    val = make_dataset(dirs["val"] + "/captions.jsonl", processor.image_processor, TrainConfig(augment=False))
    vb = collate([val[i] for i in range(len(val))])
    text = Stage1Text(processor.tokenizer, 8)(vb["caption"])

    def itc_accuracy() -> float:
        with torch.no_grad():
            sim = stage1.model.itc_scores(vb["pixel_values"], text["input_ids"], text["attention_mask"])
        hits = 0
        for k in range(0, len(val), 8):  # pools of 8: chance is 1/8 (identical captions count as right)
            pred = sim[k:k + 8, k:k + 8].argmax(1).tolist()
            hits += sum(vb["caption"][k + p] == vb["caption"][k + i] for i, p in enumerate(pred))
        return hits / len(val)

    before = itc_accuracy()
    train_stage1(stage1, processor, dirs["train"] + "/captions.jsonl",
                 small(max_steps=250, batch_size=16, max_txt_len=8, log_every=50, warmup_steps=10))
    after = itc_accuracy()
    print("itc accuracy", before, after)
    assert before < 0.25 and after > 0.45, (before, after)

    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    inputs = Stage2Text(processor.tokenizer, model)(vb)

    def val_loss() -> float:
        with torch.no_grad():
            return float(Blip2Stage2(model).eval()(vb["pixel_values"], **inputs)["loss"])

    before = val_loss()
    train_stage2(model, processor, dirs["train"] + "/captions.jsonl",
                 small(max_steps=100, batch_size=16, log_every=50, warmup_steps=10))
    after = val_loss()
    print("lm loss", before, after)
    assert before > 4.0 and after < before - 1.0, (before, after)


# -- resumption -------------------------------------------------------------------------------------------


def test_stop_and_resume_is_bitwise_equal_to_one_run(dirs, tmp_path):
    """Stage 1 with dropout, augmentation (crop and flip), hard negatives and a schedule: 5 steps in one go,
    or 2 steps, stop, rebuild the model from scratch, resume for the other 3."""
    cfg = dict(max_steps=5, augment=True, hflip=True, warmup_steps=2, save_every=1)

    def session(out: Path, **kw):
        stage1, processor = stage1_model(dirs, bert="bert_drop", vision="opt_drop")
        metrics = train_stage1(stage1, processor, dirs["train"] + "/captions.jsonl", small(out_dir=str(out), **cfg, **kw))
        return stage1, metrics

    whole, metrics = session(tmp_path / "a")
    _, first = session(tmp_path / "b", stop_at=2)
    assert [m["step"] for m in first] == [1, 2] and not (tmp_path / "b" / "model.safetensors").exists()
    resumed, rest = session(tmp_path / "b", resume=True)
    assert [m["step"] for m in rest] == [1, 2, 3, 4, 5]
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert [m["loss"] for m in rest] == [m["loss"] for m in metrics]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]


def run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blip2.train", *args], env=env_with_src(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_and_resume_equals_uninterrupted_run(dirs, tmp_path):
    """The command line, stage 2: one run of 30 steps; another killed (SIGKILL) after step 3 and resumed.
    The two model.safetensors hold the same tensors, bit for bit. Also checks the output directory."""
    config = tmp_path / "run.yaml"
    config.write_text("amp: 'no'\nfrozen_dtype: null\nbatch_size: 8\nlr: 3.0e-3\nmin_lr: 1.0e-4\nwarmup_steps: 3\n"
                      "hflip: false\nseed: 5\nlog_every: 1\nsave_every: 1\nmax_steps: 30\n")
    common = ["stage2", "--init", dirs["opt"], "--data", dirs["train"] + "/captions.jsonl", "--config", str(config)]
    whole = run_cli(common + ["--out", str(tmp_path / "whole")])
    killed = run_cli(common + ["--out", str(tmp_path / "killed")])
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before_kill = len(metrics.read_text().splitlines())
    assert 3 <= done_before_kill < 30 and not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = run_cli(common + ["--out", str(tmp_path / "killed"), "--resume"])
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all({"step", "loss", "lr", "samples_per_s"} <= set(r) for r in rows)
    assert rows == [dict(r, samples_per_s=rows[i]["samples_per_s"]) for i, r in
                    enumerate(json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())]
    out = tmp_path / "whole"
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).read_bytes() == (Path(dirs["opt"]) / name).read_bytes(), name
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(out)
    ours = Blip2ForConditionalGeneration.from_pretrained(str(out))
    assert torch.equal(ref.language_projection.weight, ours.language_projection.weight)
    assert not torch.equal(ours.language_projection.weight,
                           Blip2ForConditionalGeneration.from_pretrained(dirs["opt"]).language_projection.weight)
    assert os.path.exists(out / "generation_config.json")


def test_command_line_stage1_from_bert_stage2_from_stage1_and_lm_then_vqa(dirs, tmp_path):
    """The three subcommands in process: stage 1 from BERT + an image encoder, stage 2 from that and a plain
    OPT checkpoint, VQA fine-tuning of the result; the outputs load in transformers and agree with ours."""
    from blip2.train import main

    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    hf.language_model.save_pretrained(tmp_path / "lm")  # a plain OPTForCausalLM checkpoint
    transformers.AutoTokenizer.from_pretrained(dirs["opt"]).save_pretrained(tmp_path / "lm")
    vqa = tmp_path / "vqa.jsonl"
    rows = [json.loads(x) for x in (Path(dirs["train"]) / "captions.jsonl").read_text().splitlines()[:32]]
    vqa.write_text("".join(json.dumps({"image": str(Path(dirs["train"]) / r["image"]), "question": "what color is it ?",
                                       "answer": r["caption"].split()[2]}) + "\n" for r in rows))
    common = ["--max-steps", "2", "--batch-size", "8", "--amp", "no", "--frozen-dtype", "fp32", "--warmup-steps", "0",
              "--lr", "1e-3", "--log-every", "1"]
    captions = ["--data", dirs["train"] + "/captions.jsonl"]
    s1, s2, ft = tmp_path / "s1", tmp_path / "s2", tmp_path / "ft"
    assert main(["stage1", "--vision", dirs["opt"], "--bert", dirs["bert"], "--num-query-tokens", "4",
                 "--embed-dim", "16", "--out", str(s1), *captions, *common]) == 0
    assert main(["stage2", "--stage1", str(s1), "--lm", str(tmp_path / "lm"), "--out", str(s2), *captions, *common]) == 0
    assert main(["finetune", "--init", str(s2), "--task", "vqa", "--prompt", "question : {} answer :", "--data", str(vqa),
                 "--out", str(ft), *common]) == 0
    # stage 2 starts from stage 1 (its image encoder is frozen; the Q-Former trains on)
    from safetensors.torch import load_file

    a, b = load_file(s1 / "model.safetensors"), load_file(s2 / "model.safetensors")
    key = "vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(a[key], b[key])
    assert "qformer.encoder.layer.0.intermediate.dense.weight" not in b and "embeddings.word_embeddings.weight" not in b
    lm = load_file(tmp_path / "lm" / "model.safetensors")
    assert all(torch.equal(b["language_model." + k], v) for k, v in lm.items())
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(ft).eval()
    ours = Blip2ForConditionalGeneration.from_pretrained(str(ft))
    px = torch.randn(2, 3, 32, 32)
    assert ours.config.image_token_index == 41  # the <image> token of the LM's tokenizer
    ids = torch.tensor([[41] * NUM_QUERY + [2, 10, 11, 12], [41] * NUM_QUERY + [2, 13, 14, 15]])
    with torch.no_grad():
        torch.testing.assert_close(ours(px, ids).logits, ref(pixel_values=px, input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert [json.loads(x)["step"] for x in (ft / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a stage-1 Q-Former that does not fit --init's is refused with a message, not a traceback
    assert main(["stage2", "--init", dirs["opt"], "--stage1", str(s1), "--out", str(tmp_path / "x"), *captions, *common]) == 2
