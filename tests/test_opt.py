"""OPT against transformers' OPTForCausalLM: same state dict, same logits, cached decoding = full recompute."""

from __future__ import annotations

import pytest
import torch
import transformers

from blip2.config import OPTConfig
from blip2.models.opt import OPTForCausalLM

VOCAB = 40
PAD = 1

VARIANTS = {
    "pre-norm": {},
    "post-norm": {"do_layer_norm_before": False},  # opt-350m
    "proj-dim": {"word_embed_proj_dim": 24},  # opt-350m: embeddings narrower than the model
    "no-final-norm": {"_remove_final_layer_norm": True},
    "untied-no-bias-gelu": {"tie_word_embeddings": False, "enable_bias": False, "activation_function": "gelu"},
    "no-affine": {"layer_norm_elementwise_affine": False},
}


def tiny_config(**overrides) -> dict:
    d = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
             max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, bos_token_id=2, eos_token_id=2,
             pad_token_id=PAD)
    d.update(overrides)
    return d


def make_pair(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """(transformers model, our model) with the same weights, re-randomised so that no layer is near
    identity or zero: weights N(0, 0.5), layer-norm gains N(1, 0.5), biases N(0, 0.2)."""
    d = tiny_config(**overrides)
    torch.manual_seed(seed)
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**d)).to(dtype).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.5)
    ours = OPTForCausalLM(OPTConfig.from_dict(d)).to(dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded: ids [B, T] (PAD on padding), mask [B, T]."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes_equal_reference(variant):
    d = tiny_config(**VARIANTS[variant])
    hf = transformers.OPTForCausalLM(transformers.OPTConfig(**d))
    ours = OPTForCausalLM(OPTConfig.from_dict(d))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    tied = ours.lm_head.weight is ours.get_input_embeddings().weight
    assert tied == d.get("tie_word_embeddings", True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_reference_with_left_padding(variant):
    hf, ours = make_pair(torch.float64, **VARIANTS[variant])
    ids, mask = left_padded([5, 2, 7])
    embeds = hf.get_input_embeddings()(ids).detach() + 0.3 * torch.randn(3, 7, 1, dtype=torch.float64)
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask).logits
        got = ours(embeds, mask)
    valid = mask.bool()
    assert got.shape == (3, 7, VOCAB)
    assert ref[valid].abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-10, rtol=0)
    assert torch.isfinite(got).all()  # padded rows too: no NaN from fully masked attention rows


def test_logits_match_reference_fp32():
    hf, ours = make_pair(torch.float32)
    ids, mask = left_padded([5, 2, 7])
    embeds = hf.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask).logits
        got = ours(embeds, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_a_prompt():
    _, ours = make_pair(torch.float64)
    ids, mask = left_padded([5, 2, 7])
    embeds = ours.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        batch = ours(embeds, mask)
        for i, n in enumerate([5, 2, 7]):
            alone = ours(embeds[i:i + 1, 7 - n:], mask[i:i + 1, 7 - n:])
            torch.testing.assert_close(batch[i, 7 - n:], alone[0], atol=1e-10, rtol=0)


def test_gradients_match_reference():
    hf, ours = make_pair(torch.float64, **VARIANTS["proj-dim"])
    _, mask = left_padded([5, 2, 7])
    embeds = torch.randn(3, 7, 24, dtype=torch.float64)
    e_hf, e_ours = embeds.clone().requires_grad_(), embeds.clone().requires_grad_()
    target = torch.randn(3, 7, VOCAB, dtype=torch.float64) * mask[..., None]
    (hf(inputs_embeds=e_hf, attention_mask=mask).logits * target).sum().backward()
    (ours(e_ours, mask) * target).sum().backward()
    torch.testing.assert_close(e_ours.grad, e_hf.grad, atol=1e-9, rtol=0)
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=1e-9, rtol=0, msg=name)


def _recompute(ours, embeds, mask, fed):
    # full forward over prompt + fed tokens; logits predicting the token after each fed one
    x = torch.cat([embeds, ours.get_input_embeddings()(fed)], 1)
    m = torch.cat([mask, torch.ones_like(fed)], 1)
    return ours(x, m)[:, embeds.shape[1] - 1:]


@pytest.mark.parametrize("variant", ["pre-norm", "post-norm", "proj-dim"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cached_decoding_matches_full_recompute(variant, dtype, atol):
    # fp32: the cached path attends over the whole preallocated cache and one token at a time, so sums
    # round differently; logits here reach ~25 and differ by up to ~3e-5 (about 1e-6 of the scale)
    _, ours = make_pair(dtype, **VARIANTS[variant])
    ids, mask = left_padded([5, 2, 7])
    embeds = ours.get_input_embeddings()(ids).detach()
    fed = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    dec = ours.start_decoding(embeds, mask, expand=1, max_new_tokens=5)
    steps = [dec.prefill()] + [dec.step(fed[:, i]) for i in range(4)]
    got = torch.stack(steps, 1)
    assert got.dtype == torch.float32
    with torch.no_grad():
        ref = _recompute(ours, embeds, mask, fed).float()
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    with pytest.raises(RuntimeError, match="cache full"):
        dec.step(fed[:, 0])


def test_expand_and_reorder_follow_rows():
    _, ours = make_pair(torch.float64)
    ids, mask = left_padded([5, 2, 7])
    embeds = ours.get_input_embeddings()(ids).detach()
    dec = ours.start_decoding(embeds, mask, expand=2, max_new_tokens=4)  # rows 0,0,1,1,2,2
    dec.prefill()
    first = torch.tensor([7, 8, 9, 10, 11, 12])
    dec.step(first)
    index = torch.tensor([5, 0, 0, 3, 2, 4])  # beam search keeps these rows
    dec.reorder(index)
    second = torch.tensor([13, 14, 15, 16, 17, 18])
    got = dec.step(second)
    source = index // 2  # the prompt each kept row came from
    fed = torch.stack([first[index], second], 1)
    with torch.no_grad():
        ref = _recompute(ours, embeds[source], mask[source], fed)[:, -1]
    torch.testing.assert_close(got, ref.float(), atol=1e-10, rtol=0)


def test_start_decoding_checks_the_position_table():
    # max_position_embeddings 64; the longest prompt has 7 real tokens, padding takes no position
    _, ours = make_pair(torch.float64)
    ids, mask = left_padded([5, 2, 7])
    embeds = ours.get_input_embeddings()(ids).detach()
    ours.start_decoding(embeds, mask, expand=1, max_new_tokens=58)  # positions 0..63
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.start_decoding(embeds, mask, expand=1, max_new_tokens=59)
