"""``cuda_graph()``: the decoding step replayed from a recorded graph gives the plain step's tokens.

A CPU has no CUDA graphs, so most tests record with ``ReplayGraph``, which keeps what a CUDA graph keeps
(the recorded function, bound to the static argument buffers, and its output tensor) and replays by
running the function again into that output. That checks what our side of a graph must get right:
per-step arguments copied into the static buffers before each replay, caches used in place, a new
recording when the caches move (each generate call, T5's beam reorder), a fresh output each step. The
last test runs real CUDA graphs where a GPU is present (benchmarks/bench_gpu.py runs them too).
"""

from __future__ import annotations

import pytest
import torch

from blip2 import Blip2ForConditionalGeneration
from blip2.fast.graphs import GraphedStep
from conftest import pixel_batch
from test_fast_paths import inputs
from blip2 import fast


class ReplayGraph:
    """A CUDA graph's contract on CPU: ``record(fn)`` returns the output tensor that ``replay()`` refills."""

    def __init__(self, device: torch.device) -> None:
        self.fn = None

    def record(self, fn):
        fn()  # the warm-up run the real backend makes
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        self.out.copy_(self.fn())


@pytest.fixture(scope="module", params=["opt", "t5"])
def case(request, hf_opt_dir, hf_t5_dir):
    d = (hf_opt_dir if request.param == "opt" else hf_t5_dir)[1]
    return request.param, d, Blip2ForConditionalGeneration.from_pretrained(d)


def graphed(d: str) -> tuple[Blip2ForConditionalGeneration, GraphedStep]:
    model = fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d))
    lm = model.language_model
    lm.decode_step = GraphedStep(lm.decode_step, "cpu", backend=ReplayGraph)
    return model, lm.decode_step


@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_step_tokens_equal_plain(case, batch):
    text, d, plain = case
    model, step = graphed(d)
    pixels = pixel_batch(3, seed=5)[:batch]
    ids, mask = inputs(text)
    ids, mask = ids[:batch], mask[:batch]
    want = plain.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9)
    got = model.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9)
    assert got.tolist() == want.tolist()
    assert step.recordings == 1  # one graph for the whole call: the steps' caches stay put
    got = model.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9)  # new caches: a new graph
    assert got.tolist() == want.tolist()
    assert step.recordings == 2


def test_graphed_step_with_beam_search(case):
    """Beam search reorders the caches between steps (T5 into new tensors: a new recording)."""
    text, d, plain = case
    model, step = graphed(d)
    pixels = pixel_batch(3, seed=5)
    ids, mask = inputs(text)
    want = plain.generate(pixels, ids, mask, max_new_tokens=8, num_beams=3)
    assert model.generate(pixels, ids, mask, max_new_tokens=8, num_beams=3).tolist() == want.tolist()


def test_stale_static_buffers_would_change_tokens(case, monkeypatch):
    """The check above can fail: a graph that skips the copy of the per-step arguments (so every step
    replays the first token) gives other tokens."""
    text, d, plain = case
    model, step = graphed(d)
    pixels = pixel_batch(3, seed=5)
    ids, mask = inputs(text)
    original = GraphedStep.__call__

    def no_copy(self, *args):
        if self.key is not None and self._key(args) == self.key:
            self.graph.replay()
            return self.out.clone()
        return original(self, *args)

    monkeypatch.setattr(GraphedStep, "__call__", no_copy)
    got = model.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9)
    assert got.tolist() != plain.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9).tolist()


def test_cuda_graph_needs_cuda(case):
    text, d, plain = case
    model = Blip2ForConditionalGeneration.from_pretrained(d)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; the model is on cpu"):
        fast.cuda_graph(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_tokens_equal_plain_on_gpu(case):
    text, d, plain = case
    model = fast.cuda_graph(fast.fuse(Blip2ForConditionalGeneration.from_pretrained(d, device="cuda")))
    eager = Blip2ForConditionalGeneration.from_pretrained(d, device="cuda")
    pixels = pixel_batch(3, seed=5).cuda()
    ids, mask = (t.cuda() for t in inputs(text))
    want = eager.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9)
    assert model.generate(pixels, ids, mask, max_new_tokens=9, min_new_tokens=9).tolist() == want.tolist()
    assert model.language_model.decode_step.recordings == 1


def test_bench_cuda_graph_flag_needs_cuda(case, capsys):
    from blip2.apps.bench import main

    text, d, plain = case
    with pytest.raises(SystemExit):
        main(["--model", d, "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph needs a CUDA device, got --device cpu" in capsys.readouterr().err
