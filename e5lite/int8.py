"""int8 projections (``weights="int8"``): int8 x int8 products accumulated in int32, everything around them float32.

Weights are quantised once, at load (``quantize_layers``), symmetrically with one scale per output channel:
``q = round(w / s)`` with ``s = max |w| / 127`` over the input axes, so the largest weight of each output
channel is exactly +-127. Activations are quantised on every call with one scale and one zero point per token
(dynamic range: no calibration text), asymmetrically: the token's [min, max] (0 included) is cut into 255 steps,
``x ~= s_x (q_x - z_x)`` with ``q_x`` in [-128, 127], as ONNX Runtime's dynamic quantisation does. A GELU's
output (the FFN's second product) reaches only -0.17 below zero, so a symmetric range would waste half its
steps there; asymmetric ones halve the rounding error of those products (README, "int8 weights").
The product is one ``lax.dot_general`` with ``preferred_element_type=int32`` (exact: K * 128 * 127 stays
far below 2^31 for any BERT width), the zero point taken out in int32 (``z_x * sum q_w``, the sums stored
with the weights), then rescaled by ``s_x * s_w`` and the float32 bias added, in one elementwise pass.
Softmax, LayerNorm, GELU, pooling and the residual stream never see an int8 value: only the four projections
of each layer (query/key/value, attention output, FFN in, FFN out) take this path (``matmul.project``).

Why not qwix (Google's JAX quantization library): its post-training quantization rewrites Flax modules (it
intercepts their calls and depends on flax), while e5lite's forward is pure functions over a NamedTuple pytree;
the layer it would give us is this file's two functions.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from .params import FusedLayerParams, QuantizedWeight

QMAX = 127  # weights: symmetric, -128 never produced

# The input (contracted) axes of each matmul weight of a FusedLayerParams, after any leading layer axis.
INPUT_AXES = {"qkv_DCNK": 1, "o_NKD": 2, "ffn_in_DF": 1, "ffn_out_FD": 1}


def quantize_weight(w, in_axes: int, lead: int = 0) -> QuantizedWeight:
    """A float weight [lead..., in..., out...] (host or device array) as int8 with per-output-channel scales
    [lead..., out...]: ``lead`` leading axes (stacked layers) kept, the next ``in_axes`` reduced."""
    xp = np if isinstance(w, np.ndarray) else jnp
    w32 = w.astype(np.float32)
    axes = tuple(range(lead, lead + in_axes))
    scale = xp.max(xp.abs(w32), axis=axes, keepdims=True) / np.float32(QMAX)
    safe = xp.where(scale > 0, scale, np.float32(1))  # an all-zero channel stays zero
    q = xp.clip(xp.round(w32 / safe), -QMAX, QMAX).astype(np.int8)
    qsum = xp.sum(q.astype(np.int32), axis=axes)
    return QuantizedWeight(q, xp.squeeze(scale, axis=axes).astype(np.float32), qsum)


def dequantize(w: QuantizedWeight, in_axes: int, lead: int = 0):
    """``q * scale`` in float32: the weight the int8 one stands for."""
    xp = np if isinstance(w.q, np.ndarray) else jnp
    scale = xp.expand_dims(w.scale, tuple(range(lead, lead + in_axes)))
    return w.q.astype(np.float32) * scale


def quantize_layers(layers: FusedLayerParams, lead: int) -> FusedLayerParams:
    """The four matmul weights of (stacked, ``lead`` = 1) layers as ``QuantizedWeight``; the rest unchanged."""
    fields: dict[str, Any] = {f: quantize_weight(getattr(layers, f), n, lead) for f, n in INPUT_AXES.items()}
    return layers._replace(**fields)


def dequantize_layers(layers: FusedLayerParams, lead: int) -> FusedLayerParams:
    """``quantize_layers`` undone as far as it can be: float32 weights ``q * scale`` (quantising these again
    gives the same int8 weights and scales)."""
    fields: dict[str, Any] = {
        f: dequantize(getattr(layers, f), n, lead)
        for f, n in INPUT_AXES.items()
        if isinstance(getattr(layers, f), QuantizedWeight)
    }
    return layers._replace(**fields)


def quantize_rows(x, in_axes: int = 1):
    """Activations [..., in...] -> int8 values, float32 scales and int32 zero points [..., 1...] (one per
    token: the trailing ``in_axes`` reduced), ``x ~= scale * (q - zero)``. All-zero rows get scale 0."""
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - in_axes, x.ndim))
    lo = jnp.minimum(jnp.min(x32, axis=axes, keepdims=True), 0.0)  # 0 in range: exact zeros stay exact
    hi = jnp.maximum(jnp.max(x32, axis=axes, keepdims=True), 0.0)
    scale = (hi - lo) * np.float32(1 / 255)
    inv = jnp.where(scale > 0, 1.0 / scale, 0.0)  # a multiply per element rather than a divide
    zero = jnp.round(-lo * inv) - 128
    q = jnp.clip(jnp.round(x32 * inv) + zero, -128, 127).astype(jnp.int8)
    return q, scale, zero.astype(jnp.int32)


def project_int8(spec: str, x, w: QuantizedWeight, b):
    """``einsum(spec, x, w) + b`` with int8 operands: x's trailing axes contracted with w.q's leading ones
    (the layout ``matmul.project`` takes); float32 result, cast to x's dtype."""
    ins, _ = spec.replace(" ", "").split("->")
    xs, ws = ins.split(",")
    in_axes = sum(c in ws for c in xs)
    xq, xscale, xzero = quantize_rows(x, in_axes)
    # [..., 1] per-token values against [out...] per-channel ones: the output's kept axes, then its made axes
    per_token = xscale.shape[: x.ndim - in_axes] + (1,) * (w.q.ndim - in_axes)
    xscale, xzero = xscale.reshape(per_token), xzero.reshape(per_token)
    acc = lax.dot_general(
        xq,
        w.q,
        ((tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes))), ((), ())),
        preferred_element_type=jnp.int32,
    )
    acc = acc - xzero * w.qsum  # sum (q_x - z_x) q_w, exactly
    out = acc.astype(jnp.float32) * (xscale * w.scale) + b.astype(jnp.float32)
    return out.astype(x.dtype)
