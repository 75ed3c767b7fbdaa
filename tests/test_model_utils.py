"""transformers' model utilities on our models (counts, gradient checkpointing, embeddings, push_to_hub), and a
``transformers.Trainer`` run: train, ``save_model``, reload."""

from __future__ import annotations

import os

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration, Blip2VisionModel
from conftest import IMAGE_TOKEN, pixel_batch, prompts_with_images


@pytest.fixture
def pair(hf_opt_dir):
    hf, d = hf_opt_dir
    return hf, Blip2ForConditionalGeneration.from_pretrained(d), d


def batch(n: int = 2, seed: int = 0):
    ids, mask = prompts_with_images([[2, 10 + i, 11, 12] for i in range(n)])
    return dict(pixel_values=pixel_batch(n, seed=seed), input_ids=ids, attention_mask=mask,
                labels=ids.masked_fill(ids == IMAGE_TOKEN, -100))


def test_counts_device_dtype_and_generation_flag(pair):
    hf, ours, d = pair
    assert ours.num_parameters() == hf.num_parameters() > 0
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    ours.vision_model.requires_grad_(False)
    hf.vision_model.requires_grad_(False)
    try:
        assert ours.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True)
    finally:
        hf.vision_model.requires_grad_(True)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert Blip2ForConditionalGeneration.can_generate() and not Blip2VisionModel.can_generate()
    assert Blip2VisionModel.from_pretrained(d).num_parameters() == hf.vision_model.num_parameters()


def test_embeddings_getters_setters_and_resize(pair, hf_t5_dir):
    hf, ours, _ = pair
    emb = ours.get_input_embeddings()
    assert ours.get_output_embeddings().weight is emb.weight  # OPT's head is tied
    old = emb.weight.detach().clone()
    new = ours.resize_token_embeddings(101, pad_to_multiple_of=8)
    assert new.num_embeddings == 104 == ours.config.text_config.vocab_size
    assert torch.equal(new.weight[:100], old) and torch.allclose(new.weight[103], old.mean(0))
    assert ours.get_output_embeddings().weight is new.weight  # still tied
    assert ours.language_model.model.decoder.embed_tokens is new
    with torch.no_grad():
        assert ours(**batch()).logits.shape[-1] == 104
    t5 = Blip2ForConditionalGeneration.from_pretrained(hf_t5_dir[1])
    head = t5.get_output_embeddings().weight.detach().clone()
    t5.resize_token_embeddings(96)  # shrink: rows cut, head (untied) too, every registration of the table
    assert t5.language_model.encoder.embed_tokens is t5.language_model.decoder.embed_tokens is t5.get_input_embeddings()
    assert torch.equal(t5.get_output_embeddings().weight, head[:96])
    table = torch.nn.Embedding(96, 32)
    t5.set_input_embeddings(table)
    assert t5.language_model.shared is table and t5.language_model.decoder.embed_tokens is table
    ours.set_output_embeddings(torch.nn.Linear(32, 104, bias=False))
    assert ours.get_output_embeddings().weight is not new.weight
    ours.tie_weights()
    assert ours.get_output_embeddings().weight is new.weight


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(hf_opt_dir, use_reentrant):
    d = hf_opt_dir[1]
    grads = []
    for enable in (False, True):
        model = Blip2ForConditionalGeneration.from_pretrained(d).train()
        if enable:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
            assert model.is_gradient_checkpointing and model.vision_model.gradient_checkpointing
        model(**batch()).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        if enable:
            model.gradient_checkpointing_disable()
            assert not model.is_gradient_checkpointing
            assert "forward" not in model.language_model.model.decoder.layers[0].__dict__
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_push_to_hub_uploads_a_checkpoint(pair, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _, ours, _ = pair
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, create_pr=False):
            calls["files"] = sorted(os.listdir(folder_path))
            return "commit"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert ours.push_to_hub("me/tiny", private=True, token="t") == "commit"
    assert calls["repo"] == ("me/tiny", True, True) and calls["token"] == "t"
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(calls["files"])


def test_trainer_trains_saves_and_reloads(hf_opt_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    d = hf_opt_dir[1]
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    before = model.language_projection.weight.detach().clone()
    rows = [{k: v[0] for k, v in batch(1, seed=i).items()} for i in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.global_step == 2
    assert not torch.equal(model.language_projection.weight, before)
    trainer.save_model(str(tmp_path / "out"))  # safetensors refuse shared tensors: the tied head is a copy
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    reloaded = Blip2ForConditionalGeneration.from_pretrained(d)
    reloaded.load_state_dict(saved)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still one table
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch()).logits, model(**batch()).logits)
    model.save_pretrained(tmp_path / "full")  # and the full checkpoint round trip
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch()).logits, model(**batch()).logits)
