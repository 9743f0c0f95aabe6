"""One training step of contrastive fine-tuning, as pure functions: embed, InfoNCE, gradients (whole batch or
GradCache chunks), optimiser update. ``train.py`` drives it.

GradCache (``chunk_size``): embed every chunk without gradients, take the loss gradient with respect to the
embeddings, then run each chunk again under ``jax.vjp`` with that gradient; the parameter gradient is the
whole batch's, while activations are held for one chunk at a time.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import BertConfig
from .loss import info_nce
from .model import MATMUL_WEIGHTS, PROJECTION_BIASES, Dropout, EmbeddingParams, LayerParams, Params, forward
from .pooling import l2_normalize, pool


class StepBatch(NamedTuple):
    """Token ids of one training batch: B queries, then P = B x (1 + negatives) candidate passages."""

    q_ids: np.ndarray  # [B, Sq] int32
    q_mask: np.ndarray  # [B, Sq] int32
    p_ids: np.ndarray  # [P, Sp] int32
    p_mask: np.ndarray  # [P, Sp] int32
    p_valid: np.ndarray  # [P] bool: False for the rows that pad records with fewer negatives


class StepConfig(NamedTuple):
    """The static (compile-time) part of a step. ``unroll``: the layers compiled one after the other (the
    default; see ``embed``), or False for one layer run under ``lax.scan``, compiled once rather than L times."""

    config: BertConfig
    pooling: str
    temperature: float
    hidden_dropout: float
    attention_dropout: float
    compute_dtype: str
    remat: bool
    chunk_size: int | None
    unroll: bool = True


def decay_mask(params: Params) -> Params:
    """Weight decay for weight matrices and embeddings; none for biases and LayerNorm, as transformers' trainer."""

    def fields(cls):
        return [not ("bias" in f or "ln_" in f) for f in cls._fields]

    emb, lay = fields(EmbeddingParams), fields(LayerParams)
    return Params(EmbeddingParams(*emb), LayerParams(*lay))


def embed(params: Params, ids, mask, key, sc: StepConfig):
    """L2-normalised pooled embeddings [R, D] float32 of one block of rows, with dropout when training."""
    # bfloat16 compute: the float32 master weights stay outside. The projections' weights and biases go in as
    # float32: ``project`` multiplies as bfloat16 operands and returns their gradients summed in float32.
    p = jax.tree.map(lambda x: x.astype(sc.compute_dtype), params)
    p = p._replace(
        layers=p.layers._replace(**{k: getattr(params.layers, k) for k in MATMUL_WEIGHTS + PROJECTION_BIASES})
    )
    dropout = None
    if sc.hidden_dropout or sc.attention_dropout:
        dropout = Dropout(key, sc.hidden_dropout, sc.attention_dropout)
    # unrolled by default: XLA:CPU runs the backward pass faster than through the scan (BENCHMARKS.md, "Training speed")
    hidden = forward(p, sc.config, ids, mask, dropout=dropout, remat=sc.remat, unroll=sc.unroll)
    return l2_normalize(pool(hidden, mask, sc.pooling))


def _whole(params: Params, batch: StepBatch, key, sc: StepConfig):
    kq, kp = jax.random.split(key)

    def loss_fn(prm):
        q = embed(prm, batch.q_ids, batch.q_mask, kq, sc)
        p = embed(prm, batch.p_ids, batch.p_mask, kp, sc)
        return info_nce(q, p, batch.p_valid, sc.temperature)

    return jax.value_and_grad(loss_fn)(params)


def _chunks(x, c: int):
    return x.reshape(x.shape[0] // c, c, *x.shape[1:])


def _grad_cache(params: Params, batch: StepBatch, key, sc: StepConfig):
    c = sc.chunk_size
    assert c is not None  # train_step takes this path only with a chunk_size
    kq, kp = jax.random.split(key)
    sides = []
    for ids, mask, k in ((batch.q_ids, batch.q_mask, kq), (batch.p_ids, batch.p_mask, kp)):
        ids_c, mask_c = _chunks(ids, c), _chunks(mask, c)
        keys = jax.random.split(k, ids_c.shape[0])  # the same dropout in both passes: one key per chunk
        emb = lax.map(lambda a: embed(params, a[0], a[1], a[2], sc), (ids_c, mask_c, keys))
        sides.append((ids_c, mask_c, keys, lax.stop_gradient(emb.reshape(-1, emb.shape[-1]))))
    (_, _, _, q_emb), (_, _, _, p_emb) = sides
    loss, (g_q, g_p) = jax.value_and_grad(info_nce, argnums=(0, 1))(q_emb, p_emb, batch.p_valid, sc.temperature)

    def accumulate(total, chunk):
        ids, mask, k, g = chunk
        _, vjp = jax.vjp(lambda prm: embed(prm, ids, mask, k, sc), params)
        return jax.tree.map(jnp.add, total, vjp(g)[0]), None

    grads = jax.tree.map(jnp.zeros_like, params)
    for (ids_c, mask_c, keys, _), g in zip(sides, (g_q, g_p), strict=True):
        grads, _ = lax.scan(accumulate, grads, (ids_c, mask_c, keys, _chunks(g, c)))
    return loss, grads


def loss_and_grads(params: Params, batch: StepBatch, key, sc: StepConfig):
    """(InfoNCE loss, gradient with respect to params) of one batch."""
    return (_grad_cache if sc.chunk_size else _whole)(params, batch, key, sc)


@functools.partial(jax.jit, static_argnames=("sc", "optimizer"), donate_argnums=(0, 1))
def train_step(params: Params, opt_state, batch: StepBatch, key, *, sc: StepConfig, optimizer):
    """One optimiser step -> (params, opt_state, loss). ``optimizer``: an optax GradientTransformation."""
    import optax

    loss, grads = loss_and_grads(params, batch, key, sc)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
