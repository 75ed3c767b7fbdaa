"""LAVIS -> Hugging Face conversion.

A LAVIS-named state dict is built from a tiny random transformers model by the inverse key map,
written here independently (plain string operations, not the converter's table). Converting it back
must give a directory that both transformers and our classes load, with identical outputs.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from conftest import (  # noqa: E402
    hf_blip2,
    pixel_batch,
    prompts_with_images,
    randomize_,
    tiny_hf_config,
)
from safetensors.torch import load_file  # noqa: E402

from blip2.config import Blip2Config  # noqa: E402
from blip2.convert.lavis import (  # noqa: E402
    LavisConversionError,
    convert_lavis_checkpoint,
    convert_lavis_state_dict,
    lavis_config,
    lavis_key_target,
)
from blip2.models.blip2 import Blip2ForConditionalGeneration  # noqa: E402
from blip2.models.retrieval import Blip2ForImageTextRetrieval  # noqa: E402

QVOCAB = 120
TEMP = 0.0625


def lavis_name(key: str, kind: str) -> str:
    """transformers key -> LAVIS key (the inverse map, for one key; qkv.bias is split by the caller)."""
    lm = "opt" if kind == "opt" else "t5"
    if key.startswith("vision_model.embeddings."):
        rest = key[len("vision_model.embeddings."):]
        return {"class_embedding": "visual_encoder.cls_token", "position_embedding": "visual_encoder.pos_embed",
                "patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
                "patch_embedding.bias": "visual_encoder.patch_embed.proj.bias"}[rest]
    if key.startswith("vision_model.post_layernorm."):
        return "ln_vision." + key.split(".")[-1]
    if key.startswith("vision_model.encoder.layers."):
        i, rest = key.split(".")[3], ".".join(key.split(".")[4:])
        rest = (rest.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")
                .replace("self_attn.qkv", "attn.qkv").replace("self_attn.projection", "attn.proj"))
        return f"visual_encoder.blocks.{i}.{rest}"
    if key.startswith("qformer.layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + key.split(".")[-1]
    if key.startswith("qformer.encoder.layer."):
        rest = key[len("qformer."):]
        rest = rest.replace("attention.attention.", "attention.self.")  # also crossattention.attention.
        return "Qformer.bert." + rest
    if key.startswith("embeddings."):
        return "Qformer.bert." + key
    if key.startswith("language_model."):
        return f"{lm}_model." + key[len("language_model."):]
    if key.startswith("language_projection."):
        return f"{lm}_proj." + key.split(".")[-1]
    return {"vision_projection.weight": "vision_proj.weight", "vision_projection.bias": "vision_proj.bias",
            "text_projection.weight": "text_proj.weight", "text_projection.bias": "text_proj.bias"}.get(key, key)


def to_lavis(model: torch.nn.Module, kind: str) -> dict[str, torch.Tensor]:
    """The state dict LAVIS would have for this model, with LAVIS's extra entries."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = lavis_name(key, kind)
        if name.endswith("attn.qkv.bias"):
            q, k, v = value.chunk(3)
            assert torch.all(k == 0)
            sd[name.replace("qkv.bias", "q_bias")] = q.clone()
            sd[name.replace("qkv.bias", "v_bias")] = v.clone()
        else:
            sd[name] = value.clone()
    D = model.config.qformer_config.hidden_size
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    if kind in ("feature_extractor", "itm"):
        sd["temp"] = torch.tensor(TEMP)
        sd["Qformer.cls.predictions.bias"] = torch.randn(QVOCAB)
        sd["Qformer.cls.predictions.transform.dense.weight"] = torch.randn(D, D)
        sd["Qformer.cls.predictions.transform.dense.bias"] = torch.randn(D)
        sd["Qformer.cls.predictions.transform.LayerNorm.weight"] = torch.randn(D)
        sd["Qformer.cls.predictions.transform.LayerNorm.bias"] = torch.randn(D)
        sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    return sd


@torch.no_grad()
def zero_key_bias_(model: torch.nn.Module) -> None:
    """EVA has no key bias: LAVIS cannot hold a non-zero middle third of qkv.bias."""
    for layer in model.vision_model.encoder.layers:
        b = layer.self_attn.qkv.bias
        b[b.numel() // 3: 2 * b.numel() // 3] = 0


def hf_stage1(seed: int = 5):
    cfg = tiny_hf_config(image_token_index=None)
    cfg.qformer_config.use_qformer_text_input = True
    cfg.qformer_config.vocab_size = QVOCAB
    torch.manual_seed(seed)
    model = randomize_(transformers.Blip2ForImageTextRetrieval(cfg).eval(), seed)
    zero_key_bias_(model)
    return model


def hf_lm(text: str):
    model = hf_blip2(text, seed=6)
    zero_key_bias_(model)
    return model


def ours_config(model) -> Blip2Config:
    return Blip2Config.from_dict(model.config.to_dict())


def text_inputs(B: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, QVOCAB, (B, 6), generator=g)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return ids, mask


def hf_saved_keys(model, tmp_path) -> set[str]:
    model.save_pretrained(tmp_path / "hf_saved")
    return set(load_file(tmp_path / "hf_saved" / "model.safetensors"))


@pytest.fixture(scope="module")
def stage1():
    ref = hf_stage1()
    return ref, to_lavis(ref, "itm")


@pytest.mark.parametrize("kind", ["feature_extractor", "itm"])
@torch.no_grad()
def test_stage1_conversion_gives_identical_outputs(stage1, kind, tmp_path):
    ref, lavis = stage1
    torch.save({"model": lavis, "epoch": 3}, tmp_path / "lavis.pth")
    config = convert_lavis_checkpoint(tmp_path / "lavis.pth", tmp_path / "out", kind, ours_config(ref))
    assert config.temperature == TEMP
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == hf_saved_keys(ref, tmp_path)
    back = transformers.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "out").eval()
    ours = Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "out")
    assert ours.config.temperature == TEMP
    px, (ids, mask) = pixel_batch(2), text_inputs()
    for itm in (True, False):
        want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        got = back(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
        assert torch.equal(got.logits_per_image, want.logits_per_image)
        scale = 1.0 if itm else TEMP  # ours applies the learned temperature to the ITC logits
        mine = ours(px, ids, mask, use_image_text_matching_head=itm).logits_per_image
        assert torch.allclose(mine * scale, want.logits_per_image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["opt", "t5"])
@torch.no_grad()
def test_lm_conversion_gives_identical_outputs(kind, tmp_path):
    ref = hf_lm(kind)
    lavis = to_lavis(ref, kind)
    torch.save(lavis, tmp_path / "lavis.pth")  # a bare state dict is accepted too
    config = convert_lavis_checkpoint(tmp_path / "lavis.pth", tmp_path / "out", kind, ours_config(ref))
    assert config.temperature is None
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == hf_saved_keys(ref, tmp_path)
    back = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask = prompts_with_images([[2, 5, 6, 7], [2, 8, 9]])
    px = pixel_batch(2)
    kw = {} if kind == "opt" else {"decoder_input_ids": torch.tensor([[0, 4, 5], [0, 6, 7]])}
    want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
    got = back(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
    assert want.std() > 0.1
    assert torch.equal(got, want)
    mine = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "out")
    valid = mask.bool() if kind == "opt" else slice(None)
    torch.testing.assert_close(mine(px, ids, mask, **kw).logits[valid], want[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["itm", "opt", "t5"])
def test_every_lavis_key_is_mapped_or_dropped(stage1, kind):
    ref, lavis = stage1 if kind == "itm" else (hf_lm(kind), None)
    lavis = lavis if lavis is not None else to_lavis(ref, kind)
    targets, dropped = set(), set()
    for key in lavis:
        target = lavis_key_target(key, kind)  # raises for a key neither mapped nor dropped
        (dropped.add(key) if target is None else targets.add(target))
    assert dropped == {k for k in lavis if k.endswith("position_ids") or k.startswith("Qformer.cls.")}
    want = set(ref.state_dict()) | ({"config.temperature"} if kind == "itm" else set())
    assert targets == want
    converted = convert_lavis_state_dict(lavis, kind, ours_config(ref))
    tied = {"opt": {"language_model.lm_head.weight"},
            "t5": {"language_model.lm_head.weight", "language_model.encoder.embed_tokens.weight",
                   "language_model.decoder.embed_tokens.weight"}}.get(kind, set())
    assert set(converted) == set(ref.state_dict()) - tied


def test_lm_kinds_drop_the_qformer_text_input(stage1):
    """A stage-1 state dict converted for an LM model: the Q-Former text parts are dropped by name."""
    assert lavis_key_target("Qformer.bert.embeddings.word_embeddings.weight", "opt") is None
    assert lavis_key_target("Qformer.bert.encoder.layer.3.output.LayerNorm.bias", "t5") is None
    assert lavis_key_target("Qformer.bert.encoder.layer.3.output_query.LayerNorm.bias", "t5") == \
        "qformer.encoder.layer.3.output_query.LayerNorm.bias"
    with pytest.raises(LavisConversionError, match="'vision_proj.weight'"):
        lavis_key_target("vision_proj.weight", "opt")


@pytest.mark.parametrize("bad", ["Qformer.bert.encoder.layer.0.attention.self.rotary.weight",
                                 "visual_encoder.blocks.0.attn.k_bias", "visual_encoder.norm.weight"])
def test_unknown_key_is_an_error_naming_it(stage1, bad):
    ref, lavis = stage1
    with pytest.raises(LavisConversionError, match=bad.replace(".", r"\.")):
        convert_lavis_state_dict({**lavis, bad: torch.zeros(3)}, "itm", ours_config(ref))


def test_missing_weight_is_an_error_naming_it(stage1):
    ref, lavis = stage1
    sd = {k: v for k, v in lavis.items() if k != "ln_vision.weight"}
    with pytest.raises(LavisConversionError, match=r"vision_model\.post_layernorm\.weight"):
        convert_lavis_state_dict(sd, "itm", ours_config(ref))
    sd = {k: v for k, v in lavis.items() if k != "visual_encoder.blocks.1.attn.v_bias"}
    with pytest.raises(LavisConversionError, match=r"layers\.1\.self_attn\.qkv\.bias: LAVIS has only the q bias"):
        convert_lavis_state_dict(sd, "itm", ours_config(ref))


def test_shape_and_config_mismatches_are_errors(stage1):
    ref, lavis = stage1
    cfg = ours_config(ref)
    cfg.num_query_tokens += 1
    with pytest.raises(LavisConversionError, match=r"query_tokens: shape \(1, 4, 32\).*\(1, 5, 32\)"):
        convert_lavis_state_dict(lavis, "itm", cfg)
    cfg = ours_config(ref)
    cfg.qformer_config.use_qformer_text_input = False
    with pytest.raises(LavisConversionError, match="use_qformer_text_input=True"):
        convert_lavis_state_dict(lavis, "itm", cfg)
    with pytest.raises(LavisConversionError, match="kind: expected one of"):
        convert_lavis_state_dict(lavis, "blip2", ours_config(ref))  # type: ignore[arg-type]


def test_tied_copy_with_other_values_is_an_error():
    ref = hf_lm("opt")
    lavis = to_lavis(ref, "opt")
    lavis["opt_model.lm_head.weight"] = lavis["opt_model.lm_head.weight"] + 1
    with pytest.raises(LavisConversionError, match="'opt_model.lm_head.weight' should be a tied copy"):
        convert_lavis_state_dict(lavis, "opt", ours_config(ref))


def test_split_checkpoints_merge_and_repeats_are_errors(stage1, tmp_path):
    ref, lavis = stage1
    vit = {k: v for k, v in lavis.items() if k.startswith("visual_encoder.")}
    rest = {k: v for k, v in lavis.items() if k not in vit}
    torch.save(vit, tmp_path / "vit.pth")
    torch.save({"model": rest}, tmp_path / "qformer.pth")
    convert_lavis_checkpoint([tmp_path / "vit.pth", tmp_path / "qformer.pth"], tmp_path / "out", "itm",
                             ours_config(ref))
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["vision_model.encoder.layers.0.mlp.fc1.weight"],
                       ref.vision_model.encoder.layers[0].mlp.fc1.weight)
    with pytest.raises(LavisConversionError, match="already read"):
        convert_lavis_checkpoint([tmp_path / "vit.pth", tmp_path / "vit.pth"], tmp_path / "out2", "itm",
                                 ours_config(ref))
    with pytest.raises(LavisConversionError, match="lacks weights for"):
        convert_lavis_checkpoint(tmp_path / "qformer.pth", tmp_path / "out3", "itm", ours_config(ref))


def test_lavis_config_presets_match_the_published_architectures():
    itm = lavis_config("itm")
    hf_itm = transformers.Blip2Config(
        qformer_config=transformers.Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True).to_dict())
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in transformers.Blip2ForImageTextRetrieval(hf_itm).state_dict().items()}
        got = {k: tuple(v.shape) for k, v in Blip2ForImageTextRetrieval(itm).state_dict().items()}
    assert got == want
    assert got["embeddings.word_embeddings.weight"] == (30523, 768)
    assert got["vision_model.embeddings.position_embedding"] == (1, 257, 1408)
    assert lavis_config("itm", image_size=364).vision_config.num_patches == 26 * 26
    opt, t5 = lavis_config("opt"), lavis_config("t5")
    assert (opt.text_config.vocab_size, opt.text_config.hidden_size, opt.image_token_index) == (50272, 2560, None)
    assert (t5.text_config.dense_act_fn, t5.text_config.d_model, t5.text_config.bos_token_id) == ("gelu", 2048, 1)
