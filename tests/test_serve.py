"""``e5lite serve`` end to end: a subprocess on 127.0.0.1 driven by httpx and the official openai client,
with every answer compared against ``Encoder.encode`` run here. In-process checks of the app are in
test_serve_app.py, of the request models in test_serve_protocol.py, of the batch worker in test_serve_batcher.py."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import TEXTS


httpx = pytest.importorskip("httpx")

ATOL = 1e-6
PHRASES = [t for t in TEXTS if t]  # the APIs refuse empty strings, as OpenAI's does


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *flags, env=None):
    """Starts ``e5lite serve`` (``env``: more environment variables for it) and waits for /health (public, with
    API keys too); returns the process and its base URL."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "e5lite.cli", "serve", "--model", str(model), "--port", str(port),
                             *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 120 s")


def stop_server(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def enc(tiny):
    return tiny


@pytest.fixture(scope="module")
def server(tiny_dir):
    # room for 64 clients' requests while the first bursts compile new shapes: these tests are about the
    # answers (shedding is tested in test_serve_robust.py)
    proc, url = start_server(tiny_dir, "--max-client-batch-size", "64", "--served-model-name", "tiny-e5",
                             "--max-queue-wait-ms", "60000", "--max-queue-tokens", "1000000")
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def metric_values(text: str) -> dict[str, float]:
    return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if not ln.startswith("#")}


def normalized(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_tei_embed_matches_encode(server, enc):
    texts = PHRASES[:5] + ["a second batch-mate"]
    r = post(server, "/embed", {"inputs": texts})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json(), np.float32), enc.encode(texts), atol=ATOL, rtol=0)
    r = post(server, "/embed", {"inputs": "query only", "normalize": False, "prompt_name": "query"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json(), np.float32),
                               enc.encode(["query only"], prompt_name="query", normalize=False), atol=ATOL, rtol=0)


def test_truncation_toggle(server, enc):
    long = TEXTS[2]  # ~ 900 tokens, past the tiny model's 128
    r = post(server, "/embed", {"inputs": ["short", long], "truncate": False})
    assert r.status_code == 422, r.text
    assert r.json() == {"error": "inputs[1] is longer than the model's maximum of 128 tokens (truncation is off)",
                        "error_type": "Validation"}
    r = post(server, "/embed", {"inputs": ["short", long], "truncate": True})
    np.testing.assert_allclose(np.array(r.json(), np.float32), enc.encode(["short", long]), atol=ATOL, rtol=0)


def test_openai_client_float_base64_dimensions(server, enc):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    texts = PHRASES[:4]
    want = enc.encode(texts)
    res = client.embeddings.create(input=texts, model="tiny-e5", encoding_format="float")
    assert res.model == "tiny-e5" and [d.index for d in res.data] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.array([d.embedding for d in res.data], np.float32), want, atol=ATOL, rtol=0)
    n_tokens = sum(len(ids) for ids in enc.tokenize(texts))
    assert res.usage.prompt_tokens == res.usage.total_tokens == n_tokens
    # no encoding_format: the client asks for base64 and decodes it itself
    res = client.embeddings.create(input=texts[0], model="tiny-e5")
    np.testing.assert_allclose(np.array(res.data[0].embedding, np.float32), want[0], atol=ATOL, rtol=0)
    res = client.embeddings.create(input=texts, model="tiny-e5", encoding_format="base64")
    got = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in res.data])
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    res = client.embeddings.create(input=texts, model="tiny-e5", dimensions=8)
    np.testing.assert_allclose(np.array([d.embedding for d in res.data], np.float32), normalized(want[:, :8]),
                               atol=ATOL, rtol=0)


def test_64_concurrent_clients_mixed_batches(server, enc):
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near", "river", "banks", "in",
             "early", "spring", "light"]
    pool = PHRASES + [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(200)]
    cases = []
    for i in range(64):
        texts = rng.sample(pool, rng.choice([1, 1, 2, 3, 5, 8, 16, 33, 64]))
        route = ("/embed", "/v1/embeddings")[i % 2]
        normalize = route == "/v1/embeddings" or i % 4 != 0
        prompt_name = "passage" if route == "/embed" and i % 3 == 0 else None
        cases.append((route, texts, normalize, prompt_name))

    def call(case):
        route, texts, normalize, prompt_name = case
        body = ({"inputs": texts, "normalize": normalize, "prompt_name": prompt_name} if route == "/embed"
                else {"input": texts, "model": "m"})
        with httpx.Client(timeout=120) as client:
            r = client.post(server + route, json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return np.array(data if route == "/embed" else [d["embedding"] for d in data["data"]], np.float32)

    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        results = list(ex.map(call, cases))
    # one encode call per option set over the whole pool (not 64 calls, each compiling its own shapes): the
    # engine is batch-invariant, so row i is what encode() gives that text alone (test_encoder.py, test_engine.py)
    row = {t: i for i, t in enumerate(pool)}
    reference = {(n, p): enc.encode(pool, normalize=n, prompt_name=p) for n, p in {c[2:] for c in cases}}
    for (route, texts, normalize, prompt_name), got in zip(cases, results):
        want = reference[normalize, prompt_name][[row[t] for t in texts]]
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f"{route} {len(texts)} texts")
    value = metric_values(httpx.get(server + "/metrics").text)
    assert value['e5lite_batch_requests_bucket{le="1"}'] < value["e5lite_batch_requests_count"], \
        "no engine call grouped two requests"


JSON = {"content-type": "application/json"}
BATTERY = [
    # (route, raw body, headers, status, error message fragment, OpenAI param)
    ("/v1/embeddings", b"{not json", JSON, 400, "not valid JSON", None),
    ("/v1/embeddings", b'{"input": "x", "model": "m"}', {"content-type": "text/plain"}, 415, "application/json", None),
    ("/v1/embeddings", b'["x"]', JSON, 400, "must be a JSON object", None),
    ("/v1/embeddings", b'{"model": "m"}', JSON, 400, "'input' is a required property", "input"),
    ("/v1/embeddings", b'{"input": "x", "model": 3}', JSON, 400, "'model' must be a string", "model"),
    ("/v1/embeddings", b'{"input": [], "model": "m"}', JSON, 400, "'input' must not be empty", "input"),
    ("/v1/embeddings", b'{"input": "", "model": "m"}', JSON, 400, "input[0] is an empty string", "input"),
    ("/v1/embeddings", b'{"input": ["a", null], "model": "m"}', JSON, 400, "input[1] is null", "input"),
    ("/v1/embeddings", b'{"input": [1, 99999], "model": "m"}', JSON, 400, "token id 99999, outside the vocabulary",
     "input"),
    ("/v1/embeddings", b'{"input": {"a": 1}, "model": "m"}', JSON, 400, "got an object", "input"),
    ("/v1/embeddings", json.dumps({"input": ["x"] * 65, "model": "m"}).encode(), JSON, 400, "at most 64", "input"),
    ("/v1/embeddings", b'{"input": "x", "model": "m", "encoding_format": "int8"}', JSON, 400, "'float' or 'base64'",
     "encoding_format"),
    ("/v1/embeddings", b'{"input": "x", "model": "m", "dimensions": 0}', JSON, 400, "in [1, 32]", "dimensions"),
    ("/v1/embeddings", b'{"input": "x", "model": "m", "dimensions": 33}', JSON, 400, "in [1, 32]", "dimensions"),
    ("/v1/embeddings", b'{"input": "x", "model": "m", "dimensions": "8"}', JSON, 400, "in [1, 32]", "dimensions"),
    ("/v1/embeddings", b'{"input": "x", "model": "m", "dimensions": true}', JSON, 400, "in [1, 32]", "dimensions"),
    ("/embed", b"", JSON, 400, "not valid JSON", None),
    ("/embed", b'{"inputs": "x"}', {}, 415, "application/json", None),
    ("/embed", b"\xff\xfe", JSON, 400, "not valid JSON", None),
    ("/embed", b"42", JSON, 422, "must be a JSON object", None),
    ("/embed", b'{"input": "x"}', JSON, 422, "missing field 'inputs'", None),
    ("/embed", b'{"inputs": []}', JSON, 422, "'inputs' must not be empty", None),
    ("/embed", b'{"inputs": ["ok", ""]}', JSON, 422, "inputs[1] is an empty string", None),
    ("/embed", b'{"inputs": ["ok", 5]}', JSON, 422, "inputs[1] is a number", None),
    ("/embed", json.dumps({"inputs": ["x"] * 65}).encode(), JSON, 413, "at most 64 per request", None),
    ("/embed", b'{"inputs": "x", "normalize": "yes"}', JSON, 422, "'normalize' must be a boolean", None),
    ("/embed", b'{"inputs": "x", "truncate": 1}', JSON, 422, "'truncate' must be a boolean", None),
    ("/embed", b'{"inputs": "x", "prompt_name": "nope"}', JSON, 422, "unknown prompt_name 'nope'", None),
    ("/embed", b'{"inputs": "x", "prompt_name": 7}', JSON, 422, "'prompt_name' must be a string", None),
    ("/embed", b'{"inputs": "x", "truncation_direction": "up"}', JSON, 422, "must be 'left' or 'right'", None),
]


@pytest.mark.parametrize("route, raw, headers, status, message, param", BATTERY)
def test_malformed_requests(server, route, raw, headers, status, message, param):
    r = httpx.post(server + route, content=raw, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    body = r.json()
    if route.startswith("/v1"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert message in body["error"]["message"] and body["error"]["param"] == param
        assert body["error"]["type"] == "invalid_request_error"
    else:
        assert set(body) == {"error", "error_type"} and message in body["error"]
        assert body["error_type"] == "Validation"


def test_other_errors_and_still_healthy(server):
    r = httpx.get(server + "/v1/embeddings")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server + "/no/such/route")
    assert r.status_code == 404 and r.json()["error"].startswith("GET /no/such/route")
    big = b'{"inputs": "' + b"x" * 3_000_000 + b'"}'  # past TEI's default --payload-limit
    r = httpx.post(server + "/embed", content=big, headers=JSON, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == (
        f"request body is {len(big):,} bytes, past the limit of 2,000,000 bytes (--payload-limit)")
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    r = post(server, "/embed", {"inputs": "still serving"})
    assert r.status_code == 200 and len(r.json()[0]) == 32


def test_info_and_metrics(server, enc):
    info = httpx.get(server + "/info").json()
    assert info["model_id"] == "tiny-e5" and info["dim"] == 32 and info["max_input_length"] == 128
    assert info["dtype"] == "float32" and info["devices"] and info["max_client_batch_size"] == 64
    assert info["max_batch_tokens"] == 4 * enc.settings.token_budget
    post(server, "/embed", {"inputs": "counted"})
    post(server, "/embed", {"inputs": []})
    r = httpx.get(server + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    value = metric_values(r.text)
    assert value['e5lite_requests_total{route="/embed",status="200"}'] >= 1
    assert value['e5lite_requests_total{route="/embed",status="422"}'] >= 1
    assert value['e5lite_request_duration_seconds_count{route="/embed"}'] >= 2
    assert value["e5lite_tokens_embedded_total"] > 0 and value["e5lite_texts_embedded_total"] > 0
    assert value["e5lite_queue_depth"] == 0 and value["e5lite_queue_capacity"] == 1024
    assert "# TYPE e5lite_request_duration_seconds histogram" in r.text.splitlines()


@pytest.mark.slow
def test_full_queue_answers_429(tiny_dir, enc):
    # room in tokens for these requests (larger than the queue's default token bound, they would be 413s)
    proc, url = start_server(tiny_dir, "--max-queue", "1", "--max-batch-tokens", "64", "--max-wait-ms", "0",
                             "--max-queue-tokens", "1000000")
    try:
        texts = [TEXTS[1]] * 48  # ~ 2,500 tokens: each request keeps the worker busy for a while

        def call(_):
            with httpx.Client(timeout=120) as client:
                return client.post(url + "/embed", json={"inputs": texts})

        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            responses = list(ex.map(call, range(32)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 1, codes
        busy = next(r for r in responses if r.status_code == 429).json()
        assert busy["error_type"] == "Overloaded" and "already queued" in busy["error"]
        want = enc.encode(texts)
        for r in responses:
            if r.status_code == 200:
                np.testing.assert_allclose(np.array(r.json(), np.float32), want, atol=ATOL, rtol=0)
        r = httpx.post(url + "/v1/embeddings", json={"input": "after the storm", "model": "m"}, timeout=60)
        assert r.status_code == 200 and httpx.get(url + "/health").status_code == 200
    finally:
        stop_server(proc)


def test_import_e5lite_does_not_import_the_server_stack():
    code = ("import sys, e5lite; "
            "print(any(m in sys.modules for m in ('starlette', 'uvicorn', 'pydantic', 'e5lite.serve')))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_serve_without_the_extra_says_how_to_install(tiny_dir):
    code = ("import sys; sys.modules['starlette'] = None; from e5lite.cli import main; "
            f"sys.exit(main(['serve', '--model', {str(tiny_dir)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("e5lite: error: e5lite serve needs the serve extra (starlette is missing): "
                                  "pip install 'e5lite[serve]'")
