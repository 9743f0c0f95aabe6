"""Process-level JAX set-up: the persistent compilation cache and multi-process (multi-host) runs."""

from __future__ import annotations

import os
from pathlib import Path

import jax

CACHE_ENV = "E5LITE_COMPILATION_CACHE"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache, so a second process starts with compiled shapes.

    ``path`` defaults to $E5LITE_COMPILATION_CACHE, else ~/.cache/e5lite/jax. ``e5lite.load`` calls this
    by itself when $E5LITE_COMPILATION_CACHE is set.
    """
    p = Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "e5lite" / "jax").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(p))
    # Cache every executable: an encoder's shapes each compile in about a second, under JAX's defaults.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return p


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int, **kw) -> None:
    """``jax.distributed.initialize`` with CPU collectives (gloo) switched on, for multi-process runs.

    Call it once per process, before ``e5lite.load``; then every process calls ``encode`` with the same
    texts, embeds its contiguous share on its own devices, and receives the merged result in input order.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id, **kw)
