"""ir_metrics.py against pytrec_eval (trec_eval, the reference of BEIR and MTEB) on the same runs: real
rankings of Python's documentation by all-MiniLM-L6-v2, graded qrels, judged-not-relevant documents, ties."""

from __future__ import annotations

import numpy as np
import pytest
import pytrec_eval

from e5lite.beir import load_retrieval_data
from e5lite.ir_metrics import evaluate_run, trec_order

K = (1, 3, 5, 10, 100)


def reference(run, qrels, k_values=K) -> dict[str, float]:
    """pytrec_eval's means under MTEB's names; recip_rank on the run cut at k (trec_eval's order) is mrr_at_k."""
    cut = lambda k: {q: {d: run[q][d] for d in trec_order(run[q])[:k]} for q in run}  # noqa: E731
    measures = {f"{m}.{','.join(map(str, k_values))}" for m in ("ndcg_cut", "map_cut", "recall", "P")}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}
    out = {f"{m}_at_{k}": np.mean([v[f"{t}_{k}"] for v in per_query.values()])
           for m, t in names.items() for k in k_values}
    for k in k_values:
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut(k))
        out[f"mrr_at_{k}"] = np.mean([v["recip_rank"] for v in rr.values()])
    return out


def assert_equal_to_trec_eval(run, qrels, k_values=K):
    got, want = evaluate_run(run, qrels, k_values), reference(run, qrels, k_values)
    assert set(got) == set(want)
    for key in want:
        assert abs(got[key] - want[key]) <= 1e-6, (key, got[key], want[key])


@pytest.fixture(scope="module")
def minilm_run(minilm, pydoc_beir):
    """Every query (both splits) against every document, cosine scores of all-MiniLM-L6-v2."""
    enc = minilm
    data = load_retrieval_data(pydoc_beir, "test")
    dev = load_retrieval_data(pydoc_beir, "dev")
    ids, texts = data.query_ids + dev.query_ids, data.query_texts + dev.query_texts
    scores = enc.encode(texts, prompt="query: ") @ enc.encode(data.doc_texts, prompt="passage: ").T  # E5's, given
    run = {q: {d: float(s) for d, s in zip(data.doc_ids, row)} for q, row in zip(ids, scores)}
    return run, {**data.qrels, **dev.qrels}


def test_real_rankings_equal_trec_eval(minilm_run):
    run, qrels = minilm_run
    assert run["q15"]["if"] == run["q15"]["else"]  # identical documents: a tie trec_eval orders by id
    assert_equal_to_trec_eval(run, qrels)


def test_top_k_runs_and_odd_cutoffs_equal_trec_eval(minilm_run):
    """Runs cut to their top 10 (as a search returns them), and cut-offs past the run's length."""
    run, qrels = minilm_run
    top = {q: {d: run[q][d] for d in trec_order(run[q])[:10]} for q in run}
    assert_equal_to_trec_eval(top, qrels, (1, 2, 7, 10, 20, 1000))


def test_ties_and_grades_equal_trec_eval():
    """Many equal scores (trec_eval breaks them by document id, descending), grades 0..3, a query whose
    judgements are all 0, and a document the qrels never judged."""
    rng = np.random.default_rng(0)
    docs = [f"d{i:03d}" for i in range(60)]
    run = {f"q{j}": {d: float(rng.integers(0, 4)) for d in docs} for j in range(12)}
    qrels = {f"q{j}": {d: int(rng.integers(0, 4)) for d in rng.choice(docs, 15, replace=False)} for j in range(11)}
    qrels["q11"] = {"d001": 0, "d002": 0}
    run["q11"]["unjudged"] = 9.0
    assert_equal_to_trec_eval(run, qrels)


def test_trec_order_and_bad_arguments():
    assert trec_order({"a": 1.0, "b": 2.0, "c": 1.0, "d": 2.0}) == ["d", "b", "c", "a"]
    with pytest.raises(ValueError, match="positive"):
        evaluate_run({"q": {"d": 1.0}}, {"q": {"d": 1}}, (0, 5))
    with pytest.raises(ValueError, match="no query of the run has qrels"):
        evaluate_run({"q": {"d": 1.0}}, {"other": {"d": 1}})
