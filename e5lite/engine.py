"""The engine: token id sequences -> embeddings on the local devices, as fast as the host can feed them.

Sequences are taken in chunks; a worker thread produces (tokenises, for ``encode``) and plans chunk k+1 while
the devices run chunk k. Each chunk is planned into padded or packed batches (``batching.py``) whose rows
fill a token budget; batches are sharded across the local devices and dispatched asynchronously, and
results are read back ``in_flight`` batches behind the dispatch, so the device queue never drains while the
host copies results out. With ``streams`` > 1 (CPU), that many threads each run one batch at a time.
Under ``jax.distributed`` every process passes the same inputs, embeds its contiguous share, and all
receive the merged result. What runs on the devices (the jitted functions, the weights' layout) is
``jitted.py``'s; ``embed_batch``, ``embed_packed``, ``hidden_states``, ``check_weights`` and ``WEIGHTS`` are
importable from here too.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from . import batching
from .attention import resolve_attention_impl
from .batching import Batch, plan_packed, plan_padded
from .config import BertConfig
from .jitted import WEIGHTS as WEIGHTS  # re-exported, as the jitted functions (used below)
from .jitted import check_weights, embed_batch, embed_packed, hidden_states, run_layout, stacked
from .model import Params
from .pooling import PACKED_MODES
from .settings import EngineSettings

if TYPE_CHECKING:
    from .programs import Programs

# (start, end) -> the token id sequences of inputs start..end-1 (a Ragged or a list of arrays): tokenising
# texts, or slicing given ids.
Source = Callable[[int, int], Sequence[np.ndarray]]
DEFAULT_SETTINGS = EngineSettings()  # resolved for the backend when an Engine is made


def _shutdown(pools: dict) -> None:
    for pool in pools.values():
        pool.shutdown(wait=False, cancel_futures=True)


class Engine:
    """Runs one model's forward + pooling on token ids. ``settings`` are resolved for the backend (no None
    left, ``attention_impl`` the one that runs); ``stats`` and ``compiled_shapes`` accumulate over calls."""

    def __init__(
        self,
        config: BertConfig,
        params: Params,
        *,
        pooling: str,
        max_length: int,
        pad_id: int,
        dtype,
        settings: EngineSettings = DEFAULT_SETTINGS,
        devices=None,
        weights: str | None = None,
    ):
        self.config, self.pooling, self.max_length, self.pad_id, self.dtype = config, pooling, max_length, pad_id, dtype
        self.weights = check_weights(weights, dtype)
        self.devices = list(devices or jax.local_devices())
        self.platform = self.devices[0].platform
        self.settings = self._resolve(settings)
        self._mesh: Mesh | None = None
        if len(self.devices) > 1:
            mesh = self._mesh = Mesh(np.array(self.devices), ("data",))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
            self._param_sharding = NamedSharding(mesh, PartitionSpec())  # replicated
        else:
            self._batch_sharding = self._param_sharding = self.devices[0]
        self.set_params(params)
        self.programs: Programs | None = None  # shipped programs run instead of the jitted functions (``attach``)
        self.compiled_shapes: set[tuple] = set()
        self.stats = {"texts": 0, "real_tokens": 0, "padded_tokens": 0, "batches": 0}
        self._stats_lock = threading.Lock()  # calls may run from several threads at once (each has its own out)
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()
        weakref.finalize(self, _shutdown, self._pools)

    def set_params(self, params: Params) -> None:
        """Runs these weights from now on (e.g. after training steps), cast to the engine's dtype and placed
        like the originals; the compiled shapes stay valid (for the same ``unroll`` setting).

        Kept in the forward's own layout, built here once rather than on every call: query, key and value
        fused (``model.FusedLayerParams``), and with ``unroll`` one array per layer rather than stacked."""
        host = run_layout(
            params,
            self.dtype,
            self.weights,
            unroll=bool(self.settings.unroll),
            num_layers=self.config.num_hidden_layers,
        )
        self._run_params = jax.device_put(host, self._param_sharding)

    @property
    def params(self) -> Params:
        """The weights as ``load`` gives them (``model.Params``, layers stacked) in the engine's dtypes, rebuilt
        from the forward's layout (see ``set_params``) on each access."""
        return stacked(self._run_params)

    def _resolve(self, settings: EngineSettings) -> EngineSettings:
        s = settings.for_platform(self.platform)
        if s.packing is True and self.pooling not in PACKED_MODES:
            raise ValueError(f"packing needs pooling in {PACKED_MODES}, this model pools with {self.pooling!r}")
        if s.pack_length is not None and s.pack_length > self.max_length:
            raise ValueError(f"pack_length must be in [2, {self.max_length}] (max_length), got {s.pack_length}")
        impl = resolve_attention_impl(
            s.attention_impl, self.platform, self.dtype, self.config.num_attention_heads, self.config.head_dim
        )
        return s.replace(attention_impl=impl)

    def configure(self, **changes) -> EngineSettings:
        """Changes settings between calls (validated; None restores the backend default); returns the new ones."""
        params = self.params if "unroll" in changes else None
        settings = self._resolve(self.settings.replace(**changes))
        if self.programs is not None:
            self.programs.check(self, settings)  # refused before anything changes: never retraced
        self.settings = settings
        if params is not None:
            self.set_params(params)  # the other layout
        return self.settings

    # ------------------------------------------------------------------------------------------ planning

    def layouts(self) -> list[tuple[int, int]]:
        """The layouts "auto" packing weighs (see ``batching.layouts``)."""
        s = self.settings
        assert s.min_window is not None  # resolved for the backend (``_resolve``): no None left
        return batching.layouts(
            s.packing,
            packable=self.pooling in PACKED_MODES,
            max_length=self.max_length,
            pack_length=s.pack_length,
            min_window=s.min_window,
        )

    def _plan_kw(self, batch_size):
        return dict(
            max_length=self.max_length,
            token_budget=self.settings.token_budget,
            max_rows=batch_size,
            multiple=len(self.devices),
        )

    def choose_layout(self, lengths, batch_size: int | None = None) -> tuple[int, int]:
        """The layout of ``layouts()`` that needs the fewest multiply-adds for sequences of these lengths."""
        return batching.choose_layout(
            lengths, self.layouts(), self.config, max_segments=self.settings.max_segments, **self._plan_kw(batch_size)
        )

    def plan(
        self, ids: Sequence[np.ndarray], batch_size: int | None = None, layout: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], list[Batch]]:
        """(layout, batches) for these token sequences; layout None picks one with ``choose_layout``."""
        if layout is None:
            layout = self.choose_layout([len(t) for t in ids], batch_size)
        kw = dict(self._plan_kw(batch_size), pad_id=self.pad_id)
        pack_length, min_window = layout
        if pack_length == 0:
            return layout, list(plan_padded(ids, **kw))
        return layout, list(
            plan_packed(
                ids, pack_length=pack_length, max_segments=self.settings.max_segments, min_window=min_window, **kw
            )
        )

    # ------------------------------------------------------------------------------------------- running

    def dispatch(self, batch: Batch, normalize: bool):
        """Starts one batch on the devices; returns the (asynchronous) result array, one row per slot."""
        put = self._put
        self.compiled_shapes.add(batch.shape)
        if self.programs is not None:
            return self.programs.embed(self._run_params, batch, normalize)
        kw = dict(
            config=self.config, pooling=self.pooling, normalize=normalize, attention_impl=self.settings.attention_impl
        )
        with self._on_mesh():
            if batch.packed:
                assert batch.segment_ids is not None and batch.position_ids is not None  # a packed batch has both
                return embed_packed(
                    self._run_params,
                    put(batch.input_ids),
                    put(batch.segment_ids),
                    put(batch.position_ids),
                    num_segments=batch.num_segments,
                    attention_window=batch.window,
                    **kw,
                )
            return embed_batch(self._run_params, put(batch.input_ids), put(batch.attention_mask), **kw)

    def _on_mesh(self) -> contextlib.AbstractContextManager:
        """Several devices: their mesh as jax's context while the jitted functions trace, so that the Pallas
        kernel, which XLA cannot partition, runs once per device on its rows (``attention``)."""
        return jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext()

    def _put(self, x: np.ndarray):
        """A batch's host array as the jitted functions take it: split over the devices, or, on one device, as
        it is (jit places it beside the weights, for less dispatch work than a device_put, which is a visible
        share of a one-query forward; BENCHMARKS.md, "One-query latency")."""
        return jax.device_put(x, self._batch_sharding) if len(self.devices) > 1 else x

    def run(
        self,
        source: Source,
        n: int,
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        show_progress_bar: bool = False,
        local: bool = False,
    ) -> np.ndarray:
        """Embeddings float32 [n, dim] of the n inputs ``source`` yields, in input order. Under several JAX
        processes every process passes the same inputs and gets the merged result (SPMD), unless ``local``:
        then this process embeds its own inputs on its own devices, with no collective (corpus runs)."""
        dim = self.config.hidden_size
        if jax.process_count() == 1 or local:
            out = np.zeros((n, dim), dtype=np.float32)
            if n <= self.settings.small_inputs:
                self._run_small(source(0, n), out, normalize, batch_size)
            else:
                self._run(source, n, out, normalize, batch_size, show_progress_bar)
            return out
        from jax.experimental import multihost_utils

        share = -(-n // jax.process_count())
        lo = min(n, jax.process_index() * share)
        hi = min(n, lo + share)
        mine = np.zeros((share, dim), dtype=np.float32)  # equal shapes for the all-gather
        self._run(lambda a, b: source(lo + a, lo + b), hi - lo, mine, normalize, batch_size, show_progress_bar)
        merged = np.asarray(multihost_utils.process_allgather(mine))  # [processes, share, dim]
        return merged.reshape(-1, dim)[:n]

    def small_batches(self, ids, batch_size: int | None = None) -> list[Batch]:
        """The padded batches of the small-input path: one per length bucket, rows on the ladder 1, 4, 16
        (times the devices), so a handful of shapes covers every query (see ``warmup``)."""
        if len(ids) == 1:
            return [batching.single_batch(ids[0], self.max_length, len(self.devices), self.pad_id)]
        return list(plan_padded(ids, pad_id=self.pad_id, **self._plan_kw(batch_size)))

    def _run_small(self, ids, out: np.ndarray, normalize: bool, batch_size) -> None:
        # A query waits on the forward, not on the host: no thread, pool, layout choice or progress bar.
        for batch in self.small_batches(ids, batch_size):
            self._collect(batch, self.dispatch(batch, normalize), out, None)

    def token_states(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The last hidden state of every token, float32 [len, D] per sequence (TEI's ``/embed_all``; the
        vectors mean pooling averages). Padded batches planned as ``encode``'s small path (length buckets),
        so a handful of shapes compile."""
        out: list = [None] * len(ids)
        put = self._put
        for batch in plan_padded(ids, pad_id=self.pad_id, **self._plan_kw(None)):
            self.compiled_shapes.add(("states", *batch.shape))
            if self.programs is not None:
                states_BSD = self.programs.states(self._run_params, batch)
            else:
                with self._on_mesh():
                    states_BSD = hidden_states(
                        self._run_params,
                        put(batch.input_ids),
                        put(batch.attention_mask),
                        config=self.config,
                        attention_impl=self.settings.attention_impl,
                    )
            states_BSD = np.asarray(states_BSD)
            for j, slot in zip(batch.index, batch.slot, strict=True):
                out[j] = states_BSD[slot, : len(ids[j])]
        return out

    def warmup(self, max_length: int = 128, normalize: bool = True) -> list[tuple]:
        """Compiles the small-input path's shapes up to ``max_length`` tokens (rows 1, 4, ..., up to
        ``small_inputs``), so that the first query is as fast as the hundredth. Returns the shapes."""
        shapes = []
        rows = batching.partial_rows(1, self.settings.small_inputs or 1, len(self.devices))
        full = max(rows, self.settings.small_inputs)
        for length in sorted(
            {
                batching.seq_bucket(n, self.max_length)
                for n in batching.SEQ_BUCKETS
                if n <= max(2, min(max_length, self.max_length))
            }
        ):
            r = rows
            while True:
                ids = [np.full(length, self.pad_id, np.int32)] * r
                batch = batching.padded_batch(ids, np.arange(r), r, length, self.pad_id)
                np.asarray(self.dispatch(batch, normalize))
                shapes.append(batch.shape)
                if r >= full:
                    break
                r = min(r * 4, full)
        return shapes

    def _pool(self, name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
        """The engine's thread pools, made once and kept (a call does not pay for thread starts); a pool of
        another size (``configure(streams=...)``) replaces the old one."""
        with self._pools_lock:
            pool = self._pools.get(name)
            if pool is None or pool._max_workers != workers:
                if pool is not None:
                    pool.shutdown(wait=False)
                pool = self._pools[name] = concurrent.futures.ThreadPoolExecutor(workers, f"e5lite-{name}")
            return pool

    def close(self) -> None:
        """Stops the engine's threads (they also stop when the Encoder is garbage collected or at exit)."""
        with self._pools_lock:
            for pool in self._pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
            self._pools.clear()

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        # A small first chunk gets the device busy sooner; its lengths choose the layout kept for the rest,
        # so that a corpus compiles a bounded set of shapes.
        s = self.settings
        starts = [0, *range(s.first_chunk_texts, n, s.chunk_texts)] if n else []
        return list(zip(starts, starts[1:] + [n], strict=True))

    def batches(self, source: Source, n: int, batch_size: int | None = None) -> Generator[Batch, None, None]:
        """The batches of the n inputs ``source`` yields, ``index`` counting from 0 over the n: chunks are
        produced (tokenised) and planned one ahead on a worker thread while the caller uses the current ones."""
        chunks = self._chunks(n)

        def host_work(k: int, layout):
            return self.plan(source(*chunks[k]), batch_size, layout)

        planner = self._pool("planner", 1)
        if not chunks:
            return
        future = planner.submit(host_work, 0, None)
        try:
            for k, (start, _) in enumerate(chunks):
                layout, planned = future.result()
                if k + 1 < len(chunks):
                    future = planner.submit(host_work, k + 1, layout)
                for batch in planned:
                    batch.index = batch.index + start
                    yield batch
        finally:
            future.cancel()  # a consumer that stops early leaves no chunk being planned

    def _run(self, source: Source, n: int, out: np.ndarray, normalize: bool, batch_size, show: bool) -> None:
        """Embeds the n inputs into out[:n]: the batches of ``batches`` run on ``streams`` threads (or are
        dispatched asynchronously from here with one stream), read back ``in_flight`` behind."""
        streams = self.settings.streams
        assert streams is not None  # resolved for the backend (``_resolve``): no None left
        bar = tqdm(total=n, desc="embed", unit="text", disable=not show, file=sys.stderr)

        def compute(batch: Batch):
            return np.asarray(self.dispatch(batch, normalize))

        pending: collections.deque[tuple[Batch, Any]] = collections.deque()  # (batch, array or Future)
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)  # also when a batch raises: no stale bar left on stderr
            batches = stack.enter_context(contextlib.closing(self.batches(source, n, batch_size)))
            workers = self._pool("streams", streams) if streams > 1 else None
            stack.callback(lambda: [f.cancel() for _, f in pending if isinstance(f, concurrent.futures.Future)])
            for batch in batches:
                result = workers.submit(compute, batch) if workers else self.dispatch(batch, normalize)
                pending.append((batch, result))
                if len(pending) > self.settings.in_flight + streams - 1:
                    self._collect(*pending.popleft(), out, bar)
            while pending:
                self._collect(*pending.popleft(), out, bar)

    def _collect(self, batch: Batch, result, out: np.ndarray, bar) -> None:
        if isinstance(result, concurrent.futures.Future):
            result = result.result()
        out[batch.index] = np.asarray(result)[batch.slot]
        with self._stats_lock:
            self.stats["texts"] += len(batch.index)
            self.stats["real_tokens"] += batch.real_tokens
            self.stats["padded_tokens"] += batch.input_ids.size
            self.stats["batches"] += 1
        if bar is not None:
            bar.update(len(batch.index))
