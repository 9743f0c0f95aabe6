"""``Encoder``: prompts, tokenisation and the public embedding calls. ``e5lite.load(...)``, which reads a model
into one, is ``loading.py``'s (re-exported here); the checks of a call's texts and ids are ``inputs.py``'s.

``Encoder.encode`` = ``tokenize`` + ``embed_ids`` (+ windows, ``truncate_dim``, quantisation): the steps are
``pipeline.py``'s, with the engine as the model; the batching, devices and threads behind it are the engine's
(``engine.py``), configured by one ``EngineSettings``. The server's needs (``prepare``, ``embed_valid_ids``,
``token_states``, ``token_spans``, ``decode``, ...) are public methods here, so that it never reaches into the
engine or the tokenizer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import numpy.typing as npt

from . import pipeline
from .batching import Batch
from .config import BertConfig
from .engine import Engine
from .inputs import check_ids, check_texts
from .loading import load as load  # re-exported: ``from e5lite.encoder import load``
from .long_inputs import window_length
from .model import Params
from .pipeline import Prepared, Recipe
from .prompts import instruct_prompt, side_prompt_name
from .settings import EngineSettings
from .tokenizer import TextTokenizer
from .weights import resolve_dtype

logger = logging.getLogger("e5lite")


class Encoder:
    """A loaded E5/BERT sentence encoder. Build with ``e5lite.load``.

    ``settings`` (``EngineSettings``: token budget, packing, attention windows, streams, attention
    implementation) are the engine's, resolved for the backend; change them with ``configure(**changes)``.
    Batches are sharded over ``devices`` (default: all local devices).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        config: BertConfig,
        params: Params,
        tokenizer: TextTokenizer,
        *,
        pooling: str = "mean",
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        prompts_source: str = "given",
        dtype: npt.DTypeLike = "float32",
        settings: EngineSettings | None = None,
        devices: Sequence[jax.Device] | None = None,
        weights: str | None = None,
        **knobs: Any,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prompts = dict(prompts or {})
        self.default_prompt_name = default_prompt_name
        self.prompts_source = prompts_source  # where the prompts come from, in words (``prompts.read_prompts``)
        self.dtype = resolve_dtype(dtype)
        settings = (settings or EngineSettings()).replace(**knobs)
        self.engine = Engine(
            config,
            params,
            pooling=pooling,
            max_length=tokenizer.max_length,
            pad_id=tokenizer.pad_token_id,
            dtype=self.dtype,
            settings=settings,
            devices=devices,
            weights=weights,
        )

    @property
    def weights(self) -> str:
        """How the layers' matmul weights are stored: the dtype's name, or "bfloat16" (see ``load``)."""
        return self.engine.weights

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to this (the model's embedding table; the tokenizer may use fewer)."""
        return self.config.vocab_size

    @property
    def params(self) -> Params:
        """The weights as loaded (``model.Params``, layers stacked), placed on the engine's devices; rebuilt on
        each access from the layout the engine runs (``Engine.set_params``), so keep the result to reuse it."""
        return self.engine.params

    @property
    def settings(self) -> EngineSettings:
        return self.engine.settings

    @property
    def devices(self) -> list[jax.Device]:
        return self.engine.devices

    def set_params(self, params: Params) -> None:
        """Embeds with these weights from now on (same shapes; e.g. fine-tuned ones from ``e5lite.train``)."""
        self.engine.set_params(params)

    def warmup(self, max_length: int = 128, normalize: bool = True) -> list[tuple]:
        """Compiles the shapes a query or a few texts of up to ``max_length`` tokens can hit (the small-input
        path), so that the first call is as fast as the hundredth; returns them. ``normalize=False``: the
        un-normalised variant (what the server's batch worker runs). With the persistent compilation cache
        (``E5LITE_COMPILATION_CACHE``) a restarted process loads them instead of compiling."""
        return self.engine.warmup(max_length, normalize)

    def close(self) -> None:
        """Stops the engine's worker threads (also done when the Encoder is garbage collected)."""
        self.engine.close()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def configure(self, **changes: Any) -> EngineSettings:
        """Changes engine settings between calls, e.g. ``configure(token_budget=4096, packing=False)``."""
        return self.engine.configure(**changes)

    def __repr__(self) -> str:
        return (
            f"Encoder({str(self.model_dir)!r}, layers={self.config.num_hidden_layers}, dim={self.dim}, "
            f"max_length={self.max_length}, pooling={self.pooling!r}, dtype={self.dtype.name}, "
            f"weights={self.weights!r}, "
            f"devices={len(self.devices)}, attention={self.settings.attention_impl!r})"
        )

    def prompt_prefix(self, prompt_name: str | None = None, prompt: str | None = None, task: str | None = None) -> str:
        """The text put before each input: ``prompt`` as given; for a ``task`` (the -instruct models' queries)
        "Instruct: {task}\nQuery: "; else the named prompt (``prompts[prompt_name]``), else the default
        prompt's, else ""."""
        if sum(x is not None for x in (prompt, prompt_name, task)) > 1:
            raise ValueError("pass one of prompt, prompt_name and task, not several")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
            return prompt
        if task is not None:
            return instruct_prompt(task)
        if prompt_name is None:
            prompt_name = self.default_prompt_name
            if prompt_name is None:
                return ""
        if prompt_name not in self.prompts:
            raise ValueError(f"unknown prompt_name {prompt_name!r}; known: {', '.join(sorted(self.prompts))}")
        return self.prompts[prompt_name]

    def prompt_for(self, name: str | None) -> str:
        """The prompt of a side, or "" when the model has none: "query" -> its query prompt; "passage" (or
        "document") -> its document prompt, the first of "document", "passage", "corpus" it has (as
        sentence-transformers' ``encode_document``); another name -> that prompt. The rule of
        ``encode_passages``, ``e5lite score``, ``eval``, ``train`` and the MTEB adapter (``prompts.py``)."""
        key = side_prompt_name(self.prompts, name)
        return "" if key is None else self.prompts[key]

    def tokenize(
        self,
        texts: str | Iterable[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        task: str | None = None,
        truncate: bool = True,
        direction: str = "right",
    ) -> list[np.ndarray]:
        """Token ids per text (int32 arrays), with the prompt prepended and truncation to max_length applied
        (``direction="left"``: a long text keeps its last tokens, the special tokens stay); ``truncate=False``
        raises TextTooLongError (its ``index`` names the text) instead of cutting."""
        texts, _ = check_texts(texts)
        recipe = self.recipe(prompt_name=prompt_name, prompt=prompt, task=task, truncate=truncate, direction=direction)
        return pipeline.prepare(self.tokenizer, texts, recipe).ids

    def recipe(
        self, *, prompt_name: str | None = None, prompt: str | None = None, task: str | None = None, **options: Any
    ) -> Recipe:
        """A ``pipeline.Recipe`` for this model: the prompt as ``prompt_prefix`` resolves it, the other options
        (truncate, direction, long_inputs, chunk_overlap, normalize, truncate_dim, precision, ranges,
        calibration_embeddings) as given, checked."""
        return Recipe(self.dim, prompt=self.prompt_prefix(prompt_name, prompt, task), **options)

    def prepare(self, items: Sequence, recipe: Recipe, *, offset: int = 0) -> Prepared:
        """The token id sequences to embed for ``items`` (texts, or token id sequences already checked against
        the vocabulary) under ``recipe``: prompted, tokenised, truncated or refused, or cut into windows
        (``pipeline.prepare``). Embed ``.ids`` un-normalised and pass the rows to ``pipeline.finish``, or call
        ``embed_prepared``."""
        return pipeline.prepare(self.tokenizer, items, recipe, offset=offset)

    def embed_prepared(
        self,
        prepared: Prepared,
        recipe: Recipe,
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        local: bool = False,
    ) -> np.ndarray:
        """Float32 vectors [n, truncate_dim or dim] of a ``prepare`` result: windows combined, cut, normalised as
        ``recipe`` says (not quantised: ``pipeline.quantize``). ``local`` as in ``embed_ids``."""
        return pipeline.vectors(
            prepared, self._model(self._run_kw(recipe.normalize, batch_size, show_progress_bar), local), recipe
        )

    def _model(self, kw: dict[str, Any], local: bool = False) -> pipeline.Embed:
        """The pipeline's embed step on this engine, with ``_run_kw``'s keywords; the device normalises as asked."""
        return lambda source, n, normalize: self.engine.run(source, n, local=local, **{**kw, "normalize": normalize})

    def iter_batches(
        self,
        texts: str | Iterable[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        task: str | None = None,
        batch_size: int | None = None,
    ) -> Iterator[Batch]:
        """The batches ``encode`` runs for these texts, as numpy arrays, for a function or device loop of your own.

        Each ``batching.Batch`` has ``input_ids`` and ``attention_mask`` [R, S] int32; packed rows (``packed``)
        also ``segment_ids`` (1.. per text, 0 = padding) and ``position_ids`` (0 at each text's first token;
        ``model.forward`` adds XLM-R's offset itself), ``num_segments`` and ``window``. Text ``index[j]`` of the
        call has its embedding at flat slot ``slot[j]`` of the batch's pooled output ([R] rows padded,
        [R * num_segments] packed; see ``engine.embed_batch`` / ``embed_packed``). Rows are a multiple of the
        device count. Chunks are tokenised and planned one ahead on a worker thread, as in ``encode``. Under
        several JAX processes this yields every text's batches in every process (shard them yourself).
        """
        texts, _ = check_texts(texts)
        self._run_kw(True, batch_size, False)
        prepared = pipeline.prepare(
            self.tokenizer, texts, self.recipe(prompt_name=prompt_name, prompt=prompt, task=task), lazy=True
        )
        return self.engine.batches(prepared.source, len(texts), batch_size)

    def embed_ids(
        self,
        ids: Sequence[Sequence[int]],
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        local: bool = False,
    ) -> np.ndarray:
        """Embeds token id sequences (as ``tokenize`` returns them: prompt and truncation applied) -> float32
        [n, dim] in input order. With several JAX processes, every process passes the same ids, embeds its
        contiguous share, and all get the merged result; with ``local=True`` each process embeds its own ids
        on its own devices, with no collective (what a corpus run per host needs)."""
        checked = check_ids(ids, self.max_length, self.config.vocab_size)
        return self.embed_valid_ids(
            checked, normalize=normalize, batch_size=batch_size, show_progress_bar=show_progress_bar, local=local
        )

    def embed_valid_ids(
        self,
        ids: Sequence[np.ndarray],
        *,
        normalize: bool = True,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        local: bool = False,
    ) -> np.ndarray:
        """``embed_ids`` of ids the caller has checked already (int32 arrays of 1 to max_length ids in
        [0, vocab_size), as ``tokenize`` and ``prepare`` give them, or as the server validates a request's):
        no second pass over every token. Ids outside those bounds give wrong vectors, not an error."""
        return self.engine.run(
            lambda lo, hi: ids[lo:hi], len(ids), local=local, **self._run_kw(normalize, batch_size, show_progress_bar)
        )

    def token_states(self, ids: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The last hidden state of every token, float32 [len, dim] per id sequence (TEI's ``/embed_all``); ids
        checked already, as for ``embed_valid_ids``."""
        return self.engine.token_states(ids)

    def token_spans(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[tuple[int, str, bool, tuple[int, int] | None]]]:
        """Per text, per token: (id, token string, special?, (start, stop) character offsets in the text, or
        None for a special token), not truncated and without a prompt (TEI's ``/tokenize``)."""
        return self.tokenizer.encode_tokens(texts, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids, as the tokenizer's decoder writes it."""
        return self.tokenizer.decode(ids, skip_special_tokens)

    def window_length(self, prompt: str = "") -> int:
        """The text tokens a window of a long input holds (``long_inputs="chunk"``) beside the special tokens
        and ``prompt``; ``chunk_overlap`` must be less."""
        return window_length(self.tokenizer, len(self.tokenizer.body_ids([prompt])[0]) if prompt else 0)

    def encode(
        self,
        texts: str | Iterable[str],
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        task: str | None = None,
        normalize: bool = True,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        long_inputs: str = "truncate",
        chunk_overlap: int = 0,
        truncate_dim: int | None = None,
        precision: str = "float32",
        ranges: npt.ArrayLike | None = None,
        calibration_embeddings: npt.ArrayLike | None = None,
    ) -> np.ndarray:
        """Embeds texts: a list -> float32 [n, dim] in input order; a single str -> [dim].

        The prefix: ``prompt`` as given, or the model's prompt ``prompt_name`` ("query", "passage"), or for
        the -instruct models' queries a ``task`` description ("Instruct: {task}\nQuery: "; their documents
        take no prefix, ``prompt_name="passage"``).

        The same as ``embed_ids(tokenize(texts, ...))``, except that texts are tokenised chunk by chunk while
        the device works. ``batch_size`` caps the texts (rows) per batch; by default batches are filled up to
        the token budget.

        ``long_inputs="chunk"`` embeds a text past ``max_length`` whole: windows of it (consecutive ones sharing
        ``chunk_overlap`` tokens), each with the specials and the prompt, averaged by token count
        (``long_inputs.py``); texts that fit are unchanged. Texts are then tokenised up front, not chunk by chunk.
        ``truncate_dim`` keeps the first components (normalised after cutting when ``normalize``), and
        ``precision`` ("int8", "uint8", "binary", "ubinary") quantises the result as sentence-transformers'
        ``quantize_embeddings``, with ``ranges`` [2, dim] or ``calibration_embeddings`` setting int8/uint8
        buckets (else the call's own embeddings, which needs two texts or more; see ``quantize.py``).
        """
        texts, single = check_texts(texts)
        recipe = self.recipe(
            prompt_name=prompt_name,
            prompt=prompt,
            task=task,
            long_inputs=long_inputs,
            chunk_overlap=chunk_overlap,
            normalize=normalize,
            truncate_dim=truncate_dim,
            precision=precision,
            ranges=ranges,
            calibration_embeddings=calibration_embeddings,
        )
        recipe.check_count(len(texts))
        kw = self._run_kw(normalize, batch_size, show_progress_bar)
        out = pipeline.run(pipeline.prepare(self.tokenizer, texts, recipe, lazy=True), self._model(kw), recipe)
        return out[0] if single else out

    def _run_kw(self, normalize: object, batch_size: object, show_progress_bar: bool | None) -> dict[str, Any]:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r:.40}")
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() <= logging.INFO
        return dict(normalize=bool(normalize), batch_size=batch_size, show_progress_bar=show_progress_bar)

    def encode_queries(self, texts: str | Iterable[str], *, task: str | None = None, **kw: Any) -> np.ndarray:
        """``encode`` with the model's query prompt (E5: "query: "; sentence-transformers' ``encode_query``), or
        with the instruct prefix of ``task``."""
        if task is not None or "prompt" in kw or "prompt_name" in kw:  # the caller's prompt wins, as in ST
            return self.encode(texts, task=task, **kw)
        return self.encode(texts, prompt_name=side_prompt_name(self.prompts, "query"), **kw)

    def encode_passages(self, texts: str | Iterable[str], **kw: Any) -> np.ndarray:
        """``encode`` with the model's document prompt (E5: "passage: "; sentence-transformers'
        ``encode_document``: the first of "document", "passage", "corpus" the model has)."""
        if "prompt" in kw or "prompt_name" in kw or "task" in kw:
            return self.encode(texts, **kw)
        return self.encode(texts, prompt_name=side_prompt_name(self.prompts, "passage"), **kw)
