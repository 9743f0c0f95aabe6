"""The wire protocol: request bodies of the OpenAI and TEI routes, declared once as pydantic models (the response
bodies are ``responses.py``'s, importable from here too).

The models validate requests; ``parse`` turns pydantic's first complaint into an ``ApiError`` worded the way
each API words it (field in OpenAI's ``param``, index of a bad list item in the message). The same models give
the OpenAPI document served at ``GET /openapi.json`` (``routes.py``); error bodies are ``errors.py``'s.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WrapValidator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from ..errors import ApiError
from .bounds import Bound
from .responses import DecodeResponse as DecodeResponse
from .responses import EmbedAllResponse as EmbedAllResponse
from .responses import Embedding as Embedding
from .responses import EmbeddingResponse as EmbeddingResponse
from .responses import EmbedResponse as EmbedResponse
from .responses import Health as Health
from .responses import Info as Info
from .responses import SimilarityResponse as SimilarityResponse
from .responses import SimpleToken as SimpleToken
from .responses import TokenizeResponse as TokenizeResponse
from .responses import Usage as Usage
from .responses import json_response as json_response


def json_type(v) -> str:
    """How a JSON value's type reads in a message: "a number", "an array", "null"."""
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
        type(None): "null",
    }.get(type(v), type(v).__name__)


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


def _is_id(t) -> bool:
    # JSON has one number type: 7.0 is the integer 7 to JSON Schema (and to clients that write every number as a
    # float), so an integral float counts as a token id; a boolean does not
    return type(t) is int or (type(t) is float and t.is_integer())


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_id(t) for t in value)


def _ids(value: list) -> list[int]:
    return value if all(type(t) is int for t in value) else [int(t) for t in value]


def _check_text(text: str, where: str) -> None:
    if not text:
        raise refuse("empty", f"{where} is an empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise refuse("string_unicode", f"{where} is not valid Unicode text (a lone surrogate escape)") from None


def _check_ids(ids: list[int], where: str, info: ValidationInfo) -> None:
    vocab = (info.context or {}).get("vocab_size")
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise refuse(
            "token_id",
            f"{where} has token id {shown(bad)}, outside the vocabulary "
            f"[0, {vocab if vocab is not None else 'vocab_size'})",
        )


def _check_count(value: list, info: ValidationInfo) -> list:
    # the limit is a server flag, so it comes in the validation context rather than the type
    limit = (info.context or {}).get("max_inputs")
    if limit is not None and len(value) > limit:
        raise refuse("too_many_inputs", f"'{info.field_name}' has {len(value)} items; at most {limit} per request")
    return value


def _inputs(value, info: ValidationInfo) -> list:
    """One input or a list of them, each a text or token ids (TEI's ``Input``): a list of texts and id lists
    once validated. Bad items are named by index. Token ids are checked against the vocabulary here; their
    length against the model's maximum where they are embedded (as texts' are)."""
    field = info.field_name
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list):
        raise refuse("list_type", f"'{field}' must be a string, a list of strings or token ids, got {json_type(value)}")
    value = list(value)  # the items' token ids are replaced by ints, never in the caller's body
    if not value:
        raise refuse("too_short", f"'{field}' must not be empty")
    for i, item in enumerate(value):
        if isinstance(item, str):
            _check_text(item, f"{field}[{i}]")
        elif _is_ids(item):
            value[i] = item = _ids(item)
            _check_ids(item, f"{field}[{i}]", info)
        else:
            raise refuse("item_type", f"{field}[{i}] is {json_type(item)}, expected a string or a list of token ids")
    return _check_count(value, info)


def _texts(value, info: ValidationInfo) -> list[str]:
    """One text or a list of texts (``/tokenize``; ``/similarity``'s sentences): a list once validated."""
    field = info.field_name
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise refuse("list_type", f"'{field}' must be a string or a list of strings, got {json_type(value)}")
    if not value:
        raise refuse("too_short", f"'{field}' must not be empty")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise refuse("item_type", f"{field}[{i}] is {json_type(item)}, expected a string")
        _check_text(item, f"{field}[{i}]")
    return _check_count(value, info)


def _id_lists(value, info: ValidationInfo) -> list[list[int]]:
    """Token ids, or a list of them (``/decode``): a list of id lists once validated."""
    field = info.field_name
    if _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not value:
        raise refuse(
            "list_type",
            f"'{field}' must be a list of token ids or a list of such lists, got "
            f"{json_type(value) if value != [] else 'an empty array'}",
        )
    value = list(value)
    for i, item in enumerate(value):
        if not _is_ids(item):
            raise refuse("item_type", f"{field}[{i}] is {json_type(item)}, expected a list of token ids")
        value[i] = item = _ids(item)
        _check_ids(item, f"{field}[{i}]", info)
    return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0), Bound("maximum", "vocab_size", -1)]], Field(min_length=1)]
Text = Annotated[str, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1), Bound("maxItems", "max_inputs")]
# One input or a list: always a list once validated, so that a bad item's error names its index.
Inputs = Annotated[
    list[str | list[int]],
    PlainValidator(
        _inputs,
        json_schema_input_type=Text
        | TokenIds
        | Annotated[list[Text | TokenIds], Field(min_length=1), Bound("maxItems", "max_inputs")],
    ),
]
TextInputs = Annotated[list[str], PlainValidator(_texts, json_schema_input_type=Text | Texts)]
IdInputs = Annotated[
    list[list[int]],
    PlainValidator(_id_lists, json_schema_input_type=TokenIds | Annotated[list[TokenIds], Field(min_length=1)]),
]


def _direction(value):
    if value is None or value in ("left", "right", "Left", "Right"):
        return value.lower() if value else value
    raise refuse("truncation_direction", f"'truncation_direction' must be 'left' or 'right', got {shown(value)}")


Direction = Annotated[
    Literal["left", "right"] | None,
    BeforeValidator(_direction, json_schema_input_type=Literal["left", "right", "Left", "Right"] | None),
]


def _dimensions_in_range(value, handler, info: ValidationInfo):
    # one message for every way to get it wrong, with the model's own bound
    dim = (info.context or {}).get("dim")
    if _is_id(value) and type(value) is float:  # 8.0 is the integer 8 to JSON Schema, as for token ids
        value = int(value)
    try:
        dims = handler(value)
    except ValidationError:
        dims = 0
    if dims is not None and (dims < 1 or (dim is not None and dims > dim)):
        wanted = f"an integer in [1, {dim}]" if dim is not None else "a positive integer"
        raise refuse("dimensions", f"'dimensions' must be {wanted}, got {shown(value)}")
    return dims


Dimensions = Annotated[
    int | None,
    WrapValidator(
        _dimensions_in_range, json_schema_input_type=Annotated[int, Field(ge=1), Bound("maximum", "dim")] | None
    ),
]
# a prompt of the model's by name: the document lists the names
PromptName = Annotated[str, Bound("enum", "prompt_names")] | None


class ApiRequest(BaseModel):
    """A request body. Strict: JSON types count as sent ("8" is not a number, 1 is not a boolean); unknown
    fields are ignored, as both APIs do."""

    model_config = ConfigDict(strict=True, extra="ignore")
    status: ClassVar[int]  # for a malformed body
    too_many_status: ClassVar[int]  # for more inputs than the server takes per request
    missing: ClassVar[str]  # the message for an absent required field, in the API's own wording


class EmbeddingRequest(ApiRequest):
    """OpenAI ``POST /v1/embeddings`` (also ``/embeddings``)."""

    status: ClassVar[int] = 400
    too_many_status: ClassVar[int] = 400
    missing: ClassVar[str] = "'{}' is a required property"

    input: Inputs = Field(
        description="The text, or the texts, to embed; token ids (a list of integers, or "
        "a list of such lists) are embedded as given."
    )
    model: str | None = Field(
        None, description="Echoed in the response; the server embeds with the model it was started with."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="base64: each embedding as little-endian float32 bytes."
    )
    dimensions: Dimensions = Field(
        None, description="Keep the first N values of each embedding, normalised again (Matryoshka truncation)."
    )
    user: str | None = Field(None, description="Accepted and ignored.")


class TeiRequest(ApiRequest):
    """What TEI's routes share: its status codes and wording."""

    status: ClassVar[int] = 422
    too_many_status: ClassVar[int] = 413
    missing: ClassVar[str] = "missing field '{}'"


class Truncation(BaseModel):
    """TEI's truncation and prompt fields."""

    truncate: bool | None = Field(
        None,
        description="Cut texts past the model's maximum length instead of refusing them; null: the server's setting.",
    )
    truncation_direction: Direction = Field(
        None, description="Which end a text past the maximum length loses (left or right, either case); null: right."
    )
    prompt_name: PromptName = Field(
        None, description="A prompt of the model's, put before every text; null: the server's default prompt, if any."
    )


class EmbedRequest(TeiRequest, Truncation):
    """Text Embeddings Inference ``POST /embed`` (also ``POST /`` and ``/invocations``)."""

    inputs: Inputs = Field(
        description="The text, or the texts, to embed; token ids (a list of integers, or a "
        "list of such lists) are embedded as given."
    )
    normalize: bool | None = Field(None, description="Unit-length embeddings; null: true.")
    dimensions: Dimensions = Field(
        None, description="Keep the first N values of each embedding (normalised again when normalize is true)."
    )


class EmbedAllRequest(TeiRequest, Truncation):
    """TEI ``POST /embed_all``: the last layer's hidden state of every token."""

    inputs: Inputs = Field(description="The text, or the texts; or token ids, as for /embed.")


class SimilarityInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    source_sentence: Text = Field(description="The text the others are compared with.")
    sentences: TextInputs = Field(description="The texts compared with source_sentence.")


class SimilarityParameters(Truncation):
    model_config = ConfigDict(strict=True, extra="ignore")


class SimilarityRequest(TeiRequest):
    """TEI ``POST /similarity``: the cosine of source_sentence with each of sentences."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = Field(
        None, description="truncate, truncation_direction, prompt_name, as for /embed."
    )


class TokenizeRequest(TeiRequest):
    """TEI ``POST /tokenize``: the tokens of each text (prompt included), not truncated."""

    inputs: TextInputs = Field(description="The text, or the texts, to tokenise.")
    add_special_tokens: bool = Field(True, description="Add the model's special tokens ([CLS] ... [SEP]).")
    prompt_name: PromptName = Field(
        None, description="A prompt of the model's, put before every text; null: the server's default prompt, if any."
    )


class DecodeRequest(TeiRequest):
    """TEI ``POST /decode``: the text of token ids."""

    ids: IdInputs = Field(description="Token ids, or a list of such lists.")
    skip_special_tokens: bool = Field(True, description="Leave out the special tokens.")


class ExplainRequest(TeiRequest):
    """``POST /explorer`` (``serve --explorer``): the explorer's data for a text, or a query-passage pair."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt 'passage' must not explain the query alone
    query: str = Field(description="The query, prompted as encode_queries prompts it.")
    passage: str | None = Field(None, description="The passage; null: the query's tokens and attention alone.")


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
    "model_type": "'{field}' must be an object, got {got}",
    "string_type": "'{field}' must be a string, got {got}",
    "bool_type": "'{field}' must be a boolean, got {got}",
    "int_type": "'{field}' must be an integer, got {got}",
    "literal_error": "'{field}' must be {expected}, got {value}",
    "string_unicode": "'{field}' is not valid Unicode text (a lone surrogate escape)",
    "extra_forbidden": "unknown field '{field}'",
}


def _describe(err: ErrorDetails, missing: str) -> str:
    loc, kind, value, ctx = err["loc"], err["type"], err["input"], err.get("ctx") or {}
    if "message" in ctx:  # raised by refuse(): already worded
        return str(ctx["message"])
    # a nested field reads as a dotted path ("inputs.source_sentence"), a list item with its index
    name = "".join(f"[{x}]" if isinstance(x, int) else (f".{x}" if i else str(x)) for i, x in enumerate(loc))
    if kind == "missing":
        return missing.format(name)
    if kind == "string_too_short":
        return f"'{name}' is an empty string"
    template = FIELD_MESSAGES.get(kind)
    if template is None:
        return f"'{name}': {err['msg']}"
    return template.format(field=name, got=json_type(value), value=shown(value), expected=ctx.get("expected"))
