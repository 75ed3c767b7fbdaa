"""The prefix cache (apps/server/prefixcache.py) and the continuous engine's use of it: a prompt that begins as an
earlier row did (same image, same leading tokens: a chat's next question) prefills only its tail, with the logits
and greedy tokens of a whole prefill; the cache is bounded and keeps the longest entries."""

from __future__ import annotations

import time

import pytest
import torch

from blip2.apps.pipeline import GenerationOptions, Pipeline, chat_prompt, question_prompt
from blip2.apps.server.engine import ContinuousBatcher
from blip2.apps.server.imagecache import ImageCache
from blip2.apps.server.prefixcache import PrefixCache, common_length
from blip2.apps.server.requests import Sampling
from blip2.apps.server.rows import DecoderOnlyRows
from test_server_engine import pixels, request


def kv(n: int, fill: float = 0.0) -> list[torch.Tensor]:
    return [torch.full((2, n, 4), fill)]  # one layer, 2 heads, n slots, head size 4: 32 bytes a slot


def test_find_gives_the_longest_shared_prefix_of_the_same_image_less_the_last_item():
    cache = PrefixCache(1 << 20)
    cache.add("img", [1, 2, 3, 4], kv(4), kv(4))
    cache.add("img", [1, 2, 7], kv(3, 1.0), kv(3, 1.0))
    cache.add("other", [1, 2, 3, 4, 5], kv(5), kv(5))
    n, entry = cache.find("img", [1, 2, 3, 9])
    assert n == 3 and entry.items == (1, 2, 3, 4)
    n, entry = cache.find("img", [1, 2, 7, 8])
    assert n == 3 and entry.items == (1, 2, 7)
    assert cache.find("img", [1, 2, 3, 4])[0] == 3  # the whole prompt is stored: its last item still runs
    assert cache.find("img", [5, 1]) == (0, None)  # nothing shared
    assert cache.find("new", [1, 2, 3]) == (0, None)  # another image: its queries differ
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 2 and cache.stats()["reused_tokens"] == 9


def test_add_drops_what_a_longer_entry_covers_and_evicts_the_least_recent_past_the_byte_bound():
    slot = 2 * 2 * 4 * 4  # keys and values, 2 heads, 4 floats
    cache = PrefixCache(10 * slot)
    cache.add("a", [1, 2], kv(2), kv(2))
    cache.add("a", [1, 2, 3], kv(3), kv(3))  # extends [1, 2]: the shorter one goes
    assert cache.stats()["entries"] == 1 and cache.nbytes == 3 * slot
    cache.add("a", [1, 2], kv(2), kv(2))  # covered by [1, 2, 3]: not stored again
    assert cache.stats()["entries"] == 1
    cache.add("b", [5, 6, 7], kv(3), kv(3))
    cache.find("a", [1, 2, 3, 4])  # "a" is now the most recent
    cache.add("c", [8, 9, 10, 11], kv(4), kv(4))  # 10 slots in all: nothing evicted yet
    assert cache.nbytes == 10 * slot and cache.stats()["entries"] == 3
    cache.add("d", [12], kv(1), kv(1))  # 11 slots: the least recent ("b") goes
    assert cache.find("b", [5, 6, 7, 8]) == (0, None) and cache.find("a", [1, 2, 3, 4])[0] == 3
    assert cache.nbytes == 8 * slot
    cache.add("e", list(range(11)), kv(11), kv(11))  # larger than the whole cache: not kept, nothing evicted
    assert cache.nbytes == 8 * slot and cache.stats()["entries"] == 3
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(-1)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu", fast="none")


def lm_inputs(pipe: Pipeline, seeds: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return pipe.model.image_to_lm_inputs(torch.stack([pixels(s) for s in seeds]))[2]


def greedy(rows: DecoderOnlyRows, logits: torch.Tensor, starts, count: int) -> list[list[int]]:
    """``count`` greedy tokens of each prefilled row (rows 0 .. b-1)."""
    out = [[t] for t in logits.argmax(-1).tolist()]
    lengths, positions = [s.length for s in starts], [s.position for s in starts]
    for _ in range(count - 1):
        step = rows.step([o[-1] for o in out], lengths, positions)
        for j, t in enumerate(step.argmax(-1).tolist()):
            out[j].append(t)
        lengths, positions = [n + 1 for n in lengths], [p + 1 for p in positions]
    return out


@torch.inference_mode()
def test_a_chat_turn_prefills_only_its_tail_with_the_logits_and_tokens_of_a_whole_prefill(pipe):
    """Turn 1 runs whole and its row is kept; turn 2 (the history, then a new question) reuses the image's
    queries, the first question and the answer's tokens, alone and batched with a prompt the cache does not
    know; logits within 1e-5 of a whole prefill's, and the same greedy tokens after."""
    first = question_prompt("what is it?")
    cache = PrefixCache(64 << 20)
    rows = DecoderOnlyRows(pipe, 4, cache)
    q = lm_inputs(pipe, [3])
    logits, starts, load = rows.prefill(q, [first], ["img3"])
    load(0, 0)
    answer = greedy(rows, logits, starts, 6)[0]
    # the row fed back all but its last token: the cache gets what its slots hold
    rows.keep(0, starts[0].length + 5, "img3", starts[0].items + answer[:5])
    assert cache.stats()["entries"] == 1 and cache.nbytes > 0
    second = chat_prompt([("what is it?", pipe.processor.decode(answer, skip_special_tokens=True))], "why?")

    whole = DecoderOnlyRows(pipe, 4, None)
    for batch, keys, seeds in (([second], ["img3"], [3]), ([second, first], ["img3", "img5"], [3, 5])):
        q = lm_inputs(pipe, seeds)
        ref_logits, ref_starts, ref_load = whole.prefill(q, batch, keys)
        hits = cache.hits
        got_logits, got_starts, got_load = rows.prefill(q, batch, keys)
        assert cache.hits == hits + 1  # the chat's row: part of its prompt copied, not run
        assert [s.position for s in got_starts] == [s.position for s in ref_starts]
        assert [s.prefix for s in got_starts] == [s.prefix for s in ref_starts]
        torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=1e-5)
        for j in range(len(batch)):
            ref_load(j, j)
            got_load(j, j)
        assert greedy(rows, got_logits, got_starts, 8) == greedy(whole, ref_logits, ref_starts, 8)
    stored = len(starts[0].items) + 5
    (entry,) = cache._entries.values()
    shared = common_length(entry.items, got_starts[0].items)
    assert cache.stats()["hits"] == 2 and cache.stats()["reused_tokens"] == 2 * min(shared, stored)
    assert shared > len(starts[0].items), "turn 2 did not reuse the answer's tokens"


def alone(pipe: Pipeline, px: torch.Tensor, prompt: str, max_new: int) -> str:
    return pipe.generate(px[None], [prompt], GenerationOptions(max_new_tokens=max_new))[0]


def test_chats_under_load_reuse_their_history_and_give_each_turn_its_text_alone(pipe):
    """Four chats of three turns at once, each turn's prompt the history so far (as the OpenAI endpoint builds
    it): every turn's greedy text equals the plain model's alone, and turns 2 and 3 reuse the cache."""
    engine = ContinuousBatcher(pipe, max_rows=3, max_prefill=2, image_cache=ImageCache(8))
    engine.start()
    try:
        chats = [(pixels(20 + c), [("what is it?", 5 + c), ("and the colour?", 7), ("why?", 3 + 2 * c)])
                 for c in range(4)]
        histories: list[list[tuple[str, str]]] = [[] for _ in chats]
        for turn in range(3):
            jobs = []
            for c, (px, questions) in enumerate(chats):
                question, max_new = questions[turn]
                prompt = chat_prompt(histories[c], question)
                req, got = request(px, prompt, Sampling(max_new_tokens=max_new))
                engine.submit(req)
                jobs.append((c, prompt, max_new, got, question))
                time.sleep(0.003)
            for c, prompt, max_new, got, question in jobs:
                assert got.done.wait(60)
                (text,) = got.texts()
                assert text == alone(pipe, chats[c][0], prompt, max_new), (c, turn)
                histories[c].append((question, text))
        stats = engine.stats()["prefix_cache"]
        assert stats["hits"] >= 8, stats  # every turn after the first found its chat's history
        assert stats["reused_tokens"] > 8 * pipe.model.config.num_query_tokens
        assert 0 < stats["bytes"] <= stats["max_bytes"]
    finally:
        engine.stop()


@pytest.mark.parametrize("fault", ["off", "keep fails"])
def test_without_the_cache_or_when_keeping_fails_requests_still_get_their_texts(pipe, monkeypatch, caplog, fault):
    """A cache of 0 bytes keeps nothing and finds nothing; a row that cannot be kept (here MemoryError) costs a
    warning, never a request."""
    engine = ContinuousBatcher(pipe, max_rows=2, prefix_cache=PrefixCache(0 if fault == "off" else 64 << 20))
    if fault == "keep fails":
        def keep(*args):
            raise MemoryError("no room")
        monkeypatch.setattr(engine.lm, "keep", keep)
    engine.start()
    try:
        px, history = pixels(40), []
        for question in ("what is it?", "and then?"):
            prompt = chat_prompt(history, question)
            req, got = request(px, prompt, Sampling(max_new_tokens=4))
            engine.submit(req)
            assert got.done.wait(60)
            assert got.texts() == [alone(pipe, px, prompt, 4)]
            history.append((question, got.texts()[0]))
        stats = engine.stats()["prefix_cache"]
        assert stats["entries"] == stats["bytes"] == stats["hits"] == 0
        if fault == "keep fails":
            assert "not kept (MemoryError: no room)" in caplog.text
    finally:
        engine.stop()
