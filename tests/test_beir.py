"""beir.py: reading BEIR folders, and one-line errors naming the file and line for bad data."""

from __future__ import annotations

import shutil

import pytest

from e5lite.beir import load_retrieval_data
from e5lite.errors import InputError


def test_reads_the_pydoc_set(pydoc_beir):
    data = load_retrieval_data(pydoc_beir, "test")
    assert len(data.doc_ids) == 79 and len(data.query_ids) == 30  # q31 and q32 have only dev qrels
    assert data.doc_texts[data.doc_ids.index("assert")].startswith('The "assert" statement Assert statements')
    assert data.qrels["q4"] == {"break": 2, "for": 1, "while": 1, "continue": 0}
    assert load_retrieval_data(pydoc_beir, "dev").query_ids == ["q31", "q32"]


@pytest.fixture
def beir(pydoc_beir, tmp_path):
    return shutil.copytree(pydoc_beir, tmp_path / "beir")


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _append(d / "corpus.jsonl", '{"title": "t", "text": "no id"}\n'), r"corpus.jsonl line 80 \(byte"),
    (lambda d: _append(d / "corpus.jsonl", '{"title": "t", "text": "no id"}\n'), "no '_id'"),
    (lambda d: _append(d / "corpus.jsonl", '{"_id": "assert", "text": "again"}\n'), "'_id' 'assert' appears twice"),
    (lambda d: _append(d / "corpus.jsonl", '{"_id": "x", "title": "only a title"}\n'), "'text' is missing"),
    (lambda d: _append(d / "queries.jsonl", '{"_id": "q99", "text": 5}\n'), r"queries.jsonl line 33 \(byte"),
    (lambda d: _append(d / "queries.jsonl", "{oops\n"), "not valid JSON"),
    (lambda d: _append(d / "qrels" / "test.tsv", "q1\tno-such-doc\t1\n"),
     "test.tsv line 60: document 'no-such-doc' is not in corpus.jsonl"),
    (lambda d: _append(d / "qrels" / "test.tsv", "q404\ttry\t1\n"), "line 60: query 'q404' is not in queries.jsonl"),
    (lambda d: _append(d / "qrels" / "test.tsv", "q1\ttry\n"), "line 60: expected 3 tab-separated columns"),
    (lambda d: _append(d / "qrels" / "test.tsv", "q1\ttry\thigh\n"), "line 60: score 'high' is not an integer"),
    (lambda d: (d / "corpus.jsonl").write_text("\n"), "corpus.jsonl has no documents"),
    (lambda d: (d / "qrels" / "test.tsv").unlink(), r"no qrels for split 'test'.*\(splits here: dev\)"),
    (lambda d: (d / "queries.jsonl").unlink(), "no queries.jsonl in"),
    (lambda d: (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"), "test.tsv has no judgements"),
])
def test_bad_data_is_named(beir, mutate, message):
    mutate(beir)
    with pytest.raises(InputError, match=message) as e:
        load_retrieval_data(beir, "test")
    assert "\n" not in str(e.value)


def test_missing_folder():
    with pytest.raises(InputError, match="data folder '/no/such/beir' does not exist"):
        load_retrieval_data("/no/such/beir")
