"""The Starlette app: reads and validates each request, tokenises it once in the thread pool, queues its token ids
for the batch worker and answers in the route's own format. ``GET /health``, ``/info``, ``/metrics`` (Prometheus
text) and ``/openapi.json`` describe the server.

While a request waits for the model its handler also watches the connection: a client that goes away takes
its request off the queue. ``serve`` shuts down in two stages: on SIGTERM the app drains (new work 503,
``/health`` 503, admitted requests finish, for up to ``--shutdown-timeout``), then uvicorn closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Awaitable, Callable, Protocol, Sequence, TypeVar

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import __version__
from .. import long_inputs
from ..errors import ApiError, TextTooLongError
from ..quantize import l2_normalize_np
from ..settings import EngineSettings
from .batcher import Batcher, TokenEmbedder
from .limits import Limits
from .metrics import Metrics
from .protocol import (DOCS_HTML, DecodeRequest, DecodeResponse, EmbedAllRequest, EmbedAllResponse, EmbeddingRequest,
                       EmbeddingResponse, EmbedRequest, EmbedResponse, RetryLater, SimilarityRequest,
                       SimilarityResponse, SimpleToken, TokenizeRequest, TokenizeResponse, error_response,
                       json_response, openapi, parse, shown)

logger = logging.getLogger("e5lite.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024
LARGE_BODY_BYTES = 1024 * 1024  # decoded in the thread pool, so that the event loop keeps answering
# Longer integer literals decode as floats (so infinity): no field takes them, and int() of a long literal
# costs time quadratic in its length (Python refuses past 4,300 digits, with a ValueError).
MAX_INT_DIGITS = 1000
SHUTDOWN_CLOSE_S = 2.0  # after draining: for the last responses to be written, and the worker to stop
# Requests of up to this many characters are tokenised on the event loop (tens of microseconds), larger ones in
# the thread pool so that the loop keeps answering.
INLINE_CHARS = 2000

T = TypeVar("T")


class ServedEncoder(TokenEmbedder, Protocol):
    """The encoder the server runs: ``e5lite.Encoder``'s public interface, as far as the server uses it."""

    @property
    def dim(self) -> int: ...
    @property
    def max_length(self) -> int: ...
    @property
    def model_dir(self) -> Path: ...
    @property
    def pooling(self) -> str: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def prompts(self) -> dict[str, str]: ...
    @property
    def default_prompt_name(self) -> str | None: ...
    @property
    def devices(self) -> list: ...
    @property
    def settings(self) -> EngineSettings: ...
    @property
    def tokenizer(self): ...  # e5lite.tokenizer.TextTokenizer
    @property
    def engine(self): ...  # e5lite.engine.Engine (token_states, warmup)
    @property
    def config(self): ...  # e5lite.config.BertConfig

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None,
                 truncate: bool = True) -> list[np.ndarray]: ...

    def prompt_prefix(self, prompt_name: str | None = None, prompt: str | None = None) -> str: ...



def _decode_int(literal: str) -> int | float:
    return int(literal) if len(literal) <= MAX_INT_DIGITS else float(literal)


def decode_json(raw: bytes, invalid_status: int):
    """The parsed body: 400 if it is not JSON (or nested too deeply to parse); ``invalid_status`` if a key of
    the top-level object repeats, since which value counts would be a guess. Repeats inside a field's value
    are left to that field's type (no field takes an object) or ignored with an unknown field, as TEI does."""
    repeated = []

    def object_pairs(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):  # which key: the first one seen twice
            seen: set = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append((obj, key))
                    break
                seen.add(key)
        return obj

    try:
        body = json.loads(raw, object_pairs_hook=object_pairs, parse_int=_decode_int)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to parse as JSON") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    for obj, key in repeated:
        if obj is body:
            raise ApiError(invalid_status, f"{shown(key)} appears more than once in the request body", key[:100])
    return body


async def read_json(request: Request, invalid_status: int):
    """The request's JSON body; 415 for another content type, 413 past MAX_BODY_BYTES, 400 for bad JSON,
    ``invalid_status`` for a repeated key."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # a chunked body has no Content-Length to check up front
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if size > LARGE_BODY_BYTES:
        return await run_in_threadpool(decode_json, raw, invalid_status)
    return decode_json(raw, invalid_status)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _disconnected(receive) -> None:
    # once the body is read, receive() returns when the client disconnects (anything else it returns is empty)
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (which takes a queued
    request off the queue) and ClientGone raised. Call it after the body is read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watch.cancel()
        raise
    if task.done():
        watch.cancel()
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # let the cancellation reach the queue before answering
    raise ClientGone


Handler = Callable[[Request], Awaitable[Response]]


class Prepared:
    """A request's inputs as token id sequences to embed: one per input, or with long inputs chunked several
    per text (``windows`` maps them back, see ``long_inputs``)."""

    def __init__(self, ids: list[np.ndarray], windows: "long_inputs.Windows | None" = None):
        self.ids, self.windows = ids, windows

    @property
    def tokens(self) -> int:
        return sum(len(i) for i in self.ids)

    def rows(self, emb: np.ndarray) -> np.ndarray:
        """One unnormalised row per input from the rows of ``ids``."""
        return emb if self.windows is None else long_inputs.combine(self.windows, emb, normalize=False)


def byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character position of ``text`` (len + 1 entries): TEI reports offsets in
    bytes, as the Rust tokenizer does; Python's tokenizer gives characters."""
    if text.isascii():
        return np.arange(len(text) + 1)
    return np.concatenate([[0], np.cumsum([len(c.encode("utf-8", "surrogatepass")) for c in text])])


class Server:
    """The handlers of every route, sharing one encoder, the limits, the metrics and the batch worker."""

    def __init__(self, enc: ServedEncoder, model_name: str, limits: Limits):
        limits = limits.resolved(enc.settings.token_budget)
        self.enc, self.model_name, self.limits = enc, model_name, limits
        self.metrics = Metrics()
        self.batcher = Batcher(enc, self.metrics, max_queue=limits.max_queue, max_queue_tokens=limits.max_queue_tokens,
                               max_batch_tokens=limits.max_batch_tokens, max_wait_ms=limits.max_wait_ms,
                               max_queue_wait_ms=limits.max_queue_wait_ms)
        # what validation needs of the server
        self.context = {"dim": enc.dim, "max_inputs": limits.max_inputs, "vocab_size": enc.config.vocab_size}
        if limits.chunk and limits.chunk_overlap >= long_inputs.window_length(enc.tokenizer, 0):
            raise ValueError(f"--chunk-overlap {limits.chunk_overlap} must be less than the "
                             f"{long_inputs.window_length(enc.tokenizer, 0)} text tokens of a window")
        self.openapi = openapi(__version__)
        self.draining = False  # shutting down: no new work
        self.active = 0  # embedding requests admitted and not yet answered

    def routes(self) -> list[Route]:
        openai, embed = ("openai", self.openai_embeddings, True), ("tei", self.tei_embed, True)
        health = ("tei", self.health, False)
        table = {("/v1/embeddings", "POST"): openai, ("/embeddings", "POST"): openai,
                 ("/embed", "POST"): embed, ("/", "POST"): embed, ("/invocations", "POST"): embed,
                 ("/embed_all", "POST"): ("tei", self.embed_all, True),
                 ("/similarity", "POST"): ("tei", self.similarity, True),
                 ("/tokenize", "POST"): ("tei", self.tokenize_route, True),
                 ("/decode", "POST"): ("tei", self.decode, True),
                 ("/health", "GET"): health, ("/", "GET"): health, ("/ping", "GET"): health,
                 ("/info", "GET"): ("tei", self.info, False), ("/metrics", "GET"): ("tei", self.prometheus, False),
                 ("/openapi.json", "GET"): ("tei", self.openapi_json, False),
                 ("/docs", "GET"): ("tei", self.docs, False)}
        return [Route(path, self.counted(path, style, self.admitted(fn) if work else fn), methods=[method])
                for (path, method), (style, fn, work) in table.items()]

    def admitted(self, handler: Handler) -> Handler:
        """``handler`` refusing new work while draining (503), and counted in ``active`` while it runs."""
        async def work(request: Request) -> Response:
            if self.draining:
                raise RetryLater(503, "server is shutting down", 1, code="shutting_down")
            self.active += 1
            try:
                return await handler(request)
            finally:
                self.active -= 1
        return work

    def counted(self, path: str, style: str, handler: Handler) -> Handler:
        """``handler`` with ApiErrors turned into JSON error bodies, anything else into a JSON 500; all counted."""
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
            except ClientGone:  # nobody to answer; counted as nginx counts it
                response = Response(status_code=499)
            except ApiError as e:
                response = error_response(e, style)
            except Exception as e:  # a bug must cost one request, not the server
                logger.exception("e5lite serve: %s failed", path)
                response = error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"), style)
            self.metrics.request(path, response.status_code, time.perf_counter() - t0)
            return response
        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        self.batcher.start()
        yield
        self.batcher.stop(timeout=SHUTDOWN_CLOSE_S)

    async def drain(self) -> None:
        """Shutdown's first stage: refuse new work (503, and /health 503 so that load balancers look elsewhere),
        wait up to ``shutdown_timeout`` s for the admitted requests, then answer what is left 503."""
        self.draining = True
        timeout = self.limits.shutdown_timeout
        if self.active:
            logger.info("e5lite serve: shutting down; finishing %d admitted requests (up to %g s; a second "
                        "signal skips this)", self.active, timeout)
        until = time.monotonic() + timeout
        while self.active and time.monotonic() < until:
            await asyncio.sleep(0.05)
        if self.active:
            logger.warning("e5lite serve: %d requests unfinished after %g s (--shutdown-timeout): answering 503",
                           self.active, timeout)
            self.batcher.stop(timeout=0)

    def prefix(self, prompt_name: str | None, status: int) -> str:
        try:
            return self.enc.prompt_prefix(prompt_name)
        except ValueError as e:
            raise ApiError(status, str(e), "prompt_name") from None

    def prepare(self, items: list, *, prefix: str, field: str, status: int, truncate: bool,
                direction: str | None = None, chunk: bool = False) -> Prepared:
        """Token ids of a request's inputs (run in the thread pool): texts get the prompt and are tokenised,
        truncated from ``direction`` or refused when too long (``truncate`` false), or with ``chunk`` cut into
        windows; token-id inputs are taken as given (only cut to the maximum length when truncating)."""
        tok, max_len = self.enc.tokenizer, self.enc.max_length
        at = [i for i, x in enumerate(items) if isinstance(x, str)]
        texts = [items[i] for i in at]
        seqs: list = [None] * len(items)
        windows = None
        try:
            if texts and chunk:
                try:
                    windows = long_inputs.split(tok, texts, prefix, self.limits.chunk_overlap)
                except ValueError as e:  # a prompt that leaves windows no longer than the overlap
                    raise ApiError(status, str(e), "prompt_name") from None
            elif texts:
                if direction == "left" and truncate:
                    out = tok.encode_left([prefix + t for t in texts] if prefix else texts)
                else:  # untruncated, right and left agree
                    out = self.enc.tokenize(texts, prompt=prefix, truncate=truncate)
                for i, ids in zip(at, out):
                    seqs[i] = ids
        except TextTooLongError as e:
            raise ApiError(status, f"{field}[{at[e.index]}] is longer than the model's maximum of {e.max_length} "
                                   "tokens (truncation is off)", field, "context_length_exceeded") from None
        for i, x in enumerate(items):
            if isinstance(x, str):
                continue
            ids = np.asarray(x, np.int32)
            if len(ids) > max_len:
                if not truncate:
                    raise ApiError(status, f"{field}[{i}] has {len(ids)} token ids, more than the model's maximum "
                                           f"of {max_len} (truncation is off)", field, "context_length_exceeded")
                ids = ids[-max_len:] if direction == "left" else ids[:max_len]
            seqs[i] = ids
        if windows is None:
            return Prepared(seqs)
        # every input's windows in input order: a text's from the split (text k's are consecutive, from
        # bounds[k] to bounds[k + 1]), token ids as one window
        bounds = np.searchsorted(windows.owner, np.arange(len(texts) + 1))
        text_of = {i: k for k, i in enumerate(at)}
        ids, owner, weight = [], [], []
        for i in range(len(items)):
            if i in text_of:
                span = range(bounds[text_of[i]], bounds[text_of[i] + 1])
                ids += [windows.ids[w] for w in span]
                weight += [windows.weight[w] for w in span]
            else:
                span = range(1)
                ids.append(seqs[i])
                weight.append(len(seqs[i]))
            owner += [i] * len(span)
        return Prepared(ids, long_inputs.Windows(ids=ids, owner=np.asarray(owner, np.int64),
                                                 weight=np.asarray(weight, np.float32), n=len(items)))

    def admit(self, items: list):
        """A batcher ticket for these inputs, admitted on an estimate before tokenising: an overloaded server
        spends nothing on a request it refuses."""
        chars = sum(len(x) for x in items if isinstance(x, str))
        ids = sum(len(x) for x in items if not isinstance(x, str))
        texts = sum(isinstance(x, str) for x in items)
        estimate = min(int(chars * self.batcher.tokens_per_char) + 2 * texts, texts * self.enc.max_length) + ids
        return self.batcher.admit(estimate, chars)

    async def embed(self, request: Request, items: list, *, field: str, status: int, truncate: bool,
                    normalize: bool, dimensions: int | None = None, prompt_name: str | None = None,
                    direction: str | None = None) -> tuple[int, np.ndarray]:
        """(tokens embedded, rows [len(items), dim or dimensions] normalised per this request's options); 429
        when the queue has no room, ClientGone when the client leaves first."""
        prefix = self.prefix(prompt_name, status)
        ticket = self.admit(items)

        async def work():
            kw = dict(prefix=prefix, field=field, status=status, truncate=truncate, direction=direction,
                      chunk=self.limits.chunk)
            if ticket.chars <= INLINE_CHARS:  # a query: tokenising it costs less than the hop to a thread
                prepared = self.prepare(items, **kw)
            else:
                prepared = await run_in_threadpool(self.prepare, items, **kw)
            return prepared, await self.batcher.embed(prepared.ids, ticket)

        try:
            prepared, emb = await unless_disconnected(request, work())
        finally:
            self.batcher.release(ticket)  # if it never reached the queue
        rows = prepared.rows(emb)
        if dimensions is not None:
            rows = rows[:, :dimensions]
        return prepared.tokens, l2_normalize_np(rows) if normalize else rows

    async def openai_embeddings(self, request: Request) -> Response:
        req = parse(EmbeddingRequest, await read_json(request, EmbeddingRequest.status), **self.context)
        tokens, rows = await self.embed(request, req.input, field="input", status=EmbeddingRequest.status,
                                        truncate=self.limits.auto_truncate, normalize=True, dimensions=req.dimensions)
        return json_response(EmbeddingResponse.of(rows, model=self.model_name, tokens=tokens,
                                                  encoding_format=req.encoding_format))

    def truncate(self, asked: bool | None) -> bool:
        return self.limits.auto_truncate if asked is None else asked

    async def tei_embed(self, request: Request) -> Response:
        req = parse(EmbedRequest, await read_json(request, EmbedRequest.status), **self.context)
        _, rows = await self.embed(request, req.inputs, field="inputs", status=EmbedRequest.status,
                                   truncate=self.truncate(req.truncate), normalize=req.normalize is not False,
                                   dimensions=req.dimensions, prompt_name=req.prompt_name,
                                   direction=req.truncation_direction)
        return json_response(EmbedResponse.of(rows))

    async def embed_all(self, request: Request) -> Response:
        req = parse(EmbedAllRequest, await read_json(request, EmbedAllRequest.status), **self.context)
        prefix = self.prefix(req.prompt_name, EmbedAllRequest.status)
        ticket = self.admit(req.inputs)  # shares the queue's bound, though it runs beside the batch worker
        try:
            prepared = await run_in_threadpool(self.prepare, req.inputs, prefix=prefix, field="inputs",
                                               status=EmbedAllRequest.status, truncate=self.truncate(req.truncate),
                                               direction=req.truncation_direction)
            states = await unless_disconnected(
                request, run_in_threadpool(self.enc.engine.token_states, prepared.ids))
        finally:
            self.batcher.release(ticket)
        return json_response(EmbedAllResponse.of(states))

    async def similarity(self, request: Request) -> Response:
        req = parse(SimilarityRequest, await read_json(request, SimilarityRequest.status), **self.context)
        p = req.parameters
        texts = [req.inputs.source_sentence, *req.inputs.sentences]
        _, rows = await self.embed(request, texts, field="inputs", status=SimilarityRequest.status,
                                   truncate=self.truncate(p.truncate if p else None), normalize=True,
                                   prompt_name=p.prompt_name if p else None,
                                   direction=p.truncation_direction if p else None)
        return json_response(SimilarityResponse.model_construct((rows[1:] @ rows[0]).tolist()))

    def tokens_of(self, texts: list[str], add_special_tokens: bool) -> list[list[SimpleToken]]:
        out = []
        for text, tokens in zip(texts, self.enc.tokenizer.encode_tokens(texts, add_special_tokens=add_special_tokens)):
            raw, at = text.encode("utf-8"), byte_offsets(text)
            row = []
            for i, t, special, span in tokens:
                if special:
                    row.append(SimpleToken.model_construct(id=i, text=t, special=True, start=None, stop=None))
                else:
                    a, b = int(at[span[0]]), int(at[span[1]])
                    row.append(SimpleToken.model_construct(id=i, text=raw[a:b].decode("utf-8", "replace"),
                                                           special=False, start=a, stop=b))
            out.append(row)
        return out

    async def tokenize_route(self, request: Request) -> Response:
        req = parse(TokenizeRequest, await read_json(request, TokenizeRequest.status), **self.context)
        prefix = self.prefix(req.prompt_name, TokenizeRequest.status)
        texts = [prefix + t for t in req.inputs] if prefix else req.inputs
        rows = await run_in_threadpool(self.tokens_of, texts, req.add_special_tokens)
        return json_response(TokenizeResponse.model_construct(rows))

    async def decode(self, request: Request) -> Response:
        req = parse(DecodeRequest, await read_json(request, DecodeRequest.status), **self.context)
        tok = self.enc.tokenizer
        texts = await run_in_threadpool(lambda: [tok.decode(ids, req.skip_special_tokens) for ids in req.ids])
        return json_response(DecodeResponse.model_construct(texts))

    async def health(self, request: Request) -> Response:
        if self.draining:
            raise ApiError(503, "server is shutting down")
        if not self.batcher.thread.is_alive():
            raise ApiError(503, "the batch worker is not running")
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        enc, limits = self.enc, self.limits
        return JSONResponse({
            "model_id": self.model_name, "model_dir": str(enc.model_dir), "dim": enc.dim,
            "max_input_length": enc.max_length, "pooling": enc.pooling, "dtype": enc.dtype.name,
            "weights": getattr(enc, "weights", enc.dtype.name),
            "devices": [str(d) for d in enc.devices], "attention_impl": enc.settings.attention_impl,
            "prompts": enc.prompts, "default_prompt_name": enc.default_prompt_name,
            "max_client_batch_size": limits.max_inputs, "max_batch_tokens": limits.max_batch_tokens,
            "max_wait_ms": limits.max_wait_ms, "max_queue": limits.max_queue,
            "max_queue_tokens": limits.max_queue_tokens, "max_queue_wait_ms": limits.max_queue_wait_ms,
            "shutdown_timeout": limits.shutdown_timeout, "auto_truncate": limits.auto_truncate,
            "long_inputs": limits.long_inputs, "chunk_overlap": limits.chunk_overlap,
            "version": __version__})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.batcher.state(), self.limits.max_queue),
                                 media_type="text/plain; version=0.0.4")

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405 in the error format of the API the path belongs to."""
    style = "openai" if request.url.path.startswith("/v1") else "tei"
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"), style)


def build_app(enc: ServedEncoder, *, model_name: str, limits: Limits = Limits()) -> Starlette:
    """The ASGI app serving ``enc``; the batch worker starts and stops with the app's lifespan."""
    server = Server(enc, model_name, limits)
    app = Starlette(routes=server.routes(), lifespan=server.lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a first stage to its shutdown: on SIGTERM (or SIGINT) the app drains
    (``Server.drain``) while uvicorn still listens, so that health checks see 503 rather than a refused
    connection; then uvicorn closes as usual. A second signal skips the drain, a third (SIGINT) forces exit."""

    def __init__(self, config: uvicorn.Config, app_server: Server):
        super().__init__(config)
        self.app_server = app_server
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_requested = False
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        try:
            await super().serve(sockets)
        finally:
            if self.drain_task is not None:  # still waiting, when a second signal cut the drain short
                self.drain_task.cancel()

    def handle_exit(self, sig, frame) -> None:
        # a signal handler (or another thread): only schedule work on the loop from here
        if self.drain_requested or self.loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self.drain_requested = True
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.app_server.drain()
        self.should_exit = True


def make_server(app: Starlette, *, host: str, port: int, log_level: str = "info") -> GracefulServer:
    """The uvicorn server that runs ``app`` (from ``build_app``) and drains it on shutdown."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_CLOSE_S)
    return GracefulServer(config, app.state.server)


def serve(enc: ServedEncoder, *, host: str, port: int, model_name: str, limits: Limits,
          log_level: str = "info") -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully (``GracefulServer``)."""
    # compile the shapes a query can hit before /health says ready, as the batch worker runs them (unnormalised):
    # the first request is then not slower
    enc.engine.warmup(normalize=False)
    server = make_server(build_app(enc, model_name=model_name, limits=limits), host=host, port=port,
                         log_level=log_level)
    server.run()
    if not server.started:  # uvicorn could not bind (it logged why)
        sys.exit(3)
