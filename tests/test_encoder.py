"""Encoder behaviour: batching, input checks, prompts, max length, tokenizer fallback."""

from __future__ import annotations

import json

import numpy as np
import pytest

import e5lite
from conftest import TEXTS


@pytest.mark.slow
def test_batch_invariance(minilm):
    texts = TEXTS + [f"sentence number {i} about {'many ' * (3 * i)}things" for i in range(8)]
    alone = np.stack([minilm.encode(t) for t in texts])
    for bs in (3, 32):
        np.testing.assert_allclose(minilm.encode(texts, batch_size=bs), alone, atol=1e-6, rtol=0)
    # a text's embedding does not depend on its batch-mates
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(texts))
    shuffled = minilm.encode([texts[i] for i in perm], batch_size=5)
    np.testing.assert_allclose(shuffled, alone[perm], atol=1e-6, rtol=0)
    np.testing.assert_allclose(minilm.encode([texts[2], "x"] * 3, batch_size=4)[::2], alone[[2, 2, 2]],
                               atol=1e-6, rtol=0)


def test_output_shapes_and_order(tiny):
    assert tiny.encode([]).shape == (0, tiny.dim)
    assert tiny.encode([]).dtype == np.float32
    one = tiny.encode("hello")
    assert one.shape == (tiny.dim,) and one.dtype == np.float32
    many = tiny.encode(["hello", "a much longer text " * 10, "hello"], batch_size=2)
    np.testing.assert_allclose(many[0], one, atol=1e-6)
    np.testing.assert_allclose(many[0], many[2], atol=1e-6, rtol=0)  # different batches, same result
    assert not np.allclose(many[0], many[1])
    assert tiny.encode(("a", "b")).shape == (2, tiny.dim)  # any sequence of str


def test_empty_and_huge_texts(tiny):
    e = tiny.encode(["", "   ", "x" * 100_000, "word " * 100_000])
    assert np.isfinite(e).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert [len(t) for t in tiny.tokenizer(["", "word " * 100_000])] == [2, tiny.max_length]


@pytest.mark.parametrize("bad, kind", [(None, "NoneType"), (b"bytes", "bytes"), (3, "int"), (2.5, "float")])
def test_non_strings_raise_type_error_naming_index(tiny, bad, kind):
    with pytest.raises(TypeError, match=rf"texts\[2\] is {kind}"):
        tiny.encode(["ok", "fine", bad, "ok"])


def test_bad_containers(tiny):
    with pytest.raises(TypeError, match="bytes"):
        tiny.encode(b"raw bytes")
    with pytest.raises(TypeError, match="int"):
        tiny.encode(5)
    with pytest.raises(ValueError, match="batch_size"):
        tiny.encode(["a"], batch_size=0)


def test_prompts(tiny):
    assert tiny.prompts == {"query": "query: ", "passage": "passage: ", "document": "passage: "}  # an E5 name
    np.testing.assert_array_equal(tiny.encode_queries(["cats"]), tiny.encode(["query: cats"]))
    np.testing.assert_array_equal(tiny.encode_passages(["cats"]), tiny.encode(["cats"], prompt="passage: "))
    np.testing.assert_array_equal(tiny.encode(["cats"], prompt_name="passage"), tiny.encode(["passage: cats"]))
    with pytest.raises(ValueError, match="one of prompt, prompt_name and task"):
        tiny.encode(["cats"], prompt="query: ", prompt_name="query")
    with pytest.raises(ValueError, match="unknown prompt_name 'q'.*document, passage, query"):
        tiny.encode(["cats"], prompt_name="q")


def test_prompts_from_sentence_transformers_config(tiny_copy):
    (tiny_copy / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"search": "search_query: ", "doc": "search_document: "}, "default_prompt_name": "search"}))
    enc = e5lite.load(tiny_copy)
    # as sentence-transformers reads them: its empty query and document prompts, then the declared ones
    assert enc.prompts == {"query": "", "document": "", "search": "search_query: ", "doc": "search_document: "}
    np.testing.assert_array_equal(enc.encode(["x"]), enc.encode(["search_query: x"], prompt=""))
    np.testing.assert_array_equal(enc.encode_queries(["x"]), enc.encode(["x"], prompt=""))  # ST's encode_query
    with pytest.raises(ValueError, match="known: doc, document, query, search"):
        enc.encode(["x"], prompt_name="passage")


def test_max_length_resolution(tiny_copy):
    assert e5lite.load(tiny_copy).max_length == 128  # min(model_max_length 512, max_position_embeddings 128)
    assert e5lite.load(tiny_copy, max_length=16).max_length == 16
    with pytest.raises(ValueError, match="max_length"):
        e5lite.load(tiny_copy, max_length=1000)
    (tiny_copy / "sentence_bert_config.json").write_text('{"max_seq_length": 40}')
    enc = e5lite.load(tiny_copy)
    assert enc.max_length == 40
    assert len(enc.tokenizer(["word " * 100])[0]) == 40


def test_vocab_txt_fallback(tiny_copy, tiny):
    (tiny_copy / "tokenizer.json").unlink()
    enc = e5lite.load(tiny_copy)
    texts = ["Hello, World! Café naïve", "query: how much protein"]
    assert [t.tolist() for t in enc.tokenizer(texts)] == [t.tolist() for t in tiny.tokenizer(texts)]


def test_dtypes(tiny_dir):
    f32 = e5lite.load(tiny_dir)
    bf16 = e5lite.load(tiny_dir, dtype="bfloat16")
    assert bf16.params.layers.q_DNK.dtype == np.dtype("bfloat16")
    a, b = f32.encode(TEXTS), bf16.encode(TEXTS)
    assert b.dtype == np.float32
    assert (a * b).sum(1).min() > 0.99
    with pytest.raises(ValueError, match="unsupported dtype"):
        e5lite.load(tiny_dir, dtype="int8")


@pytest.mark.slow
def test_embed_ids_equals_encode(minilm):
    """encode() = tokenize + embed_ids, on real text with E5's prompts, packed and padded batches alike."""
    texts = TEXTS + [f"sentence number {i} about {'many ' * (7 * i)}things" for i in range(12)]
    for prompt in ("query: ", "passage: "):  # given: MiniLM has none of its own
        ids = minilm.tokenize(texts, prompt=prompt)
        assert [t.tolist() for t in ids] == [t.tolist() for t in minilm.tokenizer([prompt + t for t in texts])]
        want = minilm.encode(texts, prompt=prompt)
        np.testing.assert_allclose(minilm.embed_ids(ids), want, atol=1e-6, rtol=0)
        np.testing.assert_allclose(minilm.embed_ids([t.tolist() for t in ids], batch_size=3), want, atol=1e-6,
                                   rtol=0)
    raw = minilm.embed_ids(minilm.tokenize(texts[:3]), normalize=False)
    np.testing.assert_allclose(raw, minilm.encode(texts[:3], normalize=False), atol=1e-6, rtol=0)
    assert minilm.embed_ids([]).shape == (0, minilm.dim)


@pytest.mark.parametrize("bad, error, message", [
    ([101, 2054, 102], TypeError, r"ids\[0\] is an int: pass a list of sequences"),
    ("some text", TypeError, "ids must be a list of token id sequences, got str"),
    ([[101, 102], None], TypeError, r"ids\[1\] is NoneType"),
    ([[101, 102], ["a", "b"]], TypeError, r"ids\[1\] must be a flat sequence of ints"),
    ([[101, 102], [[1, 2]]], TypeError, r"ids\[1\] must be a flat sequence of ints"),
    ([[101, 102], []], ValueError, r"ids\[1\] has 0 tokens; expected 1 to 128"),
    ([[101] * 129], ValueError, r"ids\[0\] has 129 tokens"),
    ([[101, 102], [101, 99999, 102]], ValueError, r"ids\[1\] holds token id 99999, outside the vocabulary"),
    ([[101, -1]], ValueError, r"ids\[0\] holds token id -1"),
])
def test_embed_ids_refuses_bad_ids_naming_the_sequence(tiny, bad, error, message):
    with pytest.raises(error, match=message):
        tiny.embed_ids(bad)


def test_tokenize_without_truncation_names_the_long_text(tiny):
    long_text = "word " * 500
    with pytest.raises(e5lite.errors.TextTooLongError, match="text 1 is longer than the model's maximum of 128") as e:
        tiny.tokenize(["short", long_text, long_text], truncate=False)
    assert e.value.index == 1 and e.value.max_length == 128
    assert [len(t) for t in tiny.tokenize(["short", long_text])] == [3, 128]


def test_prompt_prefix(tiny):
    assert tiny.prompt_prefix() == "" and tiny.prompt_prefix("query") == "query: "
    assert tiny.prompt_prefix(prompt="Instruct: find it\nQuery: ") == "Instruct: find it\nQuery: "
    with pytest.raises(ValueError, match="unknown prompt_name 'nope'"):
        tiny.prompt_prefix("nope")
    with pytest.raises(ValueError, match="one of prompt, prompt_name and task"):
        tiny.prompt_prefix("query", prompt="x")
    assert tiny.prompt_for("passage") == "passage: " and tiny.prompt_for("search") == "" == tiny.prompt_for(None)


@pytest.mark.parametrize("texts, match", [
    ({"a": "x", "b": "y"}, "got a mapping"), ({"x", "y"}, "got a set, which has no order"),
    (frozenset({"x"}), "got a frozenset"), (b"raw", "got bytes"), (None, "got NoneType")])
def test_wrong_kind_of_texts(tiny, texts, match):
    with pytest.raises(TypeError, match=match):
        tiny.encode(texts)
    with pytest.raises(TypeError, match=match):
        tiny.tokenize(texts)


@pytest.mark.parametrize("kw, error, match", [
    (dict(batch_size=True), ValueError, "batch_size must be a positive int"),
    (dict(normalize="yes"), TypeError, "normalize must be a bool, got str"),
    (dict(normalize=1), TypeError, "normalize must be a bool, got int"),
    (dict(normalize=None), TypeError, "normalize must be a bool, got NoneType")])
def test_wrong_kind_of_arguments(tiny, kw, error, match):
    with pytest.raises(error, match=match):
        tiny.encode(["a"], **kw)
    with pytest.raises(error, match=match):
        tiny.embed_ids([[101, 102]], **kw)


def test_bools_are_not_sizes(tiny_dir):
    with pytest.raises(ValueError, match="token_budget"):
        e5lite.load(tiny_dir, token_budget=True)
    with pytest.raises(ValueError, match="max_length must be an int"):
        e5lite.load(tiny_dir, max_length=True)


def test_untokenisable_text_names_its_index(tiny):
    """A lone surrogate is not Unicode text: the error names the text, also past the first chunk of encode()."""
    from e5lite.errors import TextEncodingError
    texts = ["fine"] * 5 + ["bad \ud800 half"] + ["fine"]
    with pytest.raises(TextEncodingError, match=r"text 5 cannot be tokenised: it is not valid Unicode") as e:
        tiny.encode(texts)
    assert e.value.index == 5
    with pytest.raises(TextEncodingError, match="text 5 "):
        tiny.tokenize(texts)
    before = tiny.settings
    tiny.configure(first_chunk_texts=2, chunk_texts=2)
    try:
        with pytest.raises(TextEncodingError, match="text 5 "):
            tiny.encode(texts)
    finally:
        tiny.configure(first_chunk_texts=before.first_chunk_texts, chunk_texts=before.chunk_texts)


def test_many_threads_share_one_encoder(minilm):
    """encode() from 8 threads at once on one Encoder: each gets its own texts' embeddings, as if alone."""
    import concurrent.futures
    texts = TEXTS + [f"thread test sentence {i} " + "word " * (i % 40) for i in range(40)]
    want = minilm.encode(texts, batch_size=8)
    jobs = [(texts[k::5], dict(prompt_name=None)) for k in range(5)] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda job: minilm.encode(job[0], batch_size=4, **job[1]), jobs))
    for k, got in enumerate(results):
        np.testing.assert_allclose(got, want[k % 5::5], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_iter_batches_through_the_model_equals_encode(tiny_dir):
    """encode() == the batches of iter_batches run through the engine's jitted function, and through one of
    the user's own (model.forward + pooling); every text lands once, every token once."""
    import jax
    from e5lite.pooling import l2_normalize, pool, pool_segments
    texts = TEXTS + [f"sentence {i} about {'many ' * (i % 30)}things" for i in range(60)]
    for knobs in (dict(packing=False), dict(packing=True, token_budget=512, min_window=16)):
        enc = e5lite.load(tiny_dir, **knobs)
        want = enc.encode(texts, prompt_name="query")
        batches = list(enc.iter_batches(texts, prompt_name="query"))
        index = np.concatenate([b.index for b in batches])
        assert sorted(index.tolist()) == list(range(len(texts)))
        assert sum(b.real_tokens for b in batches) == sum(len(t) for t in enc.tokenize(texts, prompt_name="query"))
        assert any(b.packed for b in batches) == knobs["packing"]

        @jax.jit
        def mine(input_ids, mask, segment_ids, position_ids):
            if segment_ids is None:
                return l2_normalize(pool(e5lite.forward(enc.params, enc.config, input_ids, mask), mask, "mean"))
            h = e5lite.forward(enc.params, enc.config, input_ids, mask, segment_ids=segment_ids,
                               position_ids=position_ids)
            g = pool_segments(h, segment_ids, position_ids, enc.engine.settings.max_segments, "mean")
            return l2_normalize(g).reshape(-1, g.shape[-1])

        ours, theirs = np.zeros_like(want), np.zeros_like(want)
        for b in batches:
            ours[b.index] = np.asarray(enc.engine.dispatch(b, True))[b.slot]
            theirs[b.index] = np.asarray(mine(b.input_ids, b.attention_mask, b.segment_ids, b.position_ids))[b.slot]
        np.testing.assert_array_equal(ours, want)
        np.testing.assert_allclose(theirs, want, atol=1e-6, rtol=0)


def test_iter_batches_stops_early_and_checks_arguments(tiny):
    it = tiny.iter_batches(["a"] * 5000, batch_size=4)
    first = next(it)
    assert first.input_ids.shape[0] == 4
    it.close()  # the planner thread is shut down, nothing left running
    with pytest.raises(TypeError, match="got a set"):
        tiny.iter_batches({"a"})
    with pytest.raises(ValueError, match="batch_size"):
        tiny.iter_batches(["a"], batch_size=0)
