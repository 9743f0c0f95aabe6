"""Overload test for ``e5lite serve``: drives the server past saturation and reports what its clients got:
answered (200), shed (429), timed out, p50/p99 latency of the answered requests, and how long a new request
takes to be answered once the overload is over (recovery).

    python tools/bench_load.py                                  # both phases, all-MiniLM-L6-v2, server defaults
    python tools/bench_load.py --phases burst --server-args "--max-queue-wait-ms 1000"
    python tools/bench_load.py --url http://127.0.0.1:8080       # a server already running (not restarted)

Phases, each on a freshly started ``e5lite serve`` (unless --url) after the same short sequential warm-up:

- burst: --requests requests of --texts passage-sized texts (paragraphs of --min-words words or more, about 200
  tokens on average, as an indexer sends its chunks) from --clients concurrent clients, each giving up on a
  request after --timeout s and going on with the next one. A 429 is final for its request (counted as shed);
  the client waits the Retry-After it was given before its next one, as well-behaved clients do. None of
  these clients should time out.
- flood: --flood-requests requests of --texts texts from --clients clients that do not back off: each sends its
  next request as soon as it has an answer, a 429's Retry-After ignored (as a misbehaving client or a load
  test does). What counts is how fast the refusals come back (429 p95 at the client: at most 0.5 s is the
  goal) and that no client times out; after it, the probe's answer must equal the one it got before the flood.
- quitters: --quitters clients each send one heavy request (--heavy-texts texts of 256+ tokens) and give up
  (close the connection) after --give-up s, as impatient clients or proxies do. Their work must not keep the
  server busy afterwards.

After each phase, once its last client is done, a probe waits --probe-delay s, then sends one short request
(re-sent 50 ms after a 429, until a 200); recovery is the time from its first send to that 200.

Requests are POST /v1/embeddings with base64 output (as the openai client asks), real English text of mixed
lengths (tools/corpus.py). Clients are asyncio tasks in this process, each with an httpx.AsyncClient (one
connection) of its own, sharing the machine's cores with the server, as they would on one host. The server's
log goes to --server-log; where it has them, its /metrics counters of shed and abandoned requests are printed
after each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
PROBE = ["How does the event loop schedule callbacks?"]


@dataclass
class Outcome:
    """What one phase's clients got."""
    answered: list[float] = field(default_factory=list)  # seconds, per 200
    shed: list[float] = field(default_factory=list)  # seconds, per 429
    timed_out: int = 0
    gave_up: int = 0
    other: dict = field(default_factory=dict)  # status or exception name -> count
    wall: float = 0.0


def body(texts: list[str]) -> dict:
    return {"input": texts, "model": "m", "encoding_format": "base64"}


async def send(http, url: str, texts: list[str], limit: float, out: Outcome, gives_up: bool) -> float:
    """One request with a total time limit; its outcome recorded in ``out``. Returns the Retry-After of a
    429, else 0."""
    t = time.perf_counter()
    try:
        r = await asyncio.wait_for(http.post(url + "/v1/embeddings", json=body(texts)), limit)
    except asyncio.TimeoutError:  # the request is cancelled and its connection closed, as a client that quits
        if gives_up:
            out.gave_up += 1
        else:
            out.timed_out += 1
        return 0.0
    except Exception as e:  # noqa: BLE001 - refused or reset connections are an outcome to report
        out.other[type(e).__name__] = out.other.get(type(e).__name__, 0) + 1
        return 0.0
    dt = time.perf_counter() - t
    if r.status_code == 200:
        out.answered.append(dt)
    elif r.status_code == 429:
        out.shed.append(dt)
        return float(r.headers.get("retry-after", 0))
    else:
        out.other[r.status_code] = out.other.get(r.status_code, 0) + 1
    return 0.0


async def connected(url: str, n: int) -> list:
    """``n`` httpx clients of one connection each, already connected (a GET /health each), before any clock
    starts. One pool shared by 128 connections spends time on every request that grows with its connections;
    and building a client costs tens of milliseconds of this process's event loop (an SSL context, even for
    http://), which, done as the clock runs, showed as seconds of latency that were the load generator's."""
    import httpx
    clients = [httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
               for _ in range(n)]
    await asyncio.gather(*(http.get(url + "/health") for http in clients))
    return clients


async def burst(url: str, requests: list[list[str]], clients: int, timeout: float, backoff: bool = True) -> Outcome:
    """The burst (clients wait a 429's Retry-After) or, with ``backoff=False``, the flood."""
    out, order = Outcome(), iter(range(len(requests)))

    async def client(http):
        try:
            for i in order:
                retry_after = await send(http, url, requests[i], timeout, out, gives_up=False)
                if backoff:
                    await asyncio.sleep(retry_after)
        finally:
            await http.aclose()

    https = await connected(url, clients)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http) for http in https))
    out.wall = time.perf_counter() - t0
    return out


async def quitters(url: str, heavy: list[list[str]], give_up: float) -> Outcome:
    out = Outcome()

    async def client(http, texts):
        try:
            await send(http, url, texts, give_up, out, gives_up=True)
        finally:
            await http.aclose()

    https = await connected(url, len(heavy))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(http, texts) for http, texts in zip(https, heavy, strict=True)))
    out.wall = time.perf_counter() - t0
    return out


def vector(r) -> np.ndarray:
    """The first embedding of a base64 /v1/embeddings answer."""
    return np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")


def probe(url: str, delay: float, limit: float) -> tuple[float, int, np.ndarray | None]:
    """(seconds from the first send to a 200, how many 429s came before it, the 200's vector); inf and None if
    none within ``limit``."""
    import httpx
    time.sleep(delay)
    t0, shed = time.perf_counter(), 0
    with httpx.Client(timeout=limit) as http:
        while time.perf_counter() - t0 < limit:
            try:
                r = http.post(url + "/v1/embeddings", json=body(PROBE), timeout=limit - (time.perf_counter() - t0))
            except httpx.TimeoutException:
                break
            if r.status_code == 200:
                return time.perf_counter() - t0, shed, vector(r)
            shed += 1
            time.sleep(0.05)
    return float("inf"), shed, None


def start_server(model: str, extra: list[str], log: Path):
    sys.path.insert(0, str(TOOLS))
    from bench_serve import start_server as start
    return start(model, extra, log)


def server_counters(url: str) -> str:
    """The server's shed and abandoned counters from /metrics, if it has them."""
    import httpx
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.TransportError:
        return ""
    keep = ("e5lite_requests_shed_total", "e5lite_texts_skipped_total",
            "e5lite_texts_embedded_total", "e5lite_throughput_tokens_per_second")
    lines = [ln.replace("e5lite_", "") for ln in text.splitlines() if ln.startswith(keep)]
    # the server's own time to answer 429s, without this process's share of the cores
    shed = {ln.split('le="')[1].split('"')[0]: ln.rsplit(" ", 1)[1] for ln in text.splitlines()
            if ln.startswith('e5lite_shed_duration_seconds_bucket{route="/v1/embeddings"')}
    if shed:
        lines.append("429s answered by the server within 0.05/0.1/0.5/1 s: "
                     + "/".join(shed.get(b, "?") for b in ("0.05", "0.1", "0.5", "1.0")) + f" of {shed['+Inf']}")
    return ", ".join(lines)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except Exception:  # noqa: BLE001
        proc.kill()
        proc.wait()


def warm_up(url: str, requests: list[list[str]], heavy: list[list[str]]) -> np.ndarray:
    """The same few requests one at a time, so the burst does not start with the first compilations; returns
    the probe's vector at a quiet server."""
    import httpx
    with httpx.Client(timeout=300) as http:
        for texts in requests[:8] + heavy[:1] + [PROBE]:
            r = http.post(url + "/v1/embeddings", json=body(texts))
            r.raise_for_status()
    return vector(r)


def ms(xs: list[float], q: float) -> str:
    return f"{np.percentile(np.asarray(xs) * 1000, q):,.0f}" if xs else "-"


def row(phase: str, clients: int, n: int, out: Outcome, recovery: tuple, quiet: np.ndarray) -> str:
    """The phase's table row; recovery is the probe's (seconds, 429s, vector), checked against ``quiet``'s."""
    other = ", ".join(f"{k}: {v}" for k, v in sorted(out.other.items(), key=str)) or "0"
    seconds, shed, got = recovery
    rec = f"{seconds:.2f}" if seconds != float("inf") else "none"
    rec += f" ({shed} × 429 first)" if shed else ""
    if got is not None and float(np.abs(got - quiet).max()) > 1e-6:
        rec += " **wrong vector**"
    return (f"| {phase} | {clients} | {n} | {len(out.answered)} | {len(out.shed)} | {out.timed_out} | "
            f"{out.gave_up} | {other} | {ms(out.answered, 50)} | {ms(out.answered, 99)} | {ms(out.shed, 50)} | "
            f"{ms(out.shed, 95)} | {ms(out.shed, 100)} | {out.wall:.1f} | {len(out.answered) / out.wall:.2f} "
            f"| {rec} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None,
                    help="model folder or hub id (default: all-MiniLM-L6-v2, E5LITE_MINILM_DIR or its package)")
    ap.add_argument("--url", default=None, help="an e5lite serve already running (default: start one per phase)")
    ap.add_argument("--server-args", default="", help="extra e5lite serve flags, e.g. '--max-queue-wait-ms 1000'")
    ap.add_argument("--phases", default="burst,flood,quitters",
                    help="burst, flood, quitters, or several (comma-separated)")
    ap.add_argument("--requests", type=int, default=400, help="burst: requests in all")
    ap.add_argument("--flood-requests", type=int, default=600, help="flood: requests in all")
    ap.add_argument("--texts", type=int, default=8, help="burst: texts per request")
    ap.add_argument("--min-words", type=int, default=60, help="burst: shortest text, in words")
    ap.add_argument("--clients", type=int, default=128, help="burst: concurrent clients")
    ap.add_argument("--timeout", type=float, default=30.0, help="burst: seconds a client waits for an answer")
    ap.add_argument("--quitters", type=int, default=48, help="quitters: clients, one heavy request each")
    ap.add_argument("--heavy-texts", type=int, default=32, help="quitters: texts of 256+ tokens per request")
    ap.add_argument("--give-up", type=float, default=1.5, help="quitters: seconds before a client closes")
    ap.add_argument("--probe-delay", type=float, default=2.0, help="seconds after a phase before the probe")
    ap.add_argument("--probe-timeout", type=float, default=120.0, help="longest the probe waits")
    ap.add_argument("--server-log", type=Path, default=Path(tempfile.gettempdir()) / "bench_load_server.log",
                    help="where the started servers' output goes (appended)")
    args = ap.parse_args()
    sys.path.insert(0, str(TOOLS))  # tools/ is not a package
    from bench import minilm_dir
    from corpus import build_corpus
    args.model = args.model or str(minilm_dir())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rng = random.Random(0)
    texts = build_corpus(4000)
    passages = sorted({t for t in texts if len(t.split()) >= args.min_words})
    requests = [rng.sample(passages, args.texts) for _ in range(max(args.requests, args.flood_requests))]
    long_texts = sorted(texts, key=len, reverse=True)[:max(args.heavy_texts * 2, 128)]
    heavy = [rng.sample(long_texts, args.heavy_texts) for _ in range(args.quitters)]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]

    import e5lite
    print(f"# e5lite serve overload test  {time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} cpus  "
          f"{platform.machine()}  python {platform.python_version()}  e5lite {e5lite.__version__}  "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# model {args.model}; server flags: {args.server_args or '(defaults)'}")
    print(f"# burst: {args.requests} x {args.texts} texts of {args.min_words}+ words, {args.clients} clients, "
          f"{args.timeout:g} s timeout; flood: {args.flood_requests} of them, no backoff; "
          f"quitters: {args.quitters} x {args.heavy_texts} long texts, give up after "
          f"{args.give_up:g} s; probe {args.probe_delay:g} s after each phase")
    print("| phase | clients | requests | answered | shed 429 | timed out | gave up | other | p50 ms | p99 ms "
          "| 429 p50 ms | 429 p95 ms | 429 max ms | phase s | answered/s | recovery s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for phase in phases:
        proc, url = ((None, args.url) if args.url else
                     start_server(args.model, args.server_args.split(), args.server_log))
        try:
            quiet = warm_up(url, requests, heavy)
            if phase in ("burst", "flood"):
                sent = requests[: args.requests if phase == "burst" else args.flood_requests]
                out = asyncio.run(burst(url, sent, args.clients, args.timeout, backoff=phase == "burst"))
                clients = args.clients
            elif phase == "quitters":
                out, sent, clients = asyncio.run(quitters(url, heavy, args.give_up)), heavy, len(heavy)
            else:
                raise SystemExit(f"unknown phase {phase!r}: burst, flood or quitters")
            line = row(phase, clients, len(sent), out, probe(url, args.probe_delay, args.probe_timeout), quiet)
            print(line, flush=True)
            notes.append(f"# {phase}: server counters: {server_counters(url) or '-'}")
        finally:
            if proc is not None:
                stop_server(proc)
    print("\n".join(notes))
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
