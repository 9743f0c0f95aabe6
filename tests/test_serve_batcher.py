"""The batch worker (e5lite/serve/batcher.py) against a fake encoder: grouping by tokens, rows back to the right
request, failures, and admission: the request, token and wait bounds, expiry in the queue, abandoned requests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pydantic")

from e5lite.serve.batcher import Batcher, Throughput  # noqa: E402
from e5lite.serve.metrics import Metrics  # noqa: E402
from e5lite.serve.errors import RetryLater  # noqa: E402


class FakeEmbedder:
    """Row i is [length of ids[i], first id of ids[i]]; records each call's ids; fails on a first id of -1.
    With ``gated``, each call first waits for a permit from ``gate.release()``."""

    def __init__(self, gated: bool = False):
        self.calls: list[list[np.ndarray]] = []
        self.lock = threading.Lock()
        self.gate = threading.Semaphore(0) if gated else None
        self.entered = threading.Semaphore(0)  # one permit per call started

    def embed_valid_ids(self, ids, *, normalize=True, batch_size=None, show_progress_bar=None):
        assert normalize is False and show_progress_bar is False  # each request normalises its own rows
        with self.lock:
            self.calls.append(list(ids))
        self.entered.release()
        if self.gate is not None:
            assert self.gate.acquire(timeout=10), "the test never opened the gate"
        if any(i[0] == -1 for i in ids):
            raise RuntimeError("device lost")
        return np.array([[len(i), i[0]] for i in ids], np.float32)

    def first_ids(self) -> list[int]:
        with self.lock:
            return [int(i[0]) for call in self.calls for i in call]


def request(first: int, *lengths: int) -> list[np.ndarray]:
    return [np.full(n, first + k, np.int32) for k, n in enumerate(lengths)]


def rows_of(r: list[np.ndarray]) -> list[list[int]]:
    return [[len(i), i[0]] for i in r]


def run(batcher: Batcher, *requests, started: bool = True):
    """Sends the requests concurrently; their results (rows, or the exception) in order."""
    async def main():
        return await asyncio.gather(*(batcher.embed(r) for r in requests), return_exceptions=True)
    if started:
        batcher.start()
    try:
        return asyncio.run(main())
    finally:
        batcher.stop()


def make(max_batch_tokens=1000, max_wait_ms=200.0, max_queue=16, max_queue_tokens=10_000, max_queue_wait_ms=60_000,
         gated=False, tokens_per_s: float | None = 1e9):
    """A fake encoder, metrics and a batcher; ``tokens_per_s``: the throughput as if measured (None: not yet;
    by default fast enough that the wait never matters)."""
    fake, metrics = FakeEmbedder(gated), Metrics()
    batcher = Batcher(fake, metrics, max_queue=max_queue, max_queue_tokens=max_queue_tokens,
                      max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_queue_wait_ms=max_queue_wait_ms)
    if tokens_per_s is not None:
        batcher.throughput.mean = max_batch_tokens / tokens_per_s  # and no deviation: waits exactly as computed
    return fake, metrics, batcher


async def until(condition, timeout=10.0):
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        await asyncio.sleep(0.005)


def test_concurrent_requests_share_one_call_and_get_their_own_rows():
    fake, metrics, batcher = make()
    requests = [request(10, 3, 4), request(20, 5), request(30, 1, 1, 2)]
    results = run(batcher, *requests)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 6
    for r, rows in zip(requests, results):
        np.testing.assert_array_equal(rows, rows_of(r))
    assert metrics.batch_requests.count == 1 and metrics.batch_requests.sum == 3
    assert metrics.texts == 6 and metrics.tokens == 16


def test_calls_stay_within_the_token_budget_and_split_big_requests():
    fake, _, batcher = make(max_batch_tokens=12)
    requests = [request(100 * k, 3, 3) for k in range(1, 6)] + [request(900, 25)]  # the last alone is over it
    requests.append(request(1000, *[5] * 7))  # 35 tokens: spread over calls, rows still in order
    results = run(batcher, *requests)
    for r, rows in zip(requests, results):
        np.testing.assert_array_equal(rows, rows_of(r))
    # whole texts fill each call in arrival order; one text over the budget goes alone
    assert [sum(len(i) for i in call) for call in fake.calls] == [12, 12, 6, 25, 10, 10, 10, 5]
    assert fake.first_ids() == [i[0] for r in requests for i in r]


def test_a_failing_call_fails_its_requests_and_the_worker_goes_on():
    fake, metrics, batcher = make(max_wait_ms=0)

    async def main():
        bad = await asyncio.gather(batcher.embed(request(-1, 2)), return_exceptions=True)
        good = await batcher.embed(request(5, 2))
        return bad[0], good

    batcher.start()
    try:
        error, rows = asyncio.run(main())
    finally:
        batcher.stop()
    assert isinstance(error, RuntimeError) and str(error) == "device lost"
    np.testing.assert_array_equal(rows, [[2, 5]])
    assert batcher.thread.is_alive() is False and metrics.batch_requests.count == 1


def refused(batcher: Batcher, *queued, then) -> RetryLater:
    """The RetryLater for ``then`` with ``queued`` waiting in a batcher whose worker is not running."""
    async def main():
        waiting = [asyncio.ensure_future(batcher.embed(r)) for r in queued]
        await asyncio.sleep(0)  # let them queue
        try:
            t0 = time.perf_counter()
            with pytest.raises(RetryLater) as info:
                await batcher.embed(then)
            assert time.perf_counter() - t0 < 0.05  # at once, not after a wait
            return info.value
        finally:
            for w in waiting:
                w.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
    return asyncio.run(main())


def test_a_full_queue_answers_429():
    _, metrics, batcher = make(max_queue=1)
    e = refused(batcher, request(1, 2), then=request(2, 2))
    assert (e.status, e.code, e.retry_after) == (429, "rate_limit_exceeded", 1)
    assert e.message == "server busy: 1 requests already queued (--max-queue); retry in 1 s"
    assert metrics.shed_requests == {"queue_requests": 1}


def test_the_token_bound_refuses_what_would_pass_it_but_never_an_empty_queue():
    _, metrics, batcher = make(max_queue_tokens=10)
    e = refused(batcher, request(1, 3, 3), then=request(2, 5))
    assert e.status == 429 and e.message.startswith(
        "server busy: 6 tokens already queued, this request adds about 5 (--max-queue-tokens 10)")
    assert metrics.shed_requests == {"queue_tokens": 1}
    # a request over the bound on its own still runs when nothing waits: else it could never be served
    rows, = run(batcher, request(3, 40))
    np.testing.assert_array_equal(rows, [[40, 3]])


def test_the_measured_throughput_refuses_a_request_that_would_wait_past_the_deadline():
    # 1,000 tokens/s, as if measured: 0.1 s per full call
    _, metrics, batcher = make(max_batch_tokens=100, max_queue_wait_ms=500, tokens_per_s=1000.0)
    # a request that fits a call waits for the calls that take what is ahead of it: after 5 x 100 tokens
    # 0.5 s (admitted), after 6, 0.6 s; one of 20 tokens still fits the sixth call with 2 x 40
    e = refused(batcher, *[request(k, 100) for k in range(6)], then=request(7, 1))
    assert e.status == 429 and e.retry_after == 1
    assert e.message == ("server busy: a new request would wait about 0.6 s for the model, past the 500 ms limit "
                         "(--max-queue-wait-ms); retry in 1 s")
    # the same with admissions alone (requests still being tokenised count as ahead)
    tickets = [batcher.admit(n) for n in (100, 100, 100, 100, 100, 40, 40, 20)]  # the last three share a call
    with pytest.raises(RetryLater, match="would wait about 0.6 s"):
        batcher.admit(1)
    for ticket in tickets:
        batcher.release(ticket)
    assert metrics.shed_requests == {"queue_wait": 2}
    state = batcher.state()  # what /metrics shows; the refused ones left
    assert state["queue_depth"] == 0 and state["queue_tokens"] == 0 and state["tokens_per_second"] == 1000


def test_admission_before_tokenising_holds_a_place_so_a_crowd_cannot_all_get_in():
    fake, metrics, batcher = make(max_batch_tokens=100, max_queue_wait_ms=500, tokens_per_s=1000.0)
    first, second = batcher.admit(300, chars=1000), batcher.admit(300, chars=1000)  # waits 0 s and 0.3 s
    with pytest.raises(RetryLater, match="would wait about 0.6 s"):  # past 500 ms
        batcher.admit(1)  # nothing is queued yet, but the two admitted ones are ahead of it
    assert batcher.state()["tokenising"] == 2 and batcher.state()["tokenising_tokens"] == 600
    batcher.release(first)  # its request failed before reaching the queue
    batcher.release(first)  # only once
    third = batcher.admit(300)
    assert batcher.state()["tokenising_tokens"] == 600

    async def main():
        # the estimates give way to the real counts; the deadline counts from admission
        return await asyncio.gather(batcher.embed(request(1, 250), second), batcher.embed(request(2, 40), third))

    batcher.start()
    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(rows[0], [[250, 1]])
    assert batcher.state()["queue_tokens"] == batcher.state()["tokenising_tokens"] == 0
    assert metrics.shed_requests == {"queue_wait": 1}
    assert batcher.tokens_per_char == pytest.approx(0.3 + 0.2 * (0.25 - 0.3))  # learnt from the second


def test_a_request_admitted_before_its_deadline_but_queued_after_it_behind_work_is_refused():
    fake, metrics, batcher = make(max_queue_wait_ms=50, max_wait_ms=0, gated=True)

    async def main():
        first = asyncio.ensure_future(batcher.embed(request(1, 4)))
        await until(lambda: fake.calls)  # in flight, held at the gate: the worker is busy
        ticket = batcher.admit(4)
        time.sleep(0.1)  # tokenising took longer than the deadline
        with pytest.raises(RetryLater, match=r"waited 0\.\d s in the queue, past the 50 ms limit"):
            await batcher.embed(request(2, 4), ticket)
        fake.gate.release()
        return await first

    batcher.start()
    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(rows, [[4, 1]])
    assert fake.first_ids() == [1] and metrics.shed_requests == {"expired": 1}


def test_an_idle_server_serves_a_request_whose_tokenising_outlasted_the_deadline():
    # a 429 says "retry later"; at an idle server the worker starts on it at once, so it is served instead
    fake, metrics, batcher = make(max_queue_wait_ms=50)
    ticket = batcher.admit(4)
    time.sleep(0.1)  # tokenising took longer than the deadline

    async def main():
        return await batcher.embed(request(1, 4), ticket)

    batcher.start()
    try:
        rows = asyncio.run(main())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(rows, [[4, 1]])
    assert fake.first_ids() == [1] and metrics.shed_requests == {}


def test_a_request_still_queued_at_its_deadline_is_refused_without_reaching_the_model():
    fake, metrics, batcher = make(max_queue_wait_ms=100, max_wait_ms=0, gated=True)

    async def main():
        first = asyncio.ensure_future(batcher.embed(request(1, 4)))
        await until(lambda: fake.calls)  # in flight, held at the gate
        late = asyncio.ensure_future(batcher.embed(request(2, 4)))
        await asyncio.sleep(0.3)
        fake.gate.release()
        return await asyncio.gather(first, late, return_exceptions=True)

    batcher.start()
    try:
        rows, error = asyncio.run(main())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(rows, [[4, 1]])
    assert isinstance(error, RetryLater) and error.status == 429
    assert error.message.startswith("server busy: this request waited 0.") and "past the 100 ms limit" in error.message
    assert fake.first_ids() == [1] and metrics.shed_requests == {"expired": 1}


def test_an_abandoned_request_leaves_the_queue_and_the_rest_of_a_big_one_is_skipped():
    fake, metrics, batcher = make(max_batch_tokens=10, max_wait_ms=0, gated=True)

    async def main():
        big = asyncio.ensure_future(batcher.embed(request(100, *[5] * 8)))  # 40 tokens: 4 calls of 10
        await until(lambda: fake.calls)  # its first call is in flight
        queued = asyncio.ensure_future(batcher.embed(request(200, 5)))
        await until(lambda: batcher.state()["queue_depth"] == 2)
        assert batcher.state()["queue_tokens"] == 35
        queued.cancel()  # what the handler does when its client disconnects
        big.cancel()
        await asyncio.gather(big, queued, return_exceptions=True)
        assert batcher.state() | {"tokens_per_second": 0} == {
            "queue_depth": 0, "queue_tokens": 0, "tokenising": 0, "tokenising_tokens": 0, "tokens_per_second": 0,
            "queue_wait_seconds": 0}
        fake.gate.release()  # the call in flight finishes; nothing else of the big one runs
        fake.gate.release()  # and the next call may run
        return await asyncio.wait_for(batcher.embed(request(300, 3)), 10)

    batcher.start()
    try:
        after = asyncio.run(main())
    finally:
        batcher.stop()
    np.testing.assert_array_equal(after, [[3, 300]])
    assert fake.first_ids() == [100, 101, 300]
    assert metrics.skipped_texts == 6 + 1


def test_stop_answers_what_is_left_with_503():
    _, _, batcher = make()  # the worker never runs

    async def main():
        waiting = asyncio.ensure_future(batcher.embed(request(1, 2)))
        await asyncio.sleep(0)
        batcher.stop(timeout=0)
        return await asyncio.gather(waiting, return_exceptions=True)

    error, = asyncio.run(main())
    assert isinstance(error, RetryLater) and (error.status, error.code) == (503, "shutting_down")


def test_throughput_counts_full_calls_and_keeps_headroom_for_their_spread():
    t = Throughput(full_call=1000)
    t.observe(100, 0.1)  # a small call is mostly the fixed cost of a call: not a sample
    assert t.seconds(500) is None
    t.observe(500, 0.5)  # half a call: counted as a full one at that pace
    assert t.tokens_per_s == 1000 and t.seconds(500) == pytest.approx(0.5 * (1 + 0.25))
    for _ in range(30):
        t.observe(1000, 1.0)  # steady: the headroom shrinks
    assert t.seconds(1000) == pytest.approx(1.0, rel=0.01)
    t.observe(1000, 100.0)  # one call 100x slower (a compile): a bounded step, and more headroom
    assert t.mean == pytest.approx(1.0 + 0.25 * 3.0) and t.seconds(1000) > 2.5
    for _ in range(30):
        t.observe(1000, 0.5)
    assert t.tokens_per_s == pytest.approx(2000, rel=0.01) and t.seconds(1000) == pytest.approx(0.5, rel=0.02)


def test_a_request_at_an_idle_server_starts_at_once():
    """The worker waits for batch-mates only while admitted requests are still being tokenised: a lone request
    does not sit out --max-wait-ms (here 2 s)."""
    fake, metrics, batcher = make(max_wait_ms=2000.0)
    batcher.start()
    try:
        time.sleep(0.05)  # the worker is idle, waiting for work
        t0 = time.monotonic()
        rows = asyncio.run(batcher.embed(request(5, 3)))
        assert time.monotonic() - t0 < 0.5
        np.testing.assert_array_equal(rows, rows_of(request(5, 3)))
    finally:
        batcher.stop()


def test_refuse_if_full_refuses_only_when_no_request_could_be_admitted_and_reserves_nothing():
    _, metrics, batcher = make(max_queue=2)
    batcher.refuse_if_full()  # idle: never
    first = batcher.admit(5)
    batcher.refuse_if_full()  # room for one more
    second = batcher.admit(5)
    with pytest.raises(RetryLater, match=r"^server busy: 2 requests already queued \(--max-queue\)"):
        batcher.refuse_if_full()
    assert batcher.state()["tokenising"] == 2 and metrics.shed_requests == {"queue_requests": 1}
    batcher.release(first)
    batcher.refuse_if_full()
    batcher.release(second)
    assert batcher.state()["tokenising"] == 0
