"""Micro-batching: requests that arrive close together share one forward pass.

Handlers ``await batcher.submit(key, item)`` on the event loop; one worker thread takes the oldest
waiting request, waits up to ``max_wait_s`` (from that request's arrival) for more with the same
``key`` (up to ``max_batch_size``), runs ``run_batch(key, items)`` and hands each request its result.
Under load the queue fills while a batch runs, so the next batch is full without any waiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("blip2.apps.server")


class QueueFull(Exception):
    """More requests are waiting than ``max_queue``: the caller answers 503."""


class ShuttingDown(Exception):
    """The server stopped before the request ran."""


@dataclass(eq=False)
class _Job:
    key: Hashable
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # timed out and cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class WorkerQueue:
    """A queue of waiting requests (at most ``max_queue``) served by one worker thread (``_work``, which
    subclasses write); ``stop`` hands each request still waiting to ``_refuse``."""

    def __init__(self, max_queue: int, thread_name: str) -> None:
        self.max_queue, self.thread_name = max_queue, thread_name
        self._pending: deque[Any] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.rejected = 0

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            left, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for waiting in left:
            self._refuse(waiting, ShuttingDown("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=60)

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    def admit(self, waiting_elsewhere: int = 0) -> None:
        """Raise QueueFull (and count it) when the queue, plus ``waiting_elsewhere`` requests that will join it
        (images being decoded), holds ``max_queue`` requests."""
        with self._cond:
            waiting = len(self._pending) + waiting_elsewhere
            if waiting >= self.max_queue:
                self.rejected += 1
                raise QueueFull(f"{waiting} requests are already waiting (max_queue={self.max_queue})")

    def _work(self) -> None:
        raise NotImplementedError

    def _refuse(self, waiting: Any, error: Exception) -> None:
        raise NotImplementedError


class MicroBatcher(WorkerQueue):
    """``run_batch(key, items) -> results`` (one per item; an Exception instance fails that item only). When
    ``run_batch`` raises, the batch's requests are run again one at a time, so one bad request fails alone."""

    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], max_batch_size: int = 8,
                 max_wait_s: float = 0.01, max_queue: int = 64) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be at least 1, max_wait_s at least 0")
        super().__init__(max_queue, "blip2-batcher")
        self.run_batch = run_batch
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_s
        self.batch_sizes: Counter[int] = Counter()
        self.timeouts = 0
        self.split_batches = 0  # batches that failed and were rerun one request at a time

    def _refuse(self, job: _Job, error: Exception) -> None:
        job.loop.call_soon_threadsafe(_settle, job.future, error)

    async def submit(self, key: Hashable, item: Any, timeout_s: float) -> Any:
        """The item's result; raises QueueFull at once when the queue is full, asyncio.TimeoutError after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        job = _Job(key, item, loop.create_future(), loop, time.monotonic())
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        self.admit()
        with self._cond:
            self._pending.append(job)
            self._cond.notify()
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:  # TimeoutError is the builtin from Python 3.11
            with self._cond:
                if isinstance(e, asyncio.TimeoutError):
                    self.timeouts += 1
                if job in self._pending:
                    self._pending.remove(job)
            raise

    def _take_batch(self) -> list[_Job] | None:
        """Under the lock: the next batch (maybe empty when its first request timed out); None to stop."""
        while not self._pending and not self._stopping:
            self._cond.wait()
        if self._stopping:
            return None
        first = self._pending[0]
        while first in self._pending and not self._stopping:
            same = sum(1 for job in self._pending if job.key == first.key)
            left = first.arrived + self.max_wait_s - time.monotonic()
            if same >= self.max_batch_size or left <= 0:
                break
            self._cond.wait(left)
        batch = [job for job in self._pending if job.key == first.key][: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = deque(job for job in self._pending if id(job) not in taken)
        return [job for job in batch if not job.future.done()]

    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._take_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                results = self.run_batch(batch[0].key, [job.item for job in batch])
            except Exception as e:  # MemoryError included: the server keeps serving
                results = self._one_by_one(batch, e)
            with self._cond:
                self.batch_sizes[len(batch)] += 1
            for job, result in zip(batch, results):
                job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _one_by_one(self, batch: list[_Job], error: Exception) -> list[Any]:
        """After ``batch`` failed with ``error``: each request run alone, so that only a request that fails on its
        own gets an error, never the others it was batched with."""
        if len(batch) == 1:
            log.error("a request failed", exc_info=error)
            return [error]
        log.warning("a batch of %d failed (%s: %s): running its requests one by one", len(batch),
                    type(error).__name__, error)
        with self._cond:
            self.split_batches += 1
        results: list[Any] = []
        for job in batch:
            if job.future.done():  # timed out meanwhile: nobody waits for it
                results.append(None)
                continue
            try:
                results.append(self.run_batch(job.key, [job.item])[0])
            except Exception as e:
                log.error("a request failed", exc_info=e)
                results.append(e)
        return results

    def stats(self) -> dict[str, Any]:
        with self._cond:
            sizes = dict(sorted(self.batch_sizes.items()))
            batches = sum(sizes.values())
            items = sum(size * n for size, n in sizes.items())
            return {"batches": batches, "batched_requests": items,
                    "batch_sizes": {str(size): n for size, n in sizes.items()},
                    "max_batch_size_seen": max(sizes, default=0),
                    "mean_batch_size": round(items / batches, 3) if batches else 0.0,
                    "queue_length": len(self._pending), "rejected_queue_full": self.rejected,
                    "timeouts": self.timeouts, "split_batches": self.split_batches}
