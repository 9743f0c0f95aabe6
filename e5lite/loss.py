"""The contrastive loss E5 was trained with: InfoNCE over in-batch candidates, temperature 0.01."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TEMPERATURE = 0.01


def info_nce(q_BD, p_PD, p_valid_P=None, temperature: float = TEMPERATURE):
    """Mean cross-entropy of query i against every candidate, the target being candidate i.

    ``q_BD``: L2-normalised query embeddings; ``p_PD``: the B positives (row i is query i's), then the hard
    negatives of the whole batch; ``p_valid_P`` marks real candidate rows (padding rows take no part).
    Logits are cosine similarities / temperature, in float32.
    """
    B = q_BD.shape[0]
    logits_BP = (
        jnp.einsum("BD,PD->BP", q_BD.astype(jnp.float32), p_PD.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        / temperature
    )
    if p_valid_P is not None:
        logits_BP = jnp.where(p_valid_P[None, :], logits_BP, -jnp.inf)
    target_B = logits_BP[jnp.arange(B), jnp.arange(B)]
    return jnp.mean(jax.nn.logsumexp(logits_BP, axis=-1) - target_B)
