"""The web framework's own cost per request: e5lite's Starlette app against the same request model under FastAPI.

    python tools/bench_framework.py                 # 2,000 requests per case, interleaved
    python tools/bench_framework.py --requests 500

Both servers run under uvicorn (same flags, one worker, in their own processes) and answer ``POST /embed`` with
a fixed [n, 384] float32 block in place of the model, so only the framework's work differs: reading the body,
validating it with ``e5lite.serve.protocol.EmbedRequest`` (the same pydantic model), and writing the answer.
  starlette   e5lite's way: a Starlette ``Route``, ``read_json`` + ``parse`` (the server's own functions), the
              response serialised by pydantic (``EmbedResponse``)
  fastapi     a FastAPI route taking ``EmbedRequest`` as its body parameter (FastAPI validates it), returning
              the same serialised response
One keep-alive connection per server, requests alternating between them, bodies of 1 and of 32 short texts.
Needs fastapi (``pip install fastapi``); e5lite does not depend on it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

APP = textwrap.dedent('''
    import sys
    import numpy as np
    import uvicorn
    from starlette.responses import Response
    from e5lite.serve.protocol import EmbedRequest, EmbedResponse, json_response, parse
    ROWS = np.random.default_rng(0).standard_normal((64, 384)).astype(np.float32)
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "starlette":
        from starlette.applications import Starlette
        from starlette.routing import Route
        from e5lite.serve.app import read_json

        async def embed(request):
            req = parse(EmbedRequest, await read_json(request, EmbedRequest.status), dim=384, max_inputs=64)
            return json_response(EmbedResponse.of(ROWS[:len(req.inputs)]))
        app = Starlette(routes=[Route("/embed", embed, methods=["POST"])])
    else:
        from fastapi import FastAPI
        app = FastAPI()

        @app.post("/embed")
        async def embed(req: EmbedRequest):
            return Response(EmbedResponse.of(ROWS[:len(req.inputs)]).model_dump_json(), media_type="application/json")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(kind: str) -> tuple[subprocess.Popen, http.client.HTTPConnection]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", APP, kind, str(port)])
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.connect()
            return proc, conn
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{kind} did not start")


def call(conn: http.client.HTTPConnection, body: bytes) -> float:
    t = time.perf_counter()
    conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    dt = time.perf_counter() - t
    assert r.status == 200, data[:200]
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    import fastapi
    import pydantic
    import starlette
    servers = {k: start(k) for k in ("starlette", "fastapi")}
    from pydoc_data.topics import topics
    words = topics["with"].split()
    bodies = {n: json.dumps({"inputs": [" ".join(words[i * 12:(i + 1) * 12]) for i in range(n)]}).encode()
              for n in (1, 32)}
    try:
        times = {(k, n): [] for k in servers for n in bodies}
        for i in range(args.requests + 100):  # the first 100 of each: warm-up
            for n, body in bodies.items():
                order = list(servers) if i % 2 else list(servers)[::-1]
                for k in order:
                    dt = call(servers[k][1], body)
                    if i >= 100:
                        times[k, n].append(dt)
    finally:
        for proc, conn in servers.values():
            conn.close()
            proc.terminate()
            proc.wait(timeout=10)
    print(f"# e5lite framework overhead  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} cpus  "
          f"starlette {starlette.__version__}  fastapi {fastapi.__version__}  pydantic {pydantic.__version__}  "
          f"{args.requests} requests per case, interleaved")
    print("| inputs per request | starlette p50 ms | fastapi p50 ms | fastapi / starlette | starlette p99 | fastapi p99 |")
    print("|---|---|---|---|---|---|")
    for n in bodies:
        s, f = (np.array(times[k, n]) * 1e3 for k in ("starlette", "fastapi"))
        print(f"| {n} | {np.median(s):.3f} | {np.median(f):.3f} | {np.median(f) / np.median(s):.2f}x | "
              f"{np.percentile(s, 99):.3f} | {np.percentile(f, 99):.3f} |")


if __name__ == "__main__":
    main()
