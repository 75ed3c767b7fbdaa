"""Forward outputs read as transformers' are read (attribute, key, index, to_tuple), and
``output_hidden_states`` / ``output_attentions`` / ``return_dict`` give transformers' values on tiny models."""

from __future__ import annotations

import pickle

import pytest
import torch

from blip2 import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Model, Blip2QFormerModel,
                   Blip2TextModelWithProjection, Blip2VisionModel, Blip2VisionModelWithProjection)
from blip2.models.outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast
from conftest import IMAGE_TOKEN, NUM_QUERY, pixel_batch, prompts_with_images, save_tiny_checkpoint

TOL = dict(atol=1e-4, rtol=1e-4)
FLAGS = dict(output_hidden_states=True, output_attentions=True)


def eager(model):
    """transformers returns attention weights only from its eager attention."""
    model.set_attn_implementation("eager")
    return model


def assert_all_close(ours, ref, n: int | None = None):
    assert isinstance(ours, tuple) and len(ours) == len(ref) and (n is None or len(ours) == n)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


# -- the output class ---------------------------------------------------------------------------


def test_model_output_reads_as_transformers_outputs():
    h = torch.ones(2, 3)
    out = CausalLMOutputWithPast(logits=h, attentions=(h,))
    assert out.logits is h and out["logits"] is h and out[0] is h  # attribute, key, index
    assert out.loss is None and "loss" not in out  # a field left None is no key, and reads as None
    assert list(out.keys()) == ["logits", "attentions"] and out.to_tuple() == (h, (h,))
    with pytest.raises(KeyError):
        out["loss"]
    with pytest.raises(AttributeError, match="no field 'lgits'"):
        out.lgits
    with pytest.raises(TypeError, match=r"unknown fields \['logit'\]"):
        CausalLMOutputWithPast(logit=h)
    out.loss = torch.tensor(2.0)  # setting a field adds the key
    assert float(out["loss"]) == 2.0
    nested = BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=out)
    assert nested.to_tuple()[1] == out.to_tuple()  # nested outputs become tuples, as transformers' BLIP-2 does
    again = pickle.loads(pickle.dumps(out))
    assert type(again) is CausalLMOutputWithPast and list(again) == ["loss", "logits", "attentions"]
    assert type(out)(dict(out)).keys() == out.keys()  # rebuilt from a dict, as torch and accelerate do


# -- Blip2ForConditionalGeneration / Blip2Model ----------------------------------------------------


@pytest.mark.parametrize("cls_name", ["Blip2ForConditionalGeneration", "Blip2Model"])
def test_opt_outputs_match_reference(hf_opt_dir, cls_name):
    import transformers

    hf, d = hf_opt_dir
    ref_model = eager(getattr(transformers, cls_name).from_pretrained(d)).eval()
    ours = (Blip2ForConditionalGeneration if cls_name == "Blip2ForConditionalGeneration" else Blip2Model
            ).from_pretrained(d)
    pixels = pixel_batch(2, seed=3)
    ids, mask = prompts_with_images([[2, 10, 11, 12], [2, 20, 21, 22]])
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **FLAGS)
        out = ours(pixels, ids, mask, labels=labels, **FLAGS)
    assert list(out.keys()) == list(ref.keys()) == ["loss", "logits", "vision_outputs", "qformer_outputs",
                                                    "language_model_outputs"]
    torch.testing.assert_close(out["loss"], ref["loss"], **TOL)
    torch.testing.assert_close(out[1], ref[1], **TOL)
    lm, rlm = out.language_model_outputs, ref.language_model_outputs
    assert_all_close(lm.hidden_states, rlm.hidden_states, n=3)  # embeddings + 2 layers, the last after the norm
    assert_all_close(lm.attentions, rlm.attentions, n=2)
    torch.testing.assert_close(lm.logits, rlm.logits, **TOL)
    assert float(lm.attentions[1].abs().max()) > 0.1  # weights, not zeros
    # the flags reach the vision encoder and the Q-Former too (transformers 5's Blip2ForConditionalGeneration
    # drops them there): their values are those of transformers' towers
    with torch.no_grad():
        rv = ref_model.vision_model(pixel_values=pixels, **FLAGS)
        rq = ref_model.qformer(query_embeds=ref_model.query_tokens.expand(2, -1, -1),
                               encoder_hidden_states=rv.last_hidden_state, **FLAGS)
    assert_vision_equal(out.vision_outputs, rv)
    assert_qformer_equal(out.qformer_outputs, rq)


def assert_vision_equal(ours, ref):
    assert_all_close(ours.hidden_states, ref.hidden_states, n=3)  # embeddings + 2 layers, the last before the norm
    assert_all_close(ours.attentions, ref.attentions, n=2)


def assert_qformer_equal(ours, ref):
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, **TOL)
    assert_all_close(ours.hidden_states, ref.hidden_states, n=3)
    assert_all_close(ours.cross_attentions, ref.cross_attentions, n=1)  # cross-attention every other layer
    # transformers 5 also files the cross-attention weights under `attentions` (its hook's name filter
    # ".attention." matches "crossattention.attention."); ours holds the self-attention weights alone
    self_only = tuple(w for w in ref.attentions if w.shape[-1] == w.shape[-2])
    assert_all_close(ours.attentions, self_only, n=2)


def test_t5_outputs_match_reference(hf_t5_dir):
    import transformers

    _, d = hf_t5_dir
    ref_model = eager(transformers.Blip2ForConditionalGeneration.from_pretrained(d)).eval()
    ours = Blip2ForConditionalGeneration.from_pretrained(d)
    pixels = pixel_batch(2, seed=4)
    ids = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY + [11, 12, 1], [IMAGE_TOKEN] * NUM_QUERY + [21, 1, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[41, 42, 1], [51, 1, -100]])
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels, **FLAGS)
        out = ours(pixels, ids, mask, labels=labels, **FLAGS)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    lm, rlm = out.language_model_outputs, ref.language_model_outputs
    torch.testing.assert_close(lm.loss, rlm.loss, **TOL)
    torch.testing.assert_close(lm.encoder_last_hidden_state, rlm.encoder_last_hidden_state, **TOL)
    for name in ("encoder_hidden_states", "decoder_hidden_states", "encoder_attentions", "decoder_attentions",
                 "cross_attentions"):
        assert_all_close(getattr(lm, name), getattr(rlm, name))
    assert len(lm.cross_attentions) == 2 and lm.cross_attentions[0].shape[-1] == ids.shape[1]


def test_return_dict_false_gives_the_tuple(hf_opt_dir):
    _, d = hf_opt_dir
    ours = Blip2ForConditionalGeneration.from_pretrained(d)
    pixels = pixel_batch(1)
    ids, mask = prompts_with_images([[2, 10, 11]])
    with torch.no_grad():
        out = ours(pixels, ids, mask)
        tup = ours(pixels, ids, mask, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 4  # no loss without labels
    assert torch.equal(tup[0], out.logits) and torch.equal(tup[1][0], out.vision_outputs.last_hidden_state)
    assert out.vision_outputs.hidden_states is None and "attentions" not in out.language_model_outputs


# -- the towers --------------------------------------------------------------------------------------


def test_vision_and_qformer_outputs_match_reference(hf_opt_dir):
    import transformers

    _, d = hf_opt_dir
    ref = eager(transformers.Blip2Model.from_pretrained(d)).eval()
    vision, qformer = Blip2VisionModel.from_pretrained(d), Blip2QFormerModel.from_pretrained(d)
    pixels = pixel_batch(2, seed=5)
    with torch.no_grad():
        rv = ref.vision_model(pixel_values=pixels, **FLAGS)
        v = vision(pixels, **FLAGS)
        queries = ref.query_tokens.expand(2, -1, -1)
        rq = ref.qformer(query_embeds=queries, encoder_hidden_states=rv.last_hidden_state, **FLAGS)
        q = qformer(queries, v.last_hidden_state, **FLAGS)
        tup = vision(pixels, return_dict=False, **FLAGS)
    assert list(v.keys()) == list(rv.keys())
    assert_vision_equal(v, rv)
    assert_qformer_equal(q, rq)
    assert len(tup) == 4 and torch.equal(tup[2][1], v.hidden_states[1])


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("itm")
    save_tiny_checkpoint(d, seed=3, retrieval=True)
    return str(d)


@pytest.mark.parametrize("itm", [True, False])
def test_retrieval_outputs_match_reference(retrieval_dir, itm):
    import transformers

    ref = eager(transformers.Blip2ForImageTextRetrieval.from_pretrained(retrieval_dir)).eval()
    ours = Blip2ForImageTextRetrieval.from_pretrained(retrieval_dir)
    pixels = pixel_batch(2, seed=6)
    ids, mask = prompts_with_images([[5, 6, 7], [8, 9, 10]])
    with torch.no_grad():
        r = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm, **FLAGS)
        o = ours(pixels, ids, mask, use_image_text_matching_head=itm, **FLAGS)
    assert list(o.keys()) == list(r.keys())
    torch.testing.assert_close(o.logits_per_image, r.logits_per_image, **TOL)
    torch.testing.assert_close(o[2], r[2], **TOL)  # text_embeds
    assert_all_close(o.vision_model_output.hidden_states, r.vision_model_output.hidden_states)
    assert_all_close(o.vision_model_output.attentions, r.vision_model_output.attentions)
    torch.testing.assert_close(o.text_model_output.last_hidden_state, r.text_model_output.last_hidden_state, **TOL)


def test_towers_with_projection_outputs_match_reference(retrieval_dir):
    import transformers

    pixels = pixel_batch(2, seed=7)
    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 1]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    rt = eager(transformers.Blip2TextModelWithProjection.from_pretrained(retrieval_dir)).eval()
    rv = eager(transformers.Blip2VisionModelWithProjection.from_pretrained(retrieval_dir)).eval()
    text = Blip2TextModelWithProjection.from_pretrained(retrieval_dir)
    vision = Blip2VisionModelWithProjection.from_pretrained(retrieval_dir)
    with torch.no_grad():
        rto, to = rt(input_ids=ids, attention_mask=mask, **FLAGS), text(ids, mask, **FLAGS)
        rvo, vo = rv(pixel_values=pixels, **FLAGS), vision(pixels, **FLAGS)
    for ours, ref in ((to, rto), (vo, rvo)):
        assert list(ours.keys()) == list(ref.keys())
        torch.testing.assert_close(ours[0], ref[0], **TOL)
        assert_all_close(ours.hidden_states, ref.hidden_states)
        assert_all_close(ours.attentions, ref.attentions)
