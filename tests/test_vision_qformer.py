"""Parity of blip2.models.vision / blip2.models.qformer with transformers' BLIP-2 on tiny random models.

transformers is the reference here (the package itself never imports it). Every weight of the
reference is re-randomised so nothing is left at its (often zero/one) initial value: a weight we
failed to load or used in the wrong place shows up as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.blip_2 import modeling_blip_2 as hf  # noqa: E402

from blip2.config import Blip2Config  # noqa: E402
from blip2.models.qformer import Blip2QFormerModel, Blip2QFormerTextEmbeddings  # noqa: E402
from blip2.models.vision import Blip2VisionModel  # noqa: E402

TOL = 1e-5
Q = 5  # queries
VOCAB = 50


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def rerandomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights of sane scale: LayerNorm weight ~ 1 +- 0.3, linear/conv ~ N(0, 1/fan_in), rest N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if "norm" in name.lower():
            p.copy_(1 + 0.3 * r if name.endswith("weight") else 0.3 * r)
        elif p.ndim >= 2 and ("embedding" not in name or "patch_embedding" in name) and name != "query_tokens":
            p.copy_(r / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.5 * r)


def hf_configs(cross_attention_frequency: int = 2, num_query_tokens: int = Q) -> transformers.Blip2Config:
    vision = transformers.Blip2VisionConfig(
        hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=7, layer_norm_eps=1e-3, hidden_act="gelu",  # eps far from any default
    )
    qformer = transformers.Blip2QFormerConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=16, cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=24, use_qformer_text_input=True, layer_norm_eps=3e-3,
    )
    return transformers.Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
    )


def ours_config(hf_config: transformers.Blip2Config) -> Blip2Config:
    """Our config read from the reference's dict (also exercises the config round trip)."""
    return Blip2Config.from_dict(hf_config.to_dict())


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def retrieval():
    """A re-randomised transformers Blip2ForImageTextRetrieval and our parts loaded from its state dict."""
    torch.manual_seed(0)
    cfg = hf_configs(cross_attention_frequency=2)
    ref = hf.Blip2ForImageTextRetrieval(cfg).eval()
    rerandomize(ref, seed=1)
    sd = ref.state_dict()
    ours_cfg = ours_config(cfg)
    vision = Blip2VisionModel(ours_cfg.vision_config).eval()
    vision.load_state_dict(sub_state_dict(sd, "vision_model."), strict=True)
    qformer = Blip2QFormerModel(ours_cfg.qformer_config).eval()
    qformer.load_state_dict(sub_state_dict(sd, "qformer."), strict=True)
    emb = Blip2QFormerTextEmbeddings(ours_cfg.qformer_config).eval()
    emb.load_state_dict(sub_state_dict(sd, "embeddings."), strict=True)
    return ref, vision, qformer, emb, sd


def text_batch(B: int = 3, T: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0  # right padding, as the BERT tokenizer does
    mask[2, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


# -- vision ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_pair():
    torch.manual_seed(0)
    cfg = hf_configs().vision_config
    ref = hf.Blip2VisionModel(cfg).eval()
    rerandomize(ref, seed=2)
    with torch.no_grad():  # a nonzero key bias (middle third), which EVA checkpoints never have
        for layer in ref.encoder.layers:
            D = cfg.hidden_size
            layer.self_attn.qkv.bias[D : 2 * D] = torch.randn(D)
    ours = Blip2VisionModel(ours_config(hf_configs()).vision_config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_vision_state_dict_keys_and_shapes(vision_pair):
    ref, ours = vision_pair
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert ours.post_layernorm.eps == 1e-3  # read from the config


def test_vision_qkv_bias_middle_third_is_kept_and_has_no_effect(vision_pair):
    ref, ours = vision_pair
    key = "encoder.layers.0.self_attn.qkv.bias"
    assert torch.equal(ours.state_dict()[key], ref.state_dict()[key])
    assert ours.state_dict()[key][24:48].abs().min() > 0
    # A key bias adds q.b_k to a whole row of logits; softmax ignores it. Zeroing it changes nothing.
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = ours(x).last_hidden_state
        saved = [layer.self_attn.qkv.bias.clone() for layer in ours.encoder.layers]
        for layer in ours.encoder.layers:
            layer.self_attn.qkv.bias[24:48] = 0
        after = ours(x).last_hidden_state
        for layer, b in zip(ours.encoder.layers, saved):
            layer.self_attn.qkv.bias.copy_(b)
    assert max_diff(before, after) < TOL


def test_vision_matches_reference(vision_pair):
    ref, ours = vision_pair
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        r = ref(pixel_values=x)
        o = ours(x)
    assert max_diff(o.last_hidden_state, r.last_hidden_state) < TOL
    assert max_diff(o.pooler_output, r.pooler_output) < TOL
    # the reference normalises the CLS token twice for the pooler; a single post_layernorm differs
    once = r.last_hidden_state[:, 0]
    assert max_diff(o.pooler_output, once) > 1e-2
    assert max_diff(o.pooler_output, ours.post_layernorm(once)) < TOL


def test_vision_inference_in_place_equals_the_autograd_path(vision_pair):
    """Without autograd the encoder layers add residuals and apply the activation in place: the same values,
    bit for bit, as the path autograd records, and the caller's tensors untouched."""
    _, ours = vision_pair
    x = torch.randn(2, 3, 28, 28)
    kept = x.clone()
    with torch.no_grad():
        fast = ours(x).last_hidden_state
    slow = ours(x).last_hidden_state.detach()
    assert torch.equal(fast, slow) and torch.equal(x, kept)
    layer = ours.encoder.layers[0]
    h = torch.randn(2, 5, ours.config.hidden_size)
    h_kept = h.clone()
    with torch.no_grad():
        out = layer(h)
    assert torch.equal(h, h_kept) and torch.equal(out, layer(h).detach())


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "silu",
                                  "swish", "tanh"])
def test_in_place_activations_equal_the_plain_ones(name):
    from blip2.models.layers import activation

    x = torch.randn(1000) * 4
    want = activation(name)(x)
    y = x.clone()
    got = activation(name, in_place=True)(y)
    assert torch.equal(got, want) and torch.equal(y, want)  # the input itself holds the result


@pytest.mark.parametrize("size", [(42, 42), (35, 49)])
def test_vision_interpolated_positions_match_reference(vision_pair, size):
    ref, ours = vision_pair
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        r = ref(pixel_values=x, interpolate_pos_encoding=True)
        o = ours(x, interpolate_pos_encoding=True)
    assert o.last_hidden_state.shape == (2, 1 + (size[0] // 7) * (size[1] // 7), 24)
    assert max_diff(o.last_hidden_state, r.last_hidden_state) < TOL
    assert max_diff(o.pooler_output, r.pooler_output) < TOL
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(x)


def test_vision_interpolation_at_native_size_is_identity(vision_pair):
    _, ours = vision_pair
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(ours(x, interpolate_pos_encoding=True).last_hidden_state, ours(x).last_hidden_state)


def test_vision_runs_in_parameter_dtype(vision_pair):
    _, ours = vision_pair
    x = torch.randn(2, 3, 28, 28)
    half = Blip2VisionModel(ours.config).eval().to(torch.bfloat16)
    half.load_state_dict(ours.state_dict())
    with torch.no_grad():
        out = half(x)  # fp32 pixels into a bf16 model
        ref = ours(x)
    assert out.last_hidden_state.dtype == torch.bfloat16 and out.pooler_output.dtype == torch.bfloat16
    assert 0 < max_diff(out.last_hidden_state, ref.last_hidden_state) < 0.25


def test_vision_gradient_checkpointing_same_gradients(vision_pair):
    _, ours = vision_pair
    x = torch.randn(2, 3, 28, 28)
    grads = []
    for flag in (False, True):
        m = Blip2VisionModel(ours.config).train()
        m.load_state_dict(ours.state_dict())
        m.gradient_checkpointing = flag
        m(x).last_hidden_state.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0
    assert max_diff(grads[0], grads[1]) < 1e-6


# -- Q-Former, queries only -----------------------------------------------------------------------


@pytest.mark.parametrize("frequency", [1, 2])
@pytest.mark.parametrize("text_input", [False, True])
def test_qformer_state_dict_keys_and_shapes(frequency, text_input):
    cfg = hf_configs(cross_attention_frequency=frequency).qformer_config
    cfg.use_qformer_text_input = text_input
    ref = hf.Blip2QFormerModel(cfg)
    ours = Blip2QFormerModel(ours_config(hf_configs(frequency)).qformer_config.replace(use_qformer_text_input=text_input))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    n_cross = sum(k.endswith("crossattention.attention.key.weight") for k in ref_shapes)
    assert n_cross == {1: 3, 2: 2}[frequency]
    assert ref_shapes["encoder.layer.0.crossattention.attention.key.weight"] == (32, 24)
    assert ("encoder.layer.0.intermediate.dense.weight" in ref_shapes) == text_input


def test_text_embeddings_state_dict_keys_and_shapes(retrieval):
    _, _, _, emb, sd = retrieval
    ref_shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("embeddings.")}
    # the retrieval checkpoints keep the text embeddings at top level, with no LayerNorm of their own
    assert set(ref_shapes) == {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}
    assert {f"embeddings.{k}": tuple(v.shape) for k, v in emb.state_dict().items()} == ref_shapes


@pytest.mark.parametrize("frequency", [1, 2])
@pytest.mark.parametrize("with_image_mask", [False, True])
def test_qformer_queries_match_reference(frequency, with_image_mask):
    torch.manual_seed(0)
    cfg = hf_configs(cross_attention_frequency=frequency).qformer_config
    ref = hf.Blip2QFormerModel(cfg).eval()
    rerandomize(ref, seed=3 + frequency)
    ours = Blip2QFormerModel(ours_config(hf_configs(frequency)).qformer_config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    queries, image = torch.randn(2, Q, 32), torch.randn(2, 17, 24)
    image_mask = None
    if with_image_mask:
        image_mask = torch.ones(2, 17, dtype=torch.long)
        image_mask[1, 10:] = 0
    with torch.no_grad():
        r = ref(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask)
        o = ours(queries, image, image_mask).last_hidden_state
    assert o.shape == (2, Q, 32)
    assert max_diff(o, r.last_hidden_state) < TOL
    if with_image_mask:  # the mask must matter, or this test proves nothing about it
        with torch.no_grad():
            assert max_diff(ours(queries, image).last_hidden_state[1], o[1]) > 1e-3


# -- Q-Former with text: the retrieval model's ITM and ITC paths -----------------------------------


@pytest.mark.parametrize("image_token_index", [None, VOCAB - 1])
def test_itm_logits_match_reference(retrieval, image_token_index):
    ref, vision, qformer, emb, sd = retrieval
    pixels = torch.randn(3, 3, 28, 28)
    ids, mask = text_batch()
    if image_token_index is None:
        ref_ids, ref_mask = ids, mask  # legacy: the model prepends ones for the queries
    else:  # the processor put Q image tokens in front; the model drops them from ids, keeps the mask
        ref_ids = torch.cat([torch.full((3, Q), image_token_index), ids], dim=1)
        ref_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    ref.config.image_token_index = image_token_index
    with torch.no_grad():
        r = ref(pixel_values=pixels, input_ids=ref_ids, attention_mask=ref_mask, use_image_text_matching_head=True)

        image = vision(pixels).last_hidden_state  # [B, N+1, Dv]
        queries = sd["query_tokens"].expand(3, -1, -1)
        joint = emb(ids, queries)  # [B, Q+T, D]
        full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
        h = qformer(joint, image, torch.ones(image.shape[:2]), query_length=Q, attention_mask=full_mask).last_hidden_state
        logits = torch.nn.functional.linear(h[:, :Q], sd["itm_head.weight"], sd["itm_head.bias"]).mean(1)
    assert h.shape == (3, Q + 7, 32)
    assert logits.abs().max() > 0.1
    assert max_diff(logits, r.logits_per_image) < TOL
    # padding is honoured: a padded text token's id does not matter
    ids2 = ids.clone()
    ids2[1, 5] = 7
    with torch.no_grad():
        h2 = qformer(emb(ids2, queries), image, query_length=Q, attention_mask=full_mask).last_hidden_state
    assert max_diff(h2[1, : Q + 4], h[1, : Q + 4]) < 1e-6


def test_itc_logits_match_reference(retrieval):
    ref, vision, qformer, emb, sd = retrieval
    ref.config.image_token_index = None
    pixels = torch.randn(2, 3, 28, 28)
    ids, mask = text_batch()
    with torch.no_grad():
        r = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        image = vision(pixels).last_hidden_state
        q = qformer(sd["query_tokens"].expand(2, -1, -1), image).last_hidden_state  # [2, Q, D]
        t = qformer(emb(ids), query_length=0, attention_mask=mask).last_hidden_state  # [3, T, D]
        img = torch.nn.functional.normalize(q @ sd["vision_projection.weight"].T + sd["vision_projection.bias"], dim=-1)
        txt = torch.nn.functional.normalize(t[:, 0] @ sd["text_projection.weight"].T + sd["text_projection.bias"], dim=-1)
        logits = (img @ txt.T).max(dim=1).values  # [2 images, 3 texts]: best query per pair
    assert max_diff(logits, r.logits_per_image) < TOL


def test_text_only_matches_text_model_with_projection(retrieval):
    ref_retrieval, _, qformer, emb, sd = retrieval
    ref = hf.Blip2TextModelWithProjection(ref_retrieval.config).eval()
    keep = ("query_tokens", "embeddings.", "qformer.", "text_projection.")
    ref.load_state_dict({k: v for k, v in sd.items() if k.startswith(keep)}, strict=True)
    ids, mask = text_batch()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask)
        o = qformer(emb(ids), query_length=0, attention_mask=mask).last_hidden_state
    assert o.shape == (3, 7, 32)
    assert max_diff(o, r.last_hidden_state) < TOL


# -- Q-Former: the stage-1 ITG (causal text) mask ---------------------------------------------------


def test_causal_text_mask(retrieval):
    _, vision, qformer, emb, sd = retrieval
    ids, mask = text_batch()
    queries = sd["query_tokens"].expand(3, -1, -1)
    image = torch.randn(3, 17, 24)
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    t = 2
    ids2 = ids.clone()
    ids2[:, t] = (ids[:, t] + 1) % VOCAB + 1

    def run(i, causal):
        with torch.no_grad():
            return qformer(emb(i, queries), image, query_length=Q, attention_mask=full_mask,
                           causal_text=causal).last_hidden_state

    a, b = run(ids, True), run(ids2, True)
    assert max_diff(a[:, : Q + t], b[:, : Q + t]) < 1e-6  # queries and earlier text do not see token t
    assert max_diff(a[:, Q + t], b[:, Q + t]) > 1e-2  # token t itself does
    assert max_diff(a[:, Q + t + 1 :], b[:, Q + t + 1 :]) > 1e-2  # and so does later text
    # queries under the ITG mask are exactly the queries-only forward (LAVIS reuses those states)
    with torch.no_grad():
        assert max_diff(a[:, :Q], qformer(queries, image).last_hidden_state) < TOL
    # control: with the bidirectional ITM mask, every position sees token t
    c, d = run(ids, False), run(ids2, False)
    assert max_diff(c[:, :Q], d[:, :Q]) > 1e-3
    assert max_diff(c[:, Q : Q + t], d[:, Q : Q + t]) > 1e-3


def test_causal_text_gradients_flow(retrieval):
    _, _, qformer_eval, emb_eval, sd = retrieval
    qformer = Blip2QFormerModel(qformer_eval.config).eval()
    qformer.load_state_dict(qformer_eval.state_dict())
    emb = Blip2QFormerTextEmbeddings(qformer_eval.config)
    emb.load_state_dict(emb_eval.state_dict())
    ids, mask = text_batch()
    queries = sd["query_tokens"].expand(3, -1, -1).clone().requires_grad_(True)
    image = torch.randn(3, 17, 24, requires_grad=True)
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    h = qformer(emb(ids, queries), image, query_length=Q, attention_mask=full_mask, causal_text=True).last_hidden_state
    w = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(0))
    (h @ w).sum().backward()
    assert queries.grad.abs().max() > 1e-3 and image.grad.abs().max() > 1e-3
    for name, p in list(qformer.named_parameters()) + list(emb.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith("key.bias"):
            # softmax ignores a per-row constant, so a key bias gets (numerically) no gradient
            assert p.grad.abs().max() < 1e-5, name
        else:
            assert p.grad.abs().max() > 1e-4, name
    # the padding row's embedding gets no gradient (padding_idx), as in the reference
    assert emb.word_embeddings.weight.grad[0].abs().max() == 0


def test_qformer_gradient_checkpointing_same_gradients(retrieval):
    _, _, qformer_eval, emb, sd = retrieval
    cfg = qformer_eval.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids, mask = text_batch()
    image = torch.randn(3, 17, 24)
    full_mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        x = emb(ids, sd["query_tokens"].expand(3, -1, -1))
    grads = []
    for flag in (False, True):
        m = Blip2QFormerModel(cfg).train()
        m.load_state_dict(qformer_eval.state_dict())
        m.gradient_checkpointing = flag
        m(x, image, query_length=Q, attention_mask=full_mask,
          causal_text=True).last_hidden_state.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert grads[0].abs().max() > 0
    assert max_diff(grads[0], grads[1]) < 1e-6


def test_qformer_input_errors(retrieval):
    _, _, qformer, emb, _ = retrieval
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        qformer(torch.randn(1, Q, 32))
    with pytest.raises(ValueError, match="attention_mask"):
        qformer(torch.randn(1, Q + 3, 32), torch.randn(1, 17, 24), query_length=Q, attention_mask=torch.ones(1, 3))
    no_text = Blip2QFormerModel(qformer.config.replace(use_qformer_text_input=False))
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        no_text(torch.randn(1, 4, 32), query_length=0)
