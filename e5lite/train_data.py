"""Training data: JSONL records of a query, its positive passage and optional hard negatives, read strictly;
their token ids; and which records make up each step's batch (a pure function of the step and the seed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batching import padded_batch, seq_bucket
from .errors import InputError
from .files import iter_jsonl


@dataclass(frozen=True)
class Pairs:
    """Parallel lists: ``negatives[i]`` is record i's hard negatives (possibly none)."""

    queries: list[str]
    positives: list[str]
    negatives: list[list[str]]

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def max_negatives(self) -> int:
        return max((len(n) for n in self.negatives), default=0)


def _string(rec: dict, field: str, where: str) -> str:
    if field not in rec:
        raise InputError(f"{where}: no field {field!r}")
    if not isinstance(rec[field], str):
        raise InputError(f"{where}: field {field!r} is {type(rec[field]).__name__}, expected a string")
    return rec[field]


def read_pairs(
    path: str | os.PathLike,
    *,
    query_field: str = "query",
    positive_field: str = "positive",
    negative_field: str = "negative",
) -> Pairs:
    """Reads a JSONL file of records ``{query, positive[, negative]}``; ``negative`` is a string or a list of
    strings (absent or null: none). Errors name the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training file {str(path)!r} does not exist")
    queries, positives, negatives = [], [], []
    with open(path, "rb") as f:
        for rec, where, _ in iter_jsonl(f, str(path)):
            queries.append(_string(rec, query_field, where))
            positives.append(_string(rec, positive_field, where))
            neg = rec.get(negative_field)
            neg = [] if neg is None else [neg] if isinstance(neg, str) else neg
            if not isinstance(neg, list) or not all(isinstance(n, str) for n in neg):
                raise InputError(f"{where}: field {negative_field!r} must be a string or a list of strings")
            negatives.append(neg)
    if not queries:
        raise InputError(f"{path} has no training records")
    return Pairs(queries, positives, negatives)


class TokenisedPairs:
    """The records as token ids, ready to be cut into padded batches."""

    def __init__(self, enc, pairs: Pairs):
        self.queries = enc.tokenize(pairs.queries, prompt=enc.prompt_for("query"))
        passages = pairs.positives + [n for negs in pairs.negatives for n in negs]
        ids = enc.tokenize(passages, prompt=enc.prompt_for("passage"))
        self.positives, rest = ids[: len(pairs)], ids[len(pairs) :]
        self.negatives, start = [], 0
        for negs in pairs.negatives:
            self.negatives.append(rest[start : start + len(negs)])
            start += len(negs)
        self.max_negatives, self.max_length = pairs.max_negatives, enc.max_length
        self.pad_id = enc.tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.queries)

    def _pad(self, seqs, rows: int):
        length = seq_bucket(max((len(s) for s in seqs), default=1), self.max_length)
        b = padded_batch(seqs, np.arange(len(seqs)), rows, length, self.pad_id)
        return b.input_ids, b.attention_mask

    def batch(self, index: np.ndarray):
        """The StepBatch of these records and its real token count: positives first, then each record's hard
        negatives in rows of max_negatives per record (unused rows are padding, marked invalid)."""
        from .train_step import StepBatch

        B, m = len(index), self.max_negatives
        q_ids, q_mask = self._pad([self.queries[i] for i in index], B)
        passages = [self.positives[i] for i in index]
        valid = [True] * B
        for i in index:
            negs = self.negatives[i]
            passages += negs + [negs[0] if negs else self.positives[i]] * (m - len(negs))
            valid += [True] * len(negs) + [False] * (m - len(negs))
        p_ids, p_mask = self._pad(passages, B * (1 + m))
        tokens = int(q_mask.sum()) + int(sum(len(p) for p, v in zip(passages, valid, strict=True) if v))
        return StepBatch(q_ids, q_mask, p_ids, p_mask, np.array(valid)), tokens


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch: the last, partial one is dropped, so every step has the same shape."""
    return n // batch_size


def batch_index(step: int, n: int, s) -> np.ndarray:
    """The records of global step ``step``: a pure function of the step and the settings, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    per_epoch = steps_per_epoch(n, s.batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([s.seed, epoch]).permutation(n) if s.shuffle else np.arange(n)
    return order[k * s.batch_size : (k + 1) * s.batch_size]


def total_steps(n: int, s) -> int:
    per_epoch = steps_per_epoch(n, s.batch_size)
    if per_epoch == 0:
        fits = n if s.chunk_size is None else n // s.chunk_size * s.chunk_size  # a batch is whole chunks
        hint = f"pass --batch-size {fits} or smaller" if fits else "add records"
        raise InputError(
            f"{n} training records do not fill one batch of {s.batch_size}: {hint} (a step takes a full batch)"
        )
    return s.max_steps if s.max_steps is not None else per_epoch * s.epochs
