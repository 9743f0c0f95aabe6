"""``e5lite serve --explorer``: the explorer page (``e5lite explain --html``'s) at ``GET /explorer``, computing each
explanation on request at ``POST /explorer`` through the running encoder.

``GET /explorer`` is public, as ``/docs`` is: the page is the same static template for everyone, holding only
the served model's name and whether a key is needed; it runs nothing and shows nothing of anyone's texts.
``POST /explorer`` runs the model, so it is an inference route like the others: behind ``--api-key`` (the page
asks for the key and sends it as ``Authorization: Bearer``), refused while the server drains, counted in the
metrics, its body within ``--payload-limit``, its texts within the model's max length (cut, or refused with
``--no-auto-truncate``) and ``MAX_TOKENS``, one explanation at a time (429 while another runs: it runs beside
the batch worker, as ``/embed_all`` does, and its answer grows with layers × heads × tokens²).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..errors import ApiError, TextTooLongError
from ..explain import Explainable, explain, page_data, render_html, side_prompt
from .errors import RetryLater
from .protocol import ExplainRequest, parse

# Tokens per text: the answer holds layers × heads × tokens² attention bytes (MiniLM at 128: 2.4 MB of JSON).
MAX_TOKENS = 128
STATUS = ExplainRequest.status  # a body that is not JSON, as the TEI routes answer


def checked_lengths(enc: Explainable, texts: dict[str, str], truncate: bool) -> None:
    """Refuses (413) a text past the model's max length when truncation is off, or past ``MAX_TOKENS``."""
    for side, text in texts.items():
        try:
            ids = enc.tokenize([text], prompt=side_prompt(enc, side), truncate=truncate)[0]
        except TextTooLongError as e:
            raise ApiError(
                413, f"{side} is longer than the model's maximum of {e.max_length} tokens (truncation is off)", side
            ) from None
        if len(ids) > MAX_TOKENS:
            raise ApiError(413, f"{side} has {len(ids)} tokens; the explorer takes up to {MAX_TOKENS}", side)


def routes(server: Any) -> list[Route]:
    """``GET`` and ``POST /explorer`` for ``app.Server`` ``server``, wrapped as its own routes are (counted;
    the POST admitted while not draining and, with keys, behind the key check)."""
    if not all(hasattr(server.enc, a) for a in ("params", "config", "tokenizer")):
        raise ValueError("--explorer needs an e5lite.Encoder (its params, config and tokenizer)")
    enc = cast(Explainable, server.enc)
    live = {"model": server.model_name, "keyed": server.access.keyed, "max_tokens": MAX_TOKENS}
    page = render_html(None, live=live)
    busy = asyncio.Lock()

    async def get_page(request: Request) -> Response:
        return HTMLResponse(page)

    async def post(request: Request) -> Response:
        req = parse(ExplainRequest, await server.body(request, STATUS))
        query, passage = req.query, req.passage
        texts = {"query": query} | ({} if passage is None else {"passage": passage})
        if busy.locked():
            raise RetryLater(429, "the explorer is explaining another pair: retry shortly", 1, code="busy")
        async with busy:
            checked_lengths(enc, texts, server.limits.auto_truncate)
            try:
                data = await run_in_threadpool(explain, enc, query, passage)
            except ValueError as e:  # a pooling explain cannot split
                raise ApiError(STATUS, str(e)) from None
        return Response(json.dumps(page_data(data), ensure_ascii=False), media_type="application/json")

    handler = server.admitted(post, queued=False)  # it runs beside the batch queue, not through it
    if server.access.keyed:
        handler = server.access.guarded(handler)
    return [
        Route("/explorer", server.counted("/explorer", "tei", get_page), methods=["GET"]),
        Route("/explorer", server.counted("/explorer", "tei", handler), methods=["POST"]),
    ]
