"""Numerics and memory-layout helpers shared by attention (attention.py) and the projections (matmul.py).

Neither module owns them: both multiply with the same precision rule and both write their backward passes
with operands moved in memory first, for the reason matmul.py's docstring gives (XLA:CPU's fast bfloat16
kernels take only row-major operands contracting the left one's last axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# what the array functions take: a device (jax) or host (numpy) array
HostOrDeviceArray = jax.Array | np.ndarray


def precision(dtype):
    """Matmul precision: fp32 weights promise fp32 results, so stop TPUs (bf16 passes) and GPUs (TF32) from
    cutting it."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def swapped_in_memory(x):
    """x with its last two axes swapped, really moved in memory on CPUs: flattening the swapped view forces the
    copy, and the barriers keep XLA from folding it back into the consumer as a transposed operand, or into a
    dot producing x as a transposed output (no fast kernel takes either). Axes before the last two stay major,
    so attention's batch axis, split over devices, stays split (a matrix's rows do not: see matmul.py). Other
    compilers lay out dots freely: there it is a plain swap."""
    if jax.default_backend() != "cpu":
        return jnp.swapaxes(x, -1, -2)
    *lead, a, b = x.shape
    x = lax.optimization_barrier(x)
    return lax.optimization_barrier(jnp.swapaxes(x, -1, -2).reshape(-1)).reshape(*lead, b, a)


def in_memory(x):
    """x laid out row-major as its shape says: a transposed view (q, k, v cut from the fused QKV) is copied."""
    if jax.default_backend() != "cpu":
        return x
    return lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)
