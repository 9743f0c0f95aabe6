"""Resumable corpus embedding: ``e5lite embed --input FILE --output DIR`` and ``read_embeddings(DIR)``.

The input is streamed in shards of ``rows_per_shard`` rows. Each shard is written to a temporary file,
fsynced and renamed; only then does the manifest (also temp + fsync + rename) record it, together with the
input byte offset where the next shard starts. Whatever instant a run is killed at, the manifest names only
complete shards, so a restart skips them, seeks to the recorded offset and goes on; files the manifest does
not name (temporaries, a shard renamed just before the kill) are removed. Shard boundaries depend only on
the input and ``rows_per_shard``, so a resumed run computes exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import E5LiteError
from .files import read_json, read_records, write_atomic

MANIFEST = "manifest.json"
FORMAT = "e5lite-embeddings/1"
ROWS_PER_SHARD = 8192  # one tokenisation chunk of the engine per shard
TMP_SUFFIX = ".tmp"
SHARD_FORMATS = ("npy", "parquet")


def input_identity(path: Path, jsonl: bool) -> dict:
    """Path, size and sha256 of the input, and its row count (lines; non-blank lines for .jsonl)."""
    h, rows = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            rows += bool(line.strip()) if jsonl else 1
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest(), "rows": rows}


def read_rows(path: Path, offset: int, first_row: int, field: str | None, id_field: str | None
              ) -> Iterator[tuple[str, object, int]]:
    """(text, id, byte offset after the row) from ``offset`` on (see ``files.read_records``)."""
    with open(path, "rb") as f:
        f.seek(offset)
        # a resumed run starts mid-file, where the line number is not known (JSONL skips blank lines)
        yield from read_records(f, str(path), field=field, id_field=id_field, offset=offset, first_row=first_row,
                                first_line=None if offset else 1)


def _shard_names(k: int, fmt: str) -> list[str]:
    stem = f"shard-{k:05d}"
    return [f"{stem}.parquet"] if fmt == "parquet" else [f"{stem}.npy", f"{stem}.ids.json"]


def _encode_shard(emb: np.ndarray, ids: list, fmt: str) -> list[bytes]:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "embedding": col}), buf)
        return [buf.getvalue()]
    buf = io.BytesIO()
    np.save(buf, emb)
    return [buf.getvalue(), json.dumps(ids).encode()]


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / MANIFEST
    try:
        manifest = read_json(path, default=None)
    except E5LiteError as e:
        raise E5LiteError(f"{e}: not a valid manifest; use --overwrite to start again") from None
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise E5LiteError(f"{path} is not an e5lite embeddings manifest; use another --output")
    return manifest


def _clean(out_dir: Path, manifest: dict) -> None:
    """Removes temporaries and shard files the manifest does not name (left by a killed run)."""
    keep = {MANIFEST} | {n for s in manifest["shards"] for n in s["files"]}
    for p in out_dir.iterdir():
        if p.is_file() and p.name not in keep and (p.name.startswith("shard-") or p.name.endswith(TMP_SUFFIX)):
            p.unlink()


def embed_corpus(enc, input_path: Path, out_dir: Path, *, settings: dict, field: str | None = None,
                 id_field: str | None = None, prompt_name: str | None = None, task: str | None = None,
                 normalize: bool = True, rows_per_shard: int = ROWS_PER_SHARD, shard_format: str = "npy", batch_size: int | None = None,
                 overwrite: bool = False, show_progress: bool = True) -> dict:
    """Embeds every row of ``input_path`` into shards under ``out_dir``, resuming a previous run there.

    ``settings`` (model, dtype, max length, ...) is recorded in the manifest with the input's identity; a
    manifest that disagrees on any of them is refused unless ``overwrite``. Returns the final manifest.
    """
    from tqdm.auto import tqdm
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard format must be one of {SHARD_FORMATS}, got {shard_format!r}")
    if shard_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise E5LiteError("--shard-format parquet needs pyarrow: pip install pyarrow") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = input_identity(input_path, jsonl=field is not None)
    prompt = enc.prompt_prefix(prompt_name, None, task)  # bad names fail before anything is written
    run = {"input": identity, "field": field, "id_field": id_field, "prompt_name": prompt_name, "prompt": prompt,
           "normalize": normalize, "pooling": enc.pooling, "dim": enc.dim, "rows_per_shard": rows_per_shard,
           "shard_format": shard_format, **settings}
    manifest = None if overwrite else _read_manifest(out_dir)
    if manifest is not None:
        old = manifest["run"]
        changed = [f"input {k}" for k in identity if old["input"].get(k) != identity[k]]
        changed += [k for k in run if k != "input" and old.get(k) != run[k]]
        if changed:
            raise E5LiteError(f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
                              "start again or choose another --output")
    else:
        manifest = {"format": FORMAT, "run": run, "shards": [], "rows": 0, "offset": 0, "complete": False}
    _clean(out_dir, manifest)
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())

    tokens, t0 = 0, time.perf_counter()
    rows = read_rows(input_path, manifest["offset"], manifest["rows"], field, id_field)
    with tqdm(total=identity["rows"], initial=manifest["rows"], desc="embed", unit="row", disable=not show_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        while not manifest["complete"]:
            shard = list(itertools.islice(rows, rows_per_shard))
            if shard:
                texts, ids, offsets = (list(c) for c in zip(*shard))
                token_ids = enc.tokenize(texts, prompt=prompt)
                tokens += sum(len(t) for t in token_ids)
                emb = enc.embed_ids(token_ids, normalize=normalize, batch_size=batch_size, show_progress_bar=False)
                names = _shard_names(len(manifest["shards"]), shard_format)
                for name, data in zip(names, _encode_shard(emb, ids, shard_format)):
                    write_atomic(out_dir / name, data)
                manifest["shards"].append({"files": names, "rows": len(texts), "first_row": manifest["rows"],
                                           "end_offset": offsets[-1]})
                manifest["rows"] += len(texts)
                manifest["offset"] = offsets[-1]
            manifest["complete"] = len(shard) < rows_per_shard
            write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
            bar.update(len(shard))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
    return manifest


def open_embeddings(out_dir, *, allow_partial: bool = False) -> dict:
    """The manifest of a sharded ``e5lite embed --output DIR`` run; an unfinished run raises unless
    ``allow_partial``."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise E5LiteError(f"{out_dir} has no {MANIFEST}: not an e5lite embed --output DIR folder")
    if not manifest["complete"] and not allow_partial:
        raise E5LiteError(f"{out_dir}: the run is unfinished ({manifest['rows']} rows so far); run e5lite embed "
                          "again to resume it, or pass allow_partial=True")
    return manifest


def iter_shards(out_dir, *, allow_partial: bool = False, embeddings: bool = True
                ) -> Iterator[tuple[np.ndarray | None, list]]:
    """(embeddings float32 [rows, dim], ids) of each shard in input order, one shard in memory at a time;
    ``embeddings=False`` reads the ids alone (None in place of the embeddings)."""
    out_dir = Path(out_dir)
    yield from _shards(out_dir, open_embeddings(out_dir, allow_partial=allow_partial), embeddings)


def _shards(out_dir: Path, manifest: dict, embeddings: bool = True):
    for shard in manifest["shards"]:
        emb = None
        if manifest["run"]["shard_format"] == "parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(out_dir / shard["files"][0], columns=None if embeddings else ["id"])
            if embeddings:
                emb = np.asarray(table["embedding"].combine_chunks().flatten(), np.float32).reshape(
                    shard["rows"], -1)
            ids = table["id"].to_pylist()
        else:
            emb = np.load(out_dir / shard["files"][0]) if embeddings else None
            ids = read_json(out_dir / shard["files"][1])
        if (emb is not None and emb.shape != (shard["rows"], manifest["run"]["dim"])) or len(ids) != shard["rows"]:
            raise E5LiteError(f"{out_dir / shard['files'][0]} does not hold the {shard['rows']} rows the manifest "
                              "records (changed after the run?)")
        yield emb, ids


def read_embeddings(out_dir, *, with_ids: bool = False, allow_partial: bool = False):
    """The embeddings of a sharded ``e5lite embed --output DIR`` run as one float32 array [rows, dim] in
    input order (and the ids, a list, when ``with_ids``). An unfinished run raises unless ``allow_partial``."""
    out_dir = Path(out_dir)
    manifest = open_embeddings(out_dir, allow_partial=allow_partial)
    parts, ids = [np.zeros((0, manifest["run"]["dim"]), np.float32)], []
    for emb, shard_ids in _shards(out_dir, manifest):
        parts.append(emb)
        ids += shard_ids
    emb = np.concatenate(parts)
    return (emb, ids) if with_ids else emb
