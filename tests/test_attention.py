"""attention_impl selection, and whole-model parity with the Pallas kernel (interpret mode on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import e5lite
from conftest import TEXTS, save_layout, torch_reference
from e5lite.errors import E5LiteError


def test_auto_is_xla_on_cpu(tiny_dir):
    assert e5lite.load(tiny_dir).settings.attention_impl == "xla"


def test_unavailable_or_unknown_impl(tiny_dir):
    # float32: cuDNN attention is unavailable on every backend (CPU: no cuDNN; GPU: it needs fp16/bf16)
    with pytest.raises(E5LiteError, match=f"attention_impl='cudnn' is not available on {jax.default_backend()}"):
        e5lite.load(tiny_dir, attention_impl="cudnn")
    with pytest.raises(ValueError, match="attention_impl must be"):
        e5lite.load(tiny_dir, attention_impl="flash")
    with pytest.raises(E5LiteError, match="attention_impl='pallas' is not available.*head_dim"):
        e5lite.load(tiny_dir, attention_impl="pallas")  # the tiny config's head_dim 8 has no kernel


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_pallas_model_matches_transformers(tmp_path, minilm_dir, packing):
    import transformers
    model = transformers.BertModel(transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=128, max_position_embeddings=128),
                                   add_pooling_layer=False)
    model.set_attn_implementation("eager")
    folder = save_layout(model.eval(), tmp_path / "m", "plain", minilm_dir)
    enc = e5lite.load(folder, attention_impl="pallas", packing=packing)
    assert enc.settings.attention_impl == "pallas"
    _, _, want = torch_reference(model, enc.tokenizer(TEXTS))
    np.testing.assert_allclose(enc.encode(TEXTS), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pallas_minilm_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm_dir), device="cpu").float()  # fp32 even from an fp16 copy of the weights
    want = st.encode(TEXTS, normalize_embeddings=True)
    got = e5lite.load(minilm_dir, attention_impl="pallas").encode(TEXTS)
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.slow
def test_pallas_e5_base_shape_hidden_states(e5_base_model, e5_base_dir):
    """e5-base heads (12 x 64) through the kernel, one short and one truncated text, against transformers."""
    model = e5_base_model
    enc = e5lite.load(e5_base_dir, attention_impl="pallas")
    ids = enc.tokenizer([TEXTS[0], TEXTS[2]])
    want_h, mask, want = torch_reference(model, ids)
    np.testing.assert_allclose(enc.encode([TEXTS[0], TEXTS[2]]), want, atol=1e-5, rtol=0)
    padded = np.stack([np.pad(ids[0], (0, 512 - len(ids[0]))), ids[1]])
    got_h = np.asarray(e5lite.forward(enc.params, enc.config, padded, mask.astype(np.int32), attention_impl="pallas"))
    real = mask.astype(bool)
    assert np.abs(got_h[real] - want_h[real]).max() <= 1e-4


@pytest.mark.slow
def test_windows_equal_whole_rows_for_every_impl_that_runs_here():
    """multi_head_attention on windows of W gives the whole-row result when no sequence crosses a window."""
    from e5lite.attention import AttentionMask, multi_head_attention
    rng = np.random.default_rng(0)
    B, S, N, K, W = 2, 64, 2, 16, 16
    qkv = rng.standard_normal((B, S, 3, N, K)).astype(np.float32)
    seg = np.zeros((B, S), np.int32)
    seg[0, :10], seg[0, 16:30], seg[0, 32:48], seg[0, 48:60] = 1, 2, 3, 4  # none crosses a multiple of 16
    seg[1, :5] = 1
    mask = AttentionMask(seg > 0, seg)
    for impl in ("xla", "pallas"):
        whole = np.asarray(multi_head_attention(qkv, mask, impl))
        windowed = np.asarray(multi_head_attention(qkv, mask._replace(window=W), impl))
        assert whole.shape == (B, S, N, K)
        np.testing.assert_allclose(windowed[seg > 0], whole[seg > 0], atol=1e-6, rtol=0)
    crossing = mask._replace(segment_ids_BS=np.where(seg == 4, 3, seg))  # segment 3 now crosses position 48
    assert not np.allclose(np.asarray(multi_head_attention(qkv, crossing._replace(window=W)))[0, 32:60],
                           np.asarray(multi_head_attention(qkv, crossing))[0, 32:60], atol=1e-3)


def _padded(ids):
    S = max(len(t) for t in ids)
    arr, mask = np.zeros((len(ids), S), np.int32), np.zeros((len(ids), S), np.int32)
    for i, t in enumerate(ids):
        arr[i, :len(t)], mask[i, :len(t)] = t, 1
    return arr, mask


@pytest.mark.slow
@pytest.mark.parametrize("which", ["minilm", "e5-base"])
def test_attention_probabilities_equal_transformers(which, minilm_dir, request):
    """forward(output_attentions=True) against transformers' eager attentions, real tokens, a padded batch."""
    import torch
    if which == "minilm":
        import transformers
        folder = minilm_dir
        model = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    else:
        model = request.getfixturevalue("e5_base_model")  # eager attention, as random_bert makes it
        folder = request.getfixturevalue("e5_base_dir")
    enc = e5lite.load(folder)
    ids, mask = _padded(enc.tokenizer([TEXTS[0], TEXTS[1], "a short one"]))
    last, hidden, probs = e5lite.forward(enc.params, enc.config, ids, mask, output_hidden_states=True,
                                         output_attentions=True)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                     output_attentions=True).attentions
    want = np.stack([a.numpy() for a in want])  # [L, B, N, S, T]
    probs = np.asarray(probs)
    assert probs.shape == want.shape == (enc.config.num_hidden_layers, 3, enc.config.num_attention_heads,
                                         ids.shape[1], ids.shape[1]) and probs.dtype == np.float32
    for b in range(3):
        real = mask[b].astype(bool)
        np.testing.assert_allclose(probs[:, b][:, :, real][..., real], want[:, b][:, :, real][..., real],
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(probs[:, b][:, :, real].sum(-1), 1.0, atol=1e-5)
    assert np.asarray(hidden).shape[0] == enc.config.num_hidden_layers + 1  # the tuple keeps its order


def test_output_attentions_needs_whole_rows_and_xla(tiny_dir):
    enc = e5lite.load(tiny_dir)
    ids = np.ones((1, 16), np.int32)
    with pytest.raises(ValueError, match="output_attentions needs attention_impl='xla'.*'pallas'"):
        e5lite.forward(enc.params, enc.config, ids, ids, output_attentions=True, attention_impl="pallas")
    with pytest.raises(ValueError, match="attention windows never form"):
        e5lite.forward(enc.params, enc.config, ids, ids, segment_ids=ids, attention_window=8, output_attentions=True)


# ------------------------------------------------------------------ training: attention's backward and dropout

def _reference_attend(q, k, v, allowed, key, rate):
    """softmax(q k^T masked) with dropout, times v: jnp and autodiff only (the pre-VJP formulation)."""
    from e5lite.dropout import drop
    logits = jnp.einsum("BNSK,BNTK->BNST", q, k, precision="highest")
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - logits.max(-1, keepdims=True))
    return jnp.einsum("BNST,BNTK->BNSK", drop(e, key, rate), v, precision="highest") / e.sum(-1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.0, 0.25])
@pytest.mark.parametrize("segments", [False, True])
def test_attention_gradients_equal_autodiff(rate, segments):
    """The hand-written backward pass of attend (float32) against autodiff of the same forward, on padded rows
    (one with a single real key) and packed rows (block-diagonal masks); padding queries carry no gradient."""
    from e5lite.attention import attend
    B, N, S, K = 3, 2, 12, 4
    rng = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(rng.standard_normal((B, N, S, K)), jnp.float32) for _ in range(4))
    lens = np.array([12, 7, 1])
    real = np.arange(S)[None, :] < lens[:, None]
    if segments:
        seg = np.where(real, 1 + (np.arange(S)[None, :] >= 4), 0)
        allowed = jnp.asarray((seg[:, :, None] == seg[:, None, :]) & real[:, None, :])[:, None]
    else:
        allowed = jnp.asarray(real)[:, None, None, :]
    w = w * jnp.asarray(real, jnp.float32)[:, None, :, None]  # as pooling: padding queries reach no loss
    key = jax.random.PRNGKey(3)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)  # noqa: E731
    got = jax.grad(loss(lambda q, k, v: attend(q, k, v, allowed, (key, rate))), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: _reference_attend(q, k, v, allowed, key, rate)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max(), name
