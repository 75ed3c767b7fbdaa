"""The server's edges: connections that never finish their headers are closed, open connections are limited,
/metrics labels cannot grow without bound, HEAD works on GET routes, no response shows the server's paths, and
POSTs from another site's page are refused unless its origin is allowed."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
httpx = pytest.importorskip("httpx")

from blip2.apps.cli import build_parser
from blip2.apps.pipeline import Pipeline
from blip2.apps.server import ServerSettings
from hostile import eps
from test_server import OPTIONS, Served, png

QUICK = ServerSettings(options=OPTIONS, header_timeout_s=0.5, keep_alive_s=0.5, max_connections=4)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> Pipeline:
    return Pipeline.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def served(pipe) -> Iterator[Served]:
    server = Served(pipe, QUICK)
    yield server
    server.close()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def closed_after(sock: socket.socket, send: list[bytes] = (), every_s: float = 0.1) -> float:
    """Seconds until the server closes ``sock``, sending ``send`` one piece every ``every_s`` meanwhile."""
    start = time.monotonic()
    sock.settimeout(every_s)
    pieces = list(send)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except socket.timeout:
            pass
        except ConnectionResetError:
            return time.monotonic() - start
        if pieces:
            try:
                sock.sendall(pieces.pop(0))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - start
        assert time.monotonic() - start < 10, "the connection was held"


def test_connections_that_do_not_finish_their_headers_are_closed(served):
    with connect(served.url) as silent:
        assert 0.4 < closed_after(silent) < 2  # header_timeout_s = 0.5, from the connection
    with connect(served.url) as partial:
        partial.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\n")
        assert 0.4 < closed_after(partial) < 2
    with connect(served.url) as trickle:  # a byte at a time does not restart the clock
        header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        assert 0.4 < closed_after(trickle, [bytes([b]) for b in header], every_s=0.05) < 2


def test_an_idle_keep_alive_connection_and_an_unread_body_are_closed(served):
    with connect(served.url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert 0.3 < closed_after(sock) < 2  # keep_alive_s = 0.5
    with connect(served.url) as sock:  # a body trickled to a route that does not read it
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
        assert sock.recv(65536).startswith(b"HTTP/1.1 404 Not Found")
        assert closed_after(sock, [b"x"] * 200, every_s=0.05) < 2
    assert httpx.get(served.url + "/health").status_code == 200


def test_open_connections_are_limited(pipe):
    server = Served(pipe, ServerSettings(options=OPTIONS, max_connections=3, header_timeout_s=30))
    held = [connect(server.url) for _ in range(3)]
    try:
        time.sleep(0.2)  # the server has accepted them
        with connect(server.url) as extra:
            answer = read_all(extra)
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable") and b"retry-after: 1" in head
        assert body == b'{"error": "too many open connections (max_connections=3); retry shortly"}'
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # once the server has seen the close, a new client is served
            try:
                r = httpx.get(server.url + "/health", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
        server.close()


def test_malformed_requests_get_a_json_400(served):
    with connect(served.url) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        head, body = read_all(sock).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400 Bad Request") and b"content-type: application/json" in head
    assert body == b'{"error": "invalid HTTP request (malformed, or headers too long)"}'


def test_metrics_labels_are_bounded_and_head_works_on_get_routes(served):
    with httpx.Client(base_url=served.url, timeout=30) as client:
        before = client.get("/metrics").json()["responses"]
        for k in range(30):
            assert client.request(f"METHOD{k}", "/health").status_code == 405
        for path in ("/health", "/metrics", "/"):
            get, head = client.get(path), client.head(path)
            assert (head.status_code, head.content) == (200, b"")
            assert head.headers["content-type"] == get.headers["content-type"]
        after = client.get("/metrics").json()["responses"]
    new = {key: n - before.get(key, 0) for key, n in after.items() if n != before.get(key, 0)}
    assert {key: n for key, n in new.items() if not key.startswith("GET ")} == {
        "OTHER /health 405": 30, "HEAD /health 200": 1, "HEAD /metrics 200": 1, "HEAD / 200": 1}


def test_no_response_shows_the_server_s_paths(served, tiny_model_dir):
    with httpx.Client(base_url=served.url, timeout=60) as client:
        health = client.get("/health").json()
        assert health["model"] == os.path.basename(tiny_model_dir) and not os.path.isabs(health["model"])
        bodies = [client.get("/nowhere").text, client.delete("/health").text, health.__repr__(),
                  client.post("/v1/caption", files={"image": ("x.eps", eps(), "image/png")}).text,
                  client.post("/v1/caption", data={"prompt": "w5 " * 200}, files={"image": ("x.png", png(1))}).text,
                  client.post("/v1/match", data={"text": "w5"}, files={"image": ("x.png", png(1))}).text]
    for body in bodies:
        assert tiny_model_dir not in body and "/tmp" not in body, body
    assert bodies[-1] == ('{"error":"image-text matching needs a retrieval checkpoint; this server runs '
                          f'{os.path.basename(tiny_model_dir)}"}}')


def caption_from(url: str, origin: str | None) -> httpx.Response:
    headers = {"Origin": origin} if origin is not None else {}
    return httpx.post(url + "/v1/caption", files={"image": ("x.png", png(2), "image/png")}, headers=headers,
                      timeout=60)


def test_cross_origin_posts_are_refused_unless_allowed(pipe, served):
    ran = httpx.get(served.url + "/metrics").json()["batched_requests"]
    for origin in ("http://evil.example", "null", served.url.replace("127.0.0.1", "localhost")):
        r = caption_from(served.url, origin)
        assert (r.status_code, r.json()) == (403, {"error": f"cross-origin request from {origin} refused; start the "
                                                            "server with --allow-origin ORIGIN to accept that site"})
    assert httpx.get(served.url + "/metrics").json()["batched_requests"] == ran  # the model never saw them
    same = caption_from(served.url, served.url)  # the server's own page
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers
    assert caption_from(served.url, None).status_code == 200  # scripts and curl send no Origin
    page = httpx.get(served.url + "/health", headers={"Origin": "http://evil.example"})
    assert page.status_code == 200 and "access-control-allow-origin" not in page.headers

    allowing = Served(pipe, ServerSettings(options=OPTIONS, allow_origins=("http://good.example",)))
    try:
        good = caption_from(allowing.url, "http://good.example")
        assert good.status_code == 200 and good.json() == same.json()
        assert (good.headers["access-control-allow-origin"], good.headers["vary"]) == ("http://good.example", "Origin")
        assert caption_from(allowing.url, "http://evil.example").status_code == 403
    finally:
        allowing.close()


def test_the_command_line_sets_the_connection_limit_and_allowed_origins():
    args = build_parser().parse_args(["serve", "--max-connections", "9", "--allow-origin", "https://a.example",
                                      "--allow-origin", "http://b.example:8080"])
    assert (args.max_connections, args.allow_origin) == (9, ["https://a.example", "http://b.example:8080"])
    defaults = build_parser().parse_args(["serve"])
    assert (defaults.max_connections, defaults.allow_origin) == (ServerSettings().max_connections, [])
