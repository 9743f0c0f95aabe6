"""The batch worker: one thread drains a bounded queue of tokenised requests and embeds them in groups.

Requests arrive as token ids (the handlers tokenise each request once, in the thread pool), so grouping by a
token budget is exact and the engine never sees text. A group runs as one ``embed_ids`` call without
normalisation; each request gets its own rows back and applies its own options, so per-request settings hold
inside a shared batch. The JAX work never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import ApiError
from .metrics import Metrics

logger = logging.getLogger("e5lite.serve")


class TokenEmbedder(Protocol):
    """What the worker needs of an encoder: embeddings of token id sequences, in input order."""

    def embed_ids(self, ids: Sequence[np.ndarray], *, normalize: bool = True, batch_size: int | None = None,
                  show_progress_bar: bool | None = None) -> np.ndarray: ...


@dataclass
class Job:
    """One request's token ids (prompt and truncation applied) and the future its handler awaits."""
    ids: list[np.ndarray]
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


def _settle(future: asyncio.Future, value, error) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _reply(job: Job, value, error) -> None:
    """Hands a result to the job's event loop from the worker thread."""
    with contextlib.suppress(RuntimeError):  # the loop closed: server shutting down
        job.loop.call_soon_threadsafe(_settle, job.future, value, error)


class Batcher:
    """Groups queued Jobs up to ``max_batch_tokens`` tokens, or until ``max_wait_ms`` passes without a
    batch-mate, and runs each group through ``embedder.embed_ids`` on its own thread."""

    def __init__(self, embedder: TokenEmbedder, metrics: Metrics, *, max_queue: int, max_batch_tokens: int,
                 max_wait_ms: float):
        self.embedder, self.metrics = embedder, metrics
        self.max_queue, self.max_batch_tokens, self.max_wait_ms = max_queue, max_batch_tokens, max_wait_ms
        self.queue: queue.Queue = queue.Queue(max_queue)
        self._carry: Job | None = None  # a job that did not fit the last group: it starts the next one
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="e5lite-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    async def embed(self, ids: list[np.ndarray]) -> np.ndarray:
        """Unnormalised embeddings [len(ids), dim]; 429 when the queue is full."""
        loop = asyncio.get_running_loop()
        job = Job(ids, sum(len(i) for i in ids), loop, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"server busy: {self.max_queue} requests already queued; retry later",
                           code="queue_full") from None
        return await job.future

    def _next(self, timeout: float) -> Job | None:
        """The carried-over job, else the next queued one within ``timeout`` s (<= 0: only one already queued)."""
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None

    def _group(self) -> list[Job]:
        first = self._next(0.1)  # wakes up now and then to notice stop()
        if first is None:
            return []
        jobs, tokens = [first], first.tokens
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while tokens < self.max_batch_tokens:
            job = self._next(deadline - time.monotonic())
            if job is None:
                break
            if tokens + job.tokens > self.max_batch_tokens:
                self._carry = job
                break
            jobs.append(job)
            tokens += job.tokens
        return jobs

    def _work(self) -> None:
        while not self._stop.is_set():
            jobs = self._group()
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        ids = [i for j in jobs for i in j.ids]
        try:
            emb = self.embedder.embed_ids(ids, normalize=False, show_progress_bar=False)
        except Exception as e:  # fail these requests, keep serving
            logger.exception("e5lite serve: embedding a batch failed")
            for j in jobs:
                _reply(j, None, e)
            return
        self.metrics.batch(len(jobs), len(ids), sum(j.tokens for j in jobs))
        start = 0
        for j in jobs:
            _reply(j, emb[start:start + len(j.ids)], None)
            start += len(j.ids)
