"""Peak host memory and time of exact search as the corpus grows: ``e5lite.search`` over an embeddings folder
(one shard in memory at a time) against numpy on the whole [queries, corpus] score matrix.

    python tools/bench_search.py [--sizes 10000,100000,1000000] [--dim 384] [--queries 1000] [--k 100]

Corpora are random unit vectors written by the real shard writer (``e5lite embed --output DIR``'s format,
8,192 rows a shard). Each measurement runs in a fresh process, so each peak (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class RandomEncoder:
    """Stands in for a model in ``embed_corpus``: unit vectors, seeded by each shard's first row (reproducible)."""
    pooling, max_length = "mean", 512

    def __init__(self, dim: int):
        self.dim = dim

    def tokenize(self, texts, prompt_name=None):
        return [np.array([int(t.split()[-1])]) for t in texts]

    def embed_ids(self, ids, **kw):
        rows = np.random.default_rng(int(ids[0][0])).standard_normal((len(ids), self.dim)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_corpus(folder: Path, n: int, dim: int) -> Path:
    from e5lite.shards import embed_corpus
    folder.mkdir(parents=True)
    (folder / "rows.txt").write_text("".join(f"row {i}\n" for i in range(n)))
    embed_corpus(RandomEncoder(dim), folder / "rows.txt", folder / "emb", settings={}, show_progress=False)
    return folder / "emb"


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def child(mode: str, folder: str, queries: int, k: int) -> dict:
    import e5lite
    from e5lite.search import corpus_size
    n, dim = corpus_size(folder)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    import jax
    jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
    base = peak_mb()
    t = time.perf_counter()
    if mode == "e5lite":
        _, idx = e5lite.search(q, folder, k)
    else:  # numpy: all shards in memory, the whole score matrix, argpartition then sort of the top k
        c = e5lite.read_embeddings(folder)
        s = q @ c.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        idx = np.take_along_axis(part, np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable"), 1)
    return {"mode": mode, "rows": n, "seconds": time.perf_counter() - t, "peak_mb": peak_mb(),
            "over_baseline_mb": peak_mb() - base, "checksum": int(idx[:, 0].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--numpy-max", type=int, default=1_000_000, help="largest corpus the numpy peer runs on")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "FOLDER", "QUERIES", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, folder, queries, k = args.child
        print(json.dumps(child(mode, folder, int(queries), int(k))))
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: {args.queries} queries, top {args.k}, dim {args.dim}")
    print("| corpus rows | shards MB | e5lite s | e5lite peak MB (over start) | numpy s | numpy peak MB (over start) |"
          " same top-1 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="e5lite-search-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            folder = make_corpus(Path(tmp) / str(n), n, args.dim)
            size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            res = {}
            for mode in ("e5lite", "numpy"):
                if mode == "numpy" and n > args.numpy_max:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(args.queries),
                                      str(args.k)], capture_output=True, text=True, check=True)
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            e, p = res["e5lite"], res.get("numpy")
            cell = (lambda r: f"{r['seconds']:.2f} | {r['peak_mb']:,.0f} ({r['over_baseline_mb']:+,.0f})")
            print(f"| {n:,} | {size:,.0f} | {cell(e)} | {cell(p) if p else '- | -'} | "
                  f"{'yes' if p and p['checksum'] == e['checksum'] else '-'} |", flush=True)


if __name__ == "__main__":
    main()
