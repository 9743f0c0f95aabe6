"""The embedding pipeline (``e5lite/pipeline.py``) and the Encoder's public calls around it: ``prepare`` of texts
and token ids (truncation from either end, refusals naming the input, windows), the in-process steps
(``vectors`` / ``run``, what ``encode`` and corpus runs use) against the host-side ``finish`` the server uses,
and the calls the server makes instead of reaching into the engine or the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEXTS

import e5lite
from e5lite import pipeline
from e5lite.errors import TextTooLongError
from e5lite.pipeline import IdsTooLongError, Recipe

LONG = "word " * 300  # past the tiny model's 128 tokens


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return e5lite.load(tiny_dir)


def test_prepare_texts_and_ids_truncated_from_either_end_or_refused(tiny):
    ids = list(range(1000, 1200))  # 200 ids, past max_length
    for direction in ("right", "left"):
        recipe = tiny.recipe(prompt_name="query", direction=direction)
        got = tiny.prepare(["a text", ids, LONG], recipe).ids
        assert got[0].tolist() == tiny.tokenize(["a text"], prompt_name="query")[0].tolist()
        assert got[1].tolist() == (ids[:128] if direction == "right" else ids[-128:])
        assert got[2].tolist() == tiny.tokenize([LONG], prompt_name="query", direction=direction)[0].tolist()
        assert all(g.dtype == np.int32 for g in got)
    left = tiny.tokenize([LONG + "end"], direction="left")[0]
    assert len(left) == 128 and left.tolist() == tiny.tokenizer.encode_left([LONG + "end"])[0].tolist()
    refuse = tiny.recipe(truncate=False)
    with pytest.raises(IdsTooLongError, match=r"^ids 1 has 200 token ids, more than the model's maximum of 128") as e:
        tiny.prepare(["fine", ids], refuse)
    assert (e.value.index, e.value.length, e.value.max_length) == (1, 200, 128)
    with pytest.raises(TextTooLongError, match=r"^text 2 is longer") as e:  # the input's index, not the text's
        tiny.prepare([ids[:5], "fine", LONG], refuse)
    assert e.value.index == 2
    with pytest.raises(TextTooLongError, match=r"^text 1 is longer"):  # texts are refused before ids
        tiny.prepare([ids, LONG], refuse)
    prepared = tiny.prepare(["x", ids[:5]], refuse)
    assert prepared.tokens == 3 + 5 and prepared.lengths.tolist() == [3, 5] and prepared.windows is None


def test_prepare_chunks_texts_and_keeps_ids_as_one_window(tiny):
    recipe = tiny.recipe(prompt_name="passage", long_inputs="chunk", chunk_overlap=8)
    prepared = tiny.prepare([LONG, [101, 7, 102], "short"], recipe)
    w = prepared.windows
    assert w.counts.tolist()[1:] == [1, 1] and w.counts[0] > 1 and w.n == 3
    assert prepared.ids[w.counts[0]].tolist() == [101, 7, 102]
    alone = tiny.prepare([LONG], recipe)
    assert [i.tolist() for i in alone.ids] == [i.tolist() for i in prepared.ids[:w.counts[0]]]
    assert prepared.lengths.tolist() == [int(alone.lengths[0]), 3, 5] and prepared.tokens == sum(prepared.lengths)
    assert tiny.prepare([[5, 6]], recipe).windows is None  # nothing to cut: token ids alone
    with pytest.raises(ValueError, match="chunk_overlap must be less than the window"):
        tiny.prepare(["x"], tiny.recipe(long_inputs="chunk", chunk_overlap=tiny.window_length()))


@pytest.mark.parametrize("options", [
    dict(), dict(normalize=False), dict(truncate_dim=16), dict(truncate_dim=16, normalize=False),
    dict(long_inputs="chunk", chunk_overlap=4), dict(long_inputs="chunk", truncate_dim=8, precision="int8")])
def test_finish_on_the_host_equals_the_in_process_steps(tiny, options):
    """The server embeds un-normalised ids in shared calls and finishes on the host; encode and corpus runs
    normalise on the device where they can. Same vectors, up to where the normalisation ran."""
    texts = TEXTS + [LONG]
    recipe = tiny.recipe(prompt_name="query", **options)
    if recipe.scalar:
        recipe = tiny.recipe(prompt_name="query", ranges=np.stack([-np.ones(8), np.ones(8)]) * 0.3, **options)
    want = tiny.encode(texts, prompt_name="query", ranges=recipe.ranges, **options)
    prepared = tiny.prepare(texts, recipe)
    rows = tiny.embed_valid_ids(prepared.ids, normalize=False)
    got = pipeline.finish(prepared, rows, recipe)
    assert got.shape == want.shape and got.dtype == want.dtype
    if recipe.scalar:
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    else:
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(tiny.embed_prepared(prepared, recipe), want)  # the corpus runs' steps
        np.testing.assert_array_equal(pipeline.quantize(want, recipe), want)


def test_lazy_prepare_tokenises_inside_the_source(tiny):
    calls = []
    tok = tiny.tokenizer

    class Counting:
        max_length = tok.max_length

        def encode_ragged(self, texts, truncate=True, offset=0):
            calls.append((len(texts), offset))
            return tok.encode_ragged(texts, truncate=truncate, offset=offset)

    prepared = pipeline.prepare(Counting(), TEXTS, tiny.recipe(prompt_name="query"), lazy=True)
    assert calls == [] and prepared.n == len(TEXTS)
    with pytest.raises(ValueError, match="a lazy Prepared"):
        prepared.ids
    part = prepared.source(2, 4)
    assert calls == [(2, 2)]
    assert [p.tolist() for p in part] == [t.tolist() for t in tiny.tokenize(TEXTS[2:4], prompt_name="query")]
    cut = tiny.recipe(truncate_dim=5)
    empty = pipeline.vectors(pipeline.prepare(tok, [], cut, lazy=True), None, cut)  # the model is not called
    assert empty.shape == (0, 5) and empty.dtype == np.float32


def test_recipe_checks_its_options(tiny):
    with pytest.raises(ValueError, match=r"^direction must be 'right' or 'left', got 'up'"):
        tiny.recipe(direction="up")
    with pytest.raises(ValueError, match="truncate_dim must be between 1 and the embedding dimension"):
        Recipe(tiny.dim, truncate_dim=tiny.dim + 1)
    with pytest.raises(ValueError, match="needs long_inputs='chunk'"):
        Recipe(tiny.dim, chunk_overlap=3)
    with pytest.raises(ValueError, match=r"ranges must have shape \(2, 8\)"):
        Recipe(tiny.dim, truncate_dim=8, precision="uint8", ranges=np.zeros((2, tiny.dim)))
    recipe = Recipe(tiny.dim, truncate_dim=8, precision="uint8")
    assert recipe.out_dim == 8 and recipe.scalar and not recipe.chunk
    recipe.check_count(2)
    with pytest.raises(ValueError, match="of a single text needs ranges"):
        recipe.check_count(1)


def test_the_servers_calls_on_the_encoder(tiny):
    ids = tiny.tokenize(["hello world", "a second text"])
    np.testing.assert_array_equal(tiny.embed_valid_ids(ids), tiny.embed_ids(ids))
    states = tiny.token_states(ids)
    assert [s.shape for s in states] == [(len(i), tiny.dim) for i in ids]
    assert tiny.decode(ids[0]) == "hello world" and "[CLS]" in tiny.decode(ids[0], skip_special_tokens=False)
    spans = tiny.token_spans(["hello world"])[0]
    assert [t[0] for t in spans] == ids[0].tolist() and spans[0][2] and spans[1][3] == (0, 5)
    assert [t[0] for t in tiny.token_spans(["hello world"], add_special_tokens=False)[0]] == ids[0][1:-1].tolist()
    assert tiny.window_length() == tiny.max_length - 2
    assert tiny.window_length("query: ") == tiny.max_length - 2 - 2  # "query", ":"
    assert tiny.vocab_size == tiny.config.vocab_size
    assert tiny.warmup(max_length=16, normalize=False)
