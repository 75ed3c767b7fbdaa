"""Continuous batching (apps/server/engine.py): under load, every request's greedy text equals what
``Pipeline.generate`` gives it alone; requests join and leave the running batch; the image cache reuses the
vision output; sampling is reproducible by seed; stop sequences cut the text; a failing request fails alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from blip2.apps.pipeline import GenerationOptions, Pipeline, chat_prompt, question_prompt
from blip2.apps.server.engine import ContinuousBatcher
from blip2.apps.server.imagecache import ImageCache
from blip2.apps.server.requests import Delta, Failed, Finished, GenRequest, Sampling, TextStream, pixels_key
from blip2.fast import lazy
from blip2.fast.lazy import lay_out


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    lay_out(pipe.model)  # as the server does when it starts
    return pipe


class Collected:
    """The events of one request, and its choices' texts once all have finished."""

    def __init__(self, n: int) -> None:
        self.n, self.events, self.done = n, [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Failed) or sum(isinstance(e, Finished) for e in self.events) == self.n:
            self.done.set()

    def texts(self) -> list[str]:
        return ["".join(e.text for e in self.events if isinstance(e, Delta) and e.choice == c) for c in range(self.n)]

    def finished(self) -> list[Finished]:
        return sorted((e for e in self.events if isinstance(e, Finished)), key=lambda e: e.choice)


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed))


def request(px: torch.Tensor, prompt: str, sampling: Sampling) -> tuple[GenRequest, Collected]:
    got = Collected(sampling.n)
    return GenRequest(px, pixels_key(px), prompt, sampling, got), got


def alone(pipe: Pipeline, px: torch.Tensor, prompt: str, max_new: int) -> str:
    return pipe.generate(px[None], [prompt], GenerationOptions(max_new_tokens=max_new))[0]


@pytest.fixture()
def engine(pipe):
    engine = ContinuousBatcher(pipe, max_rows=4, max_queue=64, max_prefill=2, image_cache=ImageCache(8))
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def plain(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu", fast="none")


def test_greedy_texts_under_load_equal_each_request_alone(pipe, plain, engine, monkeypatch):
    """The pipeline's default speed-up (where the native kernels build: the native step, which the engine calls
    with each row at its own cache slot) under load gives each request the plain model's text alone."""
    from blip2.fast import kernels
    from blip2.fast.native import NativeOPTStep

    step = pipe.model.language_model.decode_step
    native_calls = []
    if kernels.load():
        assert isinstance(step, NativeOPTStep)
        original = step._run
        monkeypatch.setattr(step, "_run", lambda args, values: (native_calls.append(args[0].shape[0]),
                                                                 original(args, values))[1])
    images = [pixels(k) for k in range(4)]
    prompts = ["", question_prompt("what is it?"), chat_prompt([("what is it?", "a cat")], "where is it?"),
               "a photo of"]
    jobs = []
    for k in range(14):  # more than the 4 rows: later requests join as earlier ones leave
        px, prompt, max_new = images[k % 4], prompts[(k * 3) % 4], 1 + (k * 5) % 12
        jobs.append((px, prompt, max_new, *request(px, prompt, Sampling(max_new_tokens=max_new))))
        engine.submit(jobs[-1][3])
        time.sleep(0.002 * (k % 3))  # arrivals spread over the running steps
    for px, prompt, max_new, _, got in jobs:
        assert got.done.wait(60), "a request did not finish"
        assert got.texts() == [alone(plain, px, prompt, max_new)] == [alone(pipe, px, prompt, max_new)], \
            (prompt, max_new)
        (fin,) = got.finished()
        assert fin.tokens <= max_new and fin.reason == ("length" if fin.tokens == max_new else "stop")
    shared = sum(n for bound, n in zip(engine.occupancy.bounds, engine.occupancy.counts) if bound >= 2) \
        - engine.occupancy.counts[0]
    assert shared > 0, "no step ran more than one request"
    if kernels.load():
        assert max(native_calls) > 1, "the engine's steps did not run natively with several rows"
    assert engine.images.hits == 14 - 4 and engine.images.misses == 4  # four distinct images, each run once
    assert engine.rows == []


def test_n_choices_sampling_is_seeded_and_stop_cuts_the_text(pipe, engine):
    px = pixels(7)
    runs = []
    for _ in range(2):
        req, got = request(px, "", Sampling(max_new_tokens=8, n=3, temperature=1.5, top_p=0.9, seed=11))
        engine.submit(req)
        assert got.done.wait(60)
        runs.append(got.texts())
    assert runs[0] == runs[1], "the same seed gave different samples"
    greedy = alone(pipe, px, "", 8)
    assert len(greedy) > 3
    stop = greedy[2:4]
    req, got = request(px, "", Sampling(max_new_tokens=8, n=2, stop=(stop,)))
    engine.submit(req)
    assert got.done.wait(60)
    assert got.texts() == [greedy[: greedy.index(stop)].rstrip()] * 2
    assert [f.reason for f in got.finished()] == ["stop", "stop"]


def test_a_failing_request_fails_alone(pipe, engine):
    good_px = pixels(1)
    bad, bad_got = request(torch.zeros(3, 5), "", Sampling(max_new_tokens=3))  # not an image: vision fails
    good, good_got = request(good_px, "", Sampling(max_new_tokens=3))
    engine.submit(bad)
    engine.submit(good)
    assert bad_got.done.wait(60) and good_got.done.wait(60)
    assert isinstance(bad_got.events[-1], Failed)
    assert good_got.texts() == [alone(pipe, good_px, "", 3)]


def test_text_stream_holds_back_what_may_change():
    pieces = {1: " a", 2: " ca", 3: "t\ufffd", 4: "t!", 5: " END", 6: " more"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stream = TextStream(decode, stop=("END",))
    # "a ca" less the 2 characters that may start "END", less trailing white space
    assert [stream.add(t) for t in (1, 2, 4)] == [("", False), ("a", False), (" ca", False)]
    assert stream.add(5) == ("t!", True)  # the stop sequence ends it and is left out
    plain = TextStream(decode, stop=())
    assert [plain.add(t) for t in (1, 2, 3)] == [("a", False), (" ca", False), ("t", False)]  # a partial character waits
    assert plain.finish() == "\ufffd"


def test_the_image_cache_keeps_the_most_recent_images_and_runs_each_miss_once():
    """LRU: past max_entries the least recently used image is dropped, a hit moves an image to the end, and the
    model runs only the images it has not seen (each once per call, duplicates included)."""

    class Model:
        device = torch.device("cpu")
        calls: list[int] = []

        def image_to_lm_inputs(self, pixels):
            self.calls.append(pixels.shape[0])
            return None, None, pixels.mean((2, 3))[:, None, :]  # [b, 1, 3]: a stand-in for the projected queries

    cache, model = ImageCache(2), Model()
    px = {k: torch.full((3, 2, 2), float(i)) for i, k in enumerate("abc")}
    out = cache.lm_inputs(model, [("a", px["a"]), ("b", px["b"]), ("a", px["a"])])
    assert model.calls == [2] and out[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    cache.lm_inputs(model, [("a", px["a"])])  # a hit: "a" is now the most recent, "b" the oldest
    cache.lm_inputs(model, [("c", px["c"])])  # evicts "b"
    assert model.calls == [2, 1] and cache.stats()["entries"] == 2
    cache.lm_inputs(model, [("a", px["a"]), ("b", px["b"])])  # "a" kept, "b" runs again
    assert model.calls == [2, 1, 1] and cache.stats()["hits"] == 2


@pytest.mark.parametrize("scheduler", ["continuous", "micro"])
def test_the_server_lays_a_large_model_out_as_it_starts(tiny_model_dir, scheduler, monkeypatch):
    """A model whose generate would wait for its second call (``lazy.LATER_BYTES``) is laid out by the server
    before its first request, whichever scheduler serves it."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
    from blip2.apps.server.service import ServerSettings, Service
    from test_fast_default import laid_out

    monkeypatch.setattr(lazy, "LATER_BYTES", 0)
    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    assert not laid_out(pipe.model)
    service = Service(pipe, ServerSettings(scheduler=scheduler))
    assert laid_out(pipe.model) and (service.engine is not None) == (scheduler == "continuous")


def test_the_cache_writers_wait_while_requests_run(engine):
    """From a request's arrival to its last row, the engine holds ``layout_files.Foreground`` (the cache's file
    writers pause between pieces); idle, it lets go."""
    from blip2 import layout_files

    px, seen, got = pixels(1), [], Collected(1)

    def record(event) -> None:
        seen.append(layout_files._foreground[0])
        got(event)

    engine.submit(GenRequest(px, pixels_key(px), "", Sampling(max_new_tokens=4), record))
    assert got.done.wait(30) and isinstance(got.events[-1], Finished)
    assert len(seen) >= 2 and all(n == 1 for n in seen)  # (each event is emitted from the engine's work)
    deadline = time.monotonic() + 5
    while layout_files._foreground[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert layout_files._foreground[0] == 0
