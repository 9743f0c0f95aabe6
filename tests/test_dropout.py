"""Dropout (dropout.py): the unrolled Threefry-2x32 against jax's, and the masks' rate, scale and keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_threefry_equals_jax():
    from jax.extend.random import threefry_2x32

    from e5lite.dropout import threefry2x32
    key = jax.random.PRNGKey(12345)
    x0 = jnp.arange(5000, dtype=jnp.uint32) * np.uint32(2654435761)
    x1 = jnp.arange(5000, dtype=jnp.uint32)[::-1]
    want = threefry_2x32(key, jnp.concatenate([x0, x1]))
    np.testing.assert_array_equal(jnp.concatenate(threefry2x32(key[0], key[1], x0, x1)), want)


@pytest.mark.parametrize("shape", [(48, 8, 256), (7, 333)])  # the second takes jax.random.bernoulli (odd width)
def test_dropout_rate_scale_and_key(shape):
    from e5lite.dropout import drop
    x = jnp.ones(shape, jnp.float32)
    a = np.asarray(drop(x, jax.random.PRNGKey(0), 0.1))
    n = a.size
    dropped = (a == 0).mean()
    assert abs(dropped - 0.1) <= 4 * (0.1 * 0.9 / n) ** 0.5, dropped  # binomial: within 4 sigma
    np.testing.assert_allclose(a[a != 0], 1 / 0.9, rtol=1e-6)
    np.testing.assert_array_equal(a, drop(x, jax.random.PRNGKey(0), 0.1))
    assert (a != np.asarray(drop(x, jax.random.PRNGKey(1), 0.1))).mean() > 0.1
    # rows are not copies of each other (the counter runs over the whole array)
    rows = a.reshape(-1, shape[-1])
    assert len({r.tobytes() for r in rows}) == len(rows)
