"""Shipped programs (``e5lite export-programs``, ``load(programs=DIR)``, ``programs.py``) on the tiny model: the
embeddings of the jitted path with the model never traced, every shape the planner makes covered, and what the
programs cannot run refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import e5lite
from e5lite import engine as engine_module
from e5lite import jitted
from e5lite.cli import build_parser, main
from e5lite.cli_embed import load_encoder
from e5lite.engine import Engine
from e5lite.errors import E5LiteError
from e5lite.program_export import export_programs
from e5lite.programs import Key, program_keys
from e5lite.settings import EngineSettings

MAX_LENGTH = 64  # a few dozen programs: the export takes seconds


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model's programs for this CPU, written by the command."""
    out = tmp_path_factory.mktemp("programs")
    argv = ["export-programs", "--model", str(tiny_dir), "--platform", "cpu", "--output", str(out)]
    assert main([*argv, "--max-length", str(MAX_LENGTH), "--overwrite"]) == 0
    return out


@pytest.fixture(scope="module")
def jitted_tiny(tiny_dir):
    """The jitted path the programs must equal: the same model and max length, loaded plainly."""
    return e5lite.load(tiny_dir, max_length=MAX_LENGTH)


def id_sets(seed: int = 0) -> list[list[np.ndarray]]:
    """Token ids: one text of max_length (the one-query path), a few short ones (the small-input path), and
    hundreds of every length 1..MAX_LENGTH (the planner's path). Few shapes, as each compiles twice here; that
    the programs hold every shape the planner makes is the next test's."""
    rng = np.random.default_rng(seed)
    one = lambda n: rng.integers(1000, 20000, n).astype(np.int32)  # noqa: E731
    many = [one(n) for n in rng.integers(1, MAX_LENGTH + 1, 150)] + [one(n) for n in range(1, MAX_LENGTH + 1)]
    return [[one(MAX_LENGTH)], [one(n) for n in (3, 9, 14)], many, [one(n) for n in range(3, 15)] * 2]


def outputs(enc) -> list[np.ndarray]:
    """Every path of the engine: one text, a few unnormalised, many (in packed rows: "auto" packs these),
    texts, token states, and padded batches of the planner (packing=False)."""
    one, few, many, short = id_sets()
    out = [enc.embed_ids(one), enc.embed_ids(few, normalize=False), enc.embed_ids(many)]
    out.append(enc.encode(["query: how long is a bridge", "passage: a bridge spans a river"], normalize=False))
    out.append(np.concatenate(enc.token_states(few[:2])))
    enc.configure(packing=False)
    try:
        out.append(enc.embed_ids(short))
    finally:
        enc.configure(packing="auto")
    return out


def test_programs_give_the_jitted_embeddings_and_never_trace_the_model(exported, tiny_dir, jitted_tiny, monkeypatch):
    want = outputs(jitted_tiny)
    traces = []
    forward = jitted.forward
    monkeypatch.setattr(jitted, "forward", lambda *a, **k: (traces.append(a[2].shape), forward(*a, **k))[1])

    def refuse(*args, **kwargs):
        raise AssertionError("the engine called a jitted function instead of a program")

    for name in ("embed_batch", "embed_packed", "hidden_states"):
        monkeypatch.setattr(engine_module, name, refuse)
    jax.clear_caches()  # a jitted function the engine reached some other way would be traced again: counted
    enc = e5lite.load(tiny_dir, programs=exported)  # max_length and settings: the programs'
    assert enc.max_length == MAX_LENGTH and enc.engine.programs is not None
    got = outputs(enc)
    assert traces == [], f"the forward was traced for {traces}"
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6)
    ran = enc.engine.compiled_shapes
    assert len(ran) >= 5 and any(len(s) == 4 for s in ran) and ("states", 4, 16) in ran, ran  # packed rows, states


def planner_shapes(engine: Engine, seed: int) -> set[Key]:
    """The keys of every batch the engine plans for many length mixes: small calls, big ones, each layout."""
    rng = np.random.default_rng(seed)
    keys: set[Key] = set()
    add = lambda batches, norm=True: keys.update(  # noqa: E731
        Key("packed" if b.packed else "padded", norm, b.shape) for b in batches
    )
    for count in (1, 2, 5, 16, 17, 40, 100, 333, 1500):
        for high in (8, 20, 70, 130, 300, 512):
            lengths = rng.integers(1, min(high, engine.max_length) + 1, count)
            ids = [np.zeros(n, np.int32) for n in lengths]
            for layout in [None, *engine.layouts()]:
                add(engine.plan(ids, layout=layout)[1])
            add(engine.small_batches(ids))
            keys.update(Key("states", None, b.shape) for b in engine.small_batches(ids) if len(ids) > 1)
    shapes: list = []
    engine.dispatch = lambda batch, normalize: shapes.append(batch.shape) or np.zeros(1)  # type: ignore[method-assign]
    engine.warmup(max_length=engine.max_length)
    add(engine.small_batches([np.zeros(1, np.int32)]))
    return keys | {Key("padded", True, s) for s in shapes}


@pytest.mark.parametrize(
    "max_length,settings",
    [(64, {}), (512, {}), (512, {"token_budget": 4096, "min_window": 0, "max_segments": 8, "small_inputs": 4})],
    ids=["tiny", "cpu-512", "budget-4096"],
)
def test_the_programs_are_every_shape_the_planner_makes(tiny, max_length, settings):
    engine = Engine(
        tiny.config, tiny.params, pooling="mean", max_length=max_length, pad_id=0, dtype=tiny.dtype,
        settings=EngineSettings(**settings),
    )  # fmt: skip
    keys = set(program_keys("mean", max_length, engine.settings))
    missing = {k for k in planner_shapes(engine, seed=max_length) if k.normalize is not False} - keys
    assert not missing, sorted(missing)[:5]
    assert {Key(k.kind, False, k.shape) for k in keys if k.normalize} <= keys  # the unnormalised twin of each


def broken_copy(exported: Path, tmp_path: Path, **changes) -> Path:
    folder = Path(shutil.copytree(exported, tmp_path / "programs"))
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, value in changes.items():
        if key in manifest["config"]:
            manifest["config"][key] = value
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("changes", [{"platform": "tpu"}, {"jax": "0.4.1"}], ids=["platform", "jax"])
def test_another_platform_or_jax_version_is_refused_naming_both(exported, tiny_dir, tmp_path, changes):
    folder = broken_copy(exported, tmp_path, **changes)
    theirs = {"platform": "cpu", "jax": jax.__version__, **changes}
    with pytest.raises(E5LiteError) as e:
        e5lite.load(tiny_dir, programs=folder)
    want = (
        f"exported for platform {theirs['platform']!r} with jax {theirs['jax']}; this process runs 'cpu' with "
        f"jax {jax.__version__}"
    )
    assert want in str(e.value) and str(folder) in str(e.value)


def test_programs_exported_for_a_tpu_here_are_refused_on_this_cpu(tiny_dir, tmp_path):
    kw = dict(max_length=16, token_budget=64, small_inputs=4, attention_impl="xla")  # tiny's heads: no kernel
    manifest = export_programs(tiny_dir, "tpu", tmp_path, **kw)
    assert manifest["platform"] == "tpu" and manifest["settings"]["unroll"] is False  # the accelerators' layout
    blob = (tmp_path / "programs" / f"{manifest['programs'][0]['name']}.bin").read_bytes()
    assert jax.export.deserialize(bytearray(blob)).platforms == ("tpu",)
    with pytest.raises(E5LiteError, match="exported for platform 'tpu'.*this process runs 'cpu'"):
        e5lite.load(tiny_dir, programs=tmp_path)


def test_what_the_programs_cannot_run_is_refused(exported, tiny_dir, tmp_path):
    with pytest.raises(E5LiteError, match=r"another model shape: config.json's num_hidden_layers: 3 \(programs\)"):
        e5lite.load(tiny_dir, programs=broken_copy(exported, tmp_path, num_hidden_layers=3))
    with pytest.raises(E5LiteError, match="dtype: 'float32' .programs. against 'bfloat16'"):
        e5lite.load(tiny_dir, programs=exported, dtype="bfloat16")
    with pytest.raises(E5LiteError, match="token_budget: 1024 .programs. against 2048"):
        e5lite.load(tiny_dir, programs=exported, token_budget=2048)
    enc = e5lite.load(tiny_dir, programs=exported, packing=False)  # a subset of the programs' shapes
    enc.configure(max_segments=8)  # no packed rows with packing=False: the same shapes
    before = enc.settings
    with pytest.raises(E5LiteError, match="lack .* token_budget: 1024 .programs. against 512"):
        enc.configure(token_budget=512)
    assert enc.settings == before  # refused before anything changed
    with pytest.raises(E5LiteError, match=r"no program for a padded batch of shape \(3, 16\).*batch_size"):
        enc.embed_ids([np.ones(5, np.int32)] * 20, batch_size=3)


def test_a_damaged_program_is_refused(exported, tiny_dir, tmp_path):
    folder = broken_copy(exported, tmp_path)
    (folder / "programs" / "padded-norm-1x64.bin").write_bytes(b"not a program")
    enc = e5lite.load(tiny_dir, programs=folder)
    with pytest.raises(E5LiteError, match="padded-norm-1x64.bin: its hash is not the one manifest.json records"):
        enc.encode("query: " + "word " * 70)


def test_serve_loads_the_programs(exported, tiny_dir):
    args = build_parser().parse_args(["serve", "--model", str(tiny_dir), "--programs", str(exported)])
    enc = load_encoder(args)
    assert enc.engine.programs is not None and enc.engine.programs.folder == exported
    assert enc.max_length == MAX_LENGTH
