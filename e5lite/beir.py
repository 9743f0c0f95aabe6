"""BEIR-format retrieval data: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``, read strictly.

The conventions of BEIR and unilm/e5's evaluation: ids are strings, a document's text is
``(title + " " + text).strip()``, and only queries that have qrels in the split are scored. Every error
names the file and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .files import iter_jsonl


@dataclass(frozen=True)
class RetrievalData:
    """One split of a BEIR folder. ``qrels[query_id][doc_id]`` is the graded relevance (0 = judged not
    relevant); ``query_ids`` are the queries that have qrels, in queries.jsonl order."""

    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


def _id(rec: dict, where: str) -> str:
    if "_id" not in rec:
        raise InputError(f"{where}: no '_id'")
    if not isinstance(rec["_id"], (str, int)) or isinstance(rec["_id"], bool):
        raise InputError(f"{where}: '_id' is {type(rec['_id']).__name__}, expected a string")
    return str(rec["_id"])


def _text(rec: dict, key: str, where: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in rec else f"{type(value).__name__}, expected a string"
        raise InputError(f"{where}: '{key}' is {got}")
    return value


def _read(path: Path, kind: str) -> dict[str, str]:
    """id -> text of a corpus or queries file, in file order; duplicated ids are an error."""
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}: not a BEIR folder")
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        for rec, where, _ in iter_jsonl(f, str(path)):
            key = _id(rec, where)
            if key in out:
                raise InputError(f"{where}: '_id' {key!r} appears twice")
            if kind == "corpus":
                out[key] = (_text(rec, "title", where, required=False) + " " + _text(rec, "text", where)).strip()
            else:
                out[key] = _text(rec, "text", where)
    if not out:
        raise InputError(f"{path} has no {'documents' if kind == 'corpus' else 'queries'}")
    return out


def read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    """``query-id corpus-id score`` rows (tab-separated, after a header line) -> {query: {doc: score}}."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip("\r\n").split("\t")
            if n == 1 and not (len(cols) == 3 and cols[2].lstrip("-").isdigit()):
                continue  # the header (BEIR writes query-id, corpus-id, score)
            if not line.strip():
                continue
            where = f"{path} line {n}"
            if len(cols) != 3:
                raise InputError(
                    f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cols)}"
                )
            qid, did, score = cols
            if qid not in queries:
                raise InputError(f"{where}: query {qid!r} is not in queries.jsonl")
            if did not in corpus:
                raise InputError(f"{where}: document {did!r} is not in corpus.jsonl")
            try:
                qrels.setdefault(qid, {})[did] = int(score)
            except ValueError:
                raise InputError(f"{where}: score {score!r} is not an integer") from None
    if not qrels:
        raise InputError(f"{path} has no judgements")
    return qrels


def qrels_file(data_dir: str | os.PathLike, split: str = "test") -> Path:
    """The qrels file of ``split`` in a BEIR folder, refused naming the splits there when missing: a check
    ``e5lite eval`` makes before it loads a model."""
    d = Path(data_dir)
    if not d.is_dir():
        raise InputError(f"data folder {str(d)!r} does not exist")
    qrels_path = d / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = sorted(p.stem for p in (d / "qrels").glob("*.tsv")) if (d / "qrels").is_dir() else []
        raise InputError(
            f"no qrels for split {split!r}: {qrels_path} is missing"
            + (f" (splits here: {', '.join(have)})" if have else "")
        )
    return qrels_path


def load_retrieval_data(data_dir: str | os.PathLike, split: str = "test") -> RetrievalData:
    """Reads a BEIR folder's corpus, queries and the qrels of ``split``."""
    d, qrels_path = Path(data_dir), qrels_file(data_dir, split)
    corpus = _read(d / "corpus.jsonl", "corpus")
    queries = _read(d / "queries.jsonl", "queries")
    qrels = read_qrels(qrels_path, queries, corpus)
    query_ids = [q for q in queries if q in qrels]
    return RetrievalData(list(corpus), list(corpus.values()), query_ids, [queries[q] for q in query_ids], qrels)
