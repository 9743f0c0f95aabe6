"""Batch planning: token sequences -> a bounded set of padded or packed array shapes.

Two layouts, both fed to the same forward:
- padded: one text per row, rows right-padded to a length bucket (16, 32, 64, ... max_length);
- packed: several texts per row of ``pack_length`` tokens, with segment ids (1.., 0 = padding) and position
  ids restarting at 0 for each text; attention is block-diagonal and pooling per segment. With attention
  windows (``min_window``), short texts are packed so that none crosses a multiple of the batch's window
  (64, 128, ... pack_length), and attention runs on windows rather than whole rows.

Rows per batch come from a token budget (``budget // length``, capped by ``max_rows``); the last, smaller
batch of each length is padded to a short row ladder (powers of 4), so a corpus compiles at most two
shapes per length bucket (packed rows: per attention window in use, at most the windows' batches plus two).
Row counts are multiples of ``multiple`` (the number of devices).

The layout cost model sits here too: ``layouts`` lists the candidates (padded, packed rows of 128/256/512,
with or without windows), ``choose_layout`` keeps the one whose planned shapes need the fewest multiply-adds.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .ragged import Ragged

SEQ_BUCKETS = (16, 32, 64, 128, 256, 384, 512)
PACK_LENGTHS = (128, 256, 512)  # packed row lengths that packing="auto" weighs against each other


def seq_bucket(n: int, max_length: int) -> int:
    """The padded length for a batch whose longest sequence has n tokens."""
    for b in SEQ_BUCKETS:
        if n <= b <= max_length:
            return b
    return max_length


def full_rows(length: int, token_budget: int, max_rows: int | None, multiple: int = 1) -> int:
    """Rows of a full batch at this padded length: fills the token budget, a multiple of ``multiple``."""
    rows = max(1, token_budget // length)
    if max_rows is not None:
        rows = min(rows, max_rows)
    return max(multiple, rows // multiple * multiple)


def partial_rows(n: int, full: int, multiple: int = 1) -> int:
    """Rows for a last batch of n < full rows: the next step of the ladder multiple * 4^k, at most full."""
    r = multiple
    while r < n:
        r *= 4
    return min(r, full)


@dataclass
class Batch:
    """Arrays for one forward call, and where its results go.

    ``index[i]`` is the text (within the chunk) whose embedding is at flat slot ``slot[i]`` of the result:
    row ``slot`` for padded batches, ``row * num_segments + segment - 1`` for packed ones.
    """

    input_ids: np.ndarray  # [R, S] int32
    attention_mask: np.ndarray  # [R, S] int32
    index: np.ndarray  # [n] int64
    slot: np.ndarray  # [n] int64
    segment_ids: np.ndarray | None = None  # [R, S] int32, packed only
    position_ids: np.ndarray | None = None  # [R, S] int32, packed only
    num_segments: int = 0  # packed only: segments per row (static)
    real_tokens: int = 0
    window: int = 0  # packed only: no text crosses a multiple of this many positions

    @property
    def shape(self) -> tuple:
        return self.input_ids.shape + ((self.num_segments, self.window) if self.segment_ids is not None else ())

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None


def _scatter_plan(seqs: Ragged):
    """For sequences laid end to end: (all tokens, which sequence each token is from, its position in it)."""
    tokens = seqs.ids[seqs.starts[0] : seqs.starts[-1] + seqs.lengths[-1]] if len(seqs) else seqs.ids[:0]
    of = np.repeat(np.arange(len(seqs)), seqs.lengths)
    return tokens, of, np.arange(len(tokens)) - (seqs.starts - seqs.starts[:1])[of]


def padded_batch(ids, index, rows: int, length: int, pad_id: int) -> Batch:
    # One vectorised scatter rather than a Python loop per text: the host must keep up with a GPU.
    ids = Ragged.of(ids)
    tokens, of, pos = _scatter_plan(ids)
    dest = of * length + pos
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    input_ids.flat[dest] = tokens
    mask.flat[dest] = 1
    return Batch(
        input_ids, mask, np.asarray(index, np.int64), np.arange(len(ids), dtype=np.int64), real_tokens=len(tokens)
    )


def single_batch(seq, max_length: int, rows: int, pad_id: int) -> Batch:
    """The batch ``plan_padded`` makes of one sequence (``rows``: the device count), built directly: a query
    waits on this, and after a forward has flushed the CPU's caches each numpy call of the general planner is
    slow (BENCHMARKS.md, "One-query latency")."""
    n = len(seq)
    length = seq_bucket(n, max_length)
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    input_ids[0, :n] = seq
    mask[0, :n] = 1
    return Batch(input_ids, mask, np.zeros(1, np.int64), np.zeros(1, np.int64), real_tokens=n)


def packed_batch(
    seqs: Ragged,
    index,
    row_of: np.ndarray,
    offset: np.ndarray,
    rows: int,
    length: int,
    num_segments: int,
    pad_id: int,
    window: int,
) -> Batch:
    """Texts laid out in rows: ``seqs`` in row order, text j in row ``row_of[j]`` (non-decreasing) starting at
    position ``offset[j]`` of it."""
    row_of = np.asarray(row_of, np.int64)
    tokens, of, pos = _scatter_plan(seqs)
    first = np.searchsorted(row_of, np.arange(rows))  # index of each row's first text
    seg_of = np.arange(len(row_of)) - first[row_of]  # 0-based segment within its row
    dest = row_of[of] * length + np.asarray(offset, np.int64)[of] + pos
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    seg = np.zeros((rows, length), dtype=np.int32)
    position = np.zeros((rows, length), dtype=np.int32)
    input_ids.flat[dest] = tokens
    seg.flat[dest] = seg_of[of] + 1
    position.flat[dest] = pos
    return Batch(
        input_ids,
        (seg > 0).astype(np.int32),
        np.asarray(index, np.int64),
        row_of * num_segments + seg_of,
        seg,
        position,
        num_segments,
        len(tokens),
        window,
    )


def _split(n: int, full: int, multiple: int) -> Iterator[tuple[int, int, int]]:
    """(start, count, rows) of each batch when n items go in batches of ``full`` rows, the last on the ladder."""
    for start in range(0, n, full):
        count = min(full, n - start)
        yield start, count, (full if count == full else partial_rows(count, full, multiple))


def _buckets(lengths: np.ndarray, max_length: int):
    """Longest first: (bucket length, positions into lengths) for each length bucket in use."""
    order = np.argsort(-lengths, kind="stable")
    buckets = np.array([seq_bucket(int(n), max_length) for n in lengths[order]], np.int64)
    return [(length, order[buckets == length]) for length in sorted(set(buckets.tolist()), reverse=True)]


def plan_padded(
    ids,
    *,
    max_length: int,
    token_budget: int,
    max_rows: int | None = None,
    multiple: int = 1,
    pad_id: int = 0,
    index=None,
) -> Iterator[Batch]:
    """Padded batches, longest texts first; each length bucket fills rows up to the token budget. ``ids``: a
    Ragged or any sequence of token id sequences."""
    ids = Ragged.of(ids)
    index = np.arange(len(ids)) if index is None else np.asarray(index)
    for length, members in _buckets(ids.lengths, max_length):
        full = full_rows(length, token_budget, max_rows, multiple)
        for start, count, rows in _split(len(members), full, multiple):
            part = members[start : start + count]
            yield padded_batch(ids.take(part), index[part], rows, length, pad_id)


def planned_shapes(
    lengths: np.ndarray,
    *,
    pack_length: int,
    max_length: int,
    token_budget: int,
    max_segments: int,
    max_rows: int | None = None,
    multiple: int = 1,
    min_window: int | None = None,
) -> list[tuple[int, int, int]]:
    """(rows, length, attention window) of every batch that plan_padded (pack_length 0) or plan_packed would
    make for sequences of these lengths, without building the arrays: what "auto" packing weighs."""
    lengths = np.asarray(lengths, np.int64)
    packed = lengths <= pack_length if pack_length else np.zeros(len(lengths), bool)
    shapes = []
    for length, members in _buckets(lengths[~packed], max_length):
        full = full_rows(length, token_budget, max_rows, multiple)
        shapes += [(rows, length, length) for _, _, rows in _split(len(members), full, multiple)]
    if packed.any():
        _, row_windows = pack_windows(lengths[packed], pack_length, max_segments, windows_for(pack_length, min_window))
        full = full_rows(pack_length, token_budget, max_rows, multiple)
        shapes += [
            (rows, pack_length, max(row_windows[start : start + count]))
            for start, count, rows in _split(len(row_windows), full, multiple)
        ]
    return shapes


def windows_for(pack_length: int, min_window: int | None) -> list[int]:
    """Attention windows for rows of pack_length, ascending: pack_length and its halvings down to min_window
    (None or 0: the row only)."""
    out = [pack_length]
    while min_window and out[-1] % 2 == 0 and out[-1] // 2 >= min_window:
        out.append(out[-1] // 2)
    return out[::-1]


def pack_windows(
    lengths: np.ndarray, capacity: int, max_segments: int, windows: Sequence[int] = ()
) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """Best-fit-decreasing packing of sequences (each <= capacity) into rows of ``capacity`` in which no
    sequence crosses a multiple of the row's window.

    ``windows``: ascending, each dividing the next, the last == capacity (default: just capacity). Sequences
    go longest first, each into the open window-sized bin with the least room that still fits it; a new bin
    is the smallest window that holds it. Bins then fill rows, the small windows first; leftovers merge into
    the next window size. Returns the rows, each a list of (position into lengths, offset in the row) in row
    order, and each row's window, ascending. A row holds at most max_segments sequences.
    """
    windows = [w for w in windows if w < capacity and max_segments * w >= capacity] + [capacity]
    bins: list[tuple[int, list]] = []  # (window, [(position, offset in bin)])
    open_bins: list[tuple[int, int]] = []  # (room left, bin), sorted
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(open_bins, (n, -1))
        if k < len(open_bins):
            room, b = open_bins.pop(k)
        else:
            w = next(w for w in windows if w >= n)
            room, b = w, len(bins)
            bins.append((w, []))
        w, members = bins[b]
        members.append((i, w - room))
        room -= n
        # a bin of w holds at most its share of the row's segments, so a row of full bins stays in bounds
        if room > 0 and len(members) < max_segments * w // capacity:
            bisect.insort(open_bins, (room, b))
    rows: list[list[tuple[int, int]]] = []
    row_windows: list[int] = []
    carry: list[list] = []  # leftover units of the current window size, each [(position, offset in unit)]
    for j, w in enumerate(windows):
        units = [m for bw, m in bins if bw == w] + carry
        per_row = capacity // w
        full = len(units) // per_row * per_row
        for r in range(0, full, per_row):
            rows.append([(i, u * w + o) for u, unit in enumerate(units[r : r + per_row]) for i, o in unit])
            row_windows.append(w)
        rest = units[full:]
        if j + 1 < len(windows):
            f = windows[j + 1] // w
            carry = [
                [(i, u * w + o) for u, unit in enumerate(rest[r : r + f]) for i, o in unit]
                for r in range(0, len(rest), f)
            ]
    return [sorted(row, key=lambda m: m[1]) for row in rows], row_windows


def plan_packed(
    ids,
    *,
    pack_length: int,
    max_length: int,
    token_budget: int,
    max_segments: int,
    max_rows: int | None = None,
    multiple: int = 1,
    pad_id: int = 0,
    min_window: int | None = None,
) -> Iterator[Batch]:
    """Packed batches of rows of ``pack_length`` tokens; texts longer than that go in padded batches.

    ``min_window``: pack short texts into aligned windows of pack_length / 2^k >= min_window positions
    (None: whole rows); each batch's ``window`` is the largest of its rows'.
    """
    ids = Ragged.of(ids)
    lengths = ids.lengths
    long_ = np.flatnonzero(lengths > pack_length)
    if len(long_):
        yield from plan_padded(
            ids.take(long_),
            max_length=max_length,
            token_budget=token_budget,
            max_rows=max_rows,
            multiple=multiple,
            pad_id=pad_id,
            index=long_,
        )
    short = np.flatnonzero(lengths <= pack_length)
    if not len(short):
        return
    rows, row_windows = pack_windows(lengths[short], pack_length, max_segments, windows_for(pack_length, min_window))
    full = full_rows(pack_length, token_budget, max_rows, multiple)
    for start, count, n_rows in _split(len(rows), full, multiple):
        part = rows[start : start + count]
        members = short[np.fromiter((i for row in part for i, _ in row), np.int64)]
        offsets = np.fromiter((o for row in part for _, o in row), np.int64, len(members))
        row_of = np.repeat(np.arange(len(part)), [len(row) for row in part])
        yield packed_batch(
            ids.take(members),
            members,
            row_of,
            offsets,
            n_rows,
            pack_length,
            max_segments,
            pad_id,
            max(row_windows[start : start + count]),
        )


# ------------------------------------------------------------------------------------------- layout costing


def forward_macs(config, shapes: Iterable[tuple[int, int, int]]) -> float:
    """Multiply-adds of the forward of a BertConfig over batches of these (rows, length, attention window)
    shapes: linear layers plus attention scores and context."""
    d, f = config.hidden_size, config.intermediate_size
    total = 0.0
    for rows, s, w in shapes:
        total += rows * (s * (4 * d * d + 2 * d * f) + 2 * s * w * d)
    return total * config.num_hidden_layers


def layouts(
    packing, *, packable: bool, max_length: int, pack_length: int | None = None, min_window: int = 0
) -> list[tuple[int, int]]:
    """Candidate layouts as (pack length, min window): (0, 0) for padded batches, (n, 0) for packed rows of
    n tokens, and (n, min_window) for the same rows with attention windows. ``packing`` is "auto", True or
    False; ``packable``: the pooling mode works on packed rows."""
    out = [] if packing is True else [(0, 0)]
    if packing is not False and packable:
        lengths = [pack_length] if pack_length else sorted({min(n, max_length) for n in PACK_LENGTHS})
        out += [(n, w) for n in lengths for w in ((0, min_window) if min_window else (0,))]
    return out


def choose_layout(
    lengths, candidates: Sequence[tuple[int, int]], config, *, max_segments: int, **plan_kw
) -> tuple[int, int]:
    """The candidate layout whose batches for sequences of these lengths need the fewest multiply-adds
    (computed from the batch shapes alone; ties go to the earlier candidate). Windows are weighed against
    whole rows because they can pack worse (small ``max_segments``). ``plan_kw``: max_length, token_budget,
    max_rows, multiple, as for ``planned_shapes``."""
    costs = {
        (n, w): forward_macs(
            config, planned_shapes(lengths, pack_length=n, min_window=w, max_segments=max_segments, **plan_kw)
        )
        for n, w in candidates
    }
    return min(costs, key=costs.__getitem__)
