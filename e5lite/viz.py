"""Looking inside the model: attention maps of one text, and how two texts' similarity evolves layer by layer
(``e5lite attention``). Plots need matplotlib (the ``viz`` extra); the numbers do not."""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .model import forward
from .pooling import l2_normalize, mean_pool


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("plots need the viz extra (matplotlib is missing): pip install 'e5lite[viz]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _one(enc, text: str, prompt_name: str | None):
    ids = enc.tokenize([text], prompt_name=prompt_name)[0]
    return ids[None, :], np.ones((1, len(ids)), np.int32), enc.tokenizer.tokens(ids)


def attention_maps(enc, text: str, *, prompt_name: str | None = None) -> tuple[list[str], np.ndarray]:
    """(tokens, attention probabilities [L, N, S, S] float32) of one text; row s is query token s."""
    ids, mask, tokens = _one(enc, text, prompt_name)
    _, probs = forward(enc.params, enc.config, ids, mask, output_attentions=True)
    return tokens, np.asarray(probs)[:, 0]


def layer_similarity(enc, text: str, other: str, *, prompt_name: str | None = None) -> list[dict]:
    """Cosine similarity of the two texts after the embeddings (layer 0) and after each layer 1..L, of the
    mean-pooled states (what E5 embeds) and of the [CLS] states."""
    states = []
    for t in (text, other):
        ids, mask, _ = _one(enc, t, prompt_name)
        _, hidden = forward(enc.params, enc.config, ids, mask, output_hidden_states=True)
        hidden = np.asarray(hidden)[:, 0]  # [L + 1, S, D]
        states.append(
            (
                np.asarray(l2_normalize(mean_pool(hidden, np.ones(hidden.shape[:2])))),
                np.asarray(l2_normalize(hidden[:, 0])),
            )
        )
    (m1, c1), (m2, c2) = states
    return [
        {"layer": i, "cosine_mean": float(m1[i] @ m2[i]), "cosine_cls": float(c1[i] @ c2[i])} for i in range(len(m1))
    ]


def plot_attention(path, tokens: list[str], probs_NSS: np.ndarray, layer: int, heads: list[int]) -> None:
    """One heat map per head (rows: queries, columns: keys), token labels on both axes, into a PNG."""
    plt = _pyplot()
    cols = math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    size = max(3.0, 0.22 * len(tokens) + 1.5)  # room for one label per token
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    font = max(4, min(9, 220 // max(len(tokens), 1)))
    for ax, h in zip(axes.flat, heads, strict=False):  # the grid may have spare cells
        ax.imshow(probs_NSS[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"layer {layer}, head {h}", fontsize=font + 2)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=font)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=font)
        ax.set_xlabel("key", fontsize=font + 1)
        ax.set_ylabel("query", fontsize=font + 1)
    for ax in list(axes.flat)[len(heads) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity(path, rows: list[dict], text: str, other: str) -> None:
    """Cosine similarity of two texts by layer, mean-pooled and [CLS], into a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["cosine_mean"] for r in rows], marker="o", label="mean-pooled (E5's embedding)")
    ax.plot(layers, [r["cosine_cls"] for r in rows], marker="s", label="[CLS]")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("cosine similarity")
    ax.set_xticks(layers)
    ax.set_title(f"{text[:40]!r} vs {other[:40]!r}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
