"""BLIP-2 with OPT against transformers: logits, loss, tokens, checkpoints, errors."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2Model
from blip2.checkpoint import CheckpointError
from conftest import IMAGE_TOKEN, NUM_QUERY, pixel_batch, prompts_with_images

PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 21], [2, 31, 32, 33]]  # BOS + text, three lengths


@pytest.fixture(scope="module")
def pair(hf_opt_dir):
    hf, d = hf_opt_dir
    ours = Blip2ForConditionalGeneration.from_pretrained(d)
    return hf, ours, d


def test_logits_and_loss_match_reference(pair):
    hf, ours, _ = pair
    pixels = pixel_batch(3)
    ids, mask = prompts_with_images(PROMPTS)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == IMAGE_TOKEN, -100)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(pixels, ids, mask, labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=0)
    assert ref.loss.item() > 1.0  # a random model: the loss is far from zero, so the check means something


def test_vision_and_qformer_outputs_match(pair):
    hf, ours, _ = pair
    pixels = pixel_batch(2, seed=5)
    with torch.no_grad():
        ref_vision = hf.vision_model(pixel_values=pixels)
        ref_q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                           encoder_hidden_states=ref_vision.last_hidden_state).last_hidden_state
        last, pooled = ours.get_image_features(pixels)[:2]
        q = ours.get_qformer_features(pixels)
    torch.testing.assert_close(last, ref_vision.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ref_vision.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generated_tokens_match_reference(pair, num_beams):
    hf, ours, _ = pair
    pixels = pixel_batch(3, seed=7)
    ids, mask = prompts_with_images(PROMPTS)
    kw = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kw)
    out = ours.generate(pixels, ids, mask, **kw)
    assert out.tolist() == ref.tolist()
    assert out.shape[1] > ids.shape[1]  # new tokens were produced


def test_captioning_without_prompt_matches_reference(pair):
    hf, ours, _ = pair
    pixels = pixel_batch(2, seed=3)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
    out = ours.generate(pixels, max_new_tokens=6)
    assert out.tolist() == ref.tolist()


def test_batch_equals_each_prompt_alone(pair):
    _, ours, _ = pair
    pixels = pixel_batch(3, seed=9)
    ids, mask = prompts_with_images(PROMPTS)
    batched = ours.generate(pixels, ids, mask, max_new_tokens=8)
    for i, p in enumerate(PROMPTS):
        one_ids, one_mask = prompts_with_images([p])
        alone = ours.generate(pixels[i:i + 1], one_ids, one_mask, max_new_tokens=8)
        new_b = batched[i, ids.shape[1]:]
        new_a = alone[0, one_ids.shape[1]:]
        assert new_b.tolist() == new_a.tolist()


def test_legacy_path_equals_image_token_path(pair):
    """No <image> tokens in input_ids: the queries are prepended; same logits and new tokens."""
    _, ours, _ = pair
    pixels = pixel_batch(3, seed=11)
    ids, mask = prompts_with_images(PROMPTS)
    legacy_ids, legacy_mask = prompts_with_images(PROMPTS, image_token=None)
    with torch.no_grad():
        a = ours(pixels, ids, mask).logits
        b = ours(pixels, legacy_ids, legacy_mask).logits
    valid = mask.bool()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=0)
    gen_a = ours.generate(pixels, ids, mask, max_new_tokens=6)[:, ids.shape[1]:]
    gen_b = ours.generate(pixels, legacy_ids, legacy_mask, max_new_tokens=6)
    assert gen_b[:, :legacy_ids.shape[1]].tolist() == legacy_ids.tolist()
    assert gen_b[:, legacy_ids.shape[1]:].tolist() == gen_a.tolist()


def test_wrong_number_of_image_tokens_is_an_error(pair):
    _, ours, _ = pair
    ids = torch.tensor([[IMAGE_TOKEN, IMAGE_TOKEN, 2, 11]])
    with pytest.raises(ValueError, match="num_query_tokens=4"):
        ours(pixel_batch(1), ids)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    from transformers import Blip2ForConditionalGeneration as HF

    hf, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = HF.from_pretrained(tmp_path).eval()
    pixels = pixel_batch(2, seed=13)
    ids, mask = prompts_with_images(PROMPTS[:2])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        got = back(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    assert torch.equal(ref, got)


def test_sharded_and_bin_checkpoints_load(pair, tmp_path):
    _, ours, d = pair
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "sharded")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(os.path.join(d, "config.json"), bin_dir)
    torch.save(ours.state_dict(), bin_dir / "pytorch_model.bin")
    from_bin = Blip2Model.from_pretrained(bin_dir)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
        assert torch.equal(from_bin.state_dict()[k], v), k


def test_dtype_keeps_qformer_in_fp32(pair):
    _, _, d = pair
    m = Blip2ForConditionalGeneration.from_pretrained(d, torch_dtype=torch.bfloat16)
    assert m.qformer.layernorm.weight.dtype == torch.float32
    assert m.query_tokens.dtype == torch.float32
    assert m.language_projection.weight.dtype == torch.bfloat16
    assert m.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    out = m.generate(pixel_batch(1), max_new_tokens=3)
    assert out.shape == (1, NUM_QUERY + 1 + 3)



# -- errors a user can hit --------------------------------------------------------------------


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_missing_weights_is_a_clear_error(pair, tmp_path):
    _, _, d = pair
    shutil.copy(os.path.join(d, "config.json"), tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_misshaped_tensor_names_key_and_shapes(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, d = pair
    shutil.copy(os.path.join(d, "config.json"), tmp_path)
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["language_projection.weight"] = torch.zeros(32, 31)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"language_projection\.weight.*\(32, 31\).*\(32, 32\)"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, d = pair
    shutil.copy(os.path.join(d, "config.json"), tmp_path)
    sd = load_file(os.path.join(d, "model.safetensors"))
    del sd["qformer.layernorm.bias"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys.*qformer\.layernorm\.bias"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    sd = load_file(os.path.join(d, "model.safetensors"))
    sd["surprise.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*surprise\.weight"):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)


def test_parts_load_from_a_full_checkpoint_and_alone(pair, tmp_path):
    """Blip2VisionModel / Blip2QFormerModel read a whole BLIP-2 directory, and their own."""
    from transformers import Blip2VisionModel as HFVision

    from blip2 import Blip2QFormerModel, Blip2VisionModel

    hf, _, d = pair
    pixels = pixel_batch(2, seed=17)
    vision = Blip2VisionModel.from_pretrained(d)
    qformer = Blip2QFormerModel.from_pretrained(d)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pixels).last_hidden_state
        ref_q = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=ref).last_hidden_state
        assert torch.equal(vision(pixels)[0], ref)
        torch.testing.assert_close(qformer(hf.query_tokens.expand(2, -1, -1), ref).last_hidden_state, ref_q,
                                   atol=1e-6, rtol=0)
    vision.save_pretrained(tmp_path)
    alone = HFVision.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(alone(pixel_values=pixels).last_hidden_state, ref)
    assert torch.equal(Blip2VisionModel.from_pretrained(tmp_path)(pixels)[0], ref)


def test_hub_id_resolves_through_the_hub_cache(pair, tmp_path):
    """A Hub id goes through huggingface_hub (here from a pre-filled cache, as offline users have)."""
    _, ours, d = pair
    snap = tmp_path / "models--acme--tiny-blip2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name in os.listdir(d):
        shutil.copy(os.path.join(d, name), snap)
    (tmp_path / "models--acme--tiny-blip2" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-blip2" / "refs" / "main").write_text("0" * 40)
    m = Blip2ForConditionalGeneration.from_pretrained("acme/tiny-blip2", cache_dir=str(tmp_path), local_files_only=True)
    assert torch.equal(m.language_projection.weight, ours.language_projection.weight)
    with pytest.raises(FileNotFoundError, match="acme/absent.*Hub"):
        Blip2ForConditionalGeneration.from_pretrained("acme/absent", cache_dir=str(tmp_path), local_files_only=True)
