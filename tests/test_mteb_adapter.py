"""mteb_adapter.py: the real all-MiniLM-L6-v2 run through ``mteb.evaluate`` on a local BEIR-format task
(Python's documentation, tests/pydoc_beir.py), offline; its scores equal pytrec_eval on a ranking computed here
and ``e5lite.evaluate_retrieval`` (``e5lite eval``) on the same folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# mteb creates its default results cache folder (~/.cache/mteb) when imported; keep it, and the hub, out of reach
os.environ.setdefault("MTEB_CACHE", os.path.join(tempfile.gettempdir(), "e5lite-tests-mteb-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
mteb = pytest.importorskip("mteb")
pytrec_eval = pytest.importorskip("pytrec_eval")

import e5lite  # noqa: E402
from e5lite.mteb_adapter import MTEBEncoder, _hub_name_and_revision  # noqa: E402
from e5lite.prompts import E5_PROMPTS  # noqa: E402

K = (1, 3, 5, 10, 100)
METRICS = {"ndcg": "ndcg_cut", "map": "map_cut", "recall": "recall", "precision": "P"}


def read_beir(folder: Path, split: str = "test"):
    """corpus {id: (title, text)}, queries {id: text}, qrels {qid: {doc: grade}}: plain reads, no e5lite."""
    corpus = {r["_id"]: (r.get("title", ""), r["text"]) for r in map(json.loads, open(folder / "corpus.jsonl"))}
    queries = {r["_id"]: r["text"] for r in map(json.loads, open(folder / "queries.jsonl"))}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
        q, d, grade = line.split("\t")
        qrels.setdefault(q, {})[d] = int(grade)
    return corpus, queries, qrels


def local_task(folder: Path):
    """A retrieval task whose data is a local BEIR folder (no hub)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata

    class PydocRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="PydocRetrieval", type="Retrieval", main_score="ndcg_at_10", category="t2t",
            description="Questions about Python answered by its reference documentation (pydoc topics).",
            reference="https://docs.python.org/3/reference/", dataset={"path": str(folder), "revision": "local"},
            eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=["Written"],
            domains=["Programming"], task_subtypes=[], license="cc-by-4.0", annotations_creators="expert-annotated",
            modalities=["text"], sample_creation="found", bibtex_citation="")

        def load_data(self, num_proc=None, **kwargs):
            corpus, queries, qrels = read_beir(folder)
            self.dataset = {"default": {"test": {
                "corpus": Dataset.from_list([{"id": i, "title": t, "text": x} for i, (t, x) in corpus.items()]),
                "queries": Dataset.from_list([{"id": i, "text": x} for i, x in queries.items()]),
                "relevant_docs": qrels, "top_ranked": None}}}
            self.data_loaded = True

    return PydocRetrieval()


def trec_eval_reference(run, qrels, k_values=K) -> dict[str, float]:
    """pytrec_eval means under MTEB's names; mrr_at_k is recip_rank on the run cut at k in trec_eval's order
    (score descending, ties by document id descending)."""
    measures = {f"{m}.{','.join(map(str, k_values))}" for m in METRICS.values()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    out = {f"{m}_at_{k}": float(np.mean([v[f"{t}_{k}"] for v in per_query.values()]))
           for m, t in METRICS.items() for k in k_values}
    for k in k_values:
        cut = {q: dict(sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:k]) for q, docs in run.items()}
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
        out[f"mrr_at_{k}"] = float(np.mean([v["recip_rank"] for v in rr.values()]))
    return out


@pytest.fixture(scope="module")
def mteb_scores(minilm, pydoc_beir, tmp_path_factory):
    results = mteb.evaluate(MTEBEncoder(minilm), [local_task(pydoc_beir)], encode_kwargs={"batch_size": 16},
                            cache=mteb.ResultCache(tmp_path_factory.mktemp("mteb-results")),
                            overwrite_strategy="always", co2_tracker=False, show_progress_bar=False)
    (task_result,) = results.task_results
    (scores,) = task_result.scores["test"]
    return scores


@pytest.mark.slow
def test_mteb_evaluate_equals_trec_eval_and_e5lite_eval(minilm, pydoc_beir, mteb_scores):
    corpus, queries, qrels = read_beir(pydoc_beir)
    qids, dids = list(qrels), list(corpus)
    q = minilm.encode_queries([queries[i] for i in qids])  # the model's own prompts (none), as mteb and eval
    d = minilm.encode_passages([(corpus[i][0] + " " + corpus[i][1]).strip() for i in dids])
    cos = (q @ d.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(d, axis=1))
    run = {qid: {dids[j]: float(row[j]) for j in np.argsort(-row, kind="stable")[:max(K)]}
           for qid, row in zip(qids, cos)}
    want = trec_eval_reference(run, qrels)
    eval_report = e5lite.evaluate_retrieval(minilm, pydoc_beir, split="test", k_values=K)
    assert len(want) == 25 and mteb_scores["main_score"] == mteb_scores["ndcg_at_10"]
    for key, value in want.items():  # mteb rounds all but mrr to 5 decimals
        assert abs(mteb_scores[key] - value) <= 1e-5, (key, mteb_scores[key], value)
        assert abs(mteb_scores[key] - eval_report[key]) <= 1e-5, (key, mteb_scores[key], eval_report[key])
    assert mteb_scores["ndcg_at_10"] > 0.3 and mteb_scores["recall_at_100"] == 1.0  # a real ranking


def test_prompt_per_prompt_type(minilm, pydoc_beir, monkeypatch):
    from mteb.types import PromptType
    task = local_task(pydoc_beir)
    texts = ["how do I catch an exception and still run cleanup code", "Python's try statement"]
    loader = [{"text": texts[:1]}, {"text": texts[1:]}]  # what mteb's DataLoader yields: batches of dicts
    monkeypatch.setattr(minilm, "prompts", dict(E5_PROMPTS))  # MiniLM with an E5 model's prompts, for this test
    model = MTEBEncoder(minilm)

    def encode(prompt_type):
        return model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default",
                            prompt_type=prompt_type, batch_size=32, show_progress_bar=False)

    for prompt_type, name in [(PromptType.query, "query"), (PromptType.document, "passage")]:
        got = encode(prompt_type)
        assert got.dtype == np.float32 and got.shape == (2, minilm.dim)
        np.testing.assert_allclose(got, minilm.encode(texts, prompt_name=name), atol=1e-6)
    np.testing.assert_allclose(encode(None), minilm.encode(texts), atol=1e-6)  # no prompt type: model default
    assert model.prompt(task.metadata, None) == "" and model.prompt(task.metadata, "query") == "query: "
    # other prompt names; a name the model lacks (or None) means no prompt, as e5lite eval does
    other = MTEBEncoder(minilm, query_prompt_name=None, passage_prompt_name="corpus")
    assert other.prompt(task.metadata, "query") == other.prompt(task.metadata, "document") == ""
    # a prompt the model names after the task or task type wins, as in mteb's sentence-transformers wrapper
    monkeypatch.setitem(minilm.prompts, "Retrieval-document", "doc: ")
    assert model.prompt(task.metadata, PromptType.document) == "doc: "
    monkeypatch.setitem(minilm.prompts, "PydocRetrieval", "pydoc: ")
    assert model.prompt(task.metadata, PromptType.document) == "pydoc: "
    with pytest.raises(ValueError, match="precision"):
        model.encode(loader, task_metadata=task.metadata, hf_split="test", hf_subset="default", precision="int8")


def test_model_meta(minilm):
    meta = MTEBEncoder(minilm, model_name="sentence-transformers/all-MiniLM-L6-v2", revision="abc").mteb_model_meta
    assert (meta.name, meta.revision, meta.embed_dim, meta.max_tokens) == (
        "sentence-transformers/all-MiniLM-L6-v2", "abc", 384, 256)
    assert meta.similarity_fn_name.value == "cosine" and meta.framework == ["JAX"]
    assert 22_000_000 < meta.n_parameters < 23_000_000
    assert MTEBEncoder(minilm).mteb_model_meta.name == f"local/{Path(minilm.model_dir).name}"
    snap = Path("/cache/hub/models--intfloat--e5-base-v2/snapshots/1c644c92ad3ba1efdad3f1451a637716616a20e8")
    assert _hub_name_and_revision(snap) == ("intfloat/e5-base-v2", snap.name)
    assert _hub_name_and_revision(Path("/models/my-e5")) == ("local/my-e5", "local")


def test_import_e5lite_does_not_import_mteb_and_missing_mteb_names_the_extra(minilm, monkeypatch):
    code = "import sys, e5lite, e5lite.mteb_adapter; assert 'mteb' not in sys.modules, 'mteb imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "mteb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'e5lite\[mteb\]'"):
        MTEBEncoder(minilm)
