"""The files of one shard of a per-host or Ray run (format 2), streamed and committed: ``ShardOutput``.

A shard's embeddings (shard-K.npy [+ shard-K.ids.json] or shard-K.parquet) are streamed chunk by chunk to
temporaries, fsynced and renamed into place; the commit record shard-K.json is written after them
(``hosts.embed_shards``), so a kill leaves temporaries or files without a record, never a record without
its files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

from ..errors import E5LiteError
from ..files import fsync
from .store import OUTPUT_DEFAULTS, TMP_SUFFIX, _arrow_type, _opt


def _file_metadata(run: dict, k: int, where: str) -> dict:
    """What a Parquet shard carries in its own metadata, for readers that never see the manifest."""
    keep = (
        "model",
        "revision",
        "dtype",
        "weights",
        "max_length",
        "prompt_name",
        "prompt",
        "pooling",
        "normalize",
        "dim",
    )
    # the vector options too (ranges included: what quantises queries into the same buckets)
    return {
        "e5lite": json.dumps(
            {
                **{key: run.get(key) for key in keep},
                **{key: _opt(run, key) for key in OUTPUT_DEFAULTS},
                "shard": k,
                "input": where,
            }
        )
    }


class ShardOutput:
    """The files of one shard, streamed chunk by chunk to temporaries in ``out_dir`` and renamed into place by
    ``commit`` (fsynced first), so memory holds one chunk whatever the shard's size, and a kill leaves only
    temporaries, which the next run removes."""

    def __init__(self, out_dir: Path, stem: str, fmt: str, dim: int, with_ids: bool, metadata: dict, dtype=np.float32):
        import tempfile

        # dim: values per row as stored (packed bits: ceil(dim / 8) bytes); dtype: float32, int8 or uint8
        self.out_dir, self.stem, self.fmt, self.dim, self.rows = out_dir, stem, fmt, dim, 0
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._tmp: dict[str, str] = {}
        names = (
            [f"{stem}.parquet"] if fmt == "parquet" else [f"{stem}.npy"] + ([f"{stem}.ids.json"] if with_ids else [])
        )
        for name in names:
            fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=TMP_SUFFIX)
            os.close(fd)
            self._tmp[name] = tmp
        self._ids: TextIO | None = None
        self._emb: BinaryIO | None = None
        self._pq: Any = None  # a pyarrow.parquet.ParquetWriter once open
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

            arrays = {
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.reshape(-1), _arrow_type(emb.dtype)), self.dim
                )
            }
            if self._with_ids:
                try:
                    arrays = {"id": pa.array(ids), **arrays}
                except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                    raise E5LiteError(
                        f"{self.stem}: the ids do not fit one Parquet column ({e}); use --shard-format npy"
                    ) from None
            table = pa.table(arrays)
            if self._pq is None:
                self._open_parquet(table.schema)
            elif table.schema.field(0).type != self._schema.field(0).type:  # no cast: 5 must not become "5"
                raise E5LiteError(
                    f"{self.stem}: ids of type {table.schema.field(0).type} after ids of type "
                    f"{self._schema.field(0).type}; Parquet needs one type: use --shard-format npy"
                )
            self._pq.write_table(table.replace_schema_metadata(self._schema.metadata))
        else:
            assert self._emb is not None  # an .npy shard opens it in __init__
            self._emb.write(emb.tobytes())
            if self._ids is not None:
                assert ids is not None  # a shard with ids gets them with every chunk
                self._ids.write(("," if self.rows else "") + ",".join(json.dumps(i) for i in ids))
        self.rows += len(emb)

    def commit(self) -> list[str]:
        """Closes, fsyncs and renames the files into place; returns their names."""
        if self.fmt == "parquet":
            if self._pq is None:  # no rows: the file still says what it would hold
                import pyarrow as pa

                self._open_parquet(
                    pa.schema(
                        ([pa.field("id", pa.string())] if self._with_ids else [])
                        + [pa.field("embedding", pa.list_(_arrow_type(self.dtype), self.dim))]
                    )
                )
            self._pq.close()
        else:
            # the header was written for 0 rows with room to grow (numpy pads it): now the real count
            assert self._emb is not None  # an .npy shard opens it in __init__
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
