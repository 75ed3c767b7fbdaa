"""What stands between the network and the routes.

- ``Guard`` (ASGI middleware): refuses bodies over the size limit and cross-origin POSTs, and counts
  responses for /metrics under a bounded set of labels.
- ``guarded_protocol`` (uvicorn's h11 protocol, extended): a limit on open connections, a time limit for a
  request's headers (and for a body left unread after the response), malformed requests answered in JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from fastapi.responses import JSONResponse

from blip2.apps.server.metrics import LATENCY_BOUNDS, Histogram

# Methods counted under their own name in /metrics; any other name counts as OTHER, so a client inventing
# method names cannot grow the counters without bound.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _BodyTooLarge(Exception):
    pass


def cross_origin(scope: dict) -> str | None:
    """The ``Origin`` of a request sent by another site's page (browsers send it with every POST), else None.

    A request without ``Origin`` (curl, scripts) or from the server's own page (origin == scheme://host) is not
    cross-origin."""
    headers = dict(scope["headers"])
    origin = headers.get(b"origin")
    if origin is None:
        return None
    origin_text = origin.decode("latin-1")
    own = f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1')}"
    return None if origin_text.lower() == own.lower() else origin_text


class Guard:
    """ASGI middleware: refuses bodies over ``max_bytes`` (by Content-Length, and while streaming) with 413, and
    POSTs from another site's page with 403 unless its origin is in ``allow_origins`` ("*": any); counts
    responses by method, path (``paths``, else "*") and status."""

    def __init__(self, app: Any, max_bytes: int, counts: Counter[str], paths: frozenset[str],
                 allow_origins: Collection[str] = (), latency: dict[str, Histogram] | None = None,
                 error_body: Callable[[str, int, str], dict] = lambda path, status, message: {"error": message}
                 ) -> None:
        self.app, self.max_bytes, self.counts, self.paths = app, max_bytes, counts, paths
        self.allow_origins = frozenset(allow_origins)
        self.latency = latency if latency is not None else {}  # path -> seconds per request, for /metrics
        self.error_body = error_body  # (path, status, message) -> the JSON body of an error

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        received = 0
        started = time.monotonic()
        origin = cross_origin(scope)
        allowed = origin is not None and ("*" in self.allow_origins or origin in self.allow_origins)

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge
            return message

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if allowed:  # the allowed site's scripts may read the answer
                    headers = [*message.get("headers", []), (b"access-control-allow-origin", origin.encode("latin-1")),
                               (b"vary", b"Origin")]
                    message = {**message, "headers": headers}
            await send(message)

        too_large = JSONResponse(self.error_body(scope["path"], 413, f"request body over the limit of {self.max_bytes} "
                                                                     "bytes"), 413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        try:
            if origin is not None and not allowed and scope["method"] not in SAFE_METHODS:
                refused = JSONResponse(self.error_body(scope["path"], 403, f"cross-origin request from {origin[:200]} "
                                                       "refused; start the server with --allow-origin ORIGIN to accept "
                                                       "that site"), 403)
                await refused(scope, receive, counting_send)
            elif length.isdigit() and int(length) > self.max_bytes:
                await too_large(scope, receive, counting_send)
            else:
                await self.app(scope, limited_receive, counting_send)
        except _BodyTooLarge:
            await too_large(scope, receive, counting_send)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            path = scope["path"] if scope["path"] in self.paths else "*"  # unknown paths share one counter
            self.counts[f"{method} {path} {status}"] += 1
            histogram = self.latency.get(path)
            if histogram is None:  # made once per path, not per request
                histogram = self.latency.setdefault(path, Histogram(LATENCY_BOUNDS))
            histogram.observe(time.monotonic() - started)


def _raw_json(status: str, error: str, *headers: str) -> bytes:
    body = json.dumps({"error": error}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}", *headers,
            "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a limit of ``max_connections`` open connections (one more is answered 503 and
    closed before its request is read) and ``header_timeout_s`` to send a request's headers, counted from the
    connection or from the request's first byte (so a client that trickles headers, or a body nobody reads any
    more, cannot hold a connection); malformed requests get a JSON 400."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    busy = _raw_json("503 Service Unavailable", f"too many open connections (max_connections={max_connections}); "
                     "retry shortly", "retry-after: 1")

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_raw_json("400 Bad Request", "invalid HTTP request (malformed, or headers too long)"))
            self.transport.close()

        def _watch(self) -> None:
            """The timer runs while the client owes us headers, or a body that no handler reads any more."""
            state = self.conn.their_state
            unread_body = state is h11.SEND_BODY and (self.cycle is None or self.cycle.response_complete)
            if (state is h11.IDLE and self.timeout_keep_alive_task is None) or unread_body:
                self._arm()
            else:
                self._disarm()

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
