"""``e5lite.load``: a model folder (local, or a Hugging Face Hub snapshot) read into an ``Encoder``: its
config, pooling, max length, tokenizer, prompts and weights, with the engine settings checked before the
weights are read. ``encoder.py`` re-exports ``load``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy.typing as npt

from . import hub
from .config import BertConfig
from .errors import E5LiteError
from .jitted import check_weights
from .pooling import read_pooling_mode
from .prompts import read_prompts
from .runtime import CACHE_ENV, enable_compilation_cache
from .settings import EngineSettings
from .tokenizer import TextTokenizer, resolve_max_length
from .weights import load_params, resolve_dtype

if TYPE_CHECKING:
    from .encoder import Encoder


def read_tokenizer(model_dir: Path, config: BertConfig, max_length: int, backend: str) -> TextTokenizer:
    """The folder's tokenizer, refused if it has ids the model's embedding table lacks."""
    tokenizer = TextTokenizer.from_dir(model_dir, max_length, config.pad_token_id, backend)
    if tokenizer.vocab_size > config.vocab_size:
        raise E5LiteError(
            f"tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but config.json's "
            f"vocab_size is {config.vocab_size}"
        )
    return tokenizer


def read_programs(folder, settings: EngineSettings, max_length: int | None):
    """(the programs in ``folder``, the settings and max length they fill in where left to their defaults)."""
    from .programs import Programs

    shipped = Programs.read(folder)
    return (shipped, *shipped.fill(settings, max_length))


def load(
    model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: npt.DTypeLike = "float32",
    max_length: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    settings: EngineSettings | None = None,
    devices: Sequence[jax.Device] | None = None,
    tokenizer_backend: str = "auto",
    weights: str | None = None,
    programs: str | os.PathLike[str] | None = None,
    **knobs: Any,
) -> Encoder:
    """Loads an E5/BERT encoder from a local folder or a Hugging Face Hub id (``intfloat/e5-base-v2``).

    Engine ``settings`` (or single knobs as keywords: token_budget, packing, pack_length, max_segments,
    min_window, streams, attention_impl, ...; see ``EngineSettings``) and ``devices`` go to ``Encoder``.
    ``tokenizer_backend``: "auto" (tokie when installed and in agreement with tokenizers, see
    ``fast_tokenizer.py``), "tokie" or "tokenizers".
    ``weights="bfloat16"`` (with float32 compute): the layers' matmul weights in bfloat16, multiplied as bf16
    operands accumulating in float32, activations float32 throughout; faster one-query latency on CPU for
    cosine >= 0.999 against float32 (see README, "Faster queries"); ``weights="int8"``: int8 weights (per
    output channel, quantised here) times int8 activations (per token, at run time), accumulated in int32,
    everything else float32 (``int8.py``; README, "int8 weights"); None: weights in ``dtype``.
    ``programs``: a folder of ``e5lite export-programs``, run instead of tracing the model (``programs.py``);
    settings and ``max_length`` left to their defaults take the programs', others must fit them.
    """
    from .encoder import Encoder  # here: encoder.py imports this module

    check_weights(weights, resolve_dtype(dtype))
    settings = (settings or EngineSettings()).replace(**knobs)  # bad knobs fail before the weights are read
    shipped = None
    if programs is not None:  # another platform or jax version is refused before the weights are read too
        shipped, settings, max_length = read_programs(programs, settings, max_length)
    if os.environ.get(CACHE_ENV):
        enable_compilation_cache()
    model_dir = hub.resolve(model, revision=revision, cache_dir=cache_dir)
    config = BertConfig.from_json(model_dir / "config.json")
    pooling = read_pooling_mode(model_dir)
    max_len = resolve_max_length(model_dir, config, max_length)
    tokenizer = read_tokenizer(model_dir, config, max_len, tokenizer_backend)
    prompts = read_prompts(model_dir, name=str(model))
    params = load_params(model_dir, config, dtype)
    encoder = Encoder(
        model_dir,
        config,
        params,
        tokenizer,
        pooling=pooling,
        prompts=prompts.prompts,
        default_prompt_name=prompts.default_prompt_name,
        prompts_source=prompts.source,
        dtype=dtype,
        settings=settings,
        devices=devices,
        weights=weights,
    )
    if shipped is not None:
        shipped.attach(encoder.engine, model_dir)
    return encoder
