"""One process embedding one .txt/.jsonl file into row shards (format 1): ``embed_corpus``.

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

from ..errors import E5LiteError
from ..files import read_records, write_atomic
from .shard_files import _file_metadata
from .store import (
    FORMAT,
    FORMAT_SHARDED,
    MANIFEST,
    ROWS_PER_SHARD,
    TMP_SUFFIX,
    _arrow_type,
    _changed_settings,
    _check_shard_format,
    _read_manifest,
    output_options,
)
from .vector_steps import calibration_ranges, prepare, stored, vectors


def input_identity(path: Path, jsonl: bool) -> dict:
    """Path, size and sha256 of the input, and its row count (lines; non-blank lines for .jsonl)."""
    h, rows = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            rows += bool(line.strip()) if jsonl else 1
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": h.hexdigest(), "rows": rows}


def read_rows(
    path: Path, offset: int, first_row: int, field: str | None, id_field: str | None
) -> Iterator[tuple[str, object, int]]:
    """(text, id, byte offset after the row) from ``offset`` on (see ``files.read_records``)."""
    with open(path, "rb") as f:
        f.seek(offset)
        # a resumed run starts mid-file, where the line number is not known (JSONL skips blank lines)
        yield from read_records(
            f,
            str(path),
            field=field,
            id_field=id_field,
            offset=offset,
            first_row=first_row,
            first_line=None if offset else 1,
        )


def _shard_names(k: int, fmt: str) -> list[str]:
    stem = f"shard-{k:05d}"
    return [f"{stem}.parquet"] if fmt == "parquet" else [f"{stem}.npy", f"{stem}.ids.json"]


def _encode_shard(emb: np.ndarray, ids: list, fmt: str, metadata: dict) -> list[bytes]:
    """A shard's file contents; ``metadata``: a Parquet shard's schema metadata (``_file_metadata``, as per-host
    and Ray shards carry), for readers that never see the manifest."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), _arrow_type(emb.dtype)), emb.shape[1])
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "embedding": col}).replace_schema_metadata(metadata), buf)
        return [buf.getvalue()]
    buf = io.BytesIO()
    np.save(buf, emb)
    return [buf.getvalue(), json.dumps(ids).encode()]


def _clean(out_dir: Path, manifest: dict) -> None:
    """Removes temporaries and shard files the manifest does not name (left by a killed run)."""
    keep = {MANIFEST} | {n for s in manifest["shards"] for n in s["files"]}
    for p in out_dir.iterdir():
        if p.is_file() and p.name not in keep and (p.name.startswith("shard-") or p.name.endswith(TMP_SUFFIX)):
            p.unlink()


def embed_corpus(
    enc,
    input_path: Path,
    out_dir: Path,
    *,
    settings: dict,
    field: str | None = None,
    id_field: str | None = None,
    prompt_name: str | None = None,
    task: str | None = None,
    normalize: bool = True,
    rows_per_shard: int = ROWS_PER_SHARD,
    shard_format: str = "npy",
    batch_size: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    long_inputs: str = "truncate",
    chunk_overlap: int = 0,
    truncate_dim: int | None = None,
    precision: str = "float32",
    calibration: int | None = None,
    ranges=None,
) -> dict:
    """Embeds every row of ``input_path`` into shards under ``out_dir``, resuming a previous run there.

    ``settings`` (model, dtype, max length, ...) is recorded in the manifest with the input's identity and the
    vector options (``output_options``); a manifest that disagrees on any of them is refused unless
    ``overwrite``. int8/uint8 ranges not given are computed from the first ``calibration`` rows before the
    first shard and kept in the manifest. Returns the final manifest.
    """
    _check_layout(rows_per_shard, shard_format)
    output = output_options(
        enc.dim,
        long_inputs=long_inputs,
        chunk_overlap=chunk_overlap,
        truncate_dim=truncate_dim,
        precision=precision,
        calibration=calibration,
        ranges=ranges,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = input_identity(input_path, jsonl=field is not None)
    prompt = enc.prompt_prefix(prompt_name, None, task)  # bad names fail before anything is written
    run = {
        "input": identity,
        "field": field,
        "id_field": id_field,
        "prompt_name": prompt_name,
        "prompt": prompt,
        "normalize": normalize,
        "pooling": enc.pooling,
        "rows_per_shard": rows_per_shard,
        "shard_format": shard_format,
        **settings,
        **output,
    }
    manifest = _open_manifest(enc, input_path, out_dir, run, overwrite=overwrite, batch_size=batch_size)
    rows = read_rows(input_path, manifest["offset"], manifest["rows"], field, id_field)
    _embed_rows(enc, rows, out_dir, manifest, run, batch_size=batch_size, show_progress=show_progress)
    return manifest


def _check_layout(rows_per_shard: int, shard_format: str) -> None:
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
    _check_shard_format(shard_format)


def _open_manifest(enc, input_path: Path, out_dir: Path, run: dict, *, overwrite: bool, batch_size: int | None) -> dict:
    """The manifest of a run of ``run`` in out_dir: the one there (resumed: same input and settings), else a
    new one (int8/uint8 ranges fixed from the first rows); written, with what a killed run left removed."""
    if run["long_inputs"] == "chunk":
        prepare(enc, [""], run)  # an overlap too large for the window fails before anything is written
    manifest = None if overwrite else _read_manifest(out_dir)
    if manifest is not None:
        _check_resume(out_dir, manifest["run"], run)
    else:
        if run["calibration"] is not None:  # fixed once, before the first shard: every shard's buckets
            rows = read_rows(input_path, 0, 0, run["field"], run["id_field"])
            first = [t for t, _, _ in itertools.islice(rows, run["calibration"])]
            run["ranges"] = calibration_ranges(enc, first, run, batch_size=batch_size, local=False)
        manifest = {"format": FORMAT, "run": run, "shards": [], "rows": 0, "offset": 0, "complete": False}
    _clean(out_dir, manifest)
    write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _check_resume(out_dir: Path, old: dict, run: dict) -> None:
    """Refuses to resume a run in out_dir whose manifest records another input or other settings."""
    if "input" not in old:
        raise E5LiteError(
            f"{out_dir} holds a per-host or Ray run ({FORMAT_SHARDED}); finish it with the same "
            "command (a folder, glob or Parquet input, or --shard-size), or choose another --output"
        )
    identity = run["input"]
    changed = [f"input {k}" for k in identity if old["input"].get(k) != identity[k]]
    changed += _changed_settings(old, run)
    if changed:
        raise E5LiteError(
            f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
            "start again or choose another --output"
        )


def _embed_rows(
    enc, rows, out_dir: Path, manifest: dict, run: dict, *, batch_size: int | None, show_progress: bool
) -> None:
    """Embeds ``rows`` (the input from the manifest's offset on) shard by shard, each shard's files written
    before the manifest names them, until the input ends. ``run``: this command's (its input's row count,
    rows per shard, shard format)."""
    from tqdm.auto import tqdm

    total, rows_per_shard, shard_format = run["input"]["rows"], run["rows_per_shard"], run["shard_format"]
    tokens, t0 = 0, time.perf_counter()
    with tqdm(
        total=total,
        initial=manifest["rows"],
        desc="embed",
        unit="row",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        while not manifest["complete"]:
            shard = list(itertools.islice(rows, rows_per_shard))
            if shard:
                texts, ids, offsets = (list(c) for c in zip(*shard, strict=True))
                prepared, lengths = prepare(enc, texts, manifest["run"], manifest["rows"])
                tokens += int(lengths.sum())
                emb = stored(
                    vectors(enc, prepared, manifest["run"], batch_size=batch_size, local=False), manifest["run"]
                )
                k = len(manifest["shards"])
                # named as per-host runs name a shard's input (corpus_inputs.describe_shard)
                where = f"{Path(run['input']['path']).name} bytes {manifest['offset']}-{offsets[-1]}"
                meta = _file_metadata(manifest["run"], k, where)
                names = _shard_names(k, shard_format)
                for name, data in zip(names, _encode_shard(emb, ids, shard_format, meta), strict=True):
                    write_atomic(out_dir / name, data)
                manifest["shards"].append(
                    {"files": names, "rows": len(texts), "first_row": manifest["rows"], "end_offset": offsets[-1]}
                )
                manifest["rows"] += len(texts)
                manifest["offset"] = offsets[-1]
            manifest["complete"] = len(shard) < rows_per_shard
            write_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
            bar.update(len(shard))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
