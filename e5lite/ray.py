"""Ray Data: ``Embedder`` for your own ``Dataset.map_batches`` pipelines, and ``e5lite embed --engine ray``.

    ds.map_batches(Embedder, fn_constructor_kwargs={"model": "intfloat/e5-base-v2", "prompt_name": "passage",
                                                    "field": "text", "id_field": "_id"},
                   concurrency=4, batch_size=1024, num_gpus=1)

Each actor loads the model once and runs on the devices Ray gives it (a GPU with ``num_gpus=1``: Ray sets
CUDA_VISIBLE_DEVICES, so JAX sees that one). ``embed_corpus_ray`` (the command) runs the same shard plan
and shard files as a per-host run; it lives with the other corpus runs (``shards/ray_run.py``, its job's
parts in ``shards/ray_tasks.py``) and is re-exported here, with the rest of those modules' names.
Needs the ``ray`` extra (``pip install 'e5lite[ray]'``).
"""

from __future__ import annotations

import numpy as np

from .errors import E5LiteError, InputError
from .shards.ray_run import embed_corpus_ray, model_facts, one_line  # noqa: F401
from .shards.ray_tasks import ShardEmbedder, _calibrate, _message, _ray, _shard_source  # noqa: F401


class Embedder:
    """A callable class for ``Dataset.map_batches``: texts in column ``field`` -> float32 embeddings in column
    ``output_column``, with the ``id_field`` column (and any ``keep_columns``) passed through unchanged.

    Loads the model once per actor (``e5lite.load`` with ``revision``, ``dtype``, ``max_length`` and engine
    ``knobs``); batches come as Ray gives them (dicts of numpy arrays, pandas DataFrames or pyarrow Tables)
    and leave in the same form. ``long_inputs``, ``chunk_overlap``, ``truncate_dim`` and ``precision`` as in
    ``Encoder.encode``; int8/uint8 need ``ranges`` [2, dim] (buckets computed per batch would differ from batch
    to batch: compute them once, e.g. from a sample's float vectors, or take a corpus run's). The engine
    batches by its token budget, not by Ray's ``batch_size``, and the layout chosen on the first batch is kept,
    so however Ray sizes its batches the compiled shapes stay bounded (at most 16 per layout;
    ``compiled_shapes``).
    """

    def __init__(
        self,
        model,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        task: str | None = None,
        field: str = "text",
        id_field: str | None = None,
        keep_columns=(),
        normalize: bool = True,
        output_column: str = "embedding",
        revision: str | None = None,
        dtype="float32",
        max_length: int | None = None,
        batch_size: int | None = None,
        long_inputs: str = "truncate",
        chunk_overlap: int = 0,
        truncate_dim: int | None = None,
        precision: str = "float32",
        ranges=None,
        **knobs,
    ):
        from .encoder import load
        from .shards import output_options

        for name, value in (("field", field), ("output_column", output_column)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str, got {value!r}")
        if id_field is not None and (not isinstance(id_field, str) or not id_field):
            raise ValueError(f"id_field must be a non-empty str or None, got {id_field!r}")
        if isinstance(keep_columns, str) or not all(isinstance(c, str) for c in keep_columns):
            raise ValueError(f"keep_columns must be a list of column names, got {keep_columns!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if precision in ("int8", "uint8") and ranges is None:
            raise ValueError(
                f"precision={precision!r} needs ranges (shape (2, dim)): the same buckets for every "
                "batch, which no batch can compute alone"
            )
        self.encoder = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
        self.prefix = self.encoder.prompt_prefix(prompt_name, prompt, task)
        # the corpus run's vector steps (shards.prepare / vectors / stored), with these options
        self.run = {
            "prompt": self.prefix,
            "normalize": normalize,
            **output_options(
                self.encoder.dim,
                long_inputs=long_inputs,
                chunk_overlap=chunk_overlap,
                truncate_dim=truncate_dim,
                precision=precision,
                ranges=ranges,
            ),
        }
        self.field, self.id_field, self.output_column = field, id_field, output_column
        self.keep = [id_field] * (id_field is not None) + [c for c in keep_columns if c != id_field]
        self.normalize, self.batch_size, self._pinned = normalize, batch_size, False
        self.encoder._run_kw(normalize, batch_size, False)  # validates batch_size like encode() does

    @property
    def compiled_shapes(self) -> set:
        return self.encoder.engine.compiled_shapes

    def _pin_layout(self, token_ids) -> None:
        """Keeps the layout the first batch chooses: "auto" would weigh the layouts afresh for every batch, and
        batches of other sizes could each pick another one and compile its shapes."""
        eng = self.encoder.engine
        pack_length, window = eng.choose_layout([len(t) for t in token_ids], self.batch_size)
        if pack_length == 0:
            self.encoder.configure(packing=False)
        else:
            self.encoder.configure(packing=True, pack_length=pack_length, min_window=window)
        self._pinned = True

    def _texts(self, batch) -> tuple[list, str]:
        kind = (
            "arrow"
            if hasattr(batch, "column_names") and hasattr(batch, "to_pylist")
            else ("pandas" if hasattr(batch, "iloc") else "dict")
        )
        names = list(batch.column_names if kind == "arrow" else batch.columns if kind == "pandas" else batch.keys())
        for column in [self.field] + self.keep:
            if column not in names:
                raise E5LiteError(f"the batch has no column {column!r}; columns: {', '.join(map(str, names))}")
        col = batch.column(self.field).to_pylist() if kind == "arrow" else list(batch[self.field])
        for i, t in enumerate(col):
            if not isinstance(t, str):
                who = "" if self.id_field is None else f" ({self.id_field} {self._value(batch, kind, i)!r})"
                raise InputError(f"row {i} of the batch{who}: {self.field!r} is {type(t).__name__}, expected a string")
        return col, kind

    def _value(self, batch, kind: str, i: int):
        if kind == "arrow":
            return batch.column(self.id_field)[i].as_py()
        value = batch[self.id_field].iloc[i] if kind == "pandas" else batch[self.id_field][i]
        return value.item() if isinstance(value, np.generic) else value

    def __call__(self, batch):
        from .shards import _arrow_type, prepare, stored, stored_layout, vectors

        texts, kind = self._texts(batch)
        prepared, _ = prepare(self.encoder, texts, self.run)
        token_ids = prepared.ids  # chunk mode: the windows'
        if token_ids and not self._pinned:
            self._pin_layout(token_ids)
        emb = stored(vectors(self.encoder, prepared, self.run, batch_size=self.batch_size), self.run)
        if kind == "arrow":
            import pyarrow as pa

            width = stored_layout(self.run)[1]
            vec = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), _arrow_type(emb.dtype)), width)
            return pa.table({**{c: batch.column(c) for c in self.keep}, self.output_column: vec})
        if kind == "pandas":
            import pandas as pd

            out = pd.DataFrame({c: batch[c].to_numpy() for c in self.keep}, index=batch.index)
            out[self.output_column] = list(emb)
            return out
        return {**{c: batch[c] for c in self.keep}, self.output_column: emb}
