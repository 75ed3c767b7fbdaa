"""Continuous batching of Flan-T5 checkpoints, and of checkpoints whose generation config processes the scores
(repetition penalty, n-gram ban, banned words, minimum length): under concurrent load, with prompts of mixed
lengths, every request's greedy text equals ``Pipeline.generate``'s for it alone, OPT and T5. What the engine
still does not run (beam search) falls back to micro-batching with a warning that names it."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from blip2.apps.pipeline import Pipeline, chat_prompt, question_prompt
from blip2.apps.server import ServerSettings
from blip2.apps.server.engine import ContinuousBatcher, unsupported
from blip2.apps.server.imagecache import ImageCache
from blip2.apps.server.requests import Sampling
from blip2.apps.server.service import Service
from test_server_engine import alone, pixels, request

PROMPTS = ["", question_prompt("what is it?"), chat_prompt([("what is it?", "w5 w6")], "where is it?"), "w9",
           "a photo of w40 w41 w42 w43 w44 w45"]
SCORING = dict(repetition_penalty=1.8, no_repeat_ngram_size=2, min_new_tokens=4, bad_words_ids=[[7], [22, 23]])


def load(directory: str, **generation: object) -> Pipeline:
    pipe = Pipeline.load(directory, device="cpu", fast="none")
    for name, value in generation.items():
        setattr(pipe.model.generation_config, name, value)
    return pipe


def under_load(pipe: Pipeline, requests: int = 14, reference: Pipeline | None = None
               ) -> tuple[list[tuple[str, str]], ContinuousBatcher]:
    """``requests`` greedy requests (more than the engine's 4 rows, mixed prompts, images and lengths) arriving
    while others run: each one's (engine text, text alone, from ``reference`` if given)."""
    engine = ContinuousBatcher(pipe, max_rows=4, max_queue=64, max_prefill=2, image_cache=ImageCache(8))
    engine.start()
    try:
        jobs = []
        for k in range(requests):
            px, prompt, max_new = pixels(k % 4), PROMPTS[(k * 3) % len(PROMPTS)], 2 + (k * 5) % 11
            jobs.append((px, prompt, max_new, *request(px, prompt, Sampling(max_new_tokens=max_new))))
            engine.submit(jobs[-1][3])
            time.sleep(0.002 * (k % 3))
        out = []
        for px, prompt, max_new, _, got in jobs:
            assert got.done.wait(60), "a request did not finish"
            out.append((got.texts()[0], alone(reference or pipe, px, prompt, max_new)))
        assert engine.rows == [] and engine.stats()["running_rows"] == 0
    finally:
        engine.stop()
    return out, engine


def shared_steps(engine: ContinuousBatcher) -> int:
    """Steps that ran more than one row."""
    return sum(engine.occupancy.counts) - engine.occupancy.counts[0]


def test_t5_greedy_texts_under_load_equal_each_request_alone(tiny_t5_dir):
    pipe = load(tiny_t5_dir)
    assert unsupported(pipe.model) is None
    pairs, engine = under_load(pipe)
    assert [got for got, _ in pairs] == [expected for _, expected in pairs]
    assert len({expected for _, expected in pairs}) >= 5, "the answers should differ between requests"
    assert shared_steps(engine) > 0 and engine.occupancy.counts[2] > 0, "no step ran 3 or 4 rows together"
    assert engine.images.misses == 4 and engine.images.hits == 10


def test_t5_rows_take_the_native_step_and_give_the_plain_texts(tiny_t5_dir, monkeypatch):
    """Where the kernels build, T5 rows decode through the native step (one call for every row, each at its own
    slot, with its own mask row and encoder length) and each request gets the plain model's text alone."""
    from blip2.fast import kernels
    from blip2.fast.native import NativeT5Step

    if not kernels.load():
        pytest.skip("the native kernels do not build on this CPU")
    pipe = Pipeline.load(tiny_t5_dir, device="cpu", fast="native")
    step = pipe.model.language_model.decode_step
    assert isinstance(step, NativeT5Step) and step.batched
    rows, original = [], step._run
    monkeypatch.setattr(step, "_run", lambda args, values: (rows.append(args[0].shape[0]), original(args, values))[1])
    pairs, engine = under_load(pipe, reference=load(tiny_t5_dir))
    assert [got for got, _ in pairs] == [expected for _, expected in pairs]
    assert len({expected for _, expected in pairs}) >= 5, "the answers should differ between requests"
    assert max(rows) > 1 and len(rows) == engine.steps, "the engine's steps did not run natively with several rows"


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_score_processing_under_load_equals_generate_alone(kind, tiny_model_dir, tiny_t5_dir):
    directory = tiny_model_dir if kind == "opt" else tiny_t5_dir
    plain, pipe = load(directory), load(directory, **SCORING)
    assert unsupported(pipe.model) is None
    pairs, engine = under_load(pipe)
    assert [got for got, _ in pairs] == [expected for _, expected in pairs]
    assert shared_steps(engine) > 0
    # the settings changed the answers, so the equality above tested them
    changed = [alone(plain, pixels(k), p, 12) != alone(pipe, pixels(k), p, 12) for k in range(4) for p in PROMPTS]
    assert sum(changed) >= 10
    for text, _ in pairs:  # at least min_new_tokens words, no banned word, no word pair twice
        words = text.split()
        assert len(words) >= 2 and "w7" not in words
        pairs_seen = list(zip(words, words[1:]))
        assert len(pairs_seen) == len(set(pairs_seen)), text


def common_early_token(pipe: Pipeline) -> int:
    """The token the model most often picks among its first three: as the end token, answers end early."""
    firsts = [t for k in range(8) for t in pipe.generate_tokens(pixels(k)[None], [""], 3)[0]]
    return max(set(firsts), key=firsts.count)


def alone_until_end(pipe: Pipeline, px: torch.Tensor, max_new: int, eos: int) -> tuple[int, str]:
    """(tokens before the end token, their text) of a caption generated alone (its text would show the end token,
    an ordinary word here)."""
    tokens = pipe.generate_tokens(px[None], [""], max_new)[0]
    count = tokens.index(eos) if eos in tokens else max_new
    return count, pipe.processor.decode(tokens[:count], skip_special_tokens=True).strip()


def engine_tokens(pipe: Pipeline, max_new: int) -> list[tuple[int, str]]:
    """(tokens, text) of eight caption requests run together by the engine."""
    engine = ContinuousBatcher(pipe, max_rows=4)
    engine.start()
    try:
        got = []
        for k in range(8):
            req, collected = request(pixels(k), "", Sampling(max_new_tokens=max_new))
            engine.submit(req)
            got.append(collected)
        for collected in got:
            assert collected.done.wait(60)
        return [(c.finished()[0].tokens, c.texts()[0]) for c in got]
    finally:
        engine.stop()


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_min_new_tokens_holds_back_the_end(kind, tiny_model_dir, tiny_t5_dir):
    """With a frequent token as the end token, answers end early; with min_new_tokens=6 none ends before 6
    tokens; the engine's texts equal generate's alone either way."""
    directory = tiny_model_dir if kind == "opt" else tiny_t5_dir
    eos = common_early_token(load(directory))
    runs = {}
    for name, extra in (("plain", {}), ("min", {"min_new_tokens": 6})):
        pipe = load(directory, eos_token_id=eos, **extra)
        runs[name] = engine_tokens(pipe, 10)
        assert runs[name] == [alone_until_end(pipe, pixels(k), 10, eos) for k in range(8)]
    assert min(n for n, _ in runs["plain"]) < 6, "no answer ended early: the test would prove nothing"
    assert min(n for n, _ in runs["min"]) >= 6
    assert any(n < 10 for n, _ in runs["min"]), "the end token was never chosen after the minimum"


def test_beam_search_checkpoints_fall_back_to_micro_batching_with_a_warning(tiny_model_dir, tiny_t5_dir, caplog):
    for directory in (tiny_model_dir, tiny_t5_dir):
        pipe = load(directory, num_beams=3)
        reason = unsupported(pipe.model)
        assert reason is not None and "beam search (num_beams=3)" in reason
        with pytest.raises(ValueError, match="beam search"):
            ContinuousBatcher(pipe)
        with caplog.at_level(logging.WARNING, logger="blip2.apps.server"):
            service = Service(pipe, ServerSettings(scheduler="continuous"))
        assert service.engine is None and service.stats()["scheduler"] == "micro"
        assert any("micro-batching" in r.getMessage() and "num_beams=3" in r.getMessage() for r in caplog.records)
        caplog.clear()
        assert Service(load(directory), ServerSettings(scheduler="continuous")).engine is not None


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_the_micro_scheduler_agrees_with_score_settings(kind, tiny_model_dir, tiny_t5_dir):
    """Micro-batching one batch of mixed prompts under the same settings gives each request generate's text alone,
    hence the continuous scheduler's (above). T5 prompts are all non-empty here: a T5 batch that mixes an empty
    prompt with others tokenizes the empty one, which its run alone does not."""
    pipe = load(tiny_model_dir if kind == "opt" else tiny_t5_dir, **SCORING)
    service = Service(pipe, ServerSettings(scheduler="micro"))
    prompts = PROMPTS if kind == "opt" else [p for p in PROMPTS if p]
    jobs = [(pixels(k), prompt, 3 + 2 * k) for k, prompt in enumerate(prompts)]
    requests = [request(px, prompt, Sampling(max_new_tokens=max_new)) for px, prompt, max_new in jobs]
    events = service._run_requests(Sampling(max_new_tokens=0), [req for req, _ in requests])
    for (px, prompt, max_new), (_, got), evs in zip(jobs, requests, events):
        for event in evs:
            got(event)
        assert got.texts() == [alone(pipe, px, prompt, max_new)], prompt


def test_greedy_requests_stay_greedy_when_the_checkpoint_samples(tiny_model_dir):
    """temperature 0 is greedy in both schedulers, whatever the checkpoint's do_sample says."""
    plain, sampling = load(tiny_model_dir), load(tiny_model_dir, do_sample=True, temperature=1.8)
    jobs = [(pixels(k), prompt, 8) for k, prompt in enumerate(PROMPTS[:3])]
    expected = [alone(plain, px, prompt, max_new) for px, prompt, max_new in jobs]
    service = Service(sampling, ServerSettings(scheduler="micro"))
    requests = [request(px, prompt, Sampling(max_new_tokens=max_new)) for px, prompt, max_new in jobs]
    for (_, got), evs in zip(requests, service._run_requests(Sampling(max_new_tokens=0), [r for r, _ in requests])):
        for event in evs:
            got(event)
    assert [got.texts()[0] for _, got in requests] == expected
    engine = ContinuousBatcher(sampling, max_rows=4)
    engine.start()
    try:
        requests = [request(px, prompt, Sampling(max_new_tokens=max_new)) for px, prompt, max_new in jobs]
        for req, _ in requests:
            engine.submit(req)
        assert all(got.done.wait(60) for _, got in requests)
        assert [got.texts()[0] for _, got in requests] == expected
    finally:
        engine.stop()
