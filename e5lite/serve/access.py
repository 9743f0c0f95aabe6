"""Who may use the server: API keys on the inference routes, and the web origins whose pages may read its answers.

``--api-key KEY`` (repeatable, so that a new key can be added before the old one is dropped) or the
``E5LITE_API_KEY`` environment variable (keys separated by commas; it keeps them out of ``ps``): every route
that embeds, tokenises or decodes then wants ``Authorization: Bearer KEY``, and answers 401 in its own API's
error shape with ``WWW-Authenticate: Bearer`` without it. The describing routes (health, ping, ``GET /``, info,
metrics, the spec and its page) stay public, as TEI's. Keys are compared in constant time, and never logged.

``--cors-allow-origin ORIGIN ...``: without it no CORS headers are sent, so a page from another origin cannot
read the answers; with it, Starlette's ``CORSMiddleware`` answers preflights for those origins only (``*``:
any, when given explicitly).
"""

from __future__ import annotations

import argparse
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response

from .errors import Unauthorized

ENV_API_KEY = "E5LITE_API_KEY"

Handler = Callable[[Request], Awaitable[Response]]


def _check_key(key: str, where: str) -> None:
    # what a client can send in a header: printable ASCII without spaces (the key itself is never quoted)
    if not key:
        raise ValueError(f"{where} is empty")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"{where} must be printable ASCII without spaces (it is sent in an HTTP header)")


def _check_origin(origin: str) -> None:
    if origin != "*" and (not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin):
        raise ValueError(
            f"--cors-allow-origin {origin!r} must be '*' or an origin such as https://example.com "
            "(scheme, host and port, no trailing slash)"
        )


@dataclass(frozen=True, repr=False)  # repr=False: a repr in a log or traceback must not show the keys
class Access:
    """The API keys an inference request must carry one of (none: no key needed) and the CORS origins."""

    api_keys: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()

    def __post_init__(self):
        for i, key in enumerate(self.api_keys):
            _check_key(key, f"API key {i + 1} of {len(self.api_keys)} (--api-key or {ENV_API_KEY})")
        for origin in self.cors_allow_origins:
            _check_origin(origin)

    def __repr__(self) -> str:
        return f"Access({len(self.api_keys)} API keys, cors_allow_origins={self.cors_allow_origins!r})"

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Access:
        """The flags' keys, else ``E5LITE_API_KEY``'s (comma-separated); ValueError says which is wrong."""
        keys = args.api_key
        if not keys:
            keys = [k.strip() for k in environ.get(ENV_API_KEY, "").split(",") if k.strip()]
        return cls(tuple(keys), tuple(args.cors_allow_origin or ()))

    @property
    def keyed(self) -> bool:
        """The inference routes want a key."""
        return bool(self.api_keys)

    def allows(self, authorization: str | None) -> bool:
        """``Authorization: Bearer KEY`` with one of the keys. Every key is compared, each in constant time
        (hmac.compare_digest), so the time taken says nothing of how much of a key matched."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        sent = given.strip().encode("utf-8", "surrogateescape")
        matches = [hmac.compare_digest(sent, key.encode()) for key in self.api_keys]
        return any(matches)

    def guarded(self, handler: Handler) -> Handler:
        """``handler`` behind the key check: 401 before the body is read."""

        async def guard(request: Request) -> Response:
            authorization = request.headers.get("authorization")
            if not self.allows(authorization):
                if authorization is None:
                    raise Unauthorized("this server wants an API key: send 'Authorization: Bearer <key>'")
                raise Unauthorized("invalid API key in the Authorization header (expected 'Bearer <key>')")
            return await handler(request)

        return guard

    def middleware(self) -> list[Middleware]:
        """Starlette's CORSMiddleware for the origins given; none without them."""
        if not self.cors_allow_origins:
            return []
        return [
            Middleware(
                CORSMiddleware,
                allow_origins=list(self.cors_allow_origins),
                allow_methods=["GET", "POST"],
                # the pages are the operator's own: any header they send (Authorization, Content-Type: application/
                # json, an SDK's own such as the openai client's X-Stainless-*) may pass the preflight
                allow_headers=["*"],
                expose_headers=["Retry-After", "WWW-Authenticate"],
                max_age=600,
            )
        ]
