"""Stage 2's optional prefix alignment loss (``TrainConfig.prefix_loss_weight``, ``Record.prefix``).

Projected query i is pulled toward the frozen LM's input embedding of token i of the record's prefix
text; the loss is 0 where they are equal, only counts the prefix's tokens, trains the projection and
Q-Former (never the LM), and falls when trained on.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train_fixtures import NUM_QUERY, OPT_SPECIAL, WORDS, write_blip2_dir  # noqa: E402

from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.processing import Blip2Processor  # noqa: E402
from blip2.train import Blip2Stage2, FeatureDataset, Record, Stage2Text, TrainConfig, load_records, train_stage2, vision_states  # noqa: E402
from blip2.train.data import collate  # noqa: E402

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return str(write_blip2_dir(tmp_path_factory.mktemp("prefix") / "opt", "opt", seed=7))


def opt_id(w: str) -> int:
    return len(OPT_SPECIAL) + WORDS.index(w)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_prefix_ids_and_mask(opt_dir):
    model = Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    tok = Blip2Processor.from_pretrained(opt_dir).tokenizer
    text = Stage2Text(tok, model, task="caption", prefix_ids=True)
    long = " ".join(["red"] * (NUM_QUERY + 3))
    b = text({"caption": ["a small red circle"] * 3, "question": [None] * 3, "answer": [None] * 3,
              "prefix": ["small red circle", None, long], "key": torch.tensor([0, 1, 2])})
    ids, mask = b["prefix_ids"], b["prefix_mask"]
    assert ids.shape == mask.shape == (3, NUM_QUERY)
    assert ids[0, :3].tolist() == [opt_id("small"), opt_id("red"), opt_id("circle")]
    assert mask[0].tolist() == [1] * 3 + [0] * (NUM_QUERY - 3)
    assert mask[1].tolist() == [0] * NUM_QUERY  # no prefix: no loss on that row
    assert mask[2].tolist() == [1] * NUM_QUERY and ids[2].tolist() == [opt_id("red")] * NUM_QUERY  # cut to Q
    assert "prefix_ids" not in Stage2Text(tok, model, task="caption")(
        {"caption": ["a red circle"], "question": [None], "answer": [None], "key": torch.tensor([0])})


def test_prefix_loss_value_and_gradients(opt_dir):
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    embed = model.language_model.get_input_embeddings()
    trainee = Blip2Stage2(model, prefix_loss_weight=0.5)
    D = embed.weight.shape[1]
    ids = torch.tensor([[opt_id("red"), opt_id("circle"), 0, 0], [opt_id("blue"), 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    target = embed(ids).detach()
    scale = embed.weight.detach().pow(2).sum(-1).mean()
    assert float(trainee.prefix_loss(target.clone(), ids, mask)) == 0.0  # equal to the embeddings
    trainee.prefix_loss((target + 0.1).requires_grad_(), ids, mask).backward()  # a constant target: no gradient to the LM
    assert embed.weight.grad is None
    p = target + 0.1
    want = (0.01 * D * 3) / 3 / scale  # three counted tokens, each off by 0.1 in every dimension
    torch.testing.assert_close(trainee.prefix_loss(p, ids, mask), want)
    p[1, 1:] += 100.0  # positions outside the mask don't count
    torch.testing.assert_close(trainee.prefix_loss(p, ids, mask), want)

    # in forward: loss = LM loss + w * prefix; the projection gets gradient, the LM's embeddings none
    tok = Blip2Processor.from_pretrained(opt_dir).tokenizer
    text = Stage2Text(tok, model, task="caption", prefix_ids=True)
    batch = text({"caption": ["a small red circle", "a large blue square"], "question": [None] * 2,
                  "answer": [None] * 2, "prefix": ["small red circle", "large blue square"], "key": torch.tensor([0, 1])})
    model.language_model.requires_grad_(False)
    out = trainee(pixels(2), **batch)
    torch.testing.assert_close(out["loss"], out["lm"] + 0.5 * out["prefix"])
    plain = Blip2Stage2(model)(pixels(2), **{k: v for k, v in batch.items() if not k.startswith("prefix")})
    torch.testing.assert_close(plain["loss"], out["lm"])
    out["loss"].backward()
    assert model.language_projection.weight.grad.abs().sum() > 0


def test_prefix_field_in_manifests_and_feature_batches(tmp_path):
    rows = [{"image": "a.png", "caption": "a small red circle", "prefix": " small red circle "},
            {"image": "b.png", "caption": "a blue square"}, {"image": "c.png", "caption": "x", "prefix": 3}]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, skipped = load_records(str(path), "caption")
    assert skipped == 0 and [r.prefix for r in records] == ["small red circle", None, None]
    ds = FeatureDataset(torch.zeros(3, 2, 4), records)
    assert collate([ds[0], ds[1]])["prefix"] == ["small red circle", None]


def test_stage2_with_prefix_loss_learns_the_prefix(opt_dir, tmp_path):
    """train_stage2 with prefix_loss_weight: the prefix loss falls to a fraction of its start, and the
    logged total is LM + w * prefix."""
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration.from_pretrained(opt_dir)
    processor = Blip2Processor.from_pretrained(opt_dir)
    states = vision_states(model.vision_model, pixels(4, 2))
    caps = ["a small red circle", "a large blue square", "a large green triangle", "a small yellow circle"]
    records = [Record(str(i), caption=c, prefix=" ".join(c.split()[1:])) for i, c in enumerate(caps)]
    config = TrainConfig(max_steps=40, batch_size=4, lr=5e-3, min_lr=5e-4, warmup_lr=5e-4, warmup_steps=2,
                         log_every=1, seed=3, prefix_loss_weight=2.0)
    metrics = train_stage2(model, processor, FeatureDataset(states, records), config)
    first, last = metrics[0]["prefix"], sum(m["prefix"] for m in metrics[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    m = metrics[-1]
    assert m["loss"] == pytest.approx(m["lm"] + 2.0 * m["prefix"], rel=1e-4)
    with pytest.raises(ValueError, match="prefix_loss_weight must be >= 0"):
        TrainConfig(prefix_loss_weight=-1.0)


def test_prefix_command_line_flag():
    from blip2.train.command import _settings, build_parser

    cfg, _ = _settings(build_parser().parse_args(["stage2", "--data", "m.jsonl", "--out", "o",
                                                  "--prefix-loss-weight", "0.5"]))
    assert cfg.prefix_loss_weight == 0.5
