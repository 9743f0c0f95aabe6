"""Flash-attention forward for BERT/E5 self-attention, written in Pallas.

What it is
----------
A fused ``softmax(q k^T, masked) v`` that never materialises the [S, T] score matrix in memory: one
kernel instance handles one (batch row, head, block of ``block_q`` query rows) and walks over blocks of
``block_k`` keys with an online softmax (running row max ``m`` and row sum ``row_sum`` in float32, output
accumulated in float32 and divided by ``row_sum`` at the end). Key blocks that cannot contribute to a query
block are skipped outright (no matmul, no exp).

Contract
--------
``flash_attention(q_BNSK, k_BNTK, v_BNTK, *, key_valid_BT=None, segment_ids_BS=None, block_q=128,
block_k=128, interpret=None, backend=None) -> ctx_BNSK``

- ``q`` is already scaled by ``1/sqrt(head_dim)``. q, k, v are [B, N, S, K] with the same shape
  (self-attention, S == T) and dtype (float32 or bfloat16); K in :data:`SUPPORTED_HEAD_DIMS`.
- Query s may attend key t iff ``key_valid[b, t]`` and, when ``segment_ids`` [B, S] is given,
  ``segment_ids[b, s] == segment_ids[b, t]`` (packed rows). ``key_valid=None`` means all keys are valid,
  or ``segment_ids > 0`` when segment ids are given (0 = padding). :func:`reference_attention` is the
  exact definition (logits masked to ``finfo(float32).min``, softmax in float32, probabilities cast to
  v's dtype, then ``probs @ v``).
- Logits, softmax statistics and the accumulator are float32; the result is in q's dtype. For float32
  inputs both matmuls run at ``Precision.HIGHEST`` (no TF32 / bf16 passes).
- A query row with no allowed key (a padding row) gets finite output: zeros here, the mean of v in the
  reference. Only rows with at least one allowed key are specified.
- Block sizes: multiples of 8 (bf16 on TPU: of 16; GPU: powers of two >= 16). A block larger than the
  sequence is shrunk to the (rounded-up) sequence length. If the blocks do not divide S, q/k/v and the
  mask are padded internally up to a multiple of both (padded keys are invalid, padded query rows are
  dropped), so any S works; bucketed lengths (16 ... 512, 384) never pad with the default blocks.

Backends
--------
``"gpu"`` lowers through Pallas' Triton backend, ``"tpu"`` through Mosaic, ``"cpu"`` runs the kernel in
Pallas interpret mode (``interpret=None`` means True on CPU and False elsewhere; ``interpret=True`` works
on any backend). ``backend=None`` (with ``interpret=None``) chooses when the program is *lowered*, by
``lax.platform_dependent``: Mosaic for a TPU, Triton for a GPU, interpret mode for a CPU, whatever machine
traced it - so a program exported for ``"tpu"`` on a CPU holds the Mosaic kernel. Blocks are checked
against the rules of the machine's own backend (a ValueError as before); a platform whose rules they
break gets no branch, and lowering for it fails. One kernel body serves all three; the wrapper only
varies the per-block metadata placement (SMEM on TPU) and compiler params.

Block skipping
--------------
Outside the kernel (plain jnp, cheap) the wrapper computes for each query block the range
``[min, max]`` of segment ids over its rows that have at least one allowed key, and for each key block
the range over its *valid* keys (no segment ids: all ids are 0, so a key block is live iff it holds a
valid key, which covers right padding - no prefix assumption is made). A (query block, key block)
pair is needed iff the two ranges overlap (see :func:`block_needed`); empty ranges overlap nothing.
The kernel loops only from the first to the last needed key block of its query block and guards each
step with ``lax.cond`` on the overlap test, so gaps (non-contiguous ids) are skipped too. Per-element
masking inside visited blocks keeps the result exact; skipping only removes work. For a packed row
of many short sequences this turns the S x T work into roughly a band around the diagonal.

Gradients
---------
:func:`flash_attention` is a ``jax.custom_vjp``. The forward pass is the kernel; the backward pass does
NOT use a fused kernel: it recomputes attention with :func:`reference_attention` and differentiates that
with ``jax.vjp`` (materialising [B, N, S, T] scores). Gradients therefore equal the reference's exactly,
at the reference's memory cost - fine for fine-tuning-sized experiments, not a memory-efficient backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "block_needed",
    "flash_attention",
    "flash_attention_visits",
    "reference_attention",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_BACKENDS = ("cpu", "gpu", "tpu")
_MASK_VALUE = float(np.finfo(np.float32).min)  # as transformers' additive mask; keeps padding rows finite
_I32_MAX = int(np.iinfo(np.int32).max)
_I32_MIN = int(np.iinfo(np.int32).min)


def _precision(dtype):
    # float32 inputs promise float32 matmuls: no TF32 on GPUs, no bf16 passes on TPUs.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# ----------------------------------------------------------------------------------------------------
# Reference


def _canonical_mask(B: int, S: int, T: int, key_valid_BT, segment_ids_BS):
    """-> (key_valid bool [B, T], segment ids int32 [B, S] or None) with the documented defaults."""
    seg = None if segment_ids_BS is None else jnp.asarray(segment_ids_BS).astype(jnp.int32)
    if key_valid_BT is not None:
        kv = jnp.asarray(key_valid_BT)
        valid = kv if kv.dtype == jnp.bool_ else kv != 0
    elif seg is not None:
        valid = seg > 0
    else:
        valid = jnp.ones((B, T), jnp.bool_)
    return valid, seg


def reference_attention(q_BNSK, k_BNTK, v_BNTK, *, key_valid_BT=None, segment_ids_BS=None):
    """The definition the kernel implements, in plain jnp (materialises [B, N, S, T] logits).

    allowed[b, s, t] = key_valid[b, t] & (segment_ids[b, s] == segment_ids[b, t] if segment ids given);
    logits (float32) outside ``allowed`` become finfo(float32).min; softmax in float32; probabilities cast
    to v's dtype; ``probs @ v``. q is pre-scaled. A row with no allowed key yields the mean of v.
    """
    B, _, S, _ = q_BNSK.shape
    T = k_BNTK.shape[2]
    valid_BT, seg_BS = _canonical_mask(B, S, T, key_valid_BT, segment_ids_BS)
    allowed = valid_BT[:, None, None, :]
    if seg_BS is not None:
        allowed = allowed & (seg_BS[:, None, :, None] == seg_BS[:, None, None, :])
    prec = _precision(q_BNSK.dtype)
    logits = jnp.einsum("BNSK,BNTK->BNST", q_BNSK, k_BNTK, precision=prec, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BNTK.dtype)
    return jnp.einsum("BNST,BNTK->BNSK", probs, v_BNTK, precision=prec)


# ----------------------------------------------------------------------------------------------------
# Block tables (plain jnp, outside the kernel)


def _rows_with_keys(valid_BT, seg_BS, S: int):
    """bool [B, S]: query rows that have at least one allowed key."""
    if seg_BS is None:
        return jnp.broadcast_to(jnp.any(valid_BT, axis=1, keepdims=True), (valid_BT.shape[0], S))
    same = seg_BS[:, :, None] == seg_BS[:, None, :]
    return jnp.any(same & valid_BT[:, None, :], axis=2)


def _segment_ranges(seg_BX, live_BX, block: int):
    """Per block of ``block`` positions: (min, max) of seg over live positions; empty -> (I32_MAX, I32_MIN)."""
    B, X = seg_BX.shape
    seg = seg_BX.reshape(B, X // block, block)
    live = live_BX.reshape(B, X // block, block)
    lo = jnp.min(jnp.where(live, seg, _I32_MAX), axis=2)
    hi = jnp.max(jnp.where(live, seg, _I32_MIN), axis=2)
    return lo, hi


def _block_tables(valid_BT, seg_BS, q_live_BS, block_q: int, block_k: int):
    """-> (qmin, qmax [B, nq], kmin, kmax [B, nk], needed bool [B, nq, nk]) - what the kernel consults."""
    seg = jnp.zeros(valid_BT.shape, jnp.int32) if seg_BS is None else seg_BS
    qmin, qmax = _segment_ranges(seg, q_live_BS, block_q)
    kmin, kmax = _segment_ranges(seg, valid_BT, block_k)
    needed = jnp.maximum(qmin[:, :, None], kmin[:, None, :]) <= jnp.minimum(qmax[:, :, None], kmax[:, None, :])
    return qmin, qmax, kmin, kmax, needed


def block_needed(key_valid_BT, segment_ids_BS=None, *, block_q: int = 128, block_k: int = 128):
    """bool [B, S // block_q, T // block_k]: which (query block, key block) pairs the kernel computes.

    Same inputs as :func:`flash_attention`, except that ``key_valid_BT`` [B, T] is required (pass
    ``segment_ids_BS > 0`` or all-True to mimic the None default) and the blocks must divide T. A pair is
    needed iff the segment-id range of the query block's rows that have an allowed key overlaps the
    segment-id range of the key block's valid keys. It covers every allowed (s, t) pair; for contiguous,
    increasing segments (packed rows) it is exactly the set of block pairs holding an allowed pair.
    """
    B, T = jnp.shape(key_valid_BT)
    valid, seg = _canonical_mask(B, T, T, key_valid_BT, segment_ids_BS)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk <= 0 or T % blk:
            raise ValueError(f"{name}={blk} must be a positive divisor of the sequence length {T}")
    q_live = _rows_with_keys(valid, seg, T)
    return _block_tables(valid, seg, q_live, block_q, block_k)[-1]


# ----------------------------------------------------------------------------------------------------
# Kernel


@dataclasses.dataclass(frozen=True)
class _Config:
    block_q: int
    block_k: int
    backend: str
    interpret: bool
    count_visits: bool = False  # tests only: a second output counting the key blocks each query block computed


@dataclasses.dataclass(frozen=True)
class _PerPlatform:
    """backend=None: a _Config per lowering platform, as ``lax.platform_dependent`` names them."""

    configs: tuple[tuple[str, _Config], ...]

    def counting_visits(self) -> _PerPlatform:
        return _PerPlatform(tuple((p, dataclasses.replace(c, count_visits=True)) for p, c in self.configs))


# lax.platform_dependent's platform names -> the kernel's backends
_PLATFORM_BACKENDS = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


@dataclasses.dataclass(frozen=True)
class _MetaLayout:
    """Offsets into the flat int32 metadata vector: 4 [B * nq] tables, then 2 [B * nk] tables."""

    B: int
    nq: int
    nk: int

    def offsets(self):
        """Start of each table: lo, hi, qmin, qmax (B * nq each), kmin, kmax (B * nk each)."""
        q, k = self.B * self.nq, self.B * self.nk
        return dict(lo=0, hi=q, qmin=2 * q, qmax=3 * q, kmin=4 * q, kmax=4 * q + k)

    @property
    def size(self) -> int:  # rounded up to a power of two: Triton wants power-of-two shapes
        return pl.next_power_of_2(4 * self.B * self.nq + 2 * self.B * self.nk)


def _attention_kernel(
    meta_ref,
    q_ref,
    k_ref,
    v_ref,
    kvalid_ref,
    *refs,
    layout: _MetaLayout,
    block_q: int,
    block_k: int,
    has_segments: bool,
    precision,
):
    """One (batch row b, head, query block i): online softmax over the needed key blocks.

    Refs: meta [M] int32 (whole), q [bq, K], k/v [T, K] (whole row), kvalid [1, T] int32,
    (qseg [bq, 1], kseg [1, T] int32 when segmented), out [bq, K], and with ``count_visits`` visits [bq, 1]
    int32.
    """
    qseg_ref, kseg_ref = refs[:2] if has_segments else (None, None)
    o_ref, visits_ref = (*refs[2 * has_segments :], None)[:2]
    off = layout.offsets()
    b = pl.program_id(0)
    qi = b * layout.nq + pl.program_id(2)
    lo = meta_ref[off["lo"] + qi]
    hi = meta_ref[off["hi"] + qi]
    q_min = meta_ref[off["qmin"] + qi]
    q_max = meta_ref[off["qmax"] + qi]
    q = q_ref[...]
    shape = (block_q, block_k)
    q_seg = jnp.broadcast_to(qseg_ref[...], shape) if has_segments else None

    def visit(j, carry):
        acc, m, row_sum, visits = carry
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32)
        allowed = jnp.broadcast_to(kvalid_ref[:, pl.ds(start, block_k)], shape) != 0
        if has_segments:
            allowed = allowed & (q_seg == jnp.broadcast_to(kseg_ref[:, pl.ds(start, block_k)], shape))
        return (*_softmax_step(acc, m, row_sum, s, allowed, v, precision), visits + 1)

    def step(j, carry):
        kj = b * layout.nk + j
        k_min = meta_ref[off["kmin"] + kj]
        k_max = meta_ref[off["kmax"] + kj]
        needed = jnp.maximum(q_min, k_min) <= jnp.minimum(q_max, k_max)
        return lax.cond(needed, visit, lambda _, c: c, j, carry)

    acc, _, row_sum, visits = lax.fori_loop(lo, hi, step, _initial_carry(block_q, q_ref.shape[-1]))
    # Rows that saw no allowed key have row_sum == 0 and acc == 0: emit zeros, not 0/0.
    row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / row_sum).astype(o_ref.dtype)
    if visits_ref is not None:
        visits_ref[...] = jnp.full((block_q, 1), visits, jnp.int32)


def _initial_carry(block_q: int, K: int):
    """(output [bq, K], row max and row sum [bq, 1], key blocks visited) before the first key block."""
    return (
        jnp.zeros((block_q, K), jnp.float32),
        jnp.full((block_q, 1), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.int32(0),
    )


def _softmax_step(acc, m, row_sum, s, allowed, v, precision):
    """One key block into the running output ``acc`` [bq, K], row max ``m`` and row sum ``row_sum`` [bq, 1]:
    ``s`` [bq, bk] the block's scores, ``allowed`` its mask, ``v`` [bk, K] its values."""
    s = jnp.where(allowed, s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m - m_new)
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    row_sum = correction * row_sum + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )  # [bq, K]
    return correction * acc + pv, m_new, row_sum


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _meta(valid_BT, seg_BS, q_live, bq: int, bk: int, layout: _MetaLayout):
    """The kernel's per-block table (see ``_MetaLayout``): each query block's first and last needed key block
    and segment range, and each key block's segment range, as one int32 vector."""
    qmin, qmax, kmin, kmax, needed = _block_tables(valid_BT, seg_BS, q_live, bq, bk)
    any_needed = jnp.any(needed, axis=2)
    first = jnp.where(any_needed, jnp.argmax(needed, axis=2), 0)
    last = jnp.where(any_needed, layout.nk - jnp.argmax(needed[:, :, ::-1], axis=2), 0)
    meta = jnp.concatenate([t.reshape(-1).astype(jnp.int32) for t in (first, last, qmin, qmax, kmin, kmax)])
    return jnp.pad(meta, (0, layout.size - meta.shape[0]))


def _backend_specs(cfg: _Config, layout: _MetaLayout, K: int) -> tuple[pl.BlockSpec, pl.CompilerParams | None]:
    """The meta table's BlockSpec and the compiler parameters of ``cfg.backend``."""
    if cfg.backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        meta_spec = pl.BlockSpec(memory_space=pltpu.SMEM)  # scalars: whole vector in SMEM
        return meta_spec, pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    meta_spec = pl.BlockSpec((layout.size,), lambda b, n, i: (0,))
    if cfg.backend == "gpu" and not cfg.interpret:
        from jax.experimental.pallas import triton as plgpu

        return meta_spec, plgpu.CompilerParams(num_warps=4 if K <= 64 else 8, num_stages=2)
    return meta_spec, None


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, k, v, valid_BT, seg_BS, cfg: _Config):
    """Kernel launch -> ctx [B, N, S, K], or with ``cfg.count_visits`` (ctx, visits int32 [B, N, nq] = key blocks
    computed per query block)."""
    B, N, S, K = q.shape
    bq, bk = cfg.block_q, cfg.block_k
    S_pad = _round_up(S, math.lcm(bq, bk))
    nq, nk = S_pad // bq, S_pad // bk
    has_segments = seg_BS is not None

    q_live = _rows_with_keys(valid_BT, seg_BS, S)
    if S_pad != S:
        pad = S_pad - S
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
        valid_BT = jnp.pad(valid_BT, ((0, 0), (0, pad)))
        q_live = jnp.pad(q_live, ((0, 0), (0, pad)))
        if has_segments:
            seg_BS = jnp.pad(seg_BS, ((0, 0), (0, pad)))

    layout = _MetaLayout(B, nq, nk)
    meta = _meta(valid_BT, seg_BS, q_live, bq, bk, layout)

    kvalid_B1T = valid_BT.astype(jnp.int32)[:, None, :]
    row_spec = pl.BlockSpec((None, 1, S_pad), lambda b, n, i: (b, 0, 0))
    qrow_spec = pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0))
    q_spec = pl.BlockSpec((None, None, bq, K), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, S_pad, K), lambda b, n, i: (b, n, 0, 0))
    meta_spec, compiler_params = _backend_specs(cfg, layout, K)
    inputs = [meta, q, k, v, kvalid_B1T]
    in_specs = [meta_spec, q_spec, kv_spec, kv_spec, row_spec]
    if has_segments:
        inputs += [seg_BS[:, :, None], seg_BS[:, None, :]]
        in_specs += [qrow_spec, row_spec]
    kernel = functools.partial(
        _attention_kernel,
        layout=layout,
        block_q=bq,
        block_k=bk,
        has_segments=has_segments,
        precision=_precision(q.dtype),
    )
    out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct((B, N, S_pad, K), q.dtype)]
    if cfg.count_visits:
        out_specs.append(pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, N, S_pad, 1), jnp.int32))
    outs = pl.pallas_call(
        kernel,
        grid=(B, N, nq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=compiler_params,
        name="e5lite_flash_attention",
    )(*inputs)
    if cfg.count_visits:
        return outs[0][:, :, :S], outs[1][:, :, ::bq, 0]
    return outs[0][:, :, :S]


def _launch(q, k, v, valid_BT, seg_BS, cfg: _Config | _PerPlatform):
    """``_forward`` with ``cfg``, or with the config of the platform the program is lowered for."""
    if isinstance(cfg, _Config):
        return _forward(q, k, v, valid_BT, seg_BS, cfg)
    # Every branch is traced; only the lowering platform's is lowered (so a CPU never lowers Mosaic). Platforms
    # with equal configs share one callable, which platform_dependent joins into one branch.
    branches: dict[_Config, functools.partial] = {}
    per_platform = {p: branches.setdefault(c, functools.partial(_forward, cfg=c)) for p, c in cfg.configs}
    return lax.platform_dependent(q, k, v, valid_BT, seg_BS, **per_platform)


# ----------------------------------------------------------------------------------------------------
# Public API


def _resolve_backend(backend, interpret):
    if backend is None:
        backend = jax.default_backend()
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {_BACKENDS} or None")
    if interpret is None:
        interpret = backend == "cpu"
    if not isinstance(interpret, (bool, np.bool_)):
        raise ValueError(f"interpret={interpret!r} must be True, False or None")
    if backend == "cpu" and not interpret:
        raise ValueError("backend='cpu' has no compiled Pallas lowering; use interpret=True (or None)")
    return backend, bool(interpret)


def _resolve_block(name: str, block, S: int, dtype, backend: str) -> int:
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block <= 0:
        raise ValueError(f"{name}={block!r} must be a positive int")
    block = int(block)
    gran = 16 if (backend == "tpu" and dtype == jnp.bfloat16) else 8
    if block % gran:
        raise ValueError(
            f"{name}={block} must be a multiple of {gran} (dtype {jnp.dtype(dtype).name}, backend {backend!r})"
        )
    if backend == "gpu" and (block < 16 or block & (block - 1)):
        raise ValueError(f"{name}={block} must be a power of two >= 16 on the GPU (Triton) backend")
    # A block longer than the sequence shrinks to it (rounded up to the granule / a power of two).
    cap = max(16, pl.next_power_of_2(S)) if backend == "gpu" else _round_up(S, gran)
    return min(block, cap)


def _prepare(q, k, v, key_valid_BT, segment_ids_BS, block_q, block_k, interpret, backend):
    auto = backend is None and interpret is None  # chosen per lowering platform (module docstring, Backends)
    backend, interpret = _resolve_backend(backend, interpret)
    for name, x in (("q_BNSK", q), ("k_BNTK", k), ("v_BNTK", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must be 4-D [B, N, S, K], got shape {jnp.shape(x)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape [B, N, S, K] (self-attention), got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype out of float32 / bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, N, S, K = q.shape
    if K not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={K} is not supported; expected one of {SUPPORTED_HEAD_DIMS}")
    if S == 0:
        raise ValueError("sequence length must be positive, got S=0")
    if key_valid_BT is not None and jnp.shape(key_valid_BT) != (B, S):
        raise ValueError(f"key_valid_BT must have shape [B, T] = {(B, S)}, got {jnp.shape(key_valid_BT)}")
    if segment_ids_BS is not None:
        if jnp.shape(segment_ids_BS) != (B, S):
            raise ValueError(f"segment_ids_BS must have shape [B, S] = {(B, S)}, got {jnp.shape(segment_ids_BS)}")
        if not jnp.issubdtype(jnp.result_type(segment_ids_BS), jnp.integer):
            raise ValueError(f"segment_ids_BS must be integer, got {jnp.result_type(segment_ids_BS)}")
    here = _Config(*_blocks(block_q, block_k, S, q.dtype, backend), backend, interpret)
    valid, seg = _canonical_mask(B, S, S, key_valid_BT, segment_ids_BS)
    return valid, seg, (_per_platform(here, block_q, block_k, S, q.dtype) if auto else here)


def _blocks(block_q, block_k, S: int, dtype, backend: str) -> tuple[int, int]:
    return _resolve_block("block_q", block_q, S, dtype, backend), _resolve_block("block_k", block_k, S, dtype, backend)


def _per_platform(here: _Config, block_q, block_k, S: int, dtype) -> _PerPlatform:
    """A config per platform whose block rules ``block_q`` / ``block_k`` meet (compiled, or interpreted on
    CPU); ``here`` (this machine's, checked already) for its own backend."""
    configs = []
    for platform, backend in _PLATFORM_BACKENDS.items():
        if backend == here.backend:
            configs.append((platform, here))
            continue
        try:
            blocks = _blocks(block_q, block_k, S, dtype, backend)
        except ValueError:
            continue  # e.g. blocks of 24 on a GPU: lowering for it finds no branch, the run here is unaffected
        configs.append((platform, _Config(*blocks, backend, interpret=backend == "cpu")))
    return _PerPlatform(tuple(configs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, valid_BT, seg_BS, cfg):
    return _launch(q, k, v, valid_BT, seg_BS, cfg)


def _flash_fwd(q, k, v, valid_BT, seg_BS, cfg):
    return _launch(q, k, v, valid_BT, seg_BS, cfg), (q, k, v, valid_BT, seg_BS)


def _flash_bwd(cfg, residuals, g):
    # Fallback: differentiate the plain-jnp reference (materialises [B, N, S, T]); no fused backward.
    q, k, v, valid_BT, seg_BS = residuals
    _, vjp = jax.vjp(
        lambda q, k, v: reference_attention(q, k, v, key_valid_BT=valid_BT, segment_ids_BS=seg_BS), q, k, v
    )
    return (*vjp(g), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_BNSK,
    k_BNTK,
    v_BNTK,
    *,
    key_valid_BT=None,
    segment_ids_BS=None,
    block_q: int = 128,
    block_k: int = 128,
    interpret=None,
    backend=None,
):
    """Masked self-attention ``softmax(q k^T) v`` -> ctx [B, N, S, K] in q's dtype (Pallas kernel).

    Args:
      q_BNSK, k_BNTK, v_BNTK: [B, N, S, K], S == T, float32 or bfloat16; q pre-scaled by 1/sqrt(K).
      key_valid_BT: bool [B, T] (or int, nonzero = valid); None -> all valid, or ``segment_ids > 0``.
      segment_ids_BS: int [B, S] for packed rows: attention only within equal ids.
      block_q, block_k: query / key tile sizes (see module docstring for the rules).
      interpret: run in Pallas interpret mode; None -> True on CPU only.
      backend: "cpu" | "gpu" | "tpu" | None (with interpret None: the platform lowered for; else
        ``jax.default_backend()``).

    Rows with at least one allowed key match :func:`reference_attention`; rows with none are zeros.
    Differentiable: the VJP recomputes through :func:`reference_attention` (no fused backward).
    Raises ValueError for unsupported shapes, dtypes, head dims, block sizes or backends.
    """
    valid, seg, cfg = _prepare(
        q_BNSK, k_BNTK, v_BNTK, key_valid_BT, segment_ids_BS, block_q, block_k, interpret, backend
    )
    return _flash(q_BNSK, k_BNTK, v_BNTK, valid, seg, cfg)


def flash_attention_visits(
    q_BNSK,
    k_BNTK,
    v_BNTK,
    *,
    key_valid_BT=None,
    segment_ids_BS=None,
    block_q: int = 128,
    block_k: int = 128,
    interpret=None,
    backend=None,
):
    """Debug/test twin of :func:`flash_attention` (forward only): returns ``(ctx, visits)`` where
    ``visits`` int32 [B, N, nq] counts the key blocks the kernel actually computed for each query block
    (the blocks after shrinking; nq = padded S // block_q). With skipping it equals
    ``block_needed(...).sum(-1)`` per head; without skipping it would be nk everywhere."""
    valid, seg, cfg = _prepare(
        q_BNSK, k_BNTK, v_BNTK, key_valid_BT, segment_ids_BS, block_q, block_k, interpret, backend
    )
    counting = cfg.counting_visits() if isinstance(cfg, _PerPlatform) else dataclasses.replace(cfg, count_visits=True)
    return _launch(q_BNSK, k_BNTK, v_BNTK, valid, seg, counting)
