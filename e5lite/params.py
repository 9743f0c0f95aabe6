"""The parameter pytree of the BERT encoder: plain NamedTuples of arrays, named for ``jax.export``.

Shape names as in ``model.py``. ``weights.py`` fills them from a checkpoint; ``model.py`` runs them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class EmbeddingParams(NamedTuple):
    word_VD: jax.Array
    position_PD: jax.Array
    token_type_YD: jax.Array
    ln_scale_D: jax.Array
    ln_bias_D: jax.Array


class LayerParams(NamedTuple):
    """One encoder layer; in ``Params.layers`` every leaf has an extra leading L axis."""

    q_DNK: jax.Array
    q_bias_NK: jax.Array
    k_DNK: jax.Array
    k_bias_NK: jax.Array
    v_DNK: jax.Array
    v_bias_NK: jax.Array
    o_NKD: jax.Array
    o_bias_D: jax.Array
    attn_ln_scale_D: jax.Array
    attn_ln_bias_D: jax.Array
    ffn_in_DF: jax.Array
    ffn_in_bias_F: jax.Array
    ffn_out_FD: jax.Array
    ffn_out_bias_D: jax.Array
    ffn_ln_scale_D: jax.Array
    ffn_ln_bias_D: jax.Array


# One encoder layer as inference runs it: the query, key and value weights as one [D, 3, N, K] matrix (one
# wide GEMM) and their biases as [3, N, K], stored so rather than stacked on every call; the rest are
# LayerParams' own fields, in its order (fuse_layers and unfuse_layers rely on that: asserted below).
class FusedLayerParams(NamedTuple):
    qkv_DCNK: jax.Array
    qkv_bias_CNK: jax.Array
    o_NKD: jax.Array
    o_bias_D: jax.Array
    attn_ln_scale_D: jax.Array
    attn_ln_bias_D: jax.Array
    ffn_in_DF: jax.Array
    ffn_in_bias_F: jax.Array
    ffn_out_FD: jax.Array | Transposed | QuantizedWeight  # Transposed: the engine's with weights="bfloat16"
    ffn_out_bias_D: jax.Array
    ffn_ln_scale_D: jax.Array
    ffn_ln_bias_D: jax.Array


assert LayerParams._fields[:6] == ("q_DNK", "q_bias_NK", "k_DNK", "k_bias_NK", "v_DNK", "v_bias_NK")
assert FusedLayerParams._fields[2:] == LayerParams._fields[6:]


class Transposed(NamedTuple):
    """A matmul weight kept [out, in] (as torch's Linear stores it) rather than [in, out]. The engine keeps the
    FFN's output weight so with ``weights="bfloat16"``: XLA:CPU's kernels multiply a few tokens by a bfloat16
    [F, D] weight faster with F as its last axis (float32 ones are faster as they are)."""

    w_OI: jax.Array


def transposed(w_IO, xp=jnp) -> Transposed:
    """w [..., in, out] as a Transposed [..., out, in] (a copy in that order)."""
    return Transposed(xp.swapaxes(w_IO, -1, -2).copy())


def untransposed(w):
    """A weight back as [..., in, out] from a Transposed, exactly; any other weight as it is."""
    return jnp.swapaxes(w.w_OI, -1, -2) if isinstance(w, Transposed) else w


class QuantizedWeight(NamedTuple):
    """A matmul weight in int8 with one float32 scale per output channel (``weights="int8"``, ``int8.py``):
    ``w ~= q * scale``, ``q`` [..., in..., out...]; ``scale`` and ``qsum`` (int32: the sum of ``q`` over
    the input axes, for the activations' zero points) [..., out...]."""

    q: jax.Array
    scale: jax.Array
    qsum: jax.Array

    def reshape(self, *shape) -> QuantizedWeight:
        """``q`` reshaped, the per-channel arrays kept: for merging input axes only (the output axes stay as they
        are), as ``model.self_attention`` merges the heads of the output projection's weight."""
        return QuantizedWeight(self.q.reshape(*shape), self.scale, self.qsum)


class Params(NamedTuple):
    embeddings: EmbeddingParams
    # stacked (leaves [L, ...], run under lax.scan), or a tuple of L per-layer ones (run unrolled); each
    # LayerParams or FusedLayerParams
    layers: LayerParams | FusedLayerParams | tuple


# Named for jax.export: an exported program whose inputs hold these serializes (``Exported.serialize``) only
# with its pytree types registered, under names that stay fixed when the module moves. Once per process.
for _params_type in (EmbeddingParams, LayerParams, FusedLayerParams, Transposed, QuantizedWeight, Params):
    jax.export.register_namedtuple_serialization(_params_type, serialized_name=f"e5lite.{_params_type.__name__}")
del _params_type
