"""One request never harms another: bad requests are refused before they join a batch, a request that still fails
in the model fails alone, and images cost a bounded amount before admission (formats, sizes, concurrent decodes,
the request's deadline)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from PIL import EpsImagePlugin

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx")

from blip2.apps.pipeline import Pipeline
from blip2.apps.server import ServerSettings
from blip2.demo import DEFAULT_RETRIEVAL_MODEL
from hostile import bilevel_png, eps
from test_server import OPTIONS, Served, decoded, png

IMAGE_TOKEN_ERROR = "the prompt holds the image token '<image>': the model places the image itself, remove it from the text"


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


def post_all(url: str, requests: list[tuple[str, dict[str, Any], bytes]]) -> list[httpx.Response]:
    """POST every (path, form fields, image) at once."""

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return list(await asyncio.gather(*(
                client.post(path, data=fields, files={"image": ("x.png", image, "image/png")})
                for path, fields, image in requests)))

    return asyncio.run(send())


def metrics(url: str) -> dict[str, Any]:
    return httpx.get(url + "/metrics", timeout=30).json()


def test_requests_the_model_would_refuse_never_join_a_batch(pipe):
    served = Served(pipe, ServerSettings(options=OPTIONS, max_batch_size=8, max_wait_ms=300))
    good = [("/v1/caption", {}, png(k)) for k in range(4)] + [("/v1/ask", {"question": f"w{5 + k}"}, png(k))
                                                                for k in range(4)]
    bad = [("/v1/caption", {"prompt": "w5 <image> w6"}, png(1)), ("/v1/ask", {"question": "<image>"}, png(2))]
    try:
        responses = post_all(served.url, [bad[0], *good[:4], bad[1], *good[4:]])
        stats = metrics(served.url)
    finally:
        served.close()
    for r in (responses[0], responses[5]):
        assert (r.status_code, r.json()) == (422, {"error": IMAGE_TOKEN_ERROR})
    for r, (path, fields, image) in zip(responses[1:5] + responses[6:], good):
        if path == "/v1/ask":
            assert r.json()["answer"] == pipe.ask([decoded(image)], [fields["question"]], OPTIONS)[0]
        else:
            assert r.json() == {"caption": pipe.caption([decoded(image)], "", OPTIONS)[0]}
    assert stats["max_batch_size_seen"] > 1 and stats["batched_requests"] == 8 and stats["split_batches"] == 0


def test_a_request_that_fails_in_the_model_fails_alone(pipe, tiny_model_dir):
    """A failure nobody foresaw: the batch is run again one request at a time; only the culprit gets an error,
    a JSON 500 that names no file of the server."""

    class Flaky(Pipeline):
        def generate(self, images: Any, prompts: list[str], options: Any = OPTIONS) -> list[str]:
            if "w66" in prompts:
                raise RuntimeError(f"cannot run w66 with {tiny_model_dir}/model.safetensors")
            return super().generate(images, prompts, options)

    served = Served(Flaky(pipe.model, pipe.processor, name=tiny_model_dir),
                    ServerSettings(options=OPTIONS, max_batch_size=8, max_wait_ms=300))
    prompts = ["", "w5", "w66", "w7 w8", "", "w9"]
    try:
        responses = post_all(served.url, [("/v1/caption", {"prompt": p} if p else {}, png(k))
                                          for k, p in enumerate(prompts)])
        stats = metrics(served.url)
    finally:
        served.close()
    culprit = responses[2]
    assert (culprit.status_code, culprit.headers["content-type"]) == (500, "application/json")
    assert culprit.json() == {"error": "internal error (RuntimeError); the server's log has the details"}
    for k, (r, prompt) in enumerate(zip(responses, prompts)):
        if k != 2:
            assert r.json() == {"caption": pipe.caption([decoded(png(k))], prompt, OPTIONS)[0]}
    assert stats["split_batches"] == 1 and stats["batches"] == 1 and stats["responses"]["POST /v1/caption 200"] == 5


def test_an_over_long_match_text_fails_alone():
    """The bundled retrieval model's Q-Former has 64 text positions (about 60 words)."""
    retrieval = Pipeline.load(DEFAULT_RETRIEVAL_MODEL, device="cpu")
    served = Served(retrieval, ServerSettings(max_batch_size=8, max_wait_ms=300))
    texts = [["a red circle"], ["a small blue square", "a green triangle"], ["red " * 70], ["a yellow circle"]]
    try:
        responses = post_all(served.url, [("/v1/match", {"text": t}, png(30 + k)) for k, t in enumerate(texts)])
        stats = metrics(served.url)
    finally:
        served.close()
    assert (responses[2].status_code, responses[2].json()) == (422, {
        "error": "the text is 72 tokens long, over the 64 text positions of the model's Q-Former: shorten it"})
    for k in (0, 1, 3):
        want = retrieval.match(decoded(png(30 + k)), texts[k])
        got = responses[k].json()["scores"]
        assert [s["itm"] for s in got] == pytest.approx([s.itm for s in want], abs=1e-5)
        assert [s["itc"] for s in got] == pytest.approx([s.itc for s in want], abs=1e-5)
    assert stats["max_batch_size_seen"] == 3 and stats["split_batches"] == 0


def test_images_are_refused_from_their_header_in_milliseconds(pipe, monkeypatch):
    def never(self: object) -> None:
        raise AssertionError("the EPS plugin ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    served = Served(pipe, ServerSettings(options=OPTIONS))
    cases = [
        (bilevel_png(40_000_000, 1), 413, "the uploaded image is too large: 40000000x1: a side over max_side=32768"),
        (bilevel_png(10_000, 20), 413, "the uploaded image is too large: 10000x20: aspect ratio over max_aspect=50"),
        (eps(), 415, "the uploaded file is not an image in an accepted format (PNG, JPEG, WebP, GIF, BMP, TIFF)"),
    ]
    try:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            for data, status, error in cases:
                start = time.perf_counter()
                r = client.post("/v1/caption", files={"image": ("x.png", data, "image/png")})
                assert time.perf_counter() - start < 1.0  # the 40,000,000 x 1 PNG once took seconds and 1.5 GB
                assert (r.status_code, r.json()) == (status, {"error": error})
            assert client.post("/v1/caption", files={"image": ("ok.png", png(3), "image/png")}).status_code == 200
    finally:
        served.close()


def test_decoding_is_bounded_counted_against_the_queue_and_timed(pipe):
    """At most max_decodes images are decoded at once; the images waiting for a decoder count against max_queue
    (503 beyond); a decode that outlasts the request's time limit gets 504 at that limit."""
    gate = threading.Event()
    lock = threading.Lock()
    running = {"now": 0, "most": 0}

    class SlowDecode(Pipeline):
        def preprocess(self, images: Any) -> Any:  # runs in a decoder thread, after the image is decoded
            with lock:
                running["now"] += 1
                running["most"] = max(running["most"], running["now"])
            gate.wait(timeout=60)
            with lock:
                running["now"] -= 1
            return super().preprocess(images)

    settings = ServerSettings(options=OPTIONS, max_decodes=2, max_queue=3, timeout_s=2)
    served = Served(SlowDecode(pipe.model, pipe.processor, name="slow"), settings)
    try:
        start = time.perf_counter()
        responses = post_all(served.url, [("/v1/caption", {}, png(k)) for k in range(5)])
        elapsed = time.perf_counter() - start
        codes = sorted(r.status_code for r in responses)
        assert codes == [503, 503, 504, 504, 504], [r.json() for r in responses]
        assert {r.json()["error"] for r in responses if r.status_code == 504} == {"no answer within 2 s"}
        assert {r.json()["error"] for r in responses if r.status_code == 503} == {
            "server busy: 3 requests are already waiting (max_queue=3); retry shortly"}
        assert 2 <= elapsed < 4  # the decodes were still running: the deadline answered
        assert running["most"] == 2 and metrics(served.url)["decoding"] == 2  # the third never started
        gate.set()
        deadline = time.monotonic() + 30
        while metrics(served.url)["decoding"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ok = httpx.post(served.url + "/v1/caption", files={"image": ("a.png", png(4), "image/png")}, timeout=60)
        assert ok.json() == {"caption": pipe.caption([decoded(png(4))], "", OPTIONS)[0]}
        assert metrics(served.url)["rejected_queue_full"] == 2
    finally:
        gate.set()
        served.close()
