"""Per-host and Ray runs (format 2): embedding and committing shards (planning and opening a run: ``plan.py``).

``e5lite embed --output DIR`` with --coordinator/--distributed (one process per host under jax.distributed),
--engine ray, a folder, glob or Parquet input, or --shard-size. The input is cut into shards by
``corpus_inputs.plan_shards`` (byte ranges of .txt/.jsonl, Parquet row groups): a function of the files'
sizes and footers, so every process computes the same plan without reading the data. Process i of N embeds
the shards k with k % N == i: a fixed function of the shard index and the process count, so the split is
complete whatever N is, and a rerun with another N still finds each shard's files under the shard's name.

DIR/manifest.json (written by process 0, or the Ray driver): the run's settings, the inputs' identity (path,
size, modification time, Parquet row groups) and the shard plan. Each shard k is committed by its own
files: the embeddings (shard-K.npy [+ shard-K.ids.json] or shard-K.parquet), each streamed to a temporary,
fsynced and renamed (``shard_files.py``), then DIR/shard-K.json, the commit record (rows, tokens, files, input
range, writer), written atomically last. A shard is done when its record exists and names files that exist;
so a process only ever writes (and on a rerun cleans) the files of its own shards, never a file another
process writes, and no process waits for another: there is no collective on the data path
(``coordination.py`` has where the processes do meet). ``read_embeddings`` takes the union in plan order
(= input order) and names the shards still missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..corpus_inputs import CHUNK_ROWS, SHARD_BYTES, describe_shard, read_shard, shard_bytes_of
from ..files import write_atomic
from .coordination import _wait_for_all_processes, fix_ranges, wait_after_failure
from .plan import missing_shards, open_run, plan_run
from .shard_files import ShardOutput, _file_metadata
from .store import OUTPUT_DEFAULTS, output_options, shard_stem, stored_layout
from .vector_steps import prepare, stored, vectors

# embed_per_host's arguments that go to plan_run as they are
_PLAN_ARGS = ("settings", "field", "id_field", "prompt_name", "normalize", "shard_size", "shard_format", "json_records")


def _groups(shards, chunk_rows: int):
    """Pieces of consecutive shards grouped into engine calls of up to ``chunk_rows`` rows: small shards (a
    small --shard-size, Parquet files of small row groups) share a call instead of each paying for its own
    (the layout chosen per call, the last, part-empty batch of each length). Yields lists of pieces
    (k, where, texts, ids, input bytes, last piece of shard k); an empty shard gives one empty last piece."""
    group, rows = [], 0
    for k, where, chunks in shards:
        it = iter(chunks)
        piece = next(it, None)
        while True:
            following = next(it, None) if piece is not None else None
            texts, ids, nbytes = piece if piece is not None else ([], None, 0)
            while True:  # a piece larger than the room left is cut, so that calls stay at chunk_rows
                room = chunk_rows - rows
                final_part = len(texts) <= room
                take = texts if final_part else texts[:room]
                group.append(
                    (
                        k,
                        where,
                        take,
                        None if ids is None else ids[: len(take)],
                        nbytes if final_part else 0,
                        final_part and following is None,
                    )
                )
                rows += len(take)
                texts, ids = texts[len(take) :], None if ids is None else ids[len(take) :]
                if rows >= chunk_rows:
                    yield group
                    group, rows = [], 0
                if not texts:
                    break
            if following is None:
                break
            piece = following
    if group:
        yield group


def _tokenized(enc, groups, run: dict):
    """(pieces, (what ``vectors`` embeds, tokens per text)) per group (``prepare``: token ids, or windows in
    chunk mode); the next group is read and tokenised on a thread while the caller embeds this one (the
    tokenizer releases the GIL), so the devices do not wait for the input."""
    import concurrent.futures

    it = iter(groups)

    def produce():
        group = next(it, None)
        if group is None:
            return None
        texts = [t for piece in group for t in piece[2]]
        return group, prepare(enc, texts, run) if texts else ([], np.zeros(0, np.int64))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(produce)
        while (item := future.result()) is not None:
            future = pool.submit(produce)
            yield item


def embed_shards(
    enc,
    out_dir,
    run: dict,
    width: int,
    shards,
    *,
    writer: str,
    batch_size: int | None = None,
    progress=None,
    chunk_rows: int | None = None,
    on_error=None,
):
    """Embeds shards into their files and commits each with its record DIR/shard-K.json as soon as its last row
    is written; yields the records. ``shards``: (k, where, chunks) with chunks (texts, ids or None, input
    bytes) tuples; consecutive shards share engine calls of up to ``chunk_rows`` rows (default: the engine's
    ``chunk_texts``, 8,192). ``run``: the manifest's run settings. ``progress(rows, tokens, input bytes)`` is
    called after each call. On an error, the shards not yet committed are left missing (temporaries removed);
    with ``on_error(k, exception)``, a shard whose files cannot be committed (a full disk, its name taken) is
    reported there and the others go on."""
    if chunk_rows is None:
        chunk_rows = getattr(getattr(enc, "settings", None), "chunk_texts", CHUNK_ROWS)
    out_dir = Path(out_dir)
    open_: dict[int, tuple[ShardOutput, dict]] = {}
    try:
        for group, (prepared, lengths) in _tokenized(enc, _groups(shards, chunk_rows), run):
            for k, where, *_ in group:
                if k not in open_:
                    out = _shard_output(out_dir, run, k, width, where)
                    open_[k] = out, {"shard": k, "rows": 0, "tokens": 0, "started": time.time(), "input": where}
            emb = stored(vectors(enc, prepared, run, batch_size=batch_size), run) if len(lengths) else None
            at, nbytes = 0, 0
            for k, _where, texts, ids, piece_bytes, last in group:
                out, rec = open_[k]
                if texts:
                    assert emb is not None  # the group has texts: they were embedded
                    out.append(emb[at : at + len(texts)], ids)
                    rec["rows"] += len(texts)
                    rec["tokens"] += int(lengths[at : at + len(texts)].sum())
                at, nbytes = at + len(texts), nbytes + piece_bytes
                if last:
                    del open_[k]
                    try:
                        rec.update(files=out.commit(), writer=writer, finished=time.time())
                        write_atomic(out_dir / f"{shard_stem(k, width)}.json", json.dumps(rec).encode())
                    except Exception as e:
                        out.abort()
                        if on_error is None:
                            raise
                        on_error(k, e)
                        continue
                    yield rec
            if progress is not None:
                progress(len(lengths), int(lengths.sum()), nbytes)
    finally:
        for out, _ in open_.values():
            out.abort()


def _shard_output(out_dir: Path, run: dict, k: int, width: int, where: str) -> ShardOutput:
    """Shard k's files, open for its rows."""
    dtype, stored_width = stored_layout(run)
    with_ids = run["id_field"] is not None
    meta = _file_metadata(run, k, where)
    return ShardOutput(out_dir, shard_stem(k, width), run["shard_format"], stored_width, with_ids, meta, dtype)


def embed_per_host(
    enc,
    input,
    out_dir,
    *,
    settings: dict | None = None,
    field: str = "text",
    id_field: str | None = None,
    prompt_name: str | None = None,
    task: str | None = None,
    normalize: bool = True,
    shard_size: int | str = SHARD_BYTES,
    shard_format: str = "npy",
    json_records: bool = False,
    batch_size: int | None = None,
    overwrite: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    show_progress: bool = True,
    long_inputs: str = "truncate",
    chunk_overlap: int = 0,
    truncate_dim: int | None = None,
    precision: str = "float32",
    calibration: int | None = None,
    ranges=None,
) -> dict:
    """This process's share of a corpus run into ``out_dir`` (see the notes above): the shards k with
    k % process_count == process_index (default: ``jax.process_index()`` of ``jax.process_count()``), on this
    process's own devices, skipping shards already done. Returns a summary of what this process did.

    ``input``: a .txt, .jsonl or .parquet file, a folder or a glob of them. ``json_records``: read .txt files as
    JSONL records too (the CLI's --field). Every process must pass the same arguments. Under jax.distributed
    the processes wait for each other at the end (``_wait_for_all_processes``), not before; an int8/uint8 run
    whose ranges are not fixed yet also waits at the start for process 0 to compute them (``fix_ranges``).
    The vector options (``long_inputs`` ... ``ranges``): see ``output_options``."""
    args = locals().copy()  # the arguments by name: _plan_share and _embed_share take theirs from it
    process_index, process_count = _check_share(process_index, process_count)
    totals = {"rows": 0, "tokens": 0}
    t0 = time.perf_counter()
    try:  # whatever fails here, on one host or all, every process still reaches the barrier below
        manifest, todo = _embed_share(enc, input, Path(out_dir), args, (process_index, process_count), totals, t0)
    except Exception as e:
        if process_count > 1:
            wait_after_failure(process_index, process_count, e)
        raise
    if process_count > 1:
        _wait_for_all_processes(process_count)
    missing = missing_shards(out_dir, manifest, read_records=False)
    plan = manifest["plan"]
    return {
        "process": process_index,
        "processes": process_count,
        "shards": len(plan),
        "embedded": len(todo),
        "skipped": sum(k % process_count == process_index for k in range(len(plan))) - len(todo),
        "rows": totals["rows"],
        "tokens": totals["tokens"],
        "seconds": time.perf_counter() - t0,
        "missing": missing,
    }


def _check_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """This process's index and the number of processes (default: jax's), checked."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    return process_index, process_count


def _embed_share(
    enc, input, out_dir: Path, args: dict, share: tuple[int, int], totals: dict, t0: float
) -> tuple[dict, list[int]]:
    """Plans and opens the run, fixes int8/uint8 ranges, and embeds this process's shards still to do (``args``:
    embed_per_host's); -> (the manifest, the shards it embedded)."""
    process_index, process_count = share

    def mine(k: int) -> bool:
        return k % process_count == process_index

    manifest = _plan_share(enc, input, out_dir, args)
    done = open_run(out_dir, manifest, overwrite=args["overwrite"], primary=process_index == 0, owned=mine)
    batch_size = args["batch_size"]
    fix_ranges(enc, out_dir, manifest, process_index, process_count, batch_size=batch_size)
    todo = [k for k in range(len(manifest["plan"])) if mine(k) and k not in done]
    desc = f"embed {process_index}/{process_count}" if process_count > 1 else "embed"
    writer = f"process {process_index} of {process_count}"
    _embed_todo(enc, out_dir, manifest, todo, writer, totals, t0, batch_size, args["show_progress"], desc)
    return manifest, todo


def _plan_share(enc, input, out_dir: Path, args: dict) -> dict:
    """The run's manifest (``plan_run``) from embed_per_host's ``args``: a bad prompt name or vector option
    fails before anything is written."""
    prompt = enc.prompt_prefix(args["prompt_name"], None, args["task"])
    output = output_options(enc.dim, **{k: args[k] for k in OUTPUT_DEFAULTS})
    plan_args = {k: args[k] for k in _PLAN_ARGS}
    manifest = plan_run(input, out_dir, dim=enc.dim, pooling=enc.pooling, prompt=prompt, output=output, **plan_args)
    if output["long_inputs"] == "chunk":
        prepare(enc, [""], manifest["run"])  # an overlap too large for the window fails before any write
    return manifest


def _embed_todo(enc, out_dir, manifest, todo, writer, totals, t0, batch_size, show_progress, desc) -> None:
    from tqdm.auto import tqdm

    plan, run, inputs = manifest["plan"], manifest["run"], manifest["run"]["inputs"]
    with tqdm(
        total=sum(shard_bytes_of(plan[k]) for k in todo),
        unit="B",
        unit_scale=True,
        disable=not show_progress,
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:

        def progress(rows, tokens, nbytes):
            totals["rows"] += rows
            totals["tokens"] += tokens
            bar.update(nbytes)
            bar.set_postfix_str(
                f"{totals['rows']:,} rows, {totals['tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s"
            )

        shards = (
            (
                k,
                describe_shard(inputs, plan[k]),
                read_shard(inputs, plan[k], field=run["field"], id_field=run["id_field"]),
            )
            for k in todo
        )
        for _ in embed_shards(
            enc, out_dir, run, manifest["width"], shards, writer=writer, batch_size=batch_size, progress=progress
        ):
            pass
        bar.update(bar.total - bar.n)  # the bytes no row started in (before a shard's first line)
