"""Ray Data: ``Embedder`` for your own ``Dataset.map_batches`` pipelines, and ``e5lite embed --engine ray``.

    ds.map_batches(Embedder, fn_constructor_kwargs={"model": "intfloat/e5-base-v2", "prompt_name": "passage",
                                                    "field": "text", "id_field": "_id"},
                   concurrency=4, batch_size=1024, num_gpus=1)

Each actor loads the model once and runs on the devices Ray gives it (a GPU with ``num_gpus=1``: Ray sets
CUDA_VISIBLE_DEVICES, so JAX sees that one). ``embed_corpus_ray`` (the command) runs the same shard plan
and shard files as a per-host run (``shards.py``): a Ray Data datasource reads one shard per row, an actor
pool embeds and commits each shard under its own name, and a rerun skips the shards whose records exist.
A shard that fails (bad input, a full disk) is reported as a row, not raised: the other shards go on, and
the job ends with one line naming the first failure.
Needs the ``ray`` extra (``pip install 'e5lite[ray]'``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .corpus_inputs import CHUNK_ROWS, SHARD_BYTES, describe_shard, read_shard, shard_bytes_of
from .errors import E5LiteError, InputError


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise E5LiteError("the Ray engine needs the ray extra: pip install 'e5lite[ray]'") from None
    return ray


class Embedder:
    """A callable class for ``Dataset.map_batches``: texts in column ``field`` -> float32 embeddings in column
    ``output_column``, with the ``id_field`` column (and any ``keep_columns``) passed through unchanged.

    Loads the model once per actor (``e5lite.load`` with ``revision``, ``dtype``, ``max_length`` and engine
    ``knobs``); batches come as Ray gives them (dicts of numpy arrays, pandas DataFrames or pyarrow Tables)
    and leave in the same form. ``long_inputs``, ``chunk_overlap``, ``truncate_dim`` and ``precision`` as in
    ``Encoder.encode``; int8/uint8 need ``ranges`` [2, dim] (buckets computed per batch would differ from batch
    to batch: compute them once, e.g. from a sample's float vectors, or take a corpus run's). The engine batches by its token budget, not by Ray's ``batch_size``, and the
    layout chosen on the first batch is kept, so however Ray sizes its batches the compiled shapes stay
    bounded (at most 16 per layout; ``compiled_shapes``).
    """

    def __init__(self, model, *, prompt_name: str | None = None, prompt: str | None = None, task: str | None = None,
                 field: str = "text", id_field: str | None = None, keep_columns=(), normalize: bool = True,
                 output_column: str = "embedding", revision: str | None = None, dtype="float32",
                 max_length: int | None = None, batch_size: int | None = None, long_inputs: str = "truncate",
                 chunk_overlap: int = 0, truncate_dim: int | None = None, precision: str = "float32", ranges=None,
                 **knobs):
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
            raise ValueError(f"precision={precision!r} needs ranges (shape (2, dim)): the same buckets for every "
                             "batch, which no batch can compute alone")
        self.encoder = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
        self.prefix = self.encoder.prompt_prefix(prompt_name, prompt, task)
        # the corpus run's vector steps (shards.prepare / vectors / stored), with these options
        self.run = {"prompt": self.prefix, "normalize": normalize,
                    **output_options(self.encoder.dim, long_inputs=long_inputs, chunk_overlap=chunk_overlap,
                                     truncate_dim=truncate_dim, precision=precision, ranges=ranges)}
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
        kind = "arrow" if hasattr(batch, "column_names") and hasattr(batch, "to_pylist") else (
            "pandas" if hasattr(batch, "iloc") else "dict")
        names = list(batch.column_names if kind == "arrow" else batch.columns if kind == "pandas" else batch.keys())
        for col in [self.field] + self.keep:
            if col not in names:
                raise E5LiteError(f"the batch has no column {col!r}; columns: {', '.join(map(str, names))}")
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
        token_ids = prepared.ids if hasattr(prepared, "owner") else prepared  # chunk mode: the windows
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


# ------------------------------------------------------------------------------------ e5lite embed --engine ray

def model_facts(model, *, revision: str | None = None, max_length: int | None = None) -> SimpleNamespace:
    """What the driver records in the manifest (dim, pooling, max length, prompts) without loading the
    weights: the actors load them, on their own devices."""
    from . import hub
    from .config import BertConfig
    from .pooling import read_pooling_mode
    from .tokenizer import read_prompts, resolve_max_length
    model_dir = hub.resolve(model, revision=revision)
    config = BertConfig.from_json(model_dir / "config.json")
    prompts, default = read_prompts(model_dir, name=str(model))
    return SimpleNamespace(model_dir=model_dir, config=config, dim=config.hidden_size,
                           pooling=read_pooling_mode(model_dir),
                           max_length=resolve_max_length(model_dir, config, max_length), prompts=prompts,
                           default_prompt_name=default)


def _calibrate(*, model, revision, dtype, max_length, knobs, texts, run, batch_size):
    """A Ray task: int8/uint8 ranges from the first texts, on an actor's kind of device (the driver loads no
    model: on a GPU node it would take the memory the actors need)."""
    from .encoder import load
    from .shards import calibration_ranges
    enc = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
    try:
        return calibration_ranges(enc, texts, run, batch_size=batch_size)
    finally:
        enc.close()


def _shard_source(inputs: list[dict], plan: list[dict], todo: list[int], field: str, id_field: str | None,
                  pack_rows: int, tasks: int):
    """A Ray Data datasource of the shards still to do. Each row holds whole shards: their indices, texts, ids
    (JSON, keeping their types), where they come from and any read error. A row is never split between
    batches, so an actor call commits whole shards; consecutive small shards share a row up to ``pack_rows``
    texts, so that they share engine calls too (``shards.embed_shards``). ``tasks`` read tasks each read a
    run of consecutive shards (Ray's own parallelism would give each task one shard, and nothing to pack)."""
    ray = _ray()
    import pyarrow as pa
    from ray.data.block import BlockMetadata

    class ShardSource(ray.data.Datasource):
        def estimate_inmemory_data_size(self):
            return sum(shard_bytes_of(plan[k]) for k in todo)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            n = min(len(todo), tasks)
            bounds = [len(todo) * i // n for i in range(n + 1)] if n else [0]
            read_tasks = []
            for group in (todo[a:b] for a, b in zip(bounds, bounds[1:])):  # consecutive shards, to pack
                # each task carries its own shards' specs only, not the whole plan
                specs = [(k, [inputs[plan[k]["file"]]], {**plan[k], "file": 0}) for k in group]
                meta = BlockMetadata(num_rows=None, size_bytes=sum(shard_bytes_of(s) for *_, s in specs),
                                     input_files=[f[0]["path"] for _, f, _ in specs], exec_stats=None)
                read_tasks.append(ray.data.ReadTask(lambda specs=specs: _read_packed(specs), meta))
            return read_tasks

    def _read_packed(specs):
        cols = {"shard": [], "where": [], "texts": [], "ids": [], "error": []}
        for k, one_input, shard in specs:
            texts, ids, error = [], [], None
            try:
                for t, i, _ in read_shard(one_input, shard, field=field, id_field=id_field):
                    texts += t
                    ids += i or []
            except Exception as e:  # carried to the driver in the row: Ray's wrappers would lose the message
                texts, ids, error = [], [], _message(e)
            for key, value in zip(cols, (k, describe_shard(one_input, shard), texts,
                                         json.dumps(ids) if id_field is not None else None, error)):
                cols[key].append(value)
            if sum(map(len, cols["texts"])) >= pack_rows:
                yield _row(cols)
                cols = {key: [] for key in cols}
        if cols["shard"]:
            yield _row(cols)

    def _row(cols):
        return pa.table({"shard": pa.array([cols["shard"]], pa.list_(pa.int64())),
                         "where": pa.array([cols["where"]], pa.list_(pa.large_string())),
                         "texts": pa.array([cols["texts"]], pa.list_(pa.list_(pa.large_string()))),
                         "ids": pa.array([cols["ids"]], pa.list_(pa.large_string())),
                         "error": pa.array([cols["error"]], pa.list_(pa.large_string()))})

    return ShardSource()


class ShardEmbedder:
    """The actor of ``e5lite embed --engine ray``: loads the model once; each call embeds the shards of its
    rows and commits each under its own name (``shards.embed_shards``); returns one row per shard: its index,
    rows, tokens and error (None, or one line: the shard stays missing, the others go on). A shard Ray runs
    twice (an actor lost and its task retried) is renamed into place twice with the same rows: it is there
    once."""

    def __init__(self, *, model, revision, dtype, max_length, knobs, out_dir, run, width, batch_size):
        from .encoder import load
        self.encoder = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
        self.out_dir, self.run, self.width, self.batch_size = Path(out_dir), run, width, batch_size
        self.writer = f"ray actor {socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch):
        from .shards import embed_shards, shard_stem
        out = {"shard": [], "rows": [], "tokens": [], "error": []}

        def report(k, rows, tokens, error):
            for key, value in zip(out, (k, rows, tokens, error)):
                out[key].append(value)

        for row in batch.to_pylist():
            named = {k: f"{shard_stem(k, self.width)} ({w})" for k, w in zip(row["shard"], row["where"])}
            good = []
            for k, where, texts, ids, error in zip(*(row[c] for c in ("shard", "where", "texts", "ids", "error"))):
                if error is not None:  # the read failed (bad input)
                    report(k, 0, 0, f"{named[k]}: {error}")
                    continue
                ids = json.loads(ids) if ids is not None else None
                chunks = [(texts[i:i + CHUNK_ROWS], None if ids is None else ids[i:i + CHUNK_ROWS], 0)
                          for i in range(0, len(texts), CHUNK_ROWS)]
                good.append((k, where, chunks))
            done = set()

            def failed(k, e):
                done.add(k)
                report(k, 0, 0, f"{named[k]}: {_message(e)}")

            try:
                for rec in embed_shards(self.encoder, self.out_dir, self.run, self.width, good, writer=self.writer,
                                        batch_size=self.batch_size, on_error=failed):
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


def one_line(error: BaseException) -> str:
    """One line for an error Ray raised itself (an actor lost, a worker out of memory): shard errors come back
    as rows instead (``ShardEmbedder``), since Ray keeps a remote error only as traceback text. That text's
    last line before Ray's own wrapper is the original error."""
    text = str(error)
    head = text.split("\nThe above exception was the direct cause")[0]
    lines = [ln.strip() for ln in head.strip().splitlines() if ln.strip()]
    return lines[-1] if len(lines) > 1 else _message(error)


def embed_corpus_ray(model, input, out_dir, *, num_actors: int, address: str | None = None,
                     gpus_per_actor: float | None = None, cpus_per_actor: float = 1.0, revision: str | None = None,
                     dtype: str = "float32", max_length: int | None = None, knobs: dict | None = None,
                     settings: dict | None = None, field: str = "text", id_field: str | None = None,
                     prompt_name: str | None = None, task: str | None = None, normalize: bool = True,
                     shard_size=SHARD_BYTES, json_records: bool = False, batch_size: int | None = None,
                     overwrite: bool = False, show_progress: bool = True, long_inputs: str = "truncate",
                     chunk_overlap: int = 0, truncate_dim: int | None = None, precision: str = "float32",
                     calibration: int | None = None, ranges=None) -> dict:
    """Embeds a corpus (the inputs of a per-host run) into Parquet shards in ``out_dir`` with ``num_actors`` Ray
    actors, resuming a previous run there. Connects to ``address`` (default: the running Ray, else a local
    one). ``gpus_per_actor`` defaults to 1 when the cluster has GPUs, else 0. ``settings``: what the manifest
    records about the model (default: model, revision, dtype, max length), as the per-host command does.
    The vector options (``long_inputs`` ... ``ranges``): ``shards.output_options``; int8/uint8 ranges not
    given are computed once by a Ray task (an actor's resources) from the first ``calibration`` texts and
    written into the manifest before any actor starts; every actor quantises with the manifest's.
    Returns a summary; the shards still missing after a failed job are listed by ``read_embeddings``."""
    from tqdm.auto import tqdm

    from .encoder import Encoder
    from .files import write_atomic
    from .shards import MANIFEST, first_texts, missing_shards, open_run, output_options, plan_run
    for name, value in (("num_actors", num_actors),):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("gpus_per_actor", gpus_per_actor), ("cpus_per_actor", cpus_per_actor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    ray = _ray()
    facts = model_facts(model, revision=revision, max_length=max_length)
    prompt = Encoder.prompt_prefix(facts, prompt_name, None, task)  # the same rule as the per-host run's
    settings = settings if settings is not None else {"model": str(model), "revision": revision, "dtype": dtype,
                                                      "max_length": facts.max_length}
    out_dir = Path(out_dir)
    output = output_options(facts.dim, long_inputs=long_inputs, chunk_overlap=chunk_overlap,
                            truncate_dim=truncate_dim, precision=precision, calibration=calibration, ranges=ranges)
    if output["long_inputs"] == "chunk":  # an overlap too large for the window fails here, not in every shard
        from .long_inputs import split
        from .tokenizer import TextTokenizer
        split(TextTokenizer.from_dir(facts.model_dir, facts.max_length, facts.config.pad_token_id), [""], prompt,
              output["chunk_overlap"])
    manifest = plan_run(input, out_dir, dim=facts.dim, pooling=facts.pooling, prompt=prompt, settings=settings,
                        field=field, id_field=id_field, prompt_name=prompt_name, normalize=normalize,
                        shard_size=shard_size, shard_format="parquet", json_records=json_records, output=output)
    done = open_run(out_dir, manifest, overwrite=overwrite, primary=True)  # the driver owns every shard
    plan, run = manifest["plan"], manifest["run"]
    todo = [k for k in range(len(plan)) if k not in done]
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    rows = tokens = 0
    ctx, errors = None, []
    try:
        if todo:
            if started:
                # log_to_driver off: the actors' errors come back as exceptions, reported in one line below
                ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                         log_to_driver=False)
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            ctx = ray.data.DataContext.get_current()
            saved = ctx.enable_progress_bars
            ctx.enable_progress_bars = False  # ours below counts shards, rows and tokens/s
            if gpus_per_actor is None:
                gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            model_kw = {"model": str(model), "revision": revision, "dtype": dtype, "max_length": max_length,
                        "knobs": knobs or {}}
            if run["calibration"] is not None and run["ranges"] is None:  # before any shard: one set of buckets
                texts = first_texts(run["inputs"], plan, field, run["calibration"])
                task_ = ray.remote(_calibrate).options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or 0)
                run["ranges"] = ray.get(task_.remote(**model_kw, texts=texts, batch_size=batch_size,
                                                     run={k: v for k, v in run.items() if k != "inputs"}))
                write_atomic(out_dir / MANIFEST, json.dumps(manifest).encode())
            kwargs = {**model_kw, "out_dir": str(out_dir.resolve()), "width": manifest["width"],
                      "run": {k: v for k, v in run.items() if k != "inputs"}, "batch_size": batch_size}
            # Reading is I/O: its tasks hold no CPU, which the actors reserve (on a 2-core machine, 2 actors
            # holding both cores would otherwise leave none for the reads, and the job would wait forever).
            pack = knobs.get("chunk_texts", CHUNK_ROWS) if knobs else CHUNK_ROWS
            # 4 read tasks per actor: enough rows in flight for every actor, each task packing its run of shards
            source = _shard_source(run["inputs"], plan, todo, field, id_field, pack, tasks=4 * num_actors)
            ds = ray.data.read_datasource(source, num_cpus=0)
            ds = ds.map_batches(ShardEmbedder, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
                                num_gpus=gpus_per_actor or None)
            with tqdm(total=len(todo), unit="shard", desc="embed (ray)", disable=not show_progress, file=sys.stderr,
                      dynamic_ncols=True) as bar:
                for rec in ds.iter_rows():
                    if rec["error"] is not None:
                        errors.append(rec["error"])
                    rows, tokens = rows + rec["rows"], tokens + rec["tokens"]
                    bar.update(1)
                    bar.set_postfix_str(f"{rows:,} rows, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # Ray's own failure: its message holds the remote traceback; one line here
        raise E5LiteError(f"the Ray job failed ({one_line(e)}); the shards committed so far are kept: run the same "
                          "command again to do the rest") from None
    finally:
        if ctx is not None:
            ctx.enable_progress_bars = saved
        if started and ray.is_initialized():
            ray.shutdown()
    if errors:  # every other shard was embedded and committed meanwhile
        raise E5LiteError(f"{len(errors)} of {len(todo)} shards failed in the Ray job, the first: {errors[0]}; the "
                          "others are committed: fix the cause and run the same command again")
    return {"shards": len(plan), "embedded": len(todo), "skipped": len(done), "rows": rows, "tokens": tokens,
            "seconds": time.perf_counter() - t0, "missing": missing_shards(out_dir, manifest, read_records=False)}
