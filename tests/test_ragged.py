"""Ragged (ragged.py): token sequences laid end to end, as the tokenizer hands them to the planner."""

from __future__ import annotations

import numpy as np

from e5lite.ragged import Ragged


def test_views_take_and_the_planners_name():
    from e5lite import batching
    assert batching.Ragged is Ragged  # `from e5lite.batching import Ragged` still works
    r = Ragged.of([np.arange(1, n + 1, dtype=np.int32) for n in (3, 1, 2)])
    assert len(r) == 3 and r[1].tolist() == [1] and r[1:].lengths.tolist() == [1, 2]
    assert [s.tolist() for s in r.take([2, 0])] == [[1, 2], [1, 2, 3]]
    assert [s.tolist() for s in r[::2]] == [[1, 2, 3], [1, 2]]
    assert [s.tolist() for s in r.tolist()] == [[1, 2, 3], [1], [1, 2]]
    assert Ragged.of(r) is r and len(Ragged.of([])) == 0 and Ragged.of([]).tolist() == []
