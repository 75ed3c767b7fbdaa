"""The OpenAI-compatible API (JSON bodies), so that OpenAI's clients and tools can talk to BLIP-2.

    POST /v1/chat/completions   messages with one image (a data URL in an ``image_url`` part)
    POST /v1/completions        prompt text, the image as a part of ``prompt`` or in ``image``
    GET  /v1/models             the loaded model

The conversation becomes the prompt ``blip2 chat`` builds (``Question: q1 Answer: a1. Question: q2 Answer:``;
system messages are left out); a user message with an image and no text asks for a caption, as /v1/caption
does without a prompt. Decoding is greedy unless ``temperature`` > 0. ``max_tokens`` is at most the server's
``--max-new-tokens`` (its default). ``stream: true`` answers in server-sent events, OpenAI's chunks, ending with
``data: [DONE]``. Errors are ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http.client
import json
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from blip2.apps.pipeline import GenerationOptions, PipelineError, chat_prompt
from blip2.apps.server.requests import Delta, Failed, Finished, GenRequest, Sampling, pixels_key
from blip2.apps.server.service import MAX_TEXT_CHARS, ApiError, Service, api_error

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
MAX_MESSAGES = 64
MAX_STOP = 4
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,(?P<data>.*)",
                       re.S)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = ("invalid_request_error" if status < 500 else
            "timeout" if status == 504 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(message: str, param: str | None, status: int = 400, code: str | None = None) -> ApiError:
    return ApiError(status, message, param, code)


# -- reading a request ------------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, whole: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "a whole number" if whole else "a number"
        raise _bad(f"'{name}' must be {what} from {low:g} to {high:g}, got {value!r}", name)
    return value


def _sampling(body: dict[str, Any], service: Service) -> Sampling:
    cap = service.settings.options.max_new_tokens
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be a whole number, got {seed!r}", "seed")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("'stream' must be true or false", "stream")
    return Sampling(max_new_tokens=_number(body, name, cap, 1, cap, whole=True),
                    n=_number(body, "n", 1, 1, service.settings.max_batch_size, whole=True),
                    temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),
                    top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)), seed=seed, stop=tuple(stops))


def _parts(content: Any, param: str) -> tuple[str, list[str]]:
    """A message's content (a string, or a list of text and image_url parts) -> (text, image URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or a list of parts", param)
    texts, urls = [], []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise _bad(f"'{where}.image_url.url' must be a string", f"{where}.image_url")
            urls.append(url)
        else:
            raise _bad(f"'{where}' must be {{\"type\": \"text\", \"text\": ...}} or "
                       f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}", where)
    return " ".join(t.strip() for t in texts if t.strip()), urls


def _conversation(messages: Any) -> tuple[str, str]:
    """``messages`` -> (the prompt, the image's URL). One image in the whole conversation; the last message is
    the user's; earlier user messages pair with the assistant's answers that follow them."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"'messages' holds {len(messages)} messages, over the limit of {MAX_MESSAGES}", "messages")
    turns: list[list[str]] = []  # [question, answer]
    urls: list[str] = []
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"'messages[{k}].role' must be user, assistant or system, got {role!r}", f"messages[{k}].role")
        text, found = _parts(message.get("content") or "", f"messages[{k}].content")
        if len(text) > MAX_TEXT_CHARS:
            raise _bad(f"'messages[{k}].content' is {len(text)} characters, over the limit of {MAX_TEXT_CHARS}",
                       f"messages[{k}].content")
        urls += found
        if role == "user":
            turns.append([text, ""])
        elif turns:
            turns[-1][1] = text
    if not turns or messages[-1].get("role") != "user":
        raise _bad("the last message must be the user's", "messages")
    if not urls:
        raise _bad("no image: put one in a user message as {\"type\": \"image_url\", \"image_url\": {\"url\": "
                   "\"data:image/png;base64,...\"}}", "messages", code="image_missing")
    if len(set(urls)) > 1:
        raise _bad(f"{len(set(urls))} different images; BLIP-2 looks at one image per conversation", "messages")
    *history, (question, _) = turns
    if not question and not history:
        return "", urls[0]  # an image alone: a caption
    return chat_prompt([(q, a) for q, a in history], question), urls[0]


async def _image_bytes(url: str, param: str, service: Service, deadline: float) -> bytes:
    """The image file a data URL holds (or, when the operator allowed it, an http(s) URL points to)."""
    limit = service.settings.max_upload_bytes
    if url.startswith(("http://", "https://")):
        if not service.settings.fetch_images:
            raise _bad("image URLs are not fetched by this server: send the image as a data URL "
                       "(data:image/png;base64,...)", param, code="remote_image_refused")
        return await service.within(deadline, asyncio.to_thread(_fetch, url, limit, param))
    match = _DATA_URL.fullmatch(url)
    if match is None or not match["b64"]:
        raise _bad("the image must be a base64 data URL (data:image/png;base64,...)", param, code="invalid_image_url")
    if len(match["data"]) * 3 // 4 > limit:
        raise _bad(f"the image is over the limit of {limit} bytes", param, status=413, code="image_too_large")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the image's data URL is not valid base64", param, code="invalid_image_url") from None
    if not data:
        raise _bad("the image's data URL is empty", param, code="invalid_image_url")
    return data


def _fetch(url: str, limit: int, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (http(s) only, checked above)
            data = response.read(limit + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:  # unreachable, HTTP errors, bad URLs, cut short
        raise _bad(f"cannot fetch the image from {url}: {e}", param, code="image_fetch_failed") from None
    if len(data) > limit:
        raise _bad(f"the image at {url} is over the limit of {limit} bytes", param, status=413,
                   code="image_too_large")
    if not data:
        raise _bad(f"the image at {url} is empty", param, code="invalid_image_url")
    return data


async def _json_body(request: Request, service: Service, deadline: float) -> dict[str, Any]:
    async def read() -> bytes:
        return await request.body()

    raw = await service.within(deadline, read())
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"the body is not valid JSON: {e}", None) from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    return body


def _completion_prompt(body: dict[str, Any]) -> tuple[str, str]:
    """/v1/completions: (the prompt text, the image's URL) from ``prompt`` (a string, or text and image parts) and
    ``image`` (a data URL)."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            raise _bad("one prompt per request", "prompt")
        prompt = prompt[0] if prompt else ""
    text, urls = _parts(prompt, "prompt")
    if len(text) > MAX_TEXT_CHARS:
        raise _bad(f"'prompt' is {len(text)} characters, over the limit of {MAX_TEXT_CHARS}", "prompt")
    image = body.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise _bad("'image' must be a data URL string", "image")
        urls.append(image)
    if len(urls) != 1:
        raise _bad("no image: give one as 'image' (a data URL) or as an image_url part of 'prompt'" if not urls else
                   "one image per request", "image", code="image_missing" if not urls else None)
    return text.strip(), urls[0]


# -- running it and answering ------------------------------------------------------------------------------


class _Call:
    """One completion request in flight: its events arrive on the event loop, in order."""

    def __init__(self, service: Service, body: dict[str, Any], chat: bool) -> None:
        self.service, self.body, self.chat = service, body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        self.request: GenRequest | None = None
        self.prompt_tokens = 0

    async def start(self, prompt: str, url: str, deadline: float) -> None:
        service = self.service
        service.needs(retrieval=False)
        sampling = _sampling(self.body, service)
        param = "messages" if self.chat else "prompt"
        try:
            service.pipe.check_prompt(prompt, GenerationOptions(max_new_tokens=sampling.max_new_tokens))
        except PipelineError as e:
            raise _bad(str(e), param, code="context_length_exceeded" if "too long" in str(e) else None) from None
        self.prompt_tokens = int(service.pipe.processor.prompt_inputs([prompt])[0].shape[1])
        data = await _image_bytes(url, param, service, deadline)
        remote = url.startswith(("http://", "https://"))
        try:
            pixels = await service.decode(data, deadline, service.queue, "fetched" if remote else "uploaded")
        except ApiError as e:  # the image's own fault: name the field that brought it
            if e.status >= 500 or e.param is not None:
                raise
            raise _bad(str(e), param, e.status, "invalid_image") from None
        loop = asyncio.get_running_loop()

        def emit(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop has closed: the server is gone
                pass

        self.request = GenRequest(pixels, pixels_key(pixels), prompt, sampling, emit)
        await service.submit(self.request, deadline)

    async def run(self, deadline: float) -> AsyncIterator[Delta | Finished]:
        """The request's deltas and finishes; its error raised; cancelled when left before its end."""
        assert self.request is not None
        left = self.request.sampling.n
        try:
            while left:
                event = await self.service.within(deadline, self.events.get())
                if isinstance(event, Failed):
                    raise event.error
                left -= isinstance(event, Finished)
                yield event
        finally:
            if left:
                self.service.cancel(self.request)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.service.model_name}

    def _choice(self, index: int, text: str | None, reason: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
        body = {} if text is None else {"content": text}
        key = "delta" if chunk else "message"
        return {"index": index, key: body if chunk else {"role": "assistant", **body}, "finish_reason": reason,
                "logprobs": None}

    async def answer(self, deadline: float) -> dict[str, Any]:
        n = self.request.sampling.n if self.request else 1
        texts, reasons, tokens = [""] * n, ["stop"] * n, 0
        async for event in self.run(deadline):
            if isinstance(event, Delta):
                texts[event.choice] += event.text
            else:
                reasons[event.choice] = event.reason
                tokens += event.tokens
        return {**self._head(False), "choices": [self._choice(c, texts[c], reasons[c], False) for c in range(n)],
                "usage": self.usage(tokens)}

    async def stream(self, deadline: float) -> AsyncIterator[bytes]:
        """Server-sent events: OpenAI's chunks, then ``data: [DONE]``; an error after the start is sent as an
        error object (the status line has gone)."""
        options = self.body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage"))
        extra = {"usage": None} if with_usage else {}

        def sse(obj: dict[str, Any]) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        def chunk(choice: dict[str, Any]) -> bytes:
            return sse({**self._head(True), "choices": [choice], **extra})

        n, tokens = self.request.sampling.n if self.request else 1, 0
        if self.chat:
            for c in range(n):
                yield chunk({"index": c, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None})
        try:
            async for event in self.run(deadline):
                if isinstance(event, Delta):
                    if event.text:
                        yield chunk(self._choice(event.choice, event.text, None, True))
                else:
                    tokens += event.tokens
                    yield chunk(self._choice(event.choice, None if self.chat else "", event.reason, True))
        except Exception as e:
            error = api_error(e, self.service.settings.timeout_s)
            yield sse(error_body(error.status, str(error), error.param, error.code))
            return
        if with_usage:
            yield sse({**self._head(True), "choices": [], "usage": self.usage(tokens)})
        yield b"data: [DONE]\n\n"


def add_routes(app: FastAPI, service: Service) -> None:
    async def complete(request: Request, chat: bool) -> Any:
        deadline = service.deadline()
        body = await _json_body(request, service, deadline)
        prompt, url = _conversation(body.get("messages")) if chat else _completion_prompt(body)
        call = _Call(service, body, chat)
        await call.start(prompt, url, deadline)
        if body.get("stream"):
            return StreamingResponse(call.stream(deadline), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        return await call.answer(deadline)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, chat=False)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "blip2"}]}
