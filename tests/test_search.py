"""search.py: exact top-k by corpus blocks, against numpy on the full score matrix; embeddings folders;
several devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import e5lite
from e5lite.shards import embed_corpus


def numpy_top_k(q, c, k, metric="cosine"):
    """The reference: the full [q, n] score matrix, a stable argsort (equal scores: lower index first)."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    full = q.astype(np.float64) @ c.astype(np.float64).T
    idx = np.argsort(-full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, idx, 1), idx


def corpus_with_ties(n=1000, d=24, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, d)).astype(np.float32)
    for i in (i for i in (400, 401, 977) if i < n):  # duplicates of row 3: equal scores for every query
        c[i] = c[3]
    q = rng.standard_normal((37, d)).astype(np.float32)
    q[0] = c[3]
    return q, c


@pytest.mark.parametrize("metric", ["cosine", "dot"])
@pytest.mark.parametrize("block_rows", [7, 64, 100_000])
def test_equals_numpy_on_the_full_matrix(metric, block_rows):
    q, c = corpus_with_ties()
    scores, idx = e5lite.search(q, c, 25, metric=metric, block_rows=block_rows)
    want_s, want_i = numpy_top_k(q, c, 25, metric)
    assert scores.shape == idx.shape == (37, 25) and scores.dtype == np.float32 and idx.dtype == np.int64
    np.testing.assert_allclose(scores, want_s, atol=1e-5, rtol=0)
    # rankings agree wherever the reference's neighbours are not within float32 rounding of each other
    clear = np.abs(np.diff(want_s, axis=1)) > 1e-5
    assert (idx[:, :-1][clear] == want_i[:, :-1][clear]).all()
    assert idx[0, :4].tolist() == [3, 400, 401, 977]  # exact ties: the lower index first, across blocks


def test_k_past_the_corpus_and_empty_queries():
    q, c = corpus_with_ties(n=5)
    scores, idx = e5lite.search(q, c, 50)
    assert idx.shape == (37, 5) and sorted(idx[1].tolist()) == [0, 1, 2, 3, 4]
    assert e5lite.search(q[:0], c, 3)[1].shape == (0, 3)


def test_reads_an_embeddings_folder_shard_by_shard(tiny_dir, tmp_path):
    """A corpus written by e5lite embed --output DIR: the same results as its rows in memory."""
    from pydoc_beir import documents
    texts = [d["title"] + " " + d["text"] for d in documents()]
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n")
    enc = e5lite.load(tiny_dir)
    embed_corpus(enc, tmp_path / "corpus.txt", tmp_path / "emb", settings={}, rows_per_shard=10,
                 prompt_name="passage", show_progress=False)
    rows = e5lite.read_embeddings(tmp_path / "emb")
    queries = enc.encode_queries(["how do I catch an exception", "format a number", "exit a loop early"])
    from_folder = e5lite.search(queries, tmp_path / "emb", 10, block_rows=16)
    in_memory = e5lite.search(queries, rows, 10)
    np.testing.assert_array_equal(from_folder[1], in_memory[1])
    np.testing.assert_allclose(from_folder[0], in_memory[0], atol=1e-6, rtol=0)
    # a quantised folder holds ints or packed bits, not vectors to score: refused, naming the folder
    embed_corpus(enc, tmp_path / "corpus.txt", tmp_path / "emb8", settings={}, rows_per_shard=10,
                 prompt_name="passage", show_progress=False, precision="binary")
    with pytest.raises(ValueError, match="emb8 holds binary embeddings .* exact search needs float32 ones"):
        e5lite.search(queries, tmp_path / "emb8", 10)


@pytest.mark.parametrize("call, message", [
    (lambda q, c: e5lite.search(q, c, 0), "k must be a positive int"),
    (lambda q, c: e5lite.search(q, c, 3, metric="l2"), "metric must be one of"),
    (lambda q, c: e5lite.search(q[:, :5], c, 3), r"queries must be \[q, 24\]"),
    (lambda q, c: e5lite.search(q, c[0], 3), r"corpus must be a \[n, dim\] array"),
    (lambda q, c: e5lite.search(q, "/no/such/folder", 3), "no manifest.json"),
])
def test_bad_arguments(call, message):
    q, c = corpus_with_ties(n=10)
    with pytest.raises((ValueError, e5lite.E5LiteError), match=message):
        call(q, c)


def test_four_devices_equal_one(tmp_path):
    q, c = corpus_with_ties()
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "c.npy", c)
    script = f"""
        import jax, numpy as np, e5lite
        assert len(jax.local_devices()) == 4
        q, c = np.load({str(tmp_path / 'q.npy')!r}), np.load({str(tmp_path / 'c.npy')!r})
        s, i = e5lite.search(q, c, 25, block_rows=100)
        np.save({str(tmp_path / 's.npy')!r}, s)
        np.save({str(tmp_path / 'i.npy')!r}, i)
    """
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    scores, idx = e5lite.search(q, c, 25, block_rows=100)
    np.testing.assert_array_equal(np.load(tmp_path / "i.npy"), idx)
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), scores, atol=1e-6, rtol=0)
