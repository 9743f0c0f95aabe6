"""The fast tokenizer path (fast_tokenizer.py): tokie's ids equal tokenizers' on a large varied corpus, and a
difference never passes silently (refused at load, or caught on a call and redone by tokenizers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import e5lite
from conftest import TEXTS
from e5lite.errors import E5LiteError, TextTooLongError
from e5lite.fast_tokenizer import PROBE, TokieFastPath
from e5lite.tokenizer import TextTokenizer

pytest.importorskip("tokie")


def varied_corpus() -> list[str]:
    """Python's docs, multilingual sentences (Faker), the probe and parity texts, behind each E5 prompt."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from corpus import build_corpus
    from multilingual import corpus, sample_texts
    base = build_corpus(3000) + corpus(n_per_locale=150, seed=11) + sample_texts(seed=4) + PROBE + TEXTS
    return [p + t for p in ("", "query: ", "passage: ") for t in base]


@pytest.fixture(scope="module")
def texts():
    return varied_corpus()


@pytest.mark.parametrize("max_length", [512, 128, 16])
def test_tokie_equals_tokenizers_on_a_varied_corpus(minilm_dir, texts, max_length):
    fast = TextTokenizer.from_dir(minilm_dir, max_length, backend="tokie")
    ref = TextTokenizer.from_dir(minilm_dir, max_length, backend="tokenizers")
    assert fast.backend == "tokie" and ref.backend == "tokenizers"
    got, want = fast.encode_ragged(texts), ref(texts)
    assert len(got) == len(want) == len(texts)
    bad = [i for i in range(len(texts)) if got[i].tolist() != want[i].tolist()]
    assert not bad, f"{len(bad)} texts differ, first {texts[bad[0]][:60]!r}"
    assert max(len(t) for t in want) == max_length  # truncation was exercised
    assert fast.backend == "tokie"  # no call fell back


def test_truncate_false_names_the_text(minilm_dir):
    fast = TextTokenizer.from_dir(minilm_dir, 32, backend="tokie")
    with pytest.raises(TextTooLongError, match="text 7 is longer"):
        fast(["short"] * 2 + ["word " * 40] + ["x"], truncate=False, offset=5)


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory):
    from multilingual import corpus, write_xlmr_tokenizer
    return write_xlmr_tokenizer(tmp_path_factory.mktemp("xlmr"), corpus(n_per_locale=100))


@pytest.mark.slow
def test_tokie_equals_tokenizers_on_xlmr(xlmr_dir, texts):
    """The XLM-R pipeline transformers runs (Precompiled, WhitespaceSplit + Metaspace, <s> $A </s>), with text
    holding its added tokens and blank text (which the reference encodes: tokie 0.1.4 differs there)."""
    extra = ["<s> </s> <pad> <unk> <mask>", "</s> <pad>", "a <mask> b", "\n", " \t ", ""]
    fast = TextTokenizer.from_dir(xlmr_dir, 512, 1, backend="tokie")
    ref = TextTokenizer.from_dir(xlmr_dir, 512, 1, backend="tokenizers")
    got, want = fast.encode_ragged(texts + extra), ref(texts + extra)
    bad = [i for i in range(len(want)) if got[i].tolist() != want[i].tolist()]
    assert not bad, f"{len(bad)} texts differ, first {(texts + extra)[bad[0]][:60]!r}"
    assert fast.backend == "tokie"


def test_a_difference_at_load_is_refused(minilm_dir, monkeypatch):
    """A fast path that differs on the probe is not used: "auto" keeps tokenizers and says why, "tokie" fails."""
    real_encode = TokieFastPath.encode

    def drops_last(self, batch):
        ids, full = real_encode(self, batch)
        ids.ids[-1] = 0
        return ids, full

    monkeypatch.setattr(TokieFastPath, "encode", drops_last)
    auto = TextTokenizer.from_dir(minilm_dir, 512)
    assert auto.backend == "tokenizers" and "differ from tokenizers' on the probe text" in auto.fast_unavailable
    with pytest.raises(E5LiteError, match="tokenizer_backend='tokie' cannot be used: tokie's ids differ"):
        TextTokenizer.from_dir(minilm_dir, 512, backend="tokie")


def test_a_difference_on_a_call_falls_back_and_warns(minilm_dir, texts, monkeypatch, caplog):
    tok = TextTokenizer.from_dir(minilm_dir, 512, backend="tokie")
    want = TextTokenizer.from_dir(minilm_dir, 512, backend="tokenizers")(texts[:500])
    real_encode = TokieFastPath.encode

    def off_by_one(self, batch):  # a wrong id in the longest text, which the sample always includes
        ids, full = real_encode(self, batch)
        longest = int(np.argmax(full))
        ids.ids[ids.starts[longest] + 1] += 1
        return ids, full

    monkeypatch.setattr(TokieFastPath, "encode", off_by_one)
    with caplog.at_level(logging.WARNING, logger="e5lite"):
        got = tok(texts[:500], offset=1000)
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert tok.backend == "tokenizers" and "tokie's token ids differ from tokenizers' for text 1" in caplog.text
    monkeypatch.undo()
    assert tok(texts[:3])[0].tolist() == want[0].tolist()  # stays on tokenizers


def test_backend_choice_through_load(tiny_dir):
    assert e5lite.load(tiny_dir).tokenizer.backend == "tokie"
    assert e5lite.load(tiny_dir, tokenizer_backend="tokenizers").tokenizer.backend == "tokenizers"
    with pytest.raises(ValueError, match="tokenizer_backend must be one of"):
        e5lite.load(tiny_dir, tokenizer_backend="fast")
    a = e5lite.load(tiny_dir).encode(TEXTS)
    b = e5lite.load(tiny_dir, tokenizer_backend="tokenizers").encode(TEXTS)
    np.testing.assert_array_equal(a, b)


def test_a_few_texts_are_encoded_once_by_the_reference(minilm_dir, monkeypatch):
    """A call of at most SAMPLE texts would be re-encoded whole by the reference, so tokie is not run for it;
    a larger call takes the fast path."""
    from e5lite.fast_tokenizer import SAMPLE
    tok = TextTokenizer.from_dir(minilm_dir, 512, backend="tokie")
    ref = TextTokenizer.from_dir(minilm_dir, 512, backend="tokenizers")
    calls = []
    real_encode = TokieFastPath.encode
    monkeypatch.setattr(TokieFastPath, "encode",
                        lambda self, batch: calls.append(len(batch)) or real_encode(self, batch))
    few, many = TEXTS[:SAMPLE], (TEXTS * (SAMPLE + 1))[:SAMPLE + 1]
    assert [t.tolist() for t in tok(few)] == [t.tolist() for t in ref(few)] and calls == []
    assert [t.tolist() for t in tok(many)] == [t.tolist() for t in ref(many)] and calls == [SAMPLE + 1]
    assert tok.backend == "tokie"
    with pytest.raises(TextTooLongError, match="text 1 is longer"):
        tok(["short", "word " * 600], truncate=False)
