"""The encoder's projections (activations times a weight matrix) and their backward pass.

Forward: ``project`` is one einsum. Backward: a custom VJP, because what autodiff emits runs slowly on
XLA:CPU. Its kernel library (YNNPACK) multiplies bfloat16 operands on the CPU's matrix units (AMX, AVX512-
BF16) only when the left operand contracts its last axis and both are row-major; other bfloat16 dots are
widened to float32 and run on the generic kernel, far slower. Autodiff writes the weight
gradient as ``x^T g`` (contracting the token axis of both: the left operand is transposed), which is that
case. Here the narrower of ``x`` and ``g`` is first transposed in memory (a copy XLA cannot fold back into
the dot: it is flattened behind an optimization barrier), so every dot of the backward pass is one the fast
kernels take. Float32 gains too: autodiff transposes the gradient, which for the query/key/value projection is
three times wider than its input. Other backends than CPU, and several devices (data parallel), keep autodiff's
dots.
BENCHMARKS.md has the measurements ("Training speed").

The gradients are the same sums in another order: float32 results equal autodiff's to rounding, bfloat16
operands accumulate in float32 as before.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .int8 import project_int8
from .numerics import precision, swapped_in_memory
from .params import QuantizedWeight


def _narrow(*dtypes):
    """The operand dtype of a product: the narrowest of the inputs' (bfloat16 weights or activations win)."""
    return min(dtypes, key=lambda d: jnp.dtype(d).itemsize)


def _einsum(spec: str, x, w, b):
    if isinstance(w, QuantizedWeight):  # weights="int8": int8 operands, int32 accumulation (int8.py)
        return project_int8(spec, x, w, b)
    op = _narrow(x.dtype, w.dtype)
    if op == x.dtype == w.dtype:
        return jnp.einsum(spec, x, w, precision=precision(x.dtype)) + b
    # Mixed: bfloat16 weights under float32 activations (``weights="bfloat16"``: at batch 1 the forward is bound
    # by reading the weights; this reads half the bytes while the result stays float32), or float32 master
    # weights under bfloat16 activations (training in bfloat16). The operands are the narrow dtype, the
    # accumulation and the bias float32, the result the activations' dtype.
    out = jnp.einsum(spec, x.astype(op), w.astype(op), preferred_element_type=jnp.float32)
    return (out + b.astype(jnp.float32)).astype(x.dtype)


def _dims(spec: str, x, w):
    """(M, K, N) of the spec as a matrix product [M, K] x [K, N], or None when its axes are not laid out so."""
    ins, out = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    contracted = "".join(c for c in xs if c in ws and c not in out)
    kept, made = xs[: len(xs) - len(contracted)], ws[len(contracted) :]
    if xs != kept + contracted or ws != contracted + made or out != kept + made:
        return None
    k = math.prod(w.shape[: len(contracted)])
    return x.size // k, k, w.size // k


def _dot(a, b, contract: tuple[int, int], op):
    return lax.dot_general(
        a.astype(op),
        b.astype(op),
        ((contract[:1], contract[1:]), ((), ())),
        precision=precision(op),
        preferred_element_type=jnp.float32,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def project(spec: str, x, w, b):
    """``einsum(spec, x, w) + b``: x's leading axes kept, its trailing axes contracted with w's leading ones."""
    return _einsum(spec, x, w, b)


def _project_fwd(spec, x, w, b):
    if isinstance(w, QuantizedWeight):
        raise ValueError(
            "int8 weights (weights='int8') are quantised for inference and cannot be trained: "
            "differentiate float32 weights (load with weights=None)"
        )
    return _einsum(spec, x, w, b), (x, w, b)


def _project_bwd(spec, res, g):
    x, w, b = res
    dims = _dims(spec, x, w)
    op = _narrow(x.dtype, w.dtype)
    # autodiff's own dots off CPUs (other compilers lay out dots freely) and over several devices: there the
    # rows are split between devices, and a transposed copy of [rows, K] cannot stay split (XLA would gather
    # every device's activations instead of summing the devices' weight gradients)
    if dims is None or jax.default_backend() != "cpu" or jax.device_count() > 1:
        _, vjp = jax.vjp(functools.partial(_einsum, spec), x, w, b)
        return vjp(g)
    M, K, N = dims
    x2, g2, w2 = x.reshape(M, K).astype(op), g.reshape(M, N).astype(op), w.reshape(K, N)
    dx = _dot(g2, w2, (1, 1), op)  # g w^T: both contract their last axis
    if K <= N:
        dw = _dot(swapped_in_memory(x2), g2, (1, 0), op)  # x^T [K, M] . g [M, N]
    else:  # transpose the narrower g instead, then the small [N, K] result
        dw = swapped_in_memory(_dot(swapped_in_memory(g2), x2, (1, 0), op))
    # the bias gradient summed in float32: XLA:CPU sums bfloat16 through a slow pairwise reduce-window
    db = jnp.sum(g2.astype(jnp.float32), axis=0)
    return (
        dx.astype(x.dtype).reshape(x.shape),
        dw.astype(w.dtype).reshape(w.shape),
        db.astype(b.dtype).reshape(b.shape),
    )


project.defvjp(_project_fwd, _project_bwd)
