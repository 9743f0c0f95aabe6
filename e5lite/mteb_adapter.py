"""An e5lite ``Encoder`` as an MTEB model: ``mteb.evaluate(MTEBEncoder(enc), tasks)``.

Needs the ``mteb`` extra (``pip install 'e5lite[mteb]'``); ``import e5lite`` never imports mteb.

```python
import mteb
import e5lite
from e5lite.mteb_adapter import MTEBEncoder

model = MTEBEncoder(e5lite.load("intfloat/e5-base-v2"))
results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact"]))
print(results.task_results[0].get_score())          # main score (ndcg_at_10)
```

Prompts follow mteb's sentence-transformers wrapper: a prompt the model's ``config_sentence_transformers.json``
names after the task (``"{task}-{query|document}"``, ``"{task}"``, ``"{task type}-{query|document}"``,
``"{task type}"``) wins; otherwise queries get the ``query_prompt_name`` prompt (E5: ``"query: "``), documents the
``passage_prompt_name`` prompt (E5: ``"passage: "``) — none when the model has no prompt of that name, as
``e5lite eval`` does — and inputs without a prompt type (STS, classification, clustering, ...) the model's
default prompt (``default_prompt_name``), else none. Embeddings are L2-normalised; similarity is cosine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INSTALL_HINT = "the MTEB adapter needs mteb: pip install 'e5lite[mteb]'"


def _require_mteb():
    try:
        import mteb
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return mteb


def _hub_name_and_revision(model_dir: Path) -> tuple[str, str]:
    """``org/name`` and the commit for a Hugging Face cache snapshot (``models--org--name/snapshots/<sha>``),
    else ``local/<folder name>`` and ``local``."""
    repo = model_dir.parent.parent.name
    if model_dir.parent.name == "snapshots" and repo.startswith("models--") and "--" in repo[8:]:
        return repo[8:].replace("--", "/", 1), model_dir.name
    return f"local/{model_dir.name}", "local"


class MTEBEncoder:
    """Satisfies mteb 2.x's ``EncoderProtocol`` (``encode``, ``similarity``, ``similarity_pairwise``,
    ``mteb_model_meta``) by calling the public ``Encoder`` API.

    ``model_name`` / ``revision`` name the results in mteb's cache (default: taken from a hub snapshot path,
    else ``local/<folder>``). ``batch_size`` caps texts per batch (default: the engine's token budget alone);
    mteb's ``encode_kwargs["batch_size"]`` only sizes its data loader, since results do not depend on it.
    A prompt name of ``None`` means no prompt.
    """

    def __init__(
        self,
        encoder,
        *,
        query_prompt_name: str | None = "query",
        passage_prompt_name: str | None = "passage",
        batch_size: int | None = None,
        model_name: str | None = None,
        revision: str | None = None,
    ):
        _require_mteb()
        from mteb.models import ModelMeta

        self.encoder = encoder
        self.query_prompt_name = query_prompt_name
        self.passage_prompt_name = passage_prompt_name
        self.batch_size = batch_size
        guess_name, guess_rev = _hub_name_and_revision(Path(encoder.model_dir).resolve())
        dtype = getattr(getattr(encoder, "dtype", None), "name", "float32")
        import jax

        self.mteb_model_meta = ModelMeta.model_validate(
            ModelMeta.create_empty().model_dump()
            | dict(
                name=model_name or guess_name,
                revision=revision or guess_rev,
                embed_dim=encoder.dim,
                max_tokens=encoder.max_length,
                similarity_fn_name="cosine",
                framework=["JAX"],
                n_parameters=int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(encoder.params))),
                use_instructions=bool(query_prompt_name or passage_prompt_name),
                modalities=["text"],
                # a bfloat16 run is its own experiment in mteb's results cache, not the float32 result
                experiment_kwargs=None if dtype == "float32" else {"dtype": dtype},
            )
        )

    def prompt(self, task_metadata, prompt_type) -> str:
        """The prefix put before each input for this task and prompt type (``""`` for none)."""
        enc, kind = self.encoder, getattr(prompt_type, "value", prompt_type)  # "query" | "document" | None
        name, task_type = getattr(task_metadata, "name", None), getattr(task_metadata, "type", None)
        for key in (f"{name}-{kind}" if kind else None, name, f"{task_type}-{kind}" if kind else None, task_type):
            if key and key in enc.prompts:
                return enc.prompt_for(key)
        if kind is None:
            return enc.prompt_prefix()  # the model's default prompt, or ""
        wanted = {"query": self.query_prompt_name, "document": self.passage_prompt_name}.get(kind)
        return enc.prompt_for(wanted)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs):
        """``inputs``: mteb's DataLoader of batches, each a dict whose ``"text"`` is a list of str.
        Returns float32 [n, dim], L2-normalised, in input order."""
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            raise ValueError(f"e5lite embeddings are float32; encode_kwargs precision={precision!r} is not supported")
        texts = [text for batch in inputs for text in batch["text"]]  # one call: the engine plans all texts at once
        return self.encoder.encode(
            texts,
            prompt=self.prompt(task_metadata, prompt_type),
            normalize=True,
            batch_size=self.batch_size,
            show_progress_bar=kwargs.get("show_progress_bar"),
        )

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim

        return pairwise_cos_sim(embeddings1, embeddings2)

    def __repr__(self):
        return f"MTEBEncoder({self.encoder!r}, name={self.mteb_model_meta.name!r})"
