"""The route table, stated once: each route's path, method, handler, error format and what the OpenAPI document
says of it. ``Server.routes`` builds the Starlette routes from it and ``openapi`` the ``paths`` of
``GET /openapi.json``, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ApiError
from .bounds import bind
from .errors import OpenAIErrorResponse, TEIErrorResponse, error_response
from .protocol import (
    DecodeRequest,
    DecodeResponse,
    EmbedAllRequest,
    EmbedAllResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbedRequest,
    EmbedResponse,
    Health,
    Info,
    SimilarityRequest,
    SimilarityResponse,
    TokenizeRequest,
    TokenizeResponse,
)


@dataclass(frozen=True)
class RouteSpec:
    """One route. ``handler``: the name of ``Server``'s method; ``style``: the API whose error format its
    refusals take ("openai" or "tei"); ``work``: it embeds or tokenises, so it is refused while the server
    drains and counted until answered. ``summary`` None: left out of the OpenAPI document; else its request
    and response models, the statuses it can refuse with, and the media type of a 200 without a model."""

    method: str
    path: str
    handler: str
    style: str = "tei"
    work: bool = False
    summary: str | None = None
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    media: str = "application/json"

    @property
    def inference(self) -> bool:
        """It does the server's work (every POST route, all of /v1): with --api-key it wants a key."""
        return self.method == "POST" or self.path.startswith("/v1")

    @property
    def error_body(self) -> type[BaseModel] | None:
        if not self.errors:
            return None
        return OpenAIErrorResponse if self.style == "openai" else TEIErrorResponse


EMBED_ERRORS = (400, 413, 415, 422, 429, 500, 503)
TEXT_ERRORS = (400, 413, 415, 422, 500, 503)
_OPENAI: dict[str, Any] = dict(
    handler="openai_embeddings",
    style="openai",
    work=True,
    summary="OpenAI-compatible embeddings",
    request=EmbeddingRequest,
    response=EmbeddingResponse,
    errors=(400, 413, 415, 429, 500, 503),
)
_EMBED: dict[str, Any] = dict(
    handler="tei_embed",
    work=True,
    summary="Text Embeddings Inference embed",
    request=EmbedRequest,
    response=EmbedResponse,
    errors=EMBED_ERRORS,
)
_HEALTH: dict[str, Any] = dict(
    handler="health",
    summary="Health: 200 when ready, 503 while starting or shutting down",
    response=Health,
    errors=(500, 503),
)

ROUTES = (
    RouteSpec("POST", "/v1/embeddings", **_OPENAI),
    RouteSpec("POST", "/embeddings", **_OPENAI),
    RouteSpec("POST", "/embed", **_EMBED),
    RouteSpec("POST", "/", **_EMBED),
    RouteSpec("POST", "/invocations", **_EMBED),
    RouteSpec(
        "POST",
        "/embed_all",
        "embed_all",
        work=True,
        summary="Last hidden state of every token",
        request=EmbedAllRequest,
        response=EmbedAllResponse,
        errors=EMBED_ERRORS,
    ),
    RouteSpec(
        "POST",
        "/similarity",
        "similarity",
        work=True,
        summary="Cosine similarity of a text with others",
        request=SimilarityRequest,
        response=SimilarityResponse,
        errors=EMBED_ERRORS,
    ),
    RouteSpec(
        "POST",
        "/tokenize",
        "tokenize_route",
        work=True,
        summary="Tokens of texts, with offsets",
        request=TokenizeRequest,
        response=TokenizeResponse,
        errors=TEXT_ERRORS,
    ),
    RouteSpec(
        "POST",
        "/decode",
        "decode",
        work=True,
        summary="Text of token ids",
        request=DecodeRequest,
        response=DecodeResponse,
        errors=TEXT_ERRORS,
    ),
    RouteSpec("GET", "/health", **_HEALTH),
    RouteSpec("GET", "/", **_HEALTH),
    RouteSpec("GET", "/ping", **_HEALTH),
    RouteSpec("GET", "/info", "info", summary="The model and the server's settings", response=Info, errors=(500,)),
    RouteSpec("GET", "/metrics", "prometheus", summary="Prometheus metrics (text)", errors=(500,), media="text/plain"),
    RouteSpec("GET", "/openapi.json", "openapi_json"),
    RouteSpec("GET", "/docs", "docs"),
)


def allowed_methods(path: str, routes: tuple[RouteSpec, ...] = ROUTES) -> str:
    """The ``Allow`` header of a 405 at ``path`` (RFC 9110): its methods, HEAD with GET (Starlette answers HEAD
    on every GET route); empty for a path that is not served."""
    methods = {r.method for r in routes if r.path == path}
    return ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))


def openapi(
    version: str, routes: tuple[RouteSpec, ...] = ROUTES, *, keyed: bool = False, bounds: dict[str, Any] | None = None
) -> dict:
    """An OpenAPI 3.1 document of the documented routes, its schemas generated from their models; ``keyed``
    (--api-key): the inference routes want a bearer key, and say they answer 401 without it. ``bounds``: the
    server's values of the models' ``protocol.Bound``s (the validation context, and ``prompt_names``), so that
    the document's ranges and enums are those the server checks; without them the schemas leave them out."""
    routes = tuple(r for r in routes if r.summary is not None)
    models: set[tuple[Any, Any]] = {(r.request, "validation") for r in routes if r.request is not None}
    models |= {(m, "serialization") for r in routes for m in (r.response, r.error_body) if m is not None}
    refs, top = models_json_schema(
        sorted(models, key=lambda m: (m[0].__name__, m[1])), ref_template="#/components/schemas/{model}"
    )

    def content(model, mode: Any) -> dict:
        return {"application/json": {"schema": refs[model, mode]}}

    paths: dict = {}
    for r in routes:
        ok: dict[str, Any] = {"description": "OK"}
        if r.response is not None:
            ok["content"] = content(r.response, "serialization")
        elif r.media == "text/plain":
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        responses: dict[str, Any] = {"200": ok}
        keyed_here = keyed and r.inference
        responses |= {
            str(s): {"description": "Refused or failed", "content": content(r.error_body, "serialization")}
            for s in sorted(set(r.errors) | ({401} if keyed_here else set()))
        }
        op: dict[str, Any] = {"summary": r.summary, "responses": responses}
        if keyed_here:
            op["security"] = [{"bearer": []}]
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": content(r.request, "validation")}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "e5lite", "version": version},
        "paths": paths,
        "components": {"schemas": bind(top.get("$defs", {}), bounds or {})}
        | ({"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}} if keyed else {}),
    }


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 in the error format of the API the path belongs to; a 405 with ``Allow``."""
    assert isinstance(exc, HTTPException)  # the handler of HTTPException only (``app.build_app``)
    style = "openai" if request.url.path.startswith("/v1") else "tei"
    response = error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"), style)
    if exc.status_code == 405:  # the route Starlette matched knows its own method only: the table knows them all
        response.headers["Allow"] = allowed_methods(request.url.path)
    return response


DOCS_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>e5lite API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
<noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body></html>
"""
