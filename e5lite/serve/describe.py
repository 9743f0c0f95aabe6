"""The routes that describe the server rather than embed: ``GET /health`` (ready, or 503 while draining or
without its batch worker), ``/info`` (the model, the engine and the limits), ``/metrics`` (Prometheus text),
``/openapi.json`` and ``/docs``. ``app.Server`` has them as methods (``routes.ROUTES`` names them).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..errors import ApiError
from .access import Access
from .batcher import Batcher
from .errors import SHUTTING_DOWN
from .limits import Limits
from .metrics import Metrics
from .responses import Info, json_response
from .routes import DOCS_HTML
from .served import ServedEncoder


class DescribeRoutes:
    """``Server``'s describing handlers, on the state it sets up (declared here, assigned by ``Server``)."""

    enc: ServedEncoder
    model_name: str
    limits: Limits
    metrics: Metrics
    batcher: Batcher
    openapi: dict[str, Any]
    draining: bool
    access: Access
    default_prompt_name: str | None
    default_prompt: str | None

    async def health(self, request: Request) -> Response:
        if self.draining:  # unhealthy: no Retry-After, as TEI's /health
            raise ApiError(503, SHUTTING_DOWN)
        if not self.batcher.thread.is_alive():
            raise ApiError(503, "the batch worker is not running")
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        enc, limits = self.enc, self.limits
        return json_response(
            Info.model_validate(
                {
                    "model_id": self.model_name,
                    "model_dir": str(enc.model_dir),
                    "dim": enc.dim,
                    "max_input_length": enc.max_length,
                    "pooling": enc.pooling,
                    "dtype": enc.dtype.name,
                    "weights": getattr(enc, "weights", enc.dtype.name),
                    "devices": [str(d) for d in enc.devices],
                    "attention_impl": enc.settings.attention_impl,
                    "prompts": enc.prompts,
                    "default_prompt_name": self.default_prompt_name,
                    # what a request naming no prompt gets: --default-prompt(-name)'s, else the model's default
                    "default_prompt": enc.prompt_prefix() if self.default_prompt is None else self.default_prompt,
                    "api_key_required": self.access.keyed,  # whether, never which
                    "cors_allow_origin": list(self.access.cors_allow_origins),
                    "payload_limit": limits.payload_limit,
                    "max_client_batch_size": limits.max_inputs,
                    "max_batch_tokens": limits.max_batch_tokens,
                    "max_wait_ms": limits.max_wait_ms,
                    "max_queue": limits.max_queue,
                    "max_queue_tokens": limits.max_queue_tokens,
                    "max_queue_wait_ms": limits.max_queue_wait_ms,
                    "shutdown_timeout": limits.shutdown_timeout,
                    "auto_truncate": limits.auto_truncate,
                    "long_inputs": limits.long_inputs,
                    "chunk_overlap": limits.chunk_overlap,
                    "version": __version__,
                }
            )
        )

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render(self.batcher.state(), self.limits.max_queue), media_type="text/plain; version=0.0.4"
        )

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)
