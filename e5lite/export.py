"""e5lite params -> a Hugging Face / sentence-transformers model folder.

The folder holds what ``transformers.AutoModel``, ``sentence_transformers.SentenceTransformer`` and
``e5lite.load`` each read, and all three embed with the same vectors:

- ``config.json``: the source checkpoint's, as ``BertModel`` (``XLMRobertaModel``) in float32;
- ``model.safetensors``: ``weights.to_state_dict`` (transformers' key names) plus the source's pooler;
- the tokenizer files, copied from the source folder;
- ``modules.json`` (Transformer -> Pooling -> Normalize), ``sentence_bert_config.json`` (max length),
  ``1_Pooling/config.json`` (pooling mode), ``config_sentence_transformers.json`` (prompts).

The sentence-transformers files use the classic layout (``pooling_mode_*`` booleans, ``max_seq_length``),
which every sentence-transformers version from 2.x reads. Everything is written into a temporary folder
beside the target and renamed into place, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.numpy import save_file

from .config import BertConfig
from .errors import ConfigError, E5LiteError
from .files import fsync, read_json, write_atomic
from .model import Params
from .pooling import MODES
from .weights import read_pooler, to_state_dict

if TYPE_CHECKING:
    from .encoder import Encoder

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
)

# modules.json as sentence-transformers (2.x-5.x) writes it; Normalize has no config, so no 2_Normalize folder.
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]
# e5lite pooling mode -> the sentence-transformers boolean that selects it.
POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
OTHER_POOLING_FLAGS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
assert set(POOLING_FLAGS) == set(MODES)


def save_pretrained(
    enc: Encoder,
    out_dir: str | os.PathLike,
    *,
    params: Params | None = None,
    overwrite: bool = False,
    keep: tuple[str, ...] = (),
) -> Path:
    """Saves ``enc`` as a Hugging Face / sentence-transformers model folder at ``out_dir``; returns its path.

    ``params`` (e.g. fine-tuned weights: jax or numpy leaves, any float dtype) replaces ``enc.params``; config,
    tokenizer, pooling, max length and prompts are ``enc``'s. An existing non-empty ``out_dir`` is refused
    unless ``overwrite=True``; entries of the old folder named in ``keep`` (e.g. a training run's ``training/``)
    are moved into the new one.
    """
    return save_model(
        out_dir,
        source_dir=enc.model_dir,
        config=enc.config,
        params=enc.params if params is None else params,
        pooling=enc.pooling,
        max_length=enc.max_length,
        prompts=enc.prompts,
        default_prompt_name=enc.default_prompt_name,
        overwrite=overwrite,
        keep=keep,
    )


def save_model(
    out_dir,
    *,
    source_dir,
    config: BertConfig,
    params: Params,
    max_length: int,
    pooling: str = "mean",
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    overwrite: bool = False,
    keep: tuple[str, ...] = (),
) -> Path:
    """``save_pretrained`` from parts: ``source_dir`` is the model folder that config.json, the tokenizer files
    and the pooler weights are taken from (the folder ``params`` were loaded from)."""
    out, source = Path(out_dir), Path(source_dir)
    _check_target(out, overwrite)
    if pooling not in POOLING_FLAGS:
        raise ValueError(f"unknown pooling mode {pooling!r}; choose one of {', '.join(MODES)}")
    if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
        raise ValueError(
            f"default_prompt_name {default_prompt_name!r} is not one of the prompts {sorted(prompts or {})}"
        )
    # Everything that can fail on bad input is read before the first file is written.
    tensors = {**to_state_dict(params, config), **read_pooler(source, config)}
    hf_config = _hf_config(source, config)
    tokenizer = _tokenizer_files(source)
    st_files = _sentence_transformers_files(config, max_length, pooling, prompts or {}, default_prompt_name)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # transformers requires format=pt
        fsync(tmp / WEIGHTS)
        write_atomic(tmp / "config.json", _json_bytes(hf_config))
        for name, data in {**tokenizer, **st_files}.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            write_atomic(tmp / name, data)
        _publish(tmp, out, overwrite, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise E5LiteError(f"cannot save the model to {out}: it exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise E5LiteError(
            f"cannot save the model to {out}: the folder is not empty (pass overwrite=True to replace it)"
        )


def _hf_config(source: Path, config: BertConfig) -> dict:
    """The source's config.json with every field kept, the values e5lite ran with, as a float32 base model."""
    cfg = read_json(source / "config.json", error=ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source / 'config.json'}: expected a JSON object")
    # The weights are the base model's keys (no `bert.`/`roberta.` prefix, no heads) in float32, whatever the
    # source was. `dtype` is transformers >= 4.56's name, `torch_dtype` the one older versions read.
    arch = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel"}[config.model_type]
    return {**cfg, **config.to_dict(), "architectures": [arch], "torch_dtype": "float32", "dtype": "float32"}


def _tokenizer_files(source: Path) -> dict[str, bytes]:
    files = {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
    if "tokenizer.json" not in files and "vocab.txt" not in files:
        raise E5LiteError(f"no tokenizer in {source}: expected tokenizer.json or vocab.txt to copy")
    return files


def _sentence_transformers_files(
    config: BertConfig, max_length: int, pooling: str, prompts: dict[str, str], default_prompt_name: str | None
) -> dict[str, bytes]:
    # do_lower_case is sentence-transformers' own lowercasing before the tokenizer; the tokenizer already does
    # what the model needs, as in e5lite.
    pooling_cfg = {
        "word_embedding_dimension": config.hidden_size,
        **{flag: mode == pooling for mode, flag in POOLING_FLAGS.items()},
        **dict.fromkeys(OTHER_POOLING_FLAGS, False),
        "include_prompt": True,
    }
    st_cfg = {
        "model_type": "SentenceTransformer",
        "prompts": dict(prompts),
        "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    }
    return {
        "modules.json": _json_bytes(MODULES),
        "sentence_bert_config.json": _json_bytes({"max_seq_length": max_length, "do_lower_case": False}),
        "1_Pooling/config.json": _json_bytes(pooling_cfg),
        "config_sentence_transformers.json": _json_bytes(st_cfg),
    }


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _publish(tmp: Path, out: Path, overwrite: bool, keep: tuple[str, ...] = ()) -> None:
    """Moves the finished folder to ``out`` by renames: ``out`` is the old folder or the new one, never a part.

    An old non-empty folder (``overwrite``) is renamed aside first and deleted once the new one is in place.
    """
    fsync(tmp)
    old = None
    if out.is_dir() and any(out.iterdir()):
        _check_target(out, overwrite)  # again: the folder may have been filled while we wrote
        old = tmp.with_suffix(".old")
        os.rename(out, old)
    elif out.is_dir():
        out.rmdir()
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    fsync(out.parent)
    if old is not None:
        for name in keep:
            if (old / name).exists():
                os.rename(old / name, out / name)
        shutil.rmtree(old)
