"""files.py: the JSON reader, the atomic writer and the text/JSONL record reader."""

from __future__ import annotations

import io

import pytest

from e5lite.errors import ConfigError, E5LiteError, InputError
from e5lite.files import read_json, read_records, write_atomic


def test_read_json(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    assert read_json(tmp_path / "a.json") == {"x": [1, 2]}
    assert read_json(tmp_path / "none.json", default={}) == {}
    with pytest.raises(E5LiteError, match="missing none.json"):
        read_json(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"x": ')
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json", error=ConfigError)


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.bin"
    write_atomic(target, b"first")
    assert target.read_bytes() == b"first"

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_bytes() == b"first" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    write_atomic(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"


def test_read_records_text_and_jsonl():
    text = b"first line\r\nsecond\n\nlast"
    assert [(t, i) for t, i, _ in read_records(io.BytesIO(text), "t.txt")] == [
        ("first line", 0), ("second", 1), ("", 2), ("last", 3)]
    jsonl = b'{"text": "a", "id": "x"}\n\n{"text": "b", "id": "y"}\n'
    rows = list(read_records(io.BytesIO(jsonl), "d.jsonl", field="text", id_field="id"))
    assert [(t, i) for t, i, _ in rows] == [("a", "x"), ("b", "y")] and rows[-1][2] == len(jsonl)


@pytest.mark.parametrize("data, field, message", [
    (b'{"text": "a"}\n{"text": 3}\n', "text", "d.jsonl line 2 (byte 14): field 'text' is int, expected a string"),
    (b'{"text": "a"}\nnot json\n', "text", "d.jsonl line 2 (byte 14): not valid JSON"),
    (b'{"body": "a"}\n', "text", "d.jsonl line 1 (byte 0): no field 'text' (set --field)"),
    (b'["a"]\n', "text", "d.jsonl line 1 (byte 0): expected a JSON object, got list"),
    (b'ok\n\xff\xfe\n', None, "d.jsonl line 2 (byte 3): not UTF-8 text"),
])
def test_read_records_errors_name_line_and_byte(data, field, message):
    with pytest.raises(InputError) as e:
        list(read_records(io.BytesIO(data), "d.jsonl", field=field))
    assert message in str(e.value)
