"""The forward pass (model.py) on packed rows and attention windows, and its gradients. Parity with
transformers is in test_parity.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import e5lite
from e5lite.batching import plan_packed


@pytest.mark.slow
def test_packed_forward_equals_separate_forwards(tiny):
    """Hidden states of packed sequences equal each sequence run on its own."""
    ids = tiny.tokenizer(["query: a short one", "passage: " + "words " * 30, "x"])
    (b,) = plan_packed(ids, pack_length=128, max_length=128, token_budget=128, max_segments=4)
    h = e5lite.forward(tiny.params, tiny.config, b.input_ids, b.attention_mask, segment_ids=b.segment_ids,
                       position_ids=b.position_ids)
    for g, i in enumerate(b.index):
        alone = e5lite.forward(tiny.params, tiny.config, ids[i][None], np.ones((1, len(ids[i])), np.int32))
        np.testing.assert_allclose(np.asarray(h)[0][b.segment_ids[0] == g + 1], np.asarray(alone)[0], atol=1e-5)


def test_windowed_forward_equals_whole_rows(tiny):
    ids = tiny.tokenizer(["query: a short one", "passage: " + "words " * 20, "x", "y z", "passage: more words"])
    (b,) = plan_packed(ids, pack_length=64, max_length=64, token_budget=128, max_segments=8, min_window=16)
    assert b.window < 64
    run = lambda w: np.asarray(e5lite.forward(tiny.params, tiny.config, b.input_ids, b.attention_mask,
                                              segment_ids=b.segment_ids, position_ids=b.position_ids,
                                              attention_window=w))
    real = b.segment_ids > 0  # padding positions attend nothing either way; their values are not used
    np.testing.assert_allclose(run(b.window)[real], run(None)[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_window 24 must divide the sequence length 64"):
        run(24)
    with pytest.raises(ValueError, match="attention_window needs segment_ids"):
        e5lite.forward(tiny.params, tiny.config, b.input_ids, b.attention_mask, attention_window=16)


@pytest.mark.slow
def test_forward_is_differentiable(tiny):
    ids = np.asarray(tiny.tokenizer(["a differentiable forward"])[0])[None]

    def loss(params):
        h = e5lite.forward(params, tiny.config, ids, np.ones_like(ids))
        return jnp.sum(e5lite.mean_pool(h, np.ones_like(ids)) ** 2)

    grads = jax.grad(loss)(tiny.params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= len(norms) - 1  # token-type row 1 unused


@pytest.mark.slow
def test_fused_and_per_layer_layouts_run_the_same_forward(tiny):
    """The engine's layouts of the same weights (model.fuse_layers; a tuple of per-layer ones run unrolled; the
    FFN output weight kept transposed, as with bfloat16 weights) give the stacked scan's hidden states, states
    of every layer and dropout masks; unfusing and untransposing are exact."""
    from e5lite.model import Dropout, FusedLayerParams, Params, fuse_layers, unfuse_layers
    from e5lite.params import transposed, untransposed
    p = tiny.params
    fused = fuse_layers(p.layers)
    assert isinstance(fused, FusedLayerParams) and fused.qkv_DCNK.shape[-4:] == (tiny.config.hidden_size, 3,
                                                                                  *p.layers.q_DNK.shape[-2:])
    for a, b in zip(unfuse_layers(fused), p.layers):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    per_layer = tuple(jax.tree.map(lambda x, i=i: x[i], fused) for i in range(tiny.config.num_hidden_layers))
    flipped = fused._replace(ffn_out_FD=transposed(fused.ffn_out_FD))
    assert flipped.ffn_out_FD.w_OI.shape == p.layers.ffn_out_FD.shape[:1] + p.layers.ffn_out_FD.shape[:0:-1]
    np.testing.assert_array_equal(np.asarray(untransposed(flipped.ffn_out_FD)), np.asarray(p.layers.ffn_out_FD))
    ids = np.asarray(tiny.tokenizer(["query: how are layers stored", "passage: one after the other"])[1])[None]
    mask = np.ones_like(ids)
    dropout = Dropout(jax.random.PRNGKey(3), 0.2, 0.2)
    for kw in ({}, {"output_hidden_states": True, "output_attentions": True}, {"dropout": dropout}):
        ref = jax.tree.leaves(e5lite.forward(p, tiny.config, ids, mask, **kw))
        for layers in (fused, per_layer, flipped):
            out = jax.tree.leaves(e5lite.forward(Params(p.embeddings, layers), tiny.config, ids, mask, **kw))
            assert [o.shape for o in out] == [r.shape for r in ref]
            for o, r in zip(out, ref):
                np.testing.assert_allclose(np.asarray(o), np.asarray(r), atol=1e-6, rtol=0)
