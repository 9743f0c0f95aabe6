"""The checks of ``e5lite embed``'s flag combinations and values that argparse cannot express, made before a
model loads where they can be (errors name the flags), and the vector flags as the corpus writer's options.
``cli_args`` declares the flags; ``cli_embed`` calls these."""

from __future__ import annotations

from .errors import InputError
from .shards import load_ranges

# where a planned corpus run runs: its processes (jax.distributed) or its Ray actors
CLUSTER_FLAGS = (
    "coordinator",
    "num_processes",
    "process_id",
    "distributed",
    "num_actors",
    "ray_address",
    "gpus_per_actor",
    "cpus_per_actor",
)
CORPUS_FLAGS = (*CLUSTER_FLAGS, "shard_size")


def check_corpus_flags(args) -> None:
    """The per-host and Ray flags: valid values, and only in combinations that mean something."""
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    for name in ("num_processes", "num_actors"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("gpus_per_actor", "cpus_per_actor"):
        if getattr(args, name) is not None and not getattr(args, name) >= 0:
            raise InputError(f"{flag(name)} must be a number >= 0, got {getattr(args, name)}")
    if args.engine == "ray":
        used = [
            flag(n)
            for n in ("coordinator", "num_processes", "process_id", "distributed")
            if getattr(args, n) not in (None, False)
        ]
        if used:
            raise InputError(f"{', '.join(used)}: per-host flags; --engine ray runs on Ray's actors instead")
        if args.shard_format == "npy":
            raise InputError("--engine ray writes Parquet shards: drop --shard-format npy")
        return
    ray_only = [
        flag(n)
        for n in ("num_actors", "ray_address", "gpus_per_actor", "cpus_per_actor")
        if getattr(args, n) is not None
    ]
    if ray_only:
        raise InputError(f"{', '.join(ray_only)} need --engine ray")
    if args.coordinator is not None and (args.num_processes is None or args.process_id is None):
        raise InputError(
            "--coordinator HOST:PORT needs --num-processes N and --process-id I (or use --distributed "
            "for jax.distributed's own cluster detection)"
        )
    if (args.num_processes is not None or args.process_id is not None) and not (args.coordinator or args.distributed):
        raise InputError("--num-processes and --process-id need --coordinator HOST:PORT (or --distributed)")
    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise InputError(
            f"--process-id must be in [0, {args.num_processes - 1}] for --num-processes "
            f"{args.num_processes}, got {args.process_id}"
        )


def check_vector_flags(args) -> None:
    """--long-inputs, --chunk-overlap, --precision, --truncate-dim, --calibration, --ranges: the combinations
    that mean something, before a model loads (--truncate-dim against the model's width is checked after)."""
    if args.chunk_overlap is not None and args.long_inputs != "chunk":
        raise InputError(
            f"--chunk-overlap {args.chunk_overlap} needs --long-inputs chunk (truncated texts have no "
            "windows to overlap)"
        )
    if args.chunk_overlap is not None and args.chunk_overlap < 0:
        raise InputError(f"--chunk-overlap must be >= 0, got {args.chunk_overlap}")
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise InputError(f"--truncate-dim must be at least 1, got {args.truncate_dim}")
    for flag, value in (("--calibration", args.calibration), ("--ranges", args.ranges)):
        if value is not None and args.precision not in ("int8", "uint8"):
            raise InputError(
                f"{flag} sets the int8/uint8 buckets: it needs --precision int8 or uint8 (got "
                f"--precision {args.precision})"
            )
    if args.calibration is not None and args.ranges is not None:
        raise InputError("--calibration N and --ranges: pass one (ranges computed from the first N texts, or given)")
    if args.calibration is not None and args.calibration < 1:
        raise InputError(f"--calibration must be at least 1 text, got {args.calibration}")


def vector_options(args, dim: int) -> dict:
    """The vector flags as ``shards.output_options`` keywords; --truncate-dim checked against ``dim``, the
    model's width, and --ranges against the vectors' (errors name the flag)."""
    if args.truncate_dim is not None and args.truncate_dim > dim:
        raise InputError(f"--truncate-dim {args.truncate_dim} is larger than the model's embedding dimension {dim}")
    ranges = None if args.ranges is None else load_ranges(args.ranges)
    want = args.truncate_dim or dim
    if ranges is not None and ranges.shape[1] != want:
        raise InputError(
            f"--ranges {args.ranges} has {ranges.shape[1]} dimensions; the vectors have {want}"
            + (" (--truncate-dim)" if args.truncate_dim else "")
        )
    return {
        "long_inputs": args.long_inputs,
        "chunk_overlap": args.chunk_overlap or 0,
        "truncate_dim": args.truncate_dim,
        "precision": args.precision,
        "calibration": args.calibration,
        "ranges": ranges,
    }
