"""One-query latency: e5lite against sentence-transformers, transformers + torch and ONNX Runtime, interleaved in one
process on real short queries; then the server's round trip against in-process ``encode``.

    python tools/bench_latency.py                      # all-MiniLM-L6-v2, 111 queries x 3 rounds, 3 fresh servers
    python tools/bench_latency.py --rounds 5 --peers e5lite,e5lite-bf16,st,torch,ort --no-server
    python tools/bench_latency.py --no-server --peers e5lite --weight-study   # weight formats at batch 1
    python tools/bench_latency.py --no-server --peers e5lite,e5lite-int8,e5lite-bf16w,ort,ort-int8

Queries: the questions of tests/pydoc_beir.py (the pydoc retrieval set and its training pairs), each with E5's
"query: " prompt, one per call. Every peer embeds the same query before the next query is taken, in an order
that rotates, so a noisy machine slows all alike; p50/p99 over all calls after a warm-up pass. Each peer returns
a normalised float32 vector on the host, as a caller would use it. The server part starts `e5lite serve` on the
same model (it warms up before /health says ready) ``--starts`` times and times the first request after that
on each, then POST /embed of one query per request on the last.
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
            # e5lite-bf16: bfloat16 compute; e5lite-bf16w / -int8: weights="bfloat16" / "int8" (float32 compute)
            weights = {"e5lite-bf16w": "bfloat16", "e5lite-int8": "int8"}.get(name)
            enc = e5lite.load(model_dir, dtype="bfloat16" if name == "e5lite-bf16" else "float32", weights=weights)
            enc.warmup()
            peers[name] = lambda q, enc=enc: enc.encode(q)
        elif name == "st":
            from sentence_transformers import SentenceTransformer
            st = SentenceTransformer(str(model_dir), device="cpu")
            peers[name] = lambda q, st=st: st.encode(q, normalize_embeddings=True, convert_to_numpy=True)
        elif name in ("torch", "ort", "ort-int8"):
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
                from bench import _export_onnx, _quantize_onnx
                path = scratch / "model.onnx"
                if not path.exists():
                    _export_onnx(str(model_dir), path)
                if name == "ort-int8":  # ORT's dynamic int8 of the same export
                    path = _quantize_onnx(path)
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


# ------------------------------------------------------------------------------- the weight-format study
# Candidates for "fewer bytes per forward" at batch 1, as prototypes here (none is offered by e5lite: see
# BENCHMARKS.md). Each embeds one query end to end inside one jitted function, from the same float32 params.

def weight_study(model_dir: Path, qs: list[str], rounds: int) -> None:
    """Prototypes of smaller weights at batch 1, each the whole forward + pooling in one jit (built once):
    weight-only int8 (per output channel, dequantised inside the matmul), bfloat16 weights with float32
    accumulation, and int8 weights x int8 activations (W8A8: a per-token activation scale, int32 accumulation),
    plain and SmoothQuant-style (each matmul's input channels divided by s = max|x|^a / max|w|^(1-a), the
    weights' rows multiplied by s, so that activation outliers move into the weights; s from the activations of
    64 pydoc passages and a third of the queries, not the queries timed), also with the FFN's output matmul
    (the GELU's outliers) left in float32. Minimum cosine against float32 over every query."""
    import jax
    import jax.numpy as jnp

    import e5lite
    from e5lite import model as M
    from e5lite.attention import AttentionMask, multi_head_attention
    from e5lite.pooling import l2_normalize, pool
    from pydoc_beir import documents
    enc = e5lite.load(model_dir)
    cfg, p = enc.config, enc.params
    D, N, K = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    dots = ("qkv", "o", "fi", "fo")

    def layers_as_matrices(L, i):
        g = lambda f: getattr(L, f)[i]
        s = 1.0 / K ** 0.5
        return dict(qkv=jnp.concatenate([(g("q_DNK") * s).reshape(D, -1), g("k_DNK").reshape(D, -1),
                                         g("v_DNK").reshape(D, -1)], 1),
                    qkv_b=jnp.concatenate([g("q_bias_NK").reshape(-1) * s, g("k_bias_NK").reshape(-1),
                                           g("v_bias_NK").reshape(-1)]),
                    o=g("o_NKD").reshape(-1, D), o_b=g("o_bias_D"), fi=g("ffn_in_DF"), fi_b=g("ffn_in_bias_F"),
                    fo=g("ffn_out_FD"), fo_b=g("ffn_out_bias_D"), l1=(g("attn_ln_scale_D"), g("attn_ln_bias_D")),
                    l2=(g("ffn_ln_scale_D"), g("ffn_ln_bias_D")))

    mats = [layers_as_matrices(p.layers, i) for i in range(cfg.num_hidden_layers)]

    def forward(layers, ids, mask, record=None):
        x = M.embed(p.embeddings, cfg, ids)
        B, S = ids.shape

        def dot(inp, q, name):
            if record is not None:
                record.append((name, inp))
            w = q[name]
            if isinstance(w, dict):
                return w["kind"](inp, w)
            return inp @ w

        for q in layers:
            qkv = dot(x, q, "qkv") + q["qkv_b"]
            ctx = multi_head_attention(qkv.reshape(B, S, 3, N, K), AttentionMask(mask > 0), "xla", None)
            x = M.layer_norm(x + dot(ctx.reshape(B, S, D), q, "o") + q["o_b"], *q["l1"], cfg.layer_norm_eps)
            h = M.activation(dot(x, q, "fi") + q["fi_b"], cfg.activation)
            x = M.layer_norm(x + dot(h, q, "fo") + q["fo_b"], *q["l2"], cfg.layer_norm_eps)
        return l2_normalize(pool(x, mask, "mean"))

    def quantize(w_IO):  # per output channel, symmetric
        scale_O = jnp.max(jnp.abs(w_IO), axis=0) / 127.0
        return jnp.round(w_IO / scale_O).astype(jnp.int8), scale_O

    def weight_only_int8(x, w):  # dequantised inside the jitted matmul
        return x @ (w["q"].astype(jnp.float32) * w["scale"])

    def bf16_weights(x, w):  # bf16 operands, float32 accumulation
        return jax.lax.dot_general(x.astype(jnp.bfloat16), w["w"], (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    def w8a8(x, w):  # int8 weights x int8 activations (dynamic per-token scale), int32 accumulation
        if "inv_smooth" in w:
            x = x * w["inv_smooth"]
        xs = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0 + 1e-12
        acc = jax.lax.dot_general(jnp.round(x / xs).astype(jnp.int8), w["q"], (((x.ndim - 1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * xs * w["scale"]

    # per layer and matmul: max |activation| of each input channel over calibration text
    calibration = ["passage: " + d["text"] for d in documents()[:64]] + ["query: " + q for q in qs[::3]]
    amax = [dict() for _ in mats]
    for t in calibration:
        ids = enc.tokenize([t])[0]
        record = []
        forward(mats, jnp.asarray(ids)[None], jnp.ones((1, len(ids)), jnp.int32), record)
        for k, (name, inp) in enumerate(record):
            v = np.abs(np.asarray(inp)).reshape(-1, inp.shape[-1]).max(0)
            layer = amax[k // len(dots)]
            layer[name] = np.maximum(layer.get(name, 0), v)

    def variant(kind, alpha=None, keep=()):
        layers = []
        for i, m in enumerate(mats):
            m = dict(m)
            for name in dots:
                if name in keep:
                    continue
                w = m[name]
                if kind is bf16_weights:
                    m[name] = {"kind": kind, "w": w.astype(jnp.bfloat16)}
                    continue
                extra = {}
                if alpha is not None:
                    s = (np.maximum(amax[i][name], 1e-5) ** alpha
                         / np.maximum(np.abs(np.asarray(w)).max(1), 1e-5) ** (1 - alpha))
                    w, extra = w * jnp.asarray(s, jnp.float32)[:, None], {"inv_smooth": jnp.asarray(1 / s, jnp.float32)}
                q, scale = quantize(w)
                m[name] = {"kind": kind, "q": q, "scale": scale, **extra}
            layers.append(m)
        # the arrays go in as arguments (jit would bake closed-over ones into the program as constants); which
        # function runs each matmul is static, so it stays out of them; one jit per variant, built once here
        kinds = [{k: v.pop("kind") for k, v in m.items() if isinstance(v, dict)} for m in layers]

        def with_kinds(arrays):
            return [{k: ({**v, "kind": f[k]} if k in f else v) for k, v in m.items()} for m, f in zip(arrays, kinds)]

        run = jax.jit(lambda arrays, ids, mask: forward(with_kinds(arrays), ids, mask))
        return lambda ids, mask: run(layers, ids, mask)

    f32_run = jax.jit(lambda layers, ids, m: forward(layers, ids, m))
    f32 = lambda ids, m: f32_run(mats, ids, m)  # noqa: E731
    variants = {"float32": f32,
                "weight-only int8, dequantised in the matmul": variant(weight_only_int8),
                "bfloat16 weights, float32 accumulation": variant(bf16_weights),
                "W8A8, per-token activation scale": variant(w8a8),
                "W8A8, smoothed (a = 0.5)": variant(w8a8, 0.5),
                "W8A8, smoothed (a = 0.5), FFN output matmul in float32": variant(w8a8, 0.5, keep=("fo",))}
    batches = []
    for q in qs:
        (b,) = enc.engine.small_batches([enc.tokenize(["query: " + q])[0]])
        batches.append((jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)))
    ref = [np.asarray(f32(*b))[0] for b in batches]
    times = {k: [] for k in variants}
    cos = {k: [] for k in variants}
    for k, f in variants.items():
        for b, r in zip(batches, ref):
            cos[k].append(float(np.dot(np.asarray(f(*b))[0], r)))  # also compiles every shape
    names = list(variants)
    for r in range(rounds):
        for i, b in enumerate(batches):
            j = (r * len(batches) + i) % len(names)
            for k in names[j:] + names[:j]:
                t0 = time.perf_counter()
                np.asarray(variants[k](*b))
                times[k].append(time.perf_counter() - t0)
    base = percentiles(times[names[0]])[0]
    print(f"\nweight formats at batch 1 ({model_dir.name}, forward + pooling inside one jit, {len(qs)} queries x "
          f"{rounds} rounds):")
    print("| weights | p50 ms | p99 ms | p50 vs float32 | min cosine vs float32 | mean cosine |")
    print("|---|---|---|---|---|---|")
    for k in names:
        p50, p99 = percentiles(times[k])
        print(f"| {k} | {p50:.2f} | {p99:.2f} | {p50 / base:.2f}x | {min(cos[k]):.6f} | {np.mean(cos[k]):.6f} |",
              flush=True)


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


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "e5lite.cli", "serve", "--model", str(model_dir), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready: " + proc.stderr.read().decode()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


class KeptConnection:
    """POST over one kept-alive HTTP/1.1 connection (http.client), as a service's pooled client sends them."""

    def __init__(self, base: str):
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def post(self, path: str, body: dict) -> tuple[float, object]:
        data = json.dumps(body).encode()
        t = time.perf_counter()
        self.conn.request("POST", path, data, {"Content-Type": "application/json"})
        out = json.loads(self.conn.getresponse().read())
        return time.perf_counter() - t, out


def server_round_trip(model_dir: Path, qs: list[str], rounds: int, in_process, starts: int) -> dict:
    """The first request after /health said ready, over ``starts`` fresh servers (one sample each, so several:
    a single request is at the mercy of the machine); then the p50 of one query per request on the last one,
    over a new connection each (urllib) and over one kept-alive connection, interleaved with in-process
    ``encode`` of the same query."""
    firsts = []
    for k in range(starts):
        proc, base = start_server(model_dir)
        try:
            first, _ = post(base + "/embed", {"inputs": "query: " + qs[k % len(qs)]})
            firsts.append(first)
            if k < starts - 1:
                continue
            served, kept, local = [], [], []
            conn = KeptConnection(base)
            for r in range(rounds):
                for q in qs:
                    t, _ = post(base + "/embed", {"inputs": "query: " + q})
                    served.append(t)
                    t, _ = conn.post("/embed", {"inputs": "query: " + q})
                    kept.append(t)
                    t0 = time.perf_counter()
                    in_process("query: " + q)
                    local.append(time.perf_counter() - t0)
        finally:
            stop(proc)
    return {"firsts": firsts, "served": percentiles(served), "kept": percentiles(kept), "local": percentiles(local)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder (default: the real all-MiniLM-L6-v2)")
    ap.add_argument("--peers", default="e5lite,e5lite-bf16w,st,torch,ort")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--order", default="interleaved", choices=["interleaved", "blocks"],
                    help="interleaved: every peer on a query before the next (a noisy machine slows all alike, "
                         "but each peer also runs among the others' thread pools and cache traffic); blocks: "
                         "each peer its whole round of queries in turn, rounds rotating the order")
    ap.add_argument("--no-server", action="store_true")
    ap.add_argument("--starts", type=int, default=3, help="fresh servers whose first request is timed")
    ap.add_argument("--weight-study", action="store_true", help="also time the weight-format prototypes")
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
            if args.order == "blocks":  # each peer its whole round, as one model in a process runs
                order = [(n, i) for k in range(len(names)) for n in [names[(r + k) % len(names)]]
                         for i in range(len(qs))]
            else:  # every peer on a query before the next query, the order rotating
                order = [(n, i) for i in range(len(qs))
                         for n in names[(r * len(qs) + i) % len(names):] + names[:(r * len(qs) + i) % len(names)]]
            for n, i in order:
                t0 = time.perf_counter()
                v = peers[n]("query: " + qs[i])
                if r:
                    times[n].append(time.perf_counter() - t0)
                outs[n][i] = v
        ref = next((n for n in ("st", "torch") if n in peers), names[0])
        print(f"# e5lite one-query latency  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} "
              f"cpus  {model_dir.name}  {len(qs)} queries x {args.rounds} rounds (after a warm-up round), "
              f"order {args.order}")
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
            s = server_round_trip(model_dir, qs, max(1, args.rounds - 1), e5, args.starts)
            first = float(np.median(s["firsts"])) * 1e3
            print(f"\nserver POST /embed of one query, a new connection each: p50 {s['served'][0]:.2f} ms, p99 "
                  f"{s['served'][1]:.2f} ms; over a kept-alive connection: p50 {s['kept'][0]:.2f} ms, p99 "
                  f"{s['kept'][1]:.2f} ms; in-process encode in the same loop: p50 {s['local'][0]:.2f} ms, p99 "
                  f"{s['local'][1]:.2f} ms; added p50 {s['served'][0] - s['local'][0]:.2f} ms (new connections), "
                  f"{s['kept'][0] - s['local'][0]:.2f} ms (kept alive); first request after /health said ready, "
                  f"median of "
                  f"{len(s['firsts'])} fresh servers: {first:.1f} ms ({first / s['served'][0]:.1f}x the served p50; "
                  f"each: {', '.join(f'{t * 1e3:.1f}' for t in s['firsts'])} ms)")
        if args.weight_study:
            weight_study(model_dir, qs, args.rounds)


if __name__ == "__main__":
    main()
