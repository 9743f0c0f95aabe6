"""Resumable corpus embedding: ``e5lite embed --input FILE --output DIR`` and ``read_embeddings(DIR)``.

Two layouts. A single process embedding one .txt/.jsonl file writes row shards in sequence (format 1;
``writer.py``); per-host runs under jax.distributed, Ray runs and runs over folders, globs or Parquet write
shards planned up front, each committed by its own record (format 2; ``hosts.py``). ``read_embeddings``
reads both (``reader.py``).

Every layout stores the vectors as the run asks (``store.py``: long inputs truncated or cut into windows,
``truncate_dim`` components, float32 or quantised: int8/uint8 [rows, dim], packed sign bits int8/uint8
[rows, ceil(dim / 8)]), computes them the same way (``vector_steps.py``), and ``read_embeddings`` returns them
as written. The modules:

- ``store``: the run's vector options and int8/uint8 ranges, the manifest, the shard files' names
- ``vector_steps``: a run's texts -> the vectors it stores (``prepare``, ``vectors``, ``stored``)
- ``writer``: one process, one file, row shards (``embed_corpus``)
- ``reader``: ``read_embeddings``, ``iter_shards``, ``open_embeddings``
- ``shard_files``: a planned shard's files, streamed and committed (``ShardOutput``)
- ``plan``: a planned run's manifest and opening it: ``plan_run``, ``open_run``, ``missing_shards``
- ``hosts``: planned runs' shards embedded and committed: ``embed_shards``, ``embed_per_host``
- ``coordination``: where the processes of a jax.distributed run wait for each other and hand over
- ``ray_run``: ``e5lite embed --engine ray`` (``embed_corpus_ray``; re-exported by ``e5lite.ray``)
- ``ray_tasks``: what that Ray job runs: the shards' datasource, the actor (``ShardEmbedder``), calibration
- ``runs``: the command's runs (which layout, per host, Ray), called by ``e5lite.cli``
"""

from .coordination import BARRIER_TIMEOUT_S, failing_together, fix_ranges, wait_after_failure
from .hosts import embed_per_host, embed_shards
from .plan import missing_shards, open_run, plan_run
from .reader import iter_shards, open_embeddings, read_embeddings
from .runs import SHUTDOWN_TIMEOUT_S, embed_file, embed_planned, planned_layout
from .shard_files import ShardOutput
from .store import (
    CALIBRATION_ROWS,
    FORMAT,
    FORMAT_SHARDED,
    MANIFEST,
    OUTPUT_DEFAULTS,
    ROWS_PER_SHARD,
    SHARD_FORMATS,
    TMP_SUFFIX,
    first_texts,
    load_ranges,
    output_options,
    shard_stem,
    stored_layout,
)
from .vector_steps import calibration_ranges, prepare, stored, vectors
from .writer import embed_corpus, input_identity, read_rows

# isort: split
# the private names e5lite.shards held when it was one module, for code that imports them from here
from .coordination import _RANGES_KEY, _distributed_client, _wait_for_all_processes  # noqa: F401
from .hosts import _embed_todo, _groups, _tokenized  # noqa: F401
from .plan import _changes  # noqa: F401
from .reader import _open_sharded, _parquet_vectors, _sharded, _shards  # noqa: F401
from .shard_files import _file_metadata  # noqa: F401
from .store import (  # noqa: F401
    _SHARD_NAME,
    _arrow_type,
    _changed_settings,
    _check_shard_format,
    _listing,
    _opt,
    _read_manifest,
    _record,
)
from .writer import _clean, _encode_shard, _shard_names  # noqa: F401

__all__ = [
    "BARRIER_TIMEOUT_S",
    "CALIBRATION_ROWS",
    "FORMAT",
    "FORMAT_SHARDED",
    "MANIFEST",
    "OUTPUT_DEFAULTS",
    "ROWS_PER_SHARD",
    "SHARD_FORMATS",
    "SHUTDOWN_TIMEOUT_S",
    "TMP_SUFFIX",
    "ShardOutput",
    "calibration_ranges",
    "embed_corpus",
    "embed_file",
    "embed_per_host",
    "embed_planned",
    "embed_shards",
    "failing_together",
    "first_texts",
    "fix_ranges",
    "input_identity",
    "iter_shards",
    "load_ranges",
    "missing_shards",
    "open_embeddings",
    "open_run",
    "output_options",
    "plan_run",
    "planned_layout",
    "prepare",
    "read_embeddings",
    "read_rows",
    "shard_stem",
    "stored",
    "stored_layout",
    "vectors",
    "wait_after_failure",
]
