"""The HTTP server (FastAPI on uvicorn): the BLIP-2 API of ``routes.py``, plus health, metrics and a web page.

    GET  /health  -> {"status": "ok", ...}      GET /metrics -> counters and batch sizes      GET / -> the page

Images arrive as uploads only: the server never fetches a URL. Every error is ``{"error": "..."}``: 4xx for
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
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from blip2.apps.pipeline import Pipeline, PipelineError
from blip2.apps.server import routes
from blip2.apps.server.batcher import QueueFull, ShuttingDown
from blip2.apps.server.guard import Guard, guarded_protocol
from blip2.apps.server.service import ApiError, ServerSettings, Service

def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def _add_error_handlers(app: FastAPI, timeout_s: float) -> None:
    """Every error answers ``{"error": message}`` with its status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, str(e))

    @app.exception_handler(HTTPException)  # 404, 405, malformed multipart bodies
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(PipelineError)
    async def _pipeline_error(request: Request, e: PipelineError) -> JSONResponse:
        return _error(422, str(e))

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, e: QueueFull) -> JSONResponse:
        return _error(503, f"server busy: {e}; retry shortly", **{"Retry-After": "1"})

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request: Request, e: ShuttingDown) -> JSONResponse:
        return _error(503, str(e))

    @app.exception_handler(asyncio.TimeoutError)
    async def _timeout(request: Request, e: asyncio.TimeoutError) -> JSONResponse:
        return _error(504, f"no answer within {timeout_s:g} s")

    @app.exception_handler(Exception)  # a fault of ours: the log has the traceback, the client a JSON line
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(e).__name__}); the server's log has the details")


def create_app(pipe: Pipeline, settings: ServerSettings = ServerSettings()) -> FastAPI:
    service = Service(pipe, settings)
    counts: Counter[str] = Counter()
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app, settings.timeout_s)
    routes.add_routes(app, service)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_name, "kind": "retrieval" if pipe.is_retrieval else "generation",
                "device": str(pipe.device)}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics() -> dict[str, Any]:
        return {"responses": dict(sorted(counts.items())), **service.stats()}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index() -> str:
        return page

    app.add_middleware(Guard, max_bytes=settings.max_upload_bytes, counts=counts,
                       paths=frozenset(route.path for route in app.routes), allow_origins=settings.allow_origins)
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
