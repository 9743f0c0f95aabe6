"""Process-level set-up: the persistent compilation cache, multi-process (multi-host) runs, and huge pages for
training on CPU."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax

from .errors import E5LiteError

CACHE_ENV = "E5LITE_COMPILATION_CACHE"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
HUGE_PAGES_ENV = "E5LITE_HUGE_PAGES"  # "0": `e5lite train` does not restart itself with HUGE_PAGES
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache, so a second process starts with compiled shapes.

    ``path`` defaults to $E5LITE_COMPILATION_CACHE, else ~/.cache/e5lite/jax. ``e5lite.load`` calls this
    by itself when $E5LITE_COMPILATION_CACHE is set.
    """
    p = Path(path or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "e5lite" / "jax").expanduser()
    p.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(p))
    # Cache every executable: an encoder's shapes compile quickly, many under JAX's default threshold (one
    # second of compile time), which would leave them out of the cache.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return p


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, **kw: Any
) -> None:
    """``jax.distributed.initialize`` with CPU collectives (gloo) switched on, for multi-process runs.

    Call it once per process, before ``e5lite.load``; then every process calls ``encode`` with the same
    texts, embeds its contiguous share on its own devices, and receives the merged result in input order.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id, **kw)
    except ValueError as e:  # JAX's cluster detection found no cluster: its message names no way out
        if coordinator_address is not None or "should be defined" not in str(e) and "must be defined" not in str(e):
            raise
        raise E5LiteError(
            "--distributed found no cluster to join (JAX detects TPU pods, SLURM, Open MPI and other managed "
            "clusters, not plain machines); here pass --coordinator HOST:PORT --num-processes N --process-id I "
            f"to each process (JAX: {e})"
        ) from None


def huge_pages_tunables(environ=None) -> str | None:
    """The ``GLIBC_TUNABLES`` value under which glibc's malloc asks the kernel for transparent huge pages, or
    None where that is set already, would change nothing, or is switched off ($E5LITE_HUGE_PAGES=0).

    Why: a training step on XLA:CPU allocates and frees gigabytes of buffers; glibc maps each large one afresh
    and unmaps it when freed, so the kernel faults in and zeroes every 4 KiB page again at every step (gigabytes
    a MiniLM step, a large share of its time: BENCHMARKS.md, "Training speed"). In 2 MiB pages that is 512 times fewer
    faults. glibc reads the setting only when a process starts, and it helps only where the kernel gives huge
    pages on request (``madvise`` mode; in ``always`` mode every large mapping gets them anyway).
    """
    environ = os.environ if environ is None else environ
    current = environ.get("GLIBC_TUNABLES", "")
    # "restarted": set by restart_with_huge_pages, so that a process whose loader drops GLIBC_TUNABLES (setuid)
    # cannot restart itself for ever
    if (
        environ.get(HUGE_PAGES_ENV, "1") in ("0", "restarted")
        or "glibc.malloc.hugetlb" in current
        or platform.system() != "Linux"
    ):
        return None
    libc, version = platform.libc_ver()
    try:
        new_enough = libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)  # the tunable's first
        thp_on_request = "[madvise]" in THP_MODE.read_text()
    except (OSError, ValueError):
        return None
    if not (new_enough and thp_on_request):
        return None
    return f"{current}:{HUGE_PAGES}" if current else HUGE_PAGES


def restart_with_huge_pages() -> None:
    """Starts this program again, in place (same process id, arguments and open files), with glibc's malloc
    asking for huge pages (``huge_pages_tunables``); returns without doing anything where that would change
    nothing. ``e5lite train`` calls it first thing; from Python, start the process with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` instead."""
    value = huge_pages_tunables()
    args = sys.orig_argv[1:]
    # Only a program whose command line says all: not a script read from stdin (a second start would find it
    # empty), nor one that rewrote sys.argv before calling us (it would start again from the top).
    if (
        value is None
        or not sys.executable
        or sys.argv[0] in ("", "-")
        or args[len(args) - (len(sys.argv) - 1) :] != sys.argv[1:]
    ):
        return
    before = {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", HUGE_PAGES_ENV)}
    os.environ.update({"GLIBC_TUNABLES": value, HUGE_PAGES_ENV: "restarted"})
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execv(sys.executable, [sys.executable, *args])
    except (OSError, ValueError):  # carry on as we are: slower, not wrong
        for k, v in before.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
