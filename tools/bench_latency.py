"""One-query latency: e5lite against sentence-transformers, transformers + torch and ONNX Runtime, interleaved in one
process on real short queries; then the server's round trip against in-process ``encode``.

    python tools/bench_latency.py                      # all-MiniLM-L6-v2, 111 queries x 3 rounds
    python tools/bench_latency.py --rounds 5 --peers e5lite,e5lite-bf16,st,torch,ort --no-server

Queries: the questions of tests/pydoc_beir.py (the pydoc retrieval set and its training pairs), each with E5's
"query: " prompt, one per call. Every peer embeds the same query before the next query is taken, in an order
that rotates, so a noisy machine slows all alike; p50/p99 over all calls after a warm-up pass. Each peer returns
a normalised float32 vector on the host, as a caller would use it. The server part starts `e5lite serve` on the
same model (it warms up before /health says ready), times the first request after that, then POST /embed of one
query per request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "tests")]


def queries() -> list[str]:
    from pydoc_beir import QUERIES, training_records
    return [q for _, q, _, _ in QUERIES] + [r["query"] for r in training_records()]


def make_peers(names: list[str], model_dir: Path, scratch: Path) -> dict:
    """name -> a function embedding one query string (prompt included) into a normalised float32 vector."""
    peers = {}
    for name in names:
        if name.startswith("e5lite"):
            import e5lite
            enc = e5lite.load(model_dir, dtype="bfloat16" if name == "e5lite-bf16" else "float32")
            enc.warmup()
            peers[name] = lambda q, enc=enc: enc.encode(q)
        elif name == "st":
            from sentence_transformers import SentenceTransformer
            st = SentenceTransformer(str(model_dir), device="cpu")
            peers[name] = lambda q, st=st: st.encode(q, normalize_embeddings=True, convert_to_numpy=True)
        elif name in ("torch", "ort"):
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(model_dir))

            def pool(h, mask):
                m = mask[..., None].astype(np.float32)
                e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
                return (e / np.linalg.norm(e, axis=1, keepdims=True))[0]

            if name == "torch":
                import torch
                from transformers import AutoModel
                model = AutoModel.from_pretrained(str(model_dir)).eval()

                def run(q, tok=tok, model=model):
                    b = tok([q], return_tensors="pt", truncation=True)
                    with torch.inference_mode():
                        h = model(**b).last_hidden_state.numpy()
                    return pool(h, b["attention_mask"].numpy())
            else:
                import onnxruntime as ort
                from bench import _export_onnx
                path = scratch / "model.onnx"
                _export_onnx(str(model_dir), path)
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

                def run(q, tok=tok, sess=sess):
                    b = tok([q], return_tensors="np", truncation=True)
                    ids, mask = b["input_ids"].astype(np.int64), b["attention_mask"].astype(np.int64)
                    (h,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
                    return pool(h, mask)
            peers[name] = run
        else:
            raise SystemExit(f"unknown peer {name}")
    return peers


def percentiles(ts) -> tuple[float, float]:
    return float(np.percentile(ts, 50) * 1e3), float(np.percentile(ts, 99) * 1e3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[float, object]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def server_round_trip(model_dir: Path, qs: list[str], rounds: int, in_process) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "e5lite.cli", "serve", "--model", str(model_dir), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not become ready: " + proc.stderr.read().decode()[-2000:])
        first, _ = post(base + "/embed", {"inputs": "query: " + qs[0]})
        served, local = [], []
        for r in range(rounds):
            for q in qs:
                t, _ = post(base + "/embed", {"inputs": "query: " + q})
                served.append(t)
                t0 = time.perf_counter()
                in_process("query: " + q)
                local.append(time.perf_counter() - t0)
        return {"first": first, "served": percentiles(served), "local": percentiles(local)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the real all-MiniLM-L6-v2)")
    ap.add_argument("--peers", default="e5lite,st,torch,ort")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    from bench import minilm_dir
    model_dir = Path(args.model) if args.model else minilm_dir()
    qs = queries()
    with tempfile.TemporaryDirectory(prefix="e5lite-latency-") as tmp:
        peers = make_peers(args.peers.split(","), model_dir, Path(tmp))
        names = list(peers)
        times = {n: [] for n in names}
        outs = {n: {} for n in names}
        for r in range(args.rounds + 1):
            for i, q in enumerate(qs):
                k = (r * len(qs) + i) % len(names)
                for n in names[k:] + names[:k]:
                    t0 = time.perf_counter()
                    v = peers[n]("query: " + q)
                    if r:
                        times[n].append(time.perf_counter() - t0)
                    outs[n][i] = v
        ref = next((n for n in ("st", "torch") if n in peers), names[0])
        print(f"# e5lite one-query latency  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} "
              f"cpus  {model_dir.name}  {len(qs)} queries x {args.rounds} rounds (after a warm-up round)")
        base = percentiles(times[ref])[0]
        print(f"| peer | p50 ms | p99 ms | p50 vs {ref} | min cos vs {ref} |")
        print("|---|---|---|---|---|")
        for n in names:
            p50, p99 = percentiles(times[n])
            cos = min(float(np.dot(outs[n][i], outs[ref][i])) for i in outs[n])
            print(f"| {n} | {p50:.2f} | {p99:.2f} | {p50 / base:.2f}x | {cos:.6f} |", flush=True)
        if not args.no_server:
            e5 = next((peers[n] for n in names if n == "e5lite"), None)
            if e5 is None:
                import e5lite
                enc = e5lite.load(model_dir)
                enc.warmup()
                e5 = enc.encode
            s = server_round_trip(model_dir, qs, max(1, args.rounds - 1), e5)
            print(f"\nserver POST /embed of one query: p50 {s['served'][0]:.2f} ms, p99 {s['served'][1]:.2f} ms; "
                  f"in-process encode in the same loop: p50 {s['local'][0]:.2f} ms, p99 {s['local'][1]:.2f} ms; "
                  f"added p50 {s['served'][0] - s['local'][0]:.2f} ms; first request after /health said ready "
                  f"{s['first'] * 1e3:.1f} ms ({s['first'] * 1e3 / s['served'][0]:.1f}x the served p50)")


if __name__ == "__main__":
    main()
