"""Checks that e5lite's embeddings match transformers and sentence-transformers on a fixed set of texts.

Usage:
    python tools/parity.py intfloat/e5-base-v2
    python tools/parity.py /path/to/local/model --max-length 128
    python tools/parity.py intfloat/e5-small-v2 --dtype bfloat16 --revision main

MODEL is a Hugging Face Hub id or a local folder (config.json, tokenizer.json, model.safetensors).
Three checks run on the same ~24 built-in texts (queries, passages, non-ASCII, empty, over-long):

* token ids: e5lite's tokenizer against transformers' AutoTokenizer (same truncation);
* transformers: AutoModel (eager attention, float32) fed e5lite's token ids, pooled as e5lite pools;
  compares last hidden states over real tokens and the normalised embeddings from ``Encoder.encode``;
* sentence-transformers: the folder's own pipeline (when it has modules.json), end to end.

Exit status 0 when all checks pass: with --dtype float32, every normalised embedding within 1e-5 (max abs
diff) and hidden states within 10x that; with bfloat16/float16, min cosine >= 1 - 1e-3 (hidden states are
reported, not checked). --tolerance replaces 1e-5 or 1e-3. Exit 1 on a failed check or a model that
cannot be loaded. torch, transformers and sentence-transformers are needed here only, not by e5lite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

import e5lite
from e5lite import hub

_PARAGRAPH = ("The river rises in the hills north of the town and runs south for about forty kilometres "
              "before it joins the sea. In spring the water is high and brown with mud; by late summer it "
              "is low and clear enough to see the stones on the bottom. ")

# Mixed on purpose: prefixes as E5 expects them, lengths across several padding buckets, text that the
# WordPiece normaliser rewrites (accents, CJK, emoji), degenerate inputs, and two texts that get truncated.
TEXTS = [
    "query: how tall is mount everest",
    "query: what is the boiling point of water at sea level",
    "query: who wrote the theory of general relativity",
    "query: best way to store fresh basil",
    "query: 2 + 2",
    "query: capital of australia",
    "passage: Mount Everest is the highest mountain above sea level, at about 8,849 metres.",
    "passage: At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
    "passage: Albert Einstein published the general theory of relativity in 1915. It describes gravity "
    "as the curvature of spacetime caused by mass and energy, and it predicted effects such as the "
    "bending of light around the Sun, later confirmed during a solar eclipse in 1919.",
    "passage: Canberra is the capital city of Australia. It was chosen as a compromise between Sydney "
    "and Melbourne and was planned from the start as a capital.",
    "passage: Basil keeps best at room temperature with its stems in a glass of water, like cut flowers.",
    "passage: " + " ".join(f"Step {i}: stir the mixture, wait one minute, then check the colour." for i in range(1, 9)),
    "query: café crème brûlée naïve façade",
    "passage: Der Bodensee liegt zwischen Deutschland, Österreich und der Schweiz.",
    "query: 東京の人口はどれくらいですか",
    "passage: 北京是中华人民共和国的首都。",
    "query: Москва — столица России",
    "passage: I love pizza 🍕 and coffee ☕ on rainy days 🌧️!",
    "",
    "   \t\n  ",
    "?!... --- ;; ((())) ***",
    "query: https://example.com/a/b?c=1&d=two#frag user@example.org",
    "passage: " + _PARAGRAPH * 4,   # ~200 tokens: over 128, under 256
    "passage: " + _PARAGRAPH * 20,  # ~1000 tokens: truncated even at 512
]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def torch_pool(hidden, mask, mode: str):
    """The pooling modes of e5lite.pooling, in torch (same clamps), so the reference pools independently."""
    import torch
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, -1e9).max(dim=1).values
    total, count = (hidden * m).sum(dim=1), m.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return total / count
    if mode == "mean_sqrt_len":
        return total / torch.sqrt(count)
    raise ValueError(f"unknown pooling mode {mode!r}")


def check_token_ids(folder: Path, enc, texts: list[str]) -> int:
    """How many texts AutoTokenizer turns into exactly e5lite's ids (with the same max_length)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    theirs = tok(texts, truncation=True, max_length=enc.max_length)["input_ids"]
    return sum(list(a) == list(b) for a, b in zip(enc.tokenizer(texts), theirs))


def reference_transformers(folder: Path, enc, texts: list[str], batch_size: int):
    """(max abs diff of last hidden states over real tokens, normalised reference embeddings [n, dim]).

    Both models get the same padded e5lite token ids, so this isolates the forward pass and pooling.
    """
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModel

    # transformers 4.56 renamed torch_dtype to dtype; always load fp32, the reference whatever e5lite runs.
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", **{dtype_kw: torch.float32})
    model.eval()
    forward = jax.jit(e5lite.forward, static_argnums=1)  # config is a hashable frozen dataclass

    ids = enc.tokenizer(texts)
    pad = enc.tokenizer.pad_token_id
    hidden_diff, out = 0.0, []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        length = max(len(t) for t in chunk)
        input_ids = np.full((len(chunk), length), pad, dtype=np.int32)
        mask = np.zeros_like(input_ids)
        for r, t in enumerate(chunk):
            input_ids[r, :len(t)], mask[r, :len(t)] = t, 1
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(input_ids).long(),
                        attention_mask=torch.from_numpy(mask).long()).last_hidden_state
            emb = torch.nn.functional.normalize(torch_pool(ref, torch.from_numpy(mask), enc.pooling), dim=-1)
        ours = np.asarray(forward(enc.params, enc.config, input_ids, mask), dtype=np.float32)
        # Padding positions are never pooled and differ by construction, so only real tokens count.
        diff = np.abs(ours - ref.numpy())[mask.astype(bool)]
        hidden_diff = max(hidden_diff, float(diff.max()))
        out.append(emb.numpy())
    return hidden_diff, np.concatenate(out)


def reference_sentence_transformers(folder: Path, enc, texts: list[str], batch_size: int):
    """Normalised embeddings [n, dim] from the folder's sentence-transformers pipeline, in float32."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu", model_kwargs={"dtype": torch.float32})
    st.max_seq_length = enc.max_length  # a --max-length override must apply to both sides
    # prompt="" on both sides: a default_prompt_name in the folder would otherwise be prepended again.
    return st.encode(texts, prompt="", batch_size=batch_size, normalize_embeddings=True,
                     show_progress_bar=False, convert_to_numpy=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="hub id (intfloat/e5-base-v2) or local model folder")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-length", type=int, default=None, help="token limit (default: the model's own)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="float32: max abs diff of normalised embeddings (default 1e-5; hidden states 10x); "
                         "half dtypes: allowed 1 - min cosine (default 1e-3)")
    args = ap.parse_args(argv)

    try:
        folder = hub.resolve(args.model, revision=args.revision)
        enc = e5lite.load(str(folder), dtype=args.dtype, max_length=args.max_length)
    except (e5lite.E5LiteError, ValueError) as e:  # ModelNotFoundError, bad weights, bad --max-length
        print(f"parity: {e}", file=sys.stderr)
        return 1

    # The reference stacks print weight-loading bars and warnings that would bury the table.
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    half = args.dtype != "float32"
    tol = args.tolerance if args.tolerance is not None else (1e-3 if half else 1e-5)
    texts = list(TEXTS)
    lengths = [len(t) for t in enc.tokenizer(texts)]
    print(f"model   {folder}")
    print(f"e5lite  {enc!r}")
    print(f"texts   {len(texts)}, {min(lengths)}-{max(lengths)} tokens, "
          f"{sum(n == enc.max_length for n in lengths)} at max_length {enc.max_length}; jax on {jax.default_backend()}")

    ours = enc.encode(texts, prompt="", normalize=True, batch_size=args.batch_size)
    rows = []  # (reference, max abs diff, min cosine or None, passed or None when only reported)

    def emb_row(name, ref):
        diff, cos = float(np.abs(ours - ref).max()), float(cosine_rows(ours, ref).min())
        rows.append((name, diff, cos, cos >= 1 - tol if half else diff <= tol))

    same_ids = check_token_ids(folder, enc, texts)
    hidden_diff, ref_a = reference_transformers(folder, enc, texts, args.batch_size)
    rows.append(("transformers: hidden", hidden_diff, None, None if half else hidden_diff <= 10 * tol))
    emb_row("transformers: embedding", ref_a)
    if (folder / "modules.json").is_file():
        emb_row("sentence-transformers", reference_sentence_transformers(folder, enc, texts, args.batch_size))
        st_note = None
    else:
        st_note = "sentence-transformers: skipped (no modules.json)"

    limit = f"min cosine >= {1 - tol:g}" if half else f"max abs diff <= {tol:g} (hidden {10 * tol:g})"
    print(f"\n{'reference':<26}{'max abs diff':>14}{'min cosine':>14}{'texts':>7}  {'dtype':<10}result")
    for name, diff, cos, ok in rows:
        result = "info" if ok is None else "ok" if ok else "FAIL"
        cos_s = "-" if cos is None else f"{cos:.8f}"
        print(f"{name:<26}{diff:>14.3e}{cos_s:>14}{len(texts):>7}  {args.dtype:<10}{result}")
    ids_ok = same_ids == len(texts)
    print(f"{'token ids vs AutoTokenizer':<26}{f'{same_ids}/{len(texts)} identical':>28}{'':>7}  "
          f"{'':<10}{'ok' if ids_ok else 'FAIL'}")
    if st_note:
        print(st_note)
    passed = ids_ok and all(ok is not False for *_, ok in rows)
    print(f"\n{'PASS' if passed else 'FAIL'} ({limit})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
