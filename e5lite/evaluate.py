"""Retrieval evaluation on BEIR-format data: embed queries and corpus, exact search, trec_eval metrics.

``evaluate_retrieval`` is what ``e5lite eval`` runs and what the MTEB adapter's numbers are checked against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .beir import load_retrieval_data
from .errors import InputError
from .ir_metrics import METRICS, evaluate_run
from .search import search

if TYPE_CHECKING:
    from .encoder import Encoder

DEFAULT_K = (1, 3, 5, 10, 100)


def _corpus_from_folder(folder, doc_ids: list[str]):
    """An ``e5lite embed --output DIR`` run over this corpus: its row order must be the corpus order, its ids
    the corpus ``_id``s (``--id-field _id``)."""
    from .shards import iter_shards

    ids = [str(i) for _, shard_ids in iter_shards(folder, embeddings=False) for i in shard_ids]
    if ids != doc_ids:
        where = next(
            (i for i, (a, b) in enumerate(zip(ids, doc_ids, strict=False)) if a != b), min(len(ids), len(doc_ids))
        )
        raise InputError(
            f"--corpus-embeddings {folder}: its rows are not corpus.jsonl's documents in order "
            f"({len(ids)} rows, {len(doc_ids)} documents; first difference at row {where}); embed "
            "the corpus with --id-field _id"
        )
    return Path(folder)


def evaluate_retrieval(
    encoder: Encoder,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    k_values: Iterable[int] = DEFAULT_K,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    batch_size: int | None = None,
    corpus_embeddings: str | os.PathLike | None = None,
    show_progress_bar: bool | None = None,
) -> dict:
    """Scores ``encoder`` on one split of a BEIR folder; returns MTEB-named metrics (``ndcg_at_10``, ...,
    fractions) and the run's facts (model, data, split, counts, prompts, embedding and search seconds).

    Queries get the model's query prompt and documents its document prompt (``Encoder.prompt_for``: E5's
    "query: " / "passage: ", a folder's own, or none) unless ``query_prompt`` / ``passage_prompt`` give others
    ("" for none). ``corpus_embeddings``: a finished ``e5lite embed --output
    DIR`` run over the corpus (same documents, same order, ids from ``--id-field _id``) used instead of
    embedding the corpus here.
    """
    k_values = tuple(sorted({int(k) for k in k_values}))
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k values must be positive ints, got {k_values}")
    data = load_retrieval_data(data_dir, split)
    qp = encoder.prompt_for("query") if query_prompt is None else query_prompt
    pp = encoder.prompt_for("passage") if passage_prompt is None else passage_prompt
    t0 = time.perf_counter()
    q_emb = encoder.encode(data.query_texts, prompt=qp, batch_size=batch_size, show_progress_bar=show_progress_bar)
    if corpus_embeddings is not None:
        corpus = _corpus_from_folder(corpus_embeddings, data.doc_ids)
    else:
        corpus = encoder.encode(data.doc_texts, prompt=pp, batch_size=batch_size, show_progress_bar=show_progress_bar)
    t1 = time.perf_counter()
    scores, indices = search(q_emb, corpus, max(k_values))
    t2 = time.perf_counter()
    run = {
        q: {data.doc_ids[i]: float(s) for s, i in zip(row_s, row_i, strict=True)}
        for q, row_s, row_i in zip(data.query_ids, scores, indices, strict=True)
    }
    metrics = evaluate_run(run, data.qrels, k_values)
    return {
        **metrics,
        "model": str(encoder.model_dir),
        "data": str(data_dir),
        "split": split,
        "queries": len(data.query_ids),
        "corpus": len(data.doc_ids),
        "qrels": sum(len(v) for v in data.qrels.values()),
        "k_values": list(k_values),
        "query_prompt": qp,
        "passage_prompt": pp,
        "corpus_embeddings": None if corpus_embeddings is None else str(corpus_embeddings),
        "embed_s": round(t1 - t0, 3),
        "search_s": round(t2 - t1, 3),
    }


def format_table(report: dict) -> str:
    """The metrics of a report as a Markdown table: one row per k, one column per metric."""
    head = "| k | " + " | ".join(METRICS) + " |"
    rows = [
        f"| {k} | " + " | ".join(f"{report[f'{m}_at_{k}']:.5f}" for m in METRICS) + " |" for k in report["k_values"]
    ]
    return "\n".join([head, "|---" * (len(METRICS) + 1) + "|", *rows])
