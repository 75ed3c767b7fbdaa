"""The HTTP server (FastAPI on uvicorn): the BLIP-2 API of ``routes.py``, plus health, metrics and a web page.

    GET  /health  -> {"status": "ok", ...}      GET /metrics -> counters and batch sizes      GET / -> the page
    /v1/chat/completions, /v1/completions, /v1/models: the OpenAI-compatible API of ``openai.py``
    GET /metrics?format=prometheus (or Accept: text/plain): the same in Prometheus' text format

Images arrive as uploads (the OpenAI routes: data URLs); the server fetches no URL unless told to. Every error is
``{"error": "..."}`` (OpenAI's shape on its routes): 4xx for
what a client sent (413 too large, 415 not an accepted image, 400 unreadable or missing, 422 text the model
cannot take, 403 a POST from another site's page), 503 when the queue is full, 504 past the time limit, and
500 only for a fault of the server's own. ``create_app`` wires the parts: ``service.Service`` (what routes
share), ``guard`` (limits before the routes), and each module of routes (``add_routes(app, service)``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from blip2.apps.pipeline import Pipeline, PipelineError
from blip2.apps.server import openai, routes
from blip2.apps.server.batcher import QueueFull, ShuttingDown
from blip2.apps.server.guard import Guard, guarded_protocol
from blip2.apps.server.metrics import Histogram
from blip2.apps.server.service import ApiError, ServerSettings, Service, api_error

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

def _body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The error body: OpenAI's shape on the OpenAI routes, ``{"error": message}`` elsewhere."""
    return openai.error_body(status, message, param, code) if path in openai.PATHS else {"error": message}


def _add_error_handlers(app: FastAPI, timeout_s: float) -> None:
    """Every error answers a JSON body (``_body``) with its status; see ``service.api_error``."""

    @app.exception_handler(HTTPException)  # 404, 405, malformed multipart bodies
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(_body(request.url.path, e.status_code, str(e.detail)), e.status_code)

    async def _error(request: Request, e: Exception) -> JSONResponse:
        error = api_error(e, timeout_s)
        headers = {"Retry-After": "1"} if isinstance(e, QueueFull) else None
        return JSONResponse(_body(request.url.path, error.status, str(error), error.param, error.code), error.status,
                            headers=headers)

    # the errors a request can meet, answered where they are raised; Exception (a fault of ours) also reaches the
    # log with its traceback
    for kind in (ApiError, PipelineError, QueueFull, ShuttingDown, asyncio.TimeoutError, Exception):
        app.add_exception_handler(kind, _error)


def create_app(pipe: Pipeline, settings: ServerSettings = ServerSettings()) -> FastAPI:
    service = Service(pipe, settings)
    counts: Counter[str] = Counter()
    latency: dict[str, Histogram] = {}
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app, settings.timeout_s)
    routes.add_routes(app, service)
    openai.add_routes(app, service)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "kind": "retrieval" if pipe.is_retrieval else "generation",
                "device": str(pipe.device)}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics(request: Request) -> Any:
        accept = request.headers.get("accept", "")
        if request.query_params.get("format") == "prometheus" or ("text/plain" in accept and "json" not in accept):
            return PlainTextResponse(service.prometheus(counts, latency), media_type=PROMETHEUS_TYPE)
        return {"responses": dict(sorted(counts.items())), **service.stats()}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index() -> str:
        return page

    app.add_middleware(Guard, max_bytes=settings.max_upload_bytes, counts=counts,
                       paths=frozenset(route.path for route in app.routes), allow_origins=settings.allow_origins,
                       latency=latency, error_body=_body)
    return app


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); OSError naming the address otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def uvicorn_config(pipe: Pipeline, settings: ServerSettings, log_level: str = "info") -> Any:
    """The uvicorn.Config that serves ``create_app(pipe, settings)`` with the settings' connection limits."""
    import uvicorn

    return uvicorn.Config(create_app(pipe, settings), log_level=log_level, timeout_keep_alive=settings.keep_alive_s,
                          http=guarded_protocol(settings.max_connections, settings.header_timeout_s))


def run_server(pipe: Pipeline, settings: ServerSettings, sock: socket.socket) -> None:
    """Serve on the bound socket until interrupted; the first line on stderr gives the address."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"blip2 serve: listening on http://{url_host}:{port}/ (model {pipe.name})", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(pipe, settings)).run(sockets=[sock])
