"""generate() with the arguments of transformers' generate that client code passes: GenerationConfig objects,
streamers, output_scores / return_dict_in_generate, logits processors, stopping criteria, n-gram and word
bans. Each against transformers' Blip2ForConditionalGeneration.generate on the same tiny checkpoint: equal
tokens, scores to float tolerance."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from transformers import GenerationConfig as HFGenerationConfig

from blip2 import Blip2ForConditionalGeneration
from blip2.generation import GenerateOutput, GenerationConfig, generate
from conftest import pixel_batch, prompts_with_images
from test_kernels import needs_kernel

transformers.logging.set_verbosity_error()

PROMPTS = [[2, 11, 12, 13, 14, 15], [2, 21], [2, 31, 32, 33]]


@pytest.fixture(scope="module")
def opt(hf_opt_dir):
    hf, d = hf_opt_dir
    return hf, Blip2ForConditionalGeneration.from_pretrained(d)


@pytest.fixture(scope="module")
def t5(hf_t5_dir):
    hf, d = hf_t5_dir
    return hf, Blip2ForConditionalGeneration.from_pretrained(d)


def both(pair, seed=None, prompts=PROMPTS, **kw):
    """(transformers' output, ours) for the same images, prompts and generate arguments."""
    hf, ours = pair
    pixels = pixel_batch(len(prompts), seed=7)
    ids, mask = prompts_with_images(prompts)
    inputs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        ref = hf.generate(**inputs, **kw)
        if seed is not None:
            torch.manual_seed(seed)
        out = ours.generate(**inputs, **kw)
    return ref, out


def assert_same_tokens(ref, out):
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nref  {ref.tolist()}"


# -- generation_config objects ------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    dict(max_new_tokens=7),  # every other field None: the model's then transformers' defaults
    dict(max_new_tokens=7, num_beams=3, num_return_sequences=2, length_penalty=0.5),
    dict(max_new_tokens=6, repetition_penalty=1.8, min_new_tokens=4),
])
def test_transformers_generation_config_object(opt, fields):
    ref, out = both(opt, generation_config=HFGenerationConfig(**fields))
    assert_same_tokens(ref, out)


def test_generation_config_unset_fields_keep_the_models(opt):
    """A config that sets only max_new_tokens keeps the model's eos: rows end and are padded as the reference's."""
    hf, ours = opt
    start = len(PROMPTS[0]) + 4
    plain, _ = both(opt, max_new_tokens=12)
    stop = int(plain[0, start + 2])  # make a token row 0 generates the eos
    eos = ours.generation_config.eos_token_id
    # transformers' Blip2 generate reads its language model's generation config; ours reads the model's
    hf.language_model.generation_config.eos_token_id = ours.generation_config.eos_token_id = stop
    try:
        ref, out = both(opt, generation_config=HFGenerationConfig(max_new_tokens=12))
        with torch.no_grad():  # ours: our own config class too
            mine = ours.generate(pixel_batch(3, seed=7), *prompts_with_images(PROMPTS),
                                 generation_config=GenerationConfig(max_new_tokens=12))
    finally:
        hf.language_model.generation_config.eos_token_id = ours.generation_config.eos_token_id = eos
    assert_same_tokens(ref, out)
    assert torch.equal(mine, out)
    assert out.shape[1] < plain.shape[1]  # it ended early
    for row in out[:, start:].tolist():  # each row ended on the new eos, then padding
        assert stop not in row or set(row[row.index(stop) + 1:]) <= {ours.generation_config.pad_token_id}


def test_the_reference_models_own_generation_config(opt):
    """transformers' GenerationConfig as a model carries it (use_cache, output_attentions=False, ...)."""
    hf, _ = opt
    ref, out = both(opt, generation_config=hf.language_model.generation_config, max_new_tokens=6)
    assert_same_tokens(ref, out)


def test_keyword_arguments_win_over_the_config(opt):
    ref, out = both(opt, generation_config=HFGenerationConfig(max_new_tokens=9, num_beams=2), num_beams=3)
    assert_same_tokens(ref, out)
    _, two = both(opt, generation_config=HFGenerationConfig(max_new_tokens=9, num_beams=2))
    assert not torch.equal(out, two)  # num_beams=3 won over the config's 2
    with torch.no_grad():  # ours also takes a dict
        as_dict = opt[1].generate(pixel_batch(3, seed=7), *prompts_with_images(PROMPTS),
                                  generation_config={"max_new_tokens": 9, "num_beams": 2}, num_beams=3)
    assert torch.equal(as_dict, out)


def test_settings_blip2_does_not_implement_are_refused(opt):
    _, ours = opt
    pixels = pixel_batch(1)
    with pytest.raises(ValueError, match=r"typical_p=0\.5 not supported"):
        ours.generate(pixels, generation_config=HFGenerationConfig(typical_p=0.5, do_sample=True))
    with pytest.raises(ValueError, match=r"num_beam_groups=2"):
        ours.generate(pixels, num_beams=4, num_beam_groups=2, diversity_penalty=1.0)
    ours.generation_config.extra["forced_eos_token_id"] = 5  # as a checkpoint's generation_config.json may have
    try:
        with pytest.raises(ValueError, match=r"forced_eos_token_id=5 not supported.*forced_eos_token_id=None"):
            ours.generate(pixels, max_new_tokens=3)
        dropped = ours.generate(pixels, max_new_tokens=3, forced_eos_token_id=None)
    finally:
        del ours.generation_config.extra["forced_eos_token_id"]
    assert torch.equal(dropped, ours.generate(pixels, max_new_tokens=3))
    with pytest.raises(TypeError, match=r"unknown options \['max_tokens'\]"):
        ours.generate(pixels, max_tokens=3)
    with pytest.raises(TypeError, match="assistant_model is not supported"):
        ours.generate(pixels, assistant_model=ours)
    with pytest.raises(TypeError, match="generation_config: expected"):
        ours.generate(pixels, generation_config=3)
    # settings that only tune transformers' own loop do not change tokens: accepted
    a = ours.generate(pixels, max_new_tokens=3, use_cache=True, cache_implementation="static")
    assert torch.equal(a, ours.generate(pixels, max_new_tokens=3))


# -- n-gram and word bans ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=3, num_beams=3),
])
def test_no_repeat_ngram_size(opt, kw):
    ref, out = both(opt, max_new_tokens=12, **kw)
    assert_same_tokens(ref, out)
    plain, _ = both(opt, max_new_tokens=12, num_beams=kw.get("num_beams", 1))
    assert not torch.equal(out, plain)  # the tiny model repeats itself: the ban changes the text


def test_bad_words_ids(opt):
    start = len(PROMPTS[0]) + 4
    plain, _ = both(opt, max_new_tokens=10)
    single, pair = int(plain[0, start]), [int(plain[1, start + 1]), int(plain[1, start + 2])]
    eos = opt[1].generation_config.eos_token_id  # a banned eos alone is dropped from the list, as transformers does
    kw = dict(max_new_tokens=10, bad_words_ids=[[single], pair, [eos]])
    for extra in (dict(), dict(num_beams=2)):
        ref, out = both(opt, **kw, **extra)
        assert_same_tokens(ref, out)
    new = both(opt, **kw)[1][:, start:].tolist()
    assert single not in sum(new, [])
    assert all(row[i:i + 2] != pair for row in new for i in range(len(row) - 1))
    with pytest.raises(ValueError, match="bad_words_ids"):
        opt[1].generate(pixel_batch(1), bad_words_ids=[5])
    with pytest.raises(ValueError, match=r"ids \[1000\] are outside the vocabulary of 100"):
        opt[1].generate(pixel_batch(1), bad_words_ids=[[1000]])


# -- logits processors and stopping criteria ------------------------------------------------------------


class Boost:
    """A client's processor: add ``value`` to token ``token``'s score (transformers' calling convention)."""

    def __init__(self, token, value):
        self.token, self.value, self.calls = token, value, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        scores = scores.clone()
        scores[:, self.token] += self.value * (input_ids.shape[1] % 2)  # depends on the history's length
        return scores


@pytest.mark.parametrize("extra", [dict(), dict(num_beams=2), dict(do_sample=True, top_k=5)])
def test_logits_processor_list(opt, extra):
    procs = transformers.LogitsProcessorList([Boost(17, 6.0), transformers.SuppressTokensLogitsProcessor([4, 5])])
    ref, out = both(opt, seed=3, max_new_tokens=8, logits_processor=procs, **extra)
    assert_same_tokens(ref, out)
    plain, _ = both(opt, seed=3, max_new_tokens=8, **extra)
    assert not torch.equal(out, plain)


def test_stopping_criteria(opt):
    class StopAfter(transformers.StoppingCriteria):
        """Ends a row once it has made ``n`` tokens holding an even id."""

        def __init__(self, start, n):
            self.start, self.n = start, n

        def __call__(self, input_ids, scores, **kwargs):
            return ((input_ids[:, self.start:] % 2 == 0).sum(1) >= self.n)

    start = len(PROMPTS[0]) + 4
    for extra in (dict(), dict(num_beams=2)):
        kw = dict(max_new_tokens=12, stopping_criteria=transformers.StoppingCriteriaList([StopAfter(start, 2)]))
        ref, out = both(opt, **kw, **extra)
        assert_same_tokens(ref, out)
        assert out.shape[1] < start + 12


# -- output_scores / return_dict_in_generate --------------------------------------------------------------


@pytest.mark.parametrize("extra", [dict(), dict(repetition_penalty=1.5, no_repeat_ngram_size=2),
                                   dict(num_beams=3, num_return_sequences=2)])
def test_scores_and_logits_match(opt, extra):
    kw = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True, **extra)
    ref, out = both(opt, **kw)
    assert isinstance(out, GenerateOutput)
    assert_same_tokens(ref.sequences, out.sequences)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores + out.logits, ref.scores + ref.logits):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        torch.testing.assert_close(a[finite], b[finite], atol=2e-4, rtol=0)
    if "num_beams" in extra:
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=2e-4, rtol=0)
        assert torch.equal(out.beam_indices, ref.beam_indices.long())
        assert out.keys() == ["sequences", "sequences_scores", "scores", "logits", "beam_indices"]
    else:
        assert out.keys() == ["sequences", "scores", "logits"]
    assert out["sequences"] is out.sequences is out[0] and out.to_tuple()[1] is out[1]


def test_dict_output_without_scores(opt):
    ref, out = both(opt, max_new_tokens=4, return_dict_in_generate=True)
    assert_same_tokens(ref.sequences, out.sequences)
    assert out.scores is None and ref.scores is None and out.keys() == ["sequences"]


def test_t5_scores_match(t5):
    kw = dict(max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    ref, out = both(t5, **kw)
    assert_same_tokens(ref.sequences, out.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


# -- sampling ------------------------------------------------------------------------------------------


def test_sampling_without_a_seed_follows_torch_manual_seed(opt):
    kw = dict(max_new_tokens=8, do_sample=True, top_k=0, temperature=1.5)
    ref, out = both(opt, seed=11, **kw)
    assert_same_tokens(ref, out)
    assert not torch.equal(out, both(opt, max_new_tokens=8)[1])  # it did sample
    assert not torch.equal(out, both(opt, seed=12, **kw)[1])  # and the seed decides what


# -- streamers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import tiny_tokenizer

    return tiny_tokenizer()


@pytest.mark.parametrize("which", ["opt", "t5"])
def test_text_iterator_streamer_in_a_thread(request, tokenizer, which):
    """The streaming chat demo: generate in a thread, read the text as it comes."""
    hf, ours = request.getfixturevalue(which)
    texts = []
    for model in (hf, ours):
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        pixels = pixel_batch(1, seed=4)
        ids, mask = prompts_with_images([[2, 11, 12]])
        kwargs = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8, streamer=streamer)
        thread = threading.Thread(target=model.generate, kwargs=kwargs)
        thread.start()
        texts.append([chunk for chunk in streamer])
        thread.join()
    assert texts[1] == texts[0] and "".join(texts[0]).strip()


def test_text_streamer_prints_what_transformers_prints(opt, tokenizer, capsys):
    hf, ours = opt
    printed = []
    for model in (hf, ours):
        streamer = transformers.TextStreamer(tokenizer, skip_special_tokens=True)
        ids, mask = prompts_with_images([[2, 11, 12]])
        model.generate(pixel_values=pixel_batch(1), input_ids=ids, attention_mask=mask, max_new_tokens=6,
                       streamer=streamer)
        printed.append(capsys.readouterr().out)
    assert printed[1] == printed[0] and "w11 w12" in printed[0]  # the prompt too: skip_prompt is False


# -- speed-ups take the plain path where they cannot honour an argument ----------------------------------


class Watched:
    """A decoder that counts how often generate asks it for greedy tokens instead of logits."""

    def __init__(self, decoder):
        self.decoder, self.greedy_calls = decoder, 0

    def prefill(self):
        return self.decoder.prefill()

    def step(self, tokens):
        return self.decoder.step(tokens)

    def reorder(self, index):
        self.decoder.reorder(index)

    def step_greedy(self, tokens, banned):
        self.greedy_calls += 1
        return self.decoder.step_greedy(tokens, banned)


class Plain(Watched):
    """The same decoder without a greedy step of its own."""

    step_greedy = None


@pytest.mark.parametrize("kw,fast", [
    (dict(), True),
    (dict(bad_words_ids=[[7], [20]]), True),  # fixed bans: the decoder's own greedy step can honour them
    (dict(bad_words_ids=[[7, 20]]), False),
    (dict(no_repeat_ngram_size=2), False),
    (dict(logits_processor=[Boost(17, 6.0)]), False),
    (dict(return_dict_in_generate=True, output_scores=True), False),
])
def test_greedy_speed_up_only_where_it_gives_the_same_tokens(opt, kw, fast):
    _, ours = opt
    lm = ours.language_model
    ids = torch.tensor([[2, 11, 12, 13]])
    embeds = lm.get_input_embeddings()(ids)
    watched = []

    def start(expand, n, watch):
        d = lm.start_decoding(embeds, torch.ones_like(ids), expand, n)
        d = Watched(d) if watch else Plain(d)
        watched.append(d)
        return d

    hooks = {k: kw.pop(k) for k in list(kw) if k == "logits_processor"}
    cfg = GenerationConfig(max_new_tokens=8, **kw)
    with torch.no_grad():
        got = generate(lambda e, n: start(e, n, True), ids, cfg, **hooks)
        plain = generate(lambda e, n: start(e, n, False), ids, cfg, **hooks)
    got, plain = (x.sequences if isinstance(x, GenerateOutput) else x for x in (got, plain))
    assert torch.equal(got, plain)
    assert (watched[0].greedy_calls > 0) == fast


# -- through the speed-ups -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["fuse", pytest.param("native", marks=needs_kernel)])
def test_speed_ups_honour_every_argument(hf_opt_dir, opt, mode):
    """A sped-up model gives the reference's tokens with every argument: where its own greedy step (the
    native step's screened head) cannot apply a processor, generate computes the whole logits instead."""
    from blip2 import fast

    _, d = hf_opt_dir
    model = fast.apply(Blip2ForConditionalGeneration.from_pretrained(d), mode)
    step = model.language_model.decode_step
    greedy_calls = []
    if hasattr(step, "greedy"):
        real = step.greedy
        step.greedy = lambda *args: greedy_calls.append(1) or real(*args)
    cases = [dict(logits_processor=[Boost(17, 6.0)]), dict(no_repeat_ngram_size=2),
             dict(bad_words_ids=[[40, 41], [7]]), dict(return_dict_in_generate=True, output_scores=True)]
    for kw in cases:
        ref, _ = both(opt, max_new_tokens=8, **kw)
        _, out = both((opt[0], model), max_new_tokens=8, **kw)
        if isinstance(out, GenerateOutput):
            ref, out = ref.sequences, out.sequences
        assert_same_tokens(ref, out)
    assert not greedy_calls  # none of these may take the decoder's own greedy step
    if hasattr(step, "greedy") and getattr(step, "screen", None) is not None:
        both((opt[0], model), max_new_tokens=4)
        assert greedy_calls  # ...which plain greedy decoding does take
