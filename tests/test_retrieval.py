"""Parity of blip2.models.retrieval with transformers' BLIP-2 retrieval classes on tiny random models.

The reference is saved with ``save_pretrained`` and ours is loaded with ``from_pretrained`` from that
directory, so these tests cover the key names and the loading as well as the arithmetic.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import IMAGE_TOKEN, NUM_QUERY, pixel_batch, randomize_, tiny_hf_config  # noqa: E402

from blip2.config import Blip2Config  # noqa: E402
from blip2.models.retrieval import (  # noqa: E402
    Blip2ForImageTextRetrieval,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

TOL = 1e-5
QVOCAB = 120  # Q-Former (BERT) vocabulary of the tiny models
CLS = 101 % QVOCAB


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def hf_retrieval_config(image_token_index: int | None = IMAGE_TOKEN):
    cfg = tiny_hf_config(image_token_index=image_token_index)
    cfg.qformer_config.use_qformer_text_input = True
    cfg.qformer_config.vocab_size = QVOCAB
    cfg.image_text_hidden_size = 24
    return cfg


def hf_retrieval(seed: int = 0, image_token_index: int | None = IMAGE_TOKEN):
    torch.manual_seed(seed)
    model = transformers.Blip2ForImageTextRetrieval(hf_retrieval_config(image_token_index)).eval()
    return randomize_(model, seed)


def text_batch(B: int, T: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-like ids (CLS first) with right padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, QVOCAB, (B, T), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def with_image_tokens(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the processor produces when the config has an image token: Q image tokens first."""
    B = ids.shape[0]
    return (torch.cat([torch.full((B, NUM_QUERY), IMAGE_TOKEN), ids], 1),
            torch.cat([torch.ones(B, NUM_QUERY, dtype=torch.long), mask], 1))


@pytest.fixture(scope="module", params=[IMAGE_TOKEN, None], ids=["image_tokens", "no_image_token"])
def pair(request, tmp_path_factory):
    ref = hf_retrieval(seed=3, image_token_index=request.param)
    d = tmp_path_factory.mktemp("hf_retrieval")
    ref.save_pretrained(d)
    return ref, Blip2ForImageTextRetrieval.from_pretrained(d), str(d)


def model_inputs(ref, B: int = 3, seed: int = 0):
    ids, mask = text_batch(B, seed=seed)
    if ref.config.image_token_index is not None:
        ids, mask = with_image_tokens(ids, mask)
    return pixel_batch(B, seed=seed), ids, mask


def test_state_dict_keys_and_shapes_equal_reference():
    ref = hf_retrieval()
    cfg = Blip2Config.from_dict(ref.config.to_dict())
    for ours_cls, name in [(Blip2ForImageTextRetrieval, "Blip2ForImageTextRetrieval"),
                           (Blip2TextModelWithProjection, "Blip2TextModelWithProjection"),
                           (Blip2VisionModelWithProjection, "Blip2VisionModelWithProjection")]:
        with torch.device("meta"):
            theirs = getattr(transformers, name)(ref.config)
            ours = ours_cls(cfg)
        want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert got == want, name


@torch.no_grad()
def test_itm_logits_match_reference(pair):
    ref, ours, _ = pair
    px, ids, mask = model_inputs(ref)
    want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    got = ours(px, ids, mask, use_image_text_matching_head=True)
    assert got.logits_per_image.shape == (3, 2)
    assert want.logits_per_image.std() > 0.1  # not a degenerate model
    assert diff(got.logits_per_image, want.logits_per_image) < TOL
    assert diff(got.logits_per_text, want.logits_per_text) < TOL
    assert diff(got.text_embeds, want.text_embeds) < TOL  # Q-Former output over [queries; text]
    assert diff(got.image_embeds, want.image_embeds) < TOL  # vision output


@torch.no_grad()
def test_itm_padding_changes_the_logits(pair):
    """The text mask must reach the Q-Former: masking one more token changes that row only."""
    ref, ours, _ = pair
    px, ids, mask = model_inputs(ref)
    out = ours(px, ids, mask, use_image_text_matching_head=True).logits_per_image
    mask2 = mask.clone()
    mask2[0, -1] = 0
    out2 = ours(px, ids, mask2, use_image_text_matching_head=True).logits_per_image
    want2 = ref(pixel_values=px, input_ids=ids, attention_mask=mask2, use_image_text_matching_head=True)
    assert diff(out2, want2.logits_per_image) < TOL
    assert diff(out[0], out2[0]) > 1e-3 and diff(out[1:], out2[1:]) == 0


@torch.no_grad()
def test_itc_logits_and_embeddings_match_reference(pair):
    ref, ours, _ = pair
    px, ids, mask = model_inputs(ref, B=4, seed=1)
    px = px[:3]  # 3 images x 4 texts: the ITC matrix is not square
    want = ref(pixel_values=px, input_ids=ids, attention_mask=mask)
    got = ours(px, ids, mask)
    assert got.logits_per_image.shape == (3, 4) and got.logits_per_text.shape == (4, 3)
    assert want.logits_per_image.std() > 0.05
    assert diff(got.logits_per_image, want.logits_per_image) < TOL
    assert diff(got.logits_per_text, want.logits_per_text) < TOL
    assert diff(got.text_embeds, want.text_embeds) < TOL  # [4, E]
    assert diff(got.image_embeds, want.image_embeds) < TOL  # [3, Q, E]


@torch.no_grad()
def test_convenience_scores_equal_forward(pair):
    ref, ours, _ = pair
    px, ids, mask = model_inputs(ref, B=3, seed=2)
    text_ids, text_mask = ids[:, -6:], mask[:, -6:]  # plain text, no image tokens
    itm = ours(px, ids, mask, use_image_text_matching_head=True).logits_per_image
    assert diff(ours.itm_logits(px, text_ids, text_mask), itm) < TOL
    assert diff(ours.itm_scores(px, text_ids, text_mask), itm[:, 1]) < TOL
    itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    assert diff(ours.itc_scores(px, text_ids, text_mask), itc) < TOL
    assert ours.image_embeds(px).shape == (3, NUM_QUERY, 24)
    assert torch.allclose(ours.text_embeds(text_ids, text_mask).norm(dim=-1), torch.ones(3))


@torch.no_grad()
def test_image_tokens_are_dropped_only_when_the_config_has_them(pair):
    """With an image token in the config, plain text ids give the same logits as ids with the
    processor's image tokens; without one, those ids are ordinary text and change the result."""
    ref, ours, _ = pair
    px = pixel_batch(2, seed=4)
    ids, mask = text_batch(2, seed=4)
    full_ids, full_mask = with_image_tokens(ids, mask)
    for itm in (True, False):
        a = ours(px, ids, mask, use_image_text_matching_head=itm).logits_per_image
        b = ours(px, full_ids, full_mask, use_image_text_matching_head=itm).logits_per_image
        if ref.config.image_token_index is not None:
            assert diff(a, b) == 0
        else:
            assert diff(a, b) > 1e-3


@torch.no_grad()
def test_towers_with_projection_match_reference(pair):
    _, _, d = pair
    px = pixel_batch(2, seed=5)
    ids, mask = text_batch(3, seed=5)
    text_ref = transformers.Blip2TextModelWithProjection.from_pretrained(d).eval()
    text_ours = Blip2TextModelWithProjection.from_pretrained(d)  # skips the image tower's keys
    want, got = text_ref(input_ids=ids, attention_mask=mask), text_ours(ids, mask)
    assert got.text_embeds.shape == (3, 6, 24)
    assert diff(got.text_embeds, want.text_embeds) < TOL
    assert diff(got.last_hidden_state, want.last_hidden_state) < TOL
    vis_ref = transformers.Blip2VisionModelWithProjection.from_pretrained(d).eval()
    vis_ours = Blip2VisionModelWithProjection.from_pretrained(d)
    want, got = vis_ref(pixel_values=px), vis_ours(px)
    assert got.image_embeds.shape == (2, NUM_QUERY, 24)
    assert diff(got.image_embeds, want.image_embeds) < TOL
    assert diff(got.last_hidden_state, want.last_hidden_state) < TOL


@torch.no_grad()
def test_round_trip_into_transformers(pair, tmp_path):
    ref, ours, _ = pair
    px, ids, mask = model_inputs(ref, B=2, seed=6)
    ours.save_pretrained(tmp_path / "full")
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "full").eval()
    for itm in (True, False):
        a = back(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        b = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        assert diff(a.logits_per_image, b.logits_per_image) == 0
    # the single towers write checkpoints transformers loads too
    text = Blip2TextModelWithProjection.from_pretrained(tmp_path / "full")
    text.save_pretrained(tmp_path / "text")
    text_back = transformers.Blip2TextModelWithProjection.from_pretrained(tmp_path / "text").eval()
    t_ids, t_mask = text_batch(2, seed=6)
    assert diff(text_back(input_ids=t_ids, attention_mask=t_mask).text_embeds, text(t_ids, t_mask).text_embeds) == 0
    vis = Blip2VisionModelWithProjection.from_pretrained(tmp_path / "full")
    vis.save_pretrained(tmp_path / "vision")
    vis_back = transformers.Blip2VisionModelWithProjection.from_pretrained(tmp_path / "vision").eval()
    assert diff(vis_back(pixel_values=px).image_embeds, vis(px).image_embeds) == 0


@torch.no_grad()
def test_learned_temperature_scales_itc_logits(pair, tmp_path):
    ref, ours, d = pair
    px, ids, mask = model_inputs(ref, B=2, seed=7)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["temperature"] = 0.07
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(d, "model.safetensors"), tmp_path / "model.safetensors")
    hot = Blip2ForImageTextRetrieval.from_pretrained(tmp_path)
    assert hot.config.temperature == 0.07
    cos = ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
    assert diff(hot(px, ids, mask).logits_per_image, cos / 0.07) < TOL / 0.07
    # ITM is unaffected; the raw cosine stays available
    itm_hot = hot(px, ids, mask, use_image_text_matching_head=True).logits_per_image
    assert diff(itm_hot, ours(px, ids, mask, use_image_text_matching_head=True).logits_per_image) == 0
    text_ids, text_mask = ids[:, -6:], mask[:, -6:]
    assert diff(hot.itc_scores(px, text_ids, text_mask), cos) < TOL
    hot.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["temperature"] == 0.07
    # transformers ignores the field and still loads the checkpoint
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "saved").eval()
    assert diff(back(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image, cos) == 0


@torch.no_grad()
def test_fp16_keeps_qformer_fp32_and_matches_reference(pair):
    ref, _, d = pair
    ours = Blip2ForImageTextRetrieval.from_pretrained(d, torch_dtype=torch.float16)
    theirs = transformers.Blip2ForImageTextRetrieval.from_pretrained(d, dtype=torch.float16).eval()
    for m in (ours, theirs):
        assert m.qformer.layernorm.weight.dtype == m.query_tokens.dtype == torch.float32
        assert m.vision_model.post_layernorm.weight.dtype == m.itm_head.weight.dtype == torch.float16
        assert m.embeddings.word_embeddings.weight.dtype == torch.float16
    px, ids, mask = model_inputs(ref, B=2, seed=8)
    for itm in (True, False):
        a = ours(px.half(), ids, mask, use_image_text_matching_head=itm).logits_per_image
        b = theirs(pixel_values=px.half(), input_ids=ids, attention_mask=mask,
                   use_image_text_matching_head=itm).logits_per_image
        assert a.dtype == b.dtype == torch.float16
        assert diff(a, b) < 1e-2


@torch.no_grad()
def test_bf16_keeps_qformer_fp32(pair):
    """transformers casts the Q-Former to bf16 too (it keeps fp32 only for fp16); we keep it fp32."""
    ref, ours, d = pair
    low = Blip2ForImageTextRetrieval.from_pretrained(d, torch_dtype=torch.bfloat16)
    assert low.qformer.layernorm.weight.dtype == low.query_tokens.dtype == torch.float32
    assert low.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    px, ids, mask = model_inputs(ref, B=2, seed=8)
    for itm in (True, False):
        a = low(px, ids, mask, use_image_text_matching_head=itm).logits_per_image
        b = ours(px, ids, mask, use_image_text_matching_head=itm).logits_per_image
        assert diff(a, b) < 0.1 * b.abs().max().item()


def test_itm_pairs_must_match(pair):
    _, ours, _ = pair
    ids, mask = text_batch(3)
    with pytest.raises(ValueError, match="2 images and 3 texts"):
        ours.itm_logits(pixel_batch(2), ids, mask)
