"""Token sequences laid end to end: the buffer the tokenizer produces and the batch planner consumes.

A module of its own so that the tokenizer (tokenizer.py, fast_tokenizer.py) and the planner (batching.py)
share the type without the tokenizer importing the planner. ``e5lite.batching.Ragged`` names the same class.
"""

from __future__ import annotations

import numpy as np


class Ragged:
    """Token sequences laid end to end, with no Python object per sequence: ``ids`` [N] int32 and ``lengths``
    [n]; sequence i is ``ids[starts[i]:starts[i] + lengths[i]]``. Indexing gives that view (a slice gives a
    Ragged), ``take`` gathers a subset in one vectorised copy. The tokenizer produces them and the planner
    consumes them, so a corpus never becomes a list of millions of small arrays on its way to the device."""

    __slots__ = ("ids", "lengths", "starts")

    def __init__(self, ids, lengths):
        self.ids = np.asarray(ids, dtype=np.int32)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.starts = np.cumsum(self.lengths) - self.lengths

    @classmethod
    def of(cls, seqs) -> Ragged:
        """A Ragged of any sequence of token id sequences (a Ragged is returned as is)."""
        if isinstance(seqs, Ragged):
            return seqs
        lengths = np.fromiter((len(t) for t in seqs), np.int64, len(seqs))
        return cls(
            np.concatenate([np.asarray(t, np.int32) for t in seqs]) if len(seqs) else np.zeros(0, np.int32), lengths
        )

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return self.take(np.arange(lo, hi, step))
            end = self.starts[hi - 1] + self.lengths[hi - 1] if hi > lo else 0
            return Ragged(self.ids[self.starts[lo] if hi > lo else 0 : end], self.lengths[lo:hi])
        start = self.starts[i]
        return self.ids[start : start + self.lengths[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, index) -> Ragged:
        """The sequences at these positions, in this order, as a new (contiguous) Ragged."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[index]
        out_starts = np.cumsum(lengths) - lengths
        src = np.repeat(self.starts[index] - out_starts, lengths) + np.arange(int(lengths.sum()))
        return Ragged(self.ids[src], lengths)

    def tolist(self) -> list[np.ndarray]:
        """One int32 array (a view) per sequence."""
        return np.split(self.ids, np.cumsum(self.lengths)[:-1]) if len(self) else []
