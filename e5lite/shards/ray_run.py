"""``e5lite embed --engine ray``: a corpus run with Ray Data actors, writing the shards of a per-host run.

``embed_corpus_ray`` runs the same shard plan and shard files as a per-host run (``hosts.py``): a Ray Data
datasource reads one shard per row, an actor pool embeds and commits each shard under its own name, and a
rerun skips the shards whose records exist. A shard that fails (bad input, a full disk) is reported as a row,
not raised: the other shards go on, and the job ends with one line naming the first failure. The driver
loads no model (``model_facts``): on a GPU node it would take the memory the actors need. Needs the ``ray``
extra (``pip install 'e5lite[ray]'``); ``e5lite.ray`` re-exports these names beside its ``Embedder``. What runs in
Ray's workers (the datasource, the actor, the calibration task): ``ray_tasks.py``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from ..corpus_inputs import CHUNK_ROWS, SHARD_BYTES
from ..errors import E5LiteError
from ..files import write_atomic
from .plan import missing_shards, open_run, plan_run
from .ray_tasks import ShardEmbedder, _calibrate, _message, _ray, _shard_source
from .store import MANIFEST, OUTPUT_DEFAULTS, first_texts, output_options

# the keys of embed_corpus_ray's arguments that go to plan_run as they are
_PLAN_ARGS = ("field", "id_field", "prompt_name", "normalize", "shard_size", "json_records")


def model_facts(model, *, revision: str | None = None, max_length: int | None = None) -> SimpleNamespace:
    """What the driver records in the manifest (dim, pooling, max length, prompts) without loading the
    weights: the actors load them, on their own devices."""
    from .. import hub
    from ..config import BertConfig
    from ..pooling import read_pooling_mode
    from ..prompts import read_prompts
    from ..tokenizer import resolve_max_length

    model_dir = hub.resolve(model, revision=revision)
    config = BertConfig.from_json(model_dir / "config.json")
    prompts = read_prompts(model_dir, name=str(model))
    return SimpleNamespace(
        model_dir=model_dir,
        config=config,
        dim=config.hidden_size,
        pooling=read_pooling_mode(model_dir),
        max_length=resolve_max_length(model_dir, config, max_length),
        prompts=prompts.prompts,
        default_prompt_name=prompts.default_prompt_name,
    )


def one_line(error: BaseException) -> str:
    """One line for an error Ray raised itself (an actor lost, a worker out of memory): shard errors come back
    as rows instead (``ShardEmbedder``), since Ray keeps a remote error only as traceback text. That text's
    last line before Ray's own wrapper is the original error."""
    text = str(error)
    head = text.split("\nThe above exception was the direct cause")[0]
    lines = [ln.strip() for ln in head.strip().splitlines() if ln.strip()]
    return lines[-1] if len(lines) > 1 else _message(error)


def embed_corpus_ray(
    model,
    input,
    out_dir,
    *,
    num_actors: int,
    address: str | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    revision: str | None = None,
    dtype: str = "float32",
    max_length: int | None = None,
    knobs: dict | None = None,
    settings: dict | None = None,
    field: str = "text",
    id_field: str | None = None,
    prompt_name: str | None = None,
    task: str | None = None,
    normalize: bool = True,
    shard_size=SHARD_BYTES,
    json_records: bool = False,
    batch_size: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    long_inputs: str = "truncate",
    chunk_overlap: int = 0,
    truncate_dim: int | None = None,
    precision: str = "float32",
    calibration: int | None = None,
    ranges=None,
) -> dict:
    """Embeds a corpus (the inputs of a per-host run) into Parquet shards in ``out_dir`` with ``num_actors`` Ray
    actors, resuming a previous run there. Connects to ``address`` (default: the running Ray, else a local
    one). ``gpus_per_actor`` defaults to 1 when the cluster has GPUs, else 0. ``settings``: what the manifest
    records about the model (default: model, revision, dtype, max length), as the per-host command does.
    The vector options (``long_inputs`` ... ``ranges``): ``shards.output_options``; int8/uint8 ranges not
    given are computed once by a Ray task (an actor's resources) from the first ``calibration`` texts and
    written into the manifest before any actor starts; every actor quantises with the manifest's.
    Returns a summary; the shards still missing after a failed job are listed by ``read_embeddings``."""
    args = locals().copy()  # the arguments by name: _plan and _run_on_ray take theirs from it
    _check_actors(num_actors, gpus_per_actor, cpus_per_actor)
    ray = _ray()
    out_dir = Path(out_dir)
    manifest, done = _plan(model, input, out_dir, args)
    plan = manifest["plan"]
    todo = [k for k in range(len(plan)) if k not in done]
    t0 = time.perf_counter()
    rows, tokens = _run_on_ray(ray, manifest, todo, out_dir, args, t0)
    return {
        "shards": len(plan),
        "embedded": len(todo),
        "skipped": len(done),
        "rows": rows,
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
        "missing": missing_shards(out_dir, manifest, read_records=False),
    }


def _check_actors(num_actors: int, gpus_per_actor: float | None, cpus_per_actor: float) -> None:
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors must be a positive int, got {num_actors!r}")
    for name, value in (("gpus_per_actor", gpus_per_actor), ("cpus_per_actor", cpus_per_actor)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def _run_on_ray(ray, manifest: dict, todo: list[int], out_dir: Path, args: dict, t0: float) -> tuple[int, int]:
    """The job over the shards ``todo`` (``_run_job``) on the running Ray, else on one started here (at
    ``args["address"]``) and shut down after; Ray's own failure, or failed shards, raise one line each.
    -> (rows, tokens)."""
    started = not ray.is_initialized()
    rows = tokens = 0
    errors: list[str] = []
    try:
        if todo:
            if started:
                # log_to_driver off: the actors' errors come back as exceptions, reported in one line below
                ray.init(
                    address=args["address"], logging_level=logging.WARNING, include_dashboard=False, log_to_driver=False
                )
            model_kw = {
                "model": str(args["model"]),
                "revision": args["revision"],
                "dtype": args["dtype"],
                "max_length": args["max_length"],
                "knobs": args["knobs"] or {},
            }
            rows, tokens, errors = _run_job(
                ray,
                manifest,
                todo,
                out_dir,
                model_kw,
                num_actors=args["num_actors"],
                gpus_per_actor=args["gpus_per_actor"],
                cpus_per_actor=args["cpus_per_actor"],
                batch_size=args["batch_size"],
                show_progress=args["show_progress"],
                t0=t0,
            )
    except KeyboardInterrupt:
        raise
    except Exception as e:  # Ray's own failure: its message holds the remote traceback; one line here
        raise E5LiteError(
            f"the Ray job failed ({one_line(e)}); the shards committed so far are kept: run the same "
            "command again to do the rest"
        ) from None
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    if errors:  # every other shard was embedded and committed meanwhile
        raise E5LiteError(
            f"{len(errors)} of {len(todo)} shards failed in the Ray job, the first: {errors[0]}; the "
            "others are committed: fix the cause and run the same command again"
        )
    return rows, tokens


def _plan(model, input, out_dir: Path, args: dict) -> tuple[dict, set[int]]:
    """The driver's part before any actor starts: the run's manifest from the model's facts (no weights
    loaded), written to ``out_dir``, and the shards done already. ``args``: embed_corpus_ray's."""
    from ..encoder import Encoder

    revision, max_length = args["revision"], args["max_length"]
    facts = model_facts(model, revision=revision, max_length=max_length)
    # the same rule as the per-host run's; duck-typed: the facts have the prompts it reads, not an Encoder
    prompt = Encoder.prompt_prefix(facts, args["prompt_name"], None, args["task"])  # type: ignore[arg-type]
    settings = args["settings"]
    if settings is None:
        settings = {
            "model": str(model),
            "revision": revision,
            "dtype": args["dtype"],
            "max_length": facts.max_length,
            "weights": (args["knobs"] or {}).get("weights"),  # bfloat16 / int8 rows must not join float32 ones
        }
    output = output_options(facts.dim, **{k: args[k] for k in OUTPUT_DEFAULTS})
    if output["long_inputs"] == "chunk":  # an overlap too large for the window fails here, not in every shard
        from ..long_inputs import split
        from ..tokenizer import TextTokenizer

        split(
            TextTokenizer.from_dir(facts.model_dir, facts.max_length, facts.config.pad_token_id),
            [""],
            prompt,
            output["chunk_overlap"],
        )
    plan_args = {k: args[k] for k in _PLAN_ARGS}
    manifest = plan_run(
        input,
        out_dir,
        dim=facts.dim,
        pooling=facts.pooling,
        prompt=prompt,
        settings=settings,
        shard_format="parquet",
        output=output,
        **plan_args,
    )
    # the driver owns every shard
    return manifest, open_run(out_dir, manifest, overwrite=args["overwrite"], primary=True)


def _run_job(
    ray,
    manifest: dict,
    todo: list[int],
    out_dir: Path,
    model_kw: dict,
    *,
    num_actors: int,
    gpus_per_actor: float | None,
    cpus_per_actor: float,
    batch_size: int | None,
    show_progress: bool,
    t0: float,
) -> tuple[int, int, list[str]]:
    """The Ray Data job over the shards ``todo`` (Ray started): the ranges fixed first where the run needs
    them, then an actor pool; -> (rows, tokens, the failed shards' errors)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # ours below counts shards, rows and tokens/s
    try:
        if gpus_per_actor is None:
            gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        run = manifest["run"]
        if run["calibration"] is not None and run["ranges"] is None:  # before any shard: one set of buckets
            resources = dict(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor or 0)
            _fix_ranges(ray, manifest, out_dir, model_kw, resources=resources, batch_size=batch_size)
        kwargs = {
            **model_kw,
            "out_dir": str(out_dir.resolve()),
            "width": manifest["width"],
            "run": {k: v for k, v in run.items() if k != "inputs"},
            "batch_size": batch_size,
        }
        # Reading is I/O: its tasks hold no CPU, which the actors reserve (on a 2-core machine, 2 actors
        # holding both cores would otherwise leave none for the reads, and the job would wait forever). Holding
        # no CPU, every read task could start at once, each in a new worker process that imports e5lite and
        # its dependencies: at most one read in flight per actor keeps them fed (reads outrun the model) and
        # keeps those start-ups from crowding out the actors' (BENCHMARKS.md, "Ray: one read task in flight per actor").
        knobs = model_kw["knobs"]
        pack = knobs.get("chunk_texts", CHUNK_ROWS) if knobs else CHUNK_ROWS
        # 4 read tasks per actor: enough rows in flight for every actor, each task packing its run of shards
        source = _shard_source(
            run["inputs"], manifest["plan"], todo, run["field"], run["id_field"], pack, tasks=4 * num_actors
        )
        ds = ray.data.read_datasource(source, num_cpus=0, concurrency=num_actors)
        ds = ds.map_batches(
            ShardEmbedder,
            fn_constructor_kwargs=kwargs,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
        )
        return _collect(ds, len(todo), show_progress, t0)
    finally:
        ctx.enable_progress_bars = saved


def _collect(ds, total: int, show_progress: bool, t0: float) -> tuple[int, int, list[str]]:
    """The job's result rows as they come, under a progress bar of shards, rows and tokens/s; -> (rows,
    tokens, the failed shards' errors)."""
    from tqdm.auto import tqdm

    rows = tokens = 0
    errors = []
    with tqdm(
        total=total,
        unit="shard",
        desc="embed (ray)",
        disable=not show_progress,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for rec in ds.iter_rows():
            if rec["error"] is not None:
                errors.append(rec["error"])
            rows, tokens = rows + rec["rows"], tokens + rec["tokens"]
            bar.update(1)
            bar.set_postfix_str(f"{rows:,} rows, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
    return rows, tokens, errors


def _fix_ranges(ray, manifest: dict, out_dir: Path, model_kw: dict, *, resources: dict, batch_size: int | None) -> None:
    """int8/uint8 ranges from the run's first texts, computed by a Ray task with an actor's resources and
    written into the manifest before any actor starts."""
    run = manifest["run"]
    texts = first_texts(run["inputs"], manifest["plan"], run["field"], run["calibration"])
    task_ = ray.remote(_calibrate).options(**resources)
    run["ranges"] = ray.get(
        task_.remote(
            **model_kw, texts=texts, batch_size=batch_size, run={k: v for k, v in run.items() if k != "inputs"}
        )
    )
    write_atomic(out_dir / MANIFEST, json.dumps(manifest).encode())
