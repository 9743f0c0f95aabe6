"""The corpus runs of ``e5lite embed --input ... --output DIR``: which layout a run takes, and starting it in
one process, in one process per host under jax.distributed, or on Ray actors.

The command parses and checks its flags and calls these. ``load()`` loads the model (the command's own
settings); ``options(dim)`` returns the vector options (``store.output_options`` keywords) checked against
the model's width, with errors that name the flags; both are called only once a run has started, and under
jax.distributed an error in either still lets the other processes finish (``coordination.failing_together``).
"""

from __future__ import annotations

from pathlib import Path

from ..corpus_inputs import SHARD_BYTES, parse_size, resolve_inputs
from ..errors import E5LiteError, InputError
from ..files import read_json
from .coordination import failing_together
from .hosts import embed_per_host
from .ray_run import embed_corpus_ray, model_facts
from .store import FORMAT_SHARDED, ROWS_PER_SHARD
from .writer import embed_corpus

# jax.distributed's shutdown barrier: a process whose share ends early waits this long for the others (jax's
# default, 5 minutes, would stop the run of a process still embedding when process 0 left).
SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600


def run_settings(model, revision, dtype, enc) -> dict:
    """What a run records of the model it embeds with, for a resume to refuse another: the weights option too,
    so that bfloat16 or int8 rows never join float32 ones."""
    return {"model": model, "revision": revision, "dtype": dtype, "max_length": enc.max_length, "weights": enc.weights}


def planned_layout(input, out_dir, *, engine: str = "local", per_host: bool = False, shard_size=None) -> bool:
    """True: shards planned up front and committed one by one (per-host, Ray, folders, globs, Parquet,
    --shard-size, or a folder holding such a run); False: the row shards of one .txt/.jsonl file."""
    if engine == "ray" or per_host or shard_size is not None:
        return True
    path = Path(input)
    if not path.is_file() or path.suffix == ".parquet":
        return True
    try:
        manifest = read_json(Path(out_dir) / "manifest.json", default=None)
    except E5LiteError:  # the single-file mode reports it
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_SHARDED


def embed_file(
    input,
    out_dir,
    *,
    load,
    options,
    model,
    revision: str | None,
    dtype: str,
    field: str = "text",
    json_records: bool = False,
    rows_per_shard: int | None = None,
    shard_format: str | None = None,
    **kw,
) -> dict:
    """One process embedding one .txt/.jsonl file into row shards (``embed_corpus``); ``json_records``: read a
    .txt file as JSONL records too (the command's --field). ``kw``: ``embed_corpus``'s id_field, prompt_name,
    task, normalize, batch_size and overwrite. Returns the final manifest."""
    path = Path(input)
    enc = load()
    settings = run_settings(model, revision, dtype, enc)
    jsonl = path.name.endswith(".jsonl") or json_records
    return embed_corpus(
        enc,
        path,
        Path(out_dir),
        settings=settings,
        field=field if jsonl else None,
        rows_per_shard=ROWS_PER_SHARD if rows_per_shard is None else rows_per_shard,
        shard_format=shard_format or "npy",
        **kw,
        **options(enc.dim),
    )


def embed_planned(
    input,
    out_dir,
    *,
    load,
    options,
    model,
    revision: str | None = None,
    dtype: str = "float32",
    max_length: int | None = None,
    knobs: dict | None = None,
    engine: str = "local",
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    distributed: bool = False,
    num_actors: int | None = None,
    ray_address: str | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    shard_size=None,
    shard_format: str | None = None,
    **common,
) -> dict:
    """A per-host run (under jax.distributed with ``coordinator`` or ``distributed``, else one process;
    ``embed_per_host``) or a Ray run (``engine="ray"``: ``embed_corpus_ray``, with the engine
    ``knobs`` for its actors). ``common``: field, id_field, prompt_name, task, normalize, json_records,
    batch_size, overwrite. Returns the run's summary, with "who" saying what embedded it."""
    resolve_inputs(input, exclude=out_dir)  # a missing input fails before a model loads
    common.update(shard_size=parse_size(shard_size or SHARD_BYTES))
    if engine == "ray":
        common.update(options(model_facts(model, revision=revision).dim))
        s = embed_corpus_ray(
            model,
            input,
            Path(out_dir),
            num_actors=num_actors or 1,
            address=ray_address,
            gpus_per_actor=gpus_per_actor,
            cpus_per_actor=1.0 if cpus_per_actor is None else cpus_per_actor,
            revision=revision,
            dtype=dtype,
            max_length=max_length,
            knobs=knobs,
            **common,
        )
        return {**s, "who": f"{num_actors or 1} Ray actors"}
    together = bool(coordinator or distributed)
    if together:  # before anything starts a JAX backend
        from ..runtime import initialize_distributed

        initialize_distributed(coordinator, num_processes, process_id, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    enc = failing_together(load, together=together)  # a model missing on this host: the others must not wait
    settings = run_settings(model, revision, dtype, enc)
    # every process reaches the end barrier, as for a load error
    common.update(failing_together(lambda: options(enc.dim), together=together, catch=InputError))
    s = embed_per_host(enc, input, Path(out_dir), settings=settings, shard_format=shard_format or "npy", **common)
    return {**s, "who": f"process {s['process']} of {s['processes']}" if s["processes"] > 1 else "one process"}
