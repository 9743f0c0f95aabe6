"""Compact vectors: Matryoshka-style truncation and scalar / binary quantisation of embeddings.

The semantics are sentence-transformers' (``SentenceTransformer.encode(truncate_dim=...)`` and
``sentence_transformers.quantization.quantize_embeddings``), written again in numpy so the core needs no torch:

- ``truncate(x_ND, dim, normalize)``: the first ``dim`` components; with ``normalize`` the rows are scaled to unit
  length *after* cutting, as ST's ``normalize_embeddings=True`` does (its ``truncate_dim`` slices the pooled
  vector before its normalisation step). ST's default for a model with a ``Normalize`` module
  (``normalize_embeddings=False``: the first ``dim`` components of the unit vector, not unit length themselves)
  is ``truncate(x_ND, dim, normalize=False)`` of normalised embeddings.
- ``quantize_embeddings``: "int8" / "uint8" cut each dimension's range [min, max] into 255 equal steps
  (``floor((x - min) / step)`` clipped to [0, 255]; int8 is that minus 128); the ranges are ``ranges`` [2, D]
  when given, else the per-dimension min and max of ``calibration_embeddings``, else of the embeddings
  themselves. "binary" / "ubinary" keep the sign bits (``x > 0``) packed 8 to a byte with ``np.packbits``
  (big-endian bit order, the last byte zero-padded; ubinary as uint8, binary as that minus 128 in int8).
"""

from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def output_dtype(precision: str) -> np.dtype:
    """The dtype ``quantize_embeddings`` returns for ``precision``."""
    check_precision(precision)
    return np.dtype({"float32": np.float32, "int8": np.int8, "binary": np.int8}.get(precision, np.uint8))


def output_dim(precision: str, dim: int) -> int:
    """The width of a quantised row of ``dim`` components: ``dim``, or ``ceil(dim / 8)`` bytes for the binary ones."""
    return (dim + 7) // 8 if check_precision(precision).endswith("binary") else dim


def check_truncate_dim(truncate_dim, dim: int) -> int | None:
    """``truncate_dim`` validated against the model's width ``dim`` (None: no truncation)."""
    if truncate_dim is None:
        return None
    if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
        raise TypeError(f"truncate_dim must be an int or None, got {type(truncate_dim).__name__} {truncate_dim!r:.40}")
    if not 1 <= truncate_dim <= dim:
        raise ValueError(f"truncate_dim must be between 1 and the embedding dimension {dim}, got {truncate_dim}")
    return int(truncate_dim)


def l2_normalize_np(x_ND: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32 (``pooling.l2_normalize`` / torch's ``F.normalize``, on the host)."""
    x_ND = np.asarray(x_ND, np.float32)
    return x_ND / np.maximum(np.linalg.norm(x_ND, axis=-1, keepdims=True), np.float32(eps))


def truncate(embeddings: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """The first ``dim`` components of each row (``None``: all of them), then scaled to unit length if
    ``normalize`` (ST: ``encode(truncate_dim=dim, normalize_embeddings=normalize)``)."""
    x_ND = np.asarray(embeddings, np.float32)
    dim = check_truncate_dim(dim, x_ND.shape[-1])
    if dim is not None:
        x_ND = x_ND[..., :dim]
    return l2_normalize_np(x_ND) if normalize else x_ND


def check_ranges(ranges, calibration_embeddings, dim: int) -> None:
    """Errors for ``ranges`` / ``calibration_embeddings`` that cannot quantise rows of ``dim`` components, named."""
    if ranges is not None:
        r = np.asarray(ranges)
        if r.shape != (2, dim):
            raise ValueError(
                f"ranges must have shape (2, {dim}) (row 0 the minimum, row 1 the maximum of each "
                f"dimension), got shape {r.shape}"
            )
        if not np.issubdtype(r.dtype, np.number) or not np.isfinite(r).all():
            raise ValueError(
                f"ranges must hold finite numbers, got dtype {r.dtype}"
                + ("" if not np.issubdtype(r.dtype, np.number) else " with NaN or inf")
            )
        bad = np.flatnonzero(r[0] > r[1])
        if len(bad):
            raise ValueError(
                f"ranges[0] (the minimum) is above ranges[1] (the maximum) in dimension {int(bad[0])}: "
                f"{r[0, bad[0]]} > {r[1, bad[0]]}"
            )
    if calibration_embeddings is not None:
        c = np.asarray(calibration_embeddings)
        if c.ndim != 2 or c.shape[1] != dim or c.shape[0] < 1:
            raise ValueError(f"calibration_embeddings must have shape (n >= 1, {dim}), got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.floating):
            raise TypeError(f"calibration_embeddings must be float embeddings, got dtype {c.dtype}")


def quantize_embeddings(embeddings, precision: str, ranges=None, calibration_embeddings=None) -> np.ndarray:
    """Float embeddings [..., D] -> ``precision``: float32 [..., D], int8/uint8 [..., D], binary (int8) /
    ubinary (uint8) [..., ceil(D / 8)]. ``ranges`` [2, D] (min and max per dimension) or
    ``calibration_embeddings`` [n, D] set the int8/uint8 buckets; without either they come from the embeddings
    themselves, which needs at least two rows. Both are ignored by the other precisions, as in ST."""
    check_precision(precision)
    x = np.asarray(embeddings)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"embeddings to quantize must be float, got dtype {x.dtype}")
    if x.ndim not in (1, 2):
        raise ValueError(f"embeddings must be one vector [D] or a matrix [n, D], got shape {x.shape}")
    if precision == "float32":
        return x.astype(np.float32)
    if precision.endswith("binary"):
        packed = np.packbits(x > 0, axis=-1)
        # ST writes (packed - 128).astype(int8): uint8 arithmetic wrapping modulo 256, i.e. this.
        return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)
    dim = x.shape[-1]
    check_ranges(ranges, calibration_embeddings, dim)
    if ranges is None:
        if calibration_embeddings is None and (x.ndim == 1 or x.shape[0] < 2):
            if x.ndim == 2 and x.shape[0] == 0:
                return np.zeros((0, dim), output_dtype(precision))
            raise ValueError(
                f"cannot compute {precision} quantization ranges from a single embedding: pass "
                "ranges (shape (2, dim)) or calibration_embeddings from a representative set"
            )
        calib = x if calibration_embeddings is None else np.asarray(calibration_embeddings)
        ranges = np.vstack((calib.min(axis=0), calib.max(axis=0)))
    # The same float32 operations as ST, in the same order, so equal inputs give equal buckets.
    ranges = np.asarray(ranges).astype(np.float32, copy=False)
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    q = np.clip(np.floor((x - starts) / steps), 0, 255)
    return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
