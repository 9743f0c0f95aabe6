"""The vectors of a corpus run: its texts tokenised (or cut into windows), embedded, cut to ``truncate_dim``
and quantised as the run's options ask (``store.py``), in the steps and order of ``Encoder.encode``.

Every writer computes its vectors here: the single-process writer, the per-host and Ray shards, the Ray
``Embedder`` and the int8/uint8 calibration, so that a run's vectors do not depend on which of them wrote it.
"""

from __future__ import annotations

import numpy as np

from ..errors import E5LiteError
from ..long_inputs import Windows, embed_windows, split
from ..quantize import quantize_embeddings, truncate
from .store import _opt, stored_layout


def prepare(enc, texts: list[str], run: dict, offset: int = 0):
    """-> (what ``vectors`` embeds: token ids per text, or the texts' ``Windows`` in chunk mode; tokens per
    text [n] int64)."""
    if _opt(run, "long_inputs") == "chunk":
        windows = split(enc.tokenizer, texts, run["prompt"], _opt(run, "chunk_overlap"), offset)
        return windows, np.bincount(windows.owner, weights=windows.weight, minlength=windows.n).astype(np.int64)
    ids = enc.tokenize(texts, prompt=run["prompt"])
    return ids, np.fromiter((len(t) for t in ids), np.int64, len(ids))


def vectors(enc, prepared, run: dict, *, batch_size: int | None = None, local: bool = True) -> np.ndarray:
    """Float32 vectors [n, dim] as ``Encoder.encode`` computes them with the run's options (the same steps in
    the same order), on this process's devices alone when ``local`` (see ``embed_local``)."""
    dim = _opt(run, "truncate_dim")
    normalize = run["normalize"] and dim is None  # with a cut, normalised after it (sentence-transformers')
    n = prepared.n if isinstance(prepared, Windows) else len(prepared)
    if n == 0:
        return np.zeros((0, run["dim"]), np.float32)

    def embed(ids, norm):
        return enc.embed_ids(ids, normalize=norm, batch_size=batch_size, show_progress_bar=False, local=local)

    if isinstance(prepared, Windows):  # as encode
        x = embed_windows(prepared, embed, normalize, enc.dim)
    else:
        x = embed(prepared, normalize)
    return x if dim is None else truncate(x, dim, run["normalize"])


def stored(x: np.ndarray, run: dict) -> np.ndarray:
    """Float vectors -> what the run stores (``quantize_embeddings`` with the manifest's ranges)."""
    precision = _opt(run, "precision")
    if precision == "float32":
        return x
    if len(x) == 0:
        dtype, width = stored_layout(run)
        return np.zeros((0, width), dtype)
    ranges = run.get("ranges")
    if precision in ("int8", "uint8") and ranges is None:
        raise E5LiteError(f"a {precision} run without ranges in its manifest; report this as a bug")
    return quantize_embeddings(x, precision, None if ranges is None else np.asarray(ranges, np.float32))


def calibration_ranges(enc, texts: list[str], run: dict, *, batch_size: int | None = None, local: bool = True
                       ) -> list | None:
    """int8/uint8 ranges (per-dimension [min, max], as lists) of the float vectors of ``texts`` computed with the
    run's options; None for no texts (an empty input: nothing to quantise)."""
    if not texts:
        return None
    prepared, _ = prepare(enc, texts, run)
    x = vectors(enc, prepared, run, batch_size=batch_size, local=local)
    return np.vstack((x.min(axis=0), x.max(axis=0))).astype(np.float32).tolist()


def embed_local(enc, token_ids: list, *, normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of these token ids computed on this process's own devices only.

    ``Encoder.embed_ids`` under several JAX processes is SPMD: every process passes the same ids, embeds a
    share and all-gather the result. A corpus process holds rows no other process has, so it asks for the
    per-process path (``local=True``: no share, no all-gather)."""
    return enc.embed_ids(token_ids, normalize=normalize, batch_size=batch_size, show_progress_bar=False, local=True)
