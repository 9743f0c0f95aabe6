"""Exact dense search: the top k corpus rows for each query, by blocks of the corpus on the devices.

Each corpus block is scored against a block of queries with one matmul and cut to its top k with
``lax.top_k``; a running top k per query is merged with each block's. So no [queries, corpus] score matrix
ever exists: memory is one block of scores, whatever the corpus size, and a corpus written by
``e5lite embed --output DIR`` is read one shard at a time. With several local devices each block is split
across them (each device keeps its share's top k, then the shares are merged).

Ties: equal scores keep the lower corpus index first (``lax.top_k`` is stable, and every merge puts the
lower indices first).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

METRICS = ("cosine", "dot")
CORPUS_BLOCK = 16384  # corpus rows scored at once: [QUERY_BLOCK, CORPUS_BLOCK] float32 scores is 64 MiB
QUERY_BLOCK = 1024


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


_normalize_rows = jax.jit(_normalize)  # keeps the block's sharding


def _block_top_k(q_QD, c_BD, valid_B, offset, *, k: int):
    """Top k (scores, corpus indices) of one corpus block for each query; rows past the corpus end score -inf."""
    s_QB = jnp.einsum("QD,BD->QB", q_QD, c_BD, precision=lax.Precision.HIGHEST)
    s_QB = jnp.where(valid_B[None, :], s_QB, -jnp.inf)
    scores, idx = lax.top_k(s_QB, k)
    return scores, idx + offset


@functools.partial(jax.jit, static_argnames=("k_block", "mesh"))
def _step(run_scores, run_idx, q_QD, c_BD, valid_B, offset, *, k_block: int, mesh):
    """Merges one block's top k_block (per device) into the running top k [Q, k] (running first: it holds the
    lower indices)."""
    if mesh is None:
        scores, idx = _block_top_k(q_QD, c_BD, valid_B, offset, k=k_block)
    else:  # each device takes the top k of its rows; the shares, in device order, are merged below
        rows = c_BD.shape[0] // mesh.size

        def local(q, c, valid, off):
            return _block_top_k(q, c, valid, off + lax.axis_index("data") * rows, k=k_block)

        spec = PartitionSpec("data")
        scores, idx = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(PartitionSpec(), spec, spec, PartitionSpec()),
            out_specs=PartitionSpec(None, "data"),
        )(q_QD, c_BD, valid_B, offset)
    scores = jnp.concatenate([run_scores, scores], axis=1)
    idx = jnp.concatenate([run_idx, idx], axis=1)
    top, pos = lax.top_k(scores, run_scores.shape[1])
    return top, jnp.take_along_axis(idx, pos, axis=1)


def _blocks(corpus, block_rows: int) -> Iterator[np.ndarray]:
    """Corpus rows in blocks of block_rows (the last may be shorter): from an array, or from an embeddings
    folder's shards, read one at a time."""
    if not isinstance(corpus, (str, os.PathLike)):
        for start in range(0, len(corpus), block_rows):
            yield corpus[start : start + block_rows]
        return
    from .shards import iter_shards

    parts, held = [], 0
    for emb, _ in iter_shards(Path(corpus)):
        assert emb is not None  # iter_shards reads the embeddings unless told not to
        while len(emb):
            take = emb[: block_rows - held]
            parts.append(take)
            held += len(take)
            emb = emb[len(take) :]
            if held == block_rows:
                yield np.concatenate(parts)
                parts, held = [], 0
    if held:
        yield np.concatenate(parts)


def corpus_size(corpus) -> tuple[int, int]:
    """(rows, dim) of an array or of an ``e5lite embed --output DIR`` folder, without reading the shards."""
    if isinstance(corpus, (str, os.PathLike)):
        from .shards import open_embeddings

        manifest = open_embeddings(corpus)
        precision = manifest["run"].get("precision", "float32")
        if precision != "float32":  # scoring the stored ints or packed bits as floats would be silently wrong
            raise ValueError(
                f"{corpus} holds {precision} embeddings (e5lite embed --precision {precision}); exact "
                "search needs float32 ones: embed the corpus without --precision"
            )
        return manifest["rows"], manifest["run"]["dim"]
    if getattr(corpus, "ndim", None) != 2:
        raise ValueError(
            f"corpus must be a [n, dim] array or an embeddings folder, got {type(corpus).__name__} "
            f"of shape {getattr(corpus, 'shape', None)}"
        )
    return corpus.shape


def search(
    query_emb: npt.ArrayLike,
    corpus: npt.ArrayLike | str | os.PathLike,
    k: int,
    *,
    metric: str = "cosine",
    block_rows: int = CORPUS_BLOCK,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best corpus rows for each query: (scores float32 [q, k'], indices int64 [q, k']), best first,
    where k' = min(k, corpus rows).

    ``corpus``: a float [n, dim] array, or the folder of an ``e5lite embed --output DIR`` run (indices are
    then row numbers in input order; read one shard at a time). ``metric``: "cosine" (rows are L2-normalised
    first) or "dot" (E5's embeddings are unit length already, so both agree on them). Equal scores rank the
    lower index first. Blocks are sharded over ``devices`` (default: all local devices).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    queries = np.asarray(query_emb, np.float32)
    n, dim = corpus_size(corpus)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [q, {dim}] to match the corpus, got shape {queries.shape}")
    devices = list(devices or jax.local_devices())
    mesh = Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
    k = min(k, n)
    rows = -(-min(block_rows, max(n, 1)) // len(devices)) * len(devices)  # one compiled shape, split evenly
    k_block = min(k, rows // len(devices))
    if queries.shape[0] == 0 or k == 0:
        return np.zeros((queries.shape[0], k), np.float32), np.zeros((queries.shape[0], k), np.int64)
    q_chunks = [queries[i : i + QUERY_BLOCK] for i in range(0, len(queries), QUERY_BLOCK)]
    if metric == "cosine":
        q_chunks = [np.asarray(_normalize(q)) for q in q_chunks]
    state = [(jnp.full((len(q), k), -jnp.inf), jnp.zeros((len(q), k), jnp.int32)) for q in q_chunks]
    place = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec("data")) if mesh else devices[0])
    offset, previous = 0, None
    for block in _blocks(corpus, rows):
        padded = np.zeros((rows, dim), np.float32)
        padded[: len(block)] = block
        c, valid = place(padded), place(np.arange(rows) < len(block))
        if metric == "cosine":  # once per block, not once per query chunk
            c = _normalize_rows(c)
        for j, q in enumerate(q_chunks):
            state[j] = _step(*state[j], q, c, valid, jnp.int32(offset), k_block=k_block, mesh=mesh)
        offset += len(block)
        # one block in flight: without a wait, dispatch runs ahead and every block's copy stays alive
        jax.block_until_ready(previous)
        previous = state[-1]
    if offset != n:
        raise ValueError(f"the corpus yielded {offset} rows, expected {n}")
    scores = np.concatenate([np.asarray(s) for s, _ in state])
    indices = np.concatenate([np.asarray(i) for _, i in state]).astype(np.int64)
    return scores, indices
