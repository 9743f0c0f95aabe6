"""Cutting a long text before it is tokenised, where truncation keeps only its first (or last) tokens.

Tokenising a 5 MB text to keep 512 of its tokens takes seconds; the server would spend them on the event
loop's thread pool, and the request's deadline with them. ``TextCutter`` replaces such a text with a piece of
it (its start, or its end for left truncation) that yields the same kept ids, so truncating costs about as
much for a long text as for a page.

Why a piece keeps the whole text's ids. The pipelines e5lite runs (BERT's WordPiece after a BertNormalizer and
the BertPreTokenizer; XLM-R's Unigram after a Precompiled normaliser, WhitespaceSplit and Metaspace) normalise
character by character, split the text into words at whitespace and punctuation by each character's class,
and tokenise every word on its own. So a piece tokenises each word that lies wholly inside it as the whole text
does. Only the word the cut falls in may differ: WordPiece turns a whole word into [UNK] when a part of it is
unknown, or when it is longer than 100 characters; Unigram picks its pieces over the whole word. Added tokens
("[SEP]", "<mask>") are matched in the raw text first, so a cut inside one changes the tokens before it, up to
the longest added token's length back. A piece therefore counts only the tokens of its words other than the
one at the cut that also end (start, for the end of a text) at least that length away from the cut. When more
than ``keep`` tokens count, the text's first ``keep`` tokens are among them, and one more proves the whole text
longer than ``keep`` (so a refusal without truncation stays a refusal). Otherwise the piece doubles, and a text
not much longer than the piece is tokenised whole. Pieces are cut on code points (Python's str), never inside
a character's UTF-8 bytes; a cut between the code points of one written character (an accent and its letter,
an emoji sequence) falls inside a word like any other.

Tokenizers whose normaliser or pre-tokeniser is not one of those (a byte-level BPE's regex, a Replace that
spans whitespace) are not cut: ``TextCutter.build`` gives None for them, and their texts are tokenised whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import Encoding, Tokenizer

# The first piece holds this many characters per token kept: English WordPiece averages 4 to 5 characters a
# token, code and numbers fewer, so one try nearly always does.
CHARS_PER_TOKEN = 8
SIDES = ("right", "left")

# Components that act on each character alone (normalisers), or split at characters by their class alone
# (pre-tokenisers); see the module docstring.
LOCAL_NORMALIZERS = {"BertNormalizer", "Precompiled", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents"}
LOCAL_PRE_TOKENIZERS = {"BertPreTokenizer", "WhitespaceSplit", "Whitespace", "Metaspace", "Punctuation", "Digits"}
WORD_MODELS = {"WordPiece", "Unigram"}


def _local(component: dict | None, allowed: set[str]) -> bool:
    if component is None:
        return True
    if component.get("type") == "Sequence":
        parts = component.get("normalizers") or component.get("pretokenizers") or []
        return all(_local(p, allowed) for p in parts)
    return component.get("type") in allowed


class TextCutter:
    """Cuts texts far past ``keep`` tokens (without special tokens) to a piece that tokenises to the same
    kept ids, for a ``tokenizers.Tokenizer`` that runs without truncation. Build with ``build``."""

    def __init__(self, tokenizer: Tokenizer, keep: int, first: int | None = None):
        self._tok = tokenizer
        self.keep = keep
        added = tokenizer.get_added_tokens_decoder().values()
        self.margin = max((len(t.content) for t in added), default=0)
        # ``first``: the first piece's length in characters (tests set it to cut at chosen places)
        self.first = first if first is not None else CHARS_PER_TOKEN * keep + self.margin

    @classmethod
    def build(cls, tokenizer: Tokenizer, keep: int) -> TextCutter | None:
        """A cutter for ``tokenizer`` (untruncated), or None when its pipeline is not one a piece is known to
        tokenise as the whole text does."""
        raw = json.loads(tokenizer.to_str())
        if (
            keep < 1
            or raw.get("model", {}).get("type") not in WORD_MODELS
            or not _local(raw.get("normalizer"), LOCAL_NORMALIZERS)
            or not _local(raw.get("pre_tokenizer"), LOCAL_PRE_TOKENIZERS)
        ):
            return None
        return cls(tokenizer, keep)

    def cut(self, texts: Sequence[str], side: str = "right") -> list[str]:
        """``texts``, each one far past ``keep`` tokens replaced by a piece from the end that truncation keeps
        ("right": its start; "left": its end) whose kept ids are the whole text's. A text that cannot be
        tokenised (a lone surrogate) is left whole, for the caller's tokenisation to name it."""
        if side not in SIDES:
            raise ValueError(f"side must be 'right' or 'left', got {side!r:.40}")
        out = list(texts)
        n = self.first
        pending = [i for i, t in enumerate(out) if len(t) > 2 * n]
        while pending:
            pieces = [out[i][:n] if side == "right" else out[i][-n:] for i in pending]
            try:
                encodings = self._tok.encode_batch(pieces, add_special_tokens=False)
            except Exception:
                return out
            left = []
            for i, piece, encoding in zip(pending, pieces, encodings, strict=True):
                if self._enough(encoding, len(piece), side):
                    out[i] = piece
                elif 4 * n < len(out[i]):  # the next piece is still under half the text
                    left.append(i)
            pending, n = left, 2 * n
        return out

    def _enough(self, encoding: Encoding, length: int, side: str) -> bool:
        """More than ``keep`` of the piece's tokens are the whole text's: the (keep + 1)-th from the kept end,
        and so every token before it (words and offsets only grow along a text), is neither in the word at the
        cut nor within ``margin`` characters of it."""
        words = encoding.word_ids
        if len(words) <= self.keep:
            return False
        if side == "right":
            k, cut_word = self.keep, words[-1]
            return words[k] != cut_word and encoding.offsets[k][1] <= length - self.margin
        k, cut_word = len(words) - 1 - self.keep, words[0]
        return words[k] != cut_word and encoding.offsets[k][0] >= self.margin
