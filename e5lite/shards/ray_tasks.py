"""What the Ray job of ``e5lite embed --engine ray`` runs (``ray_run.py`` drives it): the datasource of the
shards still to do (its read tasks pack consecutive shards into rows), the actor that embeds and commits
them (``ShardEmbedder``), and the task that computes int8/uint8 ranges on an actor's kind of device.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from ..corpus_inputs import CHUNK_ROWS, describe_shard, read_shard, shard_bytes_of
from ..errors import E5LiteError
from .hosts import embed_shards
from .store import shard_stem
from .vector_steps import calibration_ranges


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise E5LiteError("the Ray engine needs the ray extra: pip install 'e5lite[ray]'") from None
    return ray


def _calibrate(*, model, revision, dtype, max_length, knobs, texts, run, batch_size):
    """A Ray task: int8/uint8 ranges from the first texts, on an actor's kind of device (the driver loads no
    model: on a GPU node it would take the memory the actors need)."""
    from ..encoder import load

    enc = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
    try:
        return calibration_ranges(enc, texts, run, batch_size=batch_size)
    finally:
        enc.close()


def _shard_source(
    inputs: list[dict], plan: list[dict], todo: list[int], field: str, id_field: str | None, pack_rows: int, tasks: int
):
    """A Ray Data datasource of the shards still to do. Each row holds whole shards: their indices, texts, ids
    (JSON, keeping their types), where they come from and any read error. A row is never split between
    batches, so an actor call commits whole shards; consecutive small shards share a row up to ``pack_rows``
    texts, so that they share engine calls too (``shards.embed_shards``). ``tasks`` read tasks each read a
    run of consecutive shards (Ray's own parallelism would give each task one shard, and nothing to pack)."""
    ray = _ray()
    from ray.data import Datasource
    from ray.data.block import BlockMetadata

    class ShardSource(Datasource):
        def estimate_inmemory_data_size(self):
            return sum(shard_bytes_of(plan[k]) for k in todo)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            n = min(len(todo), tasks)
            bounds = [len(todo) * i // n for i in range(n + 1)] if n else [0]
            read_tasks = []
            for group in (todo[a:b] for a, b in itertools.pairwise(bounds)):  # consecutive shards, to pack
                # each task carries its own shards' specs only, not the whole plan
                specs = [(k, [inputs[plan[k]["file"]]], {**plan[k], "file": 0}) for k in group]
                meta = BlockMetadata(
                    num_rows=None,
                    size_bytes=sum(shard_bytes_of(s) for *_, s in specs),
                    input_files=tuple(f[0]["path"] for _, f, _ in specs),
                    exec_stats=None,
                )
                read_tasks.append(ray.data.ReadTask(lambda specs=specs: _read_packed(specs), meta))
            return read_tasks

    def _read_packed(specs):
        cols: dict[str, list] = {"shard": [], "where": [], "texts": [], "ids": [], "error": []}
        for k, one_input, shard in specs:
            texts, ids, error = [], [], None
            try:
                for t, i, _ in read_shard(one_input, shard, field=field, id_field=id_field):
                    texts += t
                    ids += i or []
            except Exception as e:  # carried to the driver in the row: Ray's wrappers would lose the message
                texts, ids, error = [], [], _message(e)
            for key, value in zip(
                cols,
                (k, describe_shard(one_input, shard), texts, json.dumps(ids) if id_field is not None else None, error),
                strict=True,
            ):
                cols[key].append(value)
            if sum(map(len, cols["texts"])) >= pack_rows:
                yield _packed_row(cols)
                cols = {key: [] for key in cols}
        if cols["shard"]:
            yield _packed_row(cols)

    return ShardSource()


def _packed_row(cols: dict) -> Any:
    """One datasource row (a pyarrow table of one row) of the shards in ``cols``."""
    import pyarrow as pa

    return pa.table(
        {
            "shard": pa.array([cols["shard"]], pa.list_(pa.int64())),
            "where": pa.array([cols["where"]], pa.list_(pa.large_string())),
            "texts": pa.array([cols["texts"]], pa.list_(pa.list_(pa.large_string()))),
            "ids": pa.array([cols["ids"]], pa.list_(pa.large_string())),
            "error": pa.array([cols["error"]], pa.list_(pa.large_string())),
        }
    )


class ShardEmbedder:
    """The actor of ``e5lite embed --engine ray``: loads the model once; each call embeds the shards of its
    rows and commits each under its own name (``shards.embed_shards``); returns one row per shard: its index,
    rows, tokens and error (None, or one line: the shard stays missing, the others go on). A shard Ray runs
    twice (an actor lost and its task retried) is renamed into place twice with the same rows: it is there
    once."""

    def __init__(self, *, model, revision, dtype, max_length, knobs, out_dir, run, width, batch_size):
        from ..encoder import load

        self.encoder = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
        self.out_dir, self.run, self.width, self.batch_size = Path(out_dir), run, width, batch_size
        self.writer = f"ray actor {socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch):
        out: dict[str, list] = {"shard": [], "rows": [], "tokens": [], "error": []}

        def report(k, rows, tokens, error):
            for key, value in zip(out, (k, rows, tokens, error), strict=True):
                out[key].append(value)

        for row in batch.to_pylist():
            named = {k: f"{shard_stem(k, self.width)} ({w})" for k, w in zip(row["shard"], row["where"], strict=True)}
            good = []
            for k, where, texts, ids, error in zip(
                *(row[c] for c in ("shard", "where", "texts", "ids", "error")), strict=True
            ):
                if error is not None:  # the read failed (bad input)
                    report(k, 0, 0, f"{named[k]}: {error}")
                    continue
                ids = json.loads(ids) if ids is not None else None
                chunks = [
                    (texts[i : i + CHUNK_ROWS], None if ids is None else ids[i : i + CHUNK_ROWS], 0)
                    for i in range(0, len(texts), CHUNK_ROWS)
                ]
                good.append((k, where, chunks))
            done: set[int] = set()

            def failed(k, e, done=done, named=named):  # this row's done and named, bound here
                done.add(k)
                report(k, 0, 0, f"{named[k]}: {_message(e)}")

            try:
                for rec in embed_shards(
                    self.encoder,
                    self.out_dir,
                    self.run,
                    self.width,
                    good,
                    writer=self.writer,
                    batch_size=self.batch_size,
                    on_error=failed,
                ):
                    done.add(rec["shard"])
                    report(rec["shard"], rec["rows"], rec["tokens"], None)
            except Exception as e:  # the engine failed: the shards not committed yet stay missing
                for k, _, _ in good:
                    if k not in done:
                        failed(k, e)
        return out


def _message(e: BaseException) -> str:
    """One line: e5lite's own errors (bad input: file and line) as they are, others with their type."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, E5LiteError) else f"{type(e).__name__}: {text}"
