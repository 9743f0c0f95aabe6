"""What every route that takes text shares, and the routes that work on text without the model: reading a body
within ``--payload-limit``, a request's prompt (its ``prompt_name``, else the server's default prompt), and
``POST /tokenize`` and ``/decode``. ``app.Server`` has them as methods (``routes.ROUTES`` names the handlers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..errors import ApiError
from .connection import read_json
from .limits import Limits
from .protocol import DecodeRequest, SimpleToken, TokenizeRequest, TokenizeResponse, json_response, parse
from .responses import DecodeResponse
from .served import ServedEncoder


def byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of each character position of ``text`` (len + 1 entries): TEI reports offsets in
    bytes, as the Rust tokenizer does; Python's tokenizer gives characters."""
    if text.isascii():
        return np.arange(len(text) + 1)
    return np.concatenate([[0], np.cumsum([len(c.encode("utf-8", "surrogatepass")) for c in text])])


def resolve_default_prompt(enc: ServedEncoder, name: str | None, prompt: str | None) -> str | None:
    """The prefix a request without a prompt gets (``--default-prompt`` or ``--default-prompt-name``), or None
    for the model's own default; ValueError names the flag of an unknown prompt name."""
    if prompt is not None:
        return prompt
    if name is None:
        return None
    try:
        return enc.prompt_prefix(name)
    except ValueError as e:
        raise ValueError(f"--default-prompt-name: {e}") from None


class TextRoutes:
    """``Server``'s text handlers and helpers, on the state it sets up (declared here, assigned by ``Server``)."""

    enc: ServedEncoder
    limits: Limits
    context: dict[str, Any]
    default_prompt: str | None  # None: the model's default prompt, if it has one

    async def body(self, request: Request, invalid_status: int):
        """The request's JSON body, within --payload-limit (``connection.read_json``)."""
        return await read_json(request, invalid_status, self.limits.payload_limit)

    def prefix(self, prompt_name: str | None, status: int) -> str:
        """The text put before each input: the named prompt (refused with ``status`` if unknown), else the
        server's default prompt, else the model's."""
        if prompt_name is None and self.default_prompt is not None:
            return self.default_prompt
        try:
            return self.enc.prompt_prefix(prompt_name)
        except ValueError as e:
            raise ApiError(status, str(e), "prompt_name") from None

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
        req = parse(TokenizeRequest, await self.body(request, TokenizeRequest.status), **self.context)
        prefix = self.prefix(req.prompt_name, TokenizeRequest.status)
        texts = [prefix + t for t in req.inputs] if prefix else req.inputs
        rows = await run_in_threadpool(self.tokens_of, texts, req.add_special_tokens)
        return json_response(TokenizeResponse.model_construct(rows))

    async def decode(self, request: Request) -> Response:
        req = parse(DecodeRequest, await self.body(request, DecodeRequest.status), **self.context)
        decode = self.enc.decode
        texts = await run_in_threadpool(lambda: [decode(ids, req.skip_special_tokens) for ids in req.ids])
        return json_response(DecodeResponse.model_construct(texts))
