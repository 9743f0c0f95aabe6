"""The vectors of a corpus run: its texts tokenised (or cut into windows), embedded, cut to ``truncate_dim``
and quantised as the run's options ask (``store.py``): ``e5lite.pipeline``'s steps, which ``Encoder.encode``
runs too, with the run's options as the pipeline's ``Recipe``.

Every writer computes its vectors here: the single-process writer, the per-host and Ray shards, the Ray
``Embedder`` and the int8/uint8 calibration, so that a run's vectors do not depend on which of them wrote it.
"""

from __future__ import annotations

import numpy as np

from ..errors import E5LiteError
from ..pipeline import Prepared, Recipe, quantize
from .store import _opt, stored_layout


def recipe(run: dict, dim: int) -> Recipe:
    """The pipeline's options for a run's vectors from a model of ``dim`` components, int8/uint8 with the
    manifest's ranges."""
    ranges = run.get("ranges")
    return Recipe(
        dim,
        prompt=run["prompt"],
        long_inputs=_opt(run, "long_inputs"),
        chunk_overlap=_opt(run, "chunk_overlap"),
        normalize=run["normalize"],
        truncate_dim=_opt(run, "truncate_dim"),
        precision=_opt(run, "precision"),
        ranges=None if ranges is None else np.asarray(ranges, np.float32),
    )


def prepare(enc, texts: list[str], run: dict, offset: int = 0) -> tuple[Prepared, np.ndarray]:
    """-> (what ``vectors`` embeds: the texts' token ids, or their windows in chunk mode; tokens per text [n]
    int64). ``offset``: the index of texts[0] in the input, for errors naming a text (only windows can fail)."""
    r = recipe(run, enc.dim)
    prepared = enc.prepare(texts, r, offset=offset if r.chunk else 0)
    return prepared, prepared.lengths


def vectors(enc, prepared: Prepared, run: dict, *, batch_size: int | None = None, local: bool = True) -> np.ndarray:
    """Float32 vectors [n, dim] as ``Encoder.encode`` computes them with the run's options. ``local``: on this
    process's own devices alone, with no collective (``Encoder.embed_ids`` under several JAX processes is SPMD:
    every process passes the same ids and all get the merged result; a corpus process holds rows no other
    process has)."""
    return enc.embed_prepared(
        prepared, recipe(run, enc.dim), batch_size=batch_size, show_progress_bar=False, local=local
    )


def stored(x: np.ndarray, run: dict) -> np.ndarray:
    """Float vectors -> what the run stores (the pipeline's quantisation, with the manifest's ranges)."""
    precision = _opt(run, "precision")
    if precision == "float32":
        return x
    if len(x) == 0:
        dtype, width = stored_layout(run)
        return np.zeros((0, width), dtype)
    if precision in ("int8", "uint8") and run.get("ranges") is None:
        raise E5LiteError(f"a {precision} run without ranges in its manifest; report this as a bug")
    return quantize(x, recipe(run, run["dim"]))


def calibration_ranges(
    enc, texts: list[str], run: dict, *, batch_size: int | None = None, local: bool = True
) -> list | None:
    """int8/uint8 ranges (per-dimension [min, max], as lists) of the float vectors of ``texts`` computed with the
    run's options; None for no texts (an empty input: nothing to quantise)."""
    if not texts:
        return None
    prepared, _ = prepare(enc, texts, run)
    x = vectors(enc, prepared, run, batch_size=batch_size, local=local)
    return np.vstack((x.min(axis=0), x.max(axis=0))).astype(np.float32).tolist()
