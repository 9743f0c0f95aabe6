"""The server under abuse: hostile bodies, overload (429 with Retry-After at once, or at the queue deadline),
clients that disconnect, graceful shutdown, and a small load test past saturation.

Most tests run the app in this process on a real socket (uvicorn in a thread, ``live_server``) over the tiny
random BERT, behind ``Device``: a gate the test opens call by call, so what is queued and what is in flight
is under the test's control, and a record of every id sequence that reached the model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

import e5lite  # noqa: E402
from e5lite.serve import Limits, build_app  # noqa: E402
from e5lite.serve.graceful import make_server  # noqa: E402

JSON = {"content-type": "application/json"}


def pydoc_paragraphs() -> list[str]:
    """Real English prose: the paragraphs of Python's own pydoc topics."""
    from pydoc_data.topics import topics
    return [" ".join(p.split()) for text in topics.values() for p in re.split(r"\n\s*\n", text)
            if len(p.split()) >= 12 and not p.startswith(" ")]


PARAGRAPHS = pydoc_paragraphs()


@pytest.fixture(scope="module")
def enc(tiny_dir):
    return e5lite.load(tiny_dir)


class Device:
    """The encoder, with a record of the id sequences that reach the model; ``gated``: each engine call first
    waits for ``gate.release()``; ``seconds_per_token``: each call also takes that long per token, as a busy
    accelerator would (sleeping, so the 2 CPU cores stay free for the server and the clients)."""

    def __init__(self, enc, gated: bool = False, seconds_per_token: float = 0.0):
        self.enc, self.seconds_per_token = enc, seconds_per_token
        self.gate = threading.Semaphore(0) if gated else None
        self.calls: list[list[tuple]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.enc, name)

    def embed_valid_ids(self, ids, **kw):
        with self.lock:
            self.calls.append([tuple(i) for i in ids])
        if self.gate is not None:
            assert self.gate.acquire(timeout=30), "the test never opened the gate"
        time.sleep(self.seconds_per_token * sum(len(i) for i in ids))
        return self.enc.embed_valid_ids(ids, **kw)

    def reached(self, texts: list[str]) -> int:
        """How many of these texts reached the model."""
        with self.lock:
            seen = {seq for call in self.calls for seq in call}
        return sum(tuple(i) in seen for i in self.enc.tokenize(texts))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(encoder, **limits):
    """The app on 127.0.0.1 in this process (uvicorn in a thread, shut down through its graceful path);
    yields (base URL, the app's Server, the uvicorn server, its thread)."""
    app = build_app(encoder, model_name="m", limits=Limits(**limits))
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started or not thread.is_alive())
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}", app.state.server, server, thread
    finally:
        if encoder.gate is not None:
            for _ in range(100):
                encoder.gate.release()
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive()


def until(condition, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, "timed out waiting"
        time.sleep(0.005)


def in_background(fn, *args):
    """Runs fn(*args) on a thread; returns a function that joins it and gives its result."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", fn(*args)), daemon=True)
    thread.start()

    def result(timeout: float = 30):
        thread.join(timeout)
        assert "result" in box, "the request did not finish"
        return box["result"]
    return result


def post(url: str, path: str, body, timeout: float = 30) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------ hostile bodies

def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


O, T = "/v1/embeddings", "/embed"
HOSTILE = [
    # (route, raw body, status, message fragment, the field named (OpenAI param)); body-level faults name none
    (T, nested(100_000), 400, "request body is nested too deeply to parse as JSON", None),
    (O, b'{"input": ' + nested(100_000, b'"x"') + b', "model": "m"}', 400, "request body is nested too deeply", None),
    (O, b'{"input": "x", "model": "m", "encoding_format": ' + nested(200) + b"}", 400,
     "'encoding_format' must be 'float' or 'base64', got [[[...]]]", "encoding_format"),
    (O, b'{"input": ["a", ' + nested(200, b'"b"') + b'], "model": "m"}', 400, "input[1] is an array", "input"),
    (T, b'{"inputs": "x", "normalize": ' + nested(200, b"true") + b"}", 422, "'normalize' must be a boolean", None),
    (O, b'{"input": "x", "model": "m", "dimensions": ' + b"9" * 5000 + b"}", 400,
     "'dimensions' must be an integer in [1, 32], got inf", "dimensions"),
    (O, b'{"input": "x", "model": "m", "dimensions": ' + b"9" * 999 + b"}", 400,
     "'dimensions' must be an integer in [1, 32], got 999999999999999999...9999999999999999999", "dimensions"),
    (O, b'{"input": "x", "model": "m", "dimensions": -1e999}', 400, "'dimensions' must be an integer in [1, 32], "
                                                                      "got -inf", "dimensions"),
    (O, b'{"input": "x", "model": "m", "dimensions": NaN}', 400, "'dimensions' must be an integer in [1, 32], got nan",
     "dimensions"),
    (T, b'{"inputs": [' + b"9" * 5000 + b"]}", 422, "inputs[0] is a number, expected a string", None),
    (T, b'{"inputs": "x", "truncate": Infinity}', 422, "'truncate' must be a boolean, got a number", None),
    (O, b'{"input": "x", "input": ["y"], "model": "m"}', 400, "'input' appears more than once in the request body",
     "input"),
    (O, b'{"input": "x", "model": "m", "model": "m"}', 400, "'model' appears more than once", "model"),
    (T, b'{"inputs": "x", "normalize": true, "normalize": false}', 422, "'normalize' appears more than once", None),
    (T, b'{"inputs": ["x", {"text": "y", "text": "z"}]}', 422, "inputs[1] is an object, expected a string", None),
    (O, b'{"input": {"input": "x"}, "model": "m"}', 400,
     "'input' must be a string, a list of strings or token ids, got an object", "input"),
    (O, b'{"input": [["a"], "b"], "model": "m"}', 400, "input[0] is an array, expected a string", "input"),
    (O, b'{"input": "x", "model": {"id": "m"}}', 400, "'model' must be a string, got an object", "model"),
    (O, b'{"input": "x", "model": "m", "user": ["u"]}', 400, "'user' must be a string, got an array", "user"),
    (O, b'{"input": "x", "model": "m", "dimensions": {"n": 8}}', 400, "'dimensions' must be an integer in [1, 32], "
                                                                       "got {'n': 8}", "dimensions"),
    (T, b'{"inputs": "x", "prompt_name": ["query"]}', 422, "'prompt_name' must be a string, got an array", None),
    (T, b'{"inputs": "x", "truncation_direction": {"side": "left"}}', 422,
     "'truncation_direction' must be 'left' or 'right', got {'side': 'left'}", None),
    (T, b'{"inputs": ["ok", "\\ud800"]}', 422, "inputs[1] is not valid Unicode text", None),
    (O, b'{"input": "\\udfff", "model": "m"}', 400, "input[0] is not valid Unicode text", "input"),
    (O, b'{"input": "x", "model": "m", "encoding_format": "' + b"f" * 100_000 + b'"}', 400,
     "'encoding_format' must be 'float' or 'base64', got 'ffffffffff", "encoding_format"),
    (T, b"null", 422, "request body must be a JSON object, got null", None),
    (O, b'"input"', 400, "request body must be a JSON object, got a string", None),
    (T, b'{"inputs": "x",}', 400, "request body is not valid JSON: Expecting property name", None),
    (T, b'{"inputs": "x"} trailing', 400, "request body is not valid JSON: Extra data", None),
]


@pytest.fixture(scope="module")
def client(enc):
    from starlette.testclient import TestClient
    with TestClient(build_app(enc, model_name="m"), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("route, raw, status, message, param", HOSTILE,
                         ids=[f"{i}{r.replace('/', '_')}" for i, (r, *_) in enumerate(HOSTILE)])
def test_hostile_bodies_are_4xx_in_the_api_shape_naming_the_field(client, route, raw, status, message, param):
    r = client.post(route, content=raw, headers=JSON)
    assert r.status_code == status, r.text
    body = r.json()
    if route == O:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert message in body["error"]["message"] and body["error"]["param"] == param
        assert body["error"]["type"] == "invalid_request_error"
        got = body["error"]["message"]
    else:
        assert set(body) == {"error", "error_type"} and message in body["error"]
        assert body["error_type"] == "Validation"
        got = body["error"]
    assert len(got) < 200  # never the hostile value echoed back whole


# every field of both APIs, sent each of these; a refusal must name the field, and nothing may be a 500
STRANGE = [None, True, 0, -1, 10 ** 30, 1.5, "", "x" * 20_000, "\ud800", [], [None], [[["deep"]]], {},
           {"a": {"b": [1]}}, [{"text": "x"}], json.loads(b"[" * 150 + b"]" * 150)]
FIELDS = [(O, "input", {"model": "m"}), (O, "model", {"input": "x"}), (O, "encoding_format", None),
          (O, "dimensions", None), (O, "user", None), (T, "inputs", {}), (T, "normalize", None),
          (T, "truncate", None), (T, "truncation_direction", None), (T, "prompt_name", None)]


@pytest.mark.parametrize("route, name, base", FIELDS, ids=[f[1] for f in FIELDS])
def test_every_field_refuses_every_wrong_type_by_name(client, route, name, base):
    base = base if base is not None else ({"input": "x", "model": "m"} if route == O else {"inputs": "x"})
    refused = 0
    for value in STRANGE:
        r = client.post(route, content=json.dumps({**base, name: value}), headers=JSON)
        assert r.status_code in (200, 400, 422), (value, r.text)
        if r.status_code == 200:
            continue
        refused += 1
        message = r.json()["error"]["message"] if route == O else r.json()["error"]
        assert re.search(rf"\b{name}\b", message), (value, message)
        if route == O:
            assert r.json()["error"]["param"] == name
    assert refused >= len(STRANGE) // 2


# ------------------------------------------------------------------------------------------- overload

def test_a_request_that_cannot_start_in_time_gets_429_with_retry_after(enc):
    device = Device(enc, gated=True)
    held = PARAGRAPHS[:1]
    late = PARAGRAPHS[1:4]
    with live_server(device, max_wait_ms=0, max_queue_wait_ms=300) as (url, app_server, _, _):
        first = in_background(post, url, "/embed", {"inputs": held})
        until(lambda: device.calls)  # in flight, held at the gate
        t0 = time.monotonic()
        r = post(url, "/v1/embeddings", {"input": late, "model": "m"})
        waited = time.monotonic() - t0
        # queued, then refused at its deadline (the worker being busy), without reaching the model
        assert r.status_code == 429 and 0.25 < waited < 2.0 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert re.fullmatch(r"server busy: this request waited 0\.\d s in the queue, past the 300 ms limit "
                            r"\(--max-queue-wait-ms\); retry later", error["message"]), error["message"]
        # with the throughput known, the estimate refuses at once: the call in flight alone takes too long
        app_server.batcher.throughput.mean = app_server.limits.max_batch_tokens / 10.0  # 10 tokens/s
        t0 = time.monotonic()
        r = post(url, "/embed", {"inputs": late})
        assert r.status_code == 429 and time.monotonic() - t0 < 0.5
        assert r.json()["error_type"] == "Overloaded" and "would wait about" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        device.gate.release()
        assert first().status_code == 200
        assert not device.reached(late)
        assert metric(url, 'e5lite_requests_shed_total{reason="expired"}') == 1
        assert metric(url, 'e5lite_requests_shed_total{reason="queue_wait"}') == 1


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Sends a request on a socket of its own and returns the socket, unread: the client can then vanish."""
    payload = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_a_client_that_disconnects_takes_its_request_off_the_queue(enc):
    device = Device(enc, gated=True)
    held, gone = PARAGRAPHS[4:5], PARAGRAPHS[5:9]
    with live_server(device, max_wait_ms=0) as (url, app_server, _, _):
        first = in_background(post, url, "/embed", {"inputs": held})
        until(lambda: device.calls)
        sock = raw_request(url, "/v1/embeddings", {"input": gone, "model": "m"})
        until(lambda: app_server.batcher.state()["queue_depth"] == 1)
        sock.close()  # gives up
        until(lambda: app_server.batcher.state()["queue_depth"] == 0, timeout=5)
        device.gate.release()
        assert first().status_code == 200
        device.gate.release()
        assert post(url, "/embed", {"inputs": PARAGRAPHS[9]}).status_code == 200  # and the server goes on
        assert not device.reached(gone) and len(device.calls) == 2
        assert metric(url, "e5lite_texts_skipped_total") == len(gone)
        assert metric(url, 'e5lite_requests_total{route="/v1/embeddings",status="499"}') == 1


# ------------------------------------------------------------------------------------------- shutdown

def test_sigterm_drains_admitted_requests_and_refuses_new_work(enc, monkeypatch):
    import e5lite.serve.graceful
    monkeypatch.setattr(e5lite.serve.graceful, "SHUTDOWN_CLOSE_S", 0.2)  # uvicorn's own grace: not what keeps it up
    device = Device(enc, gated=True)
    with live_server(device, max_wait_ms=0, shutdown_timeout=30) as (url, app_server, server, thread):
        first = in_background(post, url, "/embed", {"inputs": PARAGRAPHS[10:12]})
        until(lambda: device.calls)
        server.handle_exit(signal.SIGTERM, None)  # as the signal handler calls it
        until(lambda: app_server.draining)
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json() == {"error": "server is shutting down", "error_type": "Unhealthy"}
        r = post(url, "/v1/embeddings", {"input": "too late", "model": "m"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        time.sleep(0.6)
        assert thread.is_alive()  # still waiting for the admitted request
        device.gate.release()
        r = first()
        assert r.status_code == 200 and len(r.json()) == 2
        thread.join(timeout=10)
        assert not thread.is_alive()


def test_shutdown_timeout_answers_what_is_left_with_503_and_exits(enc):
    device = Device(enc, gated=True)
    with live_server(device, max_wait_ms=0, shutdown_timeout=0.3) as (url, app_server, server, thread):
        first = in_background(post, url, "/embed", {"inputs": PARAGRAPHS[12:13]})
        until(lambda: device.calls)
        second = in_background(post, url, "/embed", {"inputs": PARAGRAPHS[13:14]})
        until(lambda: app_server.batcher.state()["queue_depth"] == 1)
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        for r in (first(), second()):
            assert r.status_code == 503 and r.json()["error"] == "server is shutting down"
        thread.join(timeout=10)
        assert not thread.is_alive() and time.monotonic() - t0 < 4  # the timeout, and a bounded close
        assert not device.reached(PARAGRAPHS[13:14])


@pytest.mark.slow
def test_sigterm_stops_e5lite_serve(tiny_dir):
    from test_serve import start_server
    proc, url = start_server(tiny_dir, "--shutdown-timeout", "5")
    assert post(url, "/embed", {"inputs": PARAGRAPHS[14]}).status_code == 200
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0 and time.monotonic() - t0 < 5, out
    assert "Traceback" not in out and "Shutting down" in out


# ------------------------------------------------------------------------------------------ load test

# The clients run in a process of their own, as real ones would: in this one they would share the server's GIL.
# Patient clients take requests from a shared list, each waiting at most `timeout` s, and after a 429 sleep a
# tenth of its Retry-After (keeping the pressure on); impatient ones send one heavy request each and close the
# connection after `give_up` s. Prints one JSON line of outcomes.
LOAD_CLIENTS = """
import asyncio, json, sys, time
import httpx

spec = json.load(sys.stdin)
out = {"answered": [], "shed": [], "timed_out": 0, "gave_up": [], "other": []}

async def send(url, texts, limit, gives_up):
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:  # one connection per client
        t = time.perf_counter()
        try:
            r = await asyncio.wait_for(http.post("/v1/embeddings", json={"input": texts, "model": "m"}), limit)
        except asyncio.TimeoutError:
            if gives_up:
                out["gave_up"].append(texts)
            else:
                out["timed_out"] += 1
            return 0.0
        dt = time.perf_counter() - t
        if r.status_code == 200:
            out["answered"].append(dt)
        elif r.status_code == 429:
            out["shed"].append(dt)
            return float(r.headers["retry-after"]) / 10
        else:
            out["other"].append(r.status_code)
        return 0.0

async def main():
    order = iter(spec["requests"])

    async def patient():
        await asyncio.sleep(0.1)  # the impatient ones first, so that some get in before the queue fills
        for texts in order:
            await asyncio.sleep(await send(spec["url"], texts, spec["timeout"], False))

    t0 = time.perf_counter()
    await asyncio.gather(*(patient() for _ in range(spec["clients"])),
                         *(send(spec["url"], texts, spec["give_up"], True) for texts in spec["heavy"]))
    out["seconds"] = time.perf_counter() - t0

asyncio.run(main())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_past_saturation_the_server_sheds_and_recovers(enc):
    """A small load test: 32 patient clients (10 s timeouts) with 160 requests of 8 paragraphs (about 800
    tokens each), and 12 impatient ones with 32 paragraphs each who give up after 0.3 s, against a model that
    manages at most 10,000 tokens/s (calls of 4,096 tokens, 0.4 s and more): several times more than it can do.
    The queue deadline is 1 s."""
    device = Device(enc, seconds_per_token=100e-6)
    rng = np.random.default_rng(0)
    heavy = [PARAGRAPHS[k:k + 32] for k in range(0, 12 * 32, 32)]  # texts of their own, to see what ran
    requests = [[str(t) for t in rng.choice(PARAGRAPHS[12 * 32:], 8, replace=False)] for _ in range(160)]
    with live_server(device, max_queue_wait_ms=1000) as (url, app_server, _, _):
        # compile the common shapes before the clock starts; the full call measures the throughput
        for texts in requests[:3] + [PARAGRAPHS[-64:]]:
            post(url, "/embed", {"inputs": texts})
        assert app_server.batcher.throughput.tokens_per_s
        spec = {"url": url, "requests": requests, "heavy": heavy, "clients": 32, "timeout": 10.0, "give_up": 0.3}
        run = subprocess.run([sys.executable, "-c", LOAD_CLIENTS], input=json.dumps(spec), capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        t0 = time.monotonic()
        assert post(url, "/embed", {"inputs": requests[1]}, timeout=10).status_code == 200
        recovery = time.monotonic() - t0
        shed_fast = metric(url, 'e5lite_shed_duration_seconds_bucket{route="/v1/embeddings",le="0.25"}')
        shed_all = metric(url, 'e5lite_shed_duration_seconds_count{route="/v1/embeddings"}')
        shed_by_deadline = metric(url, 'e5lite_shed_duration_seconds_bucket{route="/v1/embeddings",le="2.5"}')
        skipped = metric(url, "e5lite_texts_skipped_total")
        expired = metric(url, 'e5lite_requests_shed_total{reason="expired"}')
    answered, gave_up = out["answered"], out["gave_up"]
    embedded = sum(device.reached(texts) for texts in gave_up)
    report = (f"{out['seconds']:.1f} s: answered {len(answered)} (p50 {np.median(answered):.2f} s, p99 "
              f"{np.percentile(answered, 99):.2f} s), shed {len(out['shed'])} (by the server within 0.25 s: "
              f"{shed_fast:.0f}, at the deadline: {expired:.0f}), timed out {out['timed_out']}, gave up "
              f"{len(gave_up)} ({embedded} of their {32 * len(gave_up)} texts embedded, {skipped:.0f} skipped), "
              f"other {out['other']}; recovery {recovery:.2f} s")
    print(report)
    # admitted requests are answered (well within the clients' 10 s, on a quiet machine within about 3 s), and
    # the server is itself again at once
    assert out["timed_out"] == 0 and not out["other"] and recovery < 2.0, report
    assert len(answered) >= 20 and len(out["shed"]) >= 20, report  # past saturation, and still serving
    # each 429 came at once, or at the deadline (1 s) for those the estimate let in wrongly: calls vary here, as
    # new shapes compile (and more so when other work shares the cores). All within 2.5 s; a few may miss the
    # 0.25 s bucket when the event loop stalls behind the GIL (a full CI run on 2 cores once saw 3 of 102)
    assert shed_fast + expired >= 0.95 * shed_all and shed_by_deadline == shed_all, report
    # most of what the impatient clients asked for never reached the model
    assert gave_up and embedded <= 0.5 * 32 * len(gave_up), report
