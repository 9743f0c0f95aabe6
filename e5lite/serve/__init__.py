"""``e5lite serve``: an HTTP embedding server with OpenAI (``POST /v1/embeddings``) and TEI (``POST /embed``)
routes, ``GET /health``, ``/info``, ``/metrics`` (Prometheus text) and ``/openapi.json``, on Starlette + uvicorn.

Modules: ``protocol`` (request and response models, error bodies), ``batcher`` (the worker that groups
tokenised requests into engine calls), ``metrics``, ``app`` (routes, ``build_app``, ``serve``). Needs the serve
extra; ``import e5lite`` never imports this package.
"""

from .app import Limits, build_app, serve

__all__ = ["Limits", "build_app", "serve"]
