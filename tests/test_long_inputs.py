"""Inputs past the maximum length (``encode(long_inputs="chunk")``, ``e5lite/long_inputs.py``), against the same
procedure written here with transformers' tokenizer and BertModel, on real text (Python's reference docs,
1,700 to 2,100 tokens: several times past 512)."""

from __future__ import annotations

import numpy as np
import pytest
from pydoc_data.topics import topics

import e5lite
from e5lite.long_inputs import Windows, combine, split, split_ids

LONG = [" ".join(topics[k].split()) for k in ("try", "calls", "import")]  # 2083, 1708, 2063 MiniLM tokens
SHORT = " ".join(topics["pass"].split())[:300]
E5_PROMPTS = ("query: ", "passage: ", "Instruct: Given a question, retrieve passages that answer it\nQuery: ")


@pytest.fixture(scope="module")
def enc128(minilm_dir):
    return e5lite.load(minilm_dir, max_length=128)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    """The procedure with transformers: (texts, prefix, max_length, overlap, normalize) -> [n, D] float64."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()

    def pooled(seqs):
        S = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (S - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (S - len(s)) for s in seqs])
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        m = mask[..., None].double()
        return ((h * m).sum(1) / m.sum(1)).numpy()

    def run(texts, prefix="", max_length=128, overlap=0, normalize=True):
        prompt = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        width = max_length - 2 - len(prompt)
        out = []
        for text in texts:
            whole = tok(prefix + text)["input_ids"]
            if len(whole) <= max_length:
                windows = [whole]
            else:
                body = tok(text, add_special_tokens=False)["input_ids"]
                windows = [[tok.cls_token_id] + prompt + body[s:s + width] + [tok.sep_token_id]
                           for s in range(0, len(body) - overlap, width - overlap)]
            weights = np.array([len(w) for w in windows], np.float64)
            v = (pooled(windows) * weights[:, None]).sum(0) / weights.sum()
            out.append(v / np.linalg.norm(v) if normalize else v)
        return np.stack(out)

    run.tokenizer = tok
    return run


@pytest.mark.slow
@pytest.mark.parametrize("prefix, overlap", [("", 0), ("query: ", 0), ("passage: ", 37)])
def test_matches_transformers_procedure(enc128, reference, prefix, overlap):
    texts = LONG + [SHORT]
    got = enc128.encode(texts, prompt=prefix, long_inputs="chunk", chunk_overlap=overlap)
    want = reference(texts, prefix, 128, overlap)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # not what truncation gives: the windows past the first count
    assert np.abs(enc128.encode(LONG, prompt=prefix) - got[:3]).max() > 1e-2


def test_matches_at_the_models_max_length(minilm_dir, reference):
    enc = e5lite.load(minilm_dir)  # sentence_bert_config.json: 256
    assert enc.max_length == 256
    got = enc.encode(LONG[:2], long_inputs="chunk", chunk_overlap=16, normalize=False)
    np.testing.assert_allclose(got, reference(LONG[:2], "", 256, 16, normalize=False), atol=1e-5, rtol=0)


def test_unnormalised_and_single_text(enc128, reference):
    got = enc128.encode(LONG[0], prompt="query: ", long_inputs="chunk", normalize=False)
    assert got.shape == (enc128.dim,)
    np.testing.assert_allclose(got, reference(LONG[:1], "query: ", 128, 0, normalize=False)[0], atol=1e-5, rtol=0)


def test_a_text_that_fits_is_unchanged(enc128):
    tok = enc128.tokenizer
    # a text of exactly max_length tokens, made from real text: the edge of "fits"
    body = tok.body_ids([LONG[0]])[0][:126]
    edge = tok.decode(body)
    assert len(tok([edge])[0]) == 128 and len(tok.body_ids([edge])[0]) == 126
    for text in (SHORT, edge):
        np.testing.assert_array_equal(enc128.encode([text], long_inputs="chunk"), enc128.encode([text]))
        np.testing.assert_array_equal(enc128.encode([text], long_inputs="chunk", normalize=False),
                                      enc128.encode([text], normalize=False))
    one = split(tok, [edge, edge + " again", SHORT])
    assert one.counts.tolist() == [1, 2, 1]
    np.testing.assert_array_equal(one.ids[0], tok([edge])[0])
    # in a call with long texts, the ones that fit equal truncation's up to batch-mates (the engine's bound)
    mixed = [SHORT, LONG[1], edge]
    np.testing.assert_allclose(enc128.encode(mixed, long_inputs="chunk")[[0, 2]], enc128.encode(mixed)[[0, 2]],
                               atol=1e-6, rtol=0)


def test_prompt_ids_then_text_ids_equal_the_prompted_ids(enc128):
    """E5's prompts on WordPiece: prompt ids + text ids == ids of prompt + text, so the first window of a long
    text is exactly what truncation embeds."""
    tok = enc128.tokenizer
    for prefix in E5_PROMPTS:
        for text in LONG + [SHORT]:
            joined = tok.body_ids([prefix + text])[0]
            np.testing.assert_array_equal(np.concatenate([tok.body_ids([prefix])[0], tok.body_ids([text])[0]]),
                                          joined)
        w = split(tok, LONG, prefix)
        np.testing.assert_array_equal(w.ids[0], tok([prefix + LONG[0]])[0])


def test_windows_layout(enc128, reference):
    tok = enc128.tokenizer
    w = split(tok, [SHORT] + LONG[:2], "query: ", overlap=10, offset=5)
    prompt = tok.body_ids(["query: "])[0].tolist()
    width = 128 - 2 - len(prompt)
    assert w.n == 3 and len(w.ids) == len(w.owner) == len(w.weight)
    assert w.owner.dtype == np.int64 and w.weight.dtype == np.float32 and all(i.dtype == np.int32 for i in w.ids)
    assert (np.diff(w.owner) >= 0).all() and w.counts[0] == 1
    np.testing.assert_array_equal(w.weight, [len(i) for i in w.ids])
    bodies = [i[1 + len(prompt):-1].tolist() for i, o in zip(w.ids, w.owner) if o == 1]
    assert all(i[0] == 101 and i[-1] == 102 and i[1:1 + len(prompt)].tolist() == prompt
               for i, o in zip(w.ids, w.owner) if o)
    assert all(len(b) == width for b in bodies[:-1]) and 0 < len(bodies[-1]) <= width
    assert all(a[-10:] == b[:10] for a, b in zip(bodies, bodies[1:]))  # consecutive windows share 10 tokens
    whole = reference.tokenizer(LONG[0], add_special_tokens=False)["input_ids"]
    assert bodies[0] + sum((b[10:] for b in bodies[1:]), []) == whole  # and together they are the text
    # the last window ends at the end, and no window lies inside the one before it
    assert [len(x) for x in split_ids(np.arange(25), 10, 5)] == [10, 10, 10, 10]
    assert [len(x) for x in split_ids(np.arange(26), 10, 5)] == [10, 10, 10, 10, 6]
    assert [len(x) for x in split_ids(np.arange(20), 10, 0)] == [10, 10]


def test_combine(enc128):
    w = Windows(ids=[np.zeros(3, np.int32)] * 4, owner=np.array([0, 1, 1, 2]),
                weight=np.array([3, 1, 3, 5], np.float32), n=3)
    rows = np.array([[1, 0], [4, 0], [0, 4], [0, 2]], np.float32)
    np.testing.assert_allclose(combine(w, rows, normalize=False), [[1, 0], [1, 3], [0, 2]], rtol=1e-7)
    np.testing.assert_allclose(combine(w, rows, normalize=True), [[1, 0], [0.1 ** 0.5, 0.9 ** 0.5], [0, 1]],
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"rows must have shape \(4, dim\), one per window, got \(3, 2\)"):
        combine(w, rows[:3], normalize=True)
    empty = split(enc128.tokenizer, [])
    assert empty.n == 0 and combine(empty, np.zeros((0, 384), np.float32), True).shape == (0, 384)
    assert enc128.encode([], long_inputs="chunk").shape == (0, enc128.dim)


def test_bad_arguments(enc128):
    with pytest.raises(ValueError, match="long_inputs must be one of 'truncate', 'chunk', got 'split'"):
        enc128.encode(["a"], long_inputs="split")
    with pytest.raises(ValueError, match="chunk_overlap must be >= 0, got -1"):
        enc128.encode(["a"], long_inputs="chunk", chunk_overlap=-1)
    with pytest.raises(TypeError, match="chunk_overlap must be an int, got bool"):
        enc128.encode(["a"], long_inputs="chunk", chunk_overlap=True)
    with pytest.raises(ValueError, match="chunk_overlap=8 needs long_inputs='chunk'"):
        enc128.encode(["a"], chunk_overlap=8)
    with pytest.raises(ValueError, match=r"chunk_overlap must be less than the window of 124 text tokens "
                                         r"\(max_length 128 - 2 special tokens - 2 prompt tokens\), got 124"):
        enc128.encode(["a"], prompt="query: ", long_inputs="chunk", chunk_overlap=124)
    enc128.encode(["a"], prompt="query: ", long_inputs="chunk", chunk_overlap=123)
    with pytest.raises(ValueError, match="takes 130 tokens, which with the 2 special tokens leaves no room"):
        enc128.encode(["a"], prompt="word " * 130, long_inputs="chunk")
