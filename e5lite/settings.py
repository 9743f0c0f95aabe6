"""Engine settings: one frozen, validated dataclass; the per-backend defaults are stated here once.

No JAX import: the CLI reads the defaults for its help text without starting a backend.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_CHOICES = ("auto", "xla", "cudnn", "pallas")
PACKING = ("auto", True, False)

# The knobs left as None are filled per backend. CPUs run best on cache-sized batches, accelerators on large
# ones. Streams: XLA:CPU runs much of a forward on one core, so a second batch in flight fills the other;
# accelerators queue asynchronous dispatches already. Attention windows: measured on CPU only, off elsewhere.
# Unrolled layers: XLA:CPU copies a scanned layer's weights out of the stack on every call (a large share of
# a one-query forward), and runs unrolled layers faster in bulk too; it costs compile time (L layers compiled,
# not one), which accelerators, with their longer compiles and no such copies to save, keep.
# The measurements behind each number are in BENCHMARKS.md.
BACKEND_DEFAULTS: dict[str, dict[str, Any]] = {  # field -> value, per backend
    "cpu": {"token_budget": 1024, "streams": 2, "min_window": 64, "unroll": True},
    "accelerator": {"token_budget": 65536, "streams": 1, "min_window": 0, "unroll": False},
}


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches and runs a model; None means the backend's default (``BACKEND_DEFAULTS``).

    - ``token_budget``: tokens per batch (rows x padded length).
    - ``packing``: "auto" (per chunk, whichever of padded batches or packed rows of 128/256/512 tokens needs
      fewer multiply-adds), True (always packed rows) or False (one text per row).
    - ``pack_length``: fix the packed row length instead of weighing 128/256/512.
    - ``max_segments``: texts per packed row.
    - ``min_window``: the smallest attention window of packed rows (0: whole rows).
    - ``streams``: batches computed concurrently, each by its own thread.
    - ``attention_impl``: "auto" (per backend), "xla", "cudnn" or "pallas".
    - ``in_flight``: batches dispatched but not yet read back, so the device queue never drains.
    - ``chunk_texts``: texts tokenised, sorted and planned together (bounds host memory on big corpora);
      ``first_chunk_texts`` is smaller, so the device starts sooner.
    - ``small_inputs``: calls with at most this many inputs (a query, a few) take the small-input path: on
      the caller's thread, padded rows of the precompilable ladder, no planner or layout choice (0: never).
    - ``unroll``: the encoder's layers compiled one after the other, each with its own weights, rather than
      one layer run L times under ``lax.scan`` over stacked weights: faster on CPU, compiles take longer.
    """

    token_budget: int | None = None
    packing: bool | str = "auto"
    pack_length: int | None = None
    max_segments: int = 64
    min_window: int | None = None
    streams: int | None = None
    attention_impl: str = "auto"
    in_flight: int = 2
    chunk_texts: int = 8192
    first_chunk_texts: int = 2048
    small_inputs: int = 16
    unroll: bool | None = None

    def __post_init__(self) -> None:
        # None means the default for every field, so that ``configure(packing=None)`` restores it as it does
        # ``token_budget=None``: fields with a fixed default take it here, the others the backend's later.
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and f.default is not None:
                object.__setattr__(self, f.name, f.default)  # frozen: set in place before anyone sees it
        if self.packing not in PACKING or not isinstance(self.packing, (bool, str)):
            raise ValueError(f"packing must be one of {PACKING}, got {self.packing!r}")
        if self.attention_impl not in ATTENTION_CHOICES:
            raise ValueError(f"attention_impl must be one of {ATTENTION_CHOICES}, got {self.attention_impl!r}")
        for name in ("token_budget", "pack_length", "streams"):
            _positive_int(name, getattr(self, name), allow_none=True)
        for name in ("max_segments", "in_flight", "chunk_texts", "first_chunk_texts"):
            _positive_int(name, getattr(self, name))
        if self.pack_length is not None and self.pack_length < 2:
            raise ValueError(f"pack_length must be at least 2, got {self.pack_length}")
        if isinstance(self.small_inputs, bool) or not isinstance(self.small_inputs, int) or self.small_inputs < 0:
            raise ValueError(f"small_inputs must be an int >= 0 (0: never), got {self.small_inputs!r}")
        if self.unroll is not None and not isinstance(self.unroll, bool):
            raise ValueError(f"unroll must be True, False or None (the backend's default), got {self.unroll!r}")
        w = self.min_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"min_window must be an int >= 0 (0: no windows), got {w!r}")

    def for_platform(self, platform: str) -> EngineSettings:
        """These settings with every None filled with the default of ``platform`` ("cpu", "gpu", "tpu")."""
        defaults = BACKEND_DEFAULTS["cpu" if platform == "cpu" else "accelerator"]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def replace(self, **changes: Any) -> EngineSettings:
        """A copy with ``changes`` applied (validated again); unknown names raise TypeError."""
        return dataclasses.replace(self, **changes)


def default_help(name: str) -> str:
    """ "1024 on CPU, 65536 on accelerators": a backend default for help texts."""
    cpu, acc = BACKEND_DEFAULTS["cpu"][name], BACKEND_DEFAULTS["accelerator"][name]
    return f"{cpu} on CPU, {acc} on accelerators"
