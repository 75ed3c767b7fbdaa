"""The HTTP JSON API (FastAPI): caption, VQA and match on uploaded images, plus health, metrics and a web page.

    POST /v1/caption   multipart: image (file), prompt (optional)  -> {"caption": "..."}
    POST /v1/ask       multipart: image (file), question           -> {"question": "...", "answer": "..."}
    POST /v1/match     multipart: image (file), text (repeatable)  -> {"scores": [{"text", "itm", "itc"}, ...]}
    GET  /health  -> {"status": "ok", ...}      GET /metrics -> counters and batch sizes      GET / -> the page

Images arrive as uploads only: the server never fetches a URL. Errors are ``{"error": "..."}`` with a
4xx code (413 too large, 415 not an image, 400 unreadable or missing, 422 bad text), 503 when the
queue is full, 504 past the time limit.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from blip2.apps.pipeline import GenerationOptions, Pipeline, PipelineError, question_prompt
from blip2.apps.server.batcher import MicroBatcher, QueueFull, ShuttingDown

MAX_TEXT_CHARS = 1000
MAX_MATCH_TEXTS = 64


@dataclass(frozen=True)
class ServerSettings:
    options: GenerationOptions = field(default_factory=GenerationOptions)  # decoding, the same for every request
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64
    timeout_s: float = 60.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # width x height, checked from the header before decoding

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_upload_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError("max_wait_ms must be at least 0 and timeout_s positive")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded file as an RGB image (EXIF orientation applied); ApiError with the HTTP status otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:  # before decoding: a decompression bomb stops here
                raise ApiError(413, f"image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                                    f"over the limit of {max_pixels}")
            image.load()  # truncated data fails here
            return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ApiError(415, "the uploaded file is not an image (PIL cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ApiError(400, f"cannot decode the image: corrupt or truncated ({e})") from None


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: refuses bodies over ``max_bytes`` (by Content-Length, and while streaming) with 413,
    and counts responses by path and status for /metrics."""

    def __init__(self, app: Any, max_bytes: int, counts: Counter[str], paths: frozenset[str]) -> None:
        self.app, self.max_bytes, self.counts, self.paths = app, max_bytes, counts, paths

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        received = 0

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
            await send(message)

        too_large = JSONResponse({"error": f"request body over the limit of {self.max_bytes} bytes"}, 413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        try:
            if length.isdigit() and int(length) > self.max_bytes:
                await too_large(scope, receive, counting_send)
            else:
                await self.app(scope, limited_receive, counting_send)
        except _BodyTooLarge:
            await too_large(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in self.paths else "*"  # unknown paths share one counter
            self.counts[f"{scope['method']} {path} {status}"] += 1


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


async def _read_form(request: Request) -> FormData:
    return await request.form(max_files=1, max_fields=MAX_MATCH_TEXTS + 8)


async def _read_image(form: FormData, pipe: Pipeline, max_pixels: int) -> torch.Tensor:
    """The uploaded ``image`` field, decoded and preprocessed off the event loop: pixel_values [3, H, W]."""
    upload = form.get("image")
    if upload is None:
        raise ApiError(400, "no image: send the file as multipart/form-data field 'image'")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "'image' must be an uploaded file (URLs are not fetched)")
    data = await upload.read()
    if not data:
        raise ApiError(400, "'image' is an empty file")

    def prepare() -> torch.Tensor:
        return pipe.preprocess([decode_image(data, max_pixels)])[0]

    return await run_in_threadpool(prepare)


def _read_text(form: FormData, name: str, required: bool) -> str:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError(400, f"missing form field '{name}'")
        return ""
    if not isinstance(value, str):
        raise ApiError(422, f"'{name}' must be a text field, not a file")
    if len(value) > MAX_TEXT_CHARS:
        raise ApiError(422, f"'{name}' is {len(value)} characters, over the limit of {MAX_TEXT_CHARS}")
    return value.strip()


def create_app(pipe: Pipeline, settings: ServerSettings = ServerSettings()) -> FastAPI:
    def run_batch(key: Hashable, items: list[Any]) -> list[Any]:
        if key == "match":
            return pipe.match_many(items)
        pixels = torch.stack([px for px, _ in items])
        return pipe.generate(pixels, [prompt for _, prompt in items], settings.options)

    batcher = MicroBatcher(run_batch, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue)
    counts: Counter[str] = Counter()
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, max_bytes=settings.max_upload_bytes, counts=counts,
                       paths=frozenset({"/", "/health", "/metrics", "/v1/caption", "/v1/ask", "/v1/match"}))

    _add_error_handlers(app, settings.timeout_s)

    def needs(retrieval: bool) -> None:
        if retrieval != pipe.is_retrieval:
            what = "image-text matching needs a retrieval" if retrieval else "text generation needs a captioning"
            raise ApiError(400, f"{what} checkpoint; this server runs {pipe.name or 'another kind of model'}")

    async def generate(form: FormData, prompt: str) -> str:
        needs(retrieval=False)
        pipe.check_prompt(prompt, settings.options)
        pixels = await _read_image(form, pipe, settings.max_pixels)
        return await batcher.submit("generate", (pixels, prompt), settings.timeout_s)

    @app.post("/v1/caption")
    async def caption(request: Request) -> dict[str, str]:
        form = await _read_form(request)
        return {"caption": await generate(form, _read_text(form, "prompt", required=False))}

    @app.post("/v1/ask")
    async def ask(request: Request) -> dict[str, str]:
        form = await _read_form(request)
        question = _read_text(form, "question", required=True)
        return {"question": question, "answer": await generate(form, question_prompt(question))}

    @app.post("/v1/match")
    async def match(request: Request) -> dict[str, Any]:
        needs(retrieval=True)
        form = await _read_form(request)
        texts = form.getlist("text")
        if not texts:
            raise ApiError(400, "missing form field 'text' (repeat it for several texts)")
        if len(texts) > MAX_MATCH_TEXTS or not all(isinstance(t, str) and 0 < len(t) <= MAX_TEXT_CHARS for t in texts):
            raise ApiError(422, f"'text': 1 to {MAX_MATCH_TEXTS} non-empty texts of at most {MAX_TEXT_CHARS} characters")
        pixels = await _read_image(form, pipe, settings.max_pixels)
        scores = await batcher.submit("match", (pixels, texts), settings.timeout_s)
        return {"scores": [{"text": s.text, "itm": s.itm, "itc": s.itc} for s in scores]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": pipe.name, "kind": "retrieval" if pipe.is_retrieval else "generation",
                "device": str(pipe.device)}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {"responses": dict(sorted(counts.items())), **batcher.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

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


def run_server(pipe: Pipeline, settings: ServerSettings, sock: socket.socket) -> None:
    """Serve on the bound socket until interrupted; the first line on stderr gives the address."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if sock.family == socket.AF_INET6 else host
    print(f"blip2 serve: listening on http://{url_host}:{port}/ (model {pipe.name})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, settings), log_level="info"))
    server.run(sockets=[sock])
