"""Numerics and layout helpers (numerics.py) shared by attention and the projections."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from e5lite.numerics import in_memory, precision, swapped_in_memory


def test_precision_rule():
    assert precision(jnp.float32) == lax.Precision.HIGHEST
    assert precision(jnp.bfloat16) is None and precision(jnp.float16) is None


def test_moves_in_memory_keep_values():
    x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(swapped_in_memory(x), jnp.swapaxes(x, -1, -2))
    np.testing.assert_array_equal(swapped_in_memory(x[0, 0]), x[0, 0].T)
    view = x.transpose(0, 2, 1, 3)  # as q, k, v are cut from the fused projection
    np.testing.assert_array_equal(in_memory(view), view)
