"""``e5lite export-programs``: the engine's programs for one model and platform written as ``jax.export``
artifacts, with the manifest ``programs.Programs`` checks before it runs them (``programs.py`` describes the
folder)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export

from .errors import E5LiteError
from .files import write_atomic
from .jitted import embed_batch, embed_packed, hidden_states, run_layout
from .programs import (
    FORMAT,
    MANIFEST,
    PLATFORMS,
    PROGRAM_SETTINGS,
    SHAPE_SETTINGS,
    Key,
    _param_shapes,
    _require_flatbuffers,
    program_keys,
    target_settings,
    weights_reference,
)
from .settings import EngineSettings

# Triton calls carry no compatibility guarantee, so jax.export refuses them unless told (the GPU's Pallas kernel).
_DISABLED_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _ints(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.int32)


def _export_one(key: Key, *, params, platform: str, config, pooling: str, attention_impl: str) -> export.Exported:
    """The program of one key, exported for ``platform``: the engine's own jitted function, as it calls it."""
    kw: dict[str, Any] = dict(config=config, attention_impl=attention_impl)
    rows, length, *packed = key.shape
    ids = _ints((rows, length))
    exporter = lambda f: export.export(f, platforms=[platform], disabled_checks=_DISABLED_CHECKS)  # noqa: E731
    if key.kind == "states":
        return exporter(hidden_states)(params, ids, ids, **kw)
    kw.update(pooling=pooling, normalize=key.normalize)
    if key.kind == "padded":
        return exporter(embed_batch)(params, ids, ids, **kw)
    num_segments, window = packed
    return exporter(embed_packed)(params, ids, ids, ids, num_segments=num_segments, attention_window=window, **kw)


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """``output``/programs, empty; an earlier export there is replaced only with ``overwrite``."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise E5LiteError(f"output folder {str(output)!r} is not empty (overwrite=True / --overwrite replaces it)")
        if not (output / MANIFEST).is_file():  # never delete a folder of something else
            raise E5LiteError(f"output folder {str(output)!r} holds no {MANIFEST}: not replacing what is there")
        (output / MANIFEST).unlink()  # first: a folder half replaced has no manifest, so it cannot load
        shutil.rmtree(output / "programs", ignore_errors=True)
    folder = output / "programs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_programs(
    model: str | os.PathLike[str],
    platform: str,
    output: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: str = "float32",
    weights: str | None = None,
    max_length: int | None = None,
    settings: EngineSettings | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    **knobs: Any,
) -> dict[str, Any]:
    """Writes the engine's programs for ``model`` on ``platform`` ("cpu", "cuda", "tpu") to ``output``: one
    ``jax.export`` artifact per key of ``program_keys`` in ``output/programs``, and ``output/manifest.json``
    (written last). ``settings``/``knobs`` as for ``load``, resolved as an engine on ``platform`` would. Returns
    the manifest. ``progress(i, n, name)`` is called before each program."""
    from . import __version__
    from .loading import load

    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    _require_flatbuffers()
    settings = (settings or EngineSettings()).replace(**knobs)
    enc = load(model, revision=revision, dtype=dtype, max_length=max_length, weights=weights)
    c = enc.config
    target = target_settings(settings, platform, enc.dtype, c.num_attention_heads, c.head_dim)
    host = run_layout(enc.params, enc.dtype, enc.weights, unroll=bool(target.unroll), num_layers=c.num_hidden_layers)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    keys = program_keys(enc.pooling, enc.max_length, target)
    folder = _prepare_output(Path(output), overwrite)
    start = time.perf_counter()
    kw = dict(params=params, platform=platform, config=c, pooling=enc.pooling, attention_impl=target.attention_impl)
    export_one = functools.partial(_export_one, **kw)
    entries = _write_programs(keys, export_one, folder, len(jax.tree.leaves(params)), progress)
    manifest = {
        "format": FORMAT,
        "platform": platform,
        "e5lite": __version__,
        "jax": jax.__version__,
        "weights_reference": weights_reference(str(model), enc.model_dir),
        "config": c.to_dict(),
        "pooling": enc.pooling,
        "max_length": enc.max_length,
        "dtype": enc.dtype.name,
        "weights": enc.weights,
        "devices": 1,
        "settings": {k: getattr(target, k) for k in (*SHAPE_SETTINGS, *PROGRAM_SETTINGS)},
        "params": _param_shapes(host),
        "export_s": round(time.perf_counter() - start, 2),
        "programs": entries,
    }
    write_atomic(Path(output) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    enc.close()
    return manifest


def _write_programs(keys: list[Key], export_one: Callable, folder: Path, num_params: int, progress) -> list[dict]:
    """Exports and writes each key's program to ``folder``; returns their manifest entries."""
    entries = []
    for i, key in enumerate(keys):
        if progress is not None:
            progress(i, len(keys), key.name)
        exp = export_one(key)
        blob = bytes(exp.serialize())
        write_atomic(folder / f"{key.name}.bin", blob)
        (out,) = exp.out_avals
        inputs = [[list(a.shape), a.dtype.name] for a in exp.in_avals[num_params:]]  # the batch's arrays
        entries.append(
            {"name": key.name, "kind": key.kind, "normalize": key.normalize, "shape": list(key.shape),
             "inputs": inputs, "output": [list(out.shape), out.dtype.name],
             "sha256": hashlib.sha256(blob).hexdigest()}
        )  # fmt: skip
    return entries
