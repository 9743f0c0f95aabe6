"""evaluate.py and ``e5lite eval``: BEIR-format evaluation of the real all-MiniLM-L6-v2 on Python's
documentation, checked against pytrec_eval on the same ranking."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import linked_copy
from test_ir_metrics import reference

import e5lite
from e5lite.beir import load_retrieval_data
from e5lite.cli import main
from e5lite.ir_metrics import evaluate_run

K = (1, 3, 5, 10, 100)


@pytest.fixture(scope="module")
def report(minilm, pydoc_beir):
    # E5's prompts, given: MiniLM has none of its own
    return e5lite.evaluate_retrieval(minilm, pydoc_beir, query_prompt="query: ", passage_prompt="passage: ",
                                     show_progress_bar=False)


@pytest.mark.slow
def test_metrics_equal_trec_eval_on_the_same_ranking(minilm, pydoc_beir, report):
    data = load_retrieval_data(pydoc_beir, "test")
    q = minilm.encode(data.query_texts, prompt="query: ")
    d = minilm.encode(data.doc_texts, prompt="passage: ")
    scores = q @ d.T
    run = {qid: {data.doc_ids[i]: float(row[i]) for i in np.argsort(-row, kind="stable")[:100]}
           for qid, row in zip(data.query_ids, scores)}
    want = reference(run, data.qrels, K)
    for key, value in want.items():
        assert abs(report[key] - value) <= 1e-6, (key, report[key], value)
    assert (report["queries"], report["corpus"], report["qrels"], report["split"]) == (30, 79, 58, "test")
    assert (report["query_prompt"], report["passage_prompt"]) == ("query: ", "passage: ")
    assert report["embed_s"] > 0 and report["search_s"] > 0 and report["k_values"] == list(K)
    # the model ranks well above chance on these questions
    rng = np.random.default_rng(0)
    chance = evaluate_run({qid: {doc: float(rng.random()) for doc in data.doc_ids} for qid in data.query_ids},
                          data.qrels, K)
    assert report["ndcg_at_10"] > 2 * chance["ndcg_at_10"] and report["recall_at_100"] == 1.0


@pytest.mark.slow
def test_prompts_and_split(minilm, pydoc_beir, report):
    no_prompt = e5lite.evaluate_retrieval(minilm, pydoc_beir, query_prompt="", passage_prompt="", k_values=(10,))
    assert no_prompt["query_prompt"] == "" and set(no_prompt) >= {"ndcg_at_10", "mrr_at_10"}
    assert "ndcg_at_5" not in no_prompt and no_prompt["ndcg_at_10"] != report["ndcg_at_10"]
    dev = e5lite.evaluate_retrieval(minilm, pydoc_beir, split="dev", k_values=(1, 10))
    assert dev["queries"] == 2 and dev["split"] == "dev"


def test_cli_prints_the_table_and_writes_the_report(minilm_dir, pydoc_beir, report, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["eval", "--model", str(minilm_dir), "--data", str(pydoc_beir), "--output", str(out),
                 "--query-prompt", "query: ", "--passage-prompt", "passage: "]) == 0
    stdout, stderr = capsys.readouterr()
    assert "prompts: queries 'query: ', passages 'passage: '" in stderr
    assert "| k | ndcg | map | recall | precision | mrr |" in stdout
    assert f"| 10 | {report['ndcg_at_10']:.5f} | {report['map_at_10']:.5f} |" in stdout
    written = json.loads(out.read_text())
    assert {k: written[k] for k in report if "_at_" in k} == pytest.approx({k: report[k] for k in report
                                                                           if "_at_" in k}, abs=1e-9)


@pytest.mark.slow
def test_precomputed_corpus_embeddings(minilm_dir, pydoc_beir, report, tmp_path):
    """e5lite embed --output DIR over the corpus (title + text, passage prompt, --id-field _id), then eval."""
    data = load_retrieval_data(pydoc_beir, "test")
    minilm_dir = linked_copy(minilm_dir, tmp_path / "e5-minilm")  # an E5 name: E5's prompts, as ``report``'s
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"_id": i, "doc": t}) + "\n"
                                                 for i, t in zip(data.doc_ids, data.doc_texts)))
    assert main(["embed", "--model", str(minilm_dir), "--input", str(tmp_path / "docs.jsonl"), "--field", "doc",
                 "--id-field", "_id", "--prompt-name", "passage", "--rows-per-shard", "25",
                 "--output", str(tmp_path / "emb")]) == 0
    enc = e5lite.load(minilm_dir)
    pre = e5lite.evaluate_retrieval(enc, pydoc_beir, corpus_embeddings=tmp_path / "emb")
    for key in report:
        if "_at_" in key:
            assert abs(pre[key] - report[key]) <= 1e-6, key
    # a run over other documents, or in another order, is refused
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"_id": i, "doc": t}) + "\n"
                                                 for i, t in zip(data.doc_ids[::-1], data.doc_texts[::-1])))
    assert main(["embed", "--model", str(minilm_dir), "--input", str(tmp_path / "docs.jsonl"), "--field", "doc",
                 "--id-field", "_id", "--output", str(tmp_path / "emb2")]) == 0
    with pytest.raises(e5lite.E5LiteError, match="first difference at row 0"):
        e5lite.evaluate_retrieval(enc, pydoc_beir, corpus_embeddings=tmp_path / "emb2")


@pytest.mark.parametrize("args, message", [
    (["--k", "10,x"], "--k must be positive integers"),
    (["--k", "0"], "--k must be positive integers"),
    (["--split", "train"], "no qrels for split 'train'"),
    (["--output", "/no/such/dir/r.json"], "output folder '/no/such/dir' does not exist"),
])
def test_cli_errors_are_one_line(tiny_dir, pydoc_beir, capsys, args, message):
    assert main(["eval", "--model", str(tiny_dir), "--data", str(pydoc_beir), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("e5lite: error:") and message in err and "\n" not in err, err
