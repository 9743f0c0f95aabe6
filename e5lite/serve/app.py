"""The Starlette app: reads and validates each request, prepares its token ids once (``pipeline.prepare``, in the
thread pool for all but small requests), queues them for the batch worker, finishes the rows as the request asks
(``pipeline.finish``) and answers in the route's own format. ``GET /health``, ``/info``, ``/metrics``
(Prometheus text) and ``/openapi.json`` describe the server; the routes are ``routes.py``'s table.

While a request waits for the model its handler also watches the connection: a client that goes away takes
its request off the queue. ``serve`` shuts down in two stages: on SIGTERM the app drains (new work 503,
``/health`` 503, admitted requests finish, for up to ``--shutdown-timeout``), then uvicorn closes
(``graceful.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..errors import ApiError, TextTooLongError
from ..pipeline import IdsTooLongError, Prepared, Recipe, finish
from . import graceful
from .batcher import Batcher
from .connection import ClientGone, read_json, unless_disconnected
from .describe import DescribeRoutes
from .errors import error_response, shutting_down
from .limits import Limits
from .metrics import Metrics
from .protocol import (
    DecodeRequest,
    EmbedAllRequest,
    EmbeddingRequest,
    EmbedRequest,
    SimilarityRequest,
    TokenizeRequest,
    parse,
)
from .responses import (
    DecodeResponse,
    EmbedAllResponse,
    EmbeddingResponse,
    EmbedResponse,
    SimilarityResponse,
    SimpleToken,
    TokenizeResponse,
    json_response,
)
from .routes import ROUTES, openapi
from .served import ServedEncoder

logger = logging.getLogger("e5lite.serve")

# Requests of up to this many characters are tokenised on the event loop (a short text costs less than the hop to
# a thread), larger ones in the thread pool so that the loop keeps answering.
INLINE_CHARS = 2000


Handler = Callable[[Request], Awaitable[Response]]


def byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character position of ``text`` (len + 1 entries): TEI reports offsets in
    bytes, as the Rust tokenizer does; Python's tokenizer gives characters."""
    if text.isascii():
        return np.arange(len(text) + 1)
    return np.concatenate([[0], np.cumsum([len(c.encode("utf-8", "surrogatepass")) for c in text])])


class Server(DescribeRoutes):
    """The handlers of every route, sharing one encoder, the limits, the metrics and the batch worker: the
    embedding and tokenizer routes here, the describing ones (health, info, metrics, docs) ``DescribeRoutes``'."""

    def __init__(self, enc: ServedEncoder, model_name: str, limits: Limits):
        budget = enc.settings.token_budget
        assert budget is not None  # the engine's settings are resolved for its backend: no None left
        limits = limits.resolved(budget)
        assert limits.max_queue_tokens is not None and limits.max_batch_tokens is not None  # filled by resolved
        self.enc, self.model_name, self.limits = enc, model_name, limits
        self.metrics = Metrics()
        self.batcher = Batcher(
            enc,
            self.metrics,
            max_queue=limits.max_queue,
            max_queue_tokens=limits.max_queue_tokens,
            max_batch_tokens=limits.max_batch_tokens,
            max_wait_ms=limits.max_wait_ms,
            max_queue_wait_ms=limits.max_queue_wait_ms,
        )
        # what validation needs of the server
        self.context = {"dim": enc.dim, "max_inputs": limits.max_inputs, "vocab_size": enc.vocab_size}
        if limits.chunk and limits.chunk_overlap >= enc.window_length():
            raise ValueError(
                f"--chunk-overlap {limits.chunk_overlap} must be less than the "
                f"{enc.window_length()} text tokens of a window"
            )
        self.openapi = openapi(__version__)
        self.draining = False  # shutting down: no new work
        self.active = 0  # embedding requests admitted and not yet answered

    def routes(self) -> list[Route]:
        """``routes.ROUTES`` as Starlette routes, each counted, and admitted while not draining if it works."""
        out = []
        for r in ROUTES:
            handler = getattr(self, r.handler)
            out.append(
                Route(
                    r.path,
                    self.counted(r.path, r.style, self.admitted(handler) if r.work else handler),
                    methods=[r.method],
                )
            )
        return out

    def admitted(self, handler: Handler) -> Handler:
        """``handler`` refusing new work while draining (503), and counted in ``active`` while it runs."""

        async def work(request: Request) -> Response:
            if self.draining:
                raise shutting_down()
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
        self.batcher.stop(timeout=graceful.SHUTDOWN_CLOSE_S)

    async def drain(self) -> None:
        """Shutdown's first stage: refuse new work (503, and /health 503 so that load balancers look elsewhere),
        wait up to ``shutdown_timeout`` s for the admitted requests, then answer what is left 503."""
        self.draining = True
        timeout = self.limits.shutdown_timeout
        if self.active:
            logger.info(
                "e5lite serve: shutting down; finishing %d admitted requests (up to %g s; a second signal skips this)",
                self.active,
                timeout,
            )
        until = time.monotonic() + timeout
        while self.active and time.monotonic() < until:
            await asyncio.sleep(0.05)
        if self.active:
            logger.warning(
                "e5lite serve: %d requests unfinished after %g s (--shutdown-timeout): answering 503",
                self.active,
                timeout,
            )
            self.batcher.stop(timeout=0)

    def prefix(self, prompt_name: str | None, status: int) -> str:
        try:
            return self.enc.prompt_prefix(prompt_name)
        except ValueError as e:
            raise ApiError(status, str(e), "prompt_name") from None

    def recipe(
        self,
        prompt_name: str | None,
        status: int,
        *,
        truncate: bool,
        direction: str | None = None,
        normalize: bool = True,
        dimensions: int | None = None,
        chunk: bool = True,
    ) -> Recipe:
        """A request's pipeline options: its prompt (refused with ``status`` if unknown), truncation, and with
        ``chunk`` the server's ``--long-inputs``."""
        chunk = chunk and self.limits.chunk
        return Recipe(
            self.enc.dim,
            prompt=self.prefix(prompt_name, status),
            truncate=truncate,
            direction=direction or "right",
            long_inputs="chunk" if chunk else "truncate",
            chunk_overlap=self.limits.chunk_overlap if chunk else 0,
            normalize=normalize,
            truncate_dim=dimensions,
        )

    def prepare(self, items: list, recipe: Recipe, field: str, status: int) -> Prepared:
        """Token ids of a request's inputs (``pipeline.prepare``), its refusals worded for the request's ``field``:
        an input too long while truncation is off, a prompt that leaves chunked windows no room."""
        try:
            return self.enc.prepare(items, recipe)
        except IdsTooLongError as e:
            raise ApiError(
                status,
                f"{field}[{e.index}] has {e.length} token ids, more than the model's maximum "
                f"of {e.max_length} (truncation is off)",
                field,
                "context_length_exceeded",
            ) from None
        except TextTooLongError as e:
            raise ApiError(
                status,
                f"{field}[{e.index}] is longer than the model's maximum of {e.max_length} tokens (truncation is off)",
                field,
                "context_length_exceeded",
            ) from None
        except ValueError as e:  # a prompt that leaves windows no longer than the overlap
            if not recipe.chunk:
                raise
            raise ApiError(status, str(e), "prompt_name") from None

    def admit(self, items: list):
        """A batcher ticket for these inputs, admitted on an estimate before tokenising: an overloaded server
        spends nothing on a request it refuses."""
        chars = sum(len(x) for x in items if isinstance(x, str))
        ids = sum(len(x) for x in items if not isinstance(x, str))
        texts = sum(isinstance(x, str) for x in items)
        estimate = min(int(chars * self.batcher.tokens_per_char) + 2 * texts, texts * self.enc.max_length) + ids
        return self.batcher.admit(estimate, chars)

    async def embed(
        self, request: Request, items: list, recipe: Recipe, *, field: str, status: int
    ) -> tuple[int, np.ndarray]:
        """(tokens embedded, rows [len(items), dim or truncate_dim] finished as ``recipe`` says); 429 when the
        queue has no room, ClientGone when the client leaves first."""
        ticket = self.admit(items)

        async def work():
            if ticket.chars <= INLINE_CHARS:  # a query: tokenising it costs less than the hop to a thread
                prepared = self.prepare(items, recipe, field, status)
            else:
                prepared = await run_in_threadpool(self.prepare, items, recipe, field, status)
            return prepared, await self.batcher.embed(prepared.ids, ticket)

        try:
            prepared, emb = await unless_disconnected(request, work())
        finally:
            self.batcher.release(ticket)  # if it never reached the queue
        return prepared.tokens, finish(prepared, emb, recipe)

    async def openai_embeddings(self, request: Request) -> Response:
        status = EmbeddingRequest.status
        req = parse(EmbeddingRequest, await read_json(request, status), **self.context)
        recipe = self.recipe(None, status, truncate=self.limits.auto_truncate, dimensions=req.dimensions)
        tokens, rows = await self.embed(request, req.input, recipe, field="input", status=status)
        return json_response(
            EmbeddingResponse.of(rows, model=self.model_name, tokens=tokens, encoding_format=req.encoding_format)
        )

    def truncate(self, asked: bool | None) -> bool:
        return self.limits.auto_truncate if asked is None else asked

    async def tei_embed(self, request: Request) -> Response:
        status = EmbedRequest.status
        req = parse(EmbedRequest, await read_json(request, status), **self.context)
        recipe = self.recipe(
            req.prompt_name,
            status,
            truncate=self.truncate(req.truncate),
            direction=req.truncation_direction,
            normalize=req.normalize is not False,
            dimensions=req.dimensions,
        )
        _, rows = await self.embed(request, req.inputs, recipe, field="inputs", status=status)
        return json_response(EmbedResponse.of(rows))

    async def embed_all(self, request: Request) -> Response:
        status = EmbedAllRequest.status
        req = parse(EmbedAllRequest, await read_json(request, status), **self.context)
        recipe = self.recipe(
            req.prompt_name,
            status,
            truncate=self.truncate(req.truncate),
            direction=req.truncation_direction,
            chunk=False,
        )
        ticket = self.admit(req.inputs)  # shares the queue's bound, though it runs beside the batch worker
        try:
            prepared = await run_in_threadpool(self.prepare, req.inputs, recipe, "inputs", status)
            states = await unless_disconnected(request, run_in_threadpool(self.enc.token_states, prepared.ids))
        finally:
            self.batcher.release(ticket)
        return json_response(EmbedAllResponse.of(states))

    async def similarity(self, request: Request) -> Response:
        status = SimilarityRequest.status
        req = parse(SimilarityRequest, await read_json(request, status), **self.context)
        p = req.parameters
        recipe = self.recipe(
            p.prompt_name if p else None,
            status,
            truncate=self.truncate(p.truncate if p else None),
            direction=p.truncation_direction if p else None,
        )
        texts = [req.inputs.source_sentence, *req.inputs.sentences]
        _, rows = await self.embed(request, texts, recipe, field="inputs", status=status)
        return json_response(SimilarityResponse.model_construct((rows[1:] @ rows[0]).tolist()))

    def tokens_of(self, texts: list[str], add_special_tokens: bool) -> list[list[SimpleToken]]:
        out = []
        spans = self.enc.token_spans(texts, add_special_tokens=add_special_tokens)
        for text, tokens in zip(texts, spans, strict=True):
            raw, at = text.encode("utf-8"), byte_offsets(text)
            row = []
            for i, t, special, span in tokens:
                if special:
                    row.append(SimpleToken.model_construct(id=i, text=t, special=True, start=None, stop=None))
                else:
                    a, b = int(at[span[0]]), int(at[span[1]])
                    row.append(
                        SimpleToken.model_construct(
                            id=i, text=raw[a:b].decode("utf-8", "replace"), special=False, start=a, stop=b
                        )
                    )
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
        decode = self.enc.decode
        texts = await run_in_threadpool(lambda: [decode(ids, req.skip_special_tokens) for ids in req.ids])
        return json_response(DecodeResponse.model_construct(texts))


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in the error format of the API the path belongs to."""
    assert isinstance(exc, HTTPException)  # the handler of HTTPException only (``build_app``)
    style = "openai" if request.url.path.startswith("/v1") else "tei"
    return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"), style)


DEFAULT_LIMITS = Limits()


def build_app(enc: ServedEncoder, *, model_name: str, limits: Limits = DEFAULT_LIMITS) -> Starlette:
    """The ASGI app serving ``enc``; the batch worker starts and stops with the app's lifespan."""
    server = Server(enc, model_name, limits)
    app = Starlette(routes=server.routes(), lifespan=server.lifespan, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app


def serve(
    enc: ServedEncoder, *, host: str, port: int, model_name: str, limits: Limits, log_level: str = "info"
) -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully (``graceful.GracefulServer``)."""
    # compile the shapes a query can hit before /health says ready, as the batch worker runs them (unnormalised):
    # the first request is then not slower
    enc.warmup(normalize=False)
    server = graceful.make_server(
        build_app(enc, model_name=model_name, limits=limits), host=host, port=port, log_level=log_level
    )
    server.run()
    if not server.started:  # uvicorn could not bind (it logged why)
        sys.exit(3)
