"""The BERT encoder as pure functions over a params pytree.

Shape names: B batch, S query positions, T key positions, D hidden, N heads, K head dim, F intermediate,
V vocab, P max positions, Y token types, L layers.

Everything here is differentiable and jit-friendly; ``config`` is a hashable frozen dataclass, so it can be
a static argument. Softmax and LayerNorm run in float32 whatever the parameter dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .config import BertConfig


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


class Params(NamedTuple):
    embeddings: EmbeddingParams
    layers: LayerParams  # stacked: leaves are [L, ...]


def _precision(dtype):
    # fp32 weights promise fp32 results: stop TPUs (bf16 passes) and GPUs (TF32) from cutting precision.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


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
    # "gelu" is the exact erf form (torch's default); jax.nn.gelu defaults to the tanh approximation.
    y = jax.nn.gelu(x.astype(jnp.float32), approximate=(kind == "gelu_tanh"))
    return y.astype(x.dtype)


def embed(p: EmbeddingParams, config: BertConfig, input_ids_BS, token_type_ids_BS=None, position_ids_BS=None):
    """Token ids [B, S] -> embeddings [B, S, D] (word + position + token type, then LayerNorm)."""
    S = input_ids_BS.shape[1]
    if S > config.max_position_embeddings:
        raise ValueError(f"sequence length {S} exceeds max_position_embeddings {config.max_position_embeddings}")
    if position_ids_BS is None:
        position_ids_BS = jnp.arange(S)[None, :]
    if token_type_ids_BS is None:
        token_type_ids_BS = jnp.zeros_like(input_ids_BS)
    x_BSD = (jnp.take(p.word_VD, input_ids_BS, axis=0)
             + jnp.take(p.position_PD, position_ids_BS, axis=0)
             + jnp.take(p.token_type_YD, token_type_ids_BS, axis=0))
    return layer_norm(x_BSD, p.ln_scale_D, p.ln_bias_D, config.layer_norm_eps)


class AttentionMask(NamedTuple):
    """Which keys each query may attend: real keys only and, for packed rows, only its own sequence.

    Kept as ids rather than a materialised [B, S, T] bias: XLA fuses the comparisons into the softmax.
    ``window`` (a Python int, static) promises that no sequence crosses a multiple of ``window`` positions,
    so attention runs on rows of ``window`` instead of S: the same result for less work.
    """
    key_valid_BT: jax.Array                # bool, False at padding
    segment_ids_BS: jax.Array | None = None  # int, packed rows: 1.. per sequence, 0 at padding
    window: int | None = None

    def windowed(self):
        """The mask for rows of ``window`` positions: [B, S] -> [B * S // window, window]."""
        W = self.window
        seg = None if self.segment_ids_BS is None else self.segment_ids_BS.reshape(-1, W)
        return AttentionMask(self.key_valid_BT.reshape(-1, W), seg)

    def logits_mask(self, q_start: int = 0, q_len: int | None = None):
        """Boolean [B, 1, S or q_len, T] (or [B, 1, 1, T] without segments) for query rows from q_start."""
        allowed = self.key_valid_BT[:, None, None, :]
        if self.segment_ids_BS is not None:
            seg_q = self.segment_ids_BS
            if q_len is not None:
                seg_q = lax.dynamic_slice_in_dim(seg_q, q_start, q_len, axis=1)
            allowed = allowed & (seg_q[:, None, :, None] == self.segment_ids_BS[:, None, None, :])
        return allowed


# Query rows per attention block. Scores for one block, [B, N, block, T], stay cache-sized on CPUs, where
# materialising all [B, N, S, T] at S = 256..512 runs at half speed; results are identical either way.
ATTENTION_BLOCK = 128


def attend(q_BNSK, k_BNTK, v_BNTK, allowed):
    """softmax(q k^T masked) v, with logits and softmax in float32. q is pre-scaled; ``allowed`` broadcasts
    to [B, N, S, T]."""
    prec = _precision(q_BNSK.dtype)
    logits_BNST = jnp.einsum("BNSK,BNTK->BNST", q_BNSK, k_BNTK, precision=prec,
                             preferred_element_type=jnp.float32)
    # finfo.min as transformers' additive mask: a fully masked (padding) row stays finite.
    logits_BNST = jnp.where(allowed, logits_BNST, jnp.finfo(jnp.float32).min)
    # softmax(x) v = (exp(x - max) v) / sum(exp(x - max)): dividing the [S, K] context instead of the [S, T]
    # probabilities saves a pass over the scores (MiniLM on CPU: 1.13x tokens/s end to end).
    e_BNST = jnp.exp(logits_BNST - jnp.max(logits_BNST, axis=-1, keepdims=True))
    ctx_BNSK = jnp.einsum("BNST,BNTK->BNSK", e_BNST.astype(v_BNTK.dtype), v_BNTK, precision=prec,
                          preferred_element_type=jnp.float32)
    return (ctx_BNSK / jnp.sum(e_BNST, axis=-1, keepdims=True)).astype(v_BNTK.dtype)


def attend_blocked(q_BNSK, k_BNTK, v_BNTK, mask: AttentionMask, block: int = ATTENTION_BLOCK):
    """``attend`` one block of query rows at a time (lax.map) for long sequences."""
    B, N, S, K = q_BNSK.shape
    if S <= block or S % block:
        return attend(q_BNSK, k_BNTK, v_BNTK, mask.logits_mask())
    nb = S // block
    q_bBNsK = q_BNSK.reshape(B, N, nb, block, K).transpose(2, 0, 1, 3, 4)

    def one(args):
        i, q = args
        return attend(q, k_BNTK, v_BNTK, mask.logits_mask(i * block, block))

    ctx_bBNsK = lax.map(one, (jnp.arange(nb), q_bBNsK))
    return ctx_bBNsK.transpose(1, 2, 0, 3, 4).reshape(B, N, S, K)


ATTENTION_IMPLS = ("xla", "cudnn", "pallas")


def attention_core(q_BNSK, k_BNTK, v_BNTK, mask: AttentionMask, impl: str = "xla"):
    """softmax(q k^T, masked) v by one of ATTENTION_IMPLS; q is pre-scaled. Same masking semantics for all:
    "xla" (plain jnp, blocked), "pallas" (e5lite.kernels flash attention, skips blocks that cannot
    attend), "cudnn" (jax.nn.dot_product_attention on cuDNN; fp16/bf16 on NVIDIA GPUs only)."""
    if impl == "xla":
        return attend_blocked(q_BNSK, k_BNTK, v_BNTK, mask)
    if impl == "pallas":
        from .kernels.flash_attention import flash_attention
        return flash_attention(q_BNSK, k_BNTK, v_BNTK, key_valid_BT=mask.key_valid_BT,
                               segment_ids_BS=mask.segment_ids_BS)
    if impl == "cudnn":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BNSK, k_BNTK, v_BNTK))  # cuDNN takes [B, S, N, K]
        if mask.segment_ids_BS is None:  # right padding: sequence lengths let cuDNN skip the padded keys
            lengths_B = jnp.sum(mask.key_valid_BT, axis=-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(q, k, v, scale=1.0, query_seq_lengths=lengths_B,
                                               key_value_seq_lengths=lengths_B, implementation="cudnn")
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask.logits_mask(), scale=1.0,
                                               implementation="cudnn")
        return out.transpose(0, 2, 1, 3)
    raise ValueError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")


def self_attention(p: LayerParams, config: BertConfig, x_BSD, mask: AttentionMask, attention_impl: str = "xla"):
    """Multi-head self-attention; returns [B, S, D] before the residual."""
    prec = _precision(x_BSD.dtype)
    # One [D, 3D] projection instead of three [D, D] ones: fewer, wider GEMMs (MiniLM forward on CPU 1.0-1.06x).
    # The 1/sqrt(K) query scale is folded into the query weights and bias.
    scale = jnp.asarray(1.0 / config.head_dim ** 0.5, p.q_DNK.dtype)
    qkv_DCNK = jnp.stack([p.q_DNK * scale, p.k_DNK, p.v_DNK], axis=1)
    qkv_bias_CNK = jnp.stack([p.q_bias_NK * scale, p.k_bias_NK, p.v_bias_NK])
    qkv_BSCNK = jnp.einsum("BSD,DCNK->BSCNK", x_BSD, qkv_DCNK, precision=prec) + qkv_bias_CNK
    B, S, D = x_BSD.shape
    if mask.window and mask.window < S:  # rows of S -> S // W rows of W: a free reshape, S // W times less work
        qkv_BSCNK = qkv_BSCNK.reshape(B * S // mask.window, mask.window, *qkv_BSCNK.shape[2:])
        mask = mask.windowed()
    q_BNSK, k_BNTK, v_BNTK = (qkv_BSCNK[:, :, c].transpose(0, 2, 1, 3) for c in range(3))
    ctx_BNSK = attention_core(q_BNSK, k_BNTK, v_BNTK, mask, attention_impl)
    out_BSD = jnp.einsum("BNSK,NKD->BSD", ctx_BNSK, p.o_NKD, precision=prec) + p.o_bias_D
    return out_BSD.reshape(B, S, D)


def feed_forward(p: LayerParams, config: BertConfig, x_BSD):
    prec = _precision(x_BSD.dtype)
    h_BSF = jnp.einsum("BSD,DF->BSF", x_BSD, p.ffn_in_DF, precision=prec) + p.ffn_in_bias_F
    h_BSF = activation(h_BSF, config.activation)
    return jnp.einsum("BSF,FD->BSD", h_BSF, p.ffn_out_FD, precision=prec) + p.ffn_out_bias_D


def layer(p: LayerParams, config: BertConfig, x_BSD, mask: AttentionMask, attention_impl: str = "xla"):
    """One post-LayerNorm BERT layer: attention -> add & norm -> FFN -> add & norm."""
    eps = config.layer_norm_eps
    x_BSD = layer_norm(x_BSD + self_attention(p, config, x_BSD, mask, attention_impl),
                       p.attn_ln_scale_D, p.attn_ln_bias_D, eps)
    return layer_norm(x_BSD + feed_forward(p, config, x_BSD), p.ffn_ln_scale_D, p.ffn_ln_bias_D, eps)


def encoder(layers: LayerParams, config: BertConfig, x_BSD, mask: AttentionMask, *, output_hidden_states=False,
            attention_impl: str = "xla"):
    """Runs the stacked layers with lax.scan (one layer is compiled, not L).

    Returns the last hidden state [B, S, D] and, when asked, every layer's output [L, B, S, D].
    """
    def step(x, p):
        y = layer(p, config, x, mask, attention_impl)
        return y, (y if output_hidden_states else None)

    x_BSD, hidden_LBSD = lax.scan(step, x_BSD, layers)
    return x_BSD, hidden_LBSD


def forward(params: Params, config: BertConfig, input_ids, attention_mask, token_type_ids=None, *,
            segment_ids=None, position_ids=None, output_hidden_states=False, attention_impl="xla",
            attention_window: int | None = None):
    """BertModel forward: input_ids, attention_mask [B, S] -> last hidden state [B, S, D].

    Packed rows (several sequences in one row) pass ``segment_ids`` [B, S] (0 = padding, 1.. = sequence) and
    ``position_ids`` [B, S] restarting at 0 for each sequence; attention is then block-diagonal.
    With ``output_hidden_states=True`` returns ``(last [B, S, D], hidden [L + 1, B, S, D])`` where
    ``hidden[0]`` is the embedding output and ``hidden[i]`` layer i's output, as transformers' tuple.
    ``attention_impl`` is "xla", "pallas" or "cudnn" (see ``attention_core``). ``attention_window`` W (packed
    rows): no sequence crosses a multiple of W positions, so attention runs on windows of W (S must divide by W).
    """
    if attention_window is not None:
        if attention_window < 1 or input_ids.shape[1] % attention_window:
            raise ValueError(f"attention_window {attention_window} must divide the sequence length {input_ids.shape[1]}")
        if segment_ids is None:
            raise ValueError("attention_window needs segment_ids: it is for packed rows (see plan_packed)")
    x_BSD = embed(params.embeddings, config, input_ids, token_type_ids, position_ids)
    mask = AttentionMask(attention_mask > 0, segment_ids, attention_window)
    last_BSD, hidden_LBSD = encoder(params.layers, config, x_BSD, mask, output_hidden_states=output_hidden_states,
                                    attention_impl=attention_impl)
    if output_hidden_states:
        return last_BSD, jnp.concatenate([x_BSD[None], hidden_LBSD], axis=0)
    return last_BSD
