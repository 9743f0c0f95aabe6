"""Programs that can be shipped: the engine's bounded set of programs for one model and platform, exported with
``jax.export`` (``e5lite export-programs``), and run in place of the jitted functions (``load(programs=DIR)``).

``program_export.py`` writes a folder: ``manifest.json`` (the model's config, dtype, weights option, settings,
platform, e5lite and jax versions, a reference to the weights, each program's input shapes and hash) and
``programs/<name>.bin``, one serialized ``Exported`` per batch shape the planner can emit (``program_keys``):
padded batches and packed rows, normalised and not, and the padded batches of ``token_states``. The weights are
not in the programs (they are the programs' first argument): the engine loads them from the model folder.

A process that runs the programs deserializes each on first use and compiles it; it never traces the model.
Whatever the programs cannot run (another platform, jax version, model shape, settings whose planner emits
shapes outside the set, several devices) is refused with the values on both sides, never retraced.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from . import batching
from .attention import AUTO_ATTENTION, resolve_attention_impl
from .errors import E5LiteError
from .pooling import PACKED_MODES
from .settings import EngineSettings

if TYPE_CHECKING:
    from .batching import Batch
    from .engine import Engine

logger = logging.getLogger("e5lite")

FORMAT = 1  # of the folder; another one is refused
PLATFORMS = ("cpu", "cuda", "tpu")
MANIFEST = "manifest.json"
# The settings behind the programs themselves (the others, streams, in_flight, chunk sizes, only schedule them);
# the set of shapes is checked on its own (``Programs.check``), so packing=False runs on programs of "auto".
PROGRAM_SETTINGS = ("attention_impl", "unroll")
SHAPE_SETTINGS = ("token_budget", "packing", "pack_length", "max_segments", "min_window", "small_inputs")


@dataclass(frozen=True, order=True)
class Key:
    """One program: ``kind`` "padded" (``embed_batch``), "packed" (``embed_packed``) or "states"
    (``hidden_states``), ``normalize`` (None for states) and the batch's ``Batch.shape``."""

    kind: str
    normalize: bool | None
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        norm = "" if self.normalize is None else ("-norm" if self.normalize else "-raw")
        rows, length, *packed = self.shape
        extra = f"-g{packed[0]}-w{packed[1]}" if packed else ""
        return f"{self.kind}{norm}-{rows}x{length}{extra}"


def backend_platform(platform: str) -> str:
    """The export platform of a jax device platform: "gpu" -> "cuda" (ROCm is not among ``PLATFORMS``)."""
    return "cuda" if platform == "gpu" else platform


def _ladder(full: int, multiple: int) -> set[int]:
    """Every row count ``batching._split`` gives a length of ``full`` rows: full batches and the last one's."""
    return {full} | {batching.partial_rows(n, full, multiple) for n in range(1, full)}


def program_keys(pooling: str, max_length: int, settings: EngineSettings, multiple: int = 1) -> list[Key]:
    """Every program the engine can call with these resolved ``settings``, ``batch_size`` None: the padded
    batches of every length bucket (the small path's and ``warmup``'s row ladders included), the packed rows
    of every layout "auto" weighs (each attention window), and ``token_states``' padded batches."""
    s = settings
    assert s.token_budget is not None and s.min_window is not None and s.small_inputs is not None  # resolved
    budget = s.token_budget
    lengths = sorted({batching.seq_bucket(n, max_length) for n in range(1, max_length + 1)})
    padded = set()  # (rows, length, only warmup's?)
    warm_first = batching.partial_rows(1, s.small_inputs or 1, multiple)  # Engine.warmup's ladder
    warm = {warm_first} | {min(warm_first * 4**k, max(warm_first, s.small_inputs)) for k in range(1, 32)}
    for length in lengths:
        rows = _ladder(batching.full_rows(length, budget, None, multiple), multiple)
        padded |= {(r, length, False) for r in rows} | {(r, length, True) for r in warm}
    packed = set()
    layouts = batching.layouts(
        s.packing, packable=pooling in PACKED_MODES, max_length=max_length, pack_length=s.pack_length,
        min_window=s.min_window,
    )  # fmt: skip
    for n, min_window in layouts:
        if n == 0:
            continue
        # the windows batching.pack_windows keeps; a batch's window is the largest of its rows'
        windows = [w for w in batching.windows_for(n, min_window) if w < n and s.max_segments * w >= n] + [n]
        rows = _ladder(batching.full_rows(n, budget, None, multiple), multiple)
        packed |= {(r, n, s.max_segments, w) for r in rows for w in windows}
    keys = [Key(kind, norm, shape[:2]) for shape in padded for kind, norm in (("padded", True), ("padded", False))]
    keys += [Key("states", None, (r, length)) for r, length, warmup in padded if not warmup]
    keys += [Key("packed", norm, shape) for shape in packed for norm in (True, False)]
    return sorted(set(keys))


def target_settings(settings: EngineSettings, platform: str, dtype, heads: int, head_dim: int) -> EngineSettings:
    """``settings`` resolved as an engine on ``platform`` resolves them (``Engine._resolve``), without one."""
    device = "gpu" if platform == "cuda" else platform
    s = settings.for_platform(device)
    if platform == backend_platform(jax.default_backend()):
        impl = resolve_attention_impl(s.attention_impl, device, dtype, heads, head_dim)
    elif s.attention_impl == "auto":  # resolve_attention_impl probes by compiling: here, the first candidate
        float32 = jnp.dtype(dtype) == jnp.float32
        impl = next(i for i in AUTO_ATTENTION.get(device, ("xla",)) if not (i == "cudnn" and float32))
    else:
        impl = s.attention_impl
    return s.replace(attention_impl=impl)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_reference(model: str, model_dir: Path) -> dict[str, Any]:
    """Where the weights are, and a fingerprint to tell other weights by: config.json's hash, the weight files'
    sizes."""
    weight_files = sorted(
        p.name for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    )
    return {
        "model": model,
        "model_dir": str(model_dir),
        "config_sha256": _sha256(model_dir / "config.json"),
        "files": {name: (model_dir / name).stat().st_size for name in weight_files},
    }


def _require_flatbuffers() -> None:
    """jax.export serializes with flatbuffers, which jax does not require: a clear error up front instead."""
    if importlib.util.find_spec("flatbuffers") is None:
        raise E5LiteError("shipped programs need flatbuffers (jax.export's format): pip install 'e5lite[programs]'")


def _param_shapes(params) -> dict[str, list]:
    """Each weight's pytree path -> [shape, dtype]: the layout the programs take."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): [list(np.shape(x)), np.dtype(x.dtype).name] for path, x in flat}


def _differences(want: dict, have: dict) -> str:
    """'name: W (programs) against H (here)' for each key whose values differ, joined by ", "; "" if none."""
    keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    return ", ".join(f"{k}: {want.get(k)!r} (programs) against {have.get(k)!r} (here)" for k in keys)


class Programs:
    """A folder of shipped programs, read and checked against this process (``read``); ``attach`` checks them
    against an engine and makes it run them. Each program is deserialized, checked against its hash and
    wrapped in ``jax.jit`` (around ``Exported.call``: the model is not traced) on its first call."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder, self.manifest = folder, manifest
        self._entries = {
            Key(e["kind"], e["normalize"], tuple(e["shape"])): e for e in manifest["programs"]
        }  # fmt: skip
        self._functions: dict[Key, Callable] = {}
        self._lock = threading.Lock()

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> Programs:
        """The programs in ``folder``, refused unless exported for this platform, jax version and folder format."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise E5LiteError(f"no {MANIFEST} in {str(folder)!r}: not a folder of e5lite export-programs") from None
        except json.JSONDecodeError as e:
            raise E5LiteError(f"{folder / MANIFEST}: not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise E5LiteError(f"{folder / MANIFEST}: format {manifest.get('format')!r}, this e5lite reads {FORMAT}")
        here = backend_platform(jax.default_backend())
        theirs = (manifest.get("platform"), manifest.get("jax"))
        if theirs != (here, jax.__version__):
            raise E5LiteError(
                f"programs in {str(folder)!r} were exported for platform {theirs[0]!r} with jax {theirs[1]}; this "
                f"process runs {here!r} with jax {jax.__version__} (export them again here: e5lite export-programs)"
            )
        from . import __version__

        if manifest.get("e5lite") != __version__:
            raise E5LiteError(
                f"programs in {str(folder)!r} were exported by e5lite {manifest.get('e5lite')}; this is e5lite "
                f"{__version__}, whose planner may emit other shapes (export them again)"
            )
        _require_flatbuffers()
        return cls(folder, manifest)

    def fill(self, settings: EngineSettings, max_length: int | None) -> tuple[EngineSettings, int | None]:
        """``settings`` with the fields left to their defaults (None, "auto") set as the programs were
        exported, and ``max_length`` (None: the programs'), so that a load names only what it changes."""
        default = EngineSettings()
        exported = self.manifest["settings"]
        filled = {k: exported[k] for k in exported if getattr(settings, k) == getattr(default, k)}
        return settings.replace(**filled), self.manifest["max_length"] if max_length is None else max_length

    def attach(self, engine: Engine, model_dir: Path | None = None) -> None:
        """Checks the programs against ``engine`` (``check``) and makes it run them from now on; weights from
        ``model_dir`` other than the export's are told in a warning (the programs take them as input)."""
        self.check(engine, engine.settings)
        engine.programs = self
        ref = self.manifest["weights_reference"]
        if model_dir is not None and weights_reference(ref["model"], model_dir)["files"] != ref["files"]:
            logger.warning(
                "e5lite: the weights in %s differ from those the programs in %s were exported with (%s): they "
                "run any weights of the model's shapes",
                model_dir, self.folder, ref["model_dir"],
            )  # fmt: skip

    def check(self, engine: Engine, settings: EngineSettings) -> None:
        """Refuses an engine (with ``settings``, resolved) that the programs cannot run: another model shape,
        pooling, max length, dtype or weights layout, several devices, or settings whose batches fall outside
        the programs."""
        m, where = self.manifest, f"programs in {str(self.folder)!r}"
        diff = _differences(m["config"], engine.config.to_dict())
        if diff:
            raise E5LiteError(f"{where} were exported for another model shape: config.json's {diff}")
        have = dict(pooling=engine.pooling, max_length=engine.max_length, dtype=np.dtype(engine.dtype).name)
        have.update(weights=engine.weights, devices=len(engine.devices), platform=backend_platform(engine.platform))
        diff = _differences({k: m[k] for k in have}, have)
        if diff:
            raise E5LiteError(f"{where} do not fit this engine: {diff}")
        diff = _differences(
            {k: m["settings"][k] for k in PROGRAM_SETTINGS}, {k: getattr(settings, k) for k in PROGRAM_SETTINGS}
        )
        if diff:
            raise E5LiteError(f"{where} were exported with other settings: {diff}")
        diff = _differences(m["params"], _param_shapes(engine._run_params))
        if diff:
            raise E5LiteError(f"{where} take the weights in another layout: {diff}")
        missing = set(program_keys(engine.pooling, engine.max_length, settings, len(engine.devices))) - set(
            self._entries
        )
        if missing:
            exported = {k: m["settings"][k] for k in SHAPE_SETTINGS}
            diff = _differences(exported, {k: getattr(settings, k) for k in SHAPE_SETTINGS})
            raise E5LiteError(
                f"{where} lack {len(missing)} of the batch shapes these settings plan (e.g. {min(missing).name}): "
                f"{diff} (export them again with these settings)"
            )

    def embed(self, params, batch: Batch, normalize: bool):
        """``embed_batch`` / ``embed_packed`` of ``batch`` by its program (asynchronous, as theirs)."""
        if batch.packed:
            key = Key("packed", bool(normalize), batch.shape)
            return self._function(key)(params, batch.input_ids, batch.segment_ids, batch.position_ids)
        return self._function(Key("padded", bool(normalize), batch.shape))(
            params, batch.input_ids, batch.attention_mask
        )

    def states(self, params, batch: Batch):
        """``hidden_states`` of a padded ``batch`` by its program."""
        return self._function(Key("states", None, batch.shape))(params, batch.input_ids, batch.attention_mask)

    def _function(self, key: Key) -> Callable:
        fn = self._functions.get(key)
        if fn is None:
            with self._lock:  # the engine's streams may ask for one program at once
                fn = self._functions.get(key) or self._load(key)
                self._functions[key] = fn
        return fn

    def _load(self, key: Key) -> Callable:
        entry = self._entries.get(key)
        if entry is None:
            exported = {k: self.manifest["settings"][k] for k in SHAPE_SETTINGS}
            raise E5LiteError(
                f"no program for a {key.kind} batch of shape {key.shape} in {str(self.folder)!r}: the programs "
                f"cover the batches the planner makes with {exported} and batch_size None (a call with "
                "batch_size, or other settings, needs programs exported for them)"
            )
        path = self.folder / "programs" / f"{entry['name']}.bin"
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise E5LiteError(f"{path}: its hash is not the one {MANIFEST} records (a damaged or replaced file)")
        exp = export.deserialize(bytearray(blob))
        return jax.jit(lambda *args: exp.call(*args))
