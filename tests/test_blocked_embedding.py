"""A laid-out OPT whose head is tied to its embeddings holds the table once (blip2.fast.decoding.BlockedEmbedding):
the head's blocked copy answers the lookups, the plain matrix is freed, and everything that reads the table (the
state dict, ``weight``, undoing the layout, resizing the vocabulary) gets the plain values back bit for bit."""

from __future__ import annotations

import pytest
import torch

import blip2.fast.lazy as lazy
from blip2 import Blip2ForConditionalGeneration, fast
from blip2.config import OPTConfig, T5Config
from blip2.fast import decoding, kernels
from blip2.fast.decoding import BlockedEmbedding, table
from blip2.fast.linear import FusedLinear
from blip2.models.layers import Embedding
from blip2.models.opt import OPTForCausalLM
from blip2.models.t5 import T5ForConditionalGeneration
from conftest import pixel_batch, prompts_with_images, randomize_

pytestmark = pytest.mark.skipif(not kernels.load(), reason=f"needs the native kernels: {kernels.status()}")

DTYPES = [d for d in (torch.float32, torch.bfloat16) if kernels.load() and kernels.blocked_supports(d)]


def opt(dtype: torch.dtype, vocab: int = 96, hidden: int = 32, heads: int = 4, tied: bool = True) -> OPTForCausalLM:
    cfg = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, ffn_dim=40, num_attention_heads=heads,
                    max_position_embeddings=64, dropout=0.0, tie_word_embeddings=tied)
    return randomize_(OPTForCausalLM(cfg), 0, std=0.4).eval().to(dtype)


# a vocabulary of whole blocks of 16 rows, one whose last block is padded, and (bf16) an odd width: the blocked
# bf16 layout pads K to pairs
SHAPES = [(96, 32, 4), (101, 32, 4), (101, 33, 3)]


@pytest.fixture(params=[(d, s) for d in DTYPES for s in SHAPES], ids=lambda p: f"{str(p[0])[6:]}-{p[1][0]}x{p[1][1]}")
def laid_out(request, monkeypatch):
    """(the laid-out OPT, its plain table before) with the table unblocked a block at a time (several pieces, the
    padded last one among them)."""
    dtype, (vocab, hidden, heads) = request.param
    monkeypatch.setattr(decoding, "_PIECE_BYTES", 1)
    lm = opt(dtype, vocab, hidden, heads)
    plain = lm.get_input_embeddings().weight.detach().clone()
    fast.fuse(lm, "blocked")
    return lm, plain


def test_lookups_read_the_heads_copy(laid_out):
    lm, plain = laid_out
    embedding = lm.get_input_embeddings()
    assert type(embedding) is BlockedEmbedding and isinstance(lm.lm_head, FusedLinear) and lm.lm_head.tied
    assert table(lm).numel() == 0 and table(lm).dtype == plain.dtype  # the plain matrix freed
    n = plain.shape[0]
    ids = torch.tensor([[0, 15, 16], [n - 1, 7, 31]])
    assert torch.equal(embedding(ids), plain[ids])
    assert torch.equal(embedding(torch.arange(n)), plain)
    for bad in (n, -1):  # (n: a padding row of the last block would read zeros; -1 a row from the end)
        with pytest.raises(IndexError, match=rf"\[0, {n}\)"):
            embedding(torch.tensor([3, bad]))


def test_the_state_dict_holds_the_plain_table(laid_out):
    lm, plain = laid_out
    state = lm.state_dict()
    assert torch.equal(state["model.decoder.embed_tokens.weight"], plain)
    assert torch.equal(state["lm_head.weight"], plain)


def test_reading_weight_brings_the_plain_matrix_back(laid_out):
    lm, plain = laid_out
    embedding = lm.get_input_embeddings()
    param = embedding._parameters["weight"]
    assert embedding.weight is param and torch.equal(param, plain)  # the same parameter, its values again
    assert type(embedding) is Embedding and "head" not in embedding.__dict__
    assert torch.equal(lm.lm_head.dense_weight(), plain)  # the head keeps its copy
    assert torch.equal(embedding(torch.tensor([1, 2])), plain[[1, 2]])


def test_undoing_the_layout_ties_the_head_to_the_table_again(laid_out):
    lm, plain = laid_out
    param = lm.get_input_embeddings()._parameters["weight"]
    fast.unfuse(lm)
    embedding = lm.get_input_embeddings()
    assert type(embedding) is Embedding and embedding.weight is param and torch.equal(param, plain)
    assert isinstance(lm.lm_head, torch.nn.Linear) and lm.lm_head.weight is param


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_generate_gives_the_tokens_and_scores_of_the_plain_table(tiny_model_dir, dtype):
    """The native step with the lookups from the head's copy against the same layout with the plain table back."""
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=dtype, fast="native")
    assert type(model.language_model.get_input_embeddings()) is BlockedEmbedding
    ids, mask = prompts_with_images([[2, 10, 11], [2, 20, 21]])
    kw = dict(pixel_values=pixel_batch(2, seed=4).to(dtype), input_ids=ids, attention_mask=mask, max_new_tokens=6,
              output_scores=True, return_dict_in_generate=True)
    held = model.generate(**kw)
    model.language_model.get_input_embeddings().weight  # noqa: B018 (the plain matrix back)
    assert type(model.language_model.get_input_embeddings()) is Embedding
    plain = model.generate(**kw)
    assert torch.equal(held.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(held.scores, plain.scores, strict=True))


def test_a_laid_out_model_weighs_its_plain_weights(tiny_model_dir):
    plain = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, fast="none")
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir, fast="native")
    assert type(model.language_model.get_input_embeddings()) is BlockedEmbedding
    assert fast.held_bytes(model) == fast.held_bytes(plain) == sum(
        p.numel() * p.element_size() for p in (*plain.parameters(), *plain.buffers()))


def test_resizing_the_vocabulary_of_a_model_laid_out_by_generate(tiny_model_dir, monkeypatch):
    """``fast="auto"`` laid out at the first generate; resizing reads the table's values, then undoes the layout."""
    monkeypatch.setattr(lazy, "LATER_BYTES", 1 << 40)  # small: laid out at the first generate
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_model_dir)
    plain = model.language_model.model.decoder.embed_tokens._parameters["weight"].detach().clone()
    ids, mask = prompts_with_images([[2, 10, 11]])
    model.generate(pixel_values=pixel_batch(1, seed=4), input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert lazy.laid_out(model) and type(model.language_model.get_input_embeddings()) is BlockedEmbedding
    n = plain.shape[0]
    model.resize_token_embeddings(n + 8)
    embedding = model.get_input_embeddings()
    assert not lazy.laid_out(model) and embedding.weight.shape[0] == n + 8
    assert torch.equal(embedding.weight[:n], plain) and model.language_model.lm_head.weight is embedding.weight
    resized = embedding.weight.detach().clone()
    # the resized table (an nn.Embedding) is held by the head's copy at the next layout, and given back as it was
    model.generate(pixel_values=pixel_batch(1, seed=4), input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert lazy.laid_out(model) and type(model.language_model.get_input_embeddings()) is BlockedEmbedding
    assert type(embedding) is BlockedEmbedding and torch.equal(embedding(torch.arange(n + 8)), resized)
    assert torch.equal(embedding.weight, resized) and type(embedding) is torch.nn.Embedding


def test_t5_and_untied_heads_keep_the_plain_table():
    """T5's native step reads ``shared`` as a plain table; an untied OPT head has a matrix of its own."""
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                             num_decoder_layers=1, num_heads=4, tie_word_embeddings=True)).eval()
    untied = opt(torch.float32, tied=False)
    for lm in (t5, untied):
        before = lm.get_input_embeddings().weight.detach().clone()
        fast.native(lm)
        assert type(lm.get_input_embeddings()) is Embedding and torch.equal(table(lm), before)
