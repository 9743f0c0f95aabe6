"""Corpus inputs for per-host and Ray runs: files, folders and globs of .txt / .jsonl / .parquet, cut into shards.

A shard is the unit of work, of output and of resume. Its bounds come from the files' sizes and Parquet footers
alone, so every process computes the same plan without reading the data, and a process reads only its own
shards:

- ``.txt`` / ``.jsonl``: byte ranges of ``shard_bytes``. A shard holds the lines that *start* inside its range
  (a line crossing the end is read whole; one starting before the range belongs to the previous shard), so
  the shards of a file hold each line exactly once. A line number is not known where a shard starts, so
  errors count the lines up to there only when they happen.
- ``.parquet``: one shard per row group, the unit pyarrow reads; it is streamed in chunks, so memory does
  not grow with the row group either.

Row ids without ``--id-field`` are row numbers over all inputs in order; they are known once the shards
before have been read, so ``read_embeddings`` computes them from the shards' row counts.
"""

from __future__ import annotations

import glob
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .files import read_records

SUFFIXES = (".txt", ".jsonl", ".parquet")
SHARD_BYTES = 8 << 20  # 8 MiB of text a shard: many thousands of passages, files of a manageable size
CHUNK_ROWS = 8192  # rows tokenised and embedded at once inside a shard: one engine chunk
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """ "8M", "512k", "1.5G", "65536" -> bytes (powers of 1024); a positive size or InputError naming it."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise InputError(f"--shard-size {text!r}: use bytes or a size such as 512K, 8M, 1G")
        value = int(float(m.group(1)) * 1024 ** " kmg".index(m.group(2).lower() or " "))
    if value < 1:
        raise InputError(f"--shard-size must be at least 1 byte, got {text!r}")
    return value


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def resolve_inputs(spec, *, exclude=None) -> list[Path]:
    """The input files of ``--input``: one file, every .txt/.jsonl/.parquet file under a folder (recursively),
    or the files a glob matches (each a .txt/.jsonl/.parquet file); sorted by path, which is the input order.
    Names starting with "." or "_" are skipped, as Spark and Hive do (_SUCCESS, .crc). ``exclude``: a folder
    whose files are never inputs (the output)."""
    spec = str(spec)
    if _is_glob(spec):
        paths = sorted(
            Path(p)
            for p in glob.glob(spec, recursive=True)
            if Path(p).is_file() and not Path(p).name.startswith((".", "_"))
        )
        bad = [p for p in paths if p.suffix not in SUFFIXES]
        if bad:
            raise InputError(f"input {spec!r} matches {bad[0]}, which is not a {', '.join(SUFFIXES)} file")
        if not paths:
            raise InputError(f"input {spec!r} matches no {', '.join(SUFFIXES)} file")
    else:
        path = Path(spec)
        if path.is_dir():
            if exclude is not None and _inside(Path(exclude), path):
                raise InputError(
                    f"--output {exclude} is inside the input folder {spec}: its shards would become "
                    "inputs; choose an --output outside it"
                )
            paths = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix in SUFFIXES
                and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
            )
            if not paths:
                raise InputError(f"input folder {spec!r} holds no {', '.join(SUFFIXES)} file")
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise InputError(f"input file {spec!r}: use a {', '.join(SUFFIXES)} file, or a folder or glob of them")
            paths = [path]
        else:
            raise InputError(f"input file {spec!r} does not exist")
    if exclude is not None:
        paths = [p for p in paths if not _inside(p, Path(exclude))]
    return paths


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError("Parquet input needs pyarrow: pip install 'e5lite[parquet]'") from None
    return pq


def _check_column(path: Path, schema, name: str, what: str, flag: str) -> None:
    import pyarrow as pa

    if name not in schema.names:
        raise InputError(f"{path}: no column {name!r} (set {flag}); columns: {', '.join(schema.names)}")
    kind = schema.field(name).type
    strings = (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind))
    )
    if what == "text" and not strings:
        raise InputError(f"{path}: column {name!r} is {kind}, expected strings")
    if what == "id" and not (strings or pa.types.is_integer(kind)):
        raise InputError(f"{path}: id column {name!r} is {kind}, expected strings or integers")


def describe_inputs(paths: list[Path], *, json_records: bool, field: str, id_field: str | None) -> list[dict]:
    """What identifies each input (path, kind, size, mtime) and, for Parquet, its row groups' row counts
    and sizes; the columns are checked here, before any work starts."""
    out = []
    for p in paths:
        st = p.stat()
        kind = "parquet" if p.suffix == ".parquet" else "jsonl" if (p.suffix == ".jsonl" or json_records) else "txt"
        entry = {"path": str(p.resolve()), "kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if kind == "txt" and id_field is not None:
            raise InputError(f"{p}: a .txt line has no id field; drop --id-field, or pass .jsonl records")
        if kind == "parquet":
            pq = _pyarrow()
            try:
                meta = pq.ParquetFile(p).metadata
            except Exception as e:  # pyarrow's own errors (ArrowInvalid, OSError): not a Parquet file
                raise InputError(f"{p}: not a readable Parquet file ({e})") from None
            schema = meta.schema.to_arrow_schema()
            _check_column(p, schema, field, "text", "--field")
            if id_field is not None:
                _check_column(p, schema, id_field, "id", "--id-field")
            entry["row_groups"] = [
                [meta.row_group(g).num_rows, meta.row_group(g).total_byte_size] for g in range(meta.num_row_groups)
            ]
        out.append(entry)
    return out


def plan_shards(inputs: list[dict], shard_bytes: int) -> list[dict]:
    """The shards of these inputs in input order: {"file": i, "start", "end"} byte ranges of .txt/.jsonl
    files, {"file": i, "row_group": g, "rows": n, "bytes": b} for Parquet row groups. A function of the
    inputs' sizes and footers alone: every process computes the same list."""
    shards = []
    for i, f in enumerate(inputs):
        if f["kind"] == "parquet":
            shards += [{"file": i, "row_group": g, "rows": n, "bytes": b} for g, (n, b) in enumerate(f["row_groups"])]
        else:
            shards += [
                {"file": i, "start": a, "end": min(a + shard_bytes, f["size"])}
                for a in range(0, f["size"], shard_bytes)
            ]
    return shards


def shard_bytes_of(shard: dict) -> int:
    """The input bytes a shard covers (uncompressed for Parquet): the unit of progress bars."""
    return shard["bytes"] if "row_group" in shard else shard["end"] - shard["start"]


def describe_shard(inputs: list[dict], shard: dict) -> str:
    path = Path(inputs[shard["file"]]["path"]).name
    if "row_group" in shard:
        return f"{path} row group {shard['row_group']}"
    return f"{path} bytes {shard['start']}-{shard['end']}"


def read_shard(
    inputs: list[dict], shard: dict, *, field: str, id_field: str | None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[tuple[list[str], list | None, int]]:
    """(texts, ids or None without ``id_field``, input bytes consumed) per chunk of up to ``chunk_rows`` rows.
    Bad rows raise InputError naming the file and line (or row group and row)."""
    f = inputs[shard["file"]]
    if f["kind"] == "parquet":
        yield from _read_row_group(f, shard, field, id_field, chunk_rows)
        return
    path, json_records = Path(f["path"]), f["kind"] == "jsonl"
    rows = _text_rows(path, shard["start"], shard["end"], json_records, field, id_field)
    done = shard["start"]
    while True:
        chunk = list(itertools.islice(rows, chunk_rows))
        if not chunk:
            return
        texts, ids, offsets = (list(c) for c in zip(*chunk, strict=True))
        consumed, done = min(offsets[-1], shard["end"]) - done, min(offsets[-1], shard["end"])
        yield texts, ids if id_field is not None else None, consumed


def _text_rows(path: Path, start: int, end: int, json_records: bool, field: str, id_field: str | None):
    """(text, id, offset) of the lines starting in [start, end); errors name the line, counted on demand."""
    pos = _first_line_start(path, start)
    try:
        yield from _records(path, pos, end, json_records, field, id_field, first_line=None if pos else 1)
    except InputError:
        if pos == 0:
            raise
        # Only now is the line number worth a scan of the bytes before this shard: read it again from there
        # with the number known, which raises the same error, now naming the line.
        first_line = _count_lines(path, pos) + 1
        for _ in _records(path, pos, end, json_records, field, id_field, first_line=first_line):
            pass
        raise


def _first_line_start(path: Path, start: int) -> int:
    if start == 0:
        return 0
    with open(path, "rb") as f:
        f.seek(start - 1)
        f.readline()  # the rest of a line that began before start: the previous shard's
        return f.tell()


def _records(path: Path, pos: int, end: int, json_records: bool, field, id_field, first_line):
    with open(path, "rb") as f:
        f.seek(pos)

        def lines():
            at = pos
            while at < end:
                raw = f.readline()
                if not raw:
                    return
                yield raw
                at += len(raw)

        yield from read_records(
            lines(),
            str(path),
            field=field if json_records else None,
            id_field=id_field if json_records else None,
            offset=pos,
            first_line=first_line,
        )


def _count_lines(path: Path, end: int) -> int:
    n = 0
    with open(path, "rb") as f:
        while end > 0:
            block = f.read(min(end, 1 << 24))
            if not block:
                break
            n += block.count(b"\n")
            end -= len(block)
    return n


def _read_row_group(f: dict, shard: dict, field: str, id_field: str | None, chunk_rows: int):
    pq = _pyarrow()
    path, g = Path(f["path"]), shard["row_group"]
    first = sum(n for n, _ in f["row_groups"][:g])  # the row group's first row in the file, for errors
    columns = [field] + ([id_field] if id_field is not None and id_field != field else [])
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, row_groups=[g], columns=columns):
        texts = _column(batch, field, path, g, row, first, "text")
        ids = _column(batch, id_field, path, g, row, first, "id") if id_field is not None else None
        row += batch.num_rows
        yield texts, ids, round(shard["bytes"] * batch.num_rows / max(shard["rows"], 1))


def _column(batch, name: str, path: Path, g: int, row: int, first: int, what: str) -> list:
    col = batch.column(batch.schema.get_field_index(name))
    if col.null_count:
        bad = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
        raise InputError(
            f"{path} row group {g} row {row + bad} (file row {first + row + bad}): {what} column {name!r} is null"
        )
    return col.to_pylist()
