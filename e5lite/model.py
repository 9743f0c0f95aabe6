"""The BERT encoder as pure functions over a params pytree.

Shape names: B batch, S query positions, T key positions, D hidden, N heads, K head dim, F intermediate,
V vocab, P max positions, Y token types, L layers.

Reads top to bottom as the forward pass: embed -> layer (self-attention, feed-forward) -> encoder (the
layers under lax.scan) -> forward. Attention itself lives in attention.py, the params pytree in params.py.

Everything here is differentiable and jit-friendly; ``config`` is a hashable frozen dataclass, so it can be
a static argument. Softmax and LayerNorm run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .attention import AttentionMask, attention_probs, multi_head_attention
from .config import BertConfig
from .dropout import drop
from .matmul import project
from .numerics import HostOrDeviceArray
from .params import EmbeddingParams, FusedLayerParams, LayerParams, Params, Transposed


class Dropout(NamedTuple):
    """Training-time dropout where BERT has it: ``hidden`` on the embeddings and on each sublayer's output
    before its residual, ``attention`` on the attention probabilities. Rates are Python floats (static)."""

    rng: jax.Array
    hidden: float = 0.1
    attention: float = 0.1

    def split(self, n: int) -> list[Dropout]:
        return [self._replace(rng=k) for k in jax.random.split(self.rng, n)]


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def activation(x, kind: str):
    if kind == "relu":
        return jax.nn.relu(x)
    dtype, x = x.dtype, x.astype(jnp.float32)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True).astype(dtype)
    # "gelu" is the exact erf form, written as torch computes it: x / 2 (1 + erf(x / sqrt 2)). (jax.nn.gelu
    # defaults to the tanh approximation, and its exact form goes through erfc, which XLA:CPU computes at a
    # higher cost than erf: BENCHMARKS.md, "One-query latency".)
    return (0.5 * x * (1.0 + lax.erf(x * np.float32(np.sqrt(0.5))))).astype(dtype)


def embed(p: EmbeddingParams, config: BertConfig, input_ids_BS, token_type_ids_BS=None, position_ids_BS=None):
    """Token ids [B, S] -> embeddings [B, S, D] (word + position + token type, then LayerNorm).

    ``position_ids`` count from 0 at each sequence's first token, whatever the architecture; the position
    table is read from ``config.position_offset`` on (XLM-R: pad_token_id + 1, as transformers computes)."""
    S = input_ids_BS.shape[1]
    if S > config.max_tokens:
        raise ValueError(
            f"sequence length {S} exceeds the {config.max_tokens} positions of the model "
            f"(max_position_embeddings {config.max_position_embeddings}, offset {config.position_offset})"
        )
    if position_ids_BS is None:
        position_ids_BS = jnp.arange(S)[None, :]
    if token_type_ids_BS is None:
        token_type_ids_BS = jnp.zeros_like(input_ids_BS)
    x_BSD = (
        jnp.take(p.word_VD, input_ids_BS, axis=0)
        + jnp.take(p.position_PD, position_ids_BS + config.position_offset, axis=0)
        + jnp.take(p.token_type_YD, token_type_ids_BS, axis=0)
    )
    return layer_norm(x_BSD, p.ln_scale_D, p.ln_bias_D, config.layer_norm_eps)


def self_attention(
    p: LayerParams | FusedLayerParams,
    config: BertConfig,
    x_BSD,
    mask: AttentionMask,
    attention_impl: str = "xla",
    dropout: Dropout | None = None,
    output_attentions: bool = False,
):
    """Multi-head self-attention; returns [B, S, D] before the residual (and before its dropout), and with
    ``output_attentions`` also the probabilities [B, N, S, T]."""
    # One [D, 3D] projection instead of three [D, D] ones: fewer, wider GEMMs.
    f = p if isinstance(p, FusedLayerParams) else fuse_layers(p)
    qkv_BSCNK = project("BSD,DCNK->BSCNK", x_BSD, f.qkv_DCNK, f.qkv_bias_CNK)
    # the 1/sqrt(K) query scale (pre-scaled queries: see attention.attention_core), rounded once to the
    # activations' dtype; XLA fuses it into the copies that split the heads
    scale_C11 = jnp.array([1.0 / config.head_dim**0.5, 1.0, 1.0], jnp.float32)[:, None, None]
    qkv_BSCNK = (qkv_BSCNK.astype(jnp.float32) * scale_C11).astype(qkv_BSCNK.dtype)
    ctx_BSNK = multi_head_attention(
        qkv_BSCNK, mask, attention_impl, None if dropout is None else (dropout.rng, dropout.attention)
    )
    # heads flattened before the product: contracting N and K as two axes, XLA:CPU chose to transpose the
    # [N, K, D] weight on every call (K before N) rather than the few tokens' context
    B, S, N, K = ctx_BSNK.shape
    out_BSD = project("BSX,XD->BSD", ctx_BSNK.reshape(B, S, N * K), p.o_NKD.reshape(N * K, -1), p.o_bias_D)
    return (out_BSD, attention_probs(qkv_BSCNK, mask)) if output_attentions else out_BSD


def fuse_layers(p: LayerParams, xp=jnp) -> FusedLayerParams:
    """The query, key and value weights (and biases) stacked into one, for one layer or stacked layers
    (``xp``: jax.numpy, or numpy for host arrays)."""
    qkv_DCNK = xp.stack([p.q_DNK, p.k_DNK, p.v_DNK], axis=-3)
    qkv_bias_CNK = xp.stack([p.q_bias_NK, p.k_bias_NK, p.v_bias_NK], axis=-3)
    return FusedLayerParams(qkv_DCNK, qkv_bias_CNK, *(getattr(p, f) for f in FusedLayerParams._fields[2:]))


def unfuse_layers(f: FusedLayerParams) -> LayerParams:
    """``fuse_layers`` undone, exactly (the query scale is applied to the projected queries, not the weights)."""
    (q, k, v), (qb, kb, vb) = (jnp.moveaxis(a, -3, 0) for a in (f.qkv_DCNK, f.qkv_bias_CNK))
    return LayerParams(q, qb, k, kb, v, vb, *(getattr(f, n) for n in FusedLayerParams._fields[2:]))


def feed_forward(p: LayerParams | FusedLayerParams, config: BertConfig, x_BSD):
    h_BSF = project("BSD,DF->BSF", x_BSD, p.ffn_in_DF, p.ffn_in_bias_F)
    h_BSF = activation(h_BSF, config.activation)
    if isinstance(p.ffn_out_FD, Transposed):
        return project("BSF,DF->BSD", h_BSF, p.ffn_out_FD.w_OI, p.ffn_out_bias_D)
    return project("BSF,FD->BSD", h_BSF, p.ffn_out_FD, p.ffn_out_bias_D)


# The matmul weights of a layer: what ``weights="bfloat16"`` stores in bfloat16 (everything else stays float32).
MATMUL_WEIGHTS = ("q_DNK", "k_DNK", "v_DNK", "o_NKD", "ffn_in_DF", "ffn_out_FD")
# ... the same weights in a FusedLayerParams (Q, K and V as one)
FUSED_MATMUL_WEIGHTS = ("qkv_DCNK", *(f for f in MATMUL_WEIGHTS if f in FusedLayerParams._fields))
# ... and their biases: training in bfloat16 keeps both float32 (``project`` narrows the weights itself).
PROJECTION_BIASES = ("q_bias_NK", "k_bias_NK", "v_bias_NK", "o_bias_D", "ffn_in_bias_F", "ffn_out_bias_D")


def layer(
    p: LayerParams | FusedLayerParams,
    config: BertConfig,
    x_BSD,
    mask: AttentionMask,
    attention_impl: str = "xla",
    dropout: Dropout | None = None,
    output_attentions: bool = False,
):
    """One post-LayerNorm BERT layer: attention -> (dropout) add & norm -> FFN -> (dropout) add & norm.
    With ``output_attentions`` returns (output, attention probabilities)."""
    eps = config.layer_norm_eps
    d_attn, d_out, d_ffn = dropout.split(3) if dropout is not None else (None, None, None)
    h_BSD = self_attention(p, config, x_BSD, mask, attention_impl, d_attn, output_attentions)
    h_BSD, probs_BNST = h_BSD if output_attentions else (h_BSD, None)
    h_BSD = h_BSD if d_out is None else drop(h_BSD, d_out.rng, d_out.hidden)
    x_BSD = layer_norm(x_BSD + h_BSD, p.attn_ln_scale_D, p.attn_ln_bias_D, eps)
    h_BSD = feed_forward(p, config, x_BSD)
    h_BSD = h_BSD if d_ffn is None else drop(h_BSD, d_ffn.rng, d_ffn.hidden)
    y_BSD = layer_norm(x_BSD + h_BSD, p.ffn_ln_scale_D, p.ffn_ln_bias_D, eps)
    return (y_BSD, probs_BNST) if output_attentions else y_BSD


def encoder(
    layers: LayerParams | FusedLayerParams | tuple,
    config: BertConfig,
    x_BSD,
    mask: AttentionMask,
    *,
    output_hidden_states=False,
    attention_impl: str = "xla",
    dropout: Dropout | None = None,
    remat: bool = False,
    unroll: bool = False,
    output_attentions: bool = False,
):
    """Runs the layers: stacked ones ([L, ...] leaves) with lax.scan (one layer is compiled, not L; ``unroll``
    compiles all L, which XLA:CPU runs faster in the backward pass), a tuple of per-layer ones one after the
    other (compiled L times, and no layer's weights sliced out of the stack on each call: XLA:CPU copies them).

    Returns the last hidden state [B, S, D], every layer's output [L, B, S, D] (or None) and every layer's
    attention probabilities [L, B, N, S, T] (or None). ``remat``
    (gradient checkpointing): keep only each layer's input for the backward pass and recompute the rest.
    """

    def step(x, p_and_key):
        p, key = p_and_key
        y = layer(
            p,
            config,
            x,
            mask,
            attention_impl,
            None if dropout is None else dropout._replace(rng=key),
            output_attentions,
        )
        y, probs = y if output_attentions else (y, None)
        return y, (y if output_hidden_states else None, probs)

    keys = None if dropout is None else jax.random.split(dropout.rng, config.num_hidden_layers)
    step = jax.checkpoint(step) if remat else step
    if isinstance(layers, (LayerParams, FusedLayerParams)):
        x_BSD, (hidden_LBSD, probs_LBNST) = lax.scan(step, x_BSD, (layers, keys), unroll=True if unroll else 1)
        return x_BSD, hidden_LBSD, probs_LBNST
    outs = []
    for i, p in enumerate(layers):
        x_BSD, out = step(x_BSD, (p, None if keys is None else keys[i]))
        outs.append(out)
    stacked = lambda xs: None if xs[0] is None else jnp.stack(xs)  # noqa: E731
    return x_BSD, stacked([h for h, _ in outs]), stacked([a for _, a in outs])


@overload
def forward(
    params: Params,
    config: BertConfig,
    input_ids: HostOrDeviceArray,
    attention_mask: HostOrDeviceArray,
    token_type_ids: HostOrDeviceArray | None = None,
    *,
    segment_ids: HostOrDeviceArray | None = None,
    position_ids: HostOrDeviceArray | None = None,
    output_hidden_states: Literal[False] = False,
    attention_impl: str = "xla",
    attention_window: int | None = None,
    dropout: Dropout | None = None,
    remat: bool = False,
    unroll: bool = False,
    output_attentions: Literal[False] = False,
) -> jax.Array: ...
@overload
def forward(
    params: Params,
    config: BertConfig,
    input_ids: HostOrDeviceArray,
    attention_mask: HostOrDeviceArray,
    token_type_ids: HostOrDeviceArray | None = None,
    *,
    segment_ids: HostOrDeviceArray | None = None,
    position_ids: HostOrDeviceArray | None = None,
    output_hidden_states: bool = False,
    attention_impl: str = "xla",
    attention_window: int | None = None,
    dropout: Dropout | None = None,
    remat: bool = False,
    unroll: bool = False,
    output_attentions: bool = False,
) -> jax.Array | tuple[jax.Array, ...]: ...
def forward(
    params: Params,
    config: BertConfig,
    input_ids: HostOrDeviceArray,
    attention_mask: HostOrDeviceArray,
    token_type_ids: HostOrDeviceArray | None = None,
    *,
    segment_ids: HostOrDeviceArray | None = None,
    position_ids: HostOrDeviceArray | None = None,
    output_hidden_states: bool = False,
    attention_impl: str = "xla",
    attention_window: int | None = None,
    dropout: Dropout | None = None,
    remat: bool = False,
    unroll: bool = False,
    output_attentions: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """BertModel forward: input_ids, attention_mask [B, S] -> last hidden state [B, S, D].

    Packed rows (several sequences in one row) pass ``segment_ids`` [B, S] (0 = padding, 1.. = sequence) and
    ``position_ids`` [B, S] restarting at 0 for each sequence; attention is then block-diagonal.
    With ``output_hidden_states=True`` returns ``(last [B, S, D], hidden [L + 1, B, S, D])`` where
    ``hidden[0]`` is the embedding output and ``hidden[i]`` layer i's output, as transformers' tuple.
    ``attention_impl`` is "xla", "pallas" or "cudnn" (see ``attention.attention_core``). ``attention_window`` W (packed
    rows): no sequence crosses a multiple of W positions, so attention runs on windows of W (S must divide by W).
    With ``output_attentions=True`` the attention probabilities [L, B, N, S, T] float32 come last in the
    tuple: ``(last, attentions)`` or ``(last, hidden, attentions)`` (plain XLA attention, whole rows only).
    Training: ``dropout`` (a ``Dropout``, None in inference), ``remat`` (gradient checkpointing per layer) and
    ``unroll`` (see ``encoder``).
    """
    _check_forward_args(input_ids, segment_ids, attention_window, attention_impl, output_attentions)
    x_BSD = embed(params.embeddings, config, input_ids, token_type_ids, position_ids)
    if dropout is not None:
        d_embed, dropout = dropout.split(2)
        x_BSD = drop(x_BSD, d_embed.rng, d_embed.hidden)
    mask = AttentionMask(attention_mask > 0, segment_ids, attention_window)
    last_BSD, hidden_LBSD, probs_LBNST = encoder(
        params.layers,
        config,
        x_BSD,
        mask,
        output_hidden_states=output_hidden_states,
        attention_impl=attention_impl,
        dropout=dropout,
        remat=remat,
        unroll=unroll,
        output_attentions=output_attentions,
    )
    out: tuple = (last_BSD,)
    if output_hidden_states:
        out += (jnp.concatenate([x_BSD[None], hidden_LBSD], axis=0),)
    if output_attentions:
        out += (probs_LBNST,)
    return out if len(out) > 1 else last_BSD


def _check_forward_args(input_ids, segment_ids, attention_window, attention_impl, output_attentions) -> None:
    if attention_window is not None:
        if attention_window < 1 or input_ids.shape[1] % attention_window:
            raise ValueError(
                f"attention_window {attention_window} must divide the sequence length {input_ids.shape[1]}"
            )
        if segment_ids is None:
            raise ValueError("attention_window needs segment_ids: it is for packed rows (see plan_packed)")
    if output_attentions and (attention_impl != "xla" or attention_window is not None):
        raise ValueError(
            "output_attentions needs attention_impl='xla' on whole rows: the fused kernels "
            f"(here {attention_impl!r}) and attention windows never form the [S, T] probabilities"
        )
