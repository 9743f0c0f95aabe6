"""``e5lite serve``: an HTTP embedding server with OpenAI (``POST /v1/embeddings``) and TEI (``POST /embed``)
routes, ``GET /health``, ``/info`` and ``/metrics`` (Prometheus text), on Starlette + uvicorn.

Each request is validated and tokenised (for usage counts and length limits) in the thread pool, then put on
a bounded queue; a full queue answers 429. One worker thread drains the queue, groups requests up to a token
budget or a few milliseconds of waiting, runs ``Encoder.encode`` once on the group without normalisation and
hands each request its rows, which it normalises (or not) itself: per-request options hold inside a shared
batch, and the JAX work never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import __version__

logger = logging.getLogger("e5lite.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Limits:
    """Server limits: inputs per request, queued requests, tokens per engine call (None: 4 x the encoder's
    token budget, 4,096 on CPU), wait for batch-mates."""
    max_inputs: int = 2048
    max_queue: int = 1024
    max_batch_tokens: int | None = None
    max_wait_ms: float = 2.0
    auto_truncate: bool = True


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-line message, and the offending field (OpenAI ``param``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


OPENAI_TYPES = {400: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error", 404: "not_found_error", 405: "invalid_request_error"}
TEI_TYPES = {413: "Validation", 422: "Validation", 429: "Overloaded", 400: "Validation", 415: "Validation",
             404: "Validation", 405: "Validation"}


def error_response(e: ApiError, style: str) -> JSONResponse:
    """OpenAI: {"error": {"message", "type", "param", "code"}}; TEI: {"error", "error_type"}."""
    if style == "openai":
        body = {"error": {"message": e.message, "type": OPENAI_TYPES.get(e.status, "server_error"),
                          "param": e.param, "code": e.code}}
    else:
        body = {"error": e.message, "error_type": TEI_TYPES.get(e.status, "Backend")}
    return JSONResponse(body, status_code=e.status)


# ------------------------------------------------------------------------------------------------ validation

def check_inputs(value, name: str, max_inputs: int, status: int, too_many: int) -> list[str]:
    """A str or a non-empty list of non-empty str -> list; anything else raises naming the index."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise ApiError(status, f"'{name}' must be a string or a list of strings, got {_json_type(value)}", name)
    if not value:
        raise ApiError(status, f"'{name}' must not be empty", name)
    if len(value) > max_inputs:
        raise ApiError(too_many, f"'{name}' has {len(value)} items; at most {max_inputs} per request", name)
    for i, t in enumerate(value):
        if not isinstance(t, str):
            hint = " (token arrays are not supported: send strings)" if type(t) in (int, list) else ""
            raise ApiError(status, f"{name}[{i}] is {_json_type(t)}, expected a string{hint}", name)
        if not t:
            raise ApiError(status, f"{name}[{i}] is an empty string", name)
    return value


def _json_type(v) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


@dataclass
class Parsed:
    """A validated embedding request of either API."""
    texts: list[str]
    prompt_name: str | None = None
    normalize: bool = True
    truncate: bool = True
    encoding_format: str = "float"
    dimensions: int | None = None


def parse_openai(body, dim: int, limits: Limits) -> Parsed:
    """OpenAI embeddings request body -> Parsed; errors are 400 with the field in ``param``."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(body)}")
    for key in ("input", "model"):
        if key not in body:
            raise ApiError(400, f"'{key}' is a required property", key)
    if not isinstance(body["model"], str):
        raise ApiError(400, f"'model' must be a string, got {_json_type(body['model'])}", "model")
    texts = check_inputs(body["input"], "input", limits.max_inputs, 400, 400)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {fmt!r}", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= dim):
        raise ApiError(400, f"'dimensions' must be an integer in [1, {dim}], got {dims!r}", "dimensions")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, f"'user' must be a string, got {_json_type(body['user'])}", "user")
    return Parsed(texts, truncate=limits.auto_truncate, encoding_format=fmt, dimensions=dims)


def parse_tei(body, limits: Limits) -> Parsed:
    """TEI /embed request body -> Parsed; validation errors are 422, too many inputs 413."""
    if not isinstance(body, dict):
        raise ApiError(422, f"request body must be a JSON object, got {_json_type(body)}")
    if "inputs" not in body:
        raise ApiError(422, "missing field 'inputs'", "inputs")
    texts = check_inputs(body["inputs"], "inputs", limits.max_inputs, 422, 413)
    out = Parsed(texts, truncate=limits.auto_truncate)
    for key in ("normalize", "truncate"):
        if body.get(key) is not None:
            if not isinstance(body[key], bool):
                raise ApiError(422, f"'{key}' must be a boolean, got {_json_type(body[key])}", key)
            setattr(out, key, body[key])
    direction = body.get("truncation_direction")
    if direction is not None and direction not in ("right", "Right"):
        raise ApiError(422, f"'truncation_direction' {direction!r} is not supported: only 'right'",
                       "truncation_direction")
    if body.get("prompt_name") is not None and not isinstance(body["prompt_name"], str):
        raise ApiError(422, f"'prompt_name' must be a string, got {_json_type(body['prompt_name'])}", "prompt_name")
    out.prompt_name = body.get("prompt_name")
    return out


def normalize_rows(x_ND: np.ndarray) -> np.ndarray:
    """Unit L2 rows, as ``l2_normalize`` (eps 1e-12)."""
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------------------------------- metrics

class Histogram:
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
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


@dataclass
class Metrics:
    """Counters and histograms for /metrics; updated from the event loop and the batch worker."""
    requests: Counter = field(default_factory=Counter)  # (route, status) -> count
    latency: dict = field(default_factory=dict)  # route -> Histogram
    batch_texts: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    batch_requests: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    texts: int = 0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, route: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[route, status] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, requests: int, texts: int, tokens: int) -> None:
        with self.lock:
            self.batch_texts.observe(texts)
            self.batch_requests.observe(requests)
            self.texts += texts
            self.tokens += tokens

    def render(self, queue_depth: int, queue_capacity: int) -> str:
        def head(name, kind, text):
            return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        with self.lock:
            out = head("e5lite_requests_total", "counter", "HTTP requests by route and status code.")
            out += [f'e5lite_requests_total{{route="{r}",status="{s}"}} {n}'
                    for (r, s), n in sorted(self.requests.items())]
            out += head("e5lite_request_duration_seconds", "histogram", "Request latency by route.")
            for r, h in sorted(self.latency.items()):
                out += h.lines("e5lite_request_duration_seconds", f'route="{r}"')
            out += head("e5lite_batch_texts", "histogram", "Texts per engine call (one dynamic batch).")
            out += self.batch_texts.lines("e5lite_batch_texts")
            out += head("e5lite_batch_requests", "histogram", "Requests grouped into one engine call.")
            out += self.batch_requests.lines("e5lite_batch_requests")
            out += head("e5lite_texts_embedded_total", "counter", "Texts embedded.") + [
                f"e5lite_texts_embedded_total {self.texts}"]
            out += head("e5lite_tokens_embedded_total", "counter", "Tokens embedded (after truncation).") + [
                f"e5lite_tokens_embedded_total {self.tokens}"]
        out += head("e5lite_queue_depth", "gauge", "Requests waiting for the batch worker.") + [
            f"e5lite_queue_depth {queue_depth}"]
        out += head("e5lite_queue_capacity", "gauge", "Queue size; a full queue answers 429.") + [
            f"e5lite_queue_capacity {queue_capacity}"]
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------- batcher

@dataclass
class Job:
    texts: list[str]  # prompt already prepended
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


class Batcher:
    """One worker thread that drains a bounded queue of Jobs and runs them through the Encoder in groups."""

    def __init__(self, enc, limits: Limits, metrics: Metrics):
        self.enc, self.limits, self.metrics = enc, limits, metrics
        self.queue: queue.Queue = queue.Queue(limits.max_queue)
        self._carry: Job | None = None  # a job that did not fit the last group: it starts the next one
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="e5lite-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    async def embed(self, texts: list[str], tokens: int) -> np.ndarray:
        """Unnormalised embeddings [len(texts), dim] of prompt-prefixed texts; 429 when the queue is full."""
        loop = asyncio.get_running_loop()
        job = Job(texts, tokens, loop, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"server busy: {self.limits.max_queue} requests already queued; retry later",
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
        deadline = time.monotonic() + self.limits.max_wait_ms / 1000
        while tokens < self.limits.max_batch_tokens:
            job = self._next(deadline - time.monotonic())
            if job is None:
                break
            if tokens + job.tokens > self.limits.max_batch_tokens:
                self._carry = job
                break
            jobs.append(job)
            tokens += job.tokens
        return jobs

    def _work(self) -> None:
        while not self._stop.is_set():
            jobs = self._group()
            if not jobs:
                continue
            texts = [t for j in jobs for t in j.texts]
            try:
                emb = self.enc.encode(texts, prompt="", normalize=False, show_progress_bar=False)
            except Exception as e:  # fail these requests, keep serving
                logger.exception("e5lite serve: encode failed")
                for j in jobs:
                    with contextlib.suppress(RuntimeError):
                        j.loop.call_soon_threadsafe(_settle, j.future, None, e)
                continue
            self.metrics.batch(len(jobs), len(texts), sum(j.tokens for j in jobs))
            start = 0
            for j in jobs:
                rows = emb[start:start + len(j.texts)]
                start += len(j.texts)
                with contextlib.suppress(RuntimeError):  # the loop closed: server shutting down
                    j.loop.call_soon_threadsafe(_settle, j.future, rows, None)


# ------------------------------------------------------------------------------------------------------- app

async def read_json(request: Request):
    """The request's JSON body; 415 for another content type, 413 past MAX_BODY_BYTES, 400 for bad JSON."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


def build_app(enc, *, model_name: str, limits: Limits = Limits()) -> Starlette:
    """The ASGI app serving ``enc``; the batch worker starts and stops with the app's lifespan."""
    if limits.max_batch_tokens is None:
        limits = dataclasses.replace(limits, max_batch_tokens=4 * enc.token_budget)
    metrics = Metrics()
    batcher = Batcher(enc, limits, metrics)

    def route(path: str, style: str):
        """Wraps a handler: ApiErrors become JSON error bodies, anything else a JSON 500; all are counted."""
        def wrap(fn):
            async def handler(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    response = await fn(request)
                except ApiError as e:
                    response = error_response(e, style)
                except Exception as e:  # a bug must cost one request, not the server
                    logger.exception("e5lite serve: %s failed", path)
                    response = error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"), style)
                metrics.request(path, response.status_code, time.perf_counter() - t0)
                return response
            return handler
        return wrap

    async def embed(parsed: Parsed, status: int) -> tuple[np.ndarray, int]:
        """(rows [n, dim], token count) for a validated request: normalised per its own options."""
        try:
            prefix = enc._prompt(parsed.prompt_name, None)
        except ValueError as e:
            raise ApiError(status, str(e), "prompt_name") from None
        texts = [prefix + t for t in parsed.texts] if prefix else parsed.texts
        lengths, cut = await run_in_threadpool(enc.tokenizer.lengths, texts)
        if not parsed.truncate and any(cut):
            i = cut.index(True)
            name = "input" if status == 400 else "inputs"
            raise ApiError(status, f"{name}[{i}] is longer than the model's maximum of {enc.max_length} tokens "
                                   "(truncation is off)", name, "context_length_exceeded")
        rows = await batcher.embed(texts, sum(lengths))
        if parsed.dimensions is not None:
            rows = rows[:, :parsed.dimensions]
        return (normalize_rows(rows) if parsed.normalize else rows), sum(lengths)

    @route("/v1/embeddings", "openai")
    async def openai_embeddings(request: Request) -> Response:
        parsed = parse_openai(await read_json(request), enc.dim, limits)
        rows, tokens = await embed(parsed, 400)
        if parsed.encoding_format == "base64":
            data = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        else:
            data = rows.tolist()
        return JSONResponse({"object": "list", "model": model_name,
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @route("/embed", "tei")
    async def tei_embed(request: Request) -> Response:
        rows, _ = await embed(parse_tei(await read_json(request), limits), 422)
        return JSONResponse(rows.tolist())

    @route("/health", "tei")
    async def health(request: Request) -> Response:
        if not batcher.thread.is_alive():
            raise ApiError(503, "the batch worker is not running")
        return JSONResponse({"status": "ok"})

    @route("/info", "tei")
    async def info(request: Request) -> Response:
        return JSONResponse({
            "model_id": model_name, "model_dir": str(enc.model_dir), "dim": enc.dim,
            "max_input_length": enc.max_length, "pooling": enc.pooling, "dtype": enc.dtype.name,
            "devices": [str(d) for d in enc.devices], "attention_impl": enc.attention_impl,
            "prompts": enc.prompts, "default_prompt_name": enc.default_prompt_name,
            "max_client_batch_size": limits.max_inputs, "max_batch_tokens": limits.max_batch_tokens,
            "max_wait_ms": limits.max_wait_ms, "max_queue": limits.max_queue, "auto_truncate": limits.auto_truncate,
            "version": __version__})

    @route("/metrics", "tei")
    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(batcher.queue.qsize(), limits.max_queue),
                                 media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        style = "openai" if request.url.path.startswith("/v1") else "tei"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"), style)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    routes = [Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
              Route("/embed", tei_embed, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/info", info, methods=["GET"]),
              Route("/metrics", prometheus, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def serve(enc, *, host: str, port: int, model_name: str, limits: Limits, log_level: str = "info") -> None:
    """Runs the server until interrupted (SIGINT/SIGTERM shut it down gracefully)."""
    enc.encode(["warm up"], show_progress_bar=False)  # compile the smallest shape before taking requests
    uvicorn.run(build_app(enc, model_name=model_name, limits=limits), host=host, port=port, log_level=log_level,
                access_log=False, timeout_graceful_shutdown=5)
