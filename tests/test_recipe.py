"""The demo recipe: its tokenizer (ours and transformers' agree) and the whole pipeline at tiny sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from blip2.models.blip2 import Blip2ForConditionalGeneration
from blip2.processing import Blip2Processor, TextTokenizer
from blip2.demo.recipe.config import quick
from blip2.demo.recipe.data import make_scene_data
from blip2.demo.recipe.driver import run
from blip2.demo.recipe.lm import scene_documents, scene_table
from blip2.demo.recipe.stages import CAPTION_COPIES, VQA_PROMPT, hard_negative, stage1_dataset, stage2_dataset
from blip2.demo.recipe.tokenizer import build_tokenizer, vqa_prompt
from blip2.models.retrieval import Blip2ForImageTextRetrieval
from blip2.demo.world import caption, questions, sample_scene

CAPTION = "a small green triangle, a large yellow circle and a small purple square"
CAPTION_IDS = [1, 4, 7, 10, 17, 6, 4, 8, 12, 15, 5, 4, 7, 13, 16]


def test_tokenizer_ids_specials_and_round_trip():
    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == len(tok) - 1 == 41
    assert tok(CAPTION)["input_ids"] == CAPTION_IDS
    assert tok.decode(CAPTION_IDS + [2], skip_special_tokens=True) == CAPTION
    # every word of 300 scenes' captions and questions is in the vocabulary
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(300):
        scene = sample_scene(rng)
        texts += [caption(scene)] + [f"{vqa_prompt(q['question'])} {q['answer']}" for q in questions(scene)]
    ids = sum(tok(texts)["input_ids"], [])
    assert tok.unk_token_id not in ids


def test_qformer_tokenizer_ends_with_eos_and_pads_right():
    tok = build_tokenizer(add_eos=True)
    enc = tok(["a red circle", CAPTION], padding=True)
    assert enc["input_ids"][0] == [1, 4, 9, 15, 2] + [0] * 11 and enc["attention_mask"][0] == [1] * 5 + [0] * 11
    assert enc["input_ids"][1] == CAPTION_IDS + [2]


def test_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    ours = TextTokenizer.from_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = [CAPTION, vqa_prompt("What color is the circle?"), "a red circle"]
    a = ours(texts, padding=True, return_tensors="pt")
    b = theirs(texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert theirs.padding_side == "left" and theirs.eos_token_id == 2 and theirs.pad_token_id == 0
    assert theirs.decode(CAPTION_IDS, skip_special_tokens=True) == CAPTION


def test_stage_datasets():
    """Stage 1: one caption per scene; stage 2: the caption CAPTION_COPIES times and one question of each
    type the scene has, every record pointing at its scene's cached features."""
    data = make_scene_data(6, seed=3, variant_share=0.0)
    states = torch.randn(6, 5, 4)
    one = stage1_dataset(states, data)
    assert len(one) == 6 and [one[i]["caption"] for i in range(6)] == data.captions
    tok = build_tokenizer()
    two = stage2_dataset(states, data, seed=0, tokenizer=tok)
    seen = 0
    for i in range(6):
        kinds = sorted({q["type"] for q in data.qa[i]})
        rows = [two[k] for k in range(seen, seen + CAPTION_COPIES + len(kinds))]
        seen += len(rows)
        assert all(torch.equal(r["vision_states"], states[i]) for r in rows)
        assert [r["caption"] for r in rows[:CAPTION_COPIES]] == [data.captions[i]] * CAPTION_COPIES
        asked = rows[CAPTION_COPIES:]
        assert all(r["caption"] is None for r in asked)
        truth = {(q["question"], q["answer"]): q["type"] for q in data.qa[i]}
        assert sorted(truth[(r["question"], r["answer"])] for r in asked) == kinds
        # every record's prefix is the scene table the LM read where the image goes (lm._batch)
        table = [t for t in tok(data.captions[i])["input_ids"][1:] if t not in (4, 5, 6)]  # a and ,
        assert all(tok(r["prefix"], add_special_tokens=False)["input_ids"] == table for r in rows)
    assert seen == len(two)
    assert VQA_PROMPT.format("how many shapes are there?") == vqa_prompt("how many shapes are there?")


def test_hard_negatives_get_one_thing_wrong():
    """Same words but one colour, shape or size (or two colours swapped): never the caption itself."""
    data = make_scene_data(200, seed=4, variant_share=0.0)
    rng = np.random.default_rng(0)
    changed = []
    for scene, cap in zip(data.scenes, data.captions):
        neg = hard_negative(scene, rng)
        a, b = cap.split(), neg.split()
        assert len(a) == len(b) and neg != cap
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(diff) == 1 or (len(diff) == 2 and diff[0] == diff[1][::-1]), (cap, neg)  # one word, or a swap
        changed += [x for x, _ in diff]
    colours = sum(w in ("red", "green", "blue", "yellow", "purple", "orange") for w in changed)
    assert colours > len(changed) / 2  # colour, ITM's weak spot, most often
    records = stage1_dataset(torch.zeros(200, 2, 2), data, seed=1)
    assert records[0]["negative"] == stage1_dataset(torch.zeros(200, 2, 2), data, seed=1)[0]["negative"]
    assert all(records[i]["negative"] not in (None, data.captions[i]) for i in range(200))


def test_colour_questions_are_pretrained_twice():
    tok = build_tokenizer()
    qa = [{"question": "what color is the circle?", "answer": "red", "type": "color"},
          {"question": "how many shapes are there?", "answer": "one", "type": "count"}]
    texts = [tok.decode(d, skip_special_tokens=True) for d in scene_documents(tok, "a red circle", qa)]
    assert texts.count("question : what color is the circle? answer : red") == 2
    assert texts.count("question : how many shapes are there? answer : one") == 1


def test_scene_documents_end_with_eos():
    tok = build_tokenizer()
    docs = scene_documents(tok, "a red circle", [{"question": "how many shapes are there?", "answer": "one"}])
    assert docs[0] == [1, 4, 9, 15, 2]
    assert all(d[-1] == 2 and tok.unk_token_id not in d for d in docs)
    assert [tok.decode(d, skip_special_tokens=True) for d in docs[1:]] == [
        "question : how many shapes are there? answer : one", "a photo of a red circle",
        "question : how many shapes are there? short answer : one",
        "question : how many shapes are there? answer : one. question : how many shapes are there? answer : one"]


def test_quick_recipe_end_to_end(tmp_path):
    """Every step of ``python -m blip2.demo.recipe --quick``: files in the HF layout, loadable, evaluated."""
    cfg = quick(len(build_tokenizer()))
    report = run(str(tmp_path), cfg)
    demo, retrieval = tmp_path / "demo", tmp_path / "demo-retrieval"
    for name in ("config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
                 "processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (demo / name).is_file(), name
    assert (retrieval / "model.safetensors").is_file() and (retrieval / "tokenizer.json").is_file()
    config = json.loads((demo / "config.json").read_text())
    assert config["num_query_tokens"] == 4 and config["image_token_index"] == 41
    assert json.loads((demo / "processor_config.json").read_text())["num_query_tokens"] == 4
    assert json.loads((demo / "generation_config.json").read_text())["eos_token_id"] == 2

    model = Blip2ForConditionalGeneration.from_pretrained(demo)
    processor = Blip2Processor.from_pretrained(demo)
    assert sum(p.numel() for p in model.parameters()) == 77_056
    pixels = processor(images=[np.zeros((96, 96, 3), np.uint8)])["pixel_values"]
    ids = model.generate(pixels, max_new_tokens=3)
    assert ids.shape[0] == 1 and ids[0, :5].tolist() == [41, 41, 41, 41, 1]

    ret = Blip2ForImageTextRetrieval.from_pretrained(retrieval)
    assert 0.001 <= ret.config.temperature <= 0.5
    assert report["images"] == cfg.n_val and 0.0 <= report["caption_objects"] <= 100.0
    assert 0.0 <= report["t2i_r1_itc_itm"] <= 100.0 and report["vqa_count_n"] == cfg.n_val


def test_lm_rows_open_with_the_scene_table_where_the_image_goes():
    from blip2.demo.recipe.lm import _batch

    tok = build_tokenizer()
    docs = scene_documents(tok, "a small red circle and a large blue square",
                           [{"question": "how many shapes are there?", "answer": "two"}])
    tables = [scene_table(tok, "a small red circle and a large blue square")]
    ids, mask, labels = _batch([docs], tables, np.random.default_rng(0), context=8, block=200, pad=0)
    assert tok.decode(ids[0, :8]) == "small red circle large blue square <pad> <pad>"
    assert mask[0, :8].tolist() == [1] * 8 and (labels[0, :8] == -100).all()  # attended, no loss
    assert ids[0, 8].item() == 1  # <s> where stage 2 puts it, after the image tokens
    assert int(mask.sum()) == 8 + sum(len(d) for d in docs) and bool((labels[0, 8:] == ids[0, 8:]).all())


def test_resumed_recipe_gives_the_same_weights(tmp_path):
    """A run that reuses a finished run's encoder and LM (--resume) ends with the same weights, bit for
    bit, as that run: the Q-Former and projection inits are seeded, not drawn from whatever RNG state the
    skipped steps would have left (they were not, once, and the two differed)."""
    import shutil

    from safetensors.torch import load_file

    cfg = quick(len(build_tokenizer()))
    run(str(tmp_path / "a"), cfg)
    for part in ("tokenizer", "vision", "lm"):
        shutil.copytree(tmp_path / "a" / "work" / part, tmp_path / "b" / "work" / part)
    run(str(tmp_path / "b"), cfg, resume=True)
    for model in ("demo", "demo-retrieval"):
        a = load_file(str(tmp_path / "a" / model / "model.safetensors"))
        b = load_file(str(tmp_path / "b" / model / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model


def test_pretraining_lr_warms_up_to_the_peak_then_decays_to_a_tenth():
    """The schedule the shipped encoder and LM were pretrained with: peak at step warmup - 1 (blip2.train's
    lr_at reaches it a step later, from warmup_lr), cosine to lr / 10 at the last step."""
    from blip2.demo.recipe.pretraining import pretraining_lr

    assert [pretraining_lr(s, 105, 1e-3, warmup=5) for s in range(6)] == pytest.approx(
        [2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])
    assert pretraining_lr(55, 105, 1e-3, warmup=5) == pytest.approx(1e-4 + 0.9e-3 / 2)  # half-way down
    # the last step is 99/100 of the way down: the floor itself is never used
    assert pretraining_lr(104, 105, 1e-3, warmup=5) == pytest.approx(1e-4 + 0.9e-3 / 2 * (1 + math.cos(math.pi * 0.99)))
