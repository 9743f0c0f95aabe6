"""What a corpus run stores: its vector options, int8/uint8 ranges, manifest and the names of its files.

A run's manifest records, beside the model and the prompt, how each vector is made (the order is
``Encoder.encode``'s, sentence-transformers'): "long_inputs" ("truncate", or "chunk": windows of
"chunk_overlap" shared tokens, averaged; ``long_inputs.py``), then the first "truncate_dim" components
(normalised after the cut when "normalize"), then "precision". "dim" is the vector's dimension after the
cut; a row stores ``quantize.output_dim(precision, dim)`` values of ``quantize.output_dtype(precision)``.

int8/uint8 buckets come from per-dimension [min, max] "ranges" [2, dim] that must be the same for every
shard, every process and every resume: ranges computed per shard would put equal values of two shards in
different buckets. So they are fixed once, before any shard is embedded, and written into the manifest:
either given (``ranges``: the CLI's --ranges FILE.npy or an earlier run's folder), or computed from the
float vectors of the first "calibration" texts of the input (sentence-transformers' calibration set;
default CALIBRATION_ROWS). A resumed run, every process of a per-host run (process 0 computes them and
hands them over jax.distributed's key-value store; ``coordination.py``) and every Ray actor use the
manifest's ranges.

Two manifest formats: FORMAT (a single process's row shards, ``writer.py``) and FORMAT_SHARDED (shards planned
up front, each committed by its own record shard-K.json; ``hosts.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..corpus_inputs import read_shard
from ..errors import E5LiteError, InputError
from ..files import read_json
from ..long_inputs import check_long_inputs
from ..quantize import check_precision, check_ranges, check_truncate_dim, output_dim, output_dtype

MANIFEST = "manifest.json"
FORMAT = "e5lite-embeddings/1"
FORMAT_SHARDED = "e5lite-embeddings/2"
ROWS_PER_SHARD = 8192  # one tokenisation chunk of the engine per shard
TMP_SUFFIX = ".tmp"
SHARD_FORMATS = ("npy", "parquet")
CALIBRATION_ROWS = 1000
# The keys these options add to a run, with the values a manifest written before them implies (it resumes).
OUTPUT_DEFAULTS = {
    "long_inputs": "truncate",
    "chunk_overlap": 0,
    "truncate_dim": None,
    "precision": "float32",
    "calibration": None,
    "ranges": None,
}
_SHARD_NAME = re.compile(r"^\.?shard-(\d+)\.")


def output_options(
    dim: int,
    *,
    long_inputs: str = "truncate",
    chunk_overlap: int = 0,
    truncate_dim: int | None = None,
    precision: str = "float32",
    calibration: int | None = None,
    ranges=None,
) -> dict:
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
            raise ValueError(
                "pass ranges or calibration, not both: the ranges are given, or computed from the "
                "first calibration texts"
            )
    if ranges is not None:
        if not scalar:
            raise ValueError(f"ranges are int8/uint8 buckets; precision {precision!r} has none")
        check_ranges(ranges, None, out_dim)
        ranges = np.asarray(ranges, np.float32).tolist()  # exact in JSON: float32 -> float64 -> float32
    elif scalar and calibration is None:
        calibration = CALIBRATION_ROWS
    return {
        "dim": out_dim,
        "long_inputs": long_inputs,
        "chunk_overlap": int(chunk_overlap),
        "truncate_dim": truncate_dim,
        "precision": precision,
        "calibration": None if calibration is None else int(calibration),
        "ranges": ranges,
    }


def load_ranges(spec) -> np.ndarray:
    """int8/uint8 ranges [2, dim] from a .npy file, or from the manifest of an earlier run's folder (so that
    queries, or another corpus, share a corpus's buckets). Errors name the file."""
    path = Path(spec)
    if path.is_dir():
        manifest = _read_manifest(path)
        if manifest is None:
            raise InputError(
                f"--ranges {spec}: a folder without {MANIFEST} (pass a .npy file [2, dim], or the "
                "folder of an e5lite embed --precision int8/uint8 run)"
            )
        ranges = manifest["run"].get("ranges")
        if ranges is None:
            raise InputError(
                f"--ranges {spec}: that run has no int8/uint8 ranges (precision "
                f"{manifest['run'].get('precision', 'float32')})"
            )
        return np.asarray(ranges, np.float32)
    if not path.is_file():
        raise InputError(f"--ranges {spec}: no such file or folder")
    try:
        ranges = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"--ranges {spec}: not a .npy array ({e})") from None
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise InputError(
            f"--ranges {spec}: expected shape (2, dim) (row 0 the minimum, row 1 the maximum of each "
            f"dimension), got {ranges.shape}"
        )
    return ranges


def stored_layout(run: dict) -> tuple[np.dtype, int]:
    """(dtype, values per row) of a run's stored vectors."""
    precision = run.get("precision", "float32")
    return output_dtype(precision), output_dim(precision, run["dim"])


def _opt(run: dict, key: str):
    return run.get(key, OUTPUT_DEFAULTS.get(key))


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


def first_texts(inputs: list[dict], plan: list[dict], field: str, n: int) -> list[str]:
    """The first ``n`` texts of a planned run's input, in input order (its calibration set)."""
    texts: list[str] = []
    for shard in plan:
        for chunk, _, _ in read_shard(inputs, shard, field=field, id_field=None, chunk_rows=max(1, n - len(texts))):
            texts += chunk[: n - len(texts)]
            if len(texts) >= n:
                return texts
    return texts


def _check_shard_format(shard_format: str) -> None:
    """A known shard format, and pyarrow installed for Parquet (before any work starts)."""
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard format must be one of {SHARD_FORMATS}, got {shard_format!r}")
    if shard_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise E5LiteError("Parquet shards need pyarrow: pip install 'e5lite[parquet]'") from None


def _arrow_type(dtype: np.dtype):
    import pyarrow as pa

    return {"float32": pa.float32(), "int8": pa.int8(), "uint8": pa.uint8()}[np.dtype(dtype).name]


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


# ------------------------------------------------------------------------------ the files of a planned run's shards


def shard_stem(k: int, width: int) -> str:
    return f"shard-{k:0{width}d}"


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
    if (
        rec.get("shard") != k
        or not isinstance(rec.get("rows"), int)
        or not isinstance(files, list)
        or not all(isinstance(f, str) and f in names for f in files)
    ):
        return None
    return rec
