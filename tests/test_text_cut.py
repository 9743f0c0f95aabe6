"""Long texts cut before tokenising (e5lite/text_cut.py): the ids of a piece equal those of the whole text
tokenised and truncated, by `tokenizers` itself, on the real MiniLM tokenizer and Python's own docs, with the
cut placed inside a word, between the code points of one written character, inside an added token and exactly
at the kept tokens' end; from the right and from the left; and refusals without truncation stay refusals."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from e5lite.errors import TextTooLongError
from e5lite.text_cut import TextCutter
from e5lite.tokenizer import TextTokenizer

MAX_LENGTH = 64  # small, so that a page of text is "far past" it and the cuts fall in a short text


def pydoc_text() -> str:
    from pydoc_data.topics import topics
    return " ".join(topics[t] for t in ("exceptions", "types", "with", "try", "lambda", "import"))


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """`tokenizers` as transformers runs it: whole texts, truncated to MAX_LENGTH from the right or the left."""
    def tok(direction):
        t = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
        t.no_padding()
        t.enable_truncation(MAX_LENGTH, direction=direction)
        return t
    return {"right": tok("right"), "left": tok("left")}


@pytest.fixture(scope="module")
def untruncated(minilm_dir):
    t = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    t.no_padding()
    t.no_truncation()
    return t


# Words the cut can fall in: WordPiece makes a word of more than 100 characters, or one with an unknown
# character, a single [UNK] in the whole text, so a piece cut inside it has other tokens; code points that
# make one written character (an accent, an emoji sequence, a flag); CJK; an added token's string.
INSERTS = ["supercalifragilistic" * 8, "cafe\u0301wordwith👩🏽‍💻inside", "🇸🇪東京 naïve", "[SEP]x [MASK]"]


def tricky_texts(untruncated) -> list[tuple[str, int, int]]:
    """(text, start, end) of real text with each of INSERTS at ``start``..``end``, placed where the kept
    tokens end: for the right, so that the last kept tokens are the inserted word's; for the left, the first."""
    base = " ".join(pydoc_text().split())
    enc = untruncated.encode(base, add_special_tokens=False)
    keep = MAX_LENGTH - 2
    out = []
    for insert in INSERTS:
        at = enc.offsets[keep - 3][0]  # three kept tokens before the end
        out.append((base[:at] + insert + " " + base[at:], at, at + len(insert)))
        at = enc.offsets[len(enc.ids) - keep + 2][1]  # three kept tokens after the start
        out.append((base[:at] + " " + insert + base[at:], at + 1, at + 1 + len(insert)))
    return out


def cut_positions(text: str, start: int, end: int, side: str) -> range:
    """Piece lengths that put the cut on every character of the inserted word, and some way around it."""
    if side == "right":
        return range(start - 3, end + 40)
    return range(len(text) - end - 3, len(text) - start + 40)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_piece_keeps_the_ids_of_the_whole_text(reference, untruncated, side):
    cut_somewhere, tried = 0, 0
    for text, start, end in tricky_texts(untruncated):
        want = reference[side].encode(text).ids
        for n in cut_positions(text, start, end, side):
            tried += 1
            piece, = TextCutter(untruncated, MAX_LENGTH - 2, first=n).cut([text], side)
            if piece is text:  # not cut: the first pieces are too short to be sure of
                continue
            assert reference[side].encode(piece).ids == want, (side, n, piece[-30:] if side == "right" else piece[:30])
            cut_somewhere += 1
    assert cut_somewhere > tried // 4  # many positions do cut (a piece ending in the word may not)


def test_the_tokenizer_cuts_long_texts_with_identical_ids(minilm_dir, reference):
    """Through TextTokenizer (both backends, as encode and the server call it): pydoc topics, and texts
    far past the maximum, equal the reference; a text past it without truncation is still refused."""
    from pydoc_data.topics import topics
    texts = [t for t in list(topics.values())[::4] if t.strip()] + [pydoc_text(), "x " * 50_000, "東京" * 20_000]
    for backend in ("tokenizers", "auto"):
        tok = TextTokenizer.from_dir(minilm_dir, MAX_LENGTH, backend=backend)
        got = tok(texts)
        assert [g.tolist() for g in got] == [e.ids for e in reference["right"].encode_batch(texts)]
        left = tok.encode_left(texts[-3:])
        assert [g.tolist() for g in left] == [e.ids for e in reference["left"].encode_batch(texts[-3:])]
        with pytest.raises(TextTooLongError, match="text 4 is longer"):
            tok(["short"] * 3 + [texts[-3]], truncate=False, offset=1)
        with pytest.raises(TextTooLongError, match="text 10 is longer"):  # tokie's path, past 8 texts
            tok(["short"] * 9 + [texts[-3]], truncate=False, offset=1)
    # the long ones were cut to a piece, not tokenised whole
    pieces = tok.cut(texts[-3:], "right")
    assert all(len(p) < 2_000 for p in pieces) and all(t.startswith(p) for t, p in zip(texts[-3:], pieces))


def test_pipelines_a_piece_is_not_known_to_keep_are_not_cut(untruncated):
    from tokenizers import pre_tokenizers
    assert TextCutter.build(untruncated, 62) is not None
    byte_level = Tokenizer.from_str(untruncated.to_str())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert TextCutter.build(byte_level, 62) is None


def test_xlmr_pieces_keep_the_ids_of_the_whole_texts(tmp_path):
    """multilingual-e5's pipeline (a sentencepiece Unigram behind Precompiled, WhitespaceSplit and Metaspace,
    as transformers runs it: test_multilingual.py), on many scripts cut at many places, against the same
    tokenizer's ids of the whole texts (``body_ids``: untruncated) cut to the kept tokens."""
    import random

    from multilingual import corpus, write_xlmr_tokenizer
    sentences = corpus(n_per_locale=100)
    tok = TextTokenizer.from_dir(write_xlmr_tokenizer(tmp_path, sentences), MAX_LENGTH, 1, backend="tokenizers")
    rng = random.Random(0)
    texts = []
    for i in range(120):
        text = " ".join(rng.sample(sentences, 30))
        at = 440 + i % 90  # about where the first piece ends (8 characters per kept token)
        texts.append(text[:at] + rng.choice(["<mask>", "👩🏽‍💻", "e\u0301", "東京", "Straße", "Donaudampfschifffahrtsgesellschaftskapitän" * 3]) + text[at:])
    pieces = tok.cut(texts, "right")
    assert sum(len(p) < len(t) for p, t in zip(pieces, texts)) > 100
    (before, after), keep = tok.special_ids, MAX_LENGTH - 2
    whole = [b.tolist() for b in tok.body_ids(texts)]
    assert all(len(b) > keep for b in whole)
    assert [g.tolist() for g in tok(texts)] == [before + b[:keep] + after for b in whole]
    assert [g.tolist() for g in tok.encode_left(texts)] == [before + b[-keep:] + after for b in whole]
