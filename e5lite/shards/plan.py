"""A planned run (format 2) in DIR, shared by the per-host and Ray runs (``hosts.py``, ``ray_run.py``): its
manifest (``plan_run``: the run's settings, the inputs' identity and the shard plan), opening the run
(``open_run``: a differing manifest refused, the manifest written, what earlier runs left of a process's
shards removed) and the shards still missing (``missing_shards``). The layout itself: ``hosts.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..corpus_inputs import SHARD_BYTES, describe_inputs, parse_size, plan_shards, resolve_inputs
from ..errors import E5LiteError
from ..files import read_json, write_atomic
from .store import (
    _SHARD_NAME,
    FORMAT,
    FORMAT_SHARDED,
    MANIFEST,
    _changed_settings,
    _check_shard_format,
    _listing,
    _record,
    output_options,
    shard_stem,
)


def plan_run(
    input,
    out_dir,
    *,
    dim: int,
    pooling: str,
    prompt: str,
    settings: dict | None = None,
    field: str = "text",
    id_field: str | None = None,
    prompt_name: str | None = None,
    normalize: bool = True,
    shard_size: int | str = SHARD_BYTES,
    shard_format: str = "npy",
    json_records: bool = False,
    output: dict | None = None,
) -> dict:
    """The manifest of a per-host or Ray run: settings, the inputs' identity and the shard plan. ``dim``: the
    model's; ``output``: ``output_options(dim, ...)`` (default: float32 vectors of truncated inputs)."""
    _check_shard_format(shard_format)
    shard_bytes = parse_size(shard_size)
    paths = resolve_inputs(input, exclude=out_dir)
    inputs = describe_inputs(paths, json_records=json_records, field=field, id_field=id_field)
    plan = plan_shards(inputs, shard_bytes)
    run = {
        "inputs": inputs,
        "field": field,
        "id_field": id_field,
        "prompt_name": prompt_name,
        "prompt": prompt,
        "normalize": normalize,
        "pooling": pooling,
        "shard_size": shard_bytes,
        "shard_format": shard_format,
        **(settings or {}),
        **(output or output_options(dim)),
    }
    return {"format": FORMAT_SHARDED, "run": run, "width": max(5, len(str(max(len(plan) - 1, 0)))), "plan": plan}


def _changes(old: dict, new: dict) -> list[str]:
    a, b = old["run"], new["run"]
    changed = []
    if [f["path"] for f in a.get("inputs", [])] != [f["path"] for f in b["inputs"]]:
        changed.append("list of input files")
    else:
        for fa, fb in zip(a["inputs"], b["inputs"], strict=True):
            name = Path(fb["path"]).name
            changed += [
                f"input {name} {'modification time' if k == 'mtime_ns' else k.replace('_', ' ')}"
                for k in fb
                if fa.get(k) != fb[k]
            ]
    return changed + _changed_settings(a, b)


def open_run(
    out_dir, manifest: dict, *, overwrite: bool = False, primary: bool = True, owned=lambda k: True
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
        _check_resumable(old, manifest, out_dir)
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
        numbers = [m.group(1) for m in map(_SHARD_NAME.match, group) if m]  # every listed name matches
        stale = k >= n or any(len(number) != width for number in numbers)
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


def _check_resumable(old, manifest: dict, out_dir: Path) -> None:
    """Refuses the manifest ``old`` in out_dir unless it is one of a planned run with the same inputs and
    settings as ``manifest``."""
    if not isinstance(old, dict) or old.get("format") not in (FORMAT, FORMAT_SHARDED):
        raise E5LiteError(f"{out_dir / MANIFEST} is not an e5lite embeddings manifest; use another --output")
    if old["format"] == FORMAT:
        raise E5LiteError(
            f"{out_dir} holds a single-process run of one file ({FORMAT}: row shards); finish it "
            "without --coordinator, --distributed, --engine ray or --shard-size, or choose "
            "another --output"
        )
    changed = _changes(old, manifest)
    if changed:
        raise E5LiteError(
            f"{out_dir} holds a run with a different {', '.join(changed)}; pass --overwrite to "
            "start again or choose another --output"
        )


def missing_shards(out_dir, manifest: dict, *, read_records: bool = True) -> list[int]:
    """The shards of ``manifest`` without a complete record in out_dir; ``read_records=False`` looks at the
    names alone (a summary line at the end of a process; ``read_embeddings`` reads every record)."""
    out_dir = Path(out_dir)
    listing = _listing(out_dir)
    names = {name for group in listing.values() for name in group}
    if not read_records:
        return [k for k in range(len(manifest["plan"])) if f"{shard_stem(k, manifest['width'])}.json" not in names]
    return [k for k in range(len(manifest["plan"])) if _record(out_dir, k, manifest["width"], names) is None]
