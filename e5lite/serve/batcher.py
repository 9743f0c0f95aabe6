"""The batch worker: one thread takes tokenised requests off a bounded queue and embeds them in engine calls.

Requests arrive as token ids (the handlers tokenise each request once, in the thread pool), so grouping by a
token budget is exact and the engine never sees text. An engine call takes whole requests in arrival order up
to ``max_batch_tokens`` (only a request larger than that is split, into call-sized pieces) and runs as one
``embed_valid_ids`` call without normalisation; each request gets its own rows back and finishes them with its
own options (``pipeline.finish``), so per-request settings hold inside a shared batch. The JAX work never runs
on the event loop. The records it keeps are ``jobs.py``'s.

Admission happens before a request is tokenised, on an estimate of its tokens that holds its place until the
real count replaces it. The queue is bounded in requests, in tokens, and in time: the worker times its full
engine calls, so the wait before a new request would start is the rest of the call in flight plus the calls
that take the work ahead of it. A request that would wait past ``max_queue_wait_ms`` is refused at once with
429 and a ``Retry-After``, rather than queued to time out at its client. Work nobody waits for never reaches
the model: a request whose client went away is taken off the queue (what is left of a big one is skipped),
and one still queued at its deadline is answered 429 then instead of being embedded late (the deadline counts
from admission, but a request that reaches an idle worker with nothing ahead of it is started whatever its
tokenising took: an idle server answers no 429).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .errors import RetryLater, shutting_down, whole_seconds
from .jobs import Call, Job, Throughput, Ticket, reply, settle
from .metrics import Metrics

logger = logging.getLogger("e5lite.serve")


class TokenEmbedder(Protocol):
    """What the worker needs of an encoder: embeddings of token id sequences, in input order. The handlers
    validated the ids (the request models, then ``pipeline.prepare``), so the encoder does not again."""

    def embed_valid_ids(
        self,
        ids: Sequence[np.ndarray],
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray: ...


class Batcher:
    """Queues Jobs within the limits, and runs them on its own thread through ``embedder.embed_valid_ids`` in calls
    of up to ``max_batch_tokens`` tokens, waiting up to ``max_wait_ms`` for batch-mates to fill one."""

    def __init__(
        self,
        embedder: TokenEmbedder,
        metrics: Metrics,
        *,
        max_queue: int,
        max_queue_tokens: int,
        max_batch_tokens: int,
        max_wait_ms: float,
        max_queue_wait_ms: float,
    ):
        self.embedder, self.metrics = embedder, metrics
        self.max_queue, self.max_queue_tokens, self.max_batch_tokens = max_queue, max_queue_tokens, max_batch_tokens
        self.max_wait, self.max_queue_wait = max_wait_ms / 1000, max_queue_wait_ms / 1000
        self.throughput = Throughput(max_batch_tokens)
        self._jobs: collections.deque[Job] = collections.deque()  # oldest first; the head may be partly taken
        self._queued_tokens = 0  # tokens of the queued jobs not yet handed to a call
        self._reserved, self._reserved_tokens = 0, 0  # admitted requests being tokenised, their estimate
        self.tokens_per_char = 0.3  # for estimates before tokenising; learnt from the requests
        self._call: Call | None = None  # in flight
        self._cond = threading.Condition()
        self._stopping = False
        self.thread = threading.Thread(target=self._work, name="e5lite-batcher", daemon=True)

    # --------------------------------------------------------------------------------- the event loop's side

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stops the worker after its current call; whatever is still queued is failed (503)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.fail_all(shutting_down())
        if self.thread.is_alive():
            self.thread.join(timeout=timeout)

    def state(self) -> dict:
        """Requests and tokens queued, and admitted but still being tokenised (their tokens estimated); the
        measured throughput, and the wait a new request would have now."""
        with self._cond:
            return {
                "queue_depth": len(self._jobs),
                "queue_tokens": self._queued_tokens,
                "tokenising": self._reserved,
                "tokenising_tokens": self._reserved_tokens,
                "tokens_per_second": self.throughput.tokens_per_s or 0.0,
                "queue_wait_seconds": self._wait(time.monotonic()) or 0.0,
            }

    def admit(self, tokens: int, chars: int = 0) -> Ticket:
        """Admits a request of about ``tokens`` tokens (``chars`` characters), before it is tokenised: its
        estimate holds its place in the bounds until ``embed`` queues it, so a crowd arriving at once cannot
        all get past an empty queue. RetryLater (429) at once if the queue has no room for it."""
        now = time.monotonic()
        with self._cond:
            self._admit(tokens, now)
            self._reserved += 1
            self._reserved_tokens += tokens
        return Ticket(tokens, chars, now)

    def refuse_if_full(self) -> None:
        """RetryLater (429) at once if even the smallest request would be refused now: checked before a
        request's body is read, so that a flood costs the server only its refusals."""
        with self._cond:
            self._admit(1, time.monotonic())

    def release(self, ticket: Ticket) -> None:
        """Gives back an admission ``embed`` did not use (the request failed, or its client left, first)."""
        with self._cond:
            self._unreserve(ticket)

    async def embed(self, ids: list[np.ndarray], ticket: Ticket | None = None) -> np.ndarray:
        """Unnormalised embeddings [len(ids), dim]. Admits the request now unless ``ticket`` (from ``admit``)
        says it was; RetryLater (429) if not admitted, or not started by its deadline (``max_queue_wait_ms``
        after admission). Cancelling the caller (its client went away) takes the request off the queue."""
        tokens = sum(len(i) for i in ids)
        ticket = ticket or self.admit(tokens)
        loop = asyncio.get_running_loop()
        deadline = ticket.admitted_at + self.max_queue_wait
        job = Job(ids, tokens, loop, loop.create_future(), ticket.admitted_at, deadline)
        with self._cond:
            self._unreserve(ticket)
            if self._stopping:
                raise shutting_down()
            if not self._jobs and self._call is None:
                # nothing ahead and the worker idle: it starts on this now, however long tokenising took, so
                # the deadline must not refuse it (an idle server never answers 429)
                job.expires = max(job.expires, time.monotonic() + self.max_queue_wait)
            if ticket.chars:  # a moving average, so that the estimates follow the language of the traffic
                self.tokens_per_char += 0.2 * (tokens / ticket.chars - self.tokens_per_char)
            self._jobs.append(job)
            self._queued_tokens += job.tokens
            self._cond.notify()
        # refused at the deadline, not when the worker next looks (which may be a long call later); one timer
        # on the loop rather than wait_for(shield(...)), whose extra futures cost a request several loop turns
        timer = loop.call_later(max(0.0, job.expires - time.monotonic()), self._expire_if_waiting, job)
        try:
            return await job.future  # a job started in time finishes
        except asyncio.CancelledError:
            self.abandon(job)
            raise
        finally:
            timer.cancel()

    def _expire_if_waiting(self, job: Job) -> None:
        """On the loop at a job's deadline: refuses it (429) unless the worker has started on it."""
        with self._cond:
            expired = job.taken == 0 and not job.dropped
            if expired:
                job.dropped = True
                self._forget(job)
        if expired:
            settle(job.future, None, self._expired(job))

    def abandon(self, job: Job) -> None:
        """Takes a job whose client went away off the queue; a part in flight still finishes."""
        with self._cond:
            if job.dropped or job.done == len(job.ids):
                return
            job.dropped = True
            self._forget(job)
        self.metrics.skipped(len(job.ids) - job.taken)

    def fail_all(self, error: BaseException) -> None:
        """Answers every queued and in-flight job with ``error`` (shutdown past its timeout)."""
        with self._cond:
            jobs = list(self._jobs) + ([p[0] for p in self._call.pieces] if self._call else [])
            jobs = [job for job in jobs if not job.dropped]  # a dropped one has its answer, or nobody waits
            for job in jobs:
                job.dropped = True
            self._jobs.clear()
            self._queued_tokens = 0
        for job in dict.fromkeys(jobs):
            reply(job, error=error)

    # ----------------------------------------------------------------------------- under the condition's lock

    def _calls_before(self, tokens: int) -> int:
        """Engine calls that take the tokens ahead before one has room for a request of ``tokens`` tokens (one
        that fits a call is not split)."""
        ahead, call = self._queued_tokens + self._reserved_tokens, self.max_batch_tokens
        return (ahead + max(1, min(tokens, call)) - 1) // call

    def _wait(self, now: float, tokens: int = 1) -> float | None:
        """Seconds before the worker would start on a request of ``tokens`` tokens queued now: the rest of the
        call in flight, then the calls before it; None until the throughput is known."""
        full_call = self.throughput.seconds(self.max_batch_tokens)
        if full_call is None:  # not measured yet
            return None
        in_flight = 0.0
        if self._call is not None:
            call = self.throughput.seconds(self._call.tokens) or 0.0  # measured: not None
            in_flight = max(0.0, call - (now - self._call.started))
        return in_flight + self._calls_before(tokens) * full_call

    def _admit(self, tokens: int, now: float) -> None:
        if self._stopping:
            raise shutting_down()
        wait = self._wait(now, tokens)
        requests, queued = len(self._jobs) + self._reserved, self._queued_tokens + self._reserved_tokens
        if requests >= self.max_queue:
            self._shed("queue_requests", f"{requests} requests already queued (--max-queue)", wait)
        if requests and queued + tokens > self.max_queue_tokens:
            self._shed(
                "queue_tokens",
                f"{queued} tokens already queued, this request adds about {tokens} "
                f"(--max-queue-tokens {self.max_queue_tokens})",
                self.throughput.seconds(queued + tokens - self.max_queue_tokens),
            )
        if wait is not None and wait > self.max_queue_wait:
            self._shed(
                "queue_wait",
                f"a new request would wait about {wait:.1f} s for the model, past the "
                f"{self.max_queue_wait * 1000:g} ms limit (--max-queue-wait-ms)",
                wait - self.max_queue_wait,
            )

    def _shed(self, reason: str, why: str, retry_after: float | None) -> None:
        self.metrics.shed(reason)
        seconds = whole_seconds(retry_after or 1)
        raise RetryLater(429, f"server busy: {why}; retry in {seconds} s", seconds, code="rate_limit_exceeded")

    def _expired(self, job: Job) -> RetryLater:
        self.metrics.shed("expired")
        waited = time.monotonic() - job.queued_at
        return RetryLater(
            429,
            f"server busy: this request waited {waited:.1f} s in the queue, past the "
            f"{self.max_queue_wait * 1000:g} ms limit (--max-queue-wait-ms); retry later",
            self.max_queue_wait,
            code="rate_limit_exceeded",
        )

    def _unreserve(self, ticket: Ticket) -> None:
        if not ticket.used:
            ticket.used = True
            self._reserved -= 1
            self._reserved_tokens -= ticket.tokens

    def _forget(self, job: Job) -> None:
        """Takes a job off the queue, and its waiting tokens off the count."""
        with contextlib.suppress(ValueError):  # not queued any more: fully taken, in flight
            self._jobs.remove(job)
            self._queued_tokens -= job.waiting_tokens

    # ------------------------------------------------------------------------------------- the worker's side

    def _take(self) -> tuple[Call | None, list[Job]]:
        """The next engine call (None: stopping), and the jobs that expired in the queue meanwhile."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None, []
            # Wait for batch-mates only while other admitted requests are still being tokenised (they join
            # as soon as their tokens are ready) and no full call is queued: a request at an idle server starts
            # at once.
            until = time.monotonic() + self.max_wait
            while self._queued_tokens < self.max_batch_tokens and self._reserved > 0 and not self._stopping:
                left = until - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            now = time.monotonic()
            call, expired = Call(started=now), []
            while self._jobs and call.tokens < self.max_batch_tokens:
                job = self._jobs[0]
                if job.taken == 0 and now > job.expires:
                    job.dropped = True
                    self._forget(job)
                    expired.append(job)
                    continue
                lo = hi = job.taken
                if call.tokens + job.waiting_tokens <= self.max_batch_tokens:
                    hi, taken_tokens = len(job.ids), job.waiting_tokens  # all of it
                elif call.tokens == 0:
                    # larger than a call: call-sized pieces of whole texts (one text over the budget goes alone)
                    taken_tokens = 0
                    while hi < len(job.ids) and (hi == lo or taken_tokens + len(job.ids[hi]) <= self.max_batch_tokens):
                        taken_tokens += len(job.ids[hi])
                        hi += 1
                else:
                    break  # a request that fits one call is not split: it starts the next one
                call.tokens += taken_tokens
                job.taken, job.taken_tokens = hi, job.taken_tokens + taken_tokens
                self._queued_tokens -= taken_tokens
                call.pieces.append((job, lo, hi))
                if hi < len(job.ids):
                    break  # the call is full; the rest of this job starts the next one
                self._jobs.popleft()
            self._call = call if call.pieces else None
            return call, expired

    def _work(self) -> None:
        while True:
            call, expired = self._take()
            for job in expired:
                reply(job, error=self._expired(job))
            if call is None:
                return
            if call.pieces:
                self._run(call)

    def _run(self, call: Call) -> None:
        ids = [i for job, lo, hi in call.pieces for i in job.ids[lo:hi]]
        t0 = time.perf_counter()
        try:
            emb = self.embedder.embed_valid_ids(ids, normalize=False, show_progress_bar=False)
        except Exception as e:  # fail these requests, keep serving
            logger.exception("e5lite serve: embedding a batch failed")
            with self._cond:
                self._call = None
                failed = [job for job, _, _ in call.pieces if not job.dropped]
                for job in failed:
                    job.dropped = True
                    self._forget(job)  # the rest of a partly taken job is not worth embedding now
            for job in dict.fromkeys(failed):
                reply(job, error=e)
            return
        seconds = time.perf_counter() - t0
        with self._cond:
            self.throughput.observe(call.tokens, seconds)
            self._call = None
        self.metrics.batch(len(call.pieces), len(ids), call.tokens)
        start = 0
        for job, lo, hi in call.pieces:
            rows = emb[start : start + hi - lo]
            start += hi - lo
            if job.dropped:
                continue
            if lo == 0 and hi == len(job.ids):  # the whole request in this call: no copy
                job.done = hi
                reply(job, rows)
                continue
            if job.out is None:
                job.out = np.empty((len(job.ids), emb.shape[1]), emb.dtype)
            job.out[lo:hi] = rows
            job.done += hi - lo
            if job.done == len(job.ids):
                reply(job, job.out)
