"""Fine-tuning demonstration on real text: all-MiniLM-L6-v2 learns to find a Python standard-library docstring
from its summary; nDCG@10 on held-out modules before and after.

    python tools/train_demo.py [--output /tmp/e5lite-demo] [--epochs 1] [--batch-size 32] [--dtype bfloat16]

The data: every documented public function, class and method of ~100 standard-library modules. A query is a
docstring's first paragraph ("Return a list of the lines in the string..."), its positive the rest of that docstring
headed by the qualified name, and its hard negative another docstring of the same module. Modules are split
by name: one in five is held out, and the held-out modules make a BEIR folder (each query's own docstring is
its one relevant document, the corpus is every held-out docstring). Training never sees a held-out module.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import random
import sys
import time
import warnings
from pathlib import Path

MODULES = """abc argparse ast asyncio base64 bisect bz2 calendar cmath codecs collections colorsys concurrent.futures
configparser contextlib copy csv dataclasses datetime decimal difflib dis doctest email.message enum filecmp
fileinput fnmatch fractions ftplib functools getopt gettext glob graphlib gzip hashlib heapq hmac html.parser
http.client http.cookies imaplib importlib inspect io ipaddress itertools json linecache locale logging lzma
mailbox math mimetypes multiprocessing netrc numbers operator optparse os pathlib pickle pkgutil platform
plistlib poplib pprint queue random re reprlib sched secrets selectors shelve shlex shutil signal smtplib socket
sqlite3 ssl statistics string struct subprocess sysconfig tarfile tempfile textwrap threading timeit tokenize
trace traceback types typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom
xml.etree.ElementTree zipfile zoneinfo""".split()


def docstrings(module_name: str) -> list[tuple[str, str, str]]:
    """(qualified name, summary paragraph, rest) of the module's documented public functions, classes and methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    out, seen = [], set()
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        members = [(name, obj)]
        if inspect.isclass(obj):
            members += [(f"{name}.{m}", f) for m, f in sorted(vars(obj).items())
                        if not m.startswith("_") and callable(f)]
        for qual, o in members:
            doc = inspect.getdoc(o) or ""
            summary, _, rest = doc.strip().partition("\n\n")  # the first paragraph is the summary
            summary, rest = " ".join(summary.split()), " ".join(rest.split())
            if 15 <= len(summary) <= 300 and len(rest) >= 60 and summary not in seen:
                seen.add(summary)
                out.append((f"{module_name}.{qual}", summary.strip(), rest[:1000]))
    return out


def held_out(module_name: str) -> bool:
    return int(hashlib.sha256(module_name.encode()).hexdigest(), 16) % 5 == 0


def build(folder: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Writes train.jsonl and the held-out BEIR folder; returns their paths and counts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    train, corpus, queries = [], [], []
    for m in MODULES:
        docs = docstrings(m)
        if held_out(m):
            for qual, summary, rest in docs:
                corpus.append({"_id": qual, "title": qual, "text": rest})
                queries.append({"_id": qual, "text": summary})
            continue
        for i, (qual, summary, rest) in enumerate(docs):
            rec = {"query": summary, "positive": f"{qual}: {rest}"}
            if len(docs) > 1:
                j = rng.choice([k for k in range(len(docs)) if k != i])
                rec["negative"] = f"{docs[j][0]}: {docs[j][2]}"
            train.append(rec)
    rng.shuffle(train)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    beir = folder / "heldout"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (beir / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{q['_id']}\t1\n" for q in queries))
    counts = {"train_records": len(train), "heldout_queries": len(queries), "heldout_corpus": len(corpus),
              "heldout_modules": sorted(m for m in MODULES if held_out(m))}
    return folder / "train.jsonl", beir, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="/tmp/e5lite-demo")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=2e-5)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per text (MiniLM allows 256)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of training")
    args = ap.parse_args()
    from e5lite.runtime import restart_with_huge_pages
    restart_with_huge_pages()  # as `e5lite train` does: fit() runs in this process
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import minilm_dir

    import e5lite
    from e5lite.evaluate import format_table
    from e5lite.train import TrainSettings, fit
    out = Path(args.output)
    train, beir, counts = build(out)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}: {json.dumps(counts)}")
    enc = e5lite.load(minilm_dir(), max_length=args.max_length)
    before = e5lite.evaluate_retrieval(enc, beir, k_values=(1, 10, 100))
    print("\n## before (all-MiniLM-L6-v2)\n" + format_table(before))
    t0 = time.perf_counter()
    summary = fit(enc, train, out / "model", settings=TrainSettings(
        batch_size=args.batch_size, epochs=args.epochs, learning_rate=args.learning_rate, warmup_steps=10,
        dtype=args.dtype))
    minutes = (time.perf_counter() - t0) / 60
    after = e5lite.evaluate_retrieval(e5lite.load(out / "model", max_length=args.max_length), beir,
                                      k_values=(1, 10, 100))
    rate = summary["tokens_per_s"]  # None for a one-step run: that step's time is the compiling's
    print(f"\n## after {summary['steps']} steps, {args.dtype} ({minutes:.1f} min, "
          f"{'-' if rate is None else f'{rate:,.0f}'} tokens/s after the first step, "
          f"last loss {summary['loss']:.4f})\n" + format_table(after))
    print(f"\nnDCG@10 {before['ndcg_at_10']:.4f} -> {after['ndcg_at_10']:.4f}, "
          f"recall@10 {before['recall_at_10']:.4f} -> {after['recall_at_10']:.4f}")


if __name__ == "__main__":
    main()
