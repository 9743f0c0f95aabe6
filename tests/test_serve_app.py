"""The server app in process (Starlette's TestClient): what the subprocess tests in test_serve.py cannot reach
or watch, such as a failing engine call, the calls the server makes on the encoder, and /openapi.json."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXTS

import e5lite

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # TestClient drives the app through httpx

ATOL = 1e-6


@pytest.fixture(scope="module")
def enc(tiny):
    return tiny


def in_process_app(enc, **limits):
    from starlette.testclient import TestClient

    from e5lite.serve import Limits, build_app
    return TestClient(build_app(enc, model_name="m", limits=Limits(**limits)))


def test_no_auto_truncate_refuses_long_texts_on_v1(enc):
    with in_process_app(enc, auto_truncate=False) as client:
        r = client.post("/v1/embeddings", json={"input": ["short", TEXTS[2]], "model": "m"})
        assert r.status_code == 400
        assert r.json()["error"] == {
            "message": "input[1] is longer than the model's maximum of 128 tokens (truncation is off)",
            "type": "invalid_request_error", "param": "input", "code": "context_length_exceeded"}
        r = client.post("/embed", json={"inputs": TEXTS[2], "truncate": True})  # a TEI request may still ask
        np.testing.assert_allclose(np.array(r.json(), np.float32), enc.encode([TEXTS[2]]), atol=ATOL, rtol=0)


def test_failing_batch_costs_its_requests_not_the_server(enc, monkeypatch):
    embed_valid_ids = enc.embed_valid_ids
    boom = enc.tokenize(["boom"])[0]

    def flaky(ids, **kw):
        if any(np.array_equal(i, boom) for i in ids):
            raise RuntimeError("device lost")
        return embed_valid_ids(ids, **kw)

    monkeypatch.setattr(enc, "embed_valid_ids", flaky)
    with in_process_app(enc) as client:
        r = client.post("/v1/embeddings", json={"input": "boom", "model": "m"})
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "internal error: RuntimeError: device lost"
        r = client.post("/embed", json={"inputs": "fine"})
        assert r.status_code == 200 and client.get("/health").status_code == 200


def test_each_request_is_tokenised_once_and_queued_as_token_ids(enc, monkeypatch):
    """One pipeline.prepare per request, on the encoder's public interface; the batch worker embeds the ids
    without checking them again (the request models and prepare did)."""
    prepare, embed_valid_ids, tokenize, embed_ids = enc.prepare, enc.embed_valid_ids, enc.tokenize, enc.embed_ids
    tokenized, embedded = [], []

    def counting_prepare(items, recipe, **kw):
        tokenized.append(list(items))
        assert recipe.prompt == "query: " and recipe.truncate and not recipe.normalize
        return prepare(items, recipe, **kw)

    def recording_embed_valid_ids(ids, **kw):
        embedded.append(list(ids))
        return embed_valid_ids(ids, **kw)

    monkeypatch.setattr(enc, "prepare", counting_prepare)
    monkeypatch.setattr(enc, "embed_valid_ids", recording_embed_valid_ids)
    for name in ("encode", "tokenize", "embed_ids"):  # the server must not go through text, nor check ids twice
        monkeypatch.setattr(enc, name, None)
    texts = ["first text", "a second, longer text"]
    with in_process_app(enc) as client:
        r = client.post("/embed", json={"inputs": texts, "prompt_name": "query", "normalize": False})
        assert r.status_code == 200, r.text
    assert tokenized == [texts]
    want = tokenize(texts, prompt_name="query")
    assert len(embedded) == 1 and all(np.array_equal(a, b) for a, b in zip(embedded[0], want, strict=True))
    np.testing.assert_allclose(np.array(r.json(), np.float32),
                               embed_ids(want, normalize=False, show_progress_bar=False), atol=ATOL, rtol=0)


def test_info_reports_the_engine_settings(enc):
    with in_process_app(enc, max_batch_tokens=100) as client:
        info = client.get("/info").json()
    assert info["attention_impl"] == enc.settings.attention_impl and info["max_batch_tokens"] == 100
    assert info["devices"] == [str(d) for d in enc.devices] and info["version"] == e5lite.__version__


def test_openapi_lists_both_routes_and_request_fields(enc):
    with in_process_app(enc) as client:
        r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.") and {"/v1/embeddings", "/embed"} <= set(doc["paths"])
    schemas = doc["components"]["schemas"]

    def request_schema(path):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    openai, tei = request_schema("/v1/embeddings"), request_schema("/embed")
    assert set(openai["properties"]) == {"input", "model", "encoding_format", "dimensions", "user"}
    assert openai["required"] == ["input"]  # model is optional, as in TEI
    assert set(tei["properties"]) == {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name",
                                      "dimensions"}
    assert tei["required"] == ["inputs"]
    for path in doc["paths"]:  # every $ref resolves
        for response in (r for op in doc["paths"][path].values() for r in op["responses"].values()):
            ref = response["content"].get("application/json", {}).get("schema", {}).get("$ref")
            assert ref is None or ref.rsplit("/", 1)[1] in schemas


def test_limits_are_checked_and_the_cli_flags_come_from_them():
    import dataclasses

    from e5lite.cli import build_parser
    from e5lite.serve import Limits
    with pytest.raises(ValueError, match=r"^max_queue \(--max-queue\) must be at least 1, got 0$"):
        Limits(max_queue=0)
    with pytest.raises(ValueError, match=r"^max_queue_wait_ms \(--max-queue-wait-ms\) must be at least 1, got 0.5$"):
        Limits(max_queue_wait_ms=0.5)
    with pytest.raises(ValueError, match=r"^max_inputs \(--max-client-batch-size\) must be int, got True$"):
        Limits(max_inputs=True)
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert Limits.from_arguments(args) == Limits()  # every default stated once, in Limits
    args = build_parser().parse_args(["serve", "--model", "m", "--max-queue-wait-ms", "500", "--shutdown-timeout",
                                      "3", "--max-queue-tokens", "9000", "--no-auto-truncate"])
    assert Limits.from_arguments(args) == dataclasses.replace(Limits(), max_queue_wait_ms=500.0, shutdown_timeout=3.0,
                                                              max_queue_tokens=9000, auto_truncate=False)
    resolved = Limits().resolved(token_budget=1024)
    assert (resolved.max_batch_tokens, resolved.max_queue_tokens) == (4096, 8 * 4096)


def test_a_full_queue_refuses_before_reading_the_body(enc):
    """While no request could be admitted, the queued routes answer 429 without reading the body (a malformed
    one too: under a flood, only the refusals cost); routes that do not queue, and the same body once there is
    room, are answered as usual."""
    with in_process_app(enc, max_queue=1) as client:
        batcher = client.app.state.server.batcher
        ticket = batcher.admit(5)  # one request being tokenised fills a queue of one
        try:
            for path in ("/v1/embeddings", "/embed", "/similarity"):
                r = client.post(path, content=b"{not json", headers={"content-type": "application/json"})
                assert r.status_code == 429 and "1 requests already queued (--max-queue)" in r.text, path
                assert r.headers["retry-after"] == "1"
            assert client.post("/tokenize", json={"inputs": "fine"}).status_code == 200
        finally:
            batcher.release(ticket)
        r = client.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
