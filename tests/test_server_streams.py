"""The OpenAI endpoints around the continuous scheduler, through a live server: ``--fetch-images`` (remote image
URLs refused by default; fetched when allowed, with a clear 4xx for each way a fetch can go wrong); a streaming
client that disconnects leaves the batch while another stream gets its exact text; the Prometheus series of the
continuous scheduler move as the work done; a Flan-T5 server answers concurrent chats as /v1/ask does."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai", reason="the openai client (a test dependency) is not installed")

from blip2.apps.pipeline import GenerationOptions, Pipeline
from blip2.apps.server import ServerSettings
from test_server import Served, png
from test_server_openai import ask, data_url

CAP = 32  # the server's max_new_tokens
SETTINGS = dict(options=GenerationOptions(max_new_tokens=CAP), max_batch_size=2, max_wait_ms=5, timeout_s=120,
                max_upload_bytes=20_000, max_pixels=200 * 200)
STEP_S = 0.04  # each decoder call sleeps this long, so that streams overlap and a client can leave mid-stream


@pytest.fixture(scope="module")
def slow_pipe(tiny_model_dir) -> Pipeline:
    pipe = Pipeline.load(tiny_model_dir, device="cpu", fast="none")
    pipe.model.language_model.model.decoder.register_forward_pre_hook(lambda *_: time.sleep(STEP_S))
    return pipe


class Files(http.server.BaseHTTPRequestHandler):
    """/ok.png: an image; /text: not an image; /big: over max_upload_bytes; anything else: 404."""

    bodies = {"/ok.png": (png(6), "image/png"), "/text": (b"just some text, not a picture", "text/plain"),
              "/big": (b"\x89PNG" + b"\0" * 30_000, "image/png")}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path not in self.bodies:
            self.send_error(404)
            return
        body, kind = self.bodies[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def chat(url: str, image_url: str, question: str | None = None, **body: object) -> httpx.Response:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}]
    parts += [{"type": "text", "text": question}] if question else []
    return httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"model": "m", "messages": [{"role": "user", "content": parts}], **body})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_images_are_fetched_only_when_allowed(tiny_model_dir, files):
    pipe = Pipeline.load(tiny_model_dir, device="cpu")
    default = Served(pipe, ServerSettings(**SETTINGS))
    allowed = Served(pipe, ServerSettings(fetch_images=True, **SETTINGS))
    try:
        refused = chat(default.url, files + "/ok.png")
        error = refused.json()["error"]
        assert refused.status_code == 400 and error["code"] == "remote_image_refused" and error["param"] == "messages"
        assert "not fetched" in error["message"] and error["type"] == "invalid_request_error"

        fetched = chat(allowed.url, files + "/ok.png", "what is it?")
        expected = chat(allowed.url, data_url(png(6)), "what is it?")
        assert fetched.status_code == expected.status_code == 200
        text = fetched.json()["choices"][0]["message"]["content"]
        assert text == expected.json()["choices"][0]["message"]["content"] == ask(allowed.url, png(6), "what is it?")
        assert len(text) > 3

        cases = [(f"http://127.0.0.1:{closed_port()}/a.png", 400, "image_fetch_failed", "cannot fetch the image"),
                 (files + "/missing.png", 400, "image_fetch_failed", "404"),
                 (files + "/text", 415, "invalid_image", "the fetched file is not an image"),
                 (files + "/big", 413, "image_too_large", "over the limit of 20000 bytes"),
                 ("http://[::1/a.png", 400, "image_fetch_failed", "cannot fetch the image")]
        for image_url, status, code, needle in cases:
            reply = chat(allowed.url, image_url)
            error = reply.json()["error"]
            assert (reply.status_code, error["code"], error["param"]) == (status, code, "messages"), image_url
            assert needle in error["message"], (image_url, error["message"])
        assert httpx.get(allowed.url + "/health", timeout=30).json()["status"] == "ok"
        again = chat(allowed.url, files + "/ok.png", "what is it?")
        assert again.json()["choices"][0]["message"]["content"] == text
        codes = httpx.get(allowed.url + "/metrics", timeout=30).json()["responses"]
        assert not any(key.endswith(" 500") for key in codes), codes
    finally:
        default.close()
        allowed.close()


def metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", timeout=30).json()


def prometheus(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics?format=prometheus", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def streamed(url: str, image: bytes, question: str, events: list[tuple[float, str]]) -> dict:
    """A chat streamed to the end: its text and usage; ``events`` gets (time, text) per content chunk."""
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": question}]}]}
    text, usage = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                events.append((time.monotonic(), chunk["choices"][0]["delta"]["content"]))
                text += chunk["choices"][0]["delta"]["content"]
            usage = chunk.get("usage") or usage
    return {"text": text, "usage": usage}


def leave_early(url: str, image: bytes, question: str, chunks: int, ready: threading.Event,
                go: threading.Event) -> str:
    """A streamed chat whose client, once it has ``chunks`` content chunks, sets ``ready`` and hangs up when
    ``go`` is set; the text it got."""
    body = {"model": "m", "stream": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": question}]}]}
    text, got = "", 0
    with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    text, got = text + delta, got + 1
                    if got == chunks:
                        ready.set()
                        go.wait(30)
                        break  # leaving the with-blocks closes the connection mid-stream
    return text


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_leaves_mid_stream_frees_its_row_for_the_next(slow_pipe):
    """Two rows: A and B stream, C waits for a row. A hangs up after 3 chunks: its row leaves the batch (A's
    tokens stop far short of the cap), C takes it while B is still streaming, and B and C get their exact full
    texts (what /v1/ask answers)."""
    served = Served(slow_pipe, ServerSettings(**SETTINGS))
    try:
        url = served.url
        images = {name: png(k) for k, name in enumerate("ABC", 11)}
        expected = {name: ask(url, images[name], "what is it?") for name in "BC"}
        assert all(len(t.split()) >= CAP - 2 for t in expected.values()), "answers should run to the cap"
        before = metrics(url)["continuous"]
        b_events, c_events = [], []
        ready, go = threading.Event(), threading.Event()
        with ThreadPoolExecutor(3) as pool:
            b = pool.submit(streamed, url, images["B"], "what is it?", b_events)
            a = pool.submit(leave_early, url, images["A"], "what is it?", 3, ready, go)
            assert ready.wait(30)
            assert metrics(url)["continuous"]["running_rows"] == 2 and b_events, "A and B should be streaming"
            c = pool.submit(streamed, url, images["C"], "what is it?", c_events)
            wait_for(lambda: metrics(url)["continuous"]["queue_length"] == 1 or c_events)
            go.set()
            a_text, b_reply, c_reply = a.result(), b.result(), c.result()
        assert len(a_text.split()) >= 2
        assert b_reply["text"] == expected["B"] and c_reply["text"] == expected["C"]
        assert c_events[0][0] < b_events[-1][0], "C did not start before B ended: A's row was not freed"
        wait_for(lambda: metrics(url)["continuous"]["running_rows"] == 0)
        after = metrics(url)["continuous"]
        a_tokens = (after["generated_tokens"] - before["generated_tokens"]
                    - b_reply["usage"]["completion_tokens"] - c_reply["usage"]["completion_tokens"])
        assert 3 <= a_tokens < CAP - 8, f"A generated {a_tokens} tokens: its row did not leave when it hung up"
        assert after["queue_length"] == 0
    finally:
        served.close()


def test_prometheus_series_of_the_continuous_scheduler(slow_pipe):
    """blip2_generated_tokens_total grows by the completion tokens; each decoding step adds one observation of
    its row count to blip2_batch_occupancy (one request alone: CAP - 1 steps of 1 row; two together: steps of 2);
    blip2_running_rows is 2 while two stream and 0 after."""
    served = Served(slow_pipe, ServerSettings(**SETTINGS))
    try:
        url = served.url
        start = prometheus(url)
        assert start["blip2_running_rows"] == 0 and start["blip2_generated_tokens_total"] == 0
        one = chat(url, data_url(png(21)), "what is it?").json()
        after_one = prometheus(url)
        tokens = one["usage"]["completion_tokens"]
        assert tokens == CAP and one["choices"][0]["finish_reason"] == "length"
        assert after_one["blip2_generated_tokens_total"] == tokens
        assert after_one["blip2_batch_occupancy_count"] == tokens - 1  # the first token comes from the prefill
        assert after_one['blip2_batch_occupancy_bucket{le="1"}'] == tokens - 1
        assert after_one["blip2_batch_occupancy_sum"] == tokens - 1

        seen = []
        with ThreadPoolExecutor(2) as pool:
            replies = [pool.submit(chat, url, data_url(png(k)), "what is it?") for k in (22, 23)]
            while not all(r.done() for r in replies):
                seen.append(prometheus(url)["blip2_running_rows"])
                time.sleep(0.02)
            two = [r.result().json() for r in replies]
        assert 2 in seen
        end = prometheus(url)
        assert end["blip2_running_rows"] == 0
        assert end["blip2_generated_tokens_total"] == tokens + sum(r["usage"]["completion_tokens"] for r in two)
        steps = end["blip2_batch_occupancy_count"] - after_one["blip2_batch_occupancy_count"]
        shared = steps - (end['blip2_batch_occupancy_bucket{le="1"}'] - after_one['blip2_batch_occupancy_bucket{le="1"}'])
        assert shared >= CAP // 2, f"only {shared} of {steps} steps ran both rows"
        rows_stepped = end["blip2_batch_occupancy_sum"] - after_one["blip2_batch_occupancy_sum"]
        assert rows_stepped == 2 * (CAP - 1)  # every token after each prefill cost one row in one step
        assert end['blip2_batch_occupancy_bucket{le="+Inf"}'] == end["blip2_batch_occupancy_count"]

        # three prompts about new images missed the prefix cache; a second question about png(21), its first
        # answer in the history, finds that first row: the queries, the question and the answer's fed tokens
        assert end["blip2_prefix_cache_hits_total"] == 0 and end["blip2_prefix_cache_bytes"] > 0
        image = data_url(png(21))
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": "what is it?"}]},
                    {"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "and then?"}]
        reply = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 2},
                           timeout=60)
        assert reply.status_code == 200, reply.text
        follow = prometheus(url)
        assert follow["blip2_prefix_cache_hits_total"] == 1
        assert follow["blip2_prefix_cache_reused_tokens_total"] > slow_pipe.model.config.num_query_tokens
    finally:
        served.close()


def test_t5_server_answers_concurrent_chats_as_ask(tiny_t5_dir):
    pipe = Pipeline.load(tiny_t5_dir, device="cpu")
    served = Served(pipe, ServerSettings(**{**SETTINGS, "max_batch_size": 4}))
    try:
        assert metrics(served.url)["scheduler"] == "continuous"
        jobs = [(png(k), q) for k in range(30, 33) for q in ("what is it?", "where is the w5?", None)]
        expected = [ask(served.url, image, q) if q else
                    httpx.post(served.url + "/v1/caption", files={"image": ("a.png", image, "image/png")},
                               timeout=60).json()["caption"] for image, q in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda job: chat(served.url, data_url(job[0]), job[1]).json(), jobs))
        assert [r["choices"][0]["message"]["content"] for r in replies] == expected
        assert len(set(expected)) >= 4
    finally:
        served.close()
