"""Why a query and a passage score what they score (``e5lite explain``, ``e5lite.explain``, the explorer page).

``explain(enc, query, passage)`` runs the pair as ``encode_queries`` / ``encode_passages`` prompt them through
``model.forward`` once and returns plain JSON data: the tokens (the prompt's among them), every layer's and
head's attention, the cosine of the two texts after each layer (mean-pooled and [CLS], as ``e5lite attention
--compare``), and the final score split over token pairs. With mean pooling the cosine is a sum over pairs:

    cos(q, p) = q̄ · p̄ / (‖q̄‖ ‖p̄‖) = Σi Σj (hi · gj) / (n · m · ‖q̄‖ · ‖p̄‖)

(hi the n query tokens' last hidden states, gj the m passage tokens', q̄ and p̄ their means), so entry [i][j] of
``contributions`` is one term and the matrix sums to the cosine. ``render_html`` puts the data into the
self-contained page ``explorer.html`` (inline JS and CSS, no request of any kind).
"""

from __future__ import annotations

import base64
import functools
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from .config import BertConfig
from .errors import InputError
from .files import write_atomic
from .model import Params, forward
from .prompts import side_prompt_name
from .tokenizer import TextTokenizer

# Cosine is blind to a vector's length, so mean_sqrt_len (a sum over sqrt(n)) has mean pooling's score and split.
DECOMPOSABLE = ("mean", "mean_sqrt_len")
BUCKET = 16  # pair lengths are padded to a multiple of this: a few compiled shapes, not one per length
PAGE = "explorer.html"
DATA_MARK = "__E5LITE_DATA__"  # where the page template takes its JSON blob


class Explainable(Protocol):
    """What ``explain`` needs of an encoder: ``e5lite.Encoder``'s public attributes and methods."""

    @property
    def params(self) -> Params: ...
    @property
    def config(self) -> BertConfig: ...
    @property
    def tokenizer(self) -> TextTokenizer: ...
    @property
    def pooling(self) -> str: ...
    @property
    def prompts(self) -> dict[str, str]: ...
    @property
    def model_dir(self) -> Path: ...

    def prompt_prefix(self, prompt_name: str | None = None) -> str: ...
    def tokenize(self, texts: Any, *, prompt: str | None = None, truncate: bool = True) -> list[np.ndarray]: ...


def side_prompt(enc: Explainable, side: str) -> str:
    """The prefix ``encode_queries`` (``side="query"``) or ``encode_passages`` ("passage") puts before a text:
    the side's prompt, else the model's default prompt, else none."""
    return enc.prompt_prefix(side_prompt_name(enc.prompts, side))


@functools.partial(jax.jit, static_argnames="config")
def _states(params: Params, config: BertConfig, ids_BS, mask_BS):
    """Every layer's hidden states [L + 1, B, S, D] and attention probabilities [L, B, N, S, T]."""
    _, hidden, probs = forward(params, config, ids_BS, mask_BS, output_hidden_states=True, output_attentions=True)
    return hidden, probs


def run_texts(enc: Explainable, ids: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per id sequence: (hidden states [L + 1, len, D] float32, attention [L, N, len, len] float32), from one
    padded batch. Padding keys get probability 0, so the real tokens' rows are those of the text run alone."""
    S = -(-max(len(t) for t in ids) // BUCKET) * BUCKET
    S = min(S, enc.config.max_tokens)
    ids_BS = np.zeros((len(ids), S), np.int32)
    mask_BS = np.zeros((len(ids), S), np.int32)
    for b, t in enumerate(ids):
        ids_BS[b, : len(t)], mask_BS[b, : len(t)] = t, 1
    hidden, probs = _states(enc.params, enc.config, ids_BS, mask_BS)
    hidden, probs = np.asarray(hidden, np.float32), np.asarray(probs, np.float32)
    return [(hidden[:, b, : len(t)], probs[:, b, :, : len(t), : len(t)]) for b, t in enumerate(ids)]


def contributions(h_nD: np.ndarray, g_mD: np.ndarray) -> np.ndarray:
    """The cosine of the two texts' mean-pooled states as a sum over token pairs: [n, m] float64, entry [i][j]
    = (hi · gj) / (n · m · ‖q̄‖ · ‖p̄‖). Computed in float64 so that the sum holds to rounding."""
    h, g = h_nD.astype(np.float64), g_mD.astype(np.float64)
    q_D, p_D = h.mean(0), g.mean(0)
    scale = float(len(h) * len(g) * np.linalg.norm(q_D) * np.linalg.norm(p_D))
    return (h @ g.T) / max(scale, 1e-30)


def cosine(a_D: np.ndarray, b_D: np.ndarray) -> float:
    a, b = a_D.astype(np.float64), b_D.astype(np.float64)
    return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-30)


def layer_cosines(hq_LnD: np.ndarray, hp_LmD: np.ndarray) -> list[dict]:
    """After the embeddings (layer 0) and each layer 1..L: the two texts' cosine, mean-pooled and [CLS]."""
    return [
        {"layer": i, "cosine_mean": cosine(q.mean(0), p.mean(0)), "cosine_cls": cosine(q[0], p[0])}
        for i, (q, p) in enumerate(zip(hq_LnD, hp_LmD, strict=True))
    ]


def prompt_span(enc: Explainable, ids: np.ndarray, prompt: str) -> list[int]:
    """[start, stop) of the prompt's tokens in ``ids`` (after the opening special tokens), [k, k] when the text
    has no prompt or the prompt's tokens did not survive as such."""
    start = len(enc.tokenizer.special_ids[0])
    body = enc.tokenizer.body_ids([prompt])[0] if prompt else np.zeros(0, np.int32)
    stop = start + len(body)
    return [start, stop] if len(body) and np.array_equal(ids[start:stop], body) else [start, start]


def _check(enc: Explainable, query: object, passage: object) -> None:
    for name, text in (("query", query), ("passage", passage)):
        if not isinstance(text, str) and not (name == "passage" and text is None):
            raise InputError(f"{name} must be a str, got {type(text).__name__}")
    if passage is not None and enc.pooling not in DECOMPOSABLE:
        raise InputError(
            f"explain splits the cosine of mean-pooled vectors over token pairs; this model pools with "
            f"{enc.pooling!r}, whose score is not such a sum (poolings explain can split: {', '.join(DECOMPOSABLE)})"
        )


def _rounded(a: np.ndarray, digits: int = 7) -> list:
    """Nested lists of ``a`` to ``digits`` significant digits: short JSON that sums as the exact values do."""
    return np.vectorize(lambda x: float(f"{x:.{digits}g}"), otypes=[float])(a).tolist()


def top_pairs(c_nm: np.ndarray, q_tokens: list[str], p_tokens: list[str], k: int = 10) -> list[dict]:
    """The ``k`` token pairs that add the most to the score (largest contributions first)."""
    order = np.argsort(-c_nm, axis=None, kind="stable")[:k]
    return [
        {
            "query_index": int(i),
            "passage_index": int(j),
            "query_token": q_tokens[i],
            "passage_token": p_tokens[j],
            "contribution": float(f"{c_nm[i, j]:.7g}"),
        }
        for i, j in zip(*np.unravel_index(order, c_nm.shape), strict=True)
    ]


def explain(
    enc: Explainable,
    query: str,
    passage: str | None = None,
    *,
    query_prompt: str | None = None,
    passage_prompt: str | None = None,
    top: int = 10,
) -> dict[str, Any]:
    """The data of the explorer page for one text (``passage=None``: its tokens and attention) or a pair,
    prompted as ``encode_queries`` / ``encode_passages`` prompt them unless ``query_prompt`` / ``passage_prompt``
    say otherwise ("" for none), truncated to the model's max length. JSON-ready: ``query_tokens``,
    ``passage_tokens``, ``query_prompt_span`` ([start, stop) of the prompt's tokens), ``cosine`` (the model's
    score of the prompted pair), ``contributions`` [query tokens][passage tokens] summing to ``cosine``,
    ``top_pairs``, ``layers`` (the cosine after each layer) and ``attentions`` ({"query": [layer][head][token]
    [token], "passage": ...}, row = the attending token)."""
    _check(enc, query, passage)
    sides = {"query": (query, side_prompt(enc, "query") if query_prompt is None else query_prompt)}
    if passage is not None:
        sides["passage"] = (passage, side_prompt(enc, "passage") if passage_prompt is None else passage_prompt)
    ids = [enc.tokenize([text], prompt=prompt)[0] for text, prompt in sides.values()]
    states = run_texts(enc, ids)
    data: dict[str, Any] = {
        "model": enc.model_dir.name,
        "pooling": enc.pooling,
        "num_layers": enc.config.num_hidden_layers,
        "num_heads": enc.config.num_attention_heads,
        "attentions": {},
    }
    for (side, (text, prompt)), t, (_, probs) in zip(sides.items(), ids, states, strict=True):
        data |= {
            f"{side}_text": text,
            f"{side}_prompt": prompt,
            f"{side}_tokens": enc.tokenizer.tokens(t),
            f"{side}_prompt_span": prompt_span(enc, t, prompt),
        }
        data["attentions"][side] = probs.round(6).tolist()
    if passage is None:
        return data
    (hq, _), (hp, _) = states
    c_nm = contributions(hq[-1], hp[-1])
    data |= {
        "cosine": cosine(hq[-1].mean(0), hp[-1].mean(0)),
        "contributions": _rounded(c_nm),
        "top_pairs": top_pairs(c_nm, data["query_tokens"], data["passage_tokens"], top),
        "layers": layer_cosines(hq, hp),
    }
    return data


def page_data(data: dict[str, Any]) -> dict[str, Any]:
    """``explain``'s data as the page reads it: the attentions (most of the numbers) as one base64 string of
    bytes per text, probability × 255 rounded ([layer][head][token][token] row-major), which is what the
    page can show and keeps a 64-token pair's page well under 1 MB; everything else as it is."""
    packed = {}
    for side, probs in data["attentions"].items():
        b = np.rint(np.asarray(probs, np.float32) * 255).astype(np.uint8)
        packed[side] = base64.b64encode(b.tobytes()).decode("ascii")
    return {k: v for k, v in data.items() if k != "attentions"} | {"attentions_uint8": packed}


def blob(data: dict[str, Any] | None) -> str:
    """JSON that may stand inside a <script> element: no "<", ">" or "&" left to end it early."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: dict[str, Any] | None, *, live: dict[str, Any] | None = None) -> str:
    """The explorer page with ``explain``'s ``data`` in it (None: no explanation yet); ``live``: the server's
    settings when the page asks a running server (``POST /explorer``) for new explanations."""
    template = resources.files("e5lite").joinpath(PAGE).read_text(encoding="utf-8")
    payload = {"explanation": None if data is None else page_data(data), "live": live}
    return template.replace(DATA_MARK, blob(payload), 1)


def cmd_explain(args) -> None:
    """``e5lite explain QUERY [PASSAGE] [--html FILE] [--json FILE]``; without either, a summary on stdout."""
    from .encoder import load

    for flag, path, suffix in (("--html", args.html, ".html"), ("--json", args.json, ".json")):
        if path is not None and not Path(path).parent.is_dir():
            raise InputError(f"{flag} {path}: folder {str(Path(path).parent)!r} does not exist")
        if path is not None and Path(path).suffix.lower() not in (suffix, ".htm" if suffix == ".html" else suffix):
            raise InputError(f"{flag} {path}: use a {suffix} suffix")
    enc = load(args.model, revision=args.revision, max_length=args.max_length)
    data = explain(enc, args.query, args.passage, query_prompt=args.query_prompt, passage_prompt=args.passage_prompt)
    if args.json:
        write_atomic(Path(args.json), json.dumps(data, ensure_ascii=False).encode())
        print(f"wrote the data to {args.json}", file=sys.stderr)
    if args.html:
        write_atomic(Path(args.html), render_html(data).encode())
        print(f"wrote the page to {args.html} (open it in a browser; it needs no network)", file=sys.stderr)
    print(summary(data))


def summary(data: dict[str, Any]) -> str:
    """A few lines for the terminal: the prompts, the score, the layer table and the top pairs."""
    lines = [f"query:   {data['query_prompt']!r} + {data['query_text'][:80]!r} ({len(data['query_tokens'])} tokens)"]
    if "cosine" not in data:
        return "\n".join(lines)
    lines.append(
        f"passage: {data['passage_prompt']!r} + {data['passage_text'][:80]!r} ({len(data['passage_tokens'])} tokens)"
    )
    lines.append(
        f"cosine {data['cosine']:.4f} = the sum of {len(data['query_tokens'])} x "
        f"{len(data['passage_tokens'])} token-pair contributions"
    )
    lines.append("| after | cosine (mean-pooled) | cosine ([CLS]) |\n|---|---|---|")
    for r in data["layers"]:
        after = "embeddings" if r["layer"] == 0 else f"layer {r['layer'] - 1}"
        lines.append(f"| {after} | {r['cosine_mean']:.4f} | {r['cosine_cls']:.4f} |")
    lines.append("top pairs (query token -> passage token: contribution):")
    lines += [f"  {p['query_token']} -> {p['passage_token']}: {p['contribution']:+.5f}" for p in data["top_pairs"]]
    return "\n".join(lines)
