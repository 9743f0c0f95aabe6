"""The wire protocol: request and response bodies of the OpenAI and TEI routes, declared once as pydantic models.

The models validate requests; ``parse`` turns pydantic's first complaint into an ``ApiError`` worded the way
each API words it (field in OpenAI's ``param``, index of a bad list item in the message). The same models give
the error bodies and the OpenAPI document served at ``GET /openapi.json``.
"""

from __future__ import annotations

import base64
import math
import reprlib
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

import numpy as np
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationError,
                      ValidationInfo, field_validator)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError
from starlette.responses import Response

from ..errors import ApiError

OPENAI_TYPES = {400: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error", 404: "not_found_error", 405: "invalid_request_error"}
# TEI's ErrorType enum as serde writes it (the variant's name); 503 is what its /health answers when unhealthy
TEI_TYPES = {413: "Validation", 422: "Validation", 429: "Overloaded", 400: "Validation", 415: "Validation",
             404: "Validation", 405: "Validation", 503: "Unhealthy"}
TOKEN_ARRAY_HINT = " (token arrays are not supported: send strings)"


def json_type(v) -> str:
    """How a JSON value's type reads in a message: "a number", "an array", "null"."""
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 40, 4, 4


def shown(value) -> str:
    """``repr(value)`` cut short: a message quotes what the client sent without echoing a huge or deeply
    nested value back (a plain repr of one nested a few hundred levels deep can even overflow the stack)."""
    return _SHORT.repr(value)


def refuse(kind: str, message: str) -> PydanticCustomError:
    """A validation error that reaches the client as ``message``, word for word."""
    return PydanticCustomError(kind, "{message}", {"message": message})


# ------------------------------------------------------------------------------------------------- requests

def _one_or_many(value):
    return [value] if isinstance(value, str) else value


def _at_most_max_inputs(value: list[str], info: ValidationInfo) -> list[str]:
    # the limit is a server flag, so it comes in the validation context rather than the type
    limit = (info.context or {}).get("max_inputs")
    if limit is not None and len(value) > limit:
        raise refuse("too_many_inputs", f"'{info.field_name}' has {len(value)} items; at most {limit} per request")
    return value


Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]
# One text or a list of them; always a list once validated, so a bad item's error location is its index.
Inputs = Annotated[Texts, BeforeValidator(_one_or_many, json_schema_input_type=Union[Text, Texts]),
                   AfterValidator(_at_most_max_inputs)]


class ApiRequest(BaseModel):
    """A request body. Strict: JSON types count as sent ("8" is not a number, 1 is not a boolean); unknown
    fields are ignored, as both APIs do."""
    model_config = ConfigDict(strict=True, extra="ignore")
    status: ClassVar[int]  # for a malformed body
    too_many_status: ClassVar[int]  # for more inputs than the server takes per request
    missing: ClassVar[str]  # the message for an absent required field, in the API's own wording


class EmbeddingRequest(ApiRequest):
    """OpenAI ``POST /v1/embeddings``."""
    status: ClassVar[int] = 400
    too_many_status: ClassVar[int] = 400
    missing: ClassVar[str] = "'{}' is a required property"

    input: Inputs = Field(description="The text, or the texts, to embed.")
    model: str = Field(description="Echoed in the response; the server embeds with the model it was started with.")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="base64: each embedding as little-endian float32 bytes.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first N values of each embedding, "
                                                           "normalised again (Matryoshka truncation).")
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("dimensions", mode="wrap")
    @classmethod
    def _dimensions_in_range(cls, value, handler, info: ValidationInfo):
        # one message for every way to get it wrong, with the model's own bound
        dim = (info.context or {}).get("dim")
        try:
            dims = handler(value)
        except ValidationError:
            dims = 0
        if dims is not None and (dims < 1 or (dim is not None and dims > dim)):
            wanted = f"an integer in [1, {dim}]" if dim is not None else "a positive integer"
            raise refuse("dimensions", f"'dimensions' must be {wanted}, got {shown(value)}")
        return dims


class EmbedRequest(ApiRequest):
    """Text Embeddings Inference ``POST /embed``."""
    status: ClassVar[int] = 422
    too_many_status: ClassVar[int] = 413
    missing: ClassVar[str] = "missing field '{}'"

    inputs: Inputs = Field(description="The text, or the texts, to embed.")
    normalize: bool | None = Field(None, description="Unit-length embeddings; null: true.")
    truncate: bool | None = Field(None, description="Cut texts past the model's maximum length instead of "
                                                    "refusing them; null: the server's setting.")
    truncation_direction: Literal["right", "Right"] | None = Field(None, description="Only right is supported.")
    prompt_name: str | None = Field(None, description="A prompt of the model's, put before every text; "
                                                      "null: the model's default prompt, if any.")

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _right_only(cls, value):
        if value is not None and value not in ("right", "Right"):
            raise refuse("truncation_direction",
                         f"'truncation_direction' {shown(value)} is not supported: only 'right'")
        return value


R = TypeVar("R", bound=ApiRequest)


def parse(model: type[R], body: Any, **context) -> R:
    """``body`` (parsed JSON) validated as ``model``; ``context``: ``dim`` and ``max_inputs`` of the server."""
    try:
        return model.model_validate(body, context=context)
    except ValidationError as e:
        raise api_error(e, model) from None


def api_error(exc: ValidationError, model: type[ApiRequest]) -> ApiError:
    """The ApiError for a request pydantic refused: its first problem, an absent field before a malformed one."""
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e["type"] == "missing"), errors[0])
    if not err["loc"]:
        return ApiError(model.status, f"request body must be a JSON object, got {json_type(err['input'])}")
    status = model.too_many_status if err["type"] == "too_many_inputs" else model.status
    return ApiError(status, _describe(err, model.missing), str(err["loc"][0]))


# pydantic's error kinds for a whole field, in the wording the API has always answered with
FIELD_MESSAGES = {
    "list_type": "'{field}' must be a string or a list of strings, got {got}",
    "too_short": "'{field}' must not be empty",
    "string_type": "'{field}' must be a string, got {got}",
    "bool_type": "'{field}' must be a boolean, got {got}",
    "int_type": "'{field}' must be an integer, got {got}",
    "literal_error": "'{field}' must be {expected}, got {value}",
    "string_unicode": "'{field}' is not valid Unicode text (a lone surrogate escape)",
}


def _describe(err: dict, missing: str) -> str:
    loc, kind, value, ctx = err["loc"], err["type"], err["input"], err.get("ctx") or {}
    if "message" in ctx:  # raised by refuse(): already worded
        return str(ctx["message"])
    if kind == "missing":
        return missing.format(loc[0])
    if len(loc) > 1:  # an item of the inputs list
        where = f"{loc[0]}[{loc[1]}]"
        if kind == "string_too_short":
            return f"{where} is an empty string"
        if kind == "string_type":
            hint = TOKEN_ARRAY_HINT if type(value) in (int, list) else ""
            return f"{where} is {json_type(value)}, expected a string{hint}"
        if kind == "string_unicode":
            return f"{where} is not valid Unicode text (a lone surrogate escape)"
        return f"{where}: {err['msg']}"
    template = FIELD_MESSAGES.get(kind)
    if template is None:
        return f"'{loc[0]}': {err['msg']}"
    return template.format(field=loc[0], got=json_type(value), value=shown(value), expected=ctx.get("expected"))


# ------------------------------------------------------------------------------------------------ responses

class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="base64 of little-endian float32 when asked for.")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens embedded, prompt and special tokens included, after truncation.")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    """OpenAI embeddings response."""
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    usage: Usage

    @classmethod
    def of(cls, rows: np.ndarray, *, model: str, tokens: int, encoding_format: str | None) -> "EmbeddingResponse":
        # model_construct: the rows are ours and already right, and validating every float would cost time
        if encoding_format == "base64":
            data = [base64.b64encode(r.astype("<f4").tobytes()).decode() for r in rows]
        else:
            data = rows.tolist()
        return cls.model_construct(
            model=model, data=[Embedding.model_construct(index=i, embedding=e) for i, e in enumerate(data)],
            usage=Usage.model_construct(prompt_tokens=tokens, total_tokens=tokens))


class EmbedResponse(RootModel[list[list[float]]]):
    """TEI embed response: one embedding per input."""

    @classmethod
    def of(cls, rows: np.ndarray) -> "EmbedResponse":
        return cls.model_construct(rows.tolist())


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


def json_response(body: BaseModel, status: int = 200, headers: dict | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def error_response(e: ApiError, style: str) -> Response:
    """OpenAI: {"error": {"message", "type", "param", "code"}}; TEI: {"error", "error_type"}. A RetryLater
    also sets ``Retry-After`` (which the openai client and most HTTP clients honour)."""
    if style == "openai":
        body: BaseModel = OpenAIErrorResponse(error=OpenAIError(
            message=e.message, type=OPENAI_TYPES.get(e.status, "server_error"), param=e.param, code=e.code))
    else:
        body = TEIErrorResponse(error=e.message, error_type=TEI_TYPES.get(e.status, "Backend"))
    headers = {"Retry-After": str(e.retry_after)} if isinstance(e, RetryLater) else None
    return json_response(body, e.status, headers)


# ------------------------------------------------------------------------------------------------- OpenAPI

ROUTES = {  # path: (summary, request, response, error body, error statuses)
    "/v1/embeddings": ("OpenAI-compatible embeddings", EmbeddingRequest, EmbeddingResponse, OpenAIErrorResponse,
                       (400, 413, 415, 429, 500, 503)),
    "/embed": ("Text Embeddings Inference embed", EmbedRequest, EmbedResponse, TEIErrorResponse,
               (400, 413, 415, 422, 429, 500, 503)),
}


def openapi(version: str) -> dict:
    """An OpenAPI 3.1 document of the embedding routes, its schemas generated from the models above."""
    models = [(m, "validation") for _, m, _, _, _ in ROUTES.values()]
    models += [(m, "serialization") for _, _, resp, err, _ in ROUTES.values() for m in (resp, err)]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")

    def content(model, mode: str) -> dict:
        return {"application/json": {"schema": refs[model, mode]}}

    paths = {}
    for path, (summary, request, response, error, statuses) in ROUTES.items():
        responses = {"200": {"description": "Embeddings in input order", "content": content(response, "serialization")}}
        responses |= {str(s): {"description": "Refused or failed", "content": content(error, "serialization")}
                      for s in statuses}
        paths[path] = {"post": {"summary": summary, "responses": responses,
                                "requestBody": {"required": True, "content": content(request, "validation")}}}
    return {"openapi": "3.1.0", "info": {"title": "e5lite", "version": version}, "paths": paths,
            "components": {"schemas": top.get("$defs", {})}}
