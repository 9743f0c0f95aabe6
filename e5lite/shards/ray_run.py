"""``e5lite embed --engine ray``: a corpus run with Ray Data actors, writing the shards of a per-host run.

``embed_corpus_ray`` runs the same shard plan and shard files as a per-host run (``hosts.py``): a Ray Data
datasource reads one shard per row, an actor pool embeds and commits each shard under its own name, and a
rerun skips the shards whose records exist. A shard that fails (bad input, a full disk) is reported as a row,
not raised: the other shards go on, and the job ends with one line naming the first failure. The driver
loads no model (``model_facts``): on a GPU node it would take the memory the actors need. Needs the ``ray``
extra (``pip install 'e5lite[ray]'``); ``e5lite.ray`` re-exports these names beside its ``Embedder``.
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

from ..corpus_inputs import CHUNK_ROWS, SHARD_BYTES, describe_shard, read_shard, shard_bytes_of
from ..errors import E5LiteError
from ..files import write_atomic
from .hosts import embed_shards, missing_shards, open_run, plan_run
from .store import MANIFEST, first_texts, output_options, shard_stem
from .vector_steps import calibration_ranges


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise E5LiteError("the Ray engine needs the ray extra: pip install 'e5lite[ray]'") from None
    return ray


def model_facts(model, *, revision: str | None = None, max_length: int | None = None) -> SimpleNamespace:
    """What the driver records in the manifest (dim, pooling, max length, prompts) without loading the
    weights: the actors load them, on their own devices."""
    from .. import hub
    from ..config import BertConfig
    from ..pooling import read_pooling_mode
    from ..tokenizer import read_prompts, resolve_max_length
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
    from ..encoder import load
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
        from ..encoder import load
        self.encoder = load(model, revision=revision, dtype=dtype, max_length=max_length, **knobs)
        self.out_dir, self.run, self.width, self.batch_size = Path(out_dir), run, width, batch_size
        self.writer = f"ray actor {socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch):
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
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be a positive int, got {num_actors!r}")
    for name, value in (("gpus_per_actor", gpus_per_actor), ("cpus_per_actor", cpus_per_actor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    ray = _ray()
    out_dir = Path(out_dir)
    manifest, done = _plan(model, input, out_dir, revision=revision, dtype=dtype, max_length=max_length,
                           settings=settings, field=field, id_field=id_field, prompt_name=prompt_name, task=task,
                           normalize=normalize, shard_size=shard_size, json_records=json_records, overwrite=overwrite,
                           output=dict(long_inputs=long_inputs, chunk_overlap=chunk_overlap, truncate_dim=truncate_dim,
                                       precision=precision, calibration=calibration, ranges=ranges))
    plan = manifest["plan"]
    todo = [k for k in range(len(plan)) if k not in done]
    started = not ray.is_initialized()
    t0 = time.perf_counter()
    rows = tokens = 0
    errors = []
    try:
        if todo:
            if started:
                # log_to_driver off: the actors' errors come back as exceptions, reported in one line below
                ray.init(address=address, logging_level=logging.WARNING, include_dashboard=False,
                         log_to_driver=False)
            model_kw = {"model": str(model), "revision": revision, "dtype": dtype, "max_length": max_length,
                        "knobs": knobs or {}}
            rows, tokens, errors = _run_job(ray, manifest, todo, out_dir, model_kw, num_actors=num_actors,
                                            gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
                                            batch_size=batch_size, show_progress=show_progress, t0=t0)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # Ray's own failure: its message holds the remote traceback; one line here
        raise E5LiteError(f"the Ray job failed ({one_line(e)}); the shards committed so far are kept: run the same "
                          "command again to do the rest") from None
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    if errors:  # every other shard was embedded and committed meanwhile
        raise E5LiteError(f"{len(errors)} of {len(todo)} shards failed in the Ray job, the first: {errors[0]}; the "
                          "others are committed: fix the cause and run the same command again")
    return {"shards": len(plan), "embedded": len(todo), "skipped": len(done), "rows": rows, "tokens": tokens,
            "seconds": time.perf_counter() - t0, "missing": missing_shards(out_dir, manifest, read_records=False)}


def _plan(model, input, out_dir: Path, *, revision, dtype, max_length, settings, field, id_field, prompt_name, task,
          normalize, shard_size, json_records, overwrite, output) -> tuple[dict, set[int]]:
    """The driver's part before any actor starts: the run's manifest from the model's facts (no weights
    loaded), written to ``out_dir``, and the shards done already."""
    from ..encoder import Encoder
    facts = model_facts(model, revision=revision, max_length=max_length)
    prompt = Encoder.prompt_prefix(facts, prompt_name, None, task)  # the same rule as the per-host run's
    settings = settings if settings is not None else {"model": str(model), "revision": revision, "dtype": dtype,
                                                      "max_length": facts.max_length}
    output = output_options(facts.dim, **output)
    if output["long_inputs"] == "chunk":  # an overlap too large for the window fails here, not in every shard
        from ..long_inputs import split
        from ..tokenizer import TextTokenizer
        split(TextTokenizer.from_dir(facts.model_dir, facts.max_length, facts.config.pad_token_id), [""], prompt,
              output["chunk_overlap"])
    manifest = plan_run(input, out_dir, dim=facts.dim, pooling=facts.pooling, prompt=prompt, settings=settings,
                        field=field, id_field=id_field, prompt_name=prompt_name, normalize=normalize,
                        shard_size=shard_size, shard_format="parquet", json_records=json_records, output=output)
    return manifest, open_run(out_dir, manifest, overwrite=overwrite, primary=True)  # the driver owns every shard


def _run_job(ray, manifest: dict, todo: list[int], out_dir: Path, model_kw: dict, *, num_actors: int,
             gpus_per_actor: float | None, cpus_per_actor: float, batch_size: int | None, show_progress: bool,
             t0: float) -> tuple[int, int, list[str]]:
    """The Ray Data job over the shards ``todo`` (Ray started): the ranges fixed first where the run needs
    them, then an actor pool; -> (rows, tokens, the failed shards' errors)."""
    from tqdm.auto import tqdm
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # ours below counts shards, rows and tokens/s
    try:
        if gpus_per_actor is None:
            gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        run = manifest["run"]
        if run["calibration"] is not None and run["ranges"] is None:  # before any shard: one set of buckets
            _fix_ranges(ray, manifest, out_dir, model_kw, resources=dict(num_cpus=cpus_per_actor,
                                                                         num_gpus=gpus_per_actor or 0),
                        batch_size=batch_size)
        kwargs = {**model_kw, "out_dir": str(out_dir.resolve()), "width": manifest["width"],
                  "run": {k: v for k, v in run.items() if k != "inputs"}, "batch_size": batch_size}
        # Reading is I/O: its tasks hold no CPU, which the actors reserve (on a 2-core machine, 2 actors
        # holding both cores would otherwise leave none for the reads, and the job would wait forever).
        knobs = model_kw["knobs"]
        pack = knobs.get("chunk_texts", CHUNK_ROWS) if knobs else CHUNK_ROWS
        # 4 read tasks per actor: enough rows in flight for every actor, each task packing its run of shards
        source = _shard_source(run["inputs"], manifest["plan"], todo, run["field"], run["id_field"], pack,
                               tasks=4 * num_actors)
        ds = ray.data.read_datasource(source, num_cpus=0)
        ds = ds.map_batches(ShardEmbedder, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
                            num_gpus=gpus_per_actor or None)
        rows = tokens = 0
        errors = []
        with tqdm(total=len(todo), unit="shard", desc="embed (ray)", disable=not show_progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for rec in ds.iter_rows():
                if rec["error"] is not None:
                    errors.append(rec["error"])
                rows, tokens = rows + rec["rows"], tokens + rec["tokens"]
                bar.update(1)
                bar.set_postfix_str(f"{rows:,} rows, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
        return rows, tokens, errors
    finally:
        ctx.enable_progress_bars = saved


def _fix_ranges(ray, manifest: dict, out_dir: Path, model_kw: dict, *, resources: dict,
                batch_size: int | None) -> None:
    """int8/uint8 ranges from the run's first texts, computed by a Ray task with an actor's resources and
    written into the manifest before any actor starts."""
    run = manifest["run"]
    texts = first_texts(run["inputs"], manifest["plan"], run["field"], run["calibration"])
    task_ = ray.remote(_calibrate).options(**resources)
    run["ranges"] = ray.get(task_.remote(**model_kw, texts=texts, batch_size=batch_size,
                                         run={k: v for k, v in run.items() if k != "inputs"}))
    write_atomic(out_dir / MANIFEST, json.dumps(manifest).encode())
