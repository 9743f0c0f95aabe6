"""Compact vectors (``e5lite/quantize.py``, ``encode(precision=..., truncate_dim=...)``) against
sentence-transformers' ``quantize_embeddings`` and ``encode(truncate_dim=...)`` on real text (the openings of
Python's reference docs) with the real all-MiniLM-L6-v2, whose pipeline ends in a Normalize module."""

from __future__ import annotations

import numpy as np
import pytest
from pydoc_beir import QUERIES, documents

from e5lite.quantize import PRECISIONS, quantize_embeddings, truncate

TEXTS = [d["text"][:300] for d in documents()[:40]] + [q for _, q, _, _ in QUERIES]  # 40 + 32 real texts


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def st_vectors(st_model):
    """sentence-transformers' vectors of TEXTS: normalised (the model's Normalize module) and without it."""
    from sentence_transformers import SentenceTransformer
    st_raw = SentenceTransformer(modules=[st_model[0], st_model[1]], device="cpu")
    return st_model.encode(TEXTS), st_raw.encode(TEXTS)


@pytest.fixture(scope="module")
def vectors(minilm):
    """e5lite's normalised and un-normalised vectors of TEXTS."""
    return minilm.encode(TEXTS), minilm.encode(TEXTS, normalize=False)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_equals_sentence_transformers_on_the_same_vectors(vectors, precision):
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    emb, raw = vectors
    calib, x = emb[:60], emb[60:]
    ranges = np.stack([emb.min(0) - 0.01, emb.max(0) + 0.01])
    for kw in ({}, {"calibration_embeddings": calib}, {"ranges": ranges}, {"ranges": ranges[:, :100]}):
        xs = x[:, :100] if "ranges" in kw and kw["ranges"].shape[1] == 100 else x
        for v in (xs, raw[60:, :xs.shape[1]], xs[0] if kw else xs[:2]):
            want = st_quantize(v, precision, **kw)
            got = quantize_embeddings(v, precision, **kw)
            assert got.dtype == want.dtype and got.shape == want.shape, (precision, kw)
            np.testing.assert_array_equal(got, want)


def test_binary_layout(vectors):
    emb = vectors[0][:5]
    bits = np.unpackbits(quantize_embeddings(emb, "ubinary"), axis=-1)[:, :emb.shape[1]]
    np.testing.assert_array_equal(bits, emb > 0)
    assert quantize_embeddings(emb, "ubinary").shape == (5, 48)
    np.testing.assert_array_equal(quantize_embeddings(emb, "binary").view(np.uint8) ^ 0x80,
                                  quantize_embeddings(emb, "ubinary"))  # binary = ubinary - 128
    assert quantize_embeddings(emb[:, :10], "ubinary").shape == (5, 2)  # the last byte zero-padded
    for p, dtype, width in (("int8", np.int8, 384), ("uint8", np.uint8, 384), ("binary", np.int8, 48)):
        out = quantize_embeddings(np.zeros((0, 384), np.float32), p)
        assert out.shape == (0, width) and out.dtype == dtype


def test_encode_equals_sentence_transformers_encode(minilm, st_model, st_vectors, vectors):
    """The whole path. ST's ``encode(precision=p)`` is ``quantize_embeddings`` of its float vectors (checked on
    a few texts; the rest reuses its vectors). Vectors differ by ~1e-7, so a value on a bucket edge (or a sign
    near 0) may land one step over: count how often."""
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    few = st_model.encode(TEXTS[:8], precision="int8")
    np.testing.assert_array_equal(few, st_quantize(st_model.encode(TEXTS[:8]), "int8"))
    report = []
    for precision in PRECISIONS:
        want = st_quantize(st_vectors[0], precision)
        # encode() for one of each pair; the other from e5lite's float vectors (the same path, less time)
        got = (minilm.encode(TEXTS, precision=precision) if precision in ("int8", "binary")
               else quantize_embeddings(vectors[0], precision))
        assert got.dtype == want.dtype and got.shape == want.shape
        if precision == "float32":
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            continue
        if precision.endswith("binary"):
            got, want = np.unpackbits(got.view(np.uint8), axis=-1), np.unpackbits(want.view(np.uint8), axis=-1)
        step = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert step.max() <= 1, precision
        report.append(f"{precision}: {int(step.sum())} of {step.size}")
        assert step.sum() <= 2e-3 * step.size, report  # rare: a value within ~1e-7 of an edge
    print("values one step off sentence-transformers:", "; ".join(report))


@pytest.mark.parametrize("dim", [32, 128, 384])
def test_truncate_dim_equals_sentence_transformers(minilm, st_model, st_vectors, vectors, dim):
    few = TEXTS[:8]
    got = minilm.encode(TEXTS, truncate_dim=dim)
    # normalize=True: cut, then unit length (ST's normalize_embeddings=True)
    np.testing.assert_allclose(got[:8], st_model.encode(few, truncate_dim=dim, normalize_embeddings=True),
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(got, truncate(st_vectors[1], dim, normalize=True), atol=1e-5, rtol=0)
    # ST's default with the Normalize module: the first components of the unit vector
    np.testing.assert_allclose(truncate(vectors[0][:8], dim, normalize=False), st_model.encode(few, truncate_dim=dim),
                               atol=1e-5, rtol=0)
    # normalize=False: the pooled vector cut (ST without its Normalize module)
    raw = minilm.encode(TEXTS, truncate_dim=dim, normalize=False)
    np.testing.assert_allclose(raw, st_vectors[1][:, :dim], atol=1e-5, rtol=0)


def test_truncate_dim_then_precision(minilm, st_vectors, vectors):
    from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    got = minilm.encode(TEXTS, truncate_dim=64, precision="uint8", calibration_embeddings=vectors[0][:50, :64])
    manual = quantize_embeddings(truncate(vectors[0], 64, True), "uint8",
                                 calibration_embeddings=vectors[0][:50, :64])
    assert got.shape == (len(TEXTS), 64) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - manual).max() <= 1
    want = st_quantize(truncate(st_vectors[1], 64, normalize=True), "uint8",
                       calibration_embeddings=vectors[0][:50, :64])
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 2e-3
    # one text needs ranges for int8/uint8, as in ST; with them it works
    ranges = np.stack([vectors[0].min(0), vectors[0].max(0)])
    assert minilm.encode(TEXTS[0], precision="int8", ranges=ranges[:, :100], truncate_dim=100).shape == (100,)
    assert minilm.encode(TEXTS[0], precision="ubinary", truncate_dim=100).shape == (13,)
    assert minilm.encode([], precision="int8").shape == (0, 384)


def test_bad_arguments(minilm, vectors):
    emb = vectors[0]
    with pytest.raises(ValueError, match="precision must be one of 'float32', 'int8', 'uint8', 'binary', 'ubinary', "
                                         "got 'int4'"):
        minilm.encode(["a", "b"], precision="int4")
    with pytest.raises(ValueError, match="precision must be one of"):
        quantize_embeddings(emb, "float16")
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 384\) .*got shape \(2, 100\)"):
        minilm.encode(["a", "b"], precision="int8", ranges=np.zeros((2, 100)))
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 64\) .*got shape \(2, 384\)"):
        minilm.encode(["a", "b"], precision="int8", ranges=np.zeros((2, 384)), truncate_dim=64)
    with pytest.raises(ValueError, match=r"ranges\[0\] \(the minimum\) is above ranges\[1\] .* dimension 3"):
        bad = np.stack([emb.min(0), emb.max(0)])
        bad[0, 3] = 2
        quantize_embeddings(emb, "uint8", ranges=bad)
    with pytest.raises(ValueError, match="ranges must hold finite numbers"):
        quantize_embeddings(emb, "int8", ranges=np.full((2, 384), np.nan))
    with pytest.raises(ValueError, match=r"calibration_embeddings must have shape \(n >= 1, 384\), got shape \(384,\)"):
        quantize_embeddings(emb, "int8", calibration_embeddings=emb[0])
    with pytest.raises(ValueError, match="int8' of a single text needs ranges"):
        minilm.encode("one text", precision="int8")
    with pytest.raises(ValueError, match="cannot compute uint8 quantization ranges from a single embedding"):
        quantize_embeddings(emb[:1], "uint8")
    with pytest.raises(TypeError, match="embeddings to quantize must be float, got dtype int8"):
        quantize_embeddings(quantize_embeddings(emb, "int8"), "int8")
    for bad, err, msg in ((0, ValueError, "between 1 and the embedding dimension 384, got 0"),
                          (385, ValueError, "between 1 and the embedding dimension 384, got 385"),
                          (True, TypeError, "truncate_dim must be an int or None, got bool"),
                          (64.0, TypeError, "truncate_dim must be an int or None, got float")):
        with pytest.raises(err, match=msg):
            minilm.encode(["a"], truncate_dim=bad)
        with pytest.raises(err, match=msg):
            truncate(emb, bad, normalize=True)
