"""One text-generation request as both schedulers take it, and the text of its answers as it grows.

A scheduler reports to a request through ``emit`` (called from its worker thread; the route hands the events to
its event loop): ``Delta(choice, text)`` for new text, ``Finished(choice, reason, tokens)`` when a choice ends
(``reason`` "stop": the end token or a stop sequence; "length": ``max_new_tokens`` reached), ``Failed(error)``
when the request cannot be served. Every choice's deltas joined are its final text, which is what
``blip2.generation.generated_texts`` gives for the same tokens (decoded without special tokens, stripped), cut
before the first stop sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


class Delta(NamedTuple):
    choice: int
    text: str


class Finished(NamedTuple):
    choice: int
    reason: str  # "stop" or "length"
    tokens: int  # tokens generated for this choice (an end token not counted)


class Failed(NamedTuple):
    error: BaseException


Event = Delta | Finished | Failed


@dataclass(frozen=True)
class Sampling:
    """How one request decodes: ``temperature`` 0 is greedy (``top_p`` and ``seed`` then play no part)."""

    max_new_tokens: int
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def pixels_key(pixels: torch.Tensor) -> str:
    """The preprocessed image's identity for the image cache: a hash of its pixel values."""
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


@dataclass(eq=False)
class GenRequest:
    pixels: torch.Tensor  # [3, H, W], preprocessed
    image_key: str  # pixels_key(pixels)
    prompt: str  # the text after the image ("" for a plain caption)
    sampling: Sampling
    emit: Callable[[Event], None]
    cancelled: bool = False  # set by the route when its client has gone or its time is up
    arrived: float = 0.0  # time.monotonic() when submitted
    first_token_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TextStream:
    """The text of one choice from its tokens: what can be sent so far, and whether a stop sequence ended it.

    Text is held back while it might still change: a trailing partial UTF-8 character (decoded as U+FFFD),
    trailing white space (the final text is stripped), and the last ``len(stop) - 1`` characters, which may be
    the start of a stop sequence (the answer never holds one)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""

    def _text(self) -> tuple[str, bool]:
        text = self.decode(self.tokens).lstrip()
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def add(self, token: int) -> tuple[str, bool]:
        """Take one more token: (new text to send, True when a stop sequence ended the answer)."""
        self.tokens.append(token)
        text, stopped = self._text()
        if stopped:
            return self._rest(text.rstrip()), True
        end = len(text) - self.hold
        ready = text[:end].rstrip().rstrip("\ufffd")
        return self._rest(ready) if len(ready) > len(self.sent) else "", False

    def finish(self) -> str:
        """The text not sent yet, at the end of the answer."""
        return self._rest(self._text()[0].strip())

    def _rest(self, text: str) -> str:
        if not text.startswith(self.sent):  # decoding changed earlier text (rare): send nothing more than the end
            return ""
        new, self.sent = text[len(self.sent):], text
        return new


def replay(choice: int, tokens: Sequence[int], max_new_tokens: int, eos: set[int], stream: TextStream) -> list[Event]:
    """The events of one choice whose tokens were all generated at once (the micro-batching scheduler's)."""
    count = 0
    for token in tokens[:max_new_tokens]:
        if token in eos:
            break
        count += 1
        if stream.add(token)[1]:
            return [Delta(choice, stream.sent), Finished(choice, "stop", count)]
    reason = "length" if count == max_new_tokens else "stop"
    stream.finish()
    return [Delta(choice, stream.sent), Finished(choice, reason, count)]


def eos_ids(model: Any) -> set[int]:
    """The end tokens of the model's generation config."""
    eos = model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))
