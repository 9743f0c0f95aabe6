"""``e5lite embed``: texts from arguments, a file or stdin to a .npy / .jsonl file or stdout, or a corpus
into a folder of resumable shards (``--output DIR``: the runs themselves are in ``shards.runs``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cli_checks import CLUSTER_FLAGS, CORPUS_FLAGS, check_corpus_flags, check_vector_flags, vector_options
from .errors import InputError
from .files import read_records, write_atomic

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
    if path.suffix == ".parquet":
        return _parquet_texts(path, args.field)
    with open(path, "rb") as f:
        return [text for text, _, _ in read_records(f, str(path), field=field)]


def _parquet_texts(path: Path, field: str) -> list[str]:
    """A Parquet file's --field column (default "text"), every row group in order: the reader and checks of
    corpus runs (``corpus_inputs``), for a one-file output."""
    from .corpus_inputs import describe_inputs, read_shard

    (f,) = describe_inputs([path], json_records=False, field=field, id_field=None)
    groups = [{"file": 0, "row_group": g, "rows": n, "bytes": b} for g, (n, b) in enumerate(f["row_groups"])]
    return [t for shard in groups for texts, _, _ in read_shard([f], shard, field=field, id_field=None) for t in texts]


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
        write_atomic(
            path,
            lambda f: f.writelines(
                (json.dumps({"index": i, "embedding": row.tolist()}) + "\n").encode() for i, row in enumerate(emb)
            ),
        )
    else:
        raise InputError(f"output {output!r}: use a .npy or .jsonl suffix")


def load_encoder(args):
    """The model the common flags name (``cli_args._common``), with its engine settings."""
    from .encoder import load

    return load(
        args.model,
        revision=args.revision,
        dtype=args.dtype,
        max_length=args.max_length,
        token_budget=args.token_budget,
        streams=args.streams,
        weights=getattr(args, "weights", None),
        programs=getattr(args, "programs", None),  # serve --programs DIR
    )


def is_output_dir(output: str) -> bool:
    """--output names a folder (sharded, resumable mode) when it ends with a slash, is an existing folder or has
    no suffix; .npy / .jsonl name one file."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir() or not Path(output).suffix


def cmd_embed_dir(args) -> None:
    """--output DIR: a resumable corpus run (``shards.runs``); the flags are checked before a model loads."""
    from .shards import embed_file, load_ranges, planned_layout, stored_layout

    if args.input is None or args.input == "-" or args.texts:
        raise InputError(
            "--output DIR (sharded, resumable) needs --input FILE: a .txt, .jsonl or .parquet file, a "
            "folder or a glob of them, not stdin or TEXT arguments"
        )
    check_corpus_flags(args)
    check_vector_flags(args)
    if args.ranges is not None:
        load_ranges(args.ranges)  # a bad file fails before a model loads
    if planned_layout(
        args.input,
        args.output,
        engine=args.engine,
        per_host=bool(args.coordinator or args.distributed),
        shard_size=args.shard_size,
    ):
        return _embed_planned(args)
    manifest = embed_file(
        args.input,
        args.output,
        load=lambda: load_encoder(args),
        options=lambda dim: vector_options(args, dim),
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        field=args.field,
        json_records=args.field_given,
        rows_per_shard=args.rows_per_shard,
        shard_format=args.shard_format,
        id_field=args.id_field,
        prompt_name=args.prompt_name,
        task=args.task,
        normalize=not args.no_normalize,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    _, width = stored_layout(manifest["run"])
    print(
        f"wrote {manifest['rows']} x {width} embeddings in {len(manifest['shards'])} shards to {args.output}"
        + ("" if args.precision == "float32" else f" ({args.precision})"),
        file=sys.stderr,
    )


def _embed_planned(args) -> None:
    """Per-host (under jax.distributed, or one process) and Ray corpus runs (``shards.embed_planned``)."""
    from .shards import embed_planned

    if args.rows_per_shard is not None:
        raise InputError(
            "--rows-per-shard applies to one process embedding one .txt/.jsonl file; per-host, Ray, "
            "folder and Parquet runs cut .txt/.jsonl input by --shard-size and Parquet by row group"
        )
    cluster = {k: getattr(args, k) for k in CLUSTER_FLAGS}
    s = embed_planned(
        args.input,
        args.output,
        load=lambda: load_encoder(args),
        options=lambda dim: vector_options(args, dim),
        model=args.model,
        revision=args.revision,
        dtype=args.dtype,
        max_length=args.max_length,
        knobs={
            k: getattr(args, k) for k in ("token_budget", "streams", "weights") if getattr(args, k, None) is not None
        },
        engine=args.engine,
        shard_size=args.shard_size,
        shard_format=args.shard_format,
        **cluster,
        field=args.field,
        id_field=args.id_field,
        prompt_name=args.prompt_name,
        task=args.task,
        normalize=not args.no_normalize,
        json_records=args.field_given,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
    )
    state = (
        f"all {s['shards']} shards are done"
        if not s["missing"]
        else f"{len(s['missing'])} of {s['shards']} shards are not done yet"
    )
    print(
        f"wrote {s['rows']} embeddings in {s['embedded']} shards to {args.output} ({s['who']}; {s['skipped']} "
        f"shards were done already); {state}",
        file=sys.stderr,
    )


def cmd_embed(args) -> None:
    from .long_inputs import OverlapTooLarge

    try:
        _embed(args)
    except OverlapTooLarge as e:  # raised under the Python parameters' names: told here with the flags
        raise InputError(e.named("--chunk-overlap", "--max-length")) from None


def _embed(args) -> None:
    if args.output is not None and is_output_dir(args.output):
        return cmd_embed_dir(args)
    if args.id_field is not None:
        raise InputError("--id-field needs --output DIR (the sharded mode)")
    sharded = (*CORPUS_FLAGS, "shard_format", "rows_per_shard")  # meaningless for one file: refused, not ignored
    used = ["--" + n.replace("_", "-") for n in sharded if getattr(args, n) not in (None, False)]
    if used or args.engine != "local":
        raise InputError(
            f"{', '.join(used) or '--engine ray'}: corpus-run flags, for --output DIR (the sharded mode) only; "
            f"{args.output or 'stdout'} is one file"
        )
    check_vector_flags(args)
    if args.output is not None and Path(args.output).suffix not in (".npy", ".jsonl"):
        raise InputError(f"output {args.output!r}: use a .npy or .jsonl suffix, or a folder (no suffix)")
    if args.output is not None and not Path(args.output).parent.is_dir():  # before the model loads
        raise InputError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    texts = _read_texts(args)
    if args.precision in ("int8", "uint8") and args.ranges is None and args.calibration is None and len(texts) < 2:
        raise InputError(
            f"--precision {args.precision} of one text needs --ranges (its buckets cannot come from one embedding)"
        )
    if args.ranges is not None:
        from .shards import load_ranges

        load_ranges(args.ranges)  # a bad file fails before a model loads
    enc = load_encoder(args)
    opts = vector_options(args, enc.dim)
    kw = dict(
        prompt_name=args.prompt_name,
        task=args.task,
        normalize=not args.no_normalize,
        batch_size=args.batch_size,
        long_inputs=opts["long_inputs"],
        chunk_overlap=opts["chunk_overlap"],
        truncate_dim=opts["truncate_dim"],
    )
    calibration = None
    if opts["calibration"] is not None:  # the float vectors of the first N texts set the buckets
        calibration = enc.encode(texts[: opts["calibration"]], **kw, show_progress_bar=False)
    emb = enc.encode(
        texts,
        **kw,
        precision=opts["precision"],
        ranges=opts["ranges"],
        calibration_embeddings=calibration,
        show_progress_bar=len(texts) >= PROGRESS_MIN_TEXTS,
    )
    _write_output(emb, args.output)
    if args.output:
        print(
            f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.output}"
            + ("" if args.precision == "float32" else f" ({args.precision})"),
            file=sys.stderr,
        )
