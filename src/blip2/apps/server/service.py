"""What every route shares: the settings, the pipeline, the micro-batcher, and the intake of one request.

A request's work runs under one deadline (``--timeout`` from the handler's start): reading its form,
decoding its image, waiting in the queue and running in the model. Images are decoded by at most
``max_decodes`` threads; the images waiting for them count against ``max_queue`` like the requests
waiting for the model, so a flood of uploads is refused (503) before it costs memory. Each request's
text is checked on its own before it joins a batch, so no request can fail the others batched with it.

A module of routes takes the app and this object: ``add_routes(app: FastAPI, service: Service)``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
from collections.abc import Awaitable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from blip2.apps.pipeline import GenerationOptions, Pipeline, PipelineError
from blip2.apps.server.batcher import MicroBatcher, QueueFull, ShuttingDown
from blip2.apps.server.engine import ContinuousBatcher, unsupported
from blip2.apps.server.imagecache import ImageCache
from blip2.apps.server.metrics import Histogram, prometheus_text
from blip2.apps.server.prefixcache import PrefixCache
from blip2.apps.server.requests import Event, Failed, GenRequest, Sampling, TextStream, eos_ids, replay
from blip2.fast.lazy import lay_out
from blip2.images import (DEFAULT_MAX_ASPECT, DEFAULT_MAX_SIDE, ImageLimits, ImageLoadError, ImageTooLarge,
                          UnsupportedImage, read_image)

MAX_TEXT_CHARS = 1000
MAX_MATCH_TEXTS = 64
SCHEDULERS = ("continuous", "micro")

T = TypeVar("T")
log = logging.getLogger("blip2.apps.server")


@dataclass(frozen=True)
class ServerSettings:
    options: GenerationOptions = field(default_factory=GenerationOptions)  # decoding, the same for every request
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_queue: int = 64  # requests waiting for the model or for an image decoder
    timeout_s: float = 60.0  # per request, from its handler's start to its answer
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000  # width x height, checked from the header before decoding
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_decodes: int = 2  # images decoded at once
    reduce_images: bool = True  # decode large images near twice the model's input size (see images.read_image)
    max_connections: int = 256
    header_timeout_s: float = 10.0  # to send a request's headers
    keep_alive_s: float = 5.0  # an idle connection's life between requests
    allow_origins: tuple[str, ...] = ()  # sites whose pages may POST here ("*": any); the server's own page may
    scheduler: str = "continuous"  # of the OpenAI endpoints: "continuous" (engine.py) or "micro" (batcher.py)
    image_cache: int = 64  # images whose vision output the continuous scheduler keeps (0: none)
    prefix_cache_mb: float = 512.0  # OPT keys and values of finished rows the continuous scheduler keeps (0: none)
    fetch_images: bool = False  # the OpenAI endpoints may fetch http(s) image URLs (off: data URLs only)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_upload_bytes", "max_pixels", "max_side", "max_decodes",
                     "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        for name in ("max_wait_ms", "timeout_s", "max_aspect", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (value == 0 and name != "max_wait_ms"):
                low = "at least 0" if name == "max_wait_ms" else "positive"
                raise ValueError(f"{name} must be finite and {low}, got {value!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not isinstance(self.image_cache, int) or self.image_cache < 0:
            raise ValueError(f"image_cache must be a whole number of at least 0, got {self.image_cache!r}")
        if not math.isfinite(self.prefix_cache_mb) or self.prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be finite and at least 0, got {self.prefix_cache_mb!r}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be at least 1, got {self.max_aspect!r}")


class ApiError(Exception):
    """A request refused with ``status`` and ``{"error": message}`` (the OpenAI routes: ``{"error": {"message",
    "type", "param", "code"}}``, where ``param`` names the field at fault and ``code`` is a short reason)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def api_error(e: BaseException, timeout_s: float) -> ApiError:
    """What a request's error answers: a client's mistake 4xx, a full queue or shutdown 503, the time limit 504,
    anything else 500 (a fault of the server's own: its log has the traceback, the client a line)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PipelineError):
        return ApiError(422, str(e))
    if isinstance(e, QueueFull):
        return ApiError(503, f"server busy: {e}; retry shortly", code="overloaded")
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e))
    if isinstance(e, asyncio.TimeoutError):  # the builtin TimeoutError from Python 3.11
        return ApiError(504, f"no answer within {timeout_s:g} s", code="timeout")
    return ApiError(500, f"internal error ({type(e).__name__}); the server's log has the details")


def public_name(name: str) -> str:
    """A model's name as the server shows it: a local directory's last component (the server's file system stays
    private), a Hub id as given."""
    if os.path.isabs(name) or os.path.exists(name):
        return os.path.basename(os.path.normpath(name))
    return name


def read_text(form: FormData, name: str, required: bool) -> str:
    """A text field, stripped; "" when absent and not required."""
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


class Service:
    def __init__(self, pipe: Pipeline, settings: ServerSettings) -> None:
        self.pipe, self.settings = pipe, settings
        self.model_name = public_name(pipe.name)
        self.batcher = MicroBatcher(self._run_batch, settings.max_batch_size, settings.max_wait_ms / 1000,
                                    settings.max_queue)
        self.limits = ImageLimits(max_pixels=settings.max_pixels, max_side=settings.max_side,
                                  max_aspect=settings.max_aspect)
        size = pipe.processor.image_processor.size
        self.reduce_to = (2 * size["width"], 2 * size["height"]) if settings.reduce_images else None
        self.decoding = 0  # images queued for or inside a decoder thread (touched on the event loop only)
        self.engine: ContinuousBatcher | None = None
        self.eos = set() if pipe.is_retrieval else eos_ids(pipe.model)
        if not pipe.is_retrieval:  # "auto" laid out before the first request, not at the second (the engine
            lay_out(pipe.model)  # steps the language model itself, and would never lay it out)
        if settings.scheduler == "continuous" and not pipe.is_retrieval:
            reason = unsupported(pipe.model)
            if reason is None:
                self.engine = ContinuousBatcher(pipe, settings.max_batch_size, settings.max_queue,
                                                image_cache=ImageCache(settings.image_cache),
                                                prefix_cache=PrefixCache(int(settings.prefix_cache_mb * 2**20)))
            else:
                log.warning("the OpenAI endpoints use micro-batching: %s", reason)
        self._decoder: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self.batcher.start()
        if self.engine is not None:
            self.engine.start()
        self._decoder = ThreadPoolExecutor(self.settings.max_decodes, thread_name_prefix="blip2-decode")

    def stop(self) -> None:
        self.batcher.stop()
        if self.engine is not None:
            self.engine.stop()
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)

    def _run_batch(self, key: Hashable, items: list[Any]) -> list[Any]:
        if key == "match":
            return self.pipe.match_many(items)
        if isinstance(key, Sampling):
            return self._run_requests(key, items)
        pixels = torch.stack([px for px, _ in items])
        return self.pipe.generate(pixels, [prompt for _, prompt in items], self.settings.options)

    # -- one request, under its deadline -------------------------------------------------------------

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.timeout_s

    async def within(self, deadline: float, work: Awaitable[T]) -> T:
        """``work``'s result; asyncio.TimeoutError (504) once ``deadline`` (event-loop time) has passed."""
        return await asyncio.wait_for(work, deadline - asyncio.get_running_loop().time())

    async def read_form(self, request: Request, deadline: float) -> FormData:
        async def read() -> FormData:
            return await request.form(max_files=1, max_fields=MAX_MATCH_TEXTS + 8)

        return await self.within(deadline, read())

    def needs(self, retrieval: bool) -> None:
        if retrieval != self.pipe.is_retrieval:
            what = "image-text matching needs a retrieval" if retrieval else "text generation needs a captioning"
            raise ApiError(400, f"{what} checkpoint; this server runs {self.model_name or 'another kind of model'}")

    async def generate(self, form: FormData, prompt: str, deadline: float) -> str:
        """The model's text for the form's image after ``prompt``; the prompt is checked before the image is read."""
        self.needs(retrieval=False)
        self.pipe.check_prompt(prompt, self.settings.options)  # PipelineError: 422
        pixels = await self.image(form, deadline)
        return await self.run("generate", (pixels, prompt), deadline)

    async def match(self, form: FormData, texts: list[str], deadline: float) -> list[Any]:
        """MatchScores of the form's image with each of ``texts``, checked before the image is read."""
        self.needs(retrieval=True)
        self.pipe.check_texts(texts)  # PipelineError: 422
        pixels = await self.image(form, deadline)
        return await self.run("match", (pixels, texts), deadline)

    async def run(self, key: Hashable, item: Any, deadline: float) -> Any:
        """``item`` through the model in a batch of requests of the same ``key``."""
        return await self.batcher.submit(key, item, deadline - asyncio.get_running_loop().time())

    async def image(self, form: FormData, deadline: float) -> torch.Tensor:
        """The uploaded ``image`` field decoded and preprocessed in a decoder thread: pixel_values [3, H, W]."""
        upload = form.get("image")
        if upload is None:
            raise ApiError(400, "no image: send the file as multipart/form-data field 'image'")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "'image' must be an uploaded file (URLs are not fetched)")
        data = await upload.read()
        if not data:
            raise ApiError(400, "'image' is an empty file")
        return await self.decode(data, deadline)

    async def decode(self, data: bytes, deadline: float, queue: Any = None, source: str = "uploaded") -> torch.Tensor:
        """Image file bytes decoded and preprocessed in a decoder thread: pixel_values [3, H, W]. The images
        waiting for a decoder count against ``queue``'s limit (the micro-batcher's unless given); ``source``
        says in an error where the bytes came from ("uploaded", "fetched")."""
        (queue or self.batcher).admit(waiting_elsewhere=self.decoding)
        assert self._decoder is not None, "the service is not started"
        loop = asyncio.get_running_loop()
        job = self._decoder.submit(self._prepare, data, source)
        self.decoding += 1
        job.add_done_callback(lambda _: _call_soon(loop, self._decoded))  # also when cancelled before it ran
        return await self.within(deadline, asyncio.wrap_future(job))

    def _decoded(self) -> None:
        self.decoding -= 1

    def _prepare(self, data: bytes, source: str = "uploaded") -> torch.Tensor:
        try:
            image = read_image(io.BytesIO(data), None, self.limits, self.reduce_to)
        except UnsupportedImage as e:
            raise ApiError(415, f"the {source} file is {e.reason}") from None
        except ImageTooLarge as e:
            raise ApiError(413, f"the {source} image is too large: {e.reason}") from None
        except ImageLoadError as e:
            raise ApiError(400, f"cannot decode the {source} image: {e.reason}") from None
        return self.pipe.preprocess([image])[0]

    # -- the OpenAI endpoints' generation -------------------------------------------------------------

    @property
    def queue(self) -> Any:
        """Where the OpenAI endpoints' requests wait: the continuous scheduler, or the micro-batcher."""
        return self.engine or self.batcher

    async def submit(self, request: GenRequest, deadline: float) -> None:
        """Start ``request``; its events come through ``request.emit``. QueueFull/ShuttingDown at once."""
        if self.engine is not None:
            self.engine.submit(request)
            return
        self.batcher.admit()

        async def run() -> None:
            try:
                key = replace(request.sampling, max_new_tokens=0, stop=())  # what a batch must share
                for event in await self.run(key, request, deadline):
                    request.emit(event)
            except Exception as e:  # the route turns it into its error
                request.emit(Failed(e))

        task = asyncio.get_running_loop().create_task(run())
        request.extra["task"] = task  # a reference, so the task is not collected while it runs

    def cancel(self, request: GenRequest) -> None:
        request.cancelled = True
        if self.engine is not None:
            self.engine.wake()
        elif "task" in request.extra:
            request.extra["task"].cancel()

    def _run_requests(self, key: Sampling, requests: list[GenRequest]) -> list[list[Event]]:
        """Micro-batching: the batch runs to its longest ``max_new_tokens``; each request keeps its own."""
        longest = max(r.sampling.max_new_tokens for r in requests)
        n = 1 if key.greedy else key.n  # greedy choices are all the same sequence
        # greedy is the request's choice, whatever the checkpoint's do_sample says (as the continuous scheduler)
        sampling: dict[str, Any] = {"num_return_sequences": n, "top_k": None, "do_sample": not key.greedy}
        if not key.greedy:
            sampling.update(temperature=key.temperature, top_p=key.top_p, seed=key.seed)
        pixels = torch.stack([r.pixels for r in requests])
        rows = self.pipe.generate_tokens(pixels, [r.prompt for r in requests], longest, **sampling)
        decode = lambda ids: self.pipe.processor.decode(ids, skip_special_tokens=True)  # noqa: E731
        return [[event for c in range(key.n) for event in replay(c, rows[i * n + c % n], r.sampling.max_new_tokens,
                                                                   self.eos, TextStream(decode, r.sampling.stop))]
                for i, r in enumerate(requests)]

    def prometheus(self, responses: Mapping[str, int], latency: Mapping[str, Histogram]) -> str:
        """/metrics in Prometheus' text format."""
        micro = self.batcher.stats()
        gauges = {"blip2_queue_length": ("Requests waiting for the model.", self.queue.queue_length),
                  "blip2_images_decoding": ("Images waiting for or inside a decoder thread.", self.decoding)}
        counters = {"blip2_micro_batches_total": ("Micro-batches run.", micro["batches"]),
                    "blip2_rejected_total": ("Requests refused with 503, queue full.",
                                             micro["rejected_queue_full"] + (self.engine.rejected if self.engine else 0))}
        histograms = {}
        if self.engine is not None:
            engine = self.engine
            gauges["blip2_running_rows"] = ("Rows of the continuous batch decoding now.", len(engine.rows))
            counters["blip2_generated_tokens_total"] = ("Tokens generated by the continuous scheduler.", engine.tokens)
            counters["blip2_image_cache_hits_total"] = ("Images whose vision output came from the cache.",
                                                        engine.images.hits)
            counters["blip2_image_cache_misses_total"] = ("Images run through the vision encoder.", engine.images.misses)
            counters["blip2_prefix_cache_hits_total"] = ("Prompts that began as a kept row did.", engine.prefixes.hits)
            counters["blip2_prefix_cache_reused_tokens_total"] = ("Prompt positions copied from the prefix cache, "
                                                                  "not prefilled.", engine.prefixes.reused)
            gauges["blip2_prefix_cache_bytes"] = ("Keys and values the prefix cache holds.", engine.prefixes.nbytes)
            histograms = {"blip2_batch_occupancy": ("Rows in each continuous decoding step.", engine.occupancy),
                          "blip2_time_to_first_token_seconds": ("From a request's queueing to its first token.",
                                                                engine.first_token)}
        return prometheus_text(responses, latency, gauges, histograms, counters)

    def stats(self) -> dict[str, Any]:
        out = {**self.batcher.stats(), "decoding": self.decoding, "scheduler": "continuous" if self.engine else "micro"}
        if self.engine is not None:
            out["continuous"] = self.engine.stats()
        return out


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop has closed: the server is gone
        pass
