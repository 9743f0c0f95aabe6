"""Retrieval metrics as trec_eval computes them, under MTEB's key names.

For each query and cut-off k (a document is relevant when its qrels grade is >= 1; nDCG gains are the grades):
- ``ndcg_at_k``: sum of grade / log2(rank + 1) over the top k, over the same for the ideal order (trec_eval
  ``ndcg_cut.k``);
- ``map_at_k``: the precision at each relevant document in the top k, summed, over the number of relevant
  documents (``map_cut.k``);
- ``recall_at_k``: relevant documents in the top k over relevant documents (``recall.k``);
- ``precision_at_k``: relevant documents in the top k over k (``P.k``);
- ``mrr_at_k``: 1 / rank of the first relevant document in the top k, else 0 (``recip_rank`` on the run cut
  at k).
Rankings follow trec_eval: score descending, ties by document id descending. Each metric is the mean over
the queries that have both qrels and a ranking. ``tests/test_ir_metrics.py`` checks every value against
pytrec_eval (trec_eval itself, which BEIR and MTEB call).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

METRICS = ("ndcg", "map", "recall", "precision", "mrr")


def trec_order(doc_scores: Mapping[str, float]) -> list[str]:
    """Document ids by score, highest first; equal scores by id, descending (trec_eval's order)."""
    return [d for d, _ in sorted(doc_scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(ranking: list[str], grades: Mapping[str, int], k_values: Iterable[int]) -> dict[str, float]:
    """The metrics of one query's ranking (best first) against its qrels grades."""
    relevant = sum(g >= 1 for g in grades.values())
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)
    out = {}
    for k in k_values:
        top = [grades.get(d, 0) for d in ranking[:k]]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(top) if g > 0)
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
        hits, ap, rr = 0, 0.0, 0.0
        for i, g in enumerate(top):
            if g >= 1:
                hits += 1
                ap += hits / (i + 1)
                rr = rr or 1.0 / (i + 1)
        out[f"ndcg_at_{k}"] = dcg / idcg if idcg > 0 else 0.0
        out[f"map_at_{k}"] = ap / relevant if relevant else 0.0
        out[f"recall_at_{k}"] = hits / relevant if relevant else 0.0
        out[f"precision_at_{k}"] = hits / k
        out[f"mrr_at_{k}"] = rr
    return out


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Iterable[int] = (1, 3, 5, 10, 100),
) -> dict[str, float]:
    """Mean metrics of a run ``{query: {doc: score}}`` against ``qrels`` ``{query: {doc: grade}}``, keyed
    ``ndcg_at_10`` etc. for every k, in the order METRICS x k_values."""
    k_values = sorted(set(int(k) for k in k_values))
    if not k_values or k_values[0] < 1:
        raise ValueError(f"k values must be positive ints, got {k_values}")
    scored = [q for q in run if q in qrels]
    if not scored:
        raise ValueError("no query of the run has qrels")
    totals = dict.fromkeys((f"{m}_at_{k}" for m in METRICS for k in k_values), 0.0)
    for q in scored:
        for key, value in query_metrics(trec_order(run[q]), qrels[q], k_values).items():
            totals[key] += value
    return {key: value / len(scored) for key, value in totals.items()}
