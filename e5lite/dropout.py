"""Training-time dropout: inverted dropout whose masks are hashed from element counters.

A module of its own because two modules drop: attention.py (the attention probabilities, forward and inside
its hand-written backward pass, which must redraw the same mask) and model.py (the embeddings and each
sublayer's output). model.py imports attention.py, so the masks cannot live in model.py without an import
cycle, and they are no part of attention. ``model.Dropout`` (where BERT drops, at which rates) stays with the
model; this module only draws and applies masks.

The masks: Threefry-2x32 (the hash behind jax.random) of element counters, written out unrolled. On CPUs
jax.random lowers the hash as a rolled loop that XLA cannot fuse into its consumer, so every mask is written
to memory and read back, a large share of a training step; unrolled, hash, comparison and select are one
fused loop (BENCHMARKS.md, "Training speed"). Each hash gives 64 bits, four 16-bit uniforms: ``rate`` is
resolved to 1/65536 (0.1 -> 0.100006).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DROPOUT_BITS = 16
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k0, k1, x0, x1):
    """The Threefry-2x32 block cipher (20 rounds; Salmon et al. 2011) of counters (x0, x1) under key (k0, k1),
    all uint32; equal to ``jax.extend.random.threefry_2x32`` bit for bit."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
        x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def dropout_bits(rng, shape):
    """uint16 uniforms of ``shape`` (its last axis a multiple of 4) from a PRNG key: one hash per 4 elements."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    *lead, last = shape
    counter = lax.iota(jnp.uint32, math.prod(lead) * (last // 4)).reshape(*lead, last // 4)
    y0, y1 = threefry2x32(rng[0], rng[1], counter, jnp.zeros_like(counter))
    return lax.bitcast_convert_type(jnp.concatenate([y0, y1], axis=-1), jnp.uint16).reshape(shape)


def drop(x, rng, rate: float):
    """Inverted dropout: each element zeroed with probability ``rate``, the rest scaled by 1 / (1 - rate)."""
    if not rate:
        return x
    if x.shape[-1] % 4:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    else:
        keep = dropout_bits(rng, x.shape) >= round(rate * 2**DROPOUT_BITS)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
