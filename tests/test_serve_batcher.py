"""The batch worker (e5lite/serve/batcher.py) against a fake encoder: grouping by tokens, rows back to the right
request, failures and a full queue."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from e5lite.errors import ApiError
from e5lite.serve.batcher import Batcher
from e5lite.serve.metrics import Metrics


class FakeEmbedder:
    """Row i is [length of ids[i], first id of ids[i]]; records each call's ids; fails on a first id of -1."""

    def __init__(self):
        self.calls: list[list[np.ndarray]] = []
        self.lock = threading.Lock()

    def embed_ids(self, ids, *, normalize=True, batch_size=None, show_progress_bar=None):
        assert normalize is False and show_progress_bar is False  # each request normalises its own rows
        with self.lock:
            self.calls.append(list(ids))
        if any(i[0] == -1 for i in ids):
            raise RuntimeError("device lost")
        return np.array([[len(i), i[0]] for i in ids], np.float32)


def request(first: int, *lengths: int) -> list[np.ndarray]:
    return [np.full(n, first + k, np.int32) for k, n in enumerate(lengths)]


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


def make(max_batch_tokens=1000, max_wait_ms=200.0, max_queue=16):
    fake, metrics = FakeEmbedder(), Metrics()
    return fake, metrics, Batcher(fake, metrics, max_queue=max_queue, max_batch_tokens=max_batch_tokens,
                                  max_wait_ms=max_wait_ms)


def test_concurrent_requests_share_one_call_and_get_their_own_rows():
    fake, metrics, batcher = make()
    requests = [request(10, 3, 4), request(20, 5), request(30, 1, 1, 2)]
    results = run(batcher, *requests)
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 6
    for r, rows in zip(requests, results):
        np.testing.assert_array_equal(rows, [[len(i), i[0]] for i in r])
    assert metrics.batch_requests.count == 1 and metrics.batch_requests.sum == 3
    assert metrics.texts == 6 and metrics.tokens == 16


def test_groups_stay_within_the_token_budget():
    fake, _, batcher = make(max_batch_tokens=12)
    requests = [request(100 * k, 3, 3) for k in range(1, 6)] + [request(900, 25)]  # the last alone is over it
    results = run(batcher, *requests)
    for r, rows in zip(requests, results):
        np.testing.assert_array_equal(rows, [[len(i), i[0]] for i in r])
    # a request that would overflow a group starts the next one, so the order holds
    assert [sum(len(i) for i in call) for call in fake.calls] == [12, 12, 6, 25]
    assert [i[0] for call in fake.calls for i in call] == [i[0] for r in requests for i in r]


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


def test_a_full_queue_answers_429():
    _, _, batcher = make(max_queue=1)  # not started: nothing drains the queue

    async def main():
        waiting = asyncio.ensure_future(batcher.embed(request(1, 2)))
        await asyncio.sleep(0)  # let it queue
        with pytest.raises(ApiError) as info:
            await batcher.embed(request(2, 2))
        waiting.cancel()
        return info.value

    e = asyncio.run(main())
    assert (e.status, e.code) == (429, "queue_full")
    assert e.message == "server busy: 1 requests already queued; retry later"
