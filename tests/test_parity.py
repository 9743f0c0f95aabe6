"""Parity against transformers (random-init BERTs at e5 shapes) and sentence-transformers (real MiniLM).

Tolerances (fp32): normalised embeddings max |diff| <= 1e-5, last hidden states <= 1e-4 over real tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

import e5lite
from conftest import TEXTS, hidden_error, random_bert, save_layout, storage_rounded, torch_reference

LAYOUTS = ("plain", "legacy", "fp16", "sharded")
EMB_TOL = 1e-5
HIDDEN_TOL = 1e-4


# Full-size models get fewer texts, to keep the suite to minutes; the one past the max length (cut to 512 tokens,
# most of a full-size forward's work, in torch and here) only where the layout or shape is checked first.
SHORT_TEXTS = [TEXTS[1], TEXTS[3], TEXTS[0], TEXTS[5]]
FULL_SIZE_TEXTS = [TEXTS[2], *SHORT_TEXTS]


def check_parity(model, folder, *, hidden: bool, texts=TEXTS, **knobs):
    enc = e5lite.load(folder, **knobs)
    ids = enc.tokenizer(texts)
    # the long text, where there is one, was truncated
    assert (max(len(t) for t in ids) == enc.max_length) == any(t is TEXTS[2] for t in texts)
    want_h, _, want_emb = torch_reference(model, ids)
    got_emb = enc.encode(texts, batch_size=4)
    assert got_emb.dtype == np.float32 and got_emb.shape == (len(texts), enc.dim)
    emb_err = float(np.abs(got_emb - want_emb).max())
    assert emb_err <= EMB_TOL, f"embeddings differ by {emb_err:.2e}"
    if hidden:
        h_err = hidden_error(enc, ids, want_h)
        assert h_err <= HIDDEN_TOL, f"last hidden states differ by {h_err:.2e}"
    return enc


@pytest.fixture(scope="module", params=["tiny", "e5-base"])
def bert(request):
    model = request.getfixturevalue("e5_base_model") if request.param == "e5-base" else random_bert(request.param)
    return request.param, model, storage_rounded(model)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parity_layouts(bert, layout, tmp_path, minilm_dir):
    name, model, model16 = bert
    ref = model16 if layout == "fp16" else model
    folder = save_layout(model, tmp_path / f"{name}-{layout}", layout, minilm_dir)
    full = FULL_SIZE_TEXTS if layout == "plain" else SHORT_TEXTS  # the other layouts differ in storage alone
    check_parity(ref, folder, hidden=True, texts=TEXTS if name == "tiny" else full)


@pytest.mark.slow
def test_parity_e5_large(tmp_path, minilm_dir):
    """e5-large shape: embeddings and hidden states, stored plain (the other layouts, and the 512th position, are
    checked at e5-base's shape, in test_parity_layouts). Its layers run scanned: one layer compiled rather than 24
    (the CPU's default unrolls them; test_engine checks that both layouts agree)."""
    model = random_bert("e5-large", seed=1)
    check_parity(model, save_layout(model, tmp_path / "plain", "plain", minilm_dir), hidden=True, texts=SHORT_TEXTS,
                 unroll=False)


def test_bf16_storage(tmp_path, minilm_dir):
    model = random_bert("tiny", seed=5)
    folder = save_layout(model, tmp_path / "bf16", "bf16", minilm_dir)
    check_parity(storage_rounded(model, "bfloat16"), folder, hidden=True)


def test_hidden_states_per_layer(tmp_path, minilm_dir):
    import torch
    model = random_bert("tiny", seed=3)
    enc = e5lite.load(save_layout(model, tmp_path / "m", "plain", minilm_dir))
    ids = np.asarray(enc.tokenizer(["query: one two three"])[0])[None]
    mask = np.ones_like(ids)
    last, hidden = e5lite.forward(enc.params, enc.config, ids, mask, output_hidden_states=True)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    assert hidden.shape == (enc.config.num_hidden_layers + 1, 1, ids.shape[1], enc.dim)
    for i, want in enumerate(out.hidden_states):
        np.testing.assert_allclose(np.asarray(hidden[i]), want.numpy(), atol=HIDDEN_TOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(hidden[-1]))


def test_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    enc = e5lite.load(minilm_dir)
    assert enc.max_length == st.max_seq_length == 256
    assert max(len(t) for t in enc.tokenizer(TEXTS)) == 256  # the long text goes past MiniLM's limit
    want = st.encode(TEXTS, batch_size=4, normalize_embeddings=True)
    got = enc.encode(TEXTS, batch_size=4)
    assert np.abs(got - want).max() <= EMB_TOL
    want_raw = st.encode(TEXTS[:3])  # the folder's own Normalize module
    np.testing.assert_allclose(enc.encode(TEXTS[:3]), want_raw, atol=EMB_TOL, rtol=0)
    # prompts are prefixes, as sentence-transformers' prompt= argument
    np.testing.assert_allclose(enc.encode(["how are you"], prompt="query: "),
                               st.encode(["how are you"], prompt="query: "), atol=EMB_TOL, rtol=0)


def test_unnormalized_and_cls_pooling(tmp_path, minilm_dir):
    model = random_bert("tiny", seed=4)
    folder = save_layout(model, tmp_path / "m", "plain", minilm_dir)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        '{"word_embedding_dimension": 32, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}')
    enc = e5lite.load(folder)
    assert enc.pooling == "cls"
    ids = enc.tokenizer(TEXTS)
    h, _, want = torch_reference(model, ids, pooling="cls")
    np.testing.assert_allclose(enc.encode(TEXTS), want, atol=EMB_TOL, rtol=0)
    raw = enc.encode(TEXTS, normalize=False)
    np.testing.assert_allclose(raw, h[:, 0], atol=HIDDEN_TOL, rtol=0)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
