"""generate() against transformers' OPTForCausalLM.generate on a tiny random OPT (float64, so both sides see
the same float32 scores and every tie is broken the same way)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from test_opt import PAD, left_padded, make_pair

from blip2.generation import GenerationConfig, generate, resolve

transformers.logging.set_verbosity_error()

LENGTHS = [5, 3, 7]
T = max(LENGTHS)
# Greedy continuations of the three prompts (no eos), for orientation:
#   [ 6,  6,  6,  6,  6,  0, 18,  6, 38, 38]
#   [38,  0,  6,  6,  6, 24,  6, 13,  6, 13]
#   [35, 30, 36,  0, 35, 19, 19, 18, 18, 24]


@pytest.fixture(scope="module")
def lm():
    hf, ours = make_pair(torch.float64)
    ids, mask = left_padded(LENGTHS)
    embeds = hf.get_input_embeddings()(ids).detach()
    return hf, ours, ids, mask, embeds


def ours_generate(lm, ids=None, mask=None, streamer=None, **kw):
    _, ours, ids0, mask0, embeds = lm
    if ids is None:
        ids, mask = ids0, mask0
    embeds = ours.get_input_embeddings()(ids).detach()
    cfg = GenerationConfig(pad_token_id=PAD, **kw)
    return generate(lambda expand, n: ours.start_decoding(embeds, mask, expand, n), ids, cfg,
                    prefix_mask=mask, streamer=streamer)


def hf_generate(lm, ids=None, mask=None, **kw):
    hf, _, ids0, mask0, _ = lm
    if ids is None:
        ids, mask = ids0, mask0
    embeds = hf.get_input_embeddings()(ids).detach()
    kw.setdefault("do_sample", False)
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        return hf.generate(inputs_embeds=embeds, input_ids=ids, attention_mask=mask, pad_token_id=PAD, **kw)


def test_greedy_matches_reference(lm):
    got = ours_generate(lm, max_new_tokens=10)
    assert torch.equal(got, hf_generate(lm, max_new_tokens=10))
    assert got.shape == (3, T + 10)
    assert torch.equal(got[:, :T], lm[2])  # the prefix comes back in front


def test_greedy_eos_pads_finished_rows_and_stops_early(lm):
    # eos 0 or 38: row 1 ends at its first token, row 2 at its 4th, row 0 at its 6th -> 6 new tokens, not 10
    got = ours_generate(lm, max_new_tokens=10, eos_token_id=[0, 38])
    assert torch.equal(got, hf_generate(lm, max_new_tokens=10, eos_token_id=[0, 38]))
    new = got[:, T:]
    assert new.shape[1] == 6
    assert new[1].tolist() == [38] + [PAD] * 5
    assert new[2].tolist() == [35, 30, 36, 0] + [PAD] * 2
    assert new[0, -1] == 0 and (new[0, :-1] != 0).all()


def test_greedy_single_eos_int(lm):
    got = ours_generate(lm, max_new_tokens=10, eos_token_id=18)
    assert torch.equal(got, hf_generate(lm, max_new_tokens=10, eos_token_id=18))
    assert (got[1, T:] != PAD).all() and got[0, -1] == PAD  # row 0 ended at 18, row 1 never did


def test_min_new_tokens_masks_eos(lm):
    kw = dict(max_new_tokens=8, eos_token_id=[0, 38], min_new_tokens=3)
    got = ours_generate(lm, **kw)
    assert torch.equal(got, hf_generate(lm, **kw))
    new = got[:, T:]
    assert not torch.isin(new[:, :3], torch.tensor([0, 38])).any()
    assert new[1, 0] != 38  # without the minimum row 1 would end at once


@pytest.mark.parametrize("penalty", [0.6, 1.5, 3.0])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty_matches_reference(lm, penalty, num_beams):
    # prompt padding holds id 6, a token the model likes: the reference leaves left padding out of the
    # penalty (prompt_ignore_length from the attention mask), and so must we
    _, _, ids, mask, _ = lm
    ids = ids.masked_fill(mask == 0, 6)
    kw = dict(max_new_tokens=10, repetition_penalty=penalty, num_beams=num_beams)
    got = ours_generate(lm, ids, mask, **kw)
    assert torch.equal(got, hf_generate(lm, ids, mask, **kw))
    assert not torch.equal(got, ours_generate(lm, ids, mask, max_new_tokens=10, num_beams=num_beams))


def test_repetition_penalty_ignores_left_padding(lm):
    _, ours, ids, mask, _ = lm
    ids = ids.masked_fill(mask == 0, 6)
    embeds = ours.get_input_embeddings()(ids).detach()
    cfg = GenerationConfig(pad_token_id=PAD, max_new_tokens=10, repetition_penalty=3.0)

    def start(expand, n):
        return ours.start_decoding(embeds, mask, expand, n)

    with_mask = generate(start, ids, cfg, prefix_mask=mask)
    without = generate(start, ids, cfg)
    assert not torch.equal(with_mask, without)
    assert torch.equal(with_mask, hf_generate(lm, ids, mask, max_new_tokens=10, repetition_penalty=3.0))


BEAM_CASES = [
    # num_beams, num_return_sequences, length_penalty, early_stopping, eos
    (3, 1, 1.0, False, 18),
    (3, 2, 1.0, False, 6),
    (3, 3, 1.0, True, 24),
    (3, 3, 0.5, True, 18),
    (3, 2, 2.0, "never", 6),
    (3, 3, -1.0, False, [18, 24]),
    (2, 2, 1.5, "never", [6, 13]),
    (4, 4, 0.0, False, 35),
]


@pytest.mark.parametrize("nb,nrs,lp,es,eos", BEAM_CASES)
def test_beam_search_matches_reference(lm, nb, nrs, lp, es, eos):
    kw = dict(max_new_tokens=8, num_beams=nb, num_return_sequences=nrs, length_penalty=lp, early_stopping=es,
              eos_token_id=eos)
    got = ours_generate(lm, **kw)
    ref = hf_generate(lm, **kw)
    assert got.shape == ref.shape and got.shape[0] == 3 * nrs
    assert torch.equal(got, ref)
    assert torch.isin(got[:, T:], torch.tensor(eos)).any()  # some hypotheses did end on eos


def test_beam_search_fill_after_eos_is_pad_or_eos(lm):
    # beam hypotheses that end early are filled with `pad or eos[0]`: a pad id of 0 (T5's) gives eos
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, eos_token_id=[18, 24])
    got = ours_generate(lm, **kw)
    ended_early = (got[:, T:-1] == 18) | (got[:, T:-1] == 24)
    assert ended_early.any()
    row = int(ended_early.any(1).nonzero()[0])
    end = T + int(ended_early[row].nonzero()[0])
    assert (got[row, end + 1:] == PAD).all()
    hf, ours, ids, mask, embeds = lm
    cfg = GenerationConfig(pad_token_id=0, **kw)
    zero_pad = generate(lambda e, n: ours.start_decoding(embeds, mask, e, n), ids, cfg, prefix_mask=mask)
    with torch.no_grad():
        ref = hf.generate(inputs_embeds=embeds, input_ids=ids, attention_mask=mask, pad_token_id=0, **kw)
    assert torch.equal(zero_pad, ref)
    assert (zero_pad[row, end + 1:] == 18).all()


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=10, eos_token_id=[0, 38]),
    dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, eos_token_id=18, length_penalty=0.7),
])
def test_batch_equals_each_prompt_alone(lm, kw):
    batch = ours_generate(lm, **kw)
    nrs = kw.get("num_return_sequences", 1)
    _, _, ids, mask, _ = lm
    for i, n in enumerate(LENGTHS):
        alone = ours_generate(lm, ids[i:i + 1, T - n:], mask[i:i + 1, T - n:], **kw)  # no padding at all
        rows = batch[i * nrs:(i + 1) * nrs, T:]
        k = alone.shape[1] - n
        assert torch.equal(rows[:, :k], alone[:, n:])
        assert (rows[:, k:] == PAD).all()  # the batch ran longer for another prompt


def test_sampling_is_reproducible_with_a_seed(lm):
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0)
    a = ours_generate(lm, seed=3, **kw)
    assert torch.equal(a, ours_generate(lm, seed=3, **kw))
    assert not torch.equal(a, ours_generate(lm, seed=4, **kw))
    assert not torch.equal(a, ours_generate(lm, max_new_tokens=8))  # it does sample


def test_sampling_top_k_1_is_greedy(lm):
    got = ours_generate(lm, max_new_tokens=10, do_sample=True, top_k=1, seed=0, eos_token_id=[0, 38])
    assert torch.equal(got, ours_generate(lm, max_new_tokens=10, eos_token_id=[0, 38]))


@pytest.mark.parametrize("kw", [
    dict(temperature=1.3),
    dict(top_k=5, temperature=0.7),
    dict(top_p=0.8),
    dict(top_k=0, top_p=0.5, temperature=2.0, repetition_penalty=1.3),
    dict(num_return_sequences=2, top_k=10),
    dict(num_beams=3, num_return_sequences=2, top_k=10),
    dict(num_beams=3, num_return_sequences=2, top_p=0.1),  # min_tokens_to_keep = 1 + n_eos matters
])
def test_sampling_matches_reference_draws(lm, kw):
    # Not a promise of the API (our sampler has its own generator), but on CPU a generator seeded with s
    # draws what the global one does after torch.manual_seed(s): equal tokens mean the warped distributions
    # (temperature, top-k, top-p, min_tokens_to_keep with beams) are the reference's.
    kw = dict(max_new_tokens=8, eos_token_id=[0, 38], do_sample=True, **kw)
    got = ours_generate(lm, seed=7, **kw)
    torch.manual_seed(7)
    assert torch.equal(got, hf_generate(lm, **kw))


class Recorder:
    """A streamer: what put() got, and whether end() came."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, ids):
        assert not self.ended
        self.puts.append(ids)

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_each_step(lm):
    steps = Recorder()
    got = ours_generate(lm, max_new_tokens=10, eos_token_id=[0, 38], streamer=steps)
    assert steps.ended and torch.equal(steps.puts[0], lm[2])  # the prompt first, as transformers does
    assert torch.equal(torch.stack(steps.puts[1:], 1), got[:, T:])
    with pytest.raises(ValueError, match="beam"):
        ours_generate(lm, max_new_tokens=4, num_beams=2, streamer=Recorder())
    with pytest.raises(TypeError, match=r"put\(token_ids\) and end\(\)"):
        ours_generate(lm, max_new_tokens=4, streamer=[].append)


def test_streamer_ends_when_generation_fails(lm):
    """A reader in another thread (TextIteratorStreamer) must not wait for ever on a failed generate."""
    _, ours, ids, mask, embeds = lm
    steps = Recorder()

    def failing(*args):
        raise RuntimeError("out of memory")

    def start(expand, n):
        decoder = ours.start_decoding(embeds, mask, expand, n)
        decoder.step = decoder.step_greedy = failing
        return decoder

    with pytest.raises(RuntimeError, match="out of memory"):
        generate(start, ids, GenerationConfig(max_new_tokens=5, pad_token_id=PAD), streamer=steps)
    assert steps.ended and len(steps.puts) == 2  # the prompt and the first token, then the end


def test_length_defaults_and_validation(lm):
    assert ours_generate(lm).shape == (3, T + 20)  # neither max_new_tokens nor max_length: 20 new tokens
    assert ours_generate(lm, max_length=T + 4).shape == (3, T + 4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours_generate(lm, max_new_tokens=4, num_return_sequences=2)
    with pytest.raises(ValueError, match="early_stopping"):
        GenerationConfig(early_stopping="sometimes")


# -- generation_config.json -----------------------------------------------------------------------------


def test_generation_config_reads_reference_file(tmp_path):
    ref = transformers.GenerationConfig(max_new_tokens=30, num_beams=5, length_penalty=-1.0, early_stopping="never",
                                        eos_token_id=[50118, 2], pad_token_id=1, bos_token_id=2, do_sample=False,
                                        no_repeat_ngram_size=3)
    ref.save_pretrained(tmp_path)
    cfg = GenerationConfig.from_pretrained(tmp_path)
    assert (cfg.max_new_tokens, cfg.num_beams, cfg.length_penalty, cfg.early_stopping) == (30, 5, -1.0, "never")
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id, cfg.do_sample) == ([50118, 2], 1, 2, False)
    assert cfg.no_repeat_ngram_size == 3 and cfg.extra == {}
    assert cfg.top_k is None and cfg.temperature is None  # unset, as in transformers 5
    full = resolve(cfg)
    assert full.top_k == 50 and full.temperature == 1.0  # the reference's defaults fill them


def test_generation_config_writes_reference_format(tmp_path):
    legacy = {"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1,
              "do_sample": False, "transformers_version": "4.27.0.dev0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(legacy))
    cfg = GenerationConfig.from_pretrained(tmp_path).replace(num_beams=4, max_new_tokens=12)
    out = tmp_path / "out"
    cfg.save_pretrained(out)
    written = json.loads((out / "generation_config.json").read_text())
    assert written == {"_from_model_config": True, "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1,
                       "do_sample": False, "num_beams": 4, "max_new_tokens": 12}
    ref = transformers.GenerationConfig.from_pretrained(out)
    assert (ref.num_beams, ref.max_new_tokens, ref.eos_token_id, ref.pad_token_id) == (4, 12, 50118, 1)
    assert GenerationConfig.from_dict(cfg.to_dict()) == cfg
