"""The HTTP server on loopback: micro-batched answers equal the pipeline's, bad requests get 4xx JSON,
queue and time limits hold, and `blip2 serve` starts from the command line."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from blip2.apps.pipeline import GenerationOptions, Pipeline
from blip2.apps.server import MicroBatcher, QueueFull, ServerSettings, bind, uvicorn_config

OPTIONS = GenerationOptions(max_new_tokens=5)


def png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.RandomState(seed)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + rng.randint(0, 256, 3).astype(np.uint8)
    pixels[: size[1] // 2, : rng.randint(1, size[0])] = rng.randint(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class Served:
    """A uvicorn server on 127.0.0.1 in a thread of this process."""

    def __init__(self, pipe: Pipeline, settings: ServerSettings) -> None:
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(pipe, settings, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


SETTINGS = ServerSettings(options=OPTIONS, max_batch_size=8, max_wait_ms=50, max_queue=64, timeout_s=120,
                          max_upload_bytes=200_000, max_pixels=200 * 200)


@pytest.fixture(scope="module")
def server(pipe) -> Iterator[str]:
    served = Served(pipe, SETTINGS)
    yield served.url
    served.close()


def test_fifty_concurrent_requests_are_batched_and_equal_direct_answers(pipe, server):
    images = [png(seed) for seed in range(5)]
    questions = ["w5 w6", "w7", "w8 w9 w10", "w11", "w12 w13"]
    answers: dict[tuple[str, int, str], str] = {}  # the pipeline's direct answers, one image at a time

    def direct(path: str, k: int, text: str) -> str:
        if (path, k, text) not in answers:
            run = pipe.ask if path == "/v1/ask" else pipe.caption
            answers[path, k, text] = run([decoded(images[k])], [text], OPTIONS)[0]
        return answers[path, k, text]

    jobs: list[tuple[str, dict[str, str], int, str]] = []
    for i in range(50):
        k = i % 5
        if i % 2:
            jobs.append(("/v1/ask", {"question": questions[k]}, k, direct("/v1/ask", k, questions[k])))
        else:
            prompt = "w20 w21" if i % 4 == 0 else ""
            jobs.append(("/v1/caption", {"prompt": prompt} if prompt else {}, k, direct("/v1/caption", k, prompt)))
    assert len({want for *_, want in jobs}) >= 5  # the answers differ, so a mix-up would show

    async def send_all() -> tuple[list[httpx.Response], dict[str, Any], dict[str, Any]]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as client:
            before = (await client.get("/metrics")).json()
            responses = await asyncio.gather(*(
                client.post(path, data=fields, files={"image": (f"{k}.png", images[k], "image/png")})
                for path, fields, k, _ in jobs))
            after = (await client.get("/metrics")).json()
        return list(responses), before, after

    responses, before, after = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 50
    for r, (path, fields, _, want) in zip(responses, jobs):
        body = r.json()
        if path == "/v1/ask":
            assert body == {"question": fields["question"], "answer": want}
        else:
            assert body == {"caption": want}
    assert after["batched_requests"] - before["batched_requests"] == 50
    batches = after["batches"] - before["batches"]
    assert batches < 50 and after["max_batch_size_seen"] > 1
    assert 1 < after["max_batch_size_seen"] <= SETTINGS.max_batch_size
    assert after["responses"]["POST /v1/ask 200"] - before["responses"].get("POST /v1/ask 200", 0) == 25
    assert after["queue_length"] == 0


def truncated_png() -> bytes:
    data = png(7, size=(120, 120))
    return data[: len(data) // 2]


def big_flat_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(buf, format="PNG")  # 90000 pixels in a few hundred bytes
    return buf.getvalue()


BAD_REQUESTS = [
    # (path, form fields, image file or None, status, error message or regex)
    ("/v1/caption", {"prompt": "w5"}, None, 400, "no image: send the file as multipart/form-data field 'image'"),
    ("/v1/caption", {"image": "http://example.com/cat.png"}, None, 400,
     "'image' must be an uploaded file (URLs are not fetched)"),
    ("/v1/caption", {}, b"", 400, "'image' is an empty file"),
    ("/v1/caption", {}, b"hello, not an image", 415,
     "the uploaded file is not an image in an accepted format (PNG, JPEG, WebP, GIF, BMP, TIFF)"),
    ("/v1/caption", {}, truncated_png(), 400,
     re.compile(r"cannot decode the uploaded image: corrupt or truncated image data \(.+\)")),
    ("/v1/caption", {}, big_flat_png(), 413,
     "the uploaded image is too large: 300x300 = 90000 pixels exceeds max_pixels=40000 (decompression bomb guard)"),
    ("/v1/caption", {}, b"\x89PNG" + bytes(250_000), 413, "request body over the limit of 200000 bytes"),
    ("/v1/ask", {}, png(1), 400, "missing form field 'question'"),
    ("/v1/ask", {"question": "w5 " * 400}, png(1), 422, "'question' is 1200 characters, over the limit of 1000"),
    ("/v1/ask", {"question": "w5 " * 100}, png(1), 422,
     "prompt too long: 114 tokens (image, prompt and max_new_tokens=5) exceed the model's max_position_embeddings=64"),
    ("/v1/match", {"text": "w5"}, png(1), 400,
     re.compile(r"image-text matching needs a retrieval checkpoint; this server runs .+")),
]


@pytest.mark.parametrize("path,fields,upload,status,message", BAD_REQUESTS,
                         ids=["no-file", "url", "empty", "not-image", "truncated", "pixels", "body", "no-question",
                              "long-question", "long-prompt", "match-on-captioner"])
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(pipe, server, path, fields, upload, status, message):
    files = {"image": ("x.png", upload, "image/png")} if upload is not None else None
    with httpx.Client(base_url=server, timeout=60) as client:
        r = client.post(path, data=fields, files=files)
        assert r.status_code == status
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert message.fullmatch(error) if isinstance(message, re.Pattern) else error == message
        good = client.post("/v1/caption", files={"image": ("ok.png", png(3), "image/png")})
    assert good.status_code == 200
    assert good.json() == {"caption": pipe.caption([decoded(png(3))], "", OPTIONS)[0]}


def test_streamed_body_over_the_limit_is_refused(server, tiny_model_dir):
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
        for _ in range(30):
            yield b"x" * 10_000

    with httpx.Client(base_url=server, timeout=60) as client:
        r = client.post("/v1/caption", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert (r.status_code, r.json()) == (413, {"error": "request body over the limit of 200000 bytes"})
        assert client.get("/nowhere").json() == {"error": "Not Found"}
        assert client.get("/health").json() == {"status": "ok", "model": os.path.basename(tiny_model_dir),
                                                "kind": "generation", "device": "cpu"}
        metrics = client.get("/metrics").json()
    assert metrics["responses"]["POST /v1/caption 413"] >= 1
    assert metrics["responses"]["GET * 404"] == 1


def test_queue_full_gets_503_and_slow_requests_504(pipe):
    entered, gate = threading.Event(), threading.Event()

    class Slow(Pipeline):
        def generate(self, *args: Any, **kw: Any) -> list[str]:
            entered.set()
            gate.wait(timeout=60)
            return super().generate(*args, **kw)

    settings = ServerSettings(options=OPTIONS, max_batch_size=1, max_wait_ms=0, max_queue=1, timeout_s=1.5)
    served = Served(Slow(pipe.model, pipe.processor, name="slow"), settings)
    image = {"image": ("a.png", png(4), "image/png")}
    try:
        with httpx.Client(base_url=served.url, timeout=60) as client:
            results: dict[str, httpx.Response] = {}

            def post(name: str) -> None:
                results[name] = client.post("/v1/caption", files=image)

            first = threading.Thread(target=post, args=("running",))
            first.start()
            assert entered.wait(timeout=30)  # the first request is in the model
            second = threading.Thread(target=post, args=("waiting",))
            second.start()
            deadline = time.monotonic() + 30
            while client.get("/metrics").json()["queue_length"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            busy = client.post("/v1/caption", files=image)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json() == {"error": "server busy: 1 requests are already waiting (max_queue=1); retry shortly"}
            first.join()
            second.join()
            for name in ("running", "waiting"):
                assert (results[name].status_code, results[name].json()) == (504, {"error": "no answer within 1.5 s"})
            gate.set()
            ok = client.post("/v1/caption", files=image)
            assert ok.json() == {"caption": pipe.caption([decoded(png(4))], "", OPTIONS)[0]}
            metrics = client.get("/metrics").json()
            assert (metrics["rejected_queue_full"], metrics["timeouts"]) == (1, 2)
    finally:
        gate.set()
        served.close()


def test_batcher_groups_by_key_and_limits_the_queue():
    seen: list[tuple[str, list[int]]] = []

    def run(key: Any, items: list[int]) -> list[Any]:
        seen.append((key, items))
        return [ValueError("odd") if x % 2 else x * 10 for x in items]

    async def scenario() -> list[Any]:
        batcher = MicroBatcher(run, max_batch_size=3, max_wait_s=0.2, max_queue=6)
        batcher.start()
        try:
            tasks = [asyncio.ensure_future(batcher.submit(key, x, timeout_s=10))
                     for key, x in [("a", 0), ("b", 2), ("a", 4), ("a", 6), ("a", 8), ("b", 1)]]
            await asyncio.sleep(0)
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            batcher.stop()

    results = asyncio.run(scenario())
    assert results[:5] == [0, 20, 40, 60, 80] and isinstance(results[5], ValueError)
    assert seen == [("a", [0, 4, 6]), ("b", [2, 1]), ("a", [8])]

    async def overflow() -> None:
        batcher = MicroBatcher(run, max_batch_size=1, max_wait_s=0, max_queue=1)  # not started: nothing drains
        first = asyncio.ensure_future(batcher.submit("a", 0, timeout_s=0.2))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match=r"1 requests are already waiting \(max_queue=1\)"):
            await batcher.submit("a", 2, timeout_s=1)
        with pytest.raises(asyncio.TimeoutError):
            await first
        assert batcher.queue_length == 0 and batcher.timeouts == 1

    asyncio.run(overflow())


def test_blip2_serve_command(pipe, tiny_model_dir, tmp_path):
    from test_cli import cli_env

    proc = subprocess.Popen([sys.executable, "-m", "blip2", "serve", "--model", tiny_model_dir, "--device", "cpu",
                             "--port", "0", "--max-new-tokens", "5"], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20):  # the address is announced once the port is bound
            line = proc.stderr.readline()
            match = re.fullmatch(r"blip2 serve: listening on (http://127\.0\.0\.1:\d+/) \(model (.+)\)\n", line)
            if match or not line:
                break
        assert match, line
        url = match.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
                time.sleep(0.05)
        assert health.json() == {"status": "ok", "model": os.path.basename(tiny_model_dir), "kind": "generation",
                                 "device": "cpu"}
        r = httpx.post(url + "v1/ask", data={"question": "w9"}, files={"image": ("a.png", png(2), "image/png")},
                       timeout=60)
        assert r.json() == {"question": "w9", "answer": pipe.ask([decoded(png(2))], ["w9"], OPTIONS)[0]}
        page = httpx.get(url, timeout=5)
        assert page.headers["content-type"].startswith("text/html") and '<input id="file" type="file"' in page.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


def test_match_requests_are_batched_and_equal_direct_scores(tiny_retrieval_dir):
    retrieval = Pipeline.load(tiny_retrieval_dir, device="cpu")
    served = Served(retrieval, ServerSettings(max_batch_size=4, max_wait_ms=100))
    texts = [["w5 w6", "w7"], ["w8 w9 w10"], ["w11", "w12", "w13 w14"]]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            return list(await asyncio.gather(*(
                client.post("/v1/match", data={"text": texts[i % 3]},
                            files={"image": ("m.png", png(20 + i % 3), "image/png")}) for i in range(6))))

    try:
        responses = asyncio.run(send_all())
        for i, r in enumerate(responses):
            want = retrieval.match(decoded(png(20 + i % 3)), texts[i % 3])
            assert r.status_code == 200
            got = r.json()["scores"]
            assert [s["text"] for s in got] == texts[i % 3]
            assert [s["itm"] for s in got] == pytest.approx([s.itm for s in want], abs=1e-5)
            assert [s["itc"] for s in got] == pytest.approx([s.itc for s in want], abs=1e-5)
        with httpx.Client(base_url=served.url, timeout=60) as client:
            assert client.get("/metrics").json()["max_batch_size_seen"] > 1
            wrong = client.post("/v1/caption", files={"image": ("m.png", png(1), "image/png")})
            assert wrong.status_code == 400
            assert wrong.json()["error"].startswith("text generation needs a captioning checkpoint; this server runs ")
    finally:
        served.close()


@pytest.mark.parametrize("change,message", [
    ({"max_wait_ms": float("inf")}, "max_wait_ms must be finite and at least 0, got inf"),
    ({"timeout_s": 0}, "timeout_s must be finite and positive, got 0"),
    ({"header_timeout_s": float("nan")}, "header_timeout_s must be finite and positive, got nan"),
    ({"max_connections": 0}, "max_connections must be a whole number of at least 1, got 0"),
    ({"max_decodes": 1.5}, "max_decodes must be a whole number of at least 1, got 1.5"),
    ({"max_aspect": 0.5}, "max_aspect must be at least 1, got 0.5"),
    ({"prefix_cache_mb": -1}, "prefix_cache_mb must be finite and at least 0, got -1"),
])
def test_settings_name_what_is_wrong(change, message):
    with pytest.raises(ValueError) as info:
        ServerSettings(**change)
    assert str(info.value) == message
