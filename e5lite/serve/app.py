"""The Starlette app: reads and validates each request, tokenises it once in the thread pool, queues its token ids
for the batch worker and answers in the route's own format. ``GET /health``, ``/info``, ``/metrics`` (Prometheus
text) and ``/openapi.json`` describe the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Protocol, Sequence

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import ApiError, TextTooLongError
from ..settings import EngineSettings
from .batcher import Batcher, TokenEmbedder
from .metrics import Metrics
from .protocol import (EmbeddingRequest, EmbeddingResponse, EmbedRequest, EmbedResponse, error_response,
                       json_response, openapi, parse)

logger = logging.getLogger("e5lite.serve")

MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Server limits: inputs per request, queued requests, tokens per engine call (None: 4 x the encoder's
    token budget), wait for batch-mates."""
    max_inputs: int = 2048
    max_queue: int = 1024
    max_batch_tokens: int | None = None
    max_wait_ms: float = 2.0
    auto_truncate: bool = True


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

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None, prompt: str | None = None,
                 truncate: bool = True) -> list[np.ndarray]: ...

    def prompt_prefix(self, prompt_name: str | None = None, prompt: str | None = None) -> str: ...

    def encode(self, texts, *, show_progress_bar: bool | None = None) -> np.ndarray: ...


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
        if size > MAX_BODY_BYTES:  # a chunked body has no Content-Length to check up front
            raise ApiError(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


def normalize_rows(x_ND: np.ndarray) -> np.ndarray:
    """Unit L2 rows, as ``l2_normalize`` (eps 1e-12)."""
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), 1e-12)


Handler = Callable[[Request], Awaitable[Response]]


class Server:
    """The handlers of every route, sharing one encoder, the limits, the metrics and the batch worker."""

    def __init__(self, enc: ServedEncoder, model_name: str, limits: Limits):
        if limits.max_batch_tokens is None:
            limits = dataclasses.replace(limits, max_batch_tokens=4 * enc.settings.token_budget)
        self.enc, self.model_name, self.limits = enc, model_name, limits
        self.metrics = Metrics()
        self.batcher = Batcher(enc, self.metrics, max_queue=limits.max_queue,
                               max_batch_tokens=limits.max_batch_tokens, max_wait_ms=limits.max_wait_ms)
        self.context = {"dim": enc.dim, "max_inputs": limits.max_inputs}  # what validation needs of the server
        self.openapi = openapi(__version__)

    def routes(self) -> list[Route]:
        table = [("/v1/embeddings", "POST", "openai", self.openai_embeddings),
                 ("/embed", "POST", "tei", self.tei_embed), ("/health", "GET", "tei", self.health),
                 ("/info", "GET", "tei", self.info), ("/metrics", "GET", "tei", self.prometheus),
                 ("/openapi.json", "GET", "tei", self.openapi_json)]
        return [Route(path, self.counted(path, style, fn), methods=[method]) for path, method, style, fn in table]

    def counted(self, path: str, style: str, handler: Handler) -> Handler:
        """``handler`` with ApiErrors turned into JSON error bodies, anything else into a JSON 500; all counted."""
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                response = await handler(request)
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
        self.batcher.stop()

    async def tokenize(self, texts: list[str], *, field: str, status: int, truncate: bool,
                       prompt_name: str | None = None) -> list[np.ndarray]:
        """Token ids per text, prompt prepended, off the event loop; an unknown prompt, or a text too long with
        truncation off, is the client's error."""
        try:
            prefix = self.enc.prompt_prefix(prompt_name)
        except ValueError as e:
            raise ApiError(status, str(e), "prompt_name") from None
        try:
            return await run_in_threadpool(self.enc.tokenize, texts, prompt=prefix, truncate=truncate)
        except TextTooLongError as e:
            raise ApiError(status, f"{field}[{e.index}] is longer than the model's maximum of {e.max_length} tokens "
                                   "(truncation is off)", field, "context_length_exceeded") from None

    async def embed(self, ids: list[np.ndarray], *, normalize: bool, dimensions: int | None = None) -> np.ndarray:
        """Rows [len(ids), dim or dimensions] from the batch worker, normalised per this request's options."""
        rows = await self.batcher.embed(ids)
        if dimensions is not None:
            rows = rows[:, :dimensions]
        return normalize_rows(rows) if normalize else rows

    async def openai_embeddings(self, request: Request) -> Response:
        req = parse(EmbeddingRequest, await read_json(request), **self.context)
        ids = await self.tokenize(req.input, field="input", status=EmbeddingRequest.status,
                                  truncate=self.limits.auto_truncate)
        rows = await self.embed(ids, normalize=True, dimensions=req.dimensions)
        return json_response(EmbeddingResponse.of(rows, model=self.model_name, tokens=sum(len(i) for i in ids),
                                                  encoding_format=req.encoding_format))

    async def tei_embed(self, request: Request) -> Response:
        req = parse(EmbedRequest, await read_json(request), **self.context)
        truncate = self.limits.auto_truncate if req.truncate is None else req.truncate
        ids = await self.tokenize(req.inputs, field="inputs", status=EmbedRequest.status, truncate=truncate,
                                  prompt_name=req.prompt_name)
        rows = await self.embed(ids, normalize=req.normalize is not False)
        return json_response(EmbedResponse.of(rows))

    async def health(self, request: Request) -> Response:
        if not self.batcher.thread.is_alive():
            raise ApiError(503, "the batch worker is not running")
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        enc, limits = self.enc, self.limits
        return JSONResponse({
            "model_id": self.model_name, "model_dir": str(enc.model_dir), "dim": enc.dim,
            "max_input_length": enc.max_length, "pooling": enc.pooling, "dtype": enc.dtype.name,
            "devices": [str(d) for d in enc.devices], "attention_impl": enc.settings.attention_impl,
            "prompts": enc.prompts, "default_prompt_name": enc.default_prompt_name,
            "max_client_batch_size": limits.max_inputs, "max_batch_tokens": limits.max_batch_tokens,
            "max_wait_ms": limits.max_wait_ms, "max_queue": limits.max_queue, "auto_truncate": limits.auto_truncate,
            "version": __version__})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(self.batcher.queue.qsize(), self.limits.max_queue),
                                 media_type="text/plain; version=0.0.4")

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)


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


def serve(enc: ServedEncoder, *, host: str, port: int, model_name: str, limits: Limits,
          log_level: str = "info") -> None:
    """Runs the server until interrupted (SIGINT/SIGTERM shut it down gracefully)."""
    enc.encode(["warm up"], show_progress_bar=False)  # compile the smallest shape before taking requests
    uvicorn.run(build_app(enc, model_name=model_name, limits=limits), host=host, port=port, log_level=log_level,
                access_log=False, timeout_graceful_shutdown=5)
