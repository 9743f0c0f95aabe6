"""Refusals on the wire: the error bodies of each API, the ``Retry-After`` refusals (429, 503), and one builder
for each refusal raised in several places, so that its wording cannot drift between them."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field
from starlette.responses import Response

from ..errors import ApiError
from .protocol import json_response

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    404: "not_found_error",
    405: "invalid_request_error",
}
# TEI's ErrorType enum as serde writes it (the variant's name); 503 is what its /health answers when unhealthy
TEI_TYPES = {
    401: "Unauthorized",
    413: "Validation",
    422: "Validation",
    429: "Overloaded",
    400: "Validation",
    415: "Validation",
    404: "Validation",
    405: "Validation",
    503: "Unhealthy",
}
SHUTTING_DOWN = "server is shutting down"


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = Field(description="The request field at fault, if any.")
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """OpenAI error body."""

    error: OpenAIError


class TEIErrorResponse(BaseModel):
    """TEI error body."""

    error: str
    error_type: str


def whole_seconds(seconds: float) -> int:
    """``Retry-After`` takes whole seconds; at least 1, so that a client does not come straight back."""
    return max(1, math.ceil(seconds))


class RetryLater(ApiError):
    """A refusal that says when to come back: 429 (overloaded) or 503 (shutting down), with ``Retry-After``."""

    def __init__(self, status: int, message: str, retry_after: float, code: str | None = None):
        super().__init__(status, message, code=code)
        self.retry_after = whole_seconds(retry_after)


class Unauthorized(ApiError):
    """401 on an inference route without the right API key; answered with ``WWW-Authenticate: Bearer``, which
    says how to send one (RFC 6750)."""

    def __init__(self, message: str):
        super().__init__(401, message, code="invalid_api_key")


def shutting_down() -> RetryLater:
    """The 503 for work that arrives, or is still waiting, while the server shuts down (new work refused while
    it drains, queued work past ``--shutdown-timeout``). ``/health``'s 503 says the same without ``Retry-After``."""
    return RetryLater(503, SHUTTING_DOWN, 1, code="shutting_down")


def error_response(e: ApiError, style: str) -> Response:
    """OpenAI: {"error": {"message", "type", "param", "code"}}; TEI: {"error", "error_type"}. A RetryLater
    also sets ``Retry-After`` (which the openai client and most HTTP clients honour), an Unauthorized
    ``WWW-Authenticate``."""
    if style == "openai":
        body: BaseModel = OpenAIErrorResponse(
            error=OpenAIError(
                message=e.message, type=OPENAI_TYPES.get(e.status, "server_error"), param=e.param, code=e.code
            )
        )
    else:
        body = TEIErrorResponse(error=e.message, error_type=TEI_TYPES.get(e.status, "Backend"))
    headers = None
    if isinstance(e, RetryLater):
        headers = {"Retry-After": str(e.retry_after)}
    elif isinstance(e, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response(body, e.status, headers)
