"""Parity of every attention implementation that runs on this backend, in float32 and bfloat16, against
sentence-transformers (float32, CPU) on the real MiniLM: XLA and Pallas everywhere (Pallas interpreted on a
CPU, Mosaic on TPU, Triton on GPU), cuDNN where JAX has a GPU. tools/device_check.sh runs it on a device."""

from __future__ import annotations

import numpy as np
import pytest

import e5lite
from conftest import TEXTS
from e5lite.errors import E5LiteError

# on a CPU these repeat test_attention.py / test_parity.py; the device check (tools/device_check.sh) is their use
pytestmark = pytest.mark.slow

MIN_COS = {"float32": 0.9999, "bfloat16": 0.999}  # f32 leaves room for TF32 matmuls on a GPU


@pytest.fixture(scope="module")
def st_reference(minilm_dir):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    return st.encode(TEXTS, batch_size=4, normalize_embeddings=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "pallas", "cudnn"])
def test_impl_matches_sentence_transformers(minilm_dir, st_reference, impl, dtype):
    try:
        enc = e5lite.load(minilm_dir, attention_impl=impl, dtype=dtype)
    except E5LiteError as e:
        if "not available" in str(e):
            pytest.skip(f"{impl} / {dtype} here: {e}")
        raise
    got = enc.encode(TEXTS, batch_size=4)
    assert got.dtype == np.float32 and got.shape == st_reference.shape
    cos = (got * st_reference).sum(1)
    assert cos.min() >= MIN_COS[dtype], (impl, dtype, cos.min())
