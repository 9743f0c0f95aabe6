"""The fast tokenizer path: `tokie` (the ``fast`` extra) behind the same ids as `tokenizers`, checked, never trusted.

`tokenizers` stays the reference (``tokenizer.TextTokenizer`` builds the exact pipeline transformers runs). tokie
encodes the same ``tokenizer.json`` many times faster and hands back one flat buffer (no object per text), but
it is another implementation, so e5lite uses it only as far as it is seen to agree:

- it is given the reference's own pipeline (serialised from the ``tokenizers.Tokenizer``), without specials
  and without truncation; the specials (the single-sequence template, e.g. ``[CLS] $A [SEP]``, ``<s> $A </s>``)
  and the truncation are applied here, vectorised, as the reference applies them (tokie 0.1.4 drops the
  closing ``</s>`` of XLM-R's template, so its own are not used); texts that are empty or whitespace only, or
  hold an added token's string ("<mask>", "[SEP]", ...), are encoded by the reference: there tokie 0.1.4 emits
  a Metaspace "▁" for whitespace that the reference drops;
- at load, ids must equal the reference's on ``PROBE`` (scripts, accents, CJK, emoji, whitespace runs, text
  that looks like specials, a text past any max length), else the fast path is not used;
- on every call, a sample of the texts (the first, the longest, and evenly spaced others) is re-encoded by the
  reference; on any difference the call is redone by the reference, the fast path is switched off for good
  and a warning names the text. A systematic difference therefore cannot pass; a difference confined to
  texts that are neither probed nor sampled could, which is why ``tokenizer_backend="tokenizers"`` exists;
- a call of at most ``SAMPLE`` texts (a query) goes to the reference alone: the sample would be all of it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import numpy as np

from .ragged import Ragged

logger = logging.getLogger("e5lite")

SAMPLE = 8  # texts per call re-encoded by the reference

PROBE = [
    "",
    " ",
    "   \t\n  ",
    "a",
    "query: ",
    "passage: ",
    "Instruct: Given a question\nQuery: why?",
    "query: how much protein should a female eat",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 "
    "grams per day.",
    "Café naïve résumé façade — Ångström, Straße, İstanbul, ǅemal",
    "東京の人口はどれくらいですか 北京是中华人民共和国的首都。 서울은 한국의 수도입니다",
    "Москва — столица России. Київ — столиця України.",
    "القاهرة هي عاصمة مصر. תל אביב",
    "नई दिल्ली भारत की राजधानी है। ঢাকা",
    "กรุงเทพมหานคร ຫຼວງພະບາງ",
    "I love pizza 🍕 and coffee ☕ on rainy days 🌧️! 👩🏽‍💻 🇸🇪",
    "ﬁ ligature, full-width ＡＢＣ１２３, ① ² ½ and a\u0301 combining, zero\u200bwidth, nbsp\u00a0here",
    "[CLS] [SEP] [PAD] [MASK] <s> </s> <pad> <unk> <mask> ##ing ▁word",
    "tabs\tand\nnewlines  and   runs of    spaces  ",
    "  leading and trailing  ",
    "https://example.com/a/b?c=1&d=two#frag user@example.org 3.14159 1,000,000 -42",
    "?!... --- ;; ((())) *** ``code`` <html>&amp;</html>",
    " ".join(f"word{i} and more text" for i in range(300)),  # past 512 tokens: truncation
    "x" * 3000,
]


def _template(reference) -> tuple[list[int], list[int]] | None:
    """The special ids the reference puts before and after a single sequence, or None when they cannot be
    told apart from the text's own ids."""
    for probe in ("a", "hello world", "x"):
        with_specials = reference.encode(probe).ids
        body = reference.encode(probe, add_special_tokens=False).ids
        for k in range(len(with_specials) - len(body) + 1):
            if body and with_specials[k : k + len(body)] == body:
                return with_specials[:k], with_specials[k + len(body) :]
    return None


class TokieFastPath:
    """tokie encoding a reference ``tokenizers.Tokenizer``'s pipeline, with the reference's specials and
    truncation applied here. Build with ``TokieFastPath.build`` (None when tokie is missing or disagrees)."""

    def __init__(self, fast, reference, prefix: list[int], suffix: list[int], max_length: int):
        self._fast, self._reference = fast, reference
        added = sorted((t.content for t in reference.get_added_tokens_decoder().values()), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added)) if added else r"(?!)")
        self.prefix = np.asarray(prefix, np.int32)
        self.suffix = np.asarray(suffix, np.int32)
        self.max_body = max_length - len(prefix) - len(suffix)

    @classmethod
    def build(cls, reference, max_length: int) -> tuple[TokieFastPath | None, str]:
        """(the fast path, "") when tokie is installed and agrees with the reference on PROBE; else
        (None, why not)."""
        try:
            import tokie
        except ImportError:
            return None, "tokie is not installed (pip install 'e5lite[fast]')"
        template = _template(reference)
        if template is None:
            return None, "the tokenizer's special-token template could not be read"
        fd, path = tempfile.mkstemp(suffix=".json", prefix="e5lite-tokenizer-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(reference.to_str())
            fast = tokie.Tokenizer.from_json(path)
            fast.no_padding()
            fast.no_truncation()
        except Exception as e:  # tokie refuses pipelines it does not implement
            return None, f"tokie cannot load this tokenizer ({type(e).__name__}: {e})"
        finally:
            os.unlink(path)
        path_ = cls(fast, reference, *template, max_length)
        if path_.max_body < 1:
            return None, f"max_length {max_length} leaves no room between the special tokens"
        bad = path_.disagreement(reference, PROBE, path_.encode(PROBE)[0], range(len(PROBE)))
        if bad is not None:
            return None, f"tokie's ids differ from tokenizers' on the probe text {PROBE[bad][:40]!r}"
        return path_, ""

    def encode(self, texts: list[str]) -> tuple[Ragged, np.ndarray]:
        """(token ids with specials, truncated; how many body tokens each text had before truncation)."""
        body, full = self._fast.encode_batch_flat(texts, add_special_tokens=False)
        body, full = body.astype(np.int32, copy=False), full.astype(np.int64)
        special = self._added.search
        blank = [i for i, t in enumerate(texts) if not t or t.isspace() or special(t)]
        if blank:  # see the module docstring: the reference encodes these few
            ref = self._reference.encode_batch_fast([texts[i] for i in blank], add_special_tokens=False)
            ref_lengths = np.fromiter((len(e.ids) for e in ref), np.int64, len(ref))
            ref_ids = np.fromiter((i for e in ref for i in e.ids), np.int32, int(ref_lengths.sum()))
            order = np.arange(len(texts))
            order[blank] = len(texts) + np.arange(len(blank))
            spliced = Ragged(np.concatenate([body, ref_ids]), np.concatenate([full, ref_lengths])).take(order)
            body, full = spliced.ids, spliced.lengths
        keep = np.minimum(full, self.max_body)
        p, q = len(self.prefix), len(self.suffix)
        lengths = keep + p + q
        starts = np.cumsum(lengths) - lengths
        out = np.empty(int(lengths.sum()), np.int32)
        for j, t in enumerate(self.prefix):
            out[starts + j] = t
        for j, t in enumerate(self.suffix):
            out[starts + p + keep + j] = t
        src_starts = np.cumsum(full) - full
        kept = int(keep.sum())
        within = np.arange(kept) - np.repeat(np.cumsum(keep) - keep, keep)
        text_of = np.repeat(np.arange(len(texts)), keep)
        out[starts[text_of] + p + within] = body[src_starts[text_of] + within]
        return Ragged(out, lengths), full

    @staticmethod
    def disagreement(reference, texts: list[str], got: Ragged, which) -> int | None:
        """The first of the texts at positions ``which`` whose ids differ from the reference's, or None."""
        which = list(which)
        want = reference.encode_batch_fast([texts[i] for i in which]) if which else []
        for i, w in zip(which, want, strict=True):
            if got[i].tolist() != w.ids:
                return i
        return None

    @staticmethod
    def sample(lengths: np.ndarray) -> list[int]:
        """The texts a call re-encodes with the reference: the first, the longest, and evenly spaced others."""
        n = len(lengths)
        if n <= SAMPLE:
            return list(range(n))
        picks = {0, int(np.argmax(lengths))} | {int(i) for i in np.linspace(0, n - 1, SAMPLE - 2)}
        return sorted(picks)
