"""The Starlette app: reads and validates each request, prepares its token ids once (``pipeline.prepare``, in the
thread pool for all but small requests), queues them for the batch worker, finishes the rows as the request asks
(``pipeline.finish``) and answers in the route's own format. ``GET /health``, ``/info``, ``/metrics``
(Prometheus text) and ``/openapi.json`` describe the server (``describe.py``); ``/tokenize`` and ``/decode`` are
``text_routes.py``'s; the routes are ``routes.py``'s table; API keys and CORS are ``access.py``'s.

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
from .access import Access, Handler
from .batcher import Batcher
from .connection import ClientGone, unless_disconnected
from .connection import read_json as read_json  # re-exported: tools/bench_framework.py reads bodies as the server
from .describe import DescribeRoutes
from .errors import error_response, shutting_down
from .explorer import routes as explorer_routes
from .jobs import Ticket
from .limits import Limits
from .metrics import Metrics
from .priority import lower_other_threads
from .protocol import EmbedAllRequest, EmbeddingRequest, EmbedRequest, SimilarityRequest, parse
from .responses import EmbedAllResponse, EmbeddingResponse, EmbedResponse, SimilarityResponse, json_response
from .routes import ROUTES, http_error, openapi
from .served import ServedEncoder
from .text_routes import TextRoutes, resolve_default_prompt

logger = logging.getLogger("e5lite.serve")

# Requests of up to this many characters are tokenised on the event loop (a short text costs less than the hop to
# a thread), larger ones in the thread pool so that the loop keeps answering.
INLINE_CHARS = 2000


class Server(DescribeRoutes, TextRoutes):
    """The handlers of every route, sharing one encoder, the limits, the metrics and the batch worker: the
    embedding routes here, the describing ones (health, info, metrics, docs) ``DescribeRoutes``', the tokenizer
    ones ``TextRoutes``'. ``default_prompt_name``/``default_prompt``: the prompt of a request that names none."""

    def __init__(
        self,
        enc: ServedEncoder,
        model_name: str,
        limits: Limits,
        access: Access,
        default_prompt_name: str | None = None,
        default_prompt: str | None = None,
    ):
        budget = enc.settings.token_budget
        assert budget is not None  # the engine's settings are resolved for its backend: no None left
        limits = limits.resolved(budget)
        assert limits.max_queue_tokens is not None and limits.max_batch_tokens is not None  # filled by resolved
        self.enc, self.model_name, self.limits, self.access = enc, model_name, limits, access
        self.max_queue_tokens = limits.max_queue_tokens
        self.default_prompt = resolve_default_prompt(enc, default_prompt_name, default_prompt)
        # for /info: a --default-prompt has no name
        self.default_prompt_name = (
            None if default_prompt is not None else default_prompt_name or enc.default_prompt_name
        )
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
        bounds = {**self.context, "prompt_names": list(enc.prompts)}  # the document's ranges and enums
        self.openapi = openapi(__version__, keyed=access.keyed, bounds=bounds)
        self.draining = False  # shutting down: no new work
        self.active = 0  # embedding requests admitted and not yet answered
        self.loop_first = False  # the other threads below the event loop's priority (``priority.py``): serve's

    def routes(self) -> list[Route]:
        """``routes.ROUTES`` as Starlette routes, each counted; admitted while not draining if it works; behind
        the key check, first of all, if it is an inference route and the server has keys."""
        out = []
        for r in ROUTES:
            handler = getattr(self, r.handler)
            if r.work:
                handler = self.admitted(handler, queued=429 in r.errors)
            if r.inference and self.access.keyed:
                handler = self.access.guarded(handler)
            out.append(Route(r.path, self.counted(r.path, r.style, handler), methods=[r.method]))
        return out

    def admitted(self, handler: Handler, queued: bool) -> Handler:
        """``handler`` refusing new work while draining (503), and counted in ``active`` while it runs;
        ``queued``: it goes through the batch queue, so while the queue has no room for any request it is
        refused (429) before its body is read."""

        async def work(request: Request) -> Response:
            if self.draining:
                raise shutting_down()
            if queued:
                self.batcher.refuse_if_full()
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
        if self.loop_first and self.limits.compute_nice:
            lowered = lower_other_threads(self.limits.compute_nice)
            logger.debug("e5lite serve: %d threads below the event loop's priority", lowered)
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

    def admit(self, items: list, chars: int) -> Ticket | None:
        """A batcher ticket for these inputs, admitted on an estimate before tokenising, so that an overloaded
        server spends nothing on a request it refuses (429). None when the estimate alone passes
        --max-queue-tokens: such a request is tokenised first, for ``prepared`` to tell whether it can ever fit."""
        ids = sum(len(x) for x in items if not isinstance(x, str))
        texts = sum(isinstance(x, str) for x in items)
        estimate = min(int(chars * self.batcher.tokens_per_char) + 2 * texts, texts * self.enc.max_length) + ids
        if estimate > self.max_queue_tokens:
            return None
        return self.batcher.admit(estimate, chars)

    async def prepared(
        self, items: list, recipe: Recipe, field: str, status: int, ticket: Ticket | None, chars: int
    ) -> tuple[Prepared, Ticket]:
        """The request's token ids (on the event loop for a query, whose tokenising costs less than the hop to a
        thread; else in the thread pool) and its ticket: ``ticket``, or one admitted now on the exact count.
        A request of more tokens than the queue ever holds gets 413: it could never be admitted, so a 429
        would have its client retry forever."""
        if chars <= INLINE_CHARS:
            prepared = self.prepare(items, recipe, field, status)
        else:
            prepared = await run_in_threadpool(self.prepare, items, recipe, field, status)
        tokens = prepared.tokens
        if tokens > self.max_queue_tokens:
            raise ApiError(
                413,
                f"this request has {tokens:,} tokens, more than the queue ever holds ({self.max_queue_tokens:,}, "
                "--max-queue-tokens): send fewer or shorter inputs",
                field,
                "too_many_tokens",
            )
        if ticket is None:
            return prepared, self.batcher.admit(tokens)
        if any(len(i) >= self.enc.max_length for i in prepared.ids):
            # cut texts say nothing of the tokens per character the queue's estimates learn
            ticket.chars = 0
        return prepared, ticket

    async def embed(
        self, request: Request, items: list, recipe: Recipe, *, field: str, status: int
    ) -> tuple[int, np.ndarray]:
        """(tokens embedded, rows [len(items), dim or truncate_dim] finished as ``recipe`` says); 429 when the
        queue has no room, 413 when it never could have, ClientGone when the client leaves first."""
        chars = sum(len(x) for x in items if isinstance(x, str))
        ticket = self.admit(items, chars)

        async def work():
            nonlocal ticket
            prepared, ticket = await self.prepared(items, recipe, field, status, ticket, chars)
            return prepared, await self.batcher.embed(prepared.ids, ticket)

        try:
            prepared, emb = await unless_disconnected(request, work())
        finally:
            if ticket is not None:
                self.batcher.release(ticket)  # if it never reached the queue
        return prepared.tokens, finish(prepared, emb, recipe)

    async def openai_embeddings(self, request: Request) -> Response:
        status = EmbeddingRequest.status
        req = parse(EmbeddingRequest, await self.body(request, status), **self.context)
        recipe = self.recipe(None, status, truncate=self.limits.auto_truncate, dimensions=req.dimensions)
        tokens, rows = await self.embed(request, req.input, recipe, field="input", status=status)
        return json_response(
            EmbeddingResponse.of(rows, model=self.model_name, tokens=tokens, encoding_format=req.encoding_format)
        )

    def truncate(self, asked: bool | None) -> bool:
        return self.limits.auto_truncate if asked is None else asked

    async def tei_embed(self, request: Request) -> Response:
        status = EmbedRequest.status
        req = parse(EmbedRequest, await self.body(request, status), **self.context)
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
        req = parse(EmbedAllRequest, await self.body(request, status), **self.context)
        recipe = self.recipe(
            req.prompt_name,
            status,
            truncate=self.truncate(req.truncate),
            direction=req.truncation_direction,
            chunk=False,
        )
        # shares the queue's bounds, though it runs beside the batch worker
        chars = sum(len(x) for x in req.inputs if isinstance(x, str))
        ticket = self.admit(req.inputs, chars)
        try:
            prepared, ticket = await self.prepared(req.inputs, recipe, "inputs", status, ticket, chars)
            states = await unless_disconnected(request, run_in_threadpool(self.enc.token_states, prepared.ids))
        finally:
            if ticket is not None:
                self.batcher.release(ticket)
        return json_response(EmbedAllResponse.of(states))

    async def similarity(self, request: Request) -> Response:
        status = SimilarityRequest.status
        req = parse(SimilarityRequest, await self.body(request, status), **self.context)
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


DEFAULT_LIMITS = Limits()
OPEN = Access()  # no keys, no CORS


def build_app(
    enc: ServedEncoder,
    *,
    model_name: str,
    limits: Limits = DEFAULT_LIMITS,
    access: Access = OPEN,
    default_prompt_name: str | None = None,
    default_prompt: str | None = None,
    explorer: bool = False,
) -> Starlette:
    """The ASGI app serving ``enc``; the batch worker starts and stops with the app's lifespan. ``access``: the
    API keys and CORS origins; ``default_prompt_name`` or ``default_prompt``: for requests that name no prompt
    (default: the model's default prompt, if any); ``explorer``: the explorer page at /explorer (``explorer.py``)."""
    server = Server(enc, model_name, limits, access, default_prompt_name, default_prompt)
    app = Starlette(
        routes=server.routes() + (explorer_routes(server) if explorer else []),
        middleware=access.middleware(),
        lifespan=server.lifespan,
        exception_handlers={HTTPException: http_error},
    )
    app.state.server = server
    return app


def serve(enc: ServedEncoder, *, host: str, port: int, model_name: str, log_level: str = "info", **options) -> None:
    """Runs the server until SIGTERM or SIGINT, then shuts down gracefully (``graceful.GracefulServer``).
    ``options``: ``build_app``'s."""
    app = build_app(enc, model_name=model_name, **options)  # a bad option fails before the warm-up
    server = graceful.make_server(app, host=host, port=port, log_level=log_level)  # not listening yet
    access: Access = app.state.server.access
    if access.keyed:  # how many, never which
        logger.info("e5lite serve: the inference routes want one of %d API keys", len(access.api_keys))
    elif host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("e5lite serve: listening on %s without an API key: anyone who reaches it can use it", host)
    # compile the shapes a query can hit before /health says ready, as the batch worker runs them (unnormalised):
    # the first request is then not slower
    enc.warmup(normalize=False)
    app.state.server.loop_first = True  # the process is the server's alone (not a test's, or an app's host)
    server.run()
    if not server.started:  # uvicorn could not bind (it logged why)
        sys.exit(3)
