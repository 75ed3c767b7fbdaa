"""The training objectives against straightforward recomputations with plain loops.

Stage 1 (ITC, ITM, ITG) on a tiny Q-Former started from a tiny BERT; stage 2 (LM loss) against our
``Blip2ForConditionalGeneration.forward`` and transformers' for OPT and T5; the BERT initialisation
against transformers' BERT; the ITG head's file against transformers' retrieval class.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from train_fixtures import (  # noqa: E402
    BERT_SPECIAL,
    NUM_QUERY,
    OPT_SPECIAL,
    T5_SPECIAL,
    WORDS,
    write_bert_dir,
    write_blip2_dir,
    write_vision_preprocessor,
)

from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.processing import Blip2Processor  # noqa: E402
from blip2.models.retrieval import Blip2ForImageTextRetrieval  # noqa: E402
from blip2.train import Blip2Stage1, Blip2Stage2, Stage1Text, Stage2Text, build_stage1  # noqa: E402
from blip2.train.losses import negative_weights, sample_negatives  # noqa: E402

transformers.logging.set_verbosity_error()

CAPTIONS = ["a small red circle", "a large blue square and a small red circle", "a small red circle",
            "a large green triangle , a small yellow circle and a large purple square", "two"]
TOL = 2e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_losses")
    out = {"opt": write_blip2_dir(root / "opt", "opt", seed=1), "t5": write_blip2_dir(root / "t5", "t5", seed=2),
           "bert": write_bert_dir(root / "bert", seed=3), "bert_mlm": write_bert_dir(root / "bert_mlm", seed=4, with_head=True)}
    write_vision_preprocessor(out["opt"])
    return {k: str(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def stage1(dirs):
    torch.manual_seed(0)
    model, processor = build_stage1(dirs["opt"], dirs["bert_mlm"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    with torch.no_grad():  # a temperature other than the default, so a missing division would show
        model.temp.fill_(0.2)
        model.itg_head.bias.normal_(0, 0.5)  # fresh [DEC] row and all: no zero bias hides a mistake
    return model.eval(), processor


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def smoothed_ce(logits: list[float], target: int, eps: float) -> float:
    """-(1-eps) log p[target] - eps/K sum_k log p[k], written out."""
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    logp = [x - lse for x in logits]
    return -(1 - eps) * logp[target] - eps / len(logits) * sum(logp)


# -- stage 1 ------------------------------------------------------------------------------------------


def stage1_batch(stage1, seed: int = 0):
    _, processor = stage1
    text = Stage1Text(processor.tokenizer, max_txt_len=20)(CAPTIONS)
    return pixels(len(CAPTIONS), seed), text


def test_stage1_text_layout(stage1):
    _, processor = stage1
    t = Stage1Text(processor.tokenizer, max_txt_len=8)(["a small red circle", "two"])
    word = {w: len(BERT_SPECIAL) + i for i, w in enumerate(WORDS)}
    dec = processor.tokenizer.bos_token_id
    assert dec == len(BERT_SPECIAL) + len(WORDS)  # [DEC] appended after BERT's vocabulary
    assert t["input_ids"].tolist() == [[2, word["a"], word["small"], word["red"], word["circle"], 3, 0, 0],
                                       [2, word["two"], 3, 0, 0, 0, 0, 0]]
    assert t["itg_input_ids"][:, 0].tolist() == [dec, dec]
    assert t["itg_labels"].tolist()[1] == [dec, word["two"], 3, -100, -100, -100, -100, -100]


def test_itc_equals_loops(stage1):
    model, _ = stage1
    px, text = stage1_batch(stage1)
    out = model(px, **text, negatives_seed=0)
    with torch.no_grad():
        img = model.model.image_embeds(px)  # [B, Q, E]
        txt = model.model.text_embeds(text["input_ids"], text["attention_mask"])  # [B, E]
    B, temp = len(CAPTIONS), float(model.temp.detach())
    sim = [[max(float(img[i, q] @ txt[j]) for q in range(NUM_QUERY)) / temp for j in range(B)] for i in range(B)]
    i2t = sum(smoothed_ce(sim[i], i, 0.1) for i in range(B)) / B
    t2i = sum(smoothed_ce([sim[i][j] for i in range(B)], j, 0.1) for j in range(B)) / B
    assert float(out["itc"]) == pytest.approx((i2t + t2i) / 2, abs=TOL)


def test_itm_equals_loops_and_negatives_are_negatives(stage1):
    model, _ = stage1
    px, text = stage1_batch(stage1)
    ids, mask = text["input_ids"], text["attention_mask"]
    out = model(px, **text, negatives_seed=5)
    neg_image, neg_text = out["neg_image"].tolist(), out["neg_text"].tolist()
    B = len(CAPTIONS)
    for b in range(B):  # never the pair itself, never a text identical to the pair's (captions 0 and 2)
        assert CAPTIONS[neg_image[b]] != CAPTIONS[b] and CAPTIONS[neg_text[b]] != CAPTIONS[b]
    pairs = [(b, b, 1) for b in range(B)] + [(neg_image[b], b, 0) for b in range(B)] + [(b, neg_text[b], 0) for b in range(B)]
    total = 0.0
    with torch.no_grad():
        for image, t, label in pairs:
            logits = model.model.itm_logits(px[image:image + 1], ids[t:t + 1], mask[t:t + 1])[0].tolist()
            total += smoothed_ce(logits, label, 0.0)
    assert float(out["itm"]) == pytest.approx(total / len(pairs), abs=TOL)


def test_itg_equals_loops(stage1):
    """Each position's logits recomputed from the prefix alone: no later token leaks in."""
    model, _ = stage1
    px, text = stage1_batch(stage1)
    out = model(px, **text, negatives_seed=0)
    m = model.model
    ids, labels = text["itg_input_ids"], text["itg_labels"]
    losses = []
    with torch.no_grad():
        feats = m.vision_features(px)
        for b in range(len(CAPTIONS)):
            queries = m.query_tokens
            for t in range(ids.shape[1] - 1):
                target = int(labels[b, t + 1])
                if target == -100:
                    continue
                prefix = ids[b:b + 1, : t + 1]
                hidden = m.qformer(m.embeddings(prefix, queries), feats[b:b + 1], query_length=NUM_QUERY,
                                   causal_text=True).last_hidden_state[0, -1]
                logits = model.itg_head(hidden, m.embeddings.word_embeddings.weight).tolist()
                losses.append(smoothed_ce(logits, target, 0.1))
    assert float(out["itg"]) == pytest.approx(sum(losses) / len(losses), abs=TOL)


def test_itg_mask_queries_see_only_queries(stage1):
    model, _ = stage1
    px, text = stage1_batch(stage1)
    m = model.model
    with torch.no_grad():
        feats = m.vision_features(px)
        B = px.shape[0]
        joint = torch.cat([torch.ones(B, NUM_QUERY, dtype=torch.long), text["attention_mask"]], 1)
        hidden = m.qformer(m.embeddings(text["itg_input_ids"], m.query_tokens.expand(B, -1, -1)), feats,
                           query_length=NUM_QUERY, attention_mask=joint, causal_text=True).last_hidden_state
        torch.testing.assert_close(hidden[:, :NUM_QUERY], m.query_outputs(feats).last_hidden_state, atol=1e-5,
                                   rtol=1e-5)
        # text sees the queries: another image changes the text outputs
        other = m.qformer(m.embeddings(text["itg_input_ids"], m.query_tokens.expand(B, -1, -1)), feats.flip(0),
                          query_length=NUM_QUERY, attention_mask=joint, causal_text=True).last_hidden_state
        assert (other[:, NUM_QUERY:] - hidden[:, NUM_QUERY:]).abs().max() > 1e-2


def test_total_loss_is_the_sum(stage1):
    model, _ = stage1
    px, text = stage1_batch(stage1)
    out = model(px, **text, negatives_seed=1)
    assert float(out["loss"].detach()) == pytest.approx(float(out["itc"] + out["itm"] + out["itg"]), abs=1e-5)


def test_negative_weights_and_sampling_frequencies():
    sim = torch.tensor([[1.0, 0.5, -1.0], [0.2, 0.3, 0.1], [2.0, 0.0, 1.5]])
    same = torch.eye(3, dtype=torch.bool)
    w = negative_weights(sim, same)
    expect = torch.softmax(sim, 1) + 1e-4
    expect[same] = 0
    torch.testing.assert_close(w, expect)
    # every text identical: no candidate by similarity, uniform over the others
    torch.testing.assert_close(negative_weights(sim, torch.ones(3, 3, dtype=torch.bool)), 1 - torch.eye(3))

    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3, 3)
    n = 6000
    for _ in range(n):
        idx = sample_negatives(w, g)
        counts[torch.arange(3), idx] += 1
    freq = counts / n
    assert freq.diagonal().sum() == 0
    torch.testing.assert_close(freq, w / w.sum(1, keepdim=True), atol=0.02, rtol=0)
    # the same generator seed gives the same draws
    a = sample_negatives(w, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_negatives(w, torch.Generator().manual_seed(7)))


# -- starting from BERT ---------------------------------------------------------------------------------


def test_qformer_from_bert_equals_bert(dirs):
    torch.manual_seed(0)
    stage1, processor = build_stage1(dirs["opt"], dirs["bert_mlm"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    bert = transformers.BertForMaskedLM.from_pretrained(dirs["bert_mlm"]).eval()
    enc = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    V = bert.config.vocab_size
    with torch.no_grad():
        ref = bert.bert(ids, attention_mask=mask).last_hidden_state
        ours = stage1.model.text_outputs(ids, mask).last_hidden_state
        valid = mask.bool()
        torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=1e-5)
        ref_logits = bert(ids, attention_mask=mask).logits
        our_logits = stage1.itg_head(ours, stage1.model.embeddings.word_embeddings.weight)
        torch.testing.assert_close(our_logits[valid][:, :V], ref_logits[valid], atol=1e-4, rtol=1e-5)
    qf = stage1.model.qformer.encoder.layer
    for i, layer in enumerate(qf):
        b = bert.bert.encoder.layer[i]
        assert torch.equal(layer.intermediate_query.dense.weight, b.intermediate.dense.weight)
        assert torch.equal(layer.output_query.LayerNorm.weight, b.output.LayerNorm.weight)
        # cross-attention is new, on every second layer (LAVIS cross_attention_freq=2)
        assert hasattr(layer, "crossattention") == (i % 2 == 0)
    emb = stage1.model.embeddings.word_embeddings.weight
    assert emb.shape[0] == V + 1 and torch.equal(emb[:V], bert.bert.embeddings.word_embeddings.weight)
    assert stage1.model.config.qformer_config.cross_attention_frequency == 2


def test_bert_model_without_head_gives_fresh_head(dirs):
    torch.manual_seed(0)
    stage1, _ = build_stage1(dirs["opt"], dirs["bert"], num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    bert = transformers.BertModel.from_pretrained(dirs["bert"])
    assert torch.equal(stage1.model.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)
    assert torch.equal(stage1.itg_head.bias, torch.zeros_like(stage1.itg_head.bias))
    assert torch.equal(stage1.itg_head.transform.LayerNorm.weight, torch.ones(32))


def test_stage1_files_load_in_transformers_and_back(stage1, tmp_path):
    model, processor = stage1
    model.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    px, text = stage1_batch(stage1)
    ref = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path).eval()
    ours = Blip2ForImageTextRetrieval.from_pretrained(tmp_path)
    with torch.no_grad():
        want = model.model.itm_logits(px, text["input_ids"], text["attention_mask"])
        got = ref(pixel_values=px, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                  use_image_text_matching_head=True).logits_per_image
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.itm_logits(px, text["input_ids"], text["attention_mask"]), want)
    back = Blip2Stage1.from_pretrained(str(tmp_path))
    assert float(back.temp.detach()) == pytest.approx(0.2)
    for (k, a), (_, b) in zip(model.itg_head.state_dict().items(), back.itg_head.state_dict().items()):
        assert torch.equal(a, b), k


# -- stage 2 --------------------------------------------------------------------------------------------


def opt_id(w: str) -> int:
    return len(OPT_SPECIAL) + WORDS.index(w)


def t5_id(w: str) -> int:
    return len(T5_SPECIAL) + WORDS.index(w)


def test_stage2_opt_layout(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["opt"])
    processor = Blip2Processor.from_pretrained(dirs["opt"])
    text = Stage2Text(processor.tokenizer, model, prompt="a photo of", max_txt_len=32)
    batch = text({"caption": ["a small red circle", "two"], "key": torch.tensor([0, 1])})
    img = model.config.image_token_index
    row0 = [img] * NUM_QUERY + [2, opt_id("a"), opt_id("photo"), opt_id("of"), opt_id("a"), opt_id("small"),
                                opt_id("red"), opt_id("circle"), 3]
    assert batch["input_ids"][0].tolist() == row0
    assert batch["labels"][0].tolist() == [-100] * (NUM_QUERY + 4) + row0[NUM_QUERY + 4:]
    assert batch["input_ids"][1].tolist() == row0[:NUM_QUERY + 4] + [opt_id("two"), 3, 1, 1, 1]
    assert batch["labels"][1].tolist() == [-100] * (NUM_QUERY + 4) + [opt_id("two"), 3, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1] * (NUM_QUERY + 6) + [0] * 3
    vqa = Stage2Text(processor.tokenizer, model, task="vqa", prompt="question : {} answer :")
    b = vqa({"question": ["what color is the circle ?"], "answer": ["red"], "key": torch.tensor([0])})
    labelled = [t for t in b["labels"][0].tolist() if t != -100]
    assert labelled == [opt_id("red"), 3]


def loop_lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> float:
    losses = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            src = t - 1 if shift else t
            if src < 0 or int(labels[b, t]) == -100:
                continue
            losses.append(smoothed_ce(logits[b, src].tolist(), int(labels[b, t]), 0.0))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_stage2_loss_equals_model_transformers_and_loops(dirs, text):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs[text])
    processor = Blip2Processor.from_pretrained(dirs[text])
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(dirs[text]).eval()
    builder = Stage2Text(processor.tokenizer, model, prompt="a photo of")
    batch = builder({"caption": CAPTIONS, "key": torch.arange(len(CAPTIONS))})
    px = pixels(len(CAPTIONS), 3)
    with torch.no_grad():
        loss = float(Blip2Stage2(model).eval()(px, **batch)["loss"])
        kw = {k: v for k, v in batch.items() if k != "labels"}
        ours = model(px, **kw, labels=batch["labels"])
        theirs = ref(pixel_values=px, **kw, labels=batch["labels"])
    assert loss == pytest.approx(float(ours.loss), abs=1e-5)
    assert loss == pytest.approx(float(theirs.loss), abs=1e-4)
    logits = ours.logits[:, -batch["labels"].shape[1]:] if text == "opt" else ours.logits
    assert loss == pytest.approx(loop_lm_loss(logits, batch["labels"], shift=text == "opt"), abs=1e-5)


def test_stage2_t5_layout_and_prefix_lm(dirs):
    model = Blip2ForConditionalGeneration.from_pretrained(dirs["t5"])
    processor = Blip2Processor.from_pretrained(dirs["t5"])
    img = model.config.image_token_index
    plain = Stage2Text(processor.tokenizer, model, prompt="a photo of")({"caption": ["a small red circle"],
                                                                         "key": torch.tensor([0])})
    assert plain["input_ids"][0].tolist() == [img] * NUM_QUERY + [t5_id("a"), t5_id("photo"), t5_id("of"), 1]
    assert plain["labels"][0].tolist() == [t5_id("a"), t5_id("small"), t5_id("red"), t5_id("circle"), 1]
    prefix = Stage2Text(processor.tokenizer, model, prefix_lm=True, seed=3)
    caption = "a large blue square and a small red circle"
    seen = set()
    for key in range(40):
        b = prefix({"caption": [caption], "key": torch.tensor([key])})
        enc = [t for t in b["input_ids"][0].tolist() if t not in (img, 1)]
        dec = [t for t in b["labels"][0].tolist() if t != 1]
        assert enc + dec == [t5_id(w) for w in caption.split()] and dec  # a split of the caption, never an empty target
        seen.add(len(enc))
    assert len(seen) >= 5  # the split point varies with the sample
