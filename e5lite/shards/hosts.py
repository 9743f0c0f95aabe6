"""Per-host and Ray runs (format 2): planning the shards, opening a run, embedding and committing shards.

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

from ..corpus_inputs import (CHUNK_ROWS, SHARD_BYTES, describe_inputs, describe_shard, parse_size, plan_shards,
                             read_shard, resolve_inputs, shard_bytes_of)
from ..errors import E5LiteError
from ..files import read_json, write_atomic
from .coordination import _wait_for_all_processes, fix_ranges, wait_after_failure
from .shard_files import ShardOutput, _file_metadata
from .store import (FORMAT, FORMAT_SHARDED, MANIFEST, _SHARD_NAME, _changed_settings, _check_shard_format,
                    _listing, _record, output_options, shard_stem, stored_layout)
from .vector_steps import prepare, stored, vectors


def plan_run(input, out_dir, *, dim: int, pooling: str, prompt: str, settings: dict | None = None,
             field: str = "text", id_field: str | None = None, prompt_name: str | None = None, normalize: bool = True,
             shard_size: int | str = SHARD_BYTES, shard_format: str = "npy", json_records: bool = False,
             output: dict | None = None) -> dict:
    """The manifest of a per-host or Ray run: settings, the inputs' identity and the shard plan. ``dim``: the
    model's; ``output``: ``output_options(dim, ...)`` (default: float32 vectors of truncated inputs)."""
    _check_shard_format(shard_format)
    shard_bytes = parse_size(shard_size)
    paths = resolve_inputs(input, exclude=out_dir)
    inputs = describe_inputs(paths, json_records=json_records, field=field, id_field=id_field)
    plan = plan_shards(inputs, shard_bytes)
    run = {"inputs": inputs, "field": field, "id_field": id_field, "prompt_name": prompt_name, "prompt": prompt,
           "normalize": normalize, "pooling": pooling, "shard_size": shard_bytes,
           "shard_format": shard_format, **(settings or {}), **(output or output_options(dim))}
    return {"format": FORMAT_SHARDED, "run": run, "width": max(5, len(str(max(len(plan) - 1, 0)))), "plan": plan}


def _changes(old: dict, new: dict) -> list[str]:
    a, b = old["run"], new["run"]
    changed = []
    if [f["path"] for f in a.get("inputs", [])] != [f["path"] for f in b["inputs"]]:
        changed.append("list of input files")
    else:
        for fa, fb in zip(a["inputs"], b["inputs"]):
            name = Path(fb["path"]).name
            changed += [f"input {name} {'modification time' if k == 'mtime_ns' else k.replace('_', ' ')}"
                        for k in fb if fa.get(k) != fb[k]]
    return changed + _changed_settings(a, b)


def open_run(out_dir, manifest: dict, *, overwrite: bool = False, primary: bool = True, owned=lambda k: True
             ) -> set[int]:
    """Prepares out_dir for a run of ``manifest``; returns the shards already done.

    A manifest there that differs (settings, inputs) is refused unless ``overwrite``. The ``primary`` process
    (process 0, or the Ray driver) writes the manifest; each process removes what previous runs left of the
    shards it ``owned`` and has still to do (temporaries, files without a record) and, with ``overwrite``,
    their old files too. Files of other shards are never touched: another process may be writing them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    try:
        old = read_json(path, default=None)
    except E5LiteError as e:
        if not overwrite:
            raise E5LiteError(f"{e}: not a valid manifest; use --overwrite to start again") from None
        old = None
    if old is not None and not overwrite:
        if not isinstance(old, dict) or old.get("format") not in (FORMAT, FORMAT_SHARDED):
            raise E5LiteError(f"{path} is not an e5lite embeddings manifest; use another --output")
        if old["format"] == FORMAT:
            raise E5LiteError(f"{out_dir} holds a single-process run of one file ({FORMAT}: row shards); finish it "
                              "without --coordinator, --distributed, --engine ray or --shard-size, or choose "
                              "another --output")
        changed = _changes(old, manifest)
        if changed:
            raise E5LiteError(f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
                              "start again or choose another --output")
        run = manifest["run"]
        if run.get("calibration") is not None and run.get("ranges") is None:
            run["ranges"] = old["run"].get("ranges")  # fixed by the run that started it (None: not yet)
    if primary and (overwrite or old != manifest):
        write_atomic(path, json.dumps(manifest).encode())
    width, n = manifest["width"], len(manifest["plan"])
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    done = set()
    for k, group in listing.items():
        stale = k >= n or any(len(_SHARD_NAME.match(name).group(1)) != width for name in group)
        if stale:  # another plan's names: no process of this run writes them
            if primary and overwrite:
                for name in group:
                    (out_dir / name).unlink(missing_ok=True)
            continue
        stem = shard_stem(k, width)
        rec = None if overwrite else _record(out_dir, k, width, names)
        if rec is not None:
            done.add(k)
        if owned(k):
            keep = set() if rec is None else {f"{stem}.json", *rec["files"]}
            # the record first: from then on the shard reads as missing, whatever else is left
            for name in sorted(group, key=lambda s: s != f"{stem}.json"):
                if name not in keep:
                    (out_dir / name).unlink(missing_ok=True)
    return done


def missing_shards(out_dir, manifest: dict, *, read_records: bool = True) -> list[int]:
    """The shards of ``manifest`` without a complete record in out_dir; ``read_records=False`` looks at the
    names alone (a summary line at the end of a process; ``read_embeddings`` reads every record)."""
    out_dir = Path(out_dir)
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    if not read_records:
        return [k for k in range(len(manifest["plan"])) if f"{shard_stem(k, manifest['width'])}.json" not in names]
    return [k for k in range(len(manifest["plan"])) if _record(out_dir, k, manifest["width"], names) is None]


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
                group.append((k, where, take, None if ids is None else ids[:len(take)], nbytes if final_part else 0,
                              final_part and following is None))
                rows += len(take)
                texts, ids = texts[len(take):], None if ids is None else ids[len(take):]
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


def embed_shards(enc, out_dir, run: dict, width: int, shards, *, writer: str, batch_size: int | None = None,
                 progress=None, chunk_rows: int | None = None, on_error=None):
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
    with_ids = run["id_field"] is not None
    dtype, stored_width = stored_layout(run)
    open_: dict[int, tuple[ShardOutput, dict]] = {}
    try:
        for group, (prepared, lengths) in _tokenized(enc, _groups(shards, chunk_rows), run):
            for k, where, *_ in group:
                if k not in open_:
                    out = ShardOutput(out_dir, shard_stem(k, width), run["shard_format"], stored_width, with_ids,
                                      _file_metadata(run, k, where), dtype)
                    open_[k] = out, {"shard": k, "rows": 0, "tokens": 0, "started": time.time(), "input": where}
            emb = stored(vectors(enc, prepared, run, batch_size=batch_size), run) if len(lengths) else None
            at, nbytes = 0, 0
            for k, where, texts, ids, piece_bytes, last in group:
                out, rec = open_[k]
                if texts:
                    out.append(emb[at:at + len(texts)], ids)
                    rec["rows"] += len(texts)
                    rec["tokens"] += int(lengths[at:at + len(texts)].sum())
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


def embed_per_host(enc, input, out_dir, *, settings: dict | None = None, field: str = "text",
                   id_field: str | None = None, prompt_name: str | None = None, task: str | None = None,
                   normalize: bool = True, shard_size: int | str = SHARD_BYTES, shard_format: str = "npy",
                   json_records: bool = False, batch_size: int | None = None, overwrite: bool = False,
                   process_index: int | None = None, process_count: int | None = None,
                   show_progress: bool = True, long_inputs: str = "truncate", chunk_overlap: int = 0,
                   truncate_dim: int | None = None, precision: str = "float32", calibration: int | None = None,
                   ranges=None) -> dict:
    """This process's share of a corpus run into ``out_dir`` (see the notes above): the shards k with
    k % process_count == process_index (default: ``jax.process_index()`` of ``jax.process_count()``), on this
    process's own devices, skipping shards already done. Returns a summary of what this process did.

    ``input``: a .txt, .jsonl or .parquet file, a folder or a glob of them. ``json_records``: read .txt files as
    JSONL records too (the CLI's --field). Every process must pass the same arguments. Under jax.distributed
    the processes wait for each other at the end (``_wait_for_all_processes``), not before; an int8/uint8 run
    whose ranges are not fixed yet also waits at the start for process 0 to compute them (``fix_ranges``).
    The vector options (``long_inputs`` ... ``ranges``): see ``output_options``."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    out_dir = Path(out_dir)

    def mine(k: int) -> bool:
        return k % process_count == process_index

    totals = {"rows": 0, "tokens": 0}
    t0 = time.perf_counter()
    try:  # whatever fails here, on one host or all, every process still reaches the barrier below
        prompt = enc.prompt_prefix(prompt_name, None, task)  # bad names fail before anything is written
        output = output_options(enc.dim, long_inputs=long_inputs, chunk_overlap=chunk_overlap,
                                truncate_dim=truncate_dim, precision=precision, calibration=calibration, ranges=ranges)
        manifest = plan_run(input, out_dir, dim=enc.dim, pooling=enc.pooling, prompt=prompt, settings=settings,
                            field=field, id_field=id_field, prompt_name=prompt_name, normalize=normalize,
                            shard_size=shard_size, shard_format=shard_format, json_records=json_records, output=output)
        if output["long_inputs"] == "chunk":
            prepare(enc, [""], manifest["run"])  # an overlap too large for the window fails before any write
        done = open_run(out_dir, manifest, overwrite=overwrite, primary=process_index == 0, owned=mine)
        fix_ranges(enc, out_dir, manifest, process_index, process_count, batch_size=batch_size)
        plan = manifest["plan"]
        todo = [k for k in range(len(plan)) if mine(k) and k not in done]
        desc = f"embed {process_index}/{process_count}" if process_count > 1 else "embed"
        _embed_todo(enc, out_dir, manifest, todo, f"process {process_index} of {process_count}", totals, t0,
                    batch_size, show_progress, desc)
    except Exception as e:
        if process_count > 1:
            wait_after_failure(process_index, process_count, e)
        raise
    if process_count > 1:
        _wait_for_all_processes(process_count)
    missing = missing_shards(out_dir, manifest, read_records=False)
    return {"process": process_index, "processes": process_count, "shards": len(plan), "embedded": len(todo),
            "skipped": sum(map(mine, range(len(plan)))) - len(todo), "rows": totals["rows"],
            "tokens": totals["tokens"], "seconds": time.perf_counter() - t0, "missing": missing}


def _embed_todo(enc, out_dir, manifest, todo, writer, totals, t0, batch_size, show_progress, desc) -> None:
    from tqdm.auto import tqdm
    plan, run, inputs = manifest["plan"], manifest["run"], manifest["run"]["inputs"]
    with tqdm(total=sum(shard_bytes_of(plan[k]) for k in todo), unit="B", unit_scale=True, disable=not show_progress,
              desc=desc, file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(rows, tokens, nbytes):
            totals["rows"] += rows
            totals["tokens"] += tokens
            bar.update(nbytes)
            bar.set_postfix_str(f"{totals['rows']:,} rows, "
                                f"{totals['tokens'] / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")

        shards = ((k, describe_shard(inputs, plan[k]), read_shard(inputs, plan[k], field=run["field"],
                                                                  id_field=run["id_field"])) for k in todo)
        for _ in embed_shards(enc, out_dir, run, manifest["width"], shards, writer=writer, batch_size=batch_size,
                              progress=progress):
            pass
        bar.update(bar.total - bar.n)  # the bytes no row started in (before a shard's first line)
