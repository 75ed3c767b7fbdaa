"""Continuous batching for decoder-only (OPT) models: requests join the running batch between decoding steps
and leave it when they finish.

One worker thread owns a pool of ``max_rows`` rows of KV cache (``_RowCaches``). Every turn it

1. admits waiting requests while rows are free (one row per choice, ``n`` of them), at most ``max_prefill`` per
   turn so that the streams already running lose one prefill's time at most between two steps;
2. runs their images through the vision encoder and Q-Former (skipped for an image in the ``ImageCache``) and
   their prompts through the language model together (left-padded, as ``Pipeline.generate`` batches them),
   and copies each prompt's keys and values into its rows;
3. runs one decoding step for every running row, each at its own cache slot and position, and picks each
   row's next token (greedy, or sampled with the request's own generator).

Rows of finished or cancelled requests are freed at once: the last running row moves into the gap, so the
running rows are always ``0 .. n-1`` and a step reads only them. A row's prompt is run as it would be alone
(OPT positions come from the mask, padding keys are masked out), so greedy tokens equal ``Pipeline.generate``'s.

The step calls the language model's layers (``model.decoder``) with caches of this module: speed-ups that
change layers (fuse, int8) apply; those that replace the whole step (native, compiled, CUDA graphs) do not.
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
from blip2.apps.server.requests import Delta, Failed, Finished, GenRequest, TextStream, eos_ids
from blip2.logits_processing import top_p_filter

log = logging.getLogger("blip2.apps.server")


def unsupported(model: Any) -> str | None:
    """Why the engine cannot run ``model`` (None: it can): it needs a decoder-only language model and a
    generation config that asks for nothing but an end token (no repetition penalty, no minimum length)."""
    if not model.config.use_decoder_only_language_model:
        return "continuous batching runs decoder-only (OPT) models; this one is encoder-decoder (T5)"
    cfg = model.generation_config  # a field left None is unset (transformers' defaults: no penalty, no minimum)
    if cfg.repetition_penalty not in (None, 1.0) or cfg.min_new_tokens or cfg.min_length:
        return "the checkpoint's generation_config sets a repetition penalty or a minimum length"
    return None


class _RowCaches:
    """Keys and values of every layer for ``rows`` rows of ``slots`` slots: [rows, H, slots, Dh] each. A step
    writes each running row at its own slot (``update`` gets one slot per row) and attends over the first
    ``span`` slots. The layers call ``update`` as they call ``KVCache.update``."""

    class Layer:
        def __init__(self, owner: _RowCaches, i: int) -> None:
            self.owner, self.i = owner, i

        def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            # input_pos [n]: each row's slot; k, v [n, H, 1, Dh] -> [n, H, span, Dh]
            n, span = k.shape[0], self.owner.span
            K, V = self.owner.k[self.i][:n], self.owner.v[self.i][:n]
            index = input_pos.view(n, 1, 1, 1).expand_as(k)  # scatter_ is several times faster than index_put_
            K.scatter_(2, index, k)
            V.scatter_(2, index, v)
            return K[:, :, :span], V[:, :, :span]

    def __init__(self, layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = (rows, heads, 64, head_dim)
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.valid = torch.zeros(rows, 64, dtype=torch.bool, device=device)  # [rows, slots]: keys to attend
        self.span = 0
        self.layers = [self.Layer(self, i) for i in range(layers)]

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def reserve(self, slots: int) -> None:
        """Room for ``slots`` slots per row (the pool doubles as needed, keeping what it holds)."""
        if slots <= self.slots:
            return
        new = max(slots, 2 * self.slots)
        pad = (0, 0, 0, new - self.slots)  # [rows, H, slots, Dh]: pad the slot dimension
        self.k = [torch.nn.functional.pad(t, pad) for t in self.k]
        self.v = [torch.nn.functional.pad(t, pad) for t in self.v]
        self.valid = torch.nn.functional.pad(self.valid, (0, new - self.slots))

    def load(self, row: int, keys: list[Tensor], values: list[Tensor], valid: Tensor) -> None:
        """Row ``row`` holds a prefilled prompt: ``keys``/``values`` [H, T, Dh] per layer, ``valid`` [T]."""
        T = valid.shape[0]
        self.reserve(T + 1)
        for K, V, k, v in zip(self.k, self.v, keys, values):
            K[row, :, :T] = k
            V[row, :, :T] = v
        self.valid[row] = False
        self.valid[row, :T] = valid

    def move(self, src: int, dst: int, length: int) -> None:
        """Row ``dst`` takes row ``src``'s first ``length`` slots."""
        for K, V in zip(self.k, self.v):
            K[dst, :, :length] = K[src, :, :length]
            V[dst, :, :length] = V[src, :, :length]
        self.valid[dst] = self.valid[src]


class _Row:
    """One choice of one request, decoding in a row of the pool."""

    def __init__(self, request: GenRequest, choice: int, length: int, position: int, stream: TextStream,
                 generator: torch.Generator | None) -> None:
        self.request, self.choice = request, choice
        self.length = length  # cache slots filled; the next token goes to slot ``length``
        self.position = position  # OPT position id of the next token
        self.stream, self.generator = stream, generator
        self.token = -1  # the token to feed at the next step
        self.count = 0  # tokens generated


class ContinuousBatcher(WorkerQueue):
    """``submit(request)``: the request's events come through ``request.emit`` (see ``requests``)."""

    def __init__(self, pipe: Any, max_rows: int = 8, max_queue: int = 64, max_prefill: int = 4,
                 image_cache: ImageCache | None = None) -> None:
        reason = unsupported(pipe.model)
        if reason is not None:
            raise ValueError(reason)
        super().__init__(max_queue, "blip2-engine")
        self.pipe, self.max_rows, self.max_prefill = pipe, max_rows, max_prefill
        self.images = image_cache or ImageCache()
        lm = pipe.model.language_model
        cfg = lm.config
        weight = lm.get_input_embeddings().weight
        self.caches = _RowCaches(cfg.num_hidden_layers, max_rows, cfg.num_attention_heads,
                                 cfg.hidden_size // cfg.num_attention_heads, weight.dtype, weight.device)
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
        while True:
            with self._cond:
                newcomers = self._take()
            if newcomers is None:
                return
            with torch.inference_mode():
                self._release([r for r in self.rows if r.request.cancelled])
                if newcomers:
                    self._admit(newcomers)
                if self.rows:
                    self._run_step()

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
        model, pipe = self.pipe.model, self.pipe
        lm_inputs = self.images.lm_inputs(model, [(r.image_key, r.pixels) for r in requests])  # [b, Q, D]
        ids, mask = pipe.processor.prompt_inputs([r.prompt for r in requests], "left")
        ids, mask = ids.to(pipe.device), mask.to(pipe.device)
        embeds, mask = model.merge_image_inputs(lm_inputs, ids, mask)
        decoding = model.language_model.start_decoding(embeds, mask, expand=1, max_new_tokens=1)
        logits = decoding.prefill()  # [b, V]
        valid = mask.bool()
        rows, row_logits = [], []
        for j, request in enumerate(requests):
            s = request.sampling
            generator = None
            if not s.greedy:
                generator = torch.Generator(device=logits.device)
                generator.manual_seed(s.seed) if s.seed is not None else generator.seed()
            for choice in range(s.n):
                row = _Row(request, choice, embeds.shape[1], int(valid[j].sum()),
                           TextStream(self._decode, s.stop), generator)
                self.caches.load(len(self.rows), [c.k[j] for c in decoding.caches], [c.v[j] for c in decoding.caches],
                                 valid[j])
                self.rows.append(row)
                rows.append(row)
                row_logits.append(j)
        self._advance(rows, logits[torch.tensor(row_logits, device=logits.device)])

    def _step(self) -> None:
        lm = self.pipe.model.language_model
        n = len(self.rows)
        caches = self.caches
        caches.reserve(max(r.length for r in self.rows) + 1)
        dev = caches.valid.device
        slots = torch.tensor([r.length for r in self.rows], device=dev)  # [n]
        caches.valid[torch.arange(n, device=dev), slots] = True
        caches.span = int(slots.max()) + 1
        tokens = torch.tensor([r.token for r in self.rows], device=dev)
        positions = torch.tensor([[r.position] for r in self.rows], device=dev)  # [n, 1]
        mask = caches.valid[:n, None, None, : caches.span]  # [n, 1, 1, span]
        x = lm.get_input_embeddings()(tokens)[:, None]  # [n, 1, E]
        h = lm.model.decoder(x, positions, mask, caches.layers, slots)
        logits = lm.logits(h[:, -1]).float()  # [n, V]
        for r in self.rows:
            r.length += 1
            r.position += 1
        self.steps += 1
        self.occupancy.observe(n)
        self._advance(list(self.rows), logits)

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
        self._release(done)

    def _finish(self, row: _Row, reason: str, text: str, done: list[_Row]) -> None:
        if text:
            row.request.emit(Delta(row.choice, text))
        row.request.emit(Finished(row.choice, reason, row.count))
        done.append(row)

    def _choose(self, rows: list[_Row], logits: Tensor) -> list[int]:
        """Greedy rows take the argmax; each sampling request samples its rows with its own generator."""
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
                    self.caches.move(len(self.rows), i, last.length)
                    self.rows[i] = last
                    continue  # the moved row may be gone too
            else:
                i += 1

    def _decode(self, tokens: list[int]) -> str:
        return self.pipe.processor.decode(tokens, skip_special_tokens=True)

    def stats(self) -> dict[str, Any]:
        return {"running_rows": len(self.rows), "queue_length": len(self._pending), "steps": self.steps,
                "generated_tokens": self.tokens, "rejected_queue_full": self.rejected,
                "image_cache": self.images.stats()}
