"""Inputs past the maximum length, embedded whole: ``split`` them into windows, embed every window, ``combine``.

The procedure (``encode(..., long_inputs="chunk")``, the CLI's and the server's ``--long-inputs chunk``):

1. A text that fits (its prompted ids, untruncated, are at most ``max_length`` tokens) is one window: exactly
   the ids the truncating path embeds, so its vector is unchanged.
2. A longer text, without its prompt, is tokenised without special tokens and without truncation, and cut
   into windows of ``W = max_length - (special tokens, 2 for [CLS] ... [SEP]) - (prompt tokens)`` tokens;
   consecutive windows share ``overlap`` tokens (``0 <= overlap < W``), and the last one ends at the text's
   end (it may be shorter). Each window is embedded as ``specials before + prompt ids + window ids + specials
   after`` (``[CLS] query : ... [SEP]``), the prompt's ids being the prompt tokenised alone without specials.
   For E5's prompts on WordPiece (and any prompt ending in whitespace or punctuation there) ``prompt ids +
   text ids`` equals the ids of ``prompt + text``, so the first window is the truncating path's ids.
3. The text's vector is the mean of its windows' pooled, un-normalised vectors weighted by each window's
   token count (the length of its full ids, specials and prompt included: the tokens that window's mean
   pooling averaged over, so for mean pooling without overlap this is the mean over every embedded token),
   then L2-normalised if asked.

``split`` and ``combine`` are pure: embed ``windows.ids`` with ``normalize=False`` in between (``Encoder.
embed_ids``), in any batches. ``pipeline.py`` runs them for ``encode``, corpus runs and the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .quantize import l2_normalize_np

LONG_INPUTS = ("truncate", "chunk")


def check_long_inputs(long_inputs, overlap) -> str:
    """Errors for a bad ``long_inputs`` / ``chunk_overlap`` pair, named (the bound on overlap is ``split``'s)."""
    if long_inputs not in LONG_INPUTS:
        raise ValueError(f"long_inputs must be one of {', '.join(map(repr, LONG_INPUTS))}, got {long_inputs!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)):
        raise TypeError(f"chunk_overlap must be an int, got {type(overlap).__name__} {overlap!r:.40}")
    if overlap < 0:
        raise ValueError(f"chunk_overlap must be >= 0, got {overlap}")
    if overlap and long_inputs != "chunk":
        raise ValueError(f"chunk_overlap={overlap} needs long_inputs='chunk' (with 'truncate' there are no windows)")
    return long_inputs


class OverlapTooLarge(ValueError):
    """A chunk overlap that leaves a window no new tokens. Its message names the Python parameters; the CLI
    re-words it with its flags (``named``), since the same check serves both."""

    def __init__(self, overlap: int, width: int, max_length: int, specials: int, prompt: int):
        self.overlap, self.width, self.max_length = overlap, width, max_length
        self.specials, self.prompt = specials, prompt
        super().__init__(self.named("chunk_overlap", "max_length"))

    def __reduce__(self):  # pickled (a process pool, Ray) with its fields, not its message
        return type(self), (self.overlap, self.width, self.max_length, self.specials, self.prompt)

    def named(self, overlap: str, max_length: str) -> str:
        """The message with these names for the overlap and the max length (parameters or flags)."""
        return (
            f"{overlap} must be less than the window of {self.width} text tokens ({max_length} {self.max_length} "
            f"- {self.specials} special tokens - {self.prompt} prompt tokens), got {self.overlap}: lower "
            f"{overlap} or raise {max_length}"
        )


@dataclass(frozen=True)
class Windows:
    """The windows of ``n`` texts: ``ids`` the full ids of every window (int32; texts in order, a text's
    windows consecutive), ``owner`` [len(ids)] int64 the text each window belongs to, ``weight``
    [len(ids)] float32 its token count (``len(ids[k])``), which weights it in ``combine``."""

    ids: list[np.ndarray]
    owner: np.ndarray
    weight: np.ndarray
    n: int

    @property
    def counts(self) -> np.ndarray:
        """Windows per text [n] (1 for a text that fits)."""
        return np.bincount(self.owner, minlength=self.n)


def window_length(tokenizer, prompt_len: int) -> int:
    """W: the text tokens a window holds beside the specials and the prompt."""
    before, after = tokenizer.special_ids
    return tokenizer.max_length - len(before) - len(after) - prompt_len


def split_ids(body: np.ndarray, width: int, overlap: int) -> list[np.ndarray]:
    """``body`` cut into windows of ``width`` tokens, consecutive ones sharing ``overlap``, the last ending at
    the end (every window starts ``width - overlap`` after the previous one; none lies inside the one before)."""
    step = width - overlap
    starts = [0]
    while starts[-1] + width < len(body):
        starts.append(starts[-1] + step)
    return [body[s : s + width] for s in starts]


def split(tokenizer, texts: Sequence[str], prefix: str = "", overlap: int = 0, offset: int = 0) -> Windows:
    """The windows of ``texts`` with the prompt ``prefix`` (see the module docstring). ``tokenizer`` is the
    Encoder's ``TextTokenizer``; ``offset`` is the index of texts[0] in the caller's list, for errors naming a
    text. A text that fits costs one ordinary (fast, truncating) tokenisation; only the ones that reach
    ``max_length`` there are tokenised again without truncation."""
    texts = list(texts)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(f"chunk_overlap must be an int >= 0, got {overlap!r:.40}")
    before, after = tokenizer.special_ids
    prompt = tokenizer.body_ids([prefix])[0] if prefix else np.zeros(0, np.int32)
    width = window_length(tokenizer, len(prompt))
    if width < 1:
        raise ValueError(
            f"the prompt {prefix!r:.60} takes {len(prompt)} tokens, which with the "
            f"{len(before) + len(after)} special tokens leaves no room for text in "
            f"max_length={tokenizer.max_length}"
        )
    if overlap >= width:
        raise OverlapTooLarge(overlap, width, tokenizer.max_length, len(before) + len(after), len(prompt))
    full = tokenizer.encode_ragged([prefix + t for t in texts] if prefix else texts, offset=offset)
    # Truncated to max_length: only a text that reaches it can be longer; its untruncated count decides.
    maybe = np.flatnonzero(full.lengths >= tokenizer.max_length)
    long = set()
    if len(maybe):
        untruncated = tokenizer.body_ids([prefix + texts[i] for i in maybe], offset=offset)
        long = {
            int(i)
            for i, b in zip(maybe, untruncated, strict=True)
            if len(b) + len(before) + len(after) > tokenizer.max_length
        }
    heads, tails = np.asarray(before, np.int32), np.asarray(after, np.int32)
    bodies = (
        dict(zip(sorted(long), tokenizer.body_ids([texts[i] for i in sorted(long)], offset=offset), strict=True))
        if long
        else {}
    )
    ids, owner = [], []
    for i in range(len(texts)):
        if i in long:
            parts = [
                np.concatenate([heads, prompt, w, tails]).astype(np.int32) for w in split_ids(bodies[i], width, overlap)
            ]
        else:
            parts = [np.asarray(full[i], np.int32)]
        ids.extend(parts)
        owner.extend([i] * len(parts))
    weight = np.fromiter((len(w) for w in ids), np.float32, len(ids))
    return Windows(ids=ids, owner=np.asarray(owner, np.int64), weight=weight, n=len(texts))


def combine(windows: Windows, rows: np.ndarray, normalize: bool) -> np.ndarray:
    """Un-normalised pooled vectors of the windows [len(ids), D] -> one vector per text [n, D] float32: the
    token-weighted mean of its windows (a text of one window: that row as it is), L2-normalised if asked."""
    rows_KD = np.asarray(rows, np.float32)
    if rows_KD.ndim != 2 or rows_KD.shape[0] != len(windows.ids):
        raise ValueError(f"rows must have shape ({len(windows.ids)}, dim), one per window, got {rows_KD.shape}")
    counts_N = windows.counts
    if len(counts_N) and (counts_N == 1).all():
        out_ND = rows_KD.copy()
    else:
        # float64 sums, so that a text of many windows loses nothing to the order of the additions.
        sums_ND = np.zeros((windows.n, rows_KD.shape[1]), np.float64)
        np.add.at(sums_ND, windows.owner, rows_KD.astype(np.float64) * windows.weight[:, None])
        total_N = np.bincount(windows.owner, weights=windows.weight.astype(np.float64), minlength=windows.n)
        out_ND = (sums_ND / np.maximum(total_N, 1)[:, None]).astype(np.float32)
        single = counts_N == 1
        out_ND[single] = rows_KD[np.searchsorted(windows.owner, np.flatnonzero(single))]
    return l2_normalize_np(out_ND) if normalize else out_ND


def embed_windows(windows: Windows, embed, normalize: bool, dim: int) -> np.ndarray:
    """One vector per text [n, dim] float32, ``embed(ids, normalize)`` running the model on a list of id
    sequences. Texts of one window embed as the truncating path does (normalised on the device, as asked); the
    windows of longer texts embed un-normalised and are combined on the host (``pipeline.vectors``)."""
    single_N = windows.counts == 1
    first_N = np.searchsorted(windows.owner, np.arange(windows.n))
    out_ND = np.empty((windows.n, dim), np.float32)
    if single_N.any():
        out_ND[single_N] = embed([windows.ids[k] for k in first_N[single_N]], normalize)
    if not single_N.all():
        many_M = np.flatnonzero(~single_N)
        keep_K = ~single_N[windows.owner]
        sub = Windows(
            ids=[w for w, k in zip(windows.ids, keep_K, strict=True) if k],
            owner=np.searchsorted(many_M, windows.owner[keep_K]),
            weight=windows.weight[keep_K],
            n=len(many_M),
        )
        out_ND[many_M] = combine(sub, embed(sub.ids, False), normalize)
    return out_ND
