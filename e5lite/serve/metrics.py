"""Prometheus text for ``GET /metrics``: request counts and latencies by route, engine-call sizes, the queue,
requests shed and abandoned."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """A cumulative Prometheus histogram over fixed bucket bounds."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


def _head(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


@dataclass
class Metrics:
    """Counters and histograms for /metrics; updated from the event loop and the batch worker."""

    requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    latency: dict = field(default_factory=dict)  # route -> Histogram
    shed_latency: dict = field(default_factory=dict)  # route -> Histogram of its 429s alone
    batch_texts: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    texts: int = 0
    tokens: int = 0
    shed_requests: Counter = field(default_factory=Counter)  # reason -> count
    skipped_texts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[route, status] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)
            if status == 429:  # how fast an overloaded server says so
                self.shed_latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, requests: int, texts: int, tokens: int) -> None:
        with self.lock:
            self.batch_texts.observe(texts)
            self.batch_requests.observe(requests)
            self.texts += texts
            self.tokens += tokens

    def shed(self, reason: str) -> None:
        with self.lock:
            self.shed_requests[reason] += 1

    def skipped(self, texts: int) -> None:
        with self.lock:
            self.skipped_texts += texts

    def render(self, queue: dict, queue_capacity: int) -> str:
        """The Prometheus text of the counters and histograms, and of the queue's gauges; ``queue``: the batch
        worker's ``state()``."""
        with self.lock:
            out = self._counted()
        out += _gauges(queue, queue_capacity)
        return "\n".join(out) + "\n"

    def _counted(self) -> list[str]:
        """The counters' and histograms' lines; the caller holds the lock."""
        out = _head("e5lite_requests_total", "counter", "HTTP requests by route and status code.")
        out += [f'e5lite_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
        out += _head("e5lite_request_duration_seconds", "histogram", "Request latency by route.")
        for r, h in sorted(self.latency.items()):
            out += h.lines("e5lite_request_duration_seconds", f'route="{r}"')
        out += _head("e5lite_shed_duration_seconds", "histogram", "Latency of the 429 answers by route.")
        for r, h in sorted(self.shed_latency.items()):
            out += h.lines("e5lite_shed_duration_seconds", f'route="{r}"')
        out += _head("e5lite_batch_texts", "histogram", "Texts per engine call (one dynamic batch).")
        out += self.batch_texts.lines("e5lite_batch_texts")
        out += _head("e5lite_batch_requests", "histogram", "Requests grouped into one engine call.")
        out += self.batch_requests.lines("e5lite_batch_requests")
        out += _head("e5lite_texts_embedded_total", "counter", "Texts embedded.") + [
            f"e5lite_texts_embedded_total {self.texts}"
        ]
        out += _head("e5lite_tokens_embedded_total", "counter", "Tokens embedded (after truncation).") + [
            f"e5lite_tokens_embedded_total {self.tokens}"
        ]
        out += _head(
            "e5lite_requests_shed_total",
            "counter",
            "Requests answered 429 by reason: the queue's "
            "request, token or wait bound at admission, or expired while queued.",
        )
        out += [f'e5lite_requests_shed_total{{reason="{r}"}} {n}' for r, n in sorted(self.shed_requests.items())]
        out += _head(
            "e5lite_texts_skipped_total",
            "counter",
            "Texts never embedded because their client went away first (its requests count as status 499).",
        ) + [f"e5lite_texts_skipped_total {self.skipped_texts}"]
        return out


def _gauges(queue: dict, queue_capacity: int) -> list[str]:
    """The lines of the queue's gauges, from the batch worker's ``state()``."""
    gauges = [
        (
            "e5lite_queue_depth",
            "Requests admitted and waiting for the model (being tokenised included).",
            queue["queue_depth"] + queue["tokenising"],
        ),
        ("e5lite_queue_capacity", "Queue size in requests; a full queue answers 429.", queue_capacity),
        (
            "e5lite_queue_tokens",
            "Tokens waiting for the model (estimated for those being tokenised).",
            queue["queue_tokens"] + queue["tokenising_tokens"],
        ),
        (
            "e5lite_queue_wait_seconds",
            "Estimated wait before the model starts on a new request.",
            f"{queue['queue_wait_seconds']:.3f}",
        ),
        (
            "e5lite_throughput_tokens_per_second",
            "Measured engine throughput (moving average).",
            f"{queue['tokens_per_second']:.1f}",
        ),
    ]
    out: list[str] = []
    for name, text, value in gauges:
        out += _head(name, "gauge", text) + [f"{name} {value}"]
    return out
