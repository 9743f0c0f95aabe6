"""The server's request and response models (e5lite/serve/protocol.py) without a server: validation and its
messages, response and error bodies (errors.py), the OpenAPI document (routes.py)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

pytest.importorskip("pydantic")
pytest.importorskip("starlette")

from e5lite.errors import ApiError  # noqa: E402
from e5lite.serve.errors import RetryLater, error_response  # noqa: E402
from e5lite.serve.protocol import EmbeddingRequest, EmbeddingResponse, EmbedRequest, EmbedResponse, parse  # noqa: E402
from e5lite.serve.routes import openapi  # noqa: E402

CONTEXT = {"dim": 32, "max_inputs": 4, "vocab_size": 100}
O, T = EmbeddingRequest, EmbedRequest
REFUSED = [
    # (model, body, status, whole message, field)
    (O, ["x"], 400, "request body must be a JSON object, got an array", None),
    (O, {"model": "m"}, 400, "'input' is a required property", "input"),
    (O, {"model": "m", "user": 5}, 400, "'input' is a required property", "input"),  # absent is named first
    (O, {"input": "x", "model": 3}, 400, "'model' must be a string, got a number", "model"),
    (O, {"input": [], "model": "m"}, 400, "'input' must not be empty", "input"),
    (O, {"input": "", "model": "m"}, 400, "input[0] is an empty string", "input"),
    (O, {"input": ["a", None], "model": "m"}, 400, "input[1] is null, expected a string or a list of token ids", "input"),
    (O, {"input": ["a", [1, "2"]], "model": "m"}, 400, "input[1] is an array, expected a string or a list of token ids",
     "input"),
    (O, {"input": [1, -2], "model": "m"}, 400, "input[0] has token id -2, outside the vocabulary [0, 100)", "input"),
    (O, {"input": [[1, 2], [100]], "model": "m"}, 400, "input[1] has token id 100, outside the vocabulary [0, 100)",
     "input"),
    (O, {"input": [[]], "model": "m"}, 400, "input[0] is an array, expected a string or a list of token ids", "input"),
    (O, {"input": {"a": 1}, "model": "m"}, 400,
     "'input' must be a string, a list of strings or token ids, got an object", "input"),
    (O, {"input": ["x"] * 5, "model": "m"}, 400, "'input' has 5 items; at most 4 per request", "input"),
    (O, {"input": "x", "model": "m", "encoding_format": "int8"}, 400,
     "'encoding_format' must be 'float' or 'base64', got 'int8'", "encoding_format"),
    (O, {"input": "x", "model": "m", "dimensions": 0}, 400, "'dimensions' must be an integer in [1, 32], got 0",
     "dimensions"),
    (O, {"input": "x", "model": "m", "dimensions": 33}, 400, "'dimensions' must be an integer in [1, 32], got 33",
     "dimensions"),
    (O, {"input": "x", "model": "m", "dimensions": "8"}, 400,
     "'dimensions' must be an integer in [1, 32], got '8'", "dimensions"),
    (O, {"input": "x", "model": "m", "dimensions": True}, 400,
     "'dimensions' must be an integer in [1, 32], got True", "dimensions"),
    (O, {"input": "x", "model": "m", "dimensions": 8.5}, 400,
     "'dimensions' must be an integer in [1, 32], got 8.5", "dimensions"),
    (O, {"input": "x", "model": "m", "user": 1}, 400, "'user' must be a string, got a number", "user"),
    (T, 42, 422, "request body must be a JSON object, got a number", None),
    (T, {"input": "x"}, 422, "missing field 'inputs'", "inputs"),
    (T, {"inputs": []}, 422, "'inputs' must not be empty", "inputs"),
    (T, {"inputs": ["ok", ""]}, 422, "inputs[1] is an empty string", "inputs"),
    (T, {"inputs": ["ok", 5]}, 422, "inputs[1] is a number, expected a string or a list of token ids", "inputs"),
    (T, {"inputs": ["ok", True]}, 422, "inputs[1] is a boolean, expected a string or a list of token ids", "inputs"),
    (T, {"inputs": [True, False]}, 422, "inputs[0] is a boolean, expected a string or a list of token ids", "inputs"),
    (T, {"inputs": ["x"] * 5}, 413, "'inputs' has 5 items; at most 4 per request", "inputs"),
    (T, {"inputs": "x", "normalize": "yes"}, 422, "'normalize' must be a boolean, got a string", "normalize"),
    (T, {"inputs": "x", "truncate": 1}, 422, "'truncate' must be a boolean, got a number", "truncate"),
    (T, {"inputs": "x", "prompt_name": 7}, 422, "'prompt_name' must be a string, got a number", "prompt_name"),
    (T, {"inputs": "x", "truncation_direction": "up"}, 422,
     "'truncation_direction' must be 'left' or 'right', got 'up'", "truncation_direction"),
    (T, {"inputs": "x", "dimensions": 40}, 422, "'dimensions' must be an integer in [1, 32], got 40", "dimensions"),
    (T, {"inputs": ["ok", "\ud800"]}, 422, "inputs[1] is not valid Unicode text (a lone surrogate escape)", "inputs"),
    (O, {"input": "x", "model": "m", "dimensions": 10 ** 300}, 400,
     "'dimensions' must be an integer in [1, 32], got 100000000000000000...0000000000000000000", "dimensions"),
]


@pytest.mark.parametrize("model, body, status, message, field", REFUSED)
def test_refused_requests_name_the_field_and_the_item(model, body, status, message, field):
    with pytest.raises(ApiError) as info:
        parse(model, body, **CONTEXT)
    e = info.value
    assert (e.status, e.message, e.param, e.code) == (status, message, field, None)


def test_accepted_requests_and_defaults():
    r = parse(EmbeddingRequest, {"input": "x", "model": "m", "encoding_format": None, "dimensions": None,
                                 "user": "u", "unknown": [1]}, **CONTEXT)
    assert r.input == ["x"] and r.model == "m" and r.encoding_format is None and r.dimensions is None
    r = parse(EmbeddingRequest, {"input": ["a", "b"], "model": "m", "dimensions": 32}, **CONTEXT)
    assert r.input == ["a", "b"] and r.encoding_format == "float" and r.dimensions == 32
    # JSON has one number type: an integral float is the integer to JSON Schema (the spec's "integer")
    assert parse(EmbeddingRequest, {"input": "x", "model": "m", "dimensions": 8.0}, **CONTEXT).dimensions == 8
    r = parse(EmbedRequest, {"inputs": "x"}, **CONTEXT)
    assert (r.inputs, r.normalize, r.truncate, r.truncation_direction, r.prompt_name) == (["x"], None, None, None,
                                                                                           None)
    r = parse(EmbedRequest, {"inputs": ["x"] * 4, "normalize": False, "truncate": True, "prompt_name": "query",
                             "truncation_direction": "Right"}, **CONTEXT)
    assert r.inputs == ["x"] * 4 and r.normalize is False and r.truncate is True and r.prompt_name == "query"


def test_without_a_server_context_only_the_model_limits_apply():
    r = parse(EmbeddingRequest, {"input": ["x"] * 5000, "model": "m", "dimensions": 4096})
    assert len(r.input) == 5000 and r.dimensions == 4096
    with pytest.raises(ApiError, match=r"^'dimensions' must be a positive integer, got 0$"):
        parse(EmbeddingRequest, {"input": "x", "model": "m", "dimensions": 0})


def test_openai_response_float_and_base64():
    rows = np.array([[0.5, -1.25], [3.0, 0.0]], np.float32)
    body = json.loads(EmbeddingResponse.of(rows, model="m", tokens=7, encoding_format="float").model_dump_json())
    assert body == {"object": "list", "model": "m", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.25]},
                             {"object": "embedding", "index": 1, "embedding": [3.0, 0.0]}]}
    body = json.loads(EmbeddingResponse.of(rows, model="m", tokens=7, encoding_format="base64").model_dump_json())
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in body["data"]])
    np.testing.assert_array_equal(got, rows)
    assert json.loads(EmbedResponse.of(rows).model_dump_json()) == [[0.5, -1.25], [3.0, 0.0]]


@pytest.mark.parametrize("status, openai_type, tei_type", [
    (400, "invalid_request_error", "Validation"), (413, "invalid_request_error", "Validation"),
    (422, "server_error", "Validation"), (429, "rate_limit_error", "Overloaded"),
    (404, "not_found_error", "Validation"), (500, "server_error", "Backend"), (503, "server_error", "Unhealthy")])
def test_error_bodies(status, openai_type, tei_type):
    e = ApiError(status, "nope", "input", "some_code")
    r = error_response(e, "openai")
    assert r.status_code == status and r.media_type == "application/json"
    assert json.loads(r.body) == {"error": {"message": "nope", "type": openai_type, "param": "input",
                                            "code": "some_code"}}
    r = error_response(e, "tei")
    assert r.status_code == status and json.loads(r.body) == {"error": "nope", "error_type": tei_type}
    assert "retry-after" not in r.headers


@pytest.mark.parametrize("seconds, header", [(0.2, "1"), (1.0, "1"), (2.01, "3"), (17.5, "18")])
def test_retry_later_sets_retry_after_in_whole_seconds(seconds, header):
    e = RetryLater(429, "busy", seconds, code="rate_limit_exceeded")
    for style in ("openai", "tei"):
        r = error_response(e, style)
        assert r.status_code == 429 and r.headers["retry-after"] == header
    assert json.loads(error_response(e, "openai").body)["error"] == {
        "message": "busy", "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}
    assert json.loads(error_response(e, "tei").body) == {"error": "busy", "error_type": "Overloaded"}


def test_messages_quote_values_short():
    deep = "x"
    for _ in range(500):  # a plain repr of this would run past the recursion limit in some contexts
        deep = [deep]
    for value in (deep, "y" * 100_000, 10 ** 999, {"k" * 50: ["v"] * 50}):
        with pytest.raises(ApiError) as info:
            parse(EmbeddingRequest, {"input": "x", "model": "m", "encoding_format": value}, **CONTEXT)
        assert info.value.message.startswith("'encoding_format' must be 'float' or 'base64', got ")
        assert len(info.value.message) < 150 and info.value.param == "encoding_format"


def test_openapi_schemas_come_from_the_models():
    doc = openapi("1.2.3")
    assert doc["info"]["version"] == "1.2.3" and {"/v1/embeddings", "/embed", "/tokenize"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]
    assert schemas["EmbeddingRequest"]["properties"]["encoding_format"]["anyOf"][0]["enum"] == ["float", "base64"]
    inputs = schemas["EmbedRequest"]["properties"]["inputs"]["anyOf"]  # a text, token ids, or a list of either
    assert [s["type"] for s in inputs] == ["string", "array", "array"]
    assert inputs[1]["items"]["type"] == "integer" and inputs[1]["items"]["minimum"] == 0
    assert set(schemas["EmbeddingResponse"]["properties"]) == {"object", "model", "data", "usage"}
    assert set(schemas["TEIErrorResponse"]["properties"]) == {"error", "error_type"}
    json.dumps(doc)  # serialisable as is
