"""Resumable corpus embedding: ``e5lite embed --input FILE --output DIR`` and ``read_embeddings(DIR)``.

Two layouts. A single process embedding one .txt/.jsonl file writes row shards in sequence (this
docstring, format 1); per-host runs under jax.distributed, Ray runs and runs over folders, globs or Parquet
write shards planned up front, each committed by its own record (format 2; see the notes before
``FORMAT_SHARDED``). ``read_embeddings`` reads both.

The input is streamed in shards of ``rows_per_shard`` rows. Each shard is written to a temporary file,
fsynced and renamed; only then does the manifest (also temp + fsync + rename) record it, together with the
input byte offset where the next shard starts. Whatever instant a run is killed at, the manifest names only
complete shards, so a restart skips them, seeks to the recorded offset and goes on; files the manifest does
not name (temporaries, a shard renamed just before the kill) are removed. Shard boundaries depend only on
the input and ``rows_per_shard``, so a resumed run computes exactly the batches an uninterrupted one does.

Every layout stores the vectors as the run asks (see "What a run stores" below): long inputs truncated or cut
into windows, ``truncate_dim`` components, float32 or quantised (int8/uint8 [rows, dim], packed sign bits
int8/uint8 [rows, ceil(dim / 8)]), and ``read_embeddings`` returns them as written.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .corpus_inputs import (CHUNK_ROWS, SHARD_BYTES, describe_inputs, describe_shard, parse_size, plan_shards,
                            read_shard, resolve_inputs, shard_bytes_of)
from .errors import E5LiteError, InputError
from .files import fsync, read_json, read_records, write_atomic
from .long_inputs import Windows, check_long_inputs, embed_windows, split
from .quantize import (check_precision, check_ranges, check_truncate_dim, output_dim, output_dtype,
                       quantize_embeddings, truncate)

MANIFEST = "manifest.json"
FORMAT = "e5lite-embeddings/1"
ROWS_PER_SHARD = 8192  # one tokenisation chunk of the engine per shard
TMP_SUFFIX = ".tmp"
SHARD_FORMATS = ("npy", "parquet")


# ------------------------------------------------------------------ what a run stores: long inputs, compact vectors
#
# A run's manifest records, beside the model and the prompt, how each vector is made (the order is
# ``Encoder.encode``'s, sentence-transformers'): "long_inputs" ("truncate", or "chunk": windows of
# "chunk_overlap" shared tokens, averaged; ``long_inputs.py``), then the first "truncate_dim" components
# (normalised after the cut when "normalize"), then "precision". "dim" is the vector's dimension after the
# cut; a row stores ``quantize.output_dim(precision, dim)`` values of ``quantize.output_dtype(precision)``.
#
# int8/uint8 buckets come from per-dimension [min, max] "ranges" [2, dim] that must be the same for every
# shard, every process and every resume: ranges computed per shard would put equal values of two shards in
# different buckets. So they are fixed once, before any shard is embedded, and written into the manifest:
# either given (``ranges``: the CLI's --ranges FILE.npy or an earlier run's folder), or computed from the
# float vectors of the first "calibration" texts of the input (sentence-transformers' calibration set;
# default CALIBRATION_ROWS). A resumed run, every process of a per-host run (process 0 computes them and
# hands them over jax.distributed's key-value store) and every Ray actor use the manifest's ranges.

CALIBRATION_ROWS = 1000
# The keys these options add to a run, with the values a manifest written before them implies (it resumes).
OUTPUT_DEFAULTS = {"long_inputs": "truncate", "chunk_overlap": 0, "truncate_dim": None, "precision": "float32",
                   "calibration": None, "ranges": None}
_RANGES_KEY = "e5lite-embed-ranges"  # process 0 -> the others, under jax.distributed


def output_options(dim: int, *, long_inputs: str = "truncate", chunk_overlap: int = 0,
                   truncate_dim: int | None = None, precision: str = "float32", calibration: int | None = None,
                   ranges=None) -> dict:
    """The run keys of these options for a model of ``dim`` components, validated (errors name the option).
    int8/uint8 without ``ranges`` take them from the first ``calibration`` texts (default CALIBRATION_ROWS)."""
    check_long_inputs(long_inputs, chunk_overlap)
    truncate_dim = check_truncate_dim(truncate_dim, dim)
    check_precision(precision)
    out_dim = truncate_dim or dim
    scalar = precision in ("int8", "uint8")
    if calibration is not None:
        if isinstance(calibration, bool) or not isinstance(calibration, (int, np.integer)) or calibration < 1:
            raise ValueError(f"calibration must be a positive number of texts, got {calibration!r}")
        if not scalar:
            raise ValueError(f"calibration sets int8/uint8 ranges; precision {precision!r} has none")
        if ranges is not None:
            raise ValueError("pass ranges or calibration, not both: the ranges are given, or computed from the "
                             "first calibration texts")
    if ranges is not None:
        if not scalar:
            raise ValueError(f"ranges are int8/uint8 buckets; precision {precision!r} has none")
        check_ranges(ranges, None, out_dim)
        ranges = np.asarray(ranges, np.float32).tolist()  # exact in JSON: float32 -> float64 -> float32
    elif scalar and calibration is None:
        calibration = CALIBRATION_ROWS
    return {"dim": out_dim, "long_inputs": long_inputs, "chunk_overlap": int(chunk_overlap),
            "truncate_dim": truncate_dim, "precision": precision,
            "calibration": None if calibration is None else int(calibration), "ranges": ranges}


def load_ranges(spec) -> np.ndarray:
    """int8/uint8 ranges [2, dim] from a .npy file, or from the manifest of an earlier run's folder (so that
    queries, or another corpus, share a corpus's buckets). Errors name the file."""
    path = Path(spec)
    if path.is_dir():
        manifest = _read_manifest(path)
        if manifest is None:
            raise InputError(f"--ranges {spec}: a folder without {MANIFEST} (pass a .npy file [2, dim], or the "
                             "folder of an e5lite embed --precision int8/uint8 run)")
        ranges = manifest["run"].get("ranges")
        if ranges is None:
            raise InputError(f"--ranges {spec}: that run has no int8/uint8 ranges (precision "
                             f"{manifest['run'].get('precision', 'float32')})")
        return np.asarray(ranges, np.float32)
    if not path.is_file():
        raise InputError(f"--ranges {spec}: no such file or folder")
    try:
        ranges = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"--ranges {spec}: not a .npy array ({e})") from None
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise InputError(f"--ranges {spec}: expected shape (2, dim) (row 0 the minimum, row 1 the maximum of each "
                         f"dimension), got {ranges.shape}")
    return ranges


def stored_layout(run: dict) -> tuple[np.dtype, int]:
    """(dtype, values per row) of a run's stored vectors."""
    precision = run.get("precision", "float32")
    return output_dtype(precision), output_dim(precision, run["dim"])


def _opt(run: dict, key: str):
    return run.get(key, OUTPUT_DEFAULTS.get(key))


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


def _changed_settings(old: dict, new: dict, skip=("input", "inputs")) -> list[str]:
    """The keys of run ``new`` whose value differs in ``old`` (a key ``old`` lacks: its default). Ranges to be
    computed from a calibration set are not compared: a resumed run takes the manifest's."""
    changed = []
    for k, v in new.items():
        if k in skip or (k == "ranges" and v is None and new.get("calibration") is not None):
            continue
        if old.get(k, OUTPUT_DEFAULTS.get(k)) != v:
            changed.append(k)
    return changed


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


def _check_shard_format(shard_format: str) -> None:
    """A known shard format, and pyarrow installed for Parquet (before any work starts)."""
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard format must be one of {SHARD_FORMATS}, got {shard_format!r}")
    if shard_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise E5LiteError("Parquet shards need pyarrow: pip install 'e5lite[parquet]'") from None


def _shard_names(k: int, fmt: str) -> list[str]:
    stem = f"shard-{k:05d}"
    return [f"{stem}.parquet"] if fmt == "parquet" else [f"{stem}.npy", f"{stem}.ids.json"]


def _arrow_type(dtype: np.dtype):
    import pyarrow as pa
    return {"float32": pa.float32(), "int8": pa.int8(), "uint8": pa.uint8()}[np.dtype(dtype).name]


def _encode_shard(emb: np.ndarray, ids: list, fmt: str) -> list[bytes]:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), _arrow_type(emb.dtype)), emb.shape[1])
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
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, FORMAT_SHARDED):
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
                 overwrite: bool = False, show_progress: bool = True, long_inputs: str = "truncate",
                 chunk_overlap: int = 0, truncate_dim: int | None = None, precision: str = "float32",
                 calibration: int | None = None, ranges=None) -> dict:
    """Embeds every row of ``input_path`` into shards under ``out_dir``, resuming a previous run there.

    ``settings`` (model, dtype, max length, ...) is recorded in the manifest with the input's identity and the
    vector options (``output_options``); a manifest that disagrees on any of them is refused unless
    ``overwrite``. int8/uint8 ranges not given are computed from the first ``calibration`` rows before the
    first shard and kept in the manifest. Returns the final manifest.
    """
    from tqdm.auto import tqdm
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be a positive int, got {rows_per_shard!r}")
    _check_shard_format(shard_format)
    output = output_options(enc.dim, long_inputs=long_inputs, chunk_overlap=chunk_overlap,
                            truncate_dim=truncate_dim, precision=precision, calibration=calibration, ranges=ranges)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = input_identity(input_path, jsonl=field is not None)
    prompt = enc.prompt_prefix(prompt_name, None, task)  # bad names fail before anything is written
    run = {"input": identity, "field": field, "id_field": id_field, "prompt_name": prompt_name, "prompt": prompt,
           "normalize": normalize, "pooling": enc.pooling, "rows_per_shard": rows_per_shard,
           "shard_format": shard_format, **settings, **output}
    if output["long_inputs"] == "chunk":
        prepare(enc, [""], run)  # an overlap too large for the window fails before anything is written
    manifest = None if overwrite else _read_manifest(out_dir)
    if manifest is not None:
        old = manifest["run"]
        if "input" not in old:
            raise E5LiteError(f"{out_dir} holds a per-host or Ray run ({FORMAT_SHARDED}); finish it with the same "
                              "command (a folder, glob or Parquet input, or --shard-size), or choose another --output")
        changed = [f"input {k}" for k in identity if old["input"].get(k) != identity[k]]
        changed += _changed_settings(old, run)
        if changed:
            raise E5LiteError(f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
                              "start again or choose another --output")
    else:
        if run["calibration"] is not None:  # fixed once, before the first shard: every shard's buckets
            first = [t for t, _, _ in itertools.islice(read_rows(input_path, 0, 0, field, id_field),
                                                       run["calibration"])]
            run["ranges"] = calibration_ranges(enc, first, run, batch_size=batch_size, local=False)
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
                prepared, lengths = prepare(enc, texts, manifest["run"], manifest["rows"])
                tokens += int(lengths.sum())
                emb = stored(vectors(enc, prepared, manifest["run"], batch_size=batch_size, local=False),
                             manifest["run"])
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
    ``allow_partial``. For a per-host or Ray run (format 2) it is assembled from the shards' records:
    "shards" lists the committed ones in input order, "missing" the others."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is None:
        raise E5LiteError(f"{out_dir} has no {MANIFEST}: not an e5lite embed --output DIR folder")
    if manifest["format"] == FORMAT_SHARDED:
        return _open_sharded(out_dir, manifest, allow_partial)
    if not manifest["complete"] and not allow_partial:
        raise E5LiteError(f"{out_dir}: the run is unfinished ({manifest['rows']} rows so far); run e5lite embed "
                          "again to resume it, or pass allow_partial=True")
    return manifest


def iter_shards(out_dir, *, allow_partial: bool = False, embeddings: bool = True
                ) -> Iterator[tuple[np.ndarray | None, list]]:
    """(embeddings [rows, width] as written: float32, int8/uint8, or packed bits; ids) of each shard in input
    order, one shard in memory at a time; ``embeddings=False`` reads the ids alone (None in their place)."""
    out_dir = Path(out_dir)
    yield from _shards(out_dir, open_embeddings(out_dir, allow_partial=allow_partial), embeddings)


def _open_sharded(out_dir: Path, manifest: dict, allow_partial: bool) -> dict:
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    width, plan = manifest["width"], manifest["plan"]
    shards, missing, row = [], [], 0
    for k in range(len(plan)):
        rec = _record(out_dir, k, width, names)
        if rec is None:
            missing.append(k)
            row = None  # row numbers past a missing shard are not known yet
            continue
        shards.append({**rec, "first_row": row})
        row = None if row is None else row + rec["rows"]
    if missing and not allow_partial:
        shown = ", ".join(shard_stem(k, width) for k in missing[:8]) + (f" and {len(missing) - 8} more"
                                                                       if len(missing) > 8 else "")
        raise E5LiteError(f"{out_dir}: the run is unfinished: {len(missing)} of {len(plan)} shards are missing "
                          f"({shown}); run the same e5lite embed command again to resume, or pass "
                          "allow_partial=True")
    return {**manifest, "shards": shards, "missing": missing, "rows": sum(s["rows"] for s in shards),
            "complete": not missing}


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
            raise E5LiteError(f"{out_dir / shard['files'][0]} does not hold the {shard['rows']} rows the manifest "
                              "records (changed after the run?)")
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
                ids is not None and len(ids) != rows):
            raise E5LiteError(f"{out_dir / files[0]} does not hold the {rows} rows its record "
                              f"{shard_stem(shard['shard'], manifest['width'])}.json names (changed after the run?)")
        yield emb, ids


def read_embeddings(out_dir, *, with_ids: bool = False, allow_partial: bool = False):
    """The embeddings of a sharded ``e5lite embed --output DIR`` run as one array in input order, as written:
    float32 [rows, dim], int8/uint8 [rows, dim] (``--precision int8/uint8``; the manifest's "run" holds the
    "ranges") or packed sign bits int8/uint8 [rows, ceil(dim / 8)] (binary/ubinary); and the ids, a list,
    when ``with_ids``. An unfinished run raises unless ``allow_partial``
    (then a per-host or Ray run without --id-field has no ids past its first missing shard: row numbers are
    counted from the shards before)."""
    out_dir = Path(out_dir)
    manifest = open_embeddings(out_dir, allow_partial=allow_partial)
    dtype, width = stored_layout(manifest["run"])
    parts, ids = [np.zeros((0, width), dtype)], []
    for emb, shard_ids in _shards(out_dir, manifest):
        if with_ids and shard_ids is None:
            raise E5LiteError(f"{out_dir}: row numbers past the first missing shard are unknown until it is done; "
                              "read the embeddings alone, or resume the run")
        parts.append(emb)
        ids += shard_ids or []
    emb = np.concatenate(parts)
    return (emb, ids) if with_ids else emb


# ------------------------------------------------------------------------------- per-host and Ray runs (format 2)
#
# ``e5lite embed --output DIR`` with --coordinator/--distributed (one process per host under jax.distributed),
# --engine ray, a folder, glob or Parquet input, or --shard-size. The input is cut into shards by
# ``corpus_inputs.plan_shards`` (byte ranges of .txt/.jsonl, Parquet row groups): a function of the files'
# sizes and footers, so every process computes the same plan without reading the data. Process i of N embeds
# the shards k with k % N == i: a fixed function of the shard index and the process count, so the split is
# complete whatever N is, and a rerun with another N still finds each shard's files under the shard's name.
#
# DIR/manifest.json (written by process 0, or the Ray driver): the run's settings, the inputs' identity (path,
# size, modification time, Parquet row groups) and the shard plan. Each shard k is committed by its own
# files: the embeddings (shard-K.npy [+ shard-K.ids.json] or shard-K.parquet), each streamed to a temporary,
# fsynced and renamed, then DIR/shard-K.json, the commit record (rows, tokens, files, input range, writer),
# written atomically last. A shard is done when its record exists and names files that exist; so a process
# only ever writes (and on a rerun cleans) the files of its own shards, never a file another process writes,
# and no process waits for another: there is no collective on the data path. ``read_embeddings`` takes the
# union in plan order (= input order) and names the shards still missing.

FORMAT_SHARDED = "e5lite-embeddings/2"
_SHARD_NAME = re.compile(r"^\.?shard-(\d+)\.")


def shard_stem(k: int, width: int) -> str:
    return f"shard-{k:0{width}d}"


def _file_metadata(run: dict, k: int, where: str) -> dict:
    """What a Parquet shard carries in its own metadata, for readers that never see the manifest."""
    keep = ("model", "revision", "dtype", "max_length", "prompt_name", "prompt", "pooling", "normalize", "dim")
    # the vector options too (ranges included: what quantises queries into the same buckets)
    return {"e5lite": json.dumps({**{key: run.get(key) for key in keep}, **{key: _opt(run, key) for key in
                                                                             OUTPUT_DEFAULTS},
                                  "shard": k, "input": where})}


class ShardOutput:
    """The files of one shard, streamed chunk by chunk to temporaries in ``out_dir`` and renamed into place by
    ``commit`` (fsynced first), so memory holds one chunk whatever the shard's size, and a kill leaves only
    temporaries, which the next run removes."""

    def __init__(self, out_dir: Path, stem: str, fmt: str, dim: int, with_ids: bool, metadata: dict,
                 dtype=np.float32):
        import tempfile
        # dim: values per row as stored (packed bits: ceil(dim / 8) bytes); dtype: float32, int8 or uint8
        self.out_dir, self.stem, self.fmt, self.dim, self.rows = out_dir, stem, fmt, dim, 0
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._tmp: dict[str, str] = {}
        names = ([f"{stem}.parquet"] if fmt == "parquet" else
                 [f"{stem}.npy"] + ([f"{stem}.ids.json"] if with_ids else []))
        for name in names:
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=TMP_SUFFIX)
            os.close(fd)
            self._tmp[name] = tmp
        self._ids = self._emb = self._pq = None
        self._with_ids, self._metadata = with_ids, metadata
        if fmt == "parquet":
            pass  # the writer opens with the first chunk, whose ids give the id column its type
        else:
            self._emb = open(self._tmp[names[0]], "wb")
            np.lib.format.write_array_header_1_0(self._emb, self._header(0))
            self._header_len = self._emb.tell()
            if with_ids:
                self._ids = open(self._tmp[names[1]], "w", encoding="utf-8")
                self._ids.write("[")

    def _open_parquet(self, schema) -> None:
        import pyarrow.parquet as pq
        self._schema = schema.with_metadata(self._metadata)
        self._pq = pq.ParquetWriter(self._tmp[f"{self.stem}.parquet"], self._schema)

    def _header(self, rows: int) -> dict:
        return {"descr": self.dtype.str, "fortran_order": False, "shape": (rows, self.dim)}

    def append(self, emb: np.ndarray, ids: list | None) -> None:
        if emb.dtype.kind != self.dtype.kind or emb.dtype.itemsize != self.dtype.itemsize:  # no silent cast
            raise E5LiteError(f"{self.stem}: {emb.dtype} rows for a shard of {self.dtype}; report this as a bug")
        emb = np.ascontiguousarray(emb, dtype=self.dtype)
        if self.fmt == "parquet":
            import pyarrow as pa
            arrays = {"embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), _arrow_type(emb.dtype)),
                                                                     self.dim)}
            if self._with_ids:
                try:
                    arrays = {"id": pa.array(ids), **arrays}
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise E5LiteError(f"{self.stem}: the ids do not fit one Parquet column ({e}); use "
                                      "--shard-format npy") from None
            table = pa.table(arrays)
            if self._pq is None:
                self._open_parquet(table.schema)
            elif table.schema.field(0).type != self._schema.field(0).type:  # no cast: 5 must not become "5"
                raise E5LiteError(f"{self.stem}: ids of type {table.schema.field(0).type} after ids of type "
                                  f"{self._schema.field(0).type}; Parquet needs one type: use --shard-format npy")
            self._pq.write_table(table.replace_schema_metadata(self._schema.metadata))
        else:
            self._emb.write(emb.tobytes())
            if self._ids is not None:
                self._ids.write(("," if self.rows else "") + ",".join(json.dumps(i) for i in ids))
        self.rows += len(emb)

    def commit(self) -> list[str]:
        """Closes, fsyncs and renames the files into place; returns their names."""
        if self.fmt == "parquet":
            if self._pq is None:  # no rows: the file still says what it would hold
                import pyarrow as pa
                self._open_parquet(pa.schema(([pa.field("id", pa.string())] if self._with_ids else [])
                                             + [pa.field("embedding", pa.list_(_arrow_type(self.dtype), self.dim))]))
            self._pq.close()
        else:
            # the header was written for 0 rows with room to grow (numpy pads it): now the real count
            self._emb.seek(0)
            np.lib.format.write_array_header_1_0(self._emb, self._header(self.rows))
            if self._emb.tell() != self._header_len:
                raise E5LiteError(f"{self.stem}.npy: the header grew past its padding; report this as a bug")
            self._emb.close()
            if self._ids is not None:
                self._ids.write("]")
                self._ids.close()
        for name, tmp in self._tmp.items():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.out_dir / name)
        fsync(self.out_dir)
        return list(self._tmp)

    def abort(self) -> None:
        for f in (self._emb, self._ids):
            if f is not None and not f.closed:
                f.close()
        if self._pq is not None:
            try:
                self._pq.close()
            except Exception:  # a half-written file is removed below either way
                pass
        for tmp in self._tmp.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def embed_local(enc, token_ids: list, *, normalize: bool = True, batch_size: int | None = None) -> np.ndarray:
    """Embeddings of these token ids computed on this process's own devices only.

    ``Encoder.embed_ids`` under several JAX processes is SPMD: every process passes the same ids, embeds a
    share and all-gather the result. A corpus process holds rows no other process has, so it asks for the
    per-process path (``local=True``: no share, no all-gather)."""
    return enc.embed_ids(token_ids, normalize=normalize, batch_size=batch_size, show_progress_bar=False, local=True)


def _groups(shards, chunk_rows: int):
    """Pieces of consecutive shards grouped into engine calls of up to ``chunk_rows`` rows: small shards (a
    small --shard-size, Parquet files of small row groups) share a call instead of each paying for its own
    (the layout chosen per call, the last, part-empty batch of each length). Yields lists of pieces
    (k, where, texts, ids, input bytes, last piece of shard k); an empty shard gives one empty last piece."""
    group, rows = [], 0
    for k, where, chunks in shards:
        it = iter(chunks)
        piece = next(it, None)
        while True:
            following = next(it, None) if piece is not None else None
            texts, ids, nbytes = piece if piece is not None else ([], None, 0)
            while True:  # a piece larger than the room left is cut, so that calls stay at chunk_rows
                room = chunk_rows - rows
                final_part = len(texts) <= room
                take = texts if final_part else texts[:room]
                group.append((k, where, take, None if ids is None else ids[:len(take)], nbytes if final_part else 0,
                              final_part and following is None))
                rows += len(take)
                texts, ids = texts[len(take):], None if ids is None else ids[len(take):]
                if rows >= chunk_rows:
                    yield group
                    group, rows = [], 0
                if not texts:
                    break
            if following is None:
                break
            piece = following
    if group:
        yield group


def _tokenized(enc, groups, run: dict):
    """(pieces, (what ``vectors`` embeds, tokens per text)) per group (``prepare``: token ids, or windows in
    chunk mode); the next group is read and tokenised on a thread while the caller embeds this one (the
    tokenizer releases the GIL), so the devices do not wait for the input."""
    import concurrent.futures
    it = iter(groups)

    def produce():
        group = next(it, None)
        if group is None:
            return None
        texts = [t for piece in group for t in piece[2]]
        return group, prepare(enc, texts, run) if texts else ([], np.zeros(0, np.int64))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(produce)
        while (item := future.result()) is not None:
            future = pool.submit(produce)
            yield item


def embed_shards(enc, out_dir, run: dict, width: int, shards, *, writer: str, batch_size: int | None = None,
                 progress=None, chunk_rows: int | None = None, on_error=None):
    """Embeds shards into their files and commits each with its record DIR/shard-K.json as soon as its last row
    is written; yields the records. ``shards``: (k, where, chunks) with chunks (texts, ids or None, input
    bytes) tuples; consecutive shards share engine calls of up to ``chunk_rows`` rows (default: the engine's
    ``chunk_texts``, 8,192). ``run``: the manifest's run settings. ``progress(rows, tokens, input bytes)`` is
    called after each call. On an error, the shards not yet committed are left missing (temporaries removed);
    with ``on_error(k, exception)``, a shard whose files cannot be committed (a full disk, its name taken) is
    reported there and the others go on."""
    if chunk_rows is None:
        chunk_rows = getattr(getattr(enc, "settings", None), "chunk_texts", CHUNK_ROWS)
    out_dir = Path(out_dir)
    with_ids = run["id_field"] is not None
    dtype, stored_width = stored_layout(run)
    open_: dict[int, tuple[ShardOutput, dict]] = {}
    try:
        for group, (prepared, lengths) in _tokenized(enc, _groups(shards, chunk_rows), run):
            for k, where, *_ in group:
                if k not in open_:
                    out = ShardOutput(out_dir, shard_stem(k, width), run["shard_format"], stored_width, with_ids,
                                      _file_metadata(run, k, where), dtype)
                    open_[k] = out, {"shard": k, "rows": 0, "tokens": 0, "started": time.time(), "input": where}
            emb = stored(vectors(enc, prepared, run, batch_size=batch_size), run) if len(lengths) else None
            at, nbytes = 0, 0
            for k, where, texts, ids, piece_bytes, last in group:
                out, rec = open_[k]
                if texts:
                    out.append(emb[at:at + len(texts)], ids)
                    rec["rows"] += len(texts)
                    rec["tokens"] += int(lengths[at:at + len(texts)].sum())
                at, nbytes = at + len(texts), nbytes + piece_bytes
                if last:
                    del open_[k]
                    try:
                        rec.update(files=out.commit(), writer=writer, finished=time.time())
                        write_atomic(out_dir / f"{shard_stem(k, width)}.json", json.dumps(rec).encode())
                    except Exception as e:
                        out.abort()
                        if on_error is None:
                            raise
                        on_error(k, e)
                        continue
                    yield rec
            if progress is not None:
                progress(len(lengths), int(lengths.sum()), nbytes)
    finally:
        for out, _ in open_.values():
            out.abort()


def embed_shard(enc, out_dir, run: dict, width: int, k: int, chunks, *, where: str, writer: str,
                batch_size: int | None = None, progress=None) -> dict:
    """``embed_shards`` for one shard: -> its record."""
    (rec,) = embed_shards(enc, out_dir, run, width, [(k, where, chunks)], writer=writer, batch_size=batch_size,
                          progress=progress)
    return rec


def plan_run(input, out_dir, *, dim: int, pooling: str, prompt: str, settings: dict | None = None,
             field: str = "text", id_field: str | None = None, prompt_name: str | None = None, normalize: bool = True,
             shard_size: int | str = SHARD_BYTES, shard_format: str = "npy", json_records: bool = False,
             output: dict | None = None) -> dict:
    """The manifest of a per-host or Ray run: settings, the inputs' identity and the shard plan. ``dim``: the
    model's; ``output``: ``output_options(dim, ...)`` (default: float32 vectors of truncated inputs)."""
    _check_shard_format(shard_format)
    shard_bytes = parse_size(shard_size)
    paths = resolve_inputs(input, exclude=out_dir)
    inputs = describe_inputs(paths, json_records=json_records, field=field, id_field=id_field)
    plan = plan_shards(inputs, shard_bytes)
    run = {"inputs": inputs, "field": field, "id_field": id_field, "prompt_name": prompt_name, "prompt": prompt,
           "normalize": normalize, "pooling": pooling, "shard_size": shard_bytes,
           "shard_format": shard_format, **(settings or {}), **(output or output_options(dim))}
    return {"format": FORMAT_SHARDED, "run": run, "width": max(5, len(str(max(len(plan) - 1, 0)))), "plan": plan}


def _changes(old: dict, new: dict) -> list[str]:
    a, b = old["run"], new["run"]
    changed = []
    if [f["path"] for f in a.get("inputs", [])] != [f["path"] for f in b["inputs"]]:
        changed.append("list of input files")
    else:
        for fa, fb in zip(a["inputs"], b["inputs"]):
            name = Path(fb["path"]).name
            changed += [f"input {name} {'modification time' if k == 'mtime_ns' else k.replace('_', ' ')}"
                        for k in fb if fa.get(k) != fb[k]]
    return changed + _changed_settings(a, b)


def _listing(out_dir: Path) -> dict[int, list[str]]:
    """Shard index -> the names in out_dir that belong to it (its files, record and temporaries)."""
    by_shard: dict[int, list[str]] = {}
    with os.scandir(out_dir) as entries:
        for entry in entries:
            m = _SHARD_NAME.match(entry.name)
            if m and entry.is_file():  # a folder of that name is not ours to delete, nor a shard's file
                by_shard.setdefault(int(m.group(1)), []).append(entry.name)
    return by_shard


def _record(out_dir: Path, k: int, width: int, names: set[str]) -> dict | None:
    """Shard k's commit record when it is complete (valid, and its files exist), else None."""
    stem = shard_stem(k, width)
    if f"{stem}.json" not in names:
        return None
    try:
        rec = read_json(out_dir / f"{stem}.json", expect=dict)
    except E5LiteError:
        return None
    files = rec.get("files")
    if rec.get("shard") != k or not isinstance(rec.get("rows"), int) or not isinstance(files, list) or not all(
            isinstance(f, str) and f in names for f in files):
        return None
    return rec


def open_run(out_dir, manifest: dict, *, overwrite: bool = False, primary: bool = True, owned=lambda k: True
             ) -> set[int]:
    """Prepares out_dir for a run of ``manifest``; returns the shards already done.

    A manifest there that differs (settings, inputs) is refused unless ``overwrite``. The ``primary`` process
    (process 0, or the Ray driver) writes the manifest; each process removes what previous runs left of the
    shards it ``owned`` and has still to do (temporaries, files without a record) and, with ``overwrite``,
    their old files too. Files of other shards are never touched: another process may be writing them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    try:
        old = read_json(path, default=None)
    except E5LiteError as e:
        if not overwrite:
            raise E5LiteError(f"{e}: not a valid manifest; use --overwrite to start again") from None
        old = None
    if old is not None and not overwrite:
        if not isinstance(old, dict) or old.get("format") not in (FORMAT, FORMAT_SHARDED):
            raise E5LiteError(f"{path} is not an e5lite embeddings manifest; use another --output")
        if old["format"] == FORMAT:
            raise E5LiteError(f"{out_dir} holds a single-process run of one file ({FORMAT}: row shards); finish it "
                              "without --coordinator, --distributed, --engine ray or --shard-size, or choose "
                              "another --output")
        changed = _changes(old, manifest)
        if changed:
            raise E5LiteError(f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
                              "start again or choose another --output")
        run = manifest["run"]
        if run.get("calibration") is not None and run.get("ranges") is None:
            run["ranges"] = old["run"].get("ranges")  # fixed by the run that started it (None: not yet)
    if primary and (overwrite or old != manifest):
        write_atomic(path, json.dumps(manifest).encode())
    width, n = manifest["width"], len(manifest["plan"])
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    done = set()
    for k, group in listing.items():
        stale = k >= n or any(len(_SHARD_NAME.match(name).group(1)) != width for name in group)
        if stale:  # another plan's names: no process of this run writes them
            if primary and overwrite:
                for name in group:
                    (out_dir / name).unlink(missing_ok=True)
            continue
        stem = shard_stem(k, width)
        rec = None if overwrite else _record(out_dir, k, width, names)
        if rec is not None:
            done.add(k)
        if owned(k):
            keep = set() if rec is None else {f"{stem}.json", *rec["files"]}
            # the record first: from then on the shard reads as missing, whatever else is left
            for name in sorted(group, key=lambda s: s != f"{stem}.json"):
                if name not in keep:
                    (out_dir / name).unlink(missing_ok=True)
    return done


def missing_shards(out_dir, manifest: dict, *, read_records: bool = True) -> list[int]:
    """The shards of ``manifest`` without a complete record in out_dir; ``read_records=False`` looks at the
    names alone (a summary line at the end of a process; ``read_embeddings`` reads every record)."""
    out_dir = Path(out_dir)
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    if not read_records:
        return [k for k in range(len(manifest["plan"])) if f"{shard_stem(k, manifest['width'])}.json" not in names]
    return [k for k in range(len(manifest["plan"])) if _record(out_dir, k, manifest["width"], names) is None]


def embed_per_host(enc, input, out_dir, *, settings: dict | None = None, field: str = "text",
                   id_field: str | None = None, prompt_name: str | None = None, task: str | None = None,
                   normalize: bool = True, shard_size: int | str = SHARD_BYTES, shard_format: str = "npy",
                   json_records: bool = False, batch_size: int | None = None, overwrite: bool = False,
                   process_index: int | None = None, process_count: int | None = None,
                   show_progress: bool = True, long_inputs: str = "truncate", chunk_overlap: int = 0,
                   truncate_dim: int | None = None, precision: str = "float32", calibration: int | None = None,
                   ranges=None) -> dict:
    """This process's share of a corpus run into ``out_dir`` (see the notes above): the shards k with
    k % process_count == process_index (default: ``jax.process_index()`` of ``jax.process_count()``), on this
    process's own devices, skipping shards already done. Returns a summary of what this process did.

    ``input``: a .txt, .jsonl or .parquet file, a folder or a glob of them. ``json_records``: read .txt files as
    JSONL records too (the CLI's --field). Every process must pass the same arguments. Under jax.distributed
    the processes wait for each other at the end (``_wait_for_all_processes``), not before; an int8/uint8 run
    whose ranges are not fixed yet also waits at the start for process 0 to compute them (``fix_ranges``).
    The vector options (``long_inputs`` ... ``ranges``): see ``output_options``."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    out_dir = Path(out_dir)

    def mine(k: int) -> bool:
        return k % process_count == process_index

    totals = {"rows": 0, "tokens": 0}
    t0 = time.perf_counter()
    try:  # whatever fails here, on one host or all, every process still reaches the barrier below
        prompt = enc.prompt_prefix(prompt_name, None, task)  # bad names fail before anything is written
        output = output_options(enc.dim, long_inputs=long_inputs, chunk_overlap=chunk_overlap,
                                truncate_dim=truncate_dim, precision=precision, calibration=calibration, ranges=ranges)
        manifest = plan_run(input, out_dir, dim=enc.dim, pooling=enc.pooling, prompt=prompt, settings=settings,
                            field=field, id_field=id_field, prompt_name=prompt_name, normalize=normalize,
                            shard_size=shard_size, shard_format=shard_format, json_records=json_records, output=output)
        if output["long_inputs"] == "chunk":
            prepare(enc, [""], manifest["run"])  # an overlap too large for the window fails before any write
        done = open_run(out_dir, manifest, overwrite=overwrite, primary=process_index == 0, owned=mine)
        fix_ranges(enc, out_dir, manifest, process_index, process_count, batch_size=batch_size)
        plan = manifest["plan"]
        todo = [k for k in range(len(plan)) if mine(k) and k not in done]
        desc = f"embed {process_index}/{process_count}" if process_count > 1 else "embed"
        _embed_todo(enc, out_dir, manifest, todo, f"process {process_index} of {process_count}", totals, t0,
                    batch_size, show_progress, desc)
    except Exception as e:
        if process_count > 1:
            wait_after_failure(process_index, process_count, e)
        raise
    if process_count > 1:
        _wait_for_all_processes(process_count)
    missing = missing_shards(out_dir, manifest, read_records=False)
    return {"process": process_index, "processes": process_count, "shards": len(plan), "embedded": len(todo),
            "skipped": sum(map(mine, range(len(plan)))) - len(todo), "rows": totals["rows"],
            "tokens": totals["tokens"], "seconds": time.perf_counter() - t0, "missing": missing}


BARRIER_TIMEOUT_S = 7 * 24 * 3600  # a share may take days; only a dead process (heartbeats) ends the wait sooner


def first_texts(inputs: list[dict], plan: list[dict], field: str, n: int) -> list[str]:
    """The first ``n`` texts of a planned run's input, in input order (its calibration set)."""
    texts: list[str] = []
    for shard in plan:
        for chunk, _, _ in read_shard(inputs, shard, field=field, id_field=None, chunk_rows=max(1, n - len(texts))):
            texts += chunk[:n - len(texts)]
            if len(texts) >= n:
                return texts
    return texts


def _distributed_client():
    from jax._src.distributed import global_state  # jax has no public key-value store
    return global_state.client


def fix_ranges(enc, out_dir, manifest: dict, process_index: int, process_count: int, *,
               batch_size: int | None = None) -> None:
    """Sets ``manifest["run"]["ranges"]`` of an int8/uint8 run calibrated on its first texts, the same in every
    process: from the manifest when a previous run fixed them; else process 0 computes them, writes them into
    the manifest before any shard is embedded and, under jax.distributed, hands them to the others (which wait
    for them). Processes without jax.distributed (``process_index``/``process_count`` given) cannot wait for
    each other: process 0 must have fixed them first."""
    run = manifest["run"]
    if run.get("calibration") is None:
        return  # float32 or binary, or ranges given: every process has them already
    client = _distributed_client() if process_count > 1 else None
    if process_index == 0:
        if run["ranges"] is None:
            texts = first_texts(run["inputs"], manifest["plan"], run["field"], run["calibration"])
            run["ranges"] = calibration_ranges(enc, texts, run, batch_size=batch_size)
            write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest).encode())
        if client is not None:
            client.key_value_set(_RANGES_KEY, json.dumps({"ranges": run["ranges"]}))
        return
    if client is not None:  # process 0's, even where this process read some: one source for every process
        got = json.loads(client.blocking_key_value_get(_RANGES_KEY, BARRIER_TIMEOUT_S * 1000))
        if "error" in got:
            raise E5LiteError(f"process 0 failed before fixing the {run['precision']} ranges ({got['error']})")
        run["ranges"] = got["ranges"]
    elif run["ranges"] is None:
        raise E5LiteError(f"process {process_index}: the {run['precision']} ranges are not in "
                          f"{Path(out_dir) / MANIFEST} yet; without jax.distributed the processes cannot hand them "
                          "over: run process 0 first (it computes them from the first texts), or pass the ranges")


def wait_after_failure(process_index: int, process_count: int, error: BaseException) -> None:
    """A process that failed (bad input, a model missing on its host) says so at once, then waits for the others
    at the end barrier: they would otherwise wait there for it until the barrier's timeout."""
    print(f"e5lite: process {process_index} failed ({error}); waiting for the other processes to finish their "
          "shards", file=sys.stderr)
    if process_index == 0:  # processes waiting for process 0's int8/uint8 ranges (fix_ranges) must not wait on
        client = _distributed_client()
        if client is not None:
            try:
                client.key_value_set(_RANGES_KEY, json.dumps({"error": str(error)}))
            except Exception:  # set already: the ranges were handed over before the failure
                pass
    _wait_for_all_processes(process_count, failed=True)


def _wait_for_all_processes(process_count: int, failed: bool = False) -> None:
    """Waits until every process has done its shards. Not for the data (nothing is exchanged): process 0
    hosts jax.distributed's coordination service, and the others are stopped when it exits, so no process may
    leave while another is still embedding. A no-op without jax.distributed (independent processes)."""
    from jax._src.distributed import global_state  # the runtime client: jax has no public barrier without devices
    client = global_state.client
    if client is None:
        return
    try:
        client.wait_at_barrier("e5lite-embed-corpus", BARRIER_TIMEOUT_S * 1000)
    except Exception as e:  # a process died: its shards are left for a rerun
        if not failed:
            raise E5LiteError(f"another process failed or was stopped before finishing its shards ({e}); run the "
                              "same command again on every host to resume") from None


def _embed_todo(enc, out_dir, manifest, todo, writer, totals, t0, batch_size, show_progress, desc) -> None:
    from tqdm.auto import tqdm
    plan, run, inputs = manifest["plan"], manifest["run"], manifest["run"]["inputs"]
    with tqdm(total=sum(shard_bytes_of(plan[k]) for k in todo), unit="B", unit_scale=True, disable=not show_progress,
              desc=desc, file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(rows, tokens, nbytes):
            totals["rows"] += rows
            totals["tokens"] += tokens
            bar.update(nbytes)
            bar.set_postfix_str(f"{totals['rows']:,} rows, "
                                f"{totals['tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

        shards = ((k, describe_shard(inputs, plan[k]), read_shard(inputs, plan[k], field=run["field"],
                                                                  id_field=run["id_field"])) for k in todo)
        for _ in embed_shards(enc, out_dir, run, manifest["width"], shards, writer=writer, batch_size=batch_size,
                              progress=progress):
            pass
        bar.update(bar.total - bar.n)  # the bytes no row started in (before a shard's first line)
