"""Self-attention: the mask, the plain-XLA attention, the fused implementations and how one is chosen.

Shape names as in model.py: B batch, S query positions, T key positions, N heads, K head dim, C the three
projections (query, key, value) of a fused QKV tensor. Logits and softmax run in float32.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .dropout import drop
from .errors import E5LiteError
from .numerics import HostOrDeviceArray, in_memory, precision, swapped_in_memory

logger = logging.getLogger("e5lite")

ATTENTION_IMPLS = ("xla", "cudnn", "pallas")

# attention_impl="auto": candidates per backend, the first that compiles wins. On CPU, Pallas runs in
# interpret mode and is slower than XLA; on GPU, cuDNN and the Pallas kernel beat plain XLA (BENCHMARKS.md);
# TPU is not measured, and the Pallas kernel there skips blocks XLA would compute.
AUTO_ATTENTION = {"cpu": ("xla",), "gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "xla")}

# Query rows per attention block. Scores for one block, [B, N, block, T], stay cache-sized on CPUs, where
# materialising all [B, N, S, T] at S = 256..512 spills out of the caches and runs far slower (BENCHMARKS.md,
# "Attention implementations"); results are identical either way.
ATTENTION_BLOCK = 128


class AttentionMask(NamedTuple):
    """Which keys each query may attend: real keys only and, for packed rows, only its own sequence.

    Kept as ids rather than a materialised [B, S, T] bias: XLA fuses the comparisons into the softmax.
    ``window`` (a Python int, static) promises that no sequence crosses a multiple of ``window`` positions,
    so attention can run on rows of ``window`` instead of S: the same result for less work.
    """

    key_valid_BT: HostOrDeviceArray  # bool, False at padding
    segment_ids_BS: HostOrDeviceArray | None = None  # int, packed rows: 1.. per sequence, 0 at padding
    window: int | None = None

    def windowed(self) -> AttentionMask:
        """The mask for rows of ``window`` positions: [B, S] -> [B * S // window, window]."""
        W = self.window
        assert W is not None, "windowed() of a mask without a window"
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


def attend(q_BNSK, k_BNTK, v_BNTK, allowed, dropout=None):
    """softmax(q k^T masked) v, with logits and softmax in float32. q is pre-scaled; ``allowed`` broadcasts
    to [B, N, S, T]. ``dropout`` (rng, rate): training-time dropout of the attention probabilities."""
    rng, rate = dropout if dropout is not None and dropout[1] else (jnp.zeros((2,), jnp.uint32), 0.0)
    return _attend(rate, q_BNSK, k_BNTK, v_BNTK, allowed, rng)


def _scores(q_BNSK, k_BNTK, allowed, prec) -> tuple[jax.Array, jax.Array]:
    logits_BNST = jnp.einsum("BNSK,BNTK->BNST", q_BNSK, k_BNTK, precision=prec, preferred_element_type=jnp.float32)
    # finfo.min as transformers' additive mask: a fully masked (padding) row stays finite.
    logits_BNST = jnp.where(allowed, logits_BNST, jnp.finfo(jnp.float32).min)
    # softmax(x) v = (exp(x - max) v) / sum(exp(x - max)): dividing the [S, K] context instead of the [S, T]
    # probabilities saves a pass over the scores.
    e_BNST = jnp.exp(logits_BNST - jnp.max(logits_BNST, axis=-1, keepdims=True))
    return e_BNST, jnp.sum(e_BNST, axis=-1, keepdims=True)


def _context(e_BNST, sum_BNS1, v_BNTK, rng, rate, prec):
    kept_BNST = drop(e_BNST, rng, rate)  # dropping before the division is the same
    ctx_BNSK = jnp.einsum(
        "BNST,BNTK->BNSK", kept_BNST.astype(v_BNTK.dtype), v_BNTK, precision=prec, preferred_element_type=jnp.float32
    )
    return (ctx_BNSK / sum_BNS1).astype(v_BNTK.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(rate, q_BNSK, k_BNTK, v_BNTK, allowed, rng):
    prec = precision(q_BNSK.dtype)
    return _context(*_scores(q_BNSK, k_BNTK, allowed, prec), v_BNTK, rng, rate, prec)


# The backward pass by hand, for the reason of matmul.py: autodiff's dv = p^T dctx and dk = dlogits^T q contract
# the query axis of a transposed operand, which XLA:CPU's fast bfloat16 kernels do not take; here every dot is
# one they do (q, k, v and the small [S, K] operands moved in memory first). Float32 gives autodiff's
# gradients to rounding.


def _attend_fwd(rate, q_BNSK, k_BNTK, v_BNTK, allowed, rng):
    prec = precision(q_BNSK.dtype)
    q_BNSK, k_BNTK, v_BNTK = (in_memory(a) for a in (q_BNSK, k_BNTK, v_BNTK))
    e_BNST, sum_BNS1 = _scores(q_BNSK, k_BNTK, allowed, prec)
    ctx_BNSK = _context(e_BNST, sum_BNS1, v_BNTK, rng, rate, prec)
    return ctx_BNSK, (q_BNSK, k_BNTK, v_BNTK, allowed, rng, e_BNST, sum_BNS1, ctx_BNSK)


def _attend_bwd(rate, res, g_BNSK):
    q_BNSK, k_BNTK, v_BNTK, allowed, rng, e_BNST, sum_BNS1, ctx_BNSK = res
    op, prec, f32 = v_BNTK.dtype, precision(v_BNTK.dtype), jnp.float32
    dot = functools.partial(jnp.einsum, precision=prec, preferred_element_type=f32)
    g_BNSK = g_BNSK.astype(f32)
    du_BNSK = (g_BNSK / sum_BNS1).astype(op)  # ctx = u / sum, u = dropped(e) v
    dsum_BNS1 = -jnp.sum(g_BNSK * ctx_BNSK.astype(f32), axis=-1, keepdims=True) / sum_BNS1
    kept_BNST = drop(e_BNST, rng, rate).astype(op)
    dv_BNKT = dot("BNKS,BNST->BNKT", swapped_in_memory(du_BNSK), kept_BNST)
    de_BNST = drop(dot("BNSK,BNTK->BNST", du_BNSK, v_BNTK), rng, rate) + dsum_BNS1  # dropout: same mask, scale
    dlogits_BNST = jnp.where(allowed, de_BNST * e_BNST, 0).astype(op)  # e = exp(logits - max)
    dq_BNSK = dot("BNST,BNTK->BNSK", dlogits_BNST, k_BNTK)
    dk_BNKT = dot("BNKS,BNST->BNKT", swapped_in_memory(q_BNSK), dlogits_BNST)
    return (
        dq_BNSK.astype(q_BNSK.dtype),
        swapped_in_memory(dk_BNKT).astype(k_BNTK.dtype),
        swapped_in_memory(dv_BNKT).astype(v_BNTK.dtype),
        None,
        None,
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention_probs(qkv_BSCNK, mask: AttentionMask):
    """The attention probabilities [B, N, S, T] float32: softmax over the allowed keys of the scaled scores,
    the same softmax ``attend`` folds into its context (for teaching and ``output_attentions``)."""
    q_BNSK, k_BNTK = (qkv_BSCNK[:, :, c].transpose(0, 2, 1, 3) for c in range(2))
    logits_BNST = jnp.einsum(
        "BNSK,BNTK->BNST", q_BNSK, k_BNTK, precision=precision(q_BNSK.dtype), preferred_element_type=jnp.float32
    )
    logits_BNST = jnp.where(mask.logits_mask(), logits_BNST, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BNST, axis=-1)


def attend_blocked(q_BNSK, k_BNTK, v_BNTK, mask: AttentionMask, block: int = ATTENTION_BLOCK, dropout=None):
    """``attend`` one block of query rows at a time (lax.map) for long sequences."""
    B, N, S, K = q_BNSK.shape
    if S <= block or S % block:
        return attend(q_BNSK, k_BNTK, v_BNTK, mask.logits_mask(), dropout)
    nb = S // block
    q_bBNsK = q_BNSK.reshape(B, N, nb, block, K).transpose(2, 0, 1, 3, 4)

    def one(args):
        i, q = args
        block_dropout = None if dropout is None else (jax.random.fold_in(dropout[0], i), dropout[1])
        return attend(q, k_BNTK, v_BNTK, mask.logits_mask(i * block, block), block_dropout)

    ctx_bBNsK = lax.map(one, (jnp.arange(nb), q_bBNsK))
    return ctx_bBNsK.transpose(1, 2, 0, 3, 4).reshape(B, N, S, K)


def attention_core(q_BNSK, k_BNTK, v_BNTK, mask: AttentionMask, impl: str = "xla", dropout=None):
    """softmax(q k^T, masked) v by one of ATTENTION_IMPLS; q is pre-scaled. Same masking semantics for all:
    "xla" (plain jnp, blocked), "pallas" (e5lite.kernels flash attention, skips blocks that cannot
    attend), "cudnn" (jax.nn.dot_product_attention on cuDNN; fp16/bf16 on NVIDIA GPUs only). ``dropout``
    (rng, rate) of the attention probabilities: "xla" only."""
    if impl == "xla":
        return attend_blocked(q_BNSK, k_BNTK, v_BNTK, mask, dropout=dropout)
    if dropout is not None and dropout[1]:
        raise ValueError(f"attention dropout runs with attention_impl='xla' only, not {impl!r}")
    if impl == "pallas":
        return _pallas_per_device(q_BNSK, k_BNTK, v_BNTK, mask.key_valid_BT, mask.segment_ids_BS)
    if impl == "cudnn":
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BNSK, k_BNTK, v_BNTK))  # cuDNN takes [B, S, N, K]
        if mask.segment_ids_BS is None:  # right padding: sequence lengths let cuDNN skip the padded keys
            lengths_B = jnp.sum(mask.key_valid_BT, axis=-1).astype(jnp.int32)
            out = jax.nn.dot_product_attention(
                q, k, v, scale=1.0, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B, implementation="cudnn"
            )
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask.logits_mask(), scale=1.0, implementation="cudnn")
        return out.transpose(0, 2, 1, 3)
    raise ValueError(f"unknown attention_impl {impl!r}; choose one of {ATTENTION_IMPLS}")


def _pallas_per_device(q_BNSK, k_BNTK, v_BNTK, key_valid_BT, segment_ids_BS):
    """The Pallas kernel (e5lite.kernels.flash_attention); under a mesh of several devices (``jax.set_mesh``, as
    the engine's multi-device runs set it) once per device on its share of the batch rows, split over all the
    mesh's axes. XLA cannot partition a Mosaic (TPU) kernel itself: without this, lowering a data-parallel
    program fails ("Mosaic kernels cannot be automatically partitioned")."""
    # e5lite.kernels is kernels/ (pyproject's package-dir), which mypy checks as the top-level ``kernels``
    from .kernels.flash_attention import flash_attention  # type: ignore[import-not-found]

    def kernel(q_BNSK, k_BNTK, v_BNTK, key_valid_BT, segment_ids_BS):
        return flash_attention(q_BNSK, k_BNTK, v_BNTK, key_valid_BT=key_valid_BT, segment_ids_BS=segment_ids_BS)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        rows = P(tuple(mesh.axis_names))  # dimension 0 (batch rows) over every axis, the rest whole
        # check_vma off: pallas_call's outputs do not declare how they vary over the mesh (each row is its own)
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=rows, out_specs=rows, check_vma=False)
    return kernel(q_BNSK, k_BNTK, v_BNTK, key_valid_BT, segment_ids_BS)


def multi_head_attention(qkv_BSCNK, mask: AttentionMask, impl: str = "xla", dropout=None):
    """Fused projections [B, S, 3, N, K] -> context [B, S, N, K].

    With ``mask.window`` W < S, rows of S are first cut into S // W rows of W: a free reshape (no sequence
    crosses a window), and S // W times less attention work for the same result.
    """
    B, S, _, N, K = qkv_BSCNK.shape
    if mask.window and mask.window < S:
        qkv_BSCNK = qkv_BSCNK.reshape(B * S // mask.window, mask.window, *qkv_BSCNK.shape[2:])
        mask = mask.windowed()
    # split, not three slices: the gradient of a split is one concatenation, where that of slices is three
    # zero-padded copies summed (every element computed three times, a visible share of a training step on CPU:
    # BENCHMARKS.md, "Training speed")
    q_BNSK, k_BNTK, v_BNTK = (x[:, :, 0].transpose(0, 2, 1, 3) for x in jnp.split(qkv_BSCNK, 3, axis=2))
    ctx_BNSK = attention_core(q_BNSK, k_BNTK, v_BNTK, mask, impl, dropout)
    return ctx_BNSK.transpose(0, 2, 1, 3).reshape(B, S, N, K)


def resolve_attention_impl(requested: str, platform: str, dtype, num_heads: int, head_dim: int) -> str:
    """The attention implementation to run: ``requested``, or for "auto" the first of AUTO_ATTENTION that
    compiles here (each unavailable one is logged in one line). An explicit choice that cannot run raises."""
    if requested not in ("auto",) + ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be 'auto' or one of {ATTENTION_IMPLS}, got {requested!r}")
    candidates = AUTO_ATTENTION.get(platform, ("xla",)) if requested == "auto" else (requested,)
    for impl in candidates:
        if impl == "xla":  # plain jnp runs everywhere: no probe compile at start-up
            return impl
        if impl == "cudnn" and dtype == jnp.float32:
            reason = "cuDNN attention needs float16/bfloat16"
        else:
            try:
                q = jnp.zeros((1, num_heads, 16, head_dim), dtype)
                mask = AttentionMask(jnp.ones((1, 16), bool))
                jax.jit(attention_core, static_argnums=4).lower(q, q, q, mask, impl).compile()
                return impl
            except Exception as e:  # unavailable backends fail in many ways (lowering, missing cuDNN, ...)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if requested != "auto":
            raise E5LiteError(f"attention_impl={impl!r} is not available on {platform} ({reason})")
        logger.warning("e5lite: attention_impl %r unavailable on %s (%s); trying the next", impl, platform, reason)
    return "xla"
