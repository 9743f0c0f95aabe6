"""Files: the one JSON-file reader, the one atomic writer and the one reader of text/JSONL inputs.

Every error names the file (and for inputs the line and byte), so a user knows what to fix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import E5LiteError, InputError

_MISSING = object()


JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "true/false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def json_type(value) -> str:
    return JSON_TYPES.get(type(value), type(value).__name__)


def read_json(
    path: str | os.PathLike,
    *,
    default: Any = _MISSING,
    error: type[Exception] = E5LiteError,
    expect: type | None = None,
) -> Any:
    """The parsed JSON of a file; ``default`` when the file does not exist (else ``error``, as for bad JSON).
    ``expect`` (dict, list): the top-level type the file must have, else ``error`` naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        if default is not _MISSING:
            return default
        raise error(f"missing {path.name}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected {JSON_TYPES[expect]} at the top level, got {json_type(value)}")
    return value


def json_field(path, obj: dict, field: str, kinds: tuple, default=None, error: type[Exception] = E5LiteError):
    """``obj[field]`` when it has one of the JSON ``kinds`` (bools are not ints here), ``default`` when absent
    or null; else ``error`` naming the file and the field."""
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join(JSON_TYPES.get(k, k.__name__) for k in kinds)
        raise error(f"{path}: field {field!r} must be {want}, got {json_type(value)} {value!r:.60}")
    return value


def fsync(path: Path) -> None:
    """Flushes a file's contents, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Writes ``data`` (bytes, or a function writing to a binary file) to ``path`` so that a crash or an error
    leaves either the old file or the new one, never a part: a temporary beside it, fsynced, then renamed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync(path.parent)


def iter_jsonl(lines, name: str, *, offset: int = 0, first_line: int | None = 1) -> Iterator[tuple[dict, str, int]]:
    """(record, where, byte offset after it) for each JSON object line of ``lines`` (an iterable of bytes, e.g. a
    file opened "rb" and sought to ``offset``); blank lines are skipped. ``where`` names the file, line (unless
    ``first_line`` is None: unknown) and byte, for errors about the record."""
    for n, raw in enumerate(lines, first_line or 0):
        start, offset = offset, offset + len(raw)
        where = _where(name, n, start, first_line)
        line = _decode(raw, where)
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield rec, where, offset


def _where(name: str, line: int, byte: int, first_line: int | None) -> str:
    return f"{name} line {line} (byte {byte})" if first_line else f"{name} at byte {byte}"


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text ({e.reason})") from None


def read_records(
    lines,
    name: str,
    *,
    field: str | None = None,
    id_field: str | None = None,
    offset: int = 0,
    first_row: int = 0,
    first_line: int | None = 1,
) -> Iterator[tuple[str, Any, int]]:
    """(text, id, byte offset after the row) for each row of ``lines`` (an iterable of bytes). Without ``field``
    every line is a row (a trailing ``\r`` is dropped); with ``field`` lines are JSON records (``iter_jsonl``).
    The id is the record's ``id_field``, else the row number. Errors name the file, line and byte."""
    row = first_row
    if field is None:
        for n, raw in enumerate(lines, first_line or 0):
            start, offset = offset, offset + len(raw)
            yield _decode(raw, _where(name, n, start, first_line)).rstrip("\n").removesuffix("\r"), row, offset
            row += 1
        return
    for rec, where, end in iter_jsonl(lines, name, offset=offset, first_line=first_line):
        if field not in rec:
            raise InputError(f"{where}: no field {field!r} (set --field)")
        if not isinstance(rec[field], str):
            raise InputError(f"{where}: field {field!r} is {type(rec[field]).__name__}, expected a string")
        if id_field is not None and id_field not in rec:
            raise InputError(f"{where}: no id field {id_field!r}")
        yield rec[field], (rec[id_field] if id_field is not None else row), end
        row += 1
