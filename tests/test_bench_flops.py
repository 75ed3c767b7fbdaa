"""``blip2.apps.bench.product_flops`` (the caption benchmark's compute floor) against torch's FLOP counter on
transformers' models run with eager attention: every product of a greedy generate counted the same, part by
part, for OPT and T5 (gated and not), and for a Q-Former with cross-attention in every layer; and the floor
that the benchmark builds from it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2 import Blip2Config
from blip2.apps.bench import floor_seconds, matmul_rate, product_flops, step_floor_seconds
from conftest import randomize_, tiny_hf_config

BATCH, NEW = 3, 5


def _hf(text: str, **kw):
    import transformers

    torch.manual_seed(0)
    config = tiny_hf_config(text, **kw)
    model = transformers.Blip2ForConditionalGeneration._from_config(config, attn_implementation="eager")
    return randomize_(model).eval().requires_grad_(False), config


def _count(fn) -> tuple[int, object]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        out = fn()
    return counter.get_total_flops(), out


def _measured(text: str, prompt_len: int, **kw) -> tuple[dict[str, int], Blip2Config]:
    """The FLOPs of each part of a greedy generate, counted by torch on transformers' modules."""
    hf, config = _hf(text, **kw)
    size = config.vision_config.image_size
    pixels = torch.randn(BATCH, 3, size, size)
    got = {}
    got["vision"], image = _count(lambda: hf.vision_model(pixel_values=pixels).last_hidden_state)
    query = hf.query_tokens.expand(BATCH, -1, -1)
    got["qformer"], lm_query = _count(
        lambda: hf.language_projection(hf.qformer(query_embeds=query, encoder_hidden_states=image).last_hidden_state))
    lm = hf.language_model
    prompt = torch.cat([lm_query, torch.randn(BATCH, prompt_len - lm_query.shape[1], lm_query.shape[2])], 1)
    head = lm.get_output_embeddings()
    head_flops = 2 * head.in_features * head.out_features * BATCH
    if text == "opt":
        n, out = _count(lambda: lm(inputs_embeds=prompt, use_cache=True, logits_to_keep=1))
        got["lm_prefill"] = n - head_flops
        kw_step = {}
    else:
        start = torch.zeros(BATCH, 1, dtype=torch.long)
        n, out = _count(lambda: lm(inputs_embeds=prompt, decoder_input_ids=start, use_cache=True))
        got["lm_prefill"] = n - head_flops
        kw_step = {"encoder_outputs": (out.encoder_last_hidden_state,)}
    got["lm_steps"], past = 0, out.past_key_values
    for _ in range(NEW - 1):
        token = out.logits[:, -1:].argmax(-1)
        key = "input_ids" if text == "opt" else "decoder_input_ids"
        n, out = _count(lambda: lm(**{key: token}, past_key_values=past, use_cache=True, **kw_step))
        got["lm_steps"] += n - head_flops
        past = out.past_key_values
    got["lm_head"] = NEW * head_flops
    return got, Blip2Config.from_dict(config.to_dict())


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("text,kw", [
    ("opt", {}),
    ("opt", {"cross_attention_frequency": 1}),
    ("t5", {}),
    ("t5", {"feed_forward_proj": "relu", "num_decoder_layers": 3}),
])
def test_product_flops_match_torch_flop_counter(text, kw):
    prompt_len = 7  # 4 query tokens and 3 of text
    got, config = _measured(text, prompt_len, **kw)
    want = product_flops(config, prompt_len, NEW, BATCH)
    assert want == got, (want, got)


def test_product_flops_scale_and_errors():
    config = Blip2Config.from_dict(tiny_hf_config("opt").to_dict())
    one = product_flops(config, 6, 4)
    assert product_flops(config, 6, 4, batch=5) == {k: 5 * v for k, v in one.items()}
    more = product_flops(config, 6, 9)
    assert more["vision"] == one["vision"] and more["lm_prefill"] == one["lm_prefill"]
    assert more["lm_steps"] > one["lm_steps"] and more["lm_head"] == 9 / 4 * one["lm_head"]
    assert product_flops(config, 6, 1)["lm_steps"] == 0
    with pytest.raises(ValueError, match="new_tokens"):
        product_flops(config, 6, 0)


def test_matmul_rate_is_a_rate():
    rate = matmul_rate(n=64, tries=2)
    first = rate()
    assert 1e6 < first < 1e15 and rate() > 0


def test_floor_seconds_takes_the_slower_of_arithmetic_and_memory_per_step():
    flops = dict(vision=600, qformer=100, lm_prefill=200, lm_steps=90, lm_head=40)  # 4 new tokens, 3 steps
    # prefill + first head: 910 FLOP at 10 FLOP/s = 91 s; a step 30 + 10 FLOP = 4 s against 50 B at 25 B/s = 2 s
    assert floor_seconds(flops, 4, 50, 10.0, 25.0) == pytest.approx(91 + 3 * 4)
    assert floor_seconds(flops, 4, 500, 10.0, 25.0) == pytest.approx(91 + 3 * 20)  # now memory: 20 s a step
    one = dict(flops, lm_steps=0, lm_head=10)
    assert floor_seconds(one, 1, 500, 10.0, 25.0) == pytest.approx(91)  # no step after the prefill
    # the per-step term alone: arithmetic-bound, then memory-bound, then no step at all
    assert step_floor_seconds(flops, 4, 50, 10.0, 25.0) == pytest.approx(4)
    assert step_floor_seconds(flops, 4, 500, 10.0, 25.0) == pytest.approx(20)
    assert step_floor_seconds(one, 1, 500, 10.0, 25.0) == 0.0
