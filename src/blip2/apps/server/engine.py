"""Continuous batching: requests join the running decode batch between steps and leave it when they finish.

One worker thread owns a pool of ``max_rows`` rows of decoder cache (``rows``: OPT's, or T5's with each row's
own encoder output). Every turn it

1. admits waiting requests while rows are free (one row per choice, ``n`` of them), at most ``max_prefill`` per
   turn so that the streams already running lose one prefill's time at most between two steps;
2. runs their images through the vision encoder and Q-Former (skipped for an image in the ``ImageCache``) and
   their prompts through the language model together (OPT: only what follows the longest beginning the
   ``PrefixCache`` holds for the image), and copies each prompt's cache into its rows;
3. runs one decoding step for every running row, each at its own cache slot and position, and picks each
   row's next token (greedy, or sampled with the request's own generator).

Rows of finished or cancelled requests are freed at once: the last running row moves into the gap, so the
running rows are always ``0 .. n-1`` and a step reads only them. A finished row first leaves what it read to the
prefix cache, for the next question of its chat. A row's prompt is run as it would be alone,
and its scores are processed as ``generate`` processes them (``ScoreProcessor``: repetition penalty, n-gram
ban, banned words, minimum length) over the row's own history, so greedy tokens equal ``Pipeline.generate``'s.
Checkpoints whose generation config asks for what rows cannot do (beam search) are ``unsupported``: the server
then serves them by micro-batching.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from blip2.apps.server.batcher import ShuttingDown, WorkerQueue
from blip2.apps.server.imagecache import ImageCache
from blip2.apps.server.metrics import Histogram
from blip2.apps.server.prefixcache import PrefixCache
from blip2.apps.server.requests import Delta, Failed, Finished, GenRequest, TextStream, eos_ids
from blip2.apps.server.rows import Start, row_model
from blip2.generation import length_limits
from blip2.generation_config import GenerationConfig, resolve
from blip2.layout_files import Foreground
from blip2.logits_processing import ScoreProcessor, top_p_filter

log = logging.getLogger("blip2.apps.server")


def scoring_config(model: Any) -> GenerationConfig:
    """The checkpoint's generation config as ``generate`` resolves it for the server's requests, less sampling
    (each request brings its own temperature and top_p); ValueError for settings ``generate`` refuses."""
    return resolve(model.generation_config, None, {"do_sample": False, "max_new_tokens": 1})


def unsupported(model: Any) -> str | None:
    """Why the engine cannot run ``model`` (None: it can): its generation config asks for beam search, whose
    hypotheses are no rows of their own, or for a setting ``generate`` refuses."""
    try:
        cfg = scoring_config(model)
    except (TypeError, ValueError) as e:
        return f"the checkpoint's generation_config is refused: {e}"
    if cfg.num_beams > 1:
        return (f"the checkpoint's generation_config asks for beam search (num_beams={cfg.num_beams}), which "
                "continuous batching does not run")
    return None


class _Row:
    """One choice of one request, decoding in a row of the pool."""

    def __init__(self, request: GenRequest, choice: int, start: Start, stream: TextStream,
                 generator: torch.Generator | None, process: ScoreProcessor | None) -> None:
        self.request, self.choice, self.start = request, choice, start
        self.length = start.length  # cache slots filled; the next token goes to slot ``length``
        self.position = start.position  # position id of the next token
        self.stream, self.generator = stream, generator
        self.process = process  # None: the scores need no processing
        self.history = list(start.prefix)  # what the processing reads: the prefix, then the tokens so far
        self.token = -1  # the token to feed at the next step
        self.count = 0  # tokens generated


class ContinuousBatcher(WorkerQueue):
    """``submit(request)``: the request's events come through ``request.emit`` (see ``requests``)."""

    def __init__(self, pipe: Any, max_rows: int = 8, max_queue: int = 64, max_prefill: int = 4,
                 image_cache: ImageCache | None = None, prefix_cache: PrefixCache | None = None) -> None:
        reason = unsupported(pipe.model)
        if reason is not None:
            raise ValueError(reason)
        super().__init__(max_queue, "blip2-engine")
        self.pipe, self.max_rows, self.max_prefill = pipe, max_rows, max_prefill
        self.images = image_cache or ImageCache()
        self.prefixes = prefix_cache if prefix_cache is not None else PrefixCache(512 << 20)
        self.lm = row_model(pipe, max_rows, self.prefixes)
        self.scoring = scoring_config(pipe.model)
        self.eos = eos_ids(pipe.model)
        self.rows: list[_Row] = []
        self.occupancy = Histogram([1, 2, 4, 8, 16, 32, 64])  # running rows per step
        self.first_token = Histogram([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])  # seconds to the first token
        self.steps = self.tokens = 0

    # -- the event loop's side ------------------------------------------------------------------------

    def _refuse(self, request: GenRequest, error: Exception) -> None:
        request.emit(Failed(error))

    def submit(self, request: GenRequest) -> None:
        """Queue ``request``; QueueFull or ShuttingDown at once when it cannot be."""
        if request.sampling.n > self.max_rows:
            raise ValueError(f"n={request.sampling.n} is more than the server's {self.max_rows} rows")
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self.admit()
        request.arrived = time.monotonic()
        with self._cond:
            self._pending.append(request)
            self._cond.notify()

    def wake(self) -> None:
        """A request was cancelled: let the worker free its rows even when nothing else happens."""
        with self._cond:
            self._cond.notify()

    # -- the worker -----------------------------------------------------------------------------------

    def _take(self) -> list[GenRequest] | None:
        """Under the lock: the requests to admit this turn (maybe none); None to stop."""
        while not self._pending and not self.rows and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return None
        taken: list[GenRequest] = []
        free = self.max_rows - len(self.rows)
        while self._pending and len(taken) < self.max_prefill:
            request = self._pending[0]
            if request.cancelled:
                self._pending.popleft()
                continue
            if request.sampling.n > free:
                break
            taken.append(self._pending.popleft())
            free -= request.sampling.n
        return taken

    def _work(self) -> None:
        busy = Foreground()  # from the first request to the last row done, the cache's file writers wait
        try:
            while True:
                with self._cond:
                    if not self._pending and not self.rows:
                        busy.release()  # idle: they may write (blip2.layout_files)
                    newcomers = self._take()
                if newcomers is None:
                    return
                if not busy.depth:
                    busy.hold()
                with torch.inference_mode():
                    self._release([r for r in self.rows if r.request.cancelled])
                    if newcomers:
                        self._admit(newcomers)
                    if self.rows:
                        self._run_step()
        finally:
            busy.release()

    def _admit(self, requests: list[GenRequest]) -> None:
        """Prefill ``requests`` together; when that fails, each alone, so only a request failing alone fails."""
        try:
            self._prefill(requests)
            return
        except Exception as e:
            self._drop(requests)
            if len(requests) == 1:
                log.error("a request failed", exc_info=e)
                requests[0].emit(Failed(e))
                return
            log.warning("a prefill of %d failed (%s: %s): running them one by one", len(requests),
                        type(e).__name__, e)
        for request in requests:
            self._admit([request])

    def _run_step(self) -> None:
        try:
            self._step()
        except Exception as e:  # MemoryError included: the requests running now fail, the server goes on
            log.error("a decoding step failed", exc_info=e)
            running = {id(r.request): r.request for r in self.rows}
            self.rows.clear()
            for request in running.values():
                request.emit(Failed(e))

    def _drop(self, requests: list[GenRequest]) -> None:
        ids = {id(r) for r in requests}
        self._release([row for row in self.rows if id(row.request) in ids])

    def _prefill(self, requests: list[GenRequest]) -> None:
        lm_inputs = self.images.lm_inputs(self.pipe.model, [(r.image_key, r.pixels) for r in requests])  # [b, Q, D]
        logits, starts, load = self.lm.prefill(lm_inputs, [r.prompt for r in requests],
                                               [r.image_key for r in requests])
        rows, row_logits = [], []
        for j, request in enumerate(requests):
            s = request.sampling
            generator = None
            if not s.greedy:
                generator = torch.Generator(device=logits.device)
                generator.manual_seed(s.seed) if s.seed is not None else generator.seed()
            process = self._processor(len(starts[j].prefix), logits)
            for choice in range(s.n):
                row = _Row(request, choice, starts[j], TextStream(self._decode, s.stop), generator, process)
                load(j, len(self.rows))
                self.rows.append(row)
                rows.append(row)
                row_logits.append(j)
        self._advance(rows, logits[torch.tensor(row_logits, device=logits.device)])

    def _processor(self, prefix: int, logits: Tensor) -> ScoreProcessor | None:
        """``generate``'s score processing for a row after ``prefix`` ids; None where it would change nothing."""
        cfg, eos = self.scoring, sorted(self.eos)
        process = ScoreProcessor(cfg, eos=torch.tensor(eos, device=logits.device) if eos else None,
                                 min_length=length_limits(cfg, prefix)[1], prefix_mask=None, expand=1, keep=1,
                                 vocab_size=logits.shape[-1], device=logits.device)
        return None if process.bans_only and process.banned(prefix) is None else process

    def _step(self) -> None:
        rows = self.rows
        logits = self.lm.step([r.token for r in rows], [r.length for r in rows], [r.position for r in rows])
        for r in rows:
            r.length += 1
            r.position += 1
        self.steps += 1
        self.occupancy.observe(len(rows))
        self._advance(list(rows), logits)

    def _advance(self, rows: list[_Row], logits: Tensor) -> None:
        """Pick each row's next token from its logits [len(rows), V]; send text; free finished rows."""
        tokens = self._choose(rows, logits)
        now = time.monotonic()
        done: list[_Row] = []
        for row, token in zip(rows, tokens):
            request = row.request
            if request.first_token_at is None:
                request.first_token_at = now
                self.first_token.observe(now - request.arrived)
            if token in self.eos:
                self._finish(row, "stop", row.stream.finish(), done)
                continue
            row.count += 1
            row.history.append(token)
            self.tokens += 1
            text, stopped = row.stream.add(token)
            if stopped:
                self._finish(row, "stop", text, done)
            elif row.count >= request.sampling.max_new_tokens:
                self._finish(row, "length", text + row.stream.finish(), done)
            else:
                if text:
                    request.emit(Delta(row.choice, text))
                row.token = token
        for row in done:
            self._keep(row)
        self._release(done)

    def _keep(self, row: _Row) -> None:
        """Leave what ``row`` read (its prompt and the tokens fed back, not its last token) to later prompts that
        begin the same way: a chat's next question."""
        if not row.start.items:
            return
        fed = row.history[len(row.start.prefix) :][: row.length - row.start.length]
        try:
            self.lm.keep(self.rows.index(row), row.length, row.request.image_key, row.start.items + fed)
        except Exception as e:  # MemoryError included: a cache's failure must not fail the running requests
            log.warning("prefix cache: a finished row was not kept (%s: %s)", type(e).__name__, e)

    def _finish(self, row: _Row, reason: str, text: str, done: list[_Row]) -> None:
        if text:
            row.request.emit(Delta(row.choice, text))
        row.request.emit(Finished(row.choice, reason, row.count))
        done.append(row)

    def _choose(self, rows: list[_Row], logits: Tensor) -> list[int]:
        """Each row's scores processed over its own history; greedy rows take the argmax, each sampling request
        samples its rows with its own generator."""
        if any(row.process is not None for row in rows):
            logits = logits.clone()
            for i, row in enumerate(rows):
                if row.process is not None:
                    history = torch.tensor([row.history], device=logits.device)
                    logits[i] = row.process(history, logits[i : i + 1])[0]
        chosen = logits.argmax(-1)
        by_request: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if not row.request.sampling.greedy:
                by_request.setdefault(id(row.request), []).append(i)
        for index in by_request.values():
            s, generator = rows[index[0]].request.sampling, rows[index[0]].generator
            scores = top_p_filter(logits[index] / s.temperature, s.top_p)
            picked = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            chosen[torch.tensor(index, device=chosen.device)] = picked
        return chosen.tolist()

    def _release(self, rows: list[_Row]) -> None:
        """Free the rows of ``rows``: the last running row moves into each gap."""
        gone = {id(r) for r in rows}
        i = 0
        while i < len(self.rows):
            if id(self.rows[i]) in gone:
                last = self.rows.pop()
                if i < len(self.rows):
                    self.lm.move(len(self.rows), i, last.length)
                    self.rows[i] = last
                    continue  # the moved row may be gone too
            else:
                i += 1

    def _decode(self, tokens: list[int]) -> str:
        return self.pipe.processor.decode(tokens, skip_special_tokens=True)

    def stats(self) -> dict[str, Any]:
        return {"running_rows": len(self.rows), "queue_length": len(self._pending), "steps": self.steps,
                "generated_tokens": self.tokens, "rejected_queue_full": self.rejected,
                "image_cache": self.images.stats(), "prefix_cache": self.prefixes.stats()}
