"""An ``Encoder`` call's inputs checked before any work: texts (a str, or a sequence of str with an order for
the results to follow) and token id sequences (flat ints, 1 to max_length of them, inside the vocabulary);
each error names the offending item.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np


def check_texts(texts: object) -> tuple[list[str], bool]:
    """``texts`` as a list of str, and whether a single str was given."""
    if isinstance(texts, str):
        return [texts], True
    if isinstance(texts, Mapping):
        raise TypeError(
            f"texts must be a str or a sequence of str, got a mapping ({type(texts).__name__}): "
            "pass list(d.values()) or list(d) explicitly"
        )
    if isinstance(texts, AbstractSet):
        raise TypeError(
            f"texts must be a str or a sequence of str, got a {type(texts).__name__}, which has no "
            "order for the results to follow: pass sorted(...) or a list"
        )
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
    return out, False


def check_ids(ids: object, max_length: int, vocab_size: int) -> list[np.ndarray]:
    """A list of token id sequences -> int32 arrays; errors name the sequence."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a list of token id sequences, got {type(ids).__name__}")
    out = []
    for i, seq in enumerate(ids):
        if isinstance(seq, (int, np.integer)):
            raise TypeError(f"ids[{i}] is an int: pass a list of sequences ([[101, 2054, 102]], not [101, ...])")
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise TypeError(f"ids[{i}] is {type(seq).__name__}, expected a sequence of token ids")
        arr = np.asarray(seq)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"ids[{i}] must be a flat sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
        if not 1 <= arr.size <= max_length:
            raise ValueError(f"ids[{i}] has {arr.size} tokens; expected 1 to {max_length} (max_length)")
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(
                f"ids[{i}] holds token id {int(arr.min() if arr.min() < 0 else arr.max())}, "
                f"outside the vocabulary [0, {vocab_size})"
            )
        out.append(arr.astype(np.int32, copy=False))
    return out
