"""EngineSettings (settings.py): validation, per-backend defaults, and how load/configure apply them."""

from __future__ import annotations

import dataclasses

import pytest

import e5lite
from e5lite.settings import BACKEND_DEFAULTS, EngineSettings, default_help


def test_defaults_are_filled_per_backend():
    s = EngineSettings()
    assert s.token_budget is None and s.streams is None and s.min_window is None
    cpu, gpu = s.for_platform("cpu"), s.for_platform("gpu")
    assert (cpu.token_budget, cpu.streams, cpu.min_window, cpu.unroll) == (1024, 2, 64, True)
    assert gpu.unroll is False
    assert (gpu.token_budget, gpu.streams, gpu.min_window) == (65536, 1, 0) == tuple(
        BACKEND_DEFAULTS["accelerator"][k] for k in ("token_budget", "streams", "min_window"))
    assert s.replace(token_budget=333).for_platform("tpu").token_budget == 333  # a choice is kept
    assert default_help("token_budget") == "1024 on CPU, 65536 on accelerators"


@pytest.mark.parametrize("field, value, message", [
    ("token_budget", 0, "token_budget must be a positive int, got 0"),
    ("streams", 0, "streams must be a positive int"),
    ("streams", True, "streams must be a positive int, got True"),
    ("max_segments", 2.0, "max_segments must be a positive int"),
    ("in_flight", -1, "in_flight must be a positive int"),
    ("pack_length", 1, "pack_length must be at least 2"),
    ("packing", "yes", "packing must be one of"),
    ("packing", 1, "packing must be one of"),
    ("attention_impl", "flash", "attention_impl must be one of"),
    ("min_window", -1, "min_window must be an int >= 0"),
    ("min_window", True, "min_window must be an int >= 0"),
    ("min_window", 2.0, "min_window must be an int >= 0"),
    ("unroll", 1, r"unroll must be True, False or None \(the backend's default\), got 1"),
])
def test_bad_values_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings(**{field: value})
    with pytest.raises(ValueError, match=message):
        EngineSettings().replace(**{field: value})


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineSettings().token_budget = 5


def test_load_and_configure(tiny_dir):
    enc = e5lite.load(tiny_dir, settings=EngineSettings(token_budget=512), packing=False)
    assert enc.settings.token_budget == 512 and enc.settings.packing is False
    assert enc.settings.attention_impl == "xla"  # resolved: "auto" never stays in the engine's settings
    before = enc.encode(["a text to embed", "another one"])
    assert enc.configure(token_budget=None, packing=True).token_budget == 1024  # None: the backend default
    assert enc.settings.packing is True
    assert abs(enc.encode(["a text to embed", "another one"]) - before).max() < 1e-5
    with pytest.raises(ValueError, match="pack_length must be in \\[2, 128\\]"):
        enc.configure(pack_length=256)
    assert enc.settings.packing is True  # a refused change leaves the settings as they were
    with pytest.raises(TypeError):
        e5lite.load(tiny_dir, token_budgett=5)


def test_none_restores_the_default_of_every_field(tiny):
    """``None`` for any field means its default, as the README says: the dataclass's own, or the backend's."""
    fields = [f.name for f in dataclasses.fields(EngineSettings)]
    assert EngineSettings(**dict.fromkeys(fields)) == EngineSettings()
    changed = EngineSettings(packing=False, max_segments=4, attention_impl="xla", in_flight=1, small_inputs=0)
    assert changed.replace(packing=None, max_segments=None, attention_impl=None, in_flight=None,
                           small_inputs=None) == EngineSettings()
    loaded = tiny.settings  # the session's tiny is loaded with every default
    try:
        tiny.configure(packing=False, attention_impl="xla", max_segments=4, min_window=0)
        s = tiny.configure(packing=None, attention_impl=None, max_segments=None, min_window=None)
        assert s == loaded and s.packing == "auto" and s.max_segments == 64  # "auto" attention resolved again
    finally:
        tiny.configure(**dict.fromkeys(fields))
