"""Stage 1 with hard negative captions (``Record.negative``): ITM scores each image against its own
"almost right" caption as a non-match, besides the negatives drawn from the batch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from train_fixtures import NUM_QUERY, write_bert_dir, write_blip2_dir  # noqa: E402

from blip2.train import FeatureDataset, Record, Stage1Text, TrainConfig, build_stage1, load_records, train_stage1, vision_states  # noqa: E402
from blip2.train.data import collate  # noqa: E402

transformers.logging.set_verbosity_error()

CAPTIONS = ["a small red circle", "a large blue square", "a large green triangle", "a small yellow circle"]
NEGATIVES = ["a small blue circle", None, "a large red triangle", "a small yellow square"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard_negatives")
    return {"opt": str(write_blip2_dir(root / "opt", "opt", seed=5)), "bert": str(write_bert_dir(root / "bert", seed=6))}


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_hard_negatives_join_the_itm_loss(dirs):
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    text = Stage1Text(processor.tokenizer, max_txt_len=16)
    px, batch = pixels(4), text(CAPTIONS)
    neg = text([n or "" for n in NEGATIVES])
    has = torch.tensor([n is not None for n in NEGATIVES])
    with torch.no_grad():
        plain = stage1(px, **batch, negatives_seed=3)
        hard = stage1(px, **batch, negatives_seed=3, negative_ids=neg["input_ids"], negative_mask=neg["attention_mask"],
                      has_negative=has)
        # the same drawn negatives, plus three (image, hard negative) pairs labelled "no match"
        assert hard["neg_text"].tolist() == plain["neg_text"].tolist()
        m = stage1.model
        feats = m.vision_features(px)
        extra = m.itm_logits_from_features(feats[has], neg["input_ids"][has], neg["attention_mask"][has])  # [3, 2]
        n_plain = 3 * len(CAPTIONS)
        want = (float(plain["itm"]) * n_plain + F.cross_entropy(extra, torch.zeros(3, dtype=torch.long), reduction="sum")) / (n_plain + 3)
    assert float(hard["itm"]) == pytest.approx(float(want), rel=1e-5)
    assert float(hard["itc"]) == pytest.approx(float(plain["itc"]), rel=1e-6)  # ITC and ITG are unchanged


def test_negative_field_in_manifests_and_batches(tmp_path):
    rows = [{"image": "a.png", "caption": "a small red circle", "negative": "a small blue circle"},
            {"image": "b.png", "caption": "a blue square", "negative": ""}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, skipped = load_records(str(path), "caption")
    assert skipped == 0 and [r.negative for r in records] == ["a small blue circle", None]
    ds = FeatureDataset(torch.zeros(2, 2, 4), records)
    assert collate([ds[0], ds[1]])["negative"] == ["a small blue circle", None]


def test_stage1_learns_to_reject_the_hard_negatives(dirs):
    """Trained with them, ITM tells every image's caption from its one-word-off negative."""
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    vision = stage1.model.vision_model
    px = pixels(4, 1)
    states = vision_states(vision, px)
    records = [Record(str(i), caption=c, negative=n) for i, (c, n) in enumerate(zip(CAPTIONS, NEGATIVES))]
    config = TrainConfig(max_steps=150, batch_size=4, lr=5e-3, min_lr=5e-4, warmup_lr=5e-4, warmup_steps=2,
                         log_every=10, seed=1, augment=False, max_txt_len=16)
    train_stage1(stage1, processor, FeatureDataset(states, records), config)
    m = stage1.model.eval()
    text = Stage1Text(processor.tokenizer, max_txt_len=16)
    pos, neg = text(CAPTIONS), text([n or "" for n in NEGATIVES])
    with torch.no_grad():
        feats = m.vision_features(px)
        p_pos = m.itm_logits_from_features(feats, pos["input_ids"], pos["attention_mask"]).softmax(-1)[:, 1]
        p_neg = m.itm_logits_from_features(feats, neg["input_ids"], neg["attention_mask"]).softmax(-1)[:, 1]
    rows = [i for i, n in enumerate(NEGATIVES) if n]
    assert all(float(p_pos[i]) > 0.5 > float(p_neg[i]) for i in rows), (p_pos, p_neg)
