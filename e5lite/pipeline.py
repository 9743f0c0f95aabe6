"""The embedding pipeline, written once: prepare token ids -> embed -> combine windows -> cut to ``truncate_dim``
-> normalise -> quantise. ``Encoder.encode``, the corpus runs (``shards``) and the server (``serve``) all run
these steps, in this order (sentence-transformers' order for the last three).

A ``Recipe`` holds a call's options, checked once. ``prepare`` turns the inputs (texts; the server also takes
token ids) into the id sequences to embed, a ``Prepared``: prompt, tokenise, truncate from the right or the
left or refuse an input past ``max_length`` (``TextTooLongError``), or cut long texts into windows
(``long_inputs.split``). The embed step is the caller's:

- in process (``Encoder.encode``, corpus runs), ``run`` = ``quantize(vectors(prepared, embed, recipe))`` with
  ``embed(source, n, normalize)`` running the model on the ``n`` sequences ``source(lo, hi)`` yields
  (``Engine.run``'s contract). A lazy ``Prepared`` tokenises inside ``source``, so the engine's worker thread
  tokenises chunk k+1 while the device embeds chunk k. Vectors that are not cut afterwards are normalised on
  the device, in the same jitted call;
- the server embeds the ids of many requests in shared engine calls, un-normalised, so it embeds
  ``prepared.ids`` itself and hands the rows to ``finish``, which does the rest on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError, TextTooLongError
from .long_inputs import Windows, check_long_inputs, combine, embed_windows, split
from .quantize import check_precision, check_ranges, check_truncate_dim, quantize_embeddings, truncate

# (start, end) -> the id sequences of inputs start..end-1 (engine.Source)
Source = Callable[[int, int], Sequence[np.ndarray]]
# (source, n, normalize) -> float32 [n, dim]: the caller's model call
Embed = Callable[[Source, int, bool], np.ndarray]
DIRECTIONS = ("right", "left")


class IdsTooLongError(TextTooLongError):
    """Token ids past the model's maximum length while truncation is off; ``index`` is their position in the
    call, ``length`` their count."""

    def __init__(self, index: int, length: int, max_length: int):
        InputError.__init__(
            self,
            f"ids {index} has {length} token ids, more than the model's maximum of {max_length} (truncation is off)",
        )
        self.index, self.length, self.max_length = index, length, max_length


@dataclass(frozen=True, eq=False)
class Recipe:
    """How a call makes its vectors, for a model of ``dim`` components. ``prompt``: the text put before each
    input text. An input past max_length is cut (``truncate``) from the ``direction`` end, else refused; with
    ``long_inputs="chunk"`` a long text is cut into windows sharing ``chunk_overlap`` tokens instead. Then the
    first ``truncate_dim`` components (normalised after the cut when ``normalize``), then ``precision`` with
    int8/uint8 buckets from ``ranges`` or ``calibration_embeddings`` (see ``quantize.py``). Checked when made,
    each error naming the option; ``normalize`` is the caller's to check (a bool)."""

    dim: int
    prompt: str = ""
    truncate: bool = True
    direction: str = "right"
    long_inputs: str = "truncate"
    chunk_overlap: int = 0
    normalize: bool = True
    truncate_dim: int | None = None
    precision: str = "float32"
    ranges: object = None
    calibration_embeddings: object = None

    def __post_init__(self):
        check_long_inputs(self.long_inputs, self.chunk_overlap)
        object.__setattr__(self, "truncate_dim", check_truncate_dim(self.truncate_dim, self.dim))
        check_precision(self.precision)
        if self.scalar:  # refused before anything is embedded, not after
            check_ranges(self.ranges, self.calibration_embeddings, self.out_dim)
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'right' or 'left', got {self.direction!r:.40}")

    @property
    def chunk(self) -> bool:
        """Long texts are cut into windows, not truncated."""
        return self.long_inputs == "chunk"

    @property
    def scalar(self) -> bool:
        """int8/uint8: buckets per dimension."""
        return self.precision in ("int8", "uint8")

    @property
    def out_dim(self) -> int:
        """Components of a float vector after the cut."""
        return self.truncate_dim or self.dim

    def check_count(self, n: int) -> None:
        """Refuses int8/uint8 buckets that would have to come from a single embedding."""
        if self.scalar and self.ranges is None and self.calibration_embeddings is None and n == 1:
            raise ValueError(
                f"precision={self.precision!r} of a single text needs ranges (shape (2, dim)) or "
                "calibration_embeddings: its buckets cannot come from one embedding"
            )


class Prepared:
    """The id sequences of a call's ``n`` inputs (``prepare``). ``source(lo, hi)`` gives sequences lo..hi,
    tokenised only then when lazy; otherwise ``ids`` holds them all. With long texts in windows, ``windows``
    maps the sequences to the inputs (several per long text, see ``long_inputs``) and ``ids`` are the windows'."""

    def __init__(
        self, n: int, ids: list[np.ndarray] | None = None, windows: Windows | None = None, source: Source | None = None
    ):
        self.n, self.windows, self._ids = n, windows, ids
        self.source: Source = source if source is not None else (lambda lo, hi: self.ids[lo:hi])

    @property
    def ids(self) -> list[np.ndarray]:
        if self._ids is None:
            raise ValueError("a lazy Prepared tokenises as it is embedded: it holds no ids (prepare with lazy=False)")
        return self._ids

    @property
    def tokens(self) -> int:
        """Tokens embedded: every sequence's (every window's), prompt and special tokens included."""
        return sum(len(i) for i in self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens embedded per input [n] int64 (a chunked text: its windows' together)."""
        if self.windows is not None:
            w = self.windows
            return np.bincount(w.owner, weights=w.weight, minlength=w.n).astype(np.int64)
        return np.fromiter((len(t) for t in self.ids), np.int64, self.n)


def _text_ids(tokenizer, texts: list[str], recipe: Recipe, offset: int, ragged: bool):
    """Token ids of texts with the prompt (a ``Ragged`` when ``ragged`` and cut from the right)."""
    prompted = [recipe.prompt + t for t in texts] if recipe.prompt else texts
    if recipe.direction == "left" and recipe.truncate:
        return tokenizer.encode_left(prompted, offset)
    # untruncated, right and left agree
    ids = tokenizer.encode_ragged(prompted, truncate=recipe.truncate, offset=offset)
    return ids if ragged else ids.tolist()


def _given_ids(seq, index: int, recipe: Recipe, max_length: int) -> np.ndarray:
    """Token ids given as input, cut to max_length from the recipe's end or refused."""
    ids = np.asarray(seq, np.int32)
    if len(ids) > max_length:
        if not recipe.truncate:
            raise IdsTooLongError(index, len(ids), max_length)
        ids = ids[-max_length:] if recipe.direction == "left" else ids[:max_length]
    return ids


def prepare(tokenizer, items: Sequence, recipe: Recipe, *, offset: int = 0, lazy: bool = False) -> Prepared:
    """The id sequences to embed for ``items``: texts (str), or token id sequences already checked against the
    vocabulary (taken as given, only cut to max_length or refused). ``tokenizer``: the Encoder's
    ``TextTokenizer``; ``offset``: the index of items[0] in the caller's list, for errors naming an input.
    ``lazy`` (texts alone, not chunked): tokenised chunk by chunk inside ``source``, as the engine asks.
    Errors: ``TextTooLongError`` (``IdsTooLongError`` for ids) naming the input, texts before ids;
    ``ValueError`` from ``long_inputs.split`` when the prompt leaves windows no room."""
    items = items if isinstance(items, list) else list(items)
    at = [i for i, x in enumerate(items) if isinstance(x, str)]
    all_texts = len(at) == len(items)
    texts = items if all_texts else [items[i] for i in at]
    if recipe.chunk and all_texts:
        whole = split(tokenizer, texts, recipe.prompt, recipe.chunk_overlap, offset)
        return Prepared(len(items), whole.ids, whole)
    if lazy and all_texts:
        return Prepared(len(items), source=lambda lo, hi: _text_ids(tokenizer, texts[lo:hi], recipe, offset + lo, True))
    seqs: list = [None] * len(items)
    windows: Windows | None = None
    if recipe.chunk and texts:
        windows = split(tokenizer, texts, recipe.prompt, recipe.chunk_overlap, offset)
    elif texts:
        try:
            ids = _text_ids(tokenizer, texts, recipe, offset, False)
        except TextTooLongError as e:
            if all_texts:
                raise
            raise TextTooLongError(offset + at[e.index - offset], e.max_length) from None
        for i, seq in zip(at, ids, strict=True):
            seqs[i] = seq
    for i, x in enumerate(items):
        if not isinstance(x, str):
            seqs[i] = _given_ids(x, offset + i, recipe, tokenizer.max_length)
    if windows is None:
        return Prepared(len(items), seqs)
    merged = _merge(windows, at, seqs)
    return Prepared(len(items), merged.ids, merged)


def _merge(windows: Windows, at: list[int], seqs: list) -> Windows:
    """Every input's windows in input order: the texts' (at positions ``at``) from their split, text k's being
    consecutive from bounds[k] to bounds[k + 1]; token ids as one window."""
    bounds = np.searchsorted(windows.owner, np.arange(len(at) + 1))
    text_of = {i: k for k, i in enumerate(at)}
    ids, owner, weight = [], [], []
    for i in range(len(seqs)):
        if i in text_of:
            span = range(bounds[text_of[i]], bounds[text_of[i] + 1])
            ids += [windows.ids[w] for w in span]
            weight += [windows.weight[w] for w in span]
        else:
            span = range(1)
            ids.append(seqs[i])
            weight.append(len(seqs[i]))
        owner += [i] * len(span)
    return Windows(ids=ids, owner=np.asarray(owner, np.int64), weight=np.asarray(weight, np.float32), n=len(seqs))


def vectors(prepared: Prepared, embed: Embed, recipe: Recipe) -> np.ndarray:
    """Float32 vectors [n, out_dim] with ``embed`` as the model: windows combined, cut to truncate_dim,
    normalised. Normalised on the device where nothing is cut after (sentence-transformers normalises after
    cutting); a chunked text's windows embed un-normalised and are combined on the host (``embed_windows``)."""
    if prepared.n == 0:
        return np.zeros((0, recipe.out_dim), np.float32)
    normalize = bool(recipe.normalize) and recipe.truncate_dim is None
    if prepared.windows is not None:
        x = embed_windows(
            prepared.windows, lambda ids, norm: embed(lambda lo, hi: ids[lo:hi], len(ids), norm), normalize, recipe.dim
        )
    else:
        x = embed(prepared.source, prepared.n, normalize)
    return x if recipe.truncate_dim is None else truncate(x, recipe.truncate_dim, recipe.normalize)


def quantize(x: np.ndarray, recipe: Recipe) -> np.ndarray:
    """Float vectors -> the recipe's precision (float32: as they are)."""
    if recipe.precision == "float32":
        return x
    return quantize_embeddings(x, recipe.precision, recipe.ranges, recipe.calibration_embeddings)


def run(prepared: Prepared, embed: Embed, recipe: Recipe) -> np.ndarray:
    """Every step after ``prepare``, with ``embed`` as the model: what ``Encoder.encode`` returns."""
    return quantize(vectors(prepared, embed, recipe), recipe)


def finish(prepared: Prepared, rows: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The steps after a caller's own embedding of ``prepared.ids``, one un-normalised row each (the server's
    batcher, whose engine calls mix requests): windows combined, cut to truncate_dim, normalised, quantised,
    all on the host."""
    x = rows if prepared.windows is None else combine(prepared.windows, rows, normalize=False)
    return quantize(truncate(x, recipe.truncate_dim, recipe.normalize), recipe)
