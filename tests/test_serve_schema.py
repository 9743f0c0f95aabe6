"""Schemathesis over ``e5lite serve``'s own OpenAPI document (issue 34, item 6): every route and method in
``/openapi.json``, positive and negative cases, undeclared methods, against a live server on the tiny model;
once open and once with ``--api-key`` (schemathesis' ``ignored_auth`` check too). Bounded: a few derandomized
cases per operation and phase. ``tools/fuzz_server.py`` is the longer run (its figures are in BENCHMARKS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_serve import start_server, stop_server  # noqa: E402  (one copy of the process helpers)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from fuzz_server import CHECKS, KEYED_CHECKS, fuzz  # noqa: E402

pytestmark = pytest.mark.slow  # every test here talks to a live server process

KEY = "e5lite-schema-key"
MAX_EXAMPLES = 5  # per operation and phase: ~500 cases a run, a few seconds on 2 cores


@pytest.fixture(scope="module")
def open_server(tiny_dir):
    proc, url = start_server(tiny_dir)
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def keyed_server(tiny_dir):
    proc, url = start_server(tiny_dir, env={"E5LITE_API_KEY": KEY})
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out


def assert_clean(r) -> None:
    """No failure of any check, no error."""
    assert not r.failures and not r.errors, explain(r)


def explain(r) -> str:
    where = "\n".join(f"{k}: {sorted(set(v))}" for k, v in r.where.items())
    return f"{dict(r.failures)}\n{where}\n{r.errors}\n{r.output[-6000:]}"


def test_the_document_declares_what_the_server_checks(open_server):
    """The ranges and enums that come from the model and the flags are in the document (else schemathesis
    sends schema-valid requests the server refuses); every response of every operation has a schema."""
    doc = httpx.get(open_server + "/openapi.json").json()
    info = httpx.get(open_server + "/info").json()
    schemas = doc["components"]["schemas"]
    inputs = schemas["EmbedRequest"]["properties"]["inputs"]["anyOf"]
    assert inputs[1]["items"]["maximum"] == 30521 and inputs[2]["maxItems"] == info["max_client_batch_size"]
    dims = schemas["EmbeddingRequest"]["properties"]["dimensions"]["anyOf"][0]
    assert (dims["minimum"], dims["maximum"]) == (1, info["dim"])
    assert schemas["TokenizeRequest"]["properties"]["prompt_name"]["anyOf"][0]["enum"] == list(info["prompts"])
    assert "x-e5lite-bounds" not in str(doc)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                assert "schema" in next(iter(response["content"].values())), (method, path, status)


def test_undeclared_methods_get_405_with_allow(open_server):
    r = httpx.request("TRACE", open_server + "/")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    r = httpx.put(open_server + "/v1/embeddings", json={})
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["type"]


def test_integral_floats_are_integers(open_server):
    """JSON Schema's integer includes 7.0 (schemathesis sends such): token ids take it."""
    ints = httpx.post(open_server + "/embed", json={"inputs": [101, 2023, 102]}).json()
    floats = httpx.post(open_server + "/embed", json={"inputs": [101.0, 2023.0, 102.0]}).json()
    assert floats == ints
    assert httpx.post(open_server + "/decode", json={"ids": [2023.0]}).json() == ["this"]
    assert httpx.post(open_server + "/embed", json={"inputs": [2023.5]}).status_code == 422


def test_schemathesis_finds_nothing(open_server, tmp_path):
    r = fuzz(open_server, max_examples=MAX_EXAMPLES, workdir=tmp_path, timeout=300)
    assert r.operations == 14 and r.cases > 300, r.output[-3000:]
    assert_clean(r)
    assert set(CHECKS) < set(KEYED_CHECKS)


def test_schemathesis_finds_nothing_with_an_api_key(keyed_server, tmp_path):
    """The inference routes declare bearer security and 401: ``ignored_auth`` sends each without the key and
    with a wrong one, and gets 401."""
    doc = httpx.get(keyed_server + "/openapi.json").json()
    assert doc["paths"]["/embed"]["post"]["security"] == [{"bearer": []}]
    r = fuzz(keyed_server, api_key=KEY, max_examples=MAX_EXAMPLES, workdir=tmp_path, timeout=300)
    assert r.operations == 14 and r.cases > 300, r.output[-3000:]
    assert_clean(r)
