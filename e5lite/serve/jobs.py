"""The batch worker's records: a request's job on the queue, its admission ticket, an engine call, and the
measured engine throughput that the queue's wait estimates come from (see ``batcher.py``)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(eq=False)
class Job:
    """One request's token ids (prompt and truncation applied), the future its handler awaits, and how far the
    worker has got with it."""

    ids: list[np.ndarray]
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float  # time.monotonic()
    expires: float  # the worker must start on it by then, or refuse it
    taken: int = 0  # texts handed to engine calls so far
    taken_tokens: int = 0
    done: int = 0  # texts embedded
    out: np.ndarray | None = None
    dropped: bool = False  # answered already (failed, expired, or its client left): skip the rest

    @property
    def waiting_tokens(self) -> int:
        return self.tokens - self.taken_tokens


def settle(future: asyncio.Future, value, error) -> None:
    """On the job's loop: the handler's future gets the rows or the error, unless nobody waits any more."""
    if future.done():  # the client went away and the handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def reply(job: Job, value=None, error: BaseException | None = None) -> None:
    """Hands a result to the job's event loop from the worker thread."""
    with contextlib.suppress(RuntimeError):  # the loop closed: server shutting down
        job.loop.call_soon_threadsafe(settle, job.future, value, error)


@dataclass
class Throughput:
    """How long a full engine call takes: a moving average, and the average deviation from it (as TCP keeps
    for round trips). Waits are estimated with a full call taking the mean plus the deviation, so the estimate
    leaves more headroom where calls vary more (new shapes compiling, another process on the cores): a request
    let in on an estimate that proves short waits the whole deadline for its 429.

    The wait matters under load, when calls are full; a small call says little, as a call's fixed cost
    dominates it (on a GPU by far), so only calls of at least half ``full_call`` tokens count, scaled to a
    full call. Calls that compile count: while many do (a cold server), the engine is that slow. One odd call
    moves the mean by a bounded step."""

    full_call: int  # tokens of a full engine call
    weight: float = 0.25
    mean: float | None = None  # seconds per full call
    deviation: float = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < self.full_call / 2 or seconds <= 0:
            return
        sample = seconds * self.full_call / tokens
        if self.mean is None:
            self.mean, self.deviation = sample, sample / 4  # one sample: not much certainty yet
            return
        error = min(max(sample, self.mean / 4), self.mean * 4) - self.mean
        self.mean += self.weight * error
        self.deviation += self.weight * (abs(error) - self.deviation)

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.mean is None else self.full_call / self.mean

    def seconds(self, tokens: float) -> float | None:
        """A cautious estimate of the engine time ``tokens`` tokens take; None until measured."""
        return None if self.mean is None else tokens / self.full_call * (self.mean + self.deviation)


@dataclass(eq=False)
class Ticket:
    """An admitted request on its way to the queue (being tokenised): its estimated tokens, its size in
    characters, and when it was admitted (its deadline counts from then)."""

    tokens: int
    chars: int
    admitted_at: float
    used: bool = False


@dataclass
class Call:
    """One engine call: pieces (job, first text, end) in order, their token count, when it started."""

    pieces: list[tuple[Job, int, int]] = field(default_factory=list)
    tokens: int = 0
    started: float = 0.0
