"""The ``e5lite`` command: embed, score, eval, train, attention, info, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import E5LiteError, InputError
from .files import read_records, write_atomic
from .settings import default_help
from .shards import ROWS_PER_SHARD

PROGRESS_MIN_TEXTS = 256  # show a progress bar on stderr from this many texts


def _read_texts(args) -> list[str]:
    if args.input is None:
        if not args.texts:
            raise InputError("no texts: pass TEXT arguments or --input FILE (or - for stdin)")
        return list(args.texts)
    if args.texts:
        raise InputError("pass texts either as arguments or with --input, not both")
    field = args.field if args.input.endswith(".jsonl") or args.field_given else None
    if args.input == "-":
        return [text for text, _, _ in read_records(sys.stdin.buffer, "<stdin>", field=field)]
    path = Path(args.input)
    if not path.is_file():
        raise InputError(f"input file {args.input!r} does not exist")
    with open(path, "rb") as f:
        return [text for text, _, _ in read_records(f, str(path), field=field)]


def _write_output(emb, output: str | None) -> None:
    import numpy as np
    if output is None:
        for row in emb:  # tolist: floats, or ints for quantised rows
            sys.stdout.write(json.dumps(row.tolist()) + "\n")
        return
    path = Path(output)
    if not path.parent.is_dir():
        raise InputError(f"output folder {str(path.parent)!r} does not exist")
    if path.suffix == ".npy":
        write_atomic(path, lambda f: np.save(f, emb))
    elif path.suffix == ".jsonl":
        write_atomic(path, lambda f: f.writelines(
            (json.dumps({"index": i, "embedding": row.tolist()}) + "\n").encode() for i, row in enumerate(emb)))
    else:
        raise InputError(f"output {output!r}: use a .npy or .jsonl suffix")


def _load(args):
    from .encoder import load
    return load(args.model, revision=args.revision, dtype=args.dtype, max_length=args.max_length,
                token_budget=args.token_budget, streams=args.streams, weights=getattr(args, "weights", None))


def is_output_dir(output: str) -> bool:
    """--output names a folder (sharded, resumable mode) when it ends with a slash, is an existing folder or has
    no suffix; .npy / .jsonl name one file."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir() or not Path(output).suffix


# jax.distributed's shutdown barrier: a process whose share ends early waits this long for the others (jax's
# default, 5 minutes, would stop the run of a process still embedding when process 0 left).
SHUTDOWN_TIMEOUT_S = 7 * 24 * 3600
CORPUS_FLAGS = ("coordinator", "num_processes", "process_id", "distributed", "num_actors", "ray_address",
                "gpus_per_actor", "cpus_per_actor", "shard_size")


def _check_corpus_flags(args) -> None:
    """The per-host and Ray flags: valid values, and only in combinations that mean something."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in ("num_processes", "num_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("gpus_per_actor", "cpus_per_actor"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            raise InputError(f"{flag(name)} must be a number >= 0, got {getattr(args, name)}")
    if args.engine == "ray":
        used = [flag(n) for n in ("coordinator", "num_processes", "process_id", "distributed") if getattr(args, n)
                not in (None, False)]
        if used:
            raise InputError(f"{', '.join(used)}: per-host flags; --engine ray runs on Ray's actors instead")
        if args.shard_format == "npy":
            raise InputError("--engine ray writes Parquet shards: drop --shard-format npy")
        return
    ray_only = [flag(n) for n in ("num_actors", "ray_address", "gpus_per_actor", "cpus_per_actor")
                if getattr(args, n) is not None]
    if ray_only:
        raise InputError(f"{', '.join(ray_only)} need --engine ray")
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        raise InputError("--coordinator HOST:PORT needs --num-processes N and --process-id I (or use --distributed "
                         "for jax.distributed's own cluster detection)")
    if (args.num_processes is not None or args.process_id is not None) and not (args.coordinator or args.distributed):
        raise InputError("--num-processes and --process-id need --coordinator HOST:PORT (or --distributed)")
    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise InputError(f"--process-id must be in [0, {args.num_processes - 1}] for --num-processes "
                         f"{args.num_processes}, got {args.process_id}")


def _check_vector_flags(args) -> None:
    """--long-inputs, --chunk-overlap, --precision, --truncate-dim, --calibration, --ranges: the combinations
    that mean something, before a model loads (--truncate-dim against the model's width is checked after)."""
    if args.chunk_overlap is not None and args.long_inputs != "chunk":
        raise InputError(f"--chunk-overlap {args.chunk_overlap} needs --long-inputs chunk (truncated texts have no "
                         "windows to overlap)")
    if args.chunk_overlap is not None and args.chunk_overlap < 0:
        raise InputError(f"--chunk-overlap must be >= 0, got {args.chunk_overlap}")
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise InputError(f"--truncate-dim must be at least 1, got {args.truncate_dim}")
    for flag, value in (("--calibration", args.calibration), ("--ranges", args.ranges)):
        if value is not None and args.precision not in ("int8", "uint8"):
            raise InputError(f"{flag} sets the int8/uint8 buckets: it needs --precision int8 or uint8 (got "
                             f"--precision {args.precision})")
    if args.calibration is not None and args.ranges is not None:
        raise InputError("--calibration N and --ranges: pass one (ranges computed from the first N texts, or given)")
    if args.calibration is not None and args.calibration < 1:
        raise InputError(f"--calibration must be at least 1 text, got {args.calibration}")


def _vector_options(args, dim: int) -> dict:
    """The vector flags as ``shards.output_options`` keywords; --truncate-dim checked against ``dim``, the
    model's width, and --ranges against the vectors' (errors name the flag)."""
    from .shards import load_ranges
    if args.truncate_dim is not None and args.truncate_dim > dim:
        raise InputError(f"--truncate-dim {args.truncate_dim} is larger than the model's embedding dimension {dim}")
    ranges = None if args.ranges is None else load_ranges(args.ranges)
    want = args.truncate_dim or dim
    if ranges is not None and ranges.shape[1] != want:
        raise InputError(f"--ranges {args.ranges} has {ranges.shape[1]} dimensions; the vectors have {want}"
                         + (" (--truncate-dim)" if args.truncate_dim else ""))
    return {"long_inputs": args.long_inputs, "chunk_overlap": args.chunk_overlap or 0,
            "truncate_dim": args.truncate_dim, "precision": args.precision, "calibration": args.calibration,
            "ranges": ranges}


def _planned_layout(args) -> bool:
    """True: shards planned up front and committed one by one (per-host, Ray, folders, globs, Parquet,
    --shard-size, or a folder holding such a run); False: the row shards of one .txt/.jsonl file."""
    from .files import read_json
    if args.engine == "ray" or args.coordinator or args.distributed or args.shard_size is not None:
        return True
    path = Path(args.input)
    if not path.is_file() or path.suffix == ".parquet":
        return True
    try:
        manifest = read_json(Path(args.output) / "manifest.json", default=None)
    except E5LiteError:  # the single-file mode reports it
        return False
    from .shards import FORMAT_SHARDED
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT_SHARDED


def cmd_embed_dir(args) -> None:
    from .shards import embed_corpus
    if args.input is None or args.input == "-" or args.texts:
        raise InputError("--output DIR (sharded, resumable) needs --input FILE: a .txt, .jsonl or .parquet file, a "
                         "folder or a glob of them, not stdin or TEXT arguments")
    _check_corpus_flags(args)
    _check_vector_flags(args)
    if args.ranges is not None:
        from .shards import load_ranges
        load_ranges(args.ranges)  # a bad file fails before a model loads
    if _planned_layout(args):
        return _embed_planned(args)
    path = Path(args.input)
    enc = _load(args)
    settings = {"model": args.model, "revision": args.revision, "dtype": args.dtype, "max_length": enc.max_length}
    jsonl = path.name.endswith(".jsonl") or args.field_given
    manifest = embed_corpus(enc, path, Path(args.output), settings=settings, field=args.field if jsonl else None,
                            id_field=args.id_field, prompt_name=args.prompt_name, task=args.task,
                            normalize=not args.no_normalize,
                            rows_per_shard=ROWS_PER_SHARD if args.rows_per_shard is None else args.rows_per_shard,
                            shard_format=args.shard_format or "npy", batch_size=args.batch_size,
                            overwrite=args.overwrite, **_vector_options(args, enc.dim))
    from .shards import stored_layout
    _, width = stored_layout(manifest["run"])
    print(f"wrote {manifest['rows']} x {width} embeddings in {len(manifest['shards'])} shards to {args.output}"
          + ("" if args.precision == "float32" else f" ({args.precision})"), file=sys.stderr)


def _embed_planned(args) -> None:
    """Per-host (under jax.distributed, or one process) and Ray corpus runs (``shards.embed_per_host``,
    ``ray.embed_corpus_ray``)."""
    from .corpus_inputs import SHARD_BYTES, parse_size, resolve_inputs
    if args.rows_per_shard is not None:
        raise InputError("--rows-per-shard applies to one process embedding one .txt/.jsonl file; per-host, Ray, "
                         "folder and Parquet runs cut .txt/.jsonl input by --shard-size and Parquet by row group")
    resolve_inputs(args.input, exclude=args.output)  # a missing input fails before a model loads
    common = dict(field=args.field, id_field=args.id_field, prompt_name=args.prompt_name, task=args.task,
                  normalize=not args.no_normalize, shard_size=parse_size(args.shard_size or SHARD_BYTES),
                  json_records=args.field_given, batch_size=args.batch_size, overwrite=args.overwrite)
    if args.engine == "ray":
        from .ray import embed_corpus_ray, model_facts
        knobs = {k: getattr(args, k) for k in ("token_budget", "streams") if getattr(args, k) is not None}
        common.update(_vector_options(args, model_facts(args.model, revision=args.revision).dim))
        s = embed_corpus_ray(args.model, args.input, Path(args.output), num_actors=args.num_actors or 1,
                             address=args.ray_address, gpus_per_actor=args.gpus_per_actor,
                             cpus_per_actor=1.0 if args.cpus_per_actor is None else args.cpus_per_actor,
                             revision=args.revision, dtype=args.dtype, max_length=args.max_length, knobs=knobs,
                             **common)
        who = f"{args.num_actors or 1} Ray actors"
    else:
        from .shards import embed_per_host
        if args.coordinator or args.distributed:  # before anything starts a JAX backend
            from .runtime import initialize_distributed
            initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                   shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
            try:
                enc = _load(args)
            except Exception as e:  # a model missing on this host: the others must not wait for it forever
                import jax
                from .shards import wait_after_failure
                wait_after_failure(jax.process_index(), jax.process_count(), e)
                raise
        else:
            enc = _load(args)
        settings = {"model": args.model, "revision": args.revision, "dtype": args.dtype, "max_length": enc.max_length}
        try:
            common.update(_vector_options(args, enc.dim))
        except InputError as e:
            if args.coordinator or args.distributed:  # every process reaches the end barrier, as for a load error
                import jax
                from .shards import wait_after_failure
                wait_after_failure(jax.process_index(), jax.process_count(), e)
            raise
        s = embed_per_host(enc, args.input, Path(args.output), settings=settings,
                           shard_format=args.shard_format or "npy", **common)
        who = f"process {s['process']} of {s['processes']}" if s["processes"] > 1 else "one process"
    state = (f"all {s['shards']} shards are done" if not s["missing"] else
             f"{len(s['missing'])} of {s['shards']} shards are not done yet")
    print(f"wrote {s['rows']} embeddings in {s['embedded']} shards to {args.output} ({who}; {s['skipped']} shards "
          f"were done already); {state}", file=sys.stderr)


def cmd_embed(args) -> None:
    if args.output is not None and is_output_dir(args.output):
        return cmd_embed_dir(args)
    if args.id_field is not None:
        raise InputError("--id-field needs --output DIR (the sharded mode)")
    used = ["--" + n.replace("_", "-") for n in CORPUS_FLAGS if getattr(args, n) not in (None, False)]
    if used or args.engine != "local":
        raise InputError(f"{', '.join(used) or '--engine ray'}: corpus-run flags, for --output DIR (the sharded "
                         "mode) only")
    _check_vector_flags(args)
    texts = _read_texts(args)
    if args.output is not None and Path(args.output).suffix not in (".npy", ".jsonl"):
        raise InputError(f"output {args.output!r}: use a .npy or .jsonl suffix, or a folder (no suffix)")
    if args.precision in ("int8", "uint8") and args.ranges is None and args.calibration is None and len(texts) < 2:
        raise InputError(f"--precision {args.precision} of one text needs --ranges (its buckets cannot come from "
                         "one embedding)")
    if args.ranges is not None:
        from .shards import load_ranges
        load_ranges(args.ranges)  # a bad file fails before a model loads
    enc = _load(args)
    opts = _vector_options(args, enc.dim)
    kw = dict(prompt_name=args.prompt_name, task=args.task, normalize=not args.no_normalize,
              batch_size=args.batch_size, long_inputs=opts["long_inputs"], chunk_overlap=opts["chunk_overlap"],
              truncate_dim=opts["truncate_dim"])
    calibration = None
    if opts["calibration"] is not None:  # the float vectors of the first N texts set the buckets
        calibration = enc.encode(texts[:opts["calibration"]], **kw, show_progress_bar=False)
    emb = enc.encode(texts, **kw, precision=opts["precision"], ranges=opts["ranges"],
                     calibration_embeddings=calibration, show_progress_bar=len(texts) >= PROGRESS_MIN_TEXTS)
    _write_output(emb, args.output)
    if args.output:
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}"
              + ("" if args.precision == "float32" else f" ({args.precision})"), file=sys.stderr)


def cmd_score(args) -> None:
    enc = _load(args)
    q = enc.encode_queries(args.query, task=args.task, batch_size=args.batch_size)
    p = enc.encode(args.passage, prompt_name="passage", batch_size=args.batch_size)
    scores = 100.0 * q @ p.T
    width = 8
    print(" " * 6 + "".join(f"{'P' + str(j):>{width}}" for j in range(len(args.passage))))
    for i, row in enumerate(scores):
        print(f"{'Q' + str(i):<6}" + "".join(f"{s:>{width}.2f}" for s in row))
    print()
    for i, t in enumerate(args.query):
        print(f"Q{i}: {enc.prompt_prefix(task=args.task) if args.task else enc.prompts['query']}{t}")
    for j, t in enumerate(args.passage):
        print(f"P{j}: {enc.prompts['passage']}{t[:100]}{'...' if len(t) > 100 else ''}")


def _k_values(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise InputError(f"--k must be positive integers separated by commas, got {text!r}")
    return ks


def cmd_eval(args) -> None:
    from .evaluate import evaluate_retrieval, format_table
    k_values = _k_values(args.k)
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise InputError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    enc = _load(args)
    report = evaluate_retrieval(enc, args.data, split=args.split, k_values=k_values, query_prompt=args.query_prompt,
                                passage_prompt=args.passage_prompt, batch_size=args.batch_size,
                                corpus_embeddings=args.corpus_embeddings, show_progress_bar=True)
    print(f"{report['data']} ({report['split']}): {report['queries']} queries, {report['corpus']} documents; "
          f"embedding {report['embed_s']:.1f} s, search {report['search_s']:.2f} s")
    print(format_table(report))
    if args.output:
        write_atomic(Path(args.output), (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {args.output}", file=sys.stderr)


def cmd_attention(args) -> None:
    from . import viz
    from .encoder import load
    suffix = Path(args.output).suffix if args.output else None
    if suffix not in (None, ".png", ".json"):
        raise InputError(f"output {args.output!r}: use a .png or .json suffix")
    if suffix == ".png":
        viz._pyplot()  # a missing extra fails before the model loads
    enc = load(args.model, revision=args.revision, max_length=args.max_length)
    if args.compare is not None:
        rows = viz.layer_similarity(enc, args.text, args.compare, prompt_name=args.prompt_name)
        if suffix == ".png":
            viz.plot_similarity(args.output, rows, args.text, args.compare)
        elif suffix == ".json":
            write_atomic(Path(args.output), json.dumps(rows, indent=1).encode())
        print("| layer | cosine (mean-pooled) | cosine ([CLS]) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['cosine_mean']:.4f} | {r['cosine_cls']:.4f} |")
        return
    L, N = enc.config.num_hidden_layers, enc.config.num_attention_heads
    if not -L <= args.layer < L:
        raise InputError(f"--layer {args.layer}: this model has layers 0..{L - 1}")
    if args.head is not None and not 0 <= args.head < N:
        raise InputError(f"--head {args.head}: this model has heads 0..{N - 1}")
    layer = args.layer % L
    heads = list(range(N)) if args.head is None else [args.head]
    tokens, probs = viz.attention_maps(enc, args.text, prompt_name=args.prompt_name)
    if suffix == ".png":
        viz.plot_attention(args.output, tokens, probs[layer], layer, heads)
        print(f"wrote layer {layer}'s attention ({len(heads)} heads, {len(tokens)} tokens) to {args.output}",
              file=sys.stderr)
        return
    report = json.dumps({"tokens": tokens, "layer": layer, "heads": heads,
                         "attentions": [probs[layer, h].round(6).tolist() for h in heads]})
    if suffix == ".json":
        write_atomic(Path(args.output), report.encode())
    else:
        print(report)


def cmd_train(args) -> None:
    try:
        import optax  # noqa: F401
    except ImportError:
        raise InputError("e5lite train needs the train extra (optax is missing): pip install 'e5lite[train]'") from None
    from .encoder import load
    from .train import TrainSettings, fit
    settings = TrainSettings(
        batch_size=args.batch_size, learning_rate=args.learning_rate, optimizer=args.optimizer,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps,
        temperature=args.temperature, seed=args.seed, shuffle=not args.no_shuffle, dropout=args.dropout,
        dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing, chunk_size=args.chunk_size)
    enc = load(args.model, revision=args.revision, max_length=args.max_length)
    summary = fit(enc, args.train, args.output, settings=settings, eval_data=args.eval, eval_every=args.eval_every,
                  save_every=args.save_every, resume=args.resume, query_field=args.query_field,
                  positive_field=args.positive_field, negative_field=args.negative_field)
    print(f"trained {summary['steps']} steps (loss {summary['loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s); "
          f"wrote the model to {args.output}", file=sys.stderr)
    if summary["eval"]:
        from .evaluate import format_table
        print(format_table(summary["eval"]))


def cmd_info(args) -> None:
    import jax
    from .weights import num_params
    enc = _load(args)
    info = {
        "model_dir": str(enc.model_dir),
        "architecture": enc.config.model_type,
        "tokenizer": enc.tokenizer.kind,
        "config": enc.config.to_dict(),
        "parameters": num_params(enc.params),
        "dim": enc.dim,
        "pooling": enc.pooling,
        "max_length": enc.max_length,
        "dtype": enc.dtype.name,
        "prompts": enc.prompts,
        "default_prompt_name": enc.default_prompt_name,
        "devices": [str(d) for d in jax.devices()],
    }
    print(json.dumps(info, indent=2))


def cmd_serve(args) -> None:
    try:
        from .serve import Limits, serve
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in ("starlette", "uvicorn", "pydantic"):
            raise
        raise InputError(f"e5lite serve needs the serve extra ({missing} is missing): "
                         "pip install 'e5lite[serve]'") from None
    try:
        limits = Limits.from_arguments(args)
    except ValueError as e:  # names the flag
        raise InputError(str(e)) from None
    enc = _load(args)
    serve(enc, host=args.host, port=args.port, model_name=args.served_model_name or args.model, limits=limits)


def _common(p) -> None:
    """The flags every subcommand takes: the model and the engine."""
    p.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--weights", default=None, choices=["bfloat16"],
                   help="bfloat16: the layers' matmul weights in bfloat16 with float32 compute (faster one-query "
                        "latency on CPU, cosine >= 0.999 against float32; README: Faster queries)")
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument("--batch-size", type=int, default=None, help="max texts per batch (default: fill the budget)")
    p.add_argument("--token-budget", type=int, default=None,
                   help=f"tokens per batch (default: {default_help('token_budget')})")
    p.add_argument("--streams", type=int, default=None,
                   help=f"batches computed at once (default: {default_help('streams')})")


TASK_HELP = ("-instruct models: a one-sentence task description; queries get \"Instruct: TASK\\nQuery: \" "
             "(instead of --prompt-name)")


def _add_embed(sub) -> None:
    """``e5lite embed``: texts in, embeddings out (one file, or resumable shards)."""
    e = sub.add_parser("embed", help="embed texts; writes .npy / .jsonl, or JSON arrays to stdout")
    _common(e)
    e.add_argument("texts", nargs="*", metavar="TEXT")
    e.add_argument("--input", default=None, help="a .txt file (one text per line), a .jsonl file, or - for stdin")
    e.add_argument("--field", default=None, help="the text field of .jsonl records (default: text)")
    e.add_argument("--output", default=None,
                   help="a .npy or .jsonl file, or a folder (trailing /, existing, or no suffix) for resumable "
                        "sharded output (default: JSON arrays on stdout)")
    e.add_argument("--prompt-name", default=None, help="query or passage (adds E5's prefix)")
    e.add_argument("--task", default=None, help=TASK_HELP)
    e.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    e.add_argument("--rows-per-shard", type=int, default=None,
                   help=f"--output DIR, one process on one .txt/.jsonl file: rows per shard (default {ROWS_PER_SHARD})")
    e.add_argument("--shard-format", default=None, choices=["npy", "parquet"],
                   help="--output DIR: .npy + .ids.json per shard (default), or Parquet (needs pyarrow; what "
                        "--engine ray writes)")
    e.add_argument("--id-field", default=None, help="--output DIR: record field (Parquet: column) kept as the row "
                                                    "id (default: the row number)")
    e.add_argument("--overwrite", action="store_true", help="--output DIR: discard a previous run there")
    v = e.add_argument_group("long inputs and compact vectors (every output; README: Command line)")
    v.add_argument("--long-inputs", default="truncate", choices=["truncate", "chunk"],
                   help="texts past --max-length: truncate (default), or chunk: embed windows of the whole text and "
                        "average them by token count")
    v.add_argument("--chunk-overlap", type=int, default=None, metavar="N",
                   help="--long-inputs chunk: tokens consecutive windows share (default 0)")
    v.add_argument("--truncate-dim", type=int, default=None, metavar="N",
                   help="keep the first N components (Matryoshka models), normalised after the cut")
    v.add_argument("--precision", default="float32", choices=["float32", "int8", "uint8", "binary", "ubinary"],
                   help="int8/uint8: 256 buckets per dimension; binary/ubinary: sign bits packed 8 per byte "
                        "(sentence-transformers' quantize_embeddings)")
    v.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="int8/uint8: bucket ranges from the float vectors of the first N texts (default: all texts; "
                        "--output DIR: the first 1000, fixed in the manifest before the run)")
    v.add_argument("--ranges", default=None, metavar="FILE.npy|DIR",
                   help="int8/uint8: bucket ranges [2, dim] (min, max) from a .npy file or an earlier "
                        "--output DIR run (to quantise queries like that corpus)")
    c = e.add_argument_group("corpus runs beyond one process (--output DIR; README: Embedding a corpus on a cluster)")
    c.add_argument("--shard-size", default=None, metavar="SIZE",
                   help=".txt/.jsonl input per shard for per-host, Ray, folder, glob and Parquet runs, e.g. 512K, "
                        "8M (default 8M; Parquet: one shard per row group)")
    c.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="per host under jax.distributed: process 0's address; each process embeds its share of "
                        "the shards on its own devices")
    c.add_argument("--num-processes", type=int, default=None, help="with --coordinator: the number of processes")
    c.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process, 0..N-1")
    c.add_argument("--distributed", action="store_true",
                   help="per host, with jax.distributed.initialize()'s own detection (TPU pods, SLURM, ...)")
    c.add_argument("--engine", default="local", choices=["local", "ray"], help="ray: embed with Ray Data actors")
    c.add_argument("--num-actors", type=int, default=None, help="--engine ray: actors (default 1)")
    c.add_argument("--ray-address", default=None, help="--engine ray: the cluster (default: a running Ray, else a "
                                                       "local one)")
    c.add_argument("--gpus-per-actor", type=float, default=None,
                   help="--engine ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    c.add_argument("--cpus-per-actor", type=float, default=None, help="--engine ray: CPUs per actor (default 1)")
    e.set_defaults(func=cmd_embed)


def _add_score(sub) -> None:
    """``e5lite score`` (the model card demo) and ``e5lite info``."""
    s = sub.add_parser("score", help="100 x cosine scores of queries against passages (the E5 model card demo)")
    _common(s)
    s.add_argument("--query", action="append", required=True)
    s.add_argument("--passage", action="append", required=True)
    s.add_argument("--task", default=None, help=TASK_HELP)
    s.set_defaults(func=cmd_score)

    i = sub.add_parser("info", help="config, parameter count, pooling, max length, devices")
    _common(i)
    i.set_defaults(func=cmd_info)


def _add_serve(sub) -> None:
    """``e5lite serve``: the HTTP server and its limits."""
    v = sub.add_parser("serve", help="HTTP server: OpenAI /v1/embeddings, TEI /embed, /health, /info, /metrics")
    _common(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument("--served-model-name", default=None, help="the model name in responses (default: --model)")
    from .serve.limits import Limits  # the limits' flags, defaults and help; no server stack imported
    Limits.add_arguments(v)
    v.set_defaults(func=cmd_serve)


def _add_eval(sub) -> None:
    """``e5lite eval``: retrieval metrics on a BEIR folder."""
    r = sub.add_parser("eval", help="retrieval metrics (nDCG, MAP, recall, precision, MRR @k) on a BEIR-format folder")
    _common(r)
    r.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    r.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    r.add_argument("--k", default="1,3,5,10,100", help="cut-offs, comma-separated (default: %(default)s)")
    r.add_argument("--output", default=None, help="write the report (metrics, counts, timings) as JSON here")
    r.add_argument("--corpus-embeddings", default=None,
                   help="an e5lite embed --output DIR run over corpus.jsonl (--id-field _id), used instead of "
                        "embedding the corpus")
    r.add_argument("--query-prompt", default=None, help="prefix for queries (default: the model's query prompt)")
    r.add_argument("--passage-prompt", default=None,
                   help="prefix for documents (default: the model's passage prompt)")
    r.set_defaults(func=cmd_eval)


def _add_attention(sub) -> None:
    """``e5lite attention``: attention maps of one text, or layer-by-layer similarity of two."""
    a = sub.add_parser("attention", help="attention heat maps of a text (PNG or JSON), or --compare: two texts' "
                                         "similarity layer by layer")
    a.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    a.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    a.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    a.add_argument("--text", required=True)
    a.add_argument("--prompt-name", default=None, help="query or passage (adds E5's prefix)")
    a.add_argument("--layer", type=int, default=-1, help="0-based layer; negative counts from the last "
                                                         "(default: the last)")
    a.add_argument("--head", type=int, default=None, help="one head (default: every head, one panel each)")
    a.add_argument("--compare", default=None, metavar="TEXT2",
                   help="instead of maps: cosine similarity of --text and TEXT2 after each layer")
    a.add_argument("--output", default=None, help="a .png (needs the viz extra) or .json file (default: JSON on "
                                                  "stdout, or the --compare table)")
    a.set_defaults(func=cmd_attention)


def _add_train(sub) -> None:
    """``e5lite train``: contrastive fine-tuning; defaults come from ``TrainSettings``."""
    import dataclasses

    from .train import TrainSettings
    d = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    t = sub.add_parser("train", help="fine-tune on (query, positive[, negatives]) JSONL records with InfoNCE")
    t.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    t.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    t.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    t.add_argument("--train", required=True, help="JSONL training records")
    t.add_argument("--output", required=True, help="the model folder to write (checkpoints and log in training/)")
    for field in ("query", "positive", "negative"):
        t.add_argument(f"--{field}-field", default=field, help=f"the records' {field} field (default: %(default)s)")
    for name, kind in (("batch_size", int), ("learning_rate", float), ("weight_decay", float),
                       ("warmup_steps", int), ("epochs", int), ("max_steps", int), ("temperature", float),
                       ("seed", int), ("dropout", float), ("chunk_size", int)):
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, default=d[name], help="default: %(default)s")
    t.add_argument("--optimizer", default=d["optimizer"], choices=["adamw", "sgd"])
    t.add_argument("--dtype", default=d["dtype"], choices=["float32", "bfloat16"], help="compute dtype")
    t.add_argument("--no-shuffle", action="store_true", help="records in file order every epoch")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    t.add_argument("--eval", default=None, help="a BEIR folder evaluated during and after training")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: end only)")
    t.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e5lite", description="E5 / BERT text embeddings in pure JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_embed, _add_score, _add_serve, _add_eval, _add_train, _add_attention):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "train":  # a command line of its own, not a call from Python
        from .runtime import restart_with_huge_pages
        restart_with_huge_pages()
    if getattr(args, "command", None) == "embed":
        args.field_given = args.field is not None
        args.field = args.field or "text"
    try:
        args.func(args)
    except (E5LiteError, OSError, ValueError, TypeError) as e:
        print(f"e5lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e5lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
