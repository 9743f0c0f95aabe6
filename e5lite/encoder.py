"""``e5lite.load(...)`` and ``Encoder.encode(...)``: tokenise, plan batches, run the jitted forward, pool.

The engine: texts are tokenised in chunks on a background thread; each chunk is planned into padded or
packed batches (``batching.py``) whose rows fill a token budget; batches are sharded across the local
devices and dispatched asynchronously, so host work for the next batch overlaps device work.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from . import hub
from .batching import Batch, plan_packed, plan_padded, planned_shapes
from .config import BertConfig
from .errors import E5LiteError
from .model import ATTENTION_IMPLS, AttentionMask, Params, attention_core, forward
from .runtime import CACHE_ENV, enable_compilation_cache
from .pooling import PACKED_MODES, l2_normalize, pool, pool_segments, read_pooling_mode
from .tokenizer import WordPieceTokenizer, read_prompts, resolve_max_length
from .weights import load_params, resolve_dtype

logger = logging.getLogger("e5lite")

# Tokens per batch by backend: CPUs run best on cache-sized batches, accelerators on large ones.
CPU_TOKEN_BUDGET = 1024
ACCELERATOR_TOKEN_BUDGET = 65536
CHUNK_TEXTS = 8192  # texts tokenised, sorted and planned together; bounds host memory for big corpora
FIRST_CHUNK_TEXTS = 2048  # smaller, so the device starts sooner
IN_FLIGHT = 2  # batches dispatched but not yet read back
# Batches computed at once on CPU. XLA:CPU runs much of a forward (the fusions between the matmuls, small
# dots) on one core, so a second batch in flight fills the other: MiniLM on 2 cores, 1.25x tokens/s
# (BENCHMARKS.md). Accelerators queue asynchronous dispatches already and need no threads.
CPU_STREAMS = 2
MAX_SEGMENTS = 64   # texts per packed row
PACK_LENGTHS = (128, 256, 512)  # packed row lengths that packing="auto" weighs against each other
# Smallest attention window for packed rows on CPU: texts are packed so that none crosses a multiple of the
# window, and attention runs per window. MiniLM forward on 8 x 128 rows: windows of 64 1.09x, 32 1.13x;
# encode() on the benchmark corpus: 64 1.046x, 32 1.049x (BENCHMARKS.md), so 64, one compiled shape fewer.
# Accelerators: off (not measured there yet).
CPU_MIN_WINDOW = 64
PACKING = ("auto", True, False)


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize", "attention_impl"))
def embed_batch(params: Params, input_ids, attention_mask, *, config: BertConfig, pooling: str, normalize: bool,
                attention_impl: str = "xla"):
    """Padded batch: token ids, mask [B, S] -> sentence embeddings [B, D] float32 (forward, pool, L2 norm)."""
    hidden_BSD = forward(params, config, input_ids, attention_mask, attention_impl=attention_impl)
    out_BD = pool(hidden_BSD, attention_mask, pooling)
    return l2_normalize(out_BD) if normalize else out_BD


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize", "num_segments", "attention_impl",
                                             "attention_window"))
def embed_packed(params: Params, input_ids, segment_ids, position_ids, *, config: BertConfig, pooling: str,
                 normalize: bool, num_segments: int, attention_impl: str = "xla", attention_window: int | None = None):
    """Packed batch: ids, segment ids, position ids [B, S] -> embeddings [B * G, D] float32, where sequence
    g (1..G) of row b lands at b * G + g - 1 and G = num_segments. ``attention_window``: see ``forward``."""
    hidden_BSD = forward(params, config, input_ids, segment_ids > 0, segment_ids=segment_ids,
                         position_ids=position_ids, attention_impl=attention_impl,
                         attention_window=attention_window)
    out_BGD = pool_segments(hidden_BSD, segment_ids, position_ids, num_segments, pooling)
    out_BGD = l2_normalize(out_BGD) if normalize else out_BGD
    return out_BGD.reshape(-1, out_BGD.shape[-1])


# attention_impl="auto": candidates per backend, first available wins (BENCHMARKS.md). CPU: Pallas runs in
# interpret mode there (0.5-1x XLA). H100, bf16, whole e5-base encoder on 128 x 512 packed rows: cuDNN 1.60x
# XLA, Pallas 1.44x (2026-11-23). TPU: not measured; the kernel skips blocks XLA would compute.
AUTO_ATTENTION = {"cpu": ("xla",), "gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "xla")}


def resolve_attention_impl(requested: str, platform: str, dtype, config: BertConfig) -> str:
    """The attention implementation to run: ``requested``, or for "auto" the first of AUTO_ATTENTION that
    compiles here (each unavailable one is logged in one line). An explicit choice that cannot run raises."""
    if requested not in ("auto",) + ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be 'auto' or one of {ATTENTION_IMPLS}, got {requested!r}")
    candidates = AUTO_ATTENTION.get(platform, ("xla",)) if requested == "auto" else (requested,)
    for impl in candidates:
        if impl == "xla":  # plain jnp runs everywhere: no probe compile at start-up
            return impl
        if impl == "cudnn" and dtype == jnp.float32:
            reason = "cuDNN attention needs float16/bfloat16"
        else:
            try:
                shape = (1, config.num_attention_heads, 16, config.head_dim)
                q = jnp.zeros(shape, dtype)
                mask = AttentionMask(jnp.ones((1, 16), bool))
                jax.jit(attention_core, static_argnums=4).lower(q, q, q, mask, impl).compile()
                return impl
            except Exception as e:  # unavailable backends fail in many ways (lowering, missing cuDNN, ...)
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if requested != "auto":
            raise E5LiteError(f"attention_impl={impl!r} is not available on {platform} ({reason})")
        logger.warning("e5lite: attention_impl %r unavailable on %s (%s); trying the next", impl, platform, reason)
    return "xla"


def forward_macs(config: BertConfig, shapes: Iterable[tuple[int, int, int]]) -> float:
    """Multiply-adds of the forward over batches of these (rows, length, attention window) shapes: linear
    layers plus attention scores and context."""
    d, f = config.hidden_size, config.intermediate_size
    total = 0.0
    for rows, s, w in shapes:
        total += rows * (s * (4 * d * d + 2 * d * f) + 2 * s * w * d)
    return total * config.num_hidden_layers


def _check_texts(texts) -> tuple[list[str], bool]:
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return texts, False


class Encoder:
    """A loaded E5/BERT sentence encoder. Build with ``e5lite.load``.

    Engine settings (attributes, may be changed between calls): ``token_budget`` tokens per batch (None: 1024
    on CPU, 65536 on accelerators); ``packing`` "auto" (per chunk, whichever of padded batches or packed rows
    of 128/256/512 tokens needs fewer multiply-adds), True or False; ``pack_length`` fixes the packed row length;
    ``max_segments`` texts per packed row; ``min_window`` the smallest attention window of packed rows (None:
    64 on CPU, 0 = whole rows on accelerators; see CPU_MIN_WINDOW). Batches are sharded over ``devices``
    (default: all local devices).
    ``attention_impl``: "auto" (per backend, see AUTO_ATTENTION), "xla", "cudnn" or "pallas". ``streams``
    batches computed concurrently, each by its own thread (None: 2 on CPU, 1 on accelerators).
    """

    def __init__(self, model_dir, config: BertConfig, params: Params, tokenizer: WordPieceTokenizer, *,
                 pooling: str = "mean", prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, dtype="float32", token_budget: int | None = None,
                 packing="auto", pack_length: int | None = None, max_segments: int = MAX_SEGMENTS, devices=None,
                 attention_impl: str = "auto", streams: int | None = None, min_window: int | None = None):
        self.model_dir = Path(model_dir)
        self.config = config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.dtype = resolve_dtype(dtype)
        if packing not in PACKING:
            raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
        if packing is True and pooling not in PACKED_MODES:
            raise ValueError(f"packing needs pooling in {PACKED_MODES}, this model pools with {pooling!r}")
        self.packing = packing
        if pack_length is not None and not 2 <= pack_length <= tokenizer.max_length:
            raise ValueError(f"pack_length must be in [2, {tokenizer.max_length}] (max_length), got {pack_length}")
        self.pack_length = pack_length
        if not isinstance(max_segments, int) or max_segments < 1:
            raise ValueError(f"max_segments must be a positive int, got {max_segments!r}")
        for name, value in (("token_budget", token_budget), ("streams", streams)):  # None: backend default
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if min_window is not None and (not isinstance(min_window, int) or isinstance(min_window, bool)
                                       or min_window < 0):
            raise ValueError(f"min_window must be an int >= 0 (0: no windows), got {min_window!r}")
        self.max_segments = max_segments
        self.devices = list(devices or jax.local_devices())
        self.token_budget = token_budget or (
            CPU_TOKEN_BUDGET if self.devices[0].platform == "cpu" else ACCELERATOR_TOKEN_BUDGET)
        self.streams = streams or (CPU_STREAMS if self.devices[0].platform == "cpu" else 1)
        self.min_window = (CPU_MIN_WINDOW if self.devices[0].platform == "cpu" else 0) if min_window is None \
            else min_window
        if len(self.devices) > 1:
            mesh = Mesh(np.array(self.devices), ("data",))
            self._batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))  # replicated
        else:
            self._batch_sharding = self.devices[0]
            params = jax.device_put(params, self.devices[0])
        self.params = params
        self.attention_impl = resolve_attention_impl(attention_impl, self.devices[0].platform, self.dtype, config)
        self.compiled_shapes: set[tuple] = set()
        self.stats = {"texts": 0, "real_tokens": 0, "padded_tokens": 0, "batches": 0}

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def __repr__(self):
        return (f"Encoder({str(self.model_dir)!r}, layers={self.config.num_hidden_layers}, dim={self.dim}, "
                f"max_length={self.max_length}, pooling={self.pooling!r}, dtype={self.dtype.name}, "
                f"devices={len(self.devices)}, attention={self.attention_impl!r})")

    def _prompt(self, prompt_name, prompt) -> str:
        if prompt is not None and prompt_name is not None:
            raise ValueError("pass either prompt or prompt_name, not both")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        if prompt_name is None:
            prompt_name = self.default_prompt_name
            if prompt_name is None:
                return ""
        if prompt_name not in self.prompts:
            raise ValueError(f"unknown prompt_name {prompt_name!r}; known: {', '.join(sorted(self.prompts))}")
        return self.prompts[prompt_name]

    def tokenize(self, texts: Sequence[str], *, prompt_name=None, prompt=None) -> list[np.ndarray]:
        """Token ids per text, with the prompt prepended and truncation to max_length applied."""
        texts, _ = _check_texts(texts)
        p = self._prompt(prompt_name, prompt)
        return self.tokenizer([p + t for t in texts] if p else texts)

    def encode(self, texts, *, prompt_name: str | None = None, prompt: str | None = None, normalize: bool = True,
               batch_size: int | None = None, show_progress_bar: bool | None = None) -> np.ndarray:
        """Embeds texts: a list -> float32 [n, dim] in input order; a single str -> [dim].

        ``batch_size`` caps the texts (rows) per batch; by default batches are filled up to ``token_budget``
        tokens. With several JAX processes (``jax.distributed``), every process passes the same texts, embeds
        its contiguous share, and all get the merged result.
        """
        texts, single = _check_texts(texts)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        prefix = self._prompt(prompt_name, prompt)
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        n_proc = jax.process_count()
        if n_proc > 1:
            out = self._encode_multiprocess(texts, prefix, bool(normalize), batch_size, show_progress_bar)
        else:
            out = np.zeros((len(texts), self.dim), dtype=np.float32)
            self._run(texts, prefix, out, bool(normalize), batch_size, show_progress_bar)
        return out[0] if single else out

    def encode_queries(self, texts, **kw) -> np.ndarray:
        """``encode`` with prompt_name="query" (E5's "query: " prefix)."""
        return self.encode(texts, prompt_name="query", **kw)

    def encode_passages(self, texts, **kw) -> np.ndarray:
        """``encode`` with prompt_name="passage" (E5's "passage: " prefix)."""
        return self.encode(texts, prompt_name="passage", **kw)

    def _encode_multiprocess(self, texts, prefix, normalize, batch_size, show) -> np.ndarray:
        from jax.experimental import multihost_utils
        n, n_proc, rank = len(texts), jax.process_count(), jax.process_index()
        share = -(-n // n_proc)
        lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
        local = np.zeros((share, self.dim), dtype=np.float32)  # equal shapes for the all-gather
        self._run(texts[lo:hi], prefix, local, normalize, batch_size, show)
        merged = np.asarray(multihost_utils.process_allgather(local))  # [processes, share, dim]
        return merged.reshape(-1, self.dim)[:n]

    def layouts(self) -> list[tuple[int, int]]:
        """Candidate layouts as (pack length, min window): (0, 0) for padded batches, (n, 0) for packed rows of
        n tokens, and (n, min_window) for the same rows with attention windows."""
        out = [] if self.packing is True else [(0, 0)]
        if self.packing is not False and self.pooling in PACKED_MODES:
            lengths = [self.pack_length] if self.pack_length else sorted({min(n, self.max_length) for n in PACK_LENGTHS})
            out += [(n, w) for n in lengths for w in ((0, self.min_window) if self.min_window else (0,))]
        return out

    def _plan_kw(self, batch_size):
        return dict(max_length=self.max_length, token_budget=self.token_budget, max_rows=batch_size,
                    multiple=len(self.devices))

    def choose_layout(self, lengths, batch_size: int | None = None) -> tuple[int, int]:
        """The layout of ``layouts()`` whose batches for sequences of these lengths need the fewest multiply-adds
        (computed from the batch shapes alone; ties go to the earlier layout). Windows are weighed against
        whole rows because they can pack worse (small ``max_segments``)."""
        costs = {(n, w): forward_macs(self.config, planned_shapes(lengths, pack_length=n, min_window=w,
                                                                  max_segments=self.max_segments,
                                                                  **self._plan_kw(batch_size)))
                 for n, w in self.layouts()}
        return min(costs, key=costs.get)

    def plan(self, ids: list[np.ndarray], batch_size: int | None = None, layout: tuple[int, int] | None = None
             ) -> tuple[tuple[int, int], list[Batch]]:
        """(layout, batches) for these token sequences; layout None picks one with ``choose_layout``.

        "auto" packing weighs padded batches and packed rows of 128, 256 and 512 tokens (up to max_length),
        with and without attention windows.
        """
        if layout is None:
            layout = self.choose_layout([len(t) for t in ids], batch_size)
        kw = dict(self._plan_kw(batch_size), pad_id=self.tokenizer.pad_token_id)
        pack_length, min_window = layout
        if pack_length == 0:
            return layout, list(plan_padded(ids, **kw))
        return layout, list(plan_packed(ids, pack_length=pack_length, max_segments=self.max_segments,
                                        min_window=min_window, **kw))

    def _dispatch(self, batch: Batch, normalize: bool):
        put = functools.partial(jax.device_put, device=self._batch_sharding)
        self.compiled_shapes.add(batch.shape)
        if batch.packed:
            return embed_packed(self.params, put(batch.input_ids), put(batch.segment_ids), put(batch.position_ids),
                                config=self.config, pooling=self.pooling, normalize=normalize,
                                num_segments=batch.num_segments, attention_impl=self.attention_impl,
                                attention_window=batch.window)
        return embed_batch(self.params, put(batch.input_ids), put(batch.attention_mask), config=self.config,
                           pooling=self.pooling, normalize=normalize, attention_impl=self.attention_impl)

    def _run(self, texts: list[str], prefix: str, out: np.ndarray, normalize: bool, batch_size, show) -> None:
        """Embeds texts into out[:len(texts)]. A worker thread tokenises and plans chunk k+1 while the device
        runs chunk k; results are read IN_FLIGHT batches behind the dispatch, so the device queue never drains
        while the host copies results out. With ``streams`` > 1, that many threads each run one batch at a
        time (dispatch and read back), so that many batches compute at once."""
        bar = tqdm(total=len(texts), desc="embed", unit="text", disable=not show, file=sys.stderr)
        # A small first chunk gets the device busy sooner; its lengths choose the layout kept for the rest,
        # so that a corpus compiles a bounded set of shapes.
        starts = [0, *range(FIRST_CHUNK_TEXTS, len(texts), CHUNK_TEXTS)] if texts else []
        ends = starts[1:] + [len(texts)]

        def host_work(k: int, layout):
            ids = self.tokenizer([prefix + t for t in texts[starts[k]:ends[k]]])
            return self.plan(ids, batch_size, layout)

        def compute(batch: Batch):
            return np.asarray(self._dispatch(batch, normalize))

        streams = self.streams
        pending: collections.deque = collections.deque()
        with contextlib.ExitStack() as stack:
            stack.callback(bar.close)  # also when a batch raises: no stale bar left on stderr
            pool_ = stack.enter_context(concurrent.futures.ThreadPoolExecutor(1))
            compute_pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(streams)) if streams > 1 else None
            stack.callback(lambda: [f.cancel() for _, _, f in pending if isinstance(f, concurrent.futures.Future)])
            future = pool_.submit(host_work, 0, None) if starts else None
            for k, start in enumerate(starts):
                layout, batches = future.result()
                if k + 1 < len(starts):
                    future = pool_.submit(host_work, k + 1, layout)
                for batch in batches:
                    result = (compute_pool.submit(compute, batch) if compute_pool
                              else self._dispatch(batch, normalize))
                    pending.append((start, batch, result))
                    if len(pending) > IN_FLIGHT + streams - 1:
                        self._collect(*pending.popleft(), out, bar)
            while pending:
                self._collect(*pending.popleft(), out, bar)

    def _collect(self, start: int, batch: Batch, result, out: np.ndarray, bar) -> None:
        if isinstance(result, concurrent.futures.Future):
            result = result.result()
        out[start + batch.index] = np.asarray(result)[batch.slot]
        self.stats["texts"] += len(batch.index)
        self.stats["real_tokens"] += batch.real_tokens
        self.stats["padded_tokens"] += batch.input_ids.size
        self.stats["batches"] += 1
        bar.update(len(batch.index))


def load(model: str | os.PathLike, *, revision: str | None = None, dtype="float32", max_length: int | None = None,
         cache_dir=None, **engine) -> Encoder:
    """Loads an E5/BERT encoder from a local folder or a Hugging Face Hub id (``intfloat/e5-base-v2``).

    ``engine`` keywords go to ``Encoder``: token_budget, packing, pack_length, max_segments, min_window, devices,
    attention_impl, streams.
    """
    resolve_dtype(dtype)
    if os.environ.get(CACHE_ENV):
        enable_compilation_cache()
    model_dir = hub.resolve(model, revision=revision, cache_dir=cache_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    pooling = read_pooling_mode(model_dir)
    max_len = resolve_max_length(model_dir, config, max_length)
    tokenizer = WordPieceTokenizer.from_dir(model_dir, max_len)
    if tokenizer.vocab_size > config.vocab_size:
        raise E5LiteError(f"tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but config.json's "
                          f"vocab_size is {config.vocab_size}")
    prompts, default_prompt = read_prompts(model_dir)
    params = load_params(model_dir, config, dtype)
    return Encoder(model_dir, config, params, tokenizer, pooling=pooling, prompts=prompts,
                   default_prompt_name=default_prompt, dtype=dtype, **engine)
