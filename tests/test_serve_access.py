"""The server's front door, in process (Starlette's TestClient): API keys on the inference routes, CORS, the
payload limit, requests that can never be admitted (413, not 429), long texts cut cheaply at an idle server,
the default prompt and the served model name. The real clients with a key are in test_serve_clients.py."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from conftest import TEXTS

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # TestClient drives the app through httpx

from e5lite.serve import Limits, build_app  # noqa: E402
from e5lite.serve.access import Access  # noqa: E402
from e5lite.serve.routes import ROUTES  # noqa: E402

ATOL = 1e-5
KEYS = ("first-key", "second-key")
BODIES = {  # a valid request of each inference route
    "openai_embeddings": {"input": "query: a"},
    "tei_embed": {"inputs": "query: a"},
    "embed_all": {"inputs": "query: a"},
    "similarity": {"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}},
    "tokenize_route": {"inputs": "Größe"},
    "decode": {"ids": [101, 7592, 102]},
}
POSTS = [r for r in ROUTES if r.method == "POST"]
PUBLIC = ["/health", "/ping", "/", "/info", "/metrics", "/openapi.json", "/docs"]


def client(enc, **options):
    from starlette.testclient import TestClient

    limits = options.pop("limits", Limits())
    return TestClient(build_app(enc, model_name=options.pop("model_name", "m"), limits=limits, **options))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused_401(r, style: str) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    body = r.json()
    if style == "openai":
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["code"] == "invalid_api_key"
        return body["error"]["message"]
    assert body["error_type"] == "Unauthorized"
    return body["error"]


@pytest.fixture(scope="module")
def keyed(tiny):
    with client(tiny, access=Access(api_keys=KEYS)) as c:
        yield c


@pytest.mark.parametrize("route", POSTS, ids=lambda r: r.path)
def test_every_inference_route_wants_a_key(keyed, route):
    body = BODIES[route.handler]
    missing = refused_401(keyed.post(route.path, json=body), route.style)
    assert "Authorization: Bearer <key>" in missing
    for header in (bearer("wrong"), bearer(KEYS[0] + "x"), {"Authorization": KEYS[0]}, {"Authorization": "Basic a"}):
        message = refused_401(keyed.post(route.path, json=body, headers=header), route.style)
        assert "invalid API key" in message and KEYS[0] not in message
    for key in KEYS:  # either key of a rotation
        r = keyed.post(route.path, json=body, headers=bearer(key))
        assert r.status_code == 200, r.text
    # the key is checked before the body is read: a bad or oversized body without it is still a 401
    refused_401(keyed.post(route.path, content=b"x" * 2_100_000, headers={"Content-Type": "application/json"}),
                route.style)


def test_describing_routes_stay_public_and_the_spec_declares_the_key(keyed):
    for path in PUBLIC:
        assert keyed.get(path).status_code == 200, path
    spec = keyed.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    for route in POSTS:
        op = spec["paths"][route.path]["post"]
        assert op["security"] == [{"bearer": []}] and {"401", "413"} <= set(op["responses"]), route.path
    assert "security" not in spec["paths"]["/health"]["get"]
    info = keyed.get("/info").json()
    assert info["api_key_required"] is True and not any(k in json.dumps(info) for k in KEYS)


def test_without_keys_nothing_is_asked_and_no_401_is_declared(tiny):
    with client(tiny) as c:
        assert c.post("/embed", json={"inputs": "a"}).status_code == 200
        spec = c.get("/openapi.json").json()
        assert "securitySchemes" not in spec["components"]
        assert "401" not in spec["paths"]["/embed"]["post"]["responses"]
        assert c.get("/info").json()["api_key_required"] is False


def test_key_flags_the_environment_and_their_checks():
    from e5lite.cli import build_parser

    def access(*flags, env=None):
        return Access.from_arguments(build_parser().parse_args(["serve", "--model", "m", *flags]), env or {})

    assert access().api_keys == () and not access().keyed
    assert access("--api-key", "a", "--api-key", "b").api_keys == ("a", "b")
    assert access(env={"E5LITE_API_KEY": " a, b ,,"}).api_keys == ("a", "b")
    assert access("--api-key", "c", env={"E5LITE_API_KEY": "a"}).api_keys == ("c",)  # the flag wins, as TEI's
    for bad in ("", "has space", "naïve"):
        with pytest.raises(ValueError, match=r"API key 1 of 1 \(--api-key or E5LITE_API_KEY\)") as e:
            Access(api_keys=(bad,))
        assert bad not in str(e.value) or not bad
    assert "secret" not in repr(Access(api_keys=("secret",)))
    assert access("--cors-allow-origin", "https://a.example", "*").cors_allow_origins == ("https://a.example", "*")
    with pytest.raises(ValueError, match="no trailing slash"):
        Access(cors_allow_origins=("https://a.example/",))
    with pytest.raises(SystemExit):  # one default prompt or the other
        build_parser().parse_args(["serve", "--model", "m", "--default-prompt-name", "q", "--default-prompt", "x"])


def test_the_key_is_never_logged(tiny, monkeypatch, caplog):
    from e5lite.serve import app, graceful

    class Stub:  # uvicorn's server, not run
        started = True

        def run(self):
            pass

    monkeypatch.setattr(graceful, "make_server", lambda *a, **kw: Stub())
    monkeypatch.setattr(tiny, "warmup", lambda **kw: [])
    with caplog.at_level(logging.INFO, logger="e5lite.serve"):
        app.serve(tiny, host="127.0.0.1", port=1, model_name="m", access=Access(api_keys=KEYS))
        app.serve(tiny, host="0.0.0.0", port=1, model_name="m")
    assert "one of 2 API keys" in caplog.text and "without an API key" in caplog.text
    assert not any(k in caplog.text for k in KEYS)


def test_cors_only_for_the_origins_given(tiny):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    with client(tiny) as c:  # none given: no CORS headers at all
        r = c.options("/embed", headers={"Origin": "https://a.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
        assert "access-control-allow-origin" not in c.get("/info", headers={"Origin": "https://a.example"}).headers
    with client(tiny, access=Access(api_keys=KEYS, cors_allow_origins=("https://a.example",))) as c:
        r = c.options("/embed", headers={"Origin": "https://a.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
        allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
        assert {"authorization", "content-type"} <= allowed
        r = c.options("/embed", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in r.headers
        r = c.post("/embed", json={"inputs": "a"}, headers={"Origin": "https://a.example", **bearer(KEYS[0])})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://a.example"
        r = c.post("/embed", json={"inputs": "a"}, headers={"Origin": "https://evil.example", **bearer(KEYS[0])})
        assert "access-control-allow-origin" not in r.headers
    with client(tiny, access=Access(cors_allow_origins=("*",))) as c:
        r = c.options("/v1/embeddings", headers={"Origin": "https://any.example", **preflight})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_payload_limit_refuses_before_reading(tiny):
    three_mb = json.dumps({"inputs": "a " * 1_500_000}).encode()
    with client(tiny) as c:  # TEI's default: 2,000,000 bytes
        r = c.post("/embed", content=three_mb, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json() == {
            "error": f"request body is {len(three_mb):,} bytes, past the limit of 2,000,000 bytes (--payload-limit)",
            "error_type": "Validation"}
        r = c.post("/v1/embeddings", content=three_mb, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "--payload-limit" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(30):
                yield b" " * 100_000

        r = c.post("/embed", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "request body is past the limit of 2,000,000 bytes" in r.text
    with client(tiny, limits=Limits(payload_limit=100)) as c:
        assert c.post("/embed", json={"inputs": "a"}).status_code == 200
        r = c.post("/embed", json={"inputs": "a" * 100})
        assert r.status_code == 413 and "past the limit of 100 bytes" in r.text


def test_a_request_that_can_never_be_admitted_is_413_not_429(tiny):
    long = TEXTS[2] + " " + TEXTS[2]  # past the 128 tokens of the tiny model
    with client(tiny, limits=Limits(max_queue_tokens=200)) as c:
        r = c.post("/embed", json={"inputs": [long, long]})  # past the bound by the estimate too
        assert r.status_code == 413 and r.json() == {
            "error": f"this request has {2 * tiny.max_length} tokens, more than the queue ever holds "
                     "(200, --max-queue-tokens): send fewer or shorter inputs", "error_type": "Validation"}
        # more tokens per character than the estimate assumes: admitted on it, refused on the count
        dense = " ".join("a" for _ in range(120))
        r = c.post("/v1/embeddings", json={"input": [dense, dense]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens"
        assert c.post("/embed_all", json={"inputs": [long, long]}).status_code == 413
        r = c.post("/embed", json={"inputs": long})  # one fits
        np.testing.assert_allclose(np.array(r.json(), np.float32), tiny.encode([long]), atol=ATOL, rtol=0)
        assert 'status="429"' not in c.get("/metrics").text


def test_a_long_text_at_an_idle_server_is_cut_cheaply_and_answered(tiny, minilm_dir):
    """1.5 MB of Python's docs in one text: 200 at once (never 429), with the vector of the whole text's ids
    truncated (the tiny model has the real MiniLM tokenizer)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer

    text = " ".join(" ".join(topics.values()).split())
    text = (text * (1 + 1_500_000 // len(text)))[:1_500_000]
    ref = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    ref.enable_truncation(tiny.max_length)
    want = tiny.embed_ids([ref.encode_batch_fast([text])[0].ids])  # tokenised whole, then truncated
    with client(tiny) as c:
        c.post("/embed", json={"inputs": text[:20_000]})  # the shape compiled once, as a served model has it
        t0 = time.perf_counter()
        r = c.post("/embed", json={"inputs": text})
        seconds = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json(), np.float32), want, atol=ATOL, rtol=0)
        assert seconds < 2.0  # a loose bound (tokenised whole, it took a second); the README has figures
        r = c.post("/v1/embeddings", json={"input": [text, "query: short"]})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == tiny.max_length + len(
            tiny.tokenize("query: short")[0])
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], want[0], atol=ATOL, rtol=0)
        assert 'status="429"' not in c.get("/metrics").text


def test_default_prompt_and_served_model_name(tiny):
    text = TEXTS[1]
    with client(tiny, default_prompt="query: ", model_name="served-name") as c:
        got = c.post("/embed", json={"inputs": text}).json()
        np.testing.assert_allclose(got, tiny.encode([text], prompt="query: "), atol=ATOL, rtol=0)
        r = c.post("/v1/embeddings", json={"input": text, "model": "ignored"}).json()
        assert r["model"] == "served-name"
        np.testing.assert_allclose([r["data"][0]["embedding"]], got, atol=ATOL, rtol=0)
        name = next(n for n, p in tiny.prompts.items() if p not in ("", "query: "))  # named, it wins
        got = c.post("/embed", json={"inputs": text, "prompt_name": name}).json()
        np.testing.assert_allclose(got, tiny.encode([text], prompt_name=name), atol=ATOL, rtol=0)
        tokens = c.post("/tokenize", json={"inputs": text}).json()[0]
        assert [t["id"] for t in tokens] == tiny.tokenize(text, prompt="query: ")[0].tolist()
        info = c.get("/info").json()
        assert (info["model_id"], info["default_prompt"], info["default_prompt_name"]) == (
            "served-name", "query: ", None)
    with client(tiny, default_prompt_name=name) as c:
        got = c.post("/embed", json={"inputs": text}).json()
        np.testing.assert_allclose(got, tiny.encode([text], prompt_name=name), atol=ATOL, rtol=0)
        info = c.get("/info").json()
        assert (info["default_prompt_name"], info["default_prompt"]) == (name, tiny.prompt_prefix(name))
    with pytest.raises(ValueError, match=r"^--default-prompt-name: unknown prompt_name 'nope'"):
        build_app(tiny, model_name="m", default_prompt_name="nope")
