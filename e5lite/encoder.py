"""``e5lite.load(...)`` and ``Encoder.encode(...)``: tokenise, bucket, run the jitted forward, pool."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import hub
from .config import BertConfig
from .errors import E5LiteError
from .model import Params, forward
from .pooling import l2_normalize, pool, read_pooling_mode
from .tokenizer import WordPieceTokenizer, read_prompts, resolve_max_length
from .weights import load_params, resolve_dtype

logger = logging.getLogger("e5lite")

# Sequence-length buckets: every batch is padded up to one of these (or to max_length), so a whole corpus
# compiles at most len(SEQ_BUCKETS) x (batch-size ladder) shapes.
SEQ_BUCKETS = (16, 32, 64, 128, 256, 384, 512)


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize"))
def embed_batch(params: Params, input_ids, attention_mask, *, config: BertConfig, pooling: str, normalize: bool):
    """Token ids, mask [B, S] -> sentence embeddings [B, D] float32 (forward + pooling [+ L2 norm])."""
    hidden_BSD = forward(params, config, input_ids, attention_mask)
    out_BD = pool(hidden_BSD, attention_mask, pooling)
    return l2_normalize(out_BD) if normalize else out_BD


def seq_bucket(n: int, max_length: int) -> int:
    """The padded length for a batch whose longest sequence has n tokens."""
    for b in SEQ_BUCKETS:
        if n <= b <= max_length:
            return b
    return max_length


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows a batch of n texts is padded to: batch_size, or a power of two for the last, smaller batch."""
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def plan_batches(lengths: Sequence[int], batch_size: int, max_length: int):
    """Groups texts longest first; yields (indices, padded_rows, padded_length) per batch."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, batch_bucket(len(idx), batch_size), seq_bucket(int(lengths[idx[0]]), max_length)


def pad_batch(ids: Sequence[np.ndarray], rows: int, length: int, pad_id: int):
    """Right-pads token id arrays into input_ids, attention_mask [rows, length] int32."""
    input_ids = np.full((rows, length), pad_id, dtype=np.int32)
    mask = np.zeros((rows, length), dtype=np.int32)
    for r, t in enumerate(ids):
        input_ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return input_ids, mask


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
    """A loaded E5/BERT sentence encoder. Build with ``e5lite.load``."""

    def __init__(self, model_dir, config: BertConfig, params: Params, tokenizer: WordPieceTokenizer, *,
                 pooling: str = "mean", prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, dtype="float32"):
        self.model_dir = Path(model_dir)
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.dtype = resolve_dtype(dtype)
        self.compiled_shapes: set[tuple[int, int]] = set()

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def __repr__(self):
        return (f"Encoder({str(self.model_dir)!r}, layers={self.config.num_hidden_layers}, dim={self.dim}, "
                f"max_length={self.max_length}, pooling={self.pooling!r}, dtype={self.dtype.name})")

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
               batch_size: int = 32, show_progress_bar: bool | None = None) -> np.ndarray:
        """Embeds texts: a list -> float32 [n, dim] in input order; a single str -> [dim]."""
        texts, single = _check_texts(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        prefix = self._prompt(prompt_name, prompt)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if texts:
            ids = self.tokenizer([prefix + t for t in texts] if prefix else texts)
            self._run(ids, out, batch_size, bool(normalize), show_progress_bar)
        return out[0] if single else out

    def encode_queries(self, texts, **kw) -> np.ndarray:
        """``encode`` with prompt_name="query" (E5's "query: " prefix)."""
        return self.encode(texts, prompt_name="query", **kw)

    def encode_passages(self, texts, **kw) -> np.ndarray:
        """``encode`` with prompt_name="passage" (E5's "passage: " prefix)."""
        return self.encode(texts, prompt_name="passage", **kw)

    def _run(self, ids: list[np.ndarray], out: np.ndarray, batch_size: int, normalize: bool, show) -> None:
        lengths = [len(t) for t in ids]
        batches = list(plan_batches(lengths, batch_size, self.max_length))
        if show is None:
            show = logger.getEffectiveLevel() <= logging.INFO
        bar = tqdm(total=len(ids), desc="embed", unit="text", disable=not show, file=sys.stderr)
        pending = None  # results of the batch in flight: device work overlaps the next batch's padding
        for idx, rows, length in batches:
            input_ids, mask = pad_batch([ids[i] for i in idx], rows, length, self.tokenizer.pad_token_id)
            self.compiled_shapes.add((rows, length))
            res = embed_batch(self.params, input_ids, mask, config=self.config, pooling=self.pooling,
                              normalize=normalize)
            if pending is not None:
                self._collect(pending, out, bar)
            pending = (idx, res)
        if pending is not None:
            self._collect(pending, out, bar)
        bar.close()

    @staticmethod
    def _collect(pending, out, bar):
        idx, res = pending
        out[idx] = np.asarray(res)[:len(idx)]
        bar.update(len(idx))


def load(model: str | os.PathLike, *, revision: str | None = None, dtype="float32", max_length: int | None = None,
         cache_dir=None) -> Encoder:
    """Loads an E5/BERT encoder from a local folder or a Hugging Face Hub id (``intfloat/e5-base-v2``)."""
    resolve_dtype(dtype)
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
                   default_prompt_name=default_prompt, dtype=dtype)
