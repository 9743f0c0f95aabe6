"""Resolve a model name to a local folder: a directory as is, else the Hugging Face Hub (or its cache)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ModelNotFoundError

# What an encoder needs; never the onnx/, openvino/ exports or *.bin files.
ALLOW_PATTERNS = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
]

_TRUE = {"1", "true", "yes", "on"}


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that is not a folder here is a path that is missing.
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or (len(name) > 1 and name[1] == ":")
    )


def resolve(
    model: str | os.PathLike, *, revision: str | None = None, cache_dir=None, local_files_only: bool | None = None
) -> Path:
    """A local model folder for ``model``: itself when it is a directory, else a hub snapshot.

    Honours HF_HUB_OFFLINE (read at call time) and the hub cache; raises ModelNotFoundError with a hint
    when neither the hub nor the cache has the model.
    """
    name = os.fspath(model)
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ModelNotFoundError(f"model path {name!r} is a file; pass the folder that holds config.json")
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model directory {name!r} does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=ALLOW_PATTERNS,
            local_files_only=local_files_only,
        )
    except HFValidationError as e:
        raise ModelNotFoundError(f"{name!r} is neither a local folder nor a valid hub id: {e}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"hub repository {name!r} not found (or gated: log in with `hf auth login`); "
            "for local weights pass the folder path"
        ) from None
    except LocalEntryNotFoundError:
        where = "offline mode (HF_HUB_OFFLINE) is on" if local_files_only else "the Hugging Face Hub is unreachable"
        raise ModelNotFoundError(
            f"cannot load {name!r}{'@' + revision if revision else ''}: {where} and it is not in the hub cache "
            f"({cache_dir or 'HF_HUB_CACHE'}); pass a local folder with config.json, tokenizer.json and "
            "model.safetensors instead"
        ) from None
    except Exception as e:  # network and HTTP failures come in many types across huggingface_hub versions
        raise ModelNotFoundError(
            f"cannot download {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}); pass a local folder instead"
        ) from None
    return Path(folder)
