"""Resumable training checkpoints: parameters, optimiser state and step, written so a kill at any instant
leaves the last complete checkpoint readable.

The arrays go to ``state-<step>.npz`` (temporary file, fsync, rename); then ``checkpoint.json``, the commit
point, names it (same way); only then are older state files removed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import numpy as np

from .errors import E5LiteError
from .files import read_json, write_atomic

CHECKPOINT = "checkpoint.json"


def save_checkpoint(folder: Path, step: int, state, meta: dict) -> None:
    """Writes ``state`` (any pytree of arrays: params, optimiser state) as the checkpoint after ``step`` steps."""
    name = f"state-{step:08d}.npz"
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(x) for x in jax.tree.leaves(state)])
    write_atomic(folder / name, buf.getvalue())
    write_atomic(folder / CHECKPOINT, json.dumps({"step": step, "state": name, **meta}, indent=1).encode())
    for old in folder.glob("state-*.npz"):
        if old.name != name:
            old.unlink()


def load_checkpoint(folder: Path, like) -> tuple[int, object, dict] | None:
    """(step, state shaped like ``like``, meta) of the folder's checkpoint, or None when there is none."""
    meta = read_json(folder / CHECKPOINT, default=None)
    if meta is None:
        return None
    leaves_like, treedef = jax.tree.flatten(like)
    path = folder / meta["state"]
    try:
        with np.load(path) as z:
            leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError) as e:
        raise E5LiteError(f"cannot read checkpoint {path}: {e}") from None
    if len(leaves) != len(leaves_like) or any(a.shape != np.shape(b) for a, b in zip(leaves, leaves_like, strict=True)):
        raise E5LiteError(f"checkpoint {path} does not fit this model and optimiser (other settings?)")
    return meta["step"], jax.tree.unflatten(treedef, leaves), meta
