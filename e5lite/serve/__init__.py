"""``e5lite serve``: an HTTP embedding server with OpenAI (``POST /v1/embeddings``) and TEI (``POST /embed``)
routes, ``GET /health``, ``/info``, ``/metrics`` (Prometheus text) and ``/openapi.json``, on Starlette + uvicorn.

Modules: ``limits`` (the server's limits, and their flags), ``protocol`` and ``responses`` (request and
response models), ``errors`` (error bodies, ``Retry-After`` refusals), ``routes`` (the route table and the OpenAPI
document), ``connection`` (reading a request's JSON body, watching its connection), ``batcher`` and ``jobs`` (the
worker that queues tokenised requests within the limits and groups them into engine calls), ``metrics``,
``served`` (the encoder interface the server runs on), ``app`` (the embedding handlers on ``e5lite.pipeline``,
``build_app``, ``serve``), ``text_routes`` (the tokenizer handlers, prompts, the payload limit), ``describe`` (the
health, info, metrics and docs handlers), ``access`` (API keys, CORS), ``graceful`` (uvicorn with a drain
before it closes). Needs the serve extra; ``import e5lite`` never imports this
package, and importing it loads the server stack only when ``build_app`` or ``serve`` is used (the CLI reads
``Limits`` to build its parser).
"""

from .limits import Limits

__all__ = ["Limits", "build_app", "serve"]


def __getattr__(name: str):
    if name in ("build_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
