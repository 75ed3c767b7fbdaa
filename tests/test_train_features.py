"""Training on cached frozen-encoder output (``FeatureDataset``) and the "mixed" caption + VQA task.

With a frozen image encoder, training from ``vision_states`` must give the same losses and gradients as
running the encoder on the pixels each step; stage 2 on a mixed dataset must lay out caption rows and VQA
rows each with its own prompt, and learn.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train_fixtures import NUM_QUERY, OPT_SPECIAL, WORDS, write_bert_dir, write_blip2_dir, write_vision_preprocessor  # noqa: E402

from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.processing import Blip2Processor  # noqa: E402
from blip2.train import (  # noqa: E402
    Blip2Stage2,
    FeatureDataset,
    Record,
    Stage1Text,
    Stage2Text,
    TrainConfig,
    build_stage1,
    load_records,
    train_stage2,
    vision_states,
)
from blip2.train.common import encode_image, make_dataset  # noqa: E402
from blip2.train.data import collate  # noqa: E402

transformers.logging.set_verbosity_error()

CAPTIONS = ["a small red circle", "a large blue square and a small red circle", "a large green triangle", "two"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_features")
    out = {"opt": write_blip2_dir(root / "opt", "opt", seed=5), "bert": write_bert_dir(root / "bert", seed=6)}
    write_vision_preprocessor(out["opt"])
    return {k: str(v) for k, v in out.items()}


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def frozen(vision: torch.nn.Module) -> None:
    vision.embeddings.requires_grad_(False)
    vision.encoder.requires_grad_(False)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_stage1_from_cached_states_equals_pixels(dirs):
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    vision = stage1.model.vision_model
    frozen(vision)
    with torch.no_grad():  # a post_layernorm that is not the identity, so skipping it would show
        vision.post_layernorm.weight.normal_(1.0, 0.3)
        vision.post_layernorm.bias.normal_(0.0, 0.3)
    px, text = pixels(len(CAPTIONS)), Stage1Text(processor.tokenizer, max_txt_len=16)(CAPTIONS)
    out_px = stage1(px, **text, negatives_seed=7)
    out_px["loss"].backward()
    g_px = grads(stage1)
    stage1.zero_grad(set_to_none=True)
    states = vision_states(vision, px)
    assert states.shape == (len(CAPTIONS), vision.embeddings.position_embedding.shape[1], vision.config.hidden_size)
    out_st = stage1(None, **text, negatives_seed=7, vision_states=states)
    out_st["loss"].backward()
    g_st = grads(stage1)
    for key in ("itc", "itm", "itg"):
        assert float(out_st[key]) == pytest.approx(float(out_px[key]), abs=1e-5), key
    assert out_st["neg_image"].tolist() == out_px["neg_image"].tolist()
    assert "model.vision_model.post_layernorm.weight" in g_st  # the output LayerNorm still trains
    assert set(g_st) == set(g_px)
    for name in g_px:
        torch.testing.assert_close(g_st[name], g_px[name], atol=1e-5, rtol=1e-4, msg=name)


def test_itm_negative_temperature_changes_the_draws(dirs):
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    px, text = pixels(8, 3), Stage1Text(processor.tokenizer, max_txt_len=16)(
        ["a small red circle", "a large red circle", "a small blue square", "a large blue square",
         "a small green triangle", "a large green triangle", "two", "three"])
    with torch.no_grad():
        stage1.negative_temperature = 1e-7  # so sharp that softmax picks the most similar negative
        sharp = [stage1(px, **text, negatives_seed=s)["neg_text"].tolist() for s in range(4)]
        stage1.negative_temperature = 1e6  # flat: uniform over the other texts
        flat = [stage1(px, **text, negatives_seed=s)["neg_text"].tolist() for s in range(4)]
    # rows whose own text is not their most similar: always that most similar text (softmax is taken
    # before the pair itself is masked, as LAVIS does, so other rows fall back to near-uniform draws)
    with torch.no_grad():
        sim = stage1.model.image_embeds(px).matmul(stage1.model.text_embeds(text["input_ids"], text["attention_mask"]).t())
    best = sim.amax(1).argmax(1)  # [B] the most similar text of each image
    rows = [i for i in range(8) if int(best[i]) != i]
    assert len(rows) >= 4
    assert all(d[i] == int(best[i]) for d in sharp for i in rows)
    assert any(d[i] != int(best[i]) for d in flat for i in rows)


def test_stage2_from_cached_states_equals_pixels(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    trainee = Blip2Stage2(model).train()
    frozen(model.vision_model)
    model.language_model.requires_grad_(False)
    px = pixels(3, 1)
    batch = Stage2Text(processor.tokenizer, model)({"caption": CAPTIONS[:3], "key": torch.arange(3)})
    loss_px = trainee(px, **batch)["loss"]
    loss_px.backward()
    g_px = grads(trainee)
    trainee.zero_grad(set_to_none=True)
    loss_st = trainee(None, **batch, vision_states=vision_states(model.vision_model, px))["loss"]
    loss_st.backward()
    assert float(loss_st) == pytest.approx(float(loss_px), abs=1e-5)
    g_st = grads(trainee)
    assert set(g_st) == set(g_px) and "model.vision_model.post_layernorm.weight" in g_st
    for name in g_px:
        torch.testing.assert_close(g_st[name], g_px[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cached_states_need_a_frozen_encoder(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    states = vision_states(model.vision_model, pixels(2))
    with pytest.raises(ValueError, match="frozen image encoder"):
        encode_image(model.vision_model, None, None, states)  # the encoder's weights require grad here
    with pytest.raises(ValueError, match="pixel_values or precomputed"):
        encode_image(model.vision_model, None, None)
    ds = FeatureDataset(states, [Record("x", caption="two"), Record("y", caption="three")])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    with pytest.raises(ValueError, match="freeze_vision=True"):
        make_dataset(ds, processor.image_processor, TrainConfig(freeze_vision=False))
    assert make_dataset(ds, processor.image_processor, TrainConfig()) is ds


def test_feature_dataset_items_and_errors():
    states = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    records = [Record("a", caption="two"), Record("a", question="how many ?", answer="two"), Record("b", caption="one")]
    ds = FeatureDataset(states, records, image_index=[0, 0, 2])
    assert len(ds) == 3
    item = ds[4]  # key 4 = epoch 1, record 1
    assert item["key"] == 4 and item["question"] == "how many ?" and item["answer"] == "two" and item["caption"] is None
    torch.testing.assert_close(item["vision_states"], states[0])
    batch = collate([ds[0], ds[2]])
    assert "pixel_values" not in batch and batch["vision_states"].shape == (2, 2, 4)
    torch.testing.assert_close(batch["vision_states"][1], states[2])
    assert batch["bad"] == 0 and batch["caption"] == ["two", "one"]
    with pytest.raises(ValueError, match="2 entries for 3 records"):
        FeatureDataset(states, records, image_index=[0, 1])
    with pytest.raises(ValueError, match="image_index 5 is outside the 3 rows"):
        FeatureDataset(states, records, image_index=[0, 5, 1])
    with pytest.raises(ValueError, match="at least one record"):
        FeatureDataset(states, [])


def opt_id(w: str) -> int:
    return len(OPT_SPECIAL) + WORDS.index(w)


def test_mixed_task_rows(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    text = Stage2Text(processor.tokenizer, model, task="mixed", prompt="question : {} answer :", caption_prompt="a photo of")
    b = text({"caption": ["a small red circle", None], "question": [None, "what color is the circle ?"],
              "answer": [None, "red"], "key": torch.tensor([0, 1])})
    img, Q = model.config.image_token_index, NUM_QUERY
    cap = [2] + [opt_id(w) for w in "a photo of a small red circle".split()] + [3]
    vqa = [2] + [opt_id(w) for w in "question : what color is the circle ? answer : red".split()] + [3]
    width = Q + max(len(cap), len(vqa))
    assert b["input_ids"][0].tolist() == [img] * Q + cap + [1] * (width - Q - len(cap))
    assert b["input_ids"][1].tolist() == [img] * Q + vqa + [1] * (width - Q - len(vqa))
    assert [t for t in b["labels"][0].tolist() if t != -100] == [opt_id(w) for w in "a small red circle".split()] + [3]
    assert [t for t in b["labels"][1].tolist() if t != -100] == [opt_id("red"), 3]
    with pytest.raises(ValueError, match="needs a"):
        Stage2Text(processor.tokenizer, model, task="mixed", prompt="no slot")
    with pytest.raises(ValueError, match="'caption', 'vqa' or 'mixed'"):
        TrainConfig(task="both")


def test_mixed_manifest_records(tmp_path):
    rows = [{"image": "a.png", "caption": "a small red circle"},
            {"image": "a.png", "question": "how many shapes are there ?", "answer": "one"},
            {"image": "b.png", "question": "what color is it ?"},  # no answer and no caption: skipped
            {"image": "b.png", "caption": "two", "question": "q", "answer": "x"}]  # a pair wins over the caption
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, skipped = load_records(str(path), "mixed")
    assert skipped == 1
    assert [(r.caption, r.question, r.answer) for r in records] == [
        ("a small red circle", None, None), (None, "how many shapes are there ?", "one"), (None, "q", "x")]


def test_stage2_on_features_mixed_learns(dirs, tmp_path):
    """train_stage2 on a FeatureDataset of captions and answers: the loss falls, the model is written."""
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    states = vision_states(model.vision_model, pixels(4, 2))
    records = [Record(str(i), caption=c) for i, c in enumerate(CAPTIONS)]
    records += [Record(str(i), question="how many shapes are there ?", answer=a)
                for i, a in enumerate(["one", "two", "one", "zero"])]
    ds = FeatureDataset(states, records, image_index=[0, 1, 2, 3, 0, 1, 2, 3])
    config = TrainConfig(max_steps=40, batch_size=8, lr=5e-3, min_lr=5e-4, warmup_lr=5e-4, warmup_steps=2,
                         log_every=1, seed=3, task="mixed", prompt="question : {} answer :", out_dir=str(tmp_path))
    metrics = train_stage2(model, processor, ds, config)
    first, last = metrics[0]["loss"], sum(m["loss"] for m in metrics[-5:]) / 5
    assert last < 0.75 * first, (first, last)  # untrained it stays near the first value
    again = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    torch.testing.assert_close(again.query_tokens, model.query_tokens)
    torch.testing.assert_close(again.language_projection.weight, model.language_projection.weight)


def test_command_line_flags():
    from blip2.train.command import _settings, build_parser

    args = build_parser().parse_args(["stage2", "--data", "m.jsonl", "--out", "o", "--task", "mixed",
                                      "--prompt", "Question: {} Answer:", "--caption-prompt", "a photo of"])
    cfg, _ = _settings(args)
    assert (cfg.task, cfg.prompt, cfg.caption_prompt) == ("mixed", "Question: {} Answer:", "a photo of")
    cfg, _ = _settings(build_parser().parse_args(["stage1", "--data", "m.jsonl", "--out", "o",
                                                  "--itm-negative-temperature", "0.5"]))
    assert cfg.itm_negative_temperature == 0.5
    assert TrainConfig.preset("stage1").itm_negative_temperature is None  # LAVIS by default
