"""tools/quality.py on the tiny model: its float32 row equals ``evaluate_retrieval`` on the same set, the
other precisions are compared with float32, and the docstring set is a valid BEIR folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import quality  # noqa: E402

from e5lite.beir import load_retrieval_data  # noqa: E402


def test_docstring_set_is_a_beir_folder(tmp_path):
    folder = quality.write_docstring_beir(tmp_path / "ds", max_pairs=30)
    data = load_retrieval_data(folder, "test")
    assert len(data.query_ids) == len(data.doc_ids) == 30
    assert all(data.qrels[q] == {q: 1} for q in data.query_ids)  # each summary's own body, and only it
    assert len(set(data.doc_texts)) == 30 and all(len(t.split()) >= 20 for t in data.doc_texts)


def test_quality_rows_against_evaluate_retrieval(tiny_dir, tiny, pydoc_beir, tmp_path, capsys):
    from e5lite.evaluate import evaluate_retrieval

    out = tmp_path / "rows.json"
    argv = ["--model", str(tiny_dir), "--weights", "int8", "--sets", "pydoc,docstrings", "--max-pairs", "25"]
    assert quality.main([*argv, "--json", str(out)]) == 0
    rows = {(r["set"], r["weights"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {(s, w) for s in ("pydoc", "docstrings") for w in ("float32", "int8")}
    want = evaluate_retrieval(tiny, pydoc_beir, k_values=(10, 100))
    ref = rows["pydoc", "float32"]
    assert ref["ndcg@10"] == pytest.approx(want["ndcg_at_10"], abs=1e-6)
    assert ref["mrr@10"] == pytest.approx(want["mrr_at_10"], abs=1e-6)
    assert ref["recall@100"] == pytest.approx(want["recall_at_100"], abs=1e-6)
    assert ref["min cos"] == pytest.approx(1, abs=1e-6) and ref["d ndcg@10"] == 0
    for s in ("pydoc", "docstrings"):
        r = rows[s, "int8"]
        assert r["d ndcg@10"] == pytest.approx(r["ndcg@10"] - rows[s, "float32"]["ndcg@10"], abs=1e-12)
        assert 0.9 < r["min cos"] <= r["median cos"] <= 1 + 1e-6
        assert r["passes"] == (abs(r["d ndcg@10"]) <= quality.BAR)
    assert "| pydoc (" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quality.main(["--model", str(tiny_dir), "--sets", "msmarco"])
