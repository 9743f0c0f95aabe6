"""The Pallas flash-attention kernel (CPU interpret mode) against the plain-jnp reference.

Covers packed layouts (single-token segments, one full 512 segment, many short segments, unsorted ids),
right padding with and without segment ids, block skipping (visited key blocks counted by the kernel),
gradients through the reference-based VJP, input validation, and that the GPU (Triton) and TPU (Mosaic)
lowerings accept the kernel.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e5lite.kernels import flash_attention as fa

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def qkv(B, N, S, K, dtype=jnp.float32, seed=0):
    """Random q (pre-scaled), k, v; v in [-1, 1) keeps outputs below 1, where one bf16 ulp is <= 2**-8."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, N, S, K)).astype(np.float32) for _ in range(2))
    v = rng.uniform(-1, 1, (B, N, S, K)).astype(np.float32)
    q /= np.sqrt(K)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def packed(lengths, S):
    """Segment ids 1.. for consecutive sequences of the given lengths, 0 (padding) after them."""
    seg = np.zeros(S, np.int32)
    start = 0
    for i, n in enumerate(lengths):
        seg[start:start + n] = i + 1
        start += n
    assert start <= S
    return seg


def short_segments(S, seed, max_len=20, fill=0.9):
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while True:
        n = int(rng.integers(1, max_len + 1))
        if total + n > fill * S:
            return packed(lengths, S)
        lengths.append(n)
        total += n


def allowed_mask(B, S, key_valid, segment_ids):
    """numpy [B, S, T] allowed pairs, with the module's defaults."""
    if key_valid is None:
        key_valid = segment_ids > 0 if segment_ids is not None else np.ones((B, S), bool)
    allowed = np.broadcast_to(np.asarray(key_valid, bool)[:, None, :], (B, S, S))
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed


def check_against_reference(q, k, v, key_valid=None, segment_ids=None, **blocks):
    B, N, S, _ = q.shape
    out = fa.flash_attention(q, k, v, key_valid_BT=key_valid, segment_ids_BS=segment_ids, **blocks)
    ref = fa.reference_attention(q, k, v, key_valid_BT=key_valid, segment_ids_BS=segment_ids)
    assert out.shape == q.shape and out.dtype == q.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()  # padding rows too
    live = allowed_mask(B, S, key_valid, segment_ids).any(-1)  # [B, S] rows with an allowed key
    assert live.any()
    diff = np.abs(out - ref)[np.broadcast_to(live[:, None, :, None], out.shape)]
    assert diff.max() <= TOL[q.dtype.type], diff.max()
    return out, live


# One row per layout, so one compile covers them all.
S_MIXED = 128
MIXED_SEGMENTS = np.stack([
    packed([1] * S_MIXED, S_MIXED),                        # single-token segments
    packed([S_MIXED], S_MIXED),                            # one segment filling the row
    short_segments(S_MIXED, seed=1),                       # many short segments, trailing padding
    packed([77], S_MIXED),                                 # one segment, then padding
])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_layouts_match_reference(dtype):
    """Segment ids plus an explicit key_valid, as the model passes AttentionMask(key_valid, segment_ids)."""
    key_valid = MIXED_SEGMENTS > 0
    key_valid[2, 70:] = False  # masks part of a row's last segment, not just its padding
    q, k, v = qkv(4, 2, S_MIXED, 32, dtype)
    out, _ = check_against_reference(q, k, v, key_valid=key_valid, segment_ids=MIXED_SEGMENTS,
                                     block_q=32, block_k=32)
    # Single-token segments attend only to themselves.
    np.testing.assert_allclose(out[0], np.asarray(v[0], np.float32), atol=TOL[dtype])
    # Rows with no allowed key (padding) are zeros in the kernel.
    assert not out[3, :, 77:].any()


# Full-length rows: one 512-token sequence, and many short ones (key_valid derived: segment_ids > 0).
SEGMENTS_512 = np.stack([packed([512], 512), short_segments(512, seed=2, max_len=24, fill=0.97)])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_512_rows_match_reference(dtype):
    """Default 128 blocks, head_dim 64."""
    q, k, v = qkv(2, 2, 512, 64, dtype, seed=3)
    check_against_reference(q, k, v, segment_ids=SEGMENTS_512)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_padding_only_matches_reference(dtype):
    lengths = [128, 37, 5, 64]
    key_valid = np.arange(128)[None, :] < np.array(lengths)[:, None]
    q, k, v = qkv(4, 2, 128, 32, dtype, seed=5)
    check_against_reference(q, k, v, key_valid=key_valid, block_q=32, block_k=64)


def test_ragged_length_and_unsorted_ids_match_reference():
    """S = 200 is not a multiple of the blocks (padded inside); ids repeat non-contiguously."""
    rng = np.random.default_rng(6)
    segments = rng.integers(0, 4, size=(2, 200)).astype(np.int32)
    segments[1] = np.repeat([3, 1, 2, 1, 0], 40)
    q, k, v = qkv(2, 2, 200, 32, seed=7)
    check_against_reference(q, k, v, segment_ids=segments, block_q=64, block_k=32)
    # No mask at all, on a tiny sequence shorter than any block: padded keys 13..15 must stay masked.
    q, k, v = qkv(2, 1, 13, 16, seed=8)
    check_against_reference(q, k, v)


def brute_force_needed(allowed_BST, block_q, block_k):
    B, S, T = allowed_BST.shape
    blocks = allowed_BST.reshape(B, S // block_q, block_q, T // block_k, block_k)
    return blocks.any(axis=(2, 4))


def test_block_skipping_many_short_segments():
    """Same shapes and blocks as test_512_rows_match_reference (one compile for both)."""
    S, bq, bk = 512, 128, 128
    segments = SEGMENTS_512
    needed = np.asarray(fa.block_needed(segments > 0, segments, block_q=bq, block_k=bk))
    # Contiguous increasing segments: needed is exactly the block pairs that hold an allowed pair.
    np.testing.assert_array_equal(needed, brute_force_needed(allowed_mask(2, S, None, segments), bq, bk))
    assert needed[0].all()  # the full-length row needs everything
    assert needed[1].sum() <= 4 + 2 * 3, needed[1]  # short segments: the diagonal plus a few straddlers

    q, k, v = qkv(2, 2, S, 64, seed=11)
    out, visits = fa.flash_attention_visits(q, k, v, segment_ids_BS=segments, block_q=bq, block_k=bk)
    # The kernel computed exactly the needed key blocks for every (row, head, query block) ...
    np.testing.assert_array_equal(np.asarray(visits), np.broadcast_to(needed.sum(-1)[:, None], (2, 2, S // bq)))
    # ... and skipping them changed nothing.
    ref = fa.reference_attention(q, k, v, segment_ids_BS=segments)
    live = np.broadcast_to((segments > 0)[:, None, :, None], q.shape)
    assert np.abs(np.asarray(out - ref))[live].max() <= 1e-5


def test_block_skipping_padding_and_unsorted_ids():
    # Right padding without segments: key blocks past the length are skipped; fully padded rows do nothing.
    lengths = np.array([70, 256, 0])
    key_valid = np.arange(256)[None, :] < lengths[:, None]
    q, k, v = qkv(3, 1, 256, 32, seed=12)
    out, visits = fa.flash_attention_visits(q, k, v, key_valid_BT=key_valid, block_q=64, block_k=64)
    np.testing.assert_array_equal(np.asarray(visits)[:, 0], [[2] * 4, [4] * 4, [0] * 4])
    assert not np.asarray(out)[2].any()

    # Arbitrary (non-contiguous) ids: the range test is conservative, never misses an allowed pair.
    segments = np.random.default_rng(13).integers(0, 6, size=(2, 256)).astype(np.int32)
    segments[:, :128] = np.sort(segments[:, :128])
    needed = np.asarray(fa.block_needed(segments > 0, segments, block_q=32, block_k=32))
    exact = brute_force_needed(allowed_mask(2, 256, None, segments), 32, 32)
    assert (needed | ~exact).all()


def test_gradients_match_reference():
    segments = np.stack([packed([20, 9, 25], 64), packed([64], 64)])
    key_valid = segments > 0
    q, k, v = qkv(2, 2, 64, 32, seed=14)
    w = jnp.asarray(np.random.default_rng(15).standard_normal(q.shape), jnp.float32)
    live = jnp.asarray(key_valid)[:, None, :, None]

    def loss(attn):
        def f(q, k, v):
            out = attn(q, k, v, key_valid_BT=key_valid, segment_ids_BS=segments)
            return jnp.sum(jnp.where(live, out * w + out ** 2, 0.0))
        return f

    flash = lambda *a, **kw: fa.flash_attention(*a, block_q=32, block_k=32, **kw)
    got = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(fa.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert np.abs(np.asarray(g - r)).max() <= 1e-5


B, N, S, K = 2, 2, 64, 32


@pytest.mark.parametrize("change, message", [
    (dict(block_q=100), r"block_q=100 must be a multiple of 8"),
    (dict(block_k=12), r"block_k=12 must be a multiple of 8"),
    (dict(block_q=0), r"block_q=0 must be a positive int"),
    (dict(block_k=32.0), r"block_k=32.0 must be a positive int"),
    (dict(block_q=48, backend="gpu", interpret=True), r"block_q=48 must be a power of two"),
    (dict(k=(B, N, S + 8, K)), r"same shape"),
    (dict(q=(B, S, K)), r"q_BNSK must be 4-D"),
    (dict(q=(B, N, S, 48), k=(B, N, S, 48), v=(B, N, S, 48)), r"head_dim=48 is not supported"),
    (dict(dtype=jnp.float16), r"float32 / bfloat16"),
    (dict(segment_ids_BS=np.ones((B, S + 1), np.int32)), r"segment_ids_BS must have shape \[B, S\]"),
    (dict(segment_ids_BS=np.ones((B, S), np.float32)), r"segment_ids_BS must be integer"),
    (dict(key_valid_BT=np.ones((S,), bool)), r"key_valid_BT must have shape \[B, T\]"),
    (dict(backend="cpu", interpret=False), r"backend='cpu' has no compiled Pallas lowering"),
    (dict(backend="metal"), r"backend='metal' is not supported"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    change = dict(change)
    dtype = change.pop("dtype", jnp.float32)
    shapes = {name: change.pop(name, (B, N, S, K)) for name in "qkv"}
    arrays = [jnp.zeros(shapes[name], dtype) for name in "qkv"]
    with pytest.raises(ValueError, match=message):
        fa.flash_attention(*arrays, **change)


@pytest.mark.parametrize("platform, call", [("cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu_custom_call")])
def test_gpu_and_tpu_lowerings_accept_the_kernel(platform, call):
    """Cross-lowers (no device needed) through Pallas' Triton / Mosaic lowering: every primitive and
    shape in the kernel body is accepted. Compiling and running there is not covered on CPU."""
    backend = "gpu" if platform == "cuda" else "tpu"
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.zeros((2, 2, 384, 64), dtype)  # 384: three key blocks, a non-power-of-two length
        f = jax.jit(lambda x, s: fa.flash_attention(x, x, x, segment_ids_BS=s, backend=backend))
        text = f.trace(x, jnp.ones((2, 384), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()
        assert call in set(re.findall(r"custom_call @?([\w$.]+)", text))
