"""A model's prompts (the prefixes put before queries and documents): one rule, stated once here.

1. A folder whose ``config_sentence_transformers.json`` declares ``prompts`` gets what sentence-transformers
   reads there: its defaults ``{"query": "", "document": ""}`` overridden by the declared ones (empty strings
   included), and its ``default_prompt_name``.
2. Else an E5-family model (its hub id or folder has ``e5`` as a word: ``e5-base-v2``,
   ``multilingual-e5-small``; see ``is_e5_family``) gets E5's: ``"query: "`` for queries, ``"passage: "`` for
   documents (named ``passage``, and ``document`` too, so that sentence-transformers' ``encode_document`` on a
   folder e5lite writes finds it). One whose name ends in ``-instruct`` gets the instruct query prefix with its
   model card's web-search task, and no document prefix.
3. Else sentence-transformers' defaults: empty query and document prompts, i.e. none.

The query side is the prompt ``query``; the document side is the first of ``document``, ``passage``, ``corpus``
the model has, as sentence-transformers' ``encode_query`` / ``encode_document`` choose (``side_prompt_name``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from .errors import E5LiteError
from .files import json_field, json_type, read_json

ST_DEFAULT_PROMPTS = {"query": "", "document": ""}
E5_PROMPTS = {"query": "query: ", "passage": "passage: ", "document": "passage: "}
INSTRUCT_TEMPLATE = "Instruct: {task}\nQuery: "
# The -instruct E5 models: queries carry a task description, documents nothing. Without a task, retrieval's
# (the one their model card gives for web search).
DEFAULT_INSTRUCT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
INSTRUCT_PROMPTS = {"query": INSTRUCT_TEMPLATE.format(task=DEFAULT_INSTRUCT_TASK), "passage": "", "document": ""}
DOCUMENT_NAMES = ("document", "passage", "corpus")  # sentence-transformers' encode_document order

# "e5" as a word: e5-base-v2, multilingual-e5-small, models--intfloat--e5-large; not "e5lite" or "gte5"
_E5_WORD = re.compile(r"(?<![a-z0-9])e5(?![a-z0-9])")


class ModelPrompts(NamedTuple):
    prompts: dict[str, str]
    default_prompt_name: str | None
    source: str  # where they come from, in words (``e5lite info`` shows it)


def instruct_prompt(task: str) -> str:
    """The query prefix of the -instruct E5 models for a one-sentence task description."""
    if not isinstance(task, str) or not task.strip():
        raise ValueError(f"task must be a non-empty str (a one-sentence task description), got {task!r}")
    return INSTRUCT_TEMPLATE.format(task=task)


def model_names(name: str, model_dir) -> list[str]:
    """The names that identify a model: the last part of the id or path it was loaded by, its folder's name and,
    in the hub cache (``models--org--name/snapshots/<sha>``), the repository's name. Not the folders above it:
    a model under ``/tmp/e5-experiments/`` is not an E5 model for that."""
    names = [str(name).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]]
    folder = Path(model_dir).resolve()
    names.append(folder.name)
    names += [p.rsplit("--", 1)[-1] for p in folder.parts if p.startswith("models--")]
    return [n.lower() for n in names if n]


def is_e5_family(name: str, model_dir) -> bool:
    """An E5 model: one of its ``model_names`` has ``e5`` as a word."""
    return any(_E5_WORD.search(n) for n in model_names(name, model_dir))


def is_instruct(name: str, model_dir) -> bool:
    """An -instruct E5 model (multilingual-e5-large-instruct): E5-family, and a name ends in ``-instruct``."""
    return is_e5_family(name, model_dir) and any(n.endswith("-instruct") for n in model_names(name, model_dir))


def read_prompts(model_dir, name: str = "") -> ModelPrompts:
    """The model's prompts by the module's rule: declared in the folder, else E5's for E5-family names, else
    sentence-transformers' empty defaults."""
    path = Path(model_dir) / "config_sentence_transformers.json"
    cfg = read_json(path, default={}, expect=dict)
    declared = json_field(path, cfg, "prompts", (dict,), default={})
    for key, value in declared.items():
        if not isinstance(value, str):
            raise E5LiteError(f"{path}: field 'prompts.{key}' must be a string, got {json_type(value)}")
    default = json_field(path, cfg, "default_prompt_name", (str,)) or None
    if declared:
        prompts, source = {**ST_DEFAULT_PROMPTS, **declared}, f"{path.name} (declared)"
    elif is_instruct(name, model_dir):
        prompts, source = dict(INSTRUCT_PROMPTS), "E5 -instruct defaults (the name ends in -instruct)"
    elif is_e5_family(name, model_dir):
        prompts, source = dict(E5_PROMPTS), "E5 defaults (the name has 'e5' as a word)"
    else:
        prompts, source = dict(ST_DEFAULT_PROMPTS), "none declared; not an E5 model, so no prefixes"
    if default is not None and default not in prompts:
        raise E5LiteError(f"{path}: default_prompt_name {default!r} is not one of the prompts {sorted(prompts)}")
    return ModelPrompts(prompts, default, source)


def side_prompt_name(prompts: dict[str, str], side: str | None) -> str | None:
    """The prompt name used for ``side``: "query" -> "query" when the model has it; "passage" or "document" ->
    the first of ``DOCUMENT_NAMES`` it has; another name -> itself when present; else None."""
    if side in ("passage", "document"):
        return next((n for n in DOCUMENT_NAMES if n in prompts), None)
    return side if side in prompts else None
