"""What the engine runs on the devices: the jitted embedding functions (padded batches, packed rows, every token's
hidden state), and the weights in the layout and dtypes those functions take (``run_layout``): query, key and
value fused, the matmul weights in the ``weights`` storage (``check_weights``), layers stacked or unrolled.

The engine (``engine.py``) plans the batches, places the arrays and schedules the calls; ``engine`` re-exports
these names.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from .config import BertConfig
from .int8 import dequantize_layers, quantize_layers
from .model import (
    FUSED_MATMUL_WEIGHTS,
    FusedLayerParams,
    Params,
    forward,
    fuse_layers,
    unfuse_layers,
)
from .params import transposed, untransposed
from .pooling import l2_normalize, pool, pool_segments

WEIGHTS = ("float32", "bfloat16", "int8")


def check_weights(weights: str | None, dtype: npt.DTypeLike) -> str:
    """The storage of the layers' matmul weights: None -> the compute dtype's; "bfloat16" with float32 compute
    (bf16 operands, float32 accumulation and activations: ``matmul.project``); "int8" with float32 compute
    (int8 weights and per-token int8 activations, int32 accumulation: ``int8.py``)."""
    name = jnp.dtype(dtype).name
    if weights is None or weights == name:
        return name
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} (or None: as dtype), got {weights!r}")
    if name != "float32":
        raise ValueError(f"weights={weights!r} needs dtype='float32' (with dtype={name!r} every weight is {name})")
    return weights


# ``params`` of these functions: stacked layers run scanned, a tuple of per-layer ones unrolled (model.encoder).


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize", "attention_impl"))
def embed_batch(
    params: Params,
    input_ids,
    attention_mask,
    *,
    config: BertConfig,
    pooling: str,
    normalize: bool,
    attention_impl: str = "xla",
):
    """Padded batch: token ids, mask [B, S] -> sentence embeddings [B, D] float32 (forward, pool, L2 norm)."""
    hidden_BSD = forward(params, config, input_ids, attention_mask, attention_impl=attention_impl)
    out_BD = pool(hidden_BSD, attention_mask, pooling)
    return l2_normalize(out_BD) if normalize else out_BD


@functools.partial(
    jax.jit, static_argnames=("config", "pooling", "normalize", "num_segments", "attention_impl", "attention_window")
)
def embed_packed(
    params: Params,
    input_ids,
    segment_ids,
    position_ids,
    *,
    config: BertConfig,
    pooling: str,
    normalize: bool,
    num_segments: int,
    attention_impl: str = "xla",
    attention_window: int | None = None,
):
    """Packed batch: ids, segment ids, position ids [B, S] -> embeddings [B * G, D] float32, where sequence
    g (1..G) of row b lands at b * G + g - 1 and G = num_segments. ``attention_window``: see ``forward``."""
    hidden_BSD = forward(
        params,
        config,
        input_ids,
        segment_ids > 0,
        segment_ids=segment_ids,
        position_ids=position_ids,
        attention_impl=attention_impl,
        attention_window=attention_window,
    )
    out_BGD = pool_segments(hidden_BSD, segment_ids, position_ids, num_segments, pooling)
    out_BGD = l2_normalize(out_BGD) if normalize else out_BGD
    return out_BGD.reshape(-1, out_BGD.shape[-1])


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"))
def hidden_states(params: Params, input_ids, attention_mask, *, config: BertConfig, attention_impl: str = "xla"):
    """Padded batch: token ids, mask [B, S] -> the last layer's hidden state of every token [B, S, D] float32."""
    return forward(params, config, input_ids, attention_mask, attention_impl=attention_impl).astype(jnp.float32)


def run_layout(params: Params, dtype: npt.DTypeLike, weights: str, *, unroll: bool, num_layers: int) -> Params:
    """``params`` (as ``load`` gives them) on the host in the forward's own layout: query, key and value fused
    (``model.FusedLayerParams``), cast to ``dtype`` with the matmul weights in ``weights`` (and the FFN's output
    weight ``model.Transposed`` with "bfloat16"), and with ``unroll`` one set per layer rather than stacked."""
    host = jax.tree.map(np.asarray, params)  # a CPU device array is viewed, not copied
    fused = fuse_layers(host.layers, xp=np)
    # the matmul weights (float32 around them with weights="bfloat16"; int8 ones are quantised from float32)
    narrow = jnp.dtype(dtype if weights == "int8" else weights)
    cast: dict[str, Any] = {  # host arrays (fuse_layers on numpy ones), whatever the fields' declared types
        f: x.astype(narrow if f in FUSED_MATMUL_WEIGHTS else dtype, copy=False) for f, x in fused._asdict().items()
    }
    layers = FusedLayerParams(**cast)
    if weights == "bfloat16":
        layers = layers._replace(ffn_out_FD=transposed(layers.ffn_out_FD, xp=np))
    if weights == "int8":
        layers = quantize_layers(layers, lead=1)
    run_layers: FusedLayerParams | tuple[FusedLayerParams, ...] = layers
    if unroll:
        run_layers = tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers))
    embeddings = jax.tree.map(lambda x: x.astype(dtype, copy=False), host.embeddings)
    return Params(embeddings, run_layers)


def stacked(run_params: Params) -> Params:
    """``run_layout`` undone: ``model.Params`` with the layers stacked, as ``load`` gives them."""
    layers = run_params.layers
    if not isinstance(layers, FusedLayerParams):
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    layers = dequantize_layers(layers, lead=1)  # int8 weights as the float32 ones they stand for
    layers = layers._replace(ffn_out_FD=untransposed(layers.ffn_out_FD))
    return Params(run_params.embeddings, unfuse_layers(layers))
