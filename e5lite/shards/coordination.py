"""How the processes of a per-host run under jax.distributed wait for each other and hand things over.

Nothing on the data path is exchanged: each process embeds and commits its own shards. The processes meet
only where one must not go on without the others: the int8/uint8 ranges, computed once by process 0 and
handed to the others over jax.distributed's key-value store (``fix_ranges``), and the end, where every
process waits for every other (``_wait_for_all_processes``), since process 0 hosts the coordination service.
A process that fails says so and still reaches that end barrier (``wait_after_failure``), so that the others
do not wait for it until the barrier's timeout. Without jax.distributed (independent processes) none of
this waits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import E5LiteError
from ..files import write_atomic
from .store import MANIFEST, first_texts
from .vector_steps import calibration_ranges

BARRIER_TIMEOUT_S = 7 * 24 * 3600  # a share may take days; only a dead process (heartbeats) ends the wait sooner
_RANGES_KEY = "e5lite-embed-ranges"  # process 0 -> the others, under jax.distributed


def _distributed_client():
    from jax._src.distributed import global_state  # jax has no public key-value store

    return global_state.client


def fix_ranges(
    enc, out_dir, manifest: dict, process_index: int, process_count: int, *, batch_size: int | None = None
) -> None:
    """Sets ``manifest["run"]["ranges"]`` of an int8/uint8 run calibrated on its first texts, the same in every
    process: from the manifest when a previous run fixed them; else process 0 computes them, writes them into
    the manifest before any shard is embedded and, under jax.distributed, hands them to the others (which wait
    for them). Processes without jax.distributed (``process_index``/``process_count`` given) cannot wait for
    each other: process 0 must have fixed them first."""
    run = manifest["run"]
    if run.get("calibration") is None:
        return  # float32 or binary, or ranges given: every process has them already
    client = _distributed_client() if process_count > 1 else None
    if process_index == 0:
        if run["ranges"] is None:
            texts = first_texts(run["inputs"], manifest["plan"], run["field"], run["calibration"])
            run["ranges"] = calibration_ranges(enc, texts, run, batch_size=batch_size)
            write_atomic(Path(out_dir) / MANIFEST, json.dumps(manifest).encode())
        if client is not None:
            client.key_value_set(_RANGES_KEY, json.dumps({"ranges": run["ranges"]}))
        return
    if client is not None:  # process 0's, even where this process read some: one source for every process
        got = json.loads(client.blocking_key_value_get(_RANGES_KEY, BARRIER_TIMEOUT_S * 1000))
        if "error" in got:
            raise E5LiteError(f"process 0 failed before fixing the {run['precision']} ranges ({got['error']})")
        run["ranges"] = got["ranges"]
    elif run["ranges"] is None:
        raise E5LiteError(
            f"process {process_index}: the {run['precision']} ranges are not in "
            f"{Path(out_dir) / MANIFEST} yet; without jax.distributed the processes cannot hand them "
            "over: run process 0 first (it computes them from the first texts), or pass the ranges"
        )


def wait_after_failure(process_index: int, process_count: int, error: BaseException) -> None:
    """A process that failed (bad input, a model missing on its host) says so at once, then waits for the others
    at the end barrier: they would otherwise wait there for it until the barrier's timeout."""
    print(
        f"e5lite: process {process_index} failed ({error}); waiting for the other processes to finish their shards",
        file=sys.stderr,
    )
    if process_index == 0:  # processes waiting for process 0's int8/uint8 ranges (fix_ranges) must not wait on
        client = _distributed_client()
        if client is not None:
            try:
                client.key_value_set(_RANGES_KEY, json.dumps({"error": str(error)}))
            except Exception:  # set already: the ranges were handed over before the failure
                pass
    _wait_for_all_processes(process_count, failed=True)


def _wait_for_all_processes(process_count: int, failed: bool = False) -> None:
    """Waits until every process has done its shards. Not for the data (nothing is exchanged): process 0
    hosts jax.distributed's coordination service, and the others are stopped when it exits, so no process may
    leave while another is still embedding. A no-op without jax.distributed (independent processes)."""
    from jax._src.distributed import global_state  # the runtime client: jax has no public barrier without devices

    client = global_state.client
    if client is None:
        return
    try:
        client.wait_at_barrier("e5lite-embed-corpus", BARRIER_TIMEOUT_S * 1000)
    except Exception as e:  # a process died: its shards are left for a rerun
        if not failed:
            raise E5LiteError(
                f"another process failed or was stopped before finishing its shards ({e}); run the "
                "same command again on every host to resume"
            ) from None


def failing_together(step, *, together: bool, catch=Exception):
    """``step()``; when it raises ``catch`` and ``together`` (under jax.distributed), the error is reported and
    this process waits at the end barrier before raising it (``wait_after_failure``): a model missing on one
    host, or an option it rejects, must not leave the other processes waiting for it."""
    try:
        return step()
    except catch as e:
        if together:
            import jax

            wait_after_failure(jax.process_index(), jax.process_count(), e)
        raise
