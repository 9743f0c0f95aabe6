"""Reading a corpus run back: ``read_embeddings``, ``iter_shards`` and ``open_embeddings``, for both formats.

Vectors come back as written (see ``store.py``): float32 [rows, dim], int8/uint8 [rows, dim], or packed sign
bits int8/uint8 [rows, ceil(dim / 8)]. A single-process run (format 1) lists its shards in its manifest; a
per-host or Ray run (format 2) is the union of the shards whose commit records exist, in plan order (= input
order), and names the shards still missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, overload

import numpy as np

from ..errors import E5LiteError
from ..files import read_json
from .store import FORMAT_SHARDED, MANIFEST, _listing, _read_manifest, _record, shard_stem, stored_layout


def open_embeddings(out_dir, *, allow_partial: bool = False) -> dict:
    """The manifest of a sharded ``e5lite embed --output DIR`` run; an unfinished run raises unless
    ``allow_partial``. For a per-host or Ray run (format 2) it is assembled from the shards' records:
    "shards" lists the committed ones in input order, "missing" the others."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise E5LiteError(f"{out_dir} has no {MANIFEST}: not an e5lite embed --output DIR folder")
    if manifest["format"] == FORMAT_SHARDED:
        return _open_sharded(out_dir, manifest, allow_partial)
    if not manifest["complete"] and not allow_partial:
        raise E5LiteError(
            f"{out_dir}: the run is unfinished ({manifest['rows']} rows so far); run e5lite embed "
            "again to resume it, or pass allow_partial=True"
        )
    return manifest


def iter_shards(
    out_dir, *, allow_partial: bool = False, embeddings: bool = True
) -> Iterator[tuple[np.ndarray | None, list]]:
    """(embeddings [rows, width] as written: float32, int8/uint8, or packed bits; ids) of each shard in input
    order, one shard in memory at a time; ``embeddings=False`` reads the ids alone (None in their place)."""
    out_dir = Path(out_dir)
    yield from _shards(out_dir, open_embeddings(out_dir, allow_partial=allow_partial), embeddings)


def _open_sharded(out_dir: Path, manifest: dict, allow_partial: bool) -> dict:
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    width, plan = manifest["width"], manifest["plan"]
    shards: list[dict] = []
    missing: list[int] = []
    row: int | None = 0  # None past a missing shard
    for k in range(len(plan)):
        rec = _record(out_dir, k, width, names)
        if rec is None:
            missing.append(k)
            row = None  # row numbers past a missing shard are not known yet
            continue
        shards.append({**rec, "first_row": row})
        row = None if row is None else row + rec["rows"]
    if missing and not allow_partial:
        shown = ", ".join(shard_stem(k, width) for k in missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise E5LiteError(
            f"{out_dir}: the run is unfinished: {len(missing)} of {len(plan)} shards are missing "
            f"({shown}); run the same e5lite embed command again to resume, or pass "
            "allow_partial=True"
        )
    return {
        **manifest,
        "shards": shards,
        "missing": missing,
        "rows": sum(s["rows"] for s in shards),
        "complete": not missing,
    }


def _shards(out_dir: Path, manifest: dict, embeddings: bool = True):
    if manifest["format"] == FORMAT_SHARDED:
        yield from _sharded(out_dir, manifest, embeddings)
        return
    dtype, width = stored_layout(manifest["run"])
    for shard in manifest["shards"]:
        emb = None
        if manifest["run"]["shard_format"] == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(out_dir / shard["files"][0], columns=None if embeddings else ["id"])
            if embeddings:
                emb = _parquet_vectors(table, shard["rows"], dtype)
            ids = table["id"].to_pylist()
        else:
            emb = np.load(out_dir / shard["files"][0]) if embeddings else None
            ids = read_json(out_dir / shard["files"][1])
        bad = emb is not None and (emb.shape != (shard["rows"], width) or emb.dtype != dtype)
        if bad or len(ids) != shard["rows"]:
            raise E5LiteError(
                f"{out_dir / shard['files'][0]} does not hold the {shard['rows']} rows the manifest "
                "records (changed after the run?)"
            )
        yield emb, ids


def _parquet_vectors(table, rows: int, dtype: np.dtype) -> np.ndarray:
    return np.asarray(table["embedding"].combine_chunks().flatten(), dtype).reshape(rows, -1)


def _sharded(out_dir: Path, manifest: dict, embeddings: bool):
    run = manifest["run"]
    dtype, width = stored_layout(run)
    for shard in manifest["shards"]:
        files, rows, emb, ids = shard["files"], shard["rows"], None, None
        if run["shard_format"] == "parquet":
            import pyarrow.parquet as pq

            columns = (["id"] if run["id_field"] is not None else []) + (["embedding"] if embeddings else [])
            table = pq.read_table(out_dir / files[0], columns=columns)
            if embeddings:
                emb = _parquet_vectors(table, rows, dtype)
            if run["id_field"] is not None:
                ids = table["id"].to_pylist()
        else:
            emb = np.load(out_dir / files[0]) if embeddings else None
            if run["id_field"] is not None:
                ids = read_json(out_dir / files[1])
        if ids is None and shard["first_row"] is not None:  # no id field: the row numbers
            ids = list(range(shard["first_row"], shard["first_row"] + rows))
        if (emb is not None and (emb.shape != (rows, width) or emb.dtype != dtype)) or (
            ids is not None and len(ids) != rows
        ):
            raise E5LiteError(
                f"{out_dir / files[0]} does not hold the {rows} rows its record "
                f"{shard_stem(shard['shard'], manifest['width'])}.json names (changed after the run?)"
            )
        yield emb, ids


@overload
def read_embeddings(
    out_dir: str | os.PathLike, *, with_ids: Literal[False] = False, allow_partial: bool = False
) -> np.ndarray: ...
@overload
def read_embeddings(
    out_dir: str | os.PathLike, *, with_ids: Literal[True], allow_partial: bool = False
) -> tuple[np.ndarray, list]: ...
@overload
def read_embeddings(
    out_dir: str | os.PathLike, *, with_ids: bool, allow_partial: bool = False
) -> np.ndarray | tuple[np.ndarray, list]: ...
def read_embeddings(
    out_dir: str | os.PathLike, *, with_ids: bool = False, allow_partial: bool = False
) -> np.ndarray | tuple[np.ndarray, list]:
    """The embeddings of a sharded ``e5lite embed --output DIR`` run as one array in input order, as written:
    float32 [rows, dim], int8/uint8 [rows, dim] (``--precision int8/uint8``; the manifest's "run" holds the
    "ranges") or packed sign bits int8/uint8 [rows, ceil(dim / 8)] (binary/ubinary); and the ids, a list,
    when ``with_ids``. An unfinished run raises unless ``allow_partial``
    (then a per-host or Ray run without --id-field has no ids past its first missing shard: row numbers are
    counted from the shards before)."""
    out_dir = Path(out_dir)
    manifest = open_embeddings(out_dir, allow_partial=allow_partial)
    dtype, width = stored_layout(manifest["run"])
    parts: list[np.ndarray] = [np.zeros((0, width), dtype)]
    ids: list = []
    for emb, shard_ids in _shards(out_dir, manifest):
        if with_ids and shard_ids is None:
            raise E5LiteError(
                f"{out_dir}: row numbers past the first missing shard are unknown until it is done; "
                "read the embeddings alone, or resume the run"
            )
        parts.append(emb)
        ids += shard_ids or []
    emb = np.concatenate(parts)
    return (emb, ids) if with_ids else emb
