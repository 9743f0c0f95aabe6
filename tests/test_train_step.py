"""train_step.py and loss.py: the InfoNCE loss and its gradient equal torch on transformers' BertModel (the
real all-MiniLM-L6-v2, dropout off); GradCache chunks give the whole batch's gradient; dropout is BERT's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import e5lite
from e5lite.model import MATMUL_WEIGHTS
from e5lite.train_data import Pairs, TokenisedPairs
from e5lite.train_step import StepConfig, loss_and_grads
from e5lite.weights import to_state_dict

PAIRS = Pairs(
    queries=["how do I catch an exception and still run cleanup code", "exit a loop early",
             "define a small anonymous function inline", "format a number with two decimal places"],
    positives=[
        'The "try" statement specifies exception handlers and/or cleanup code for a group of statements.',
        '"break" may only occur syntactically nested in a "for" or "while" loop; it terminates the nearest loop.',
        "Lambda expressions (sometimes called lambda forms) are used to create anonymous functions.",
        "The string format() method formats a number; the precision is how many digits follow the decimal point.",
    ],
    negatives=[['The "raise" statement: if no expressions are present, raise re-raises the exception.'],
               ['"continue" continues with the next cycle of the nearest enclosing loop.'], [], []],
)


# jitted once per StepConfig and shared by the tests: op by op, the unrolled layers' forward and backward (and
# dropout's masks) took up to 20 s a call
step = jax.jit(loss_and_grads, static_argnames="sc")


def step_config(enc, dropout=0.0, chunk_size=None, remat=False, dtype="float32", unroll=True):
    return StepConfig(enc.config, enc.pooling, 0.01, dropout, dropout, dtype, remat, chunk_size, unroll)


# The checks of GradCache, remat, dropout and bf16 compare one step with another whatever the layers' layout, so
# they run them scanned (one layer compiled rather than 6: about half the compile time); the torch check runs
# the default, unrolled, and test_scanned_layers_equal_unrolled ties the two layouts together.
SCANNED = dict(unroll=False)


def assert_same_step(got, want):
    """Two (loss, gradient) results agree to fp32 rounding of other GEMM shapes: the loss to 1e-5 of itself,
    each gradient leaf to 1e-5 of the largest gradient."""
    (loss, grads), (w_loss, w_grads) = got, want
    assert abs(float(loss) - float(w_loss)) <= 1e-5 * abs(float(w_loss))
    scale = max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(w_grads))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(w_grads), strict=True):
        assert a.shape == b.shape and np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * scale


@pytest.fixture(scope="module")
def setup(minilm_dir):
    enc = e5lite.load(minilm_dir)
    batch, _ = TokenisedPairs(enc, PAIRS).batch(np.arange(4))
    return enc, batch


def torch_loss_and_grads(minilm_dir, batch):
    import transformers
    model = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").float().eval()

    def embed(ids, mask):
        h = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask, dtype=torch.float32)[..., None]
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    q, p = embed(batch.q_ids, batch.q_mask), embed(batch.p_ids, batch.p_mask)
    logits = (q @ p.T) / 0.01
    logits = logits.masked_fill(~torch.tensor(batch.p_valid)[None, :], float("-inf"))
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(q)))
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_loss_and_gradient_equal_torch(minilm_dir, setup):
    enc, batch = setup
    assert batch.p_valid.tolist() == [True] * 4 + [True, True, False, False]  # padded negative rows
    want_loss, want = torch_loss_and_grads(minilm_dir, batch)
    loss, grads = step(enc.params, batch, jax.random.PRNGKey(0), sc=step_config(enc))
    assert abs(float(loss) - want_loss) <= 1e-4 * abs(want_loss), (float(loss), want_loss)
    got = to_state_dict(grads, enc.config)
    assert set(want) <= set(got)
    # fp32 rounding, amplified by the 1/0.01 logit scale, measured against the largest gradient (some leaves,
    # e.g. key biases, have a true gradient of 0 and only rounding noise)
    scale = max(np.abs(g).max() for g in want.values())
    for name, g in want.items():
        assert np.abs(got[name] - g).max() <= 2e-5 * scale, (name, np.abs(got[name] - g).max(), scale)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size, remat", [(2, False), (1, True)])
def test_grad_cache_and_remat_equal_the_whole_batch(setup, chunk_size, remat):
    enc, batch = setup
    key = jax.random.PRNGKey(0)
    whole = step(enc.params, batch, key, sc=step_config(enc, **SCANNED))
    assert_same_step(step(enc.params, batch, key, sc=step_config(enc, chunk_size=chunk_size, remat=remat, **SCANNED)),
                     whole)


@pytest.mark.slow
def test_scanned_layers_equal_unrolled(setup):
    """The two layouts of the step (programs the torch check and the GradCache check compiled already)."""
    enc, batch = setup
    key = jax.random.PRNGKey(0)
    assert_same_step(step(enc.params, batch, key, sc=step_config(enc, **SCANNED)),
                     step(enc.params, batch, key, sc=step_config(enc)))


@pytest.mark.slow
def test_dropout_is_random_per_key_and_off_at_zero(setup):
    enc, batch = setup
    sc = step_config(enc, dropout=0.1, **SCANNED)
    a, _ = step(enc.params, batch, jax.random.PRNGKey(1), sc=sc)
    b, _ = step(enc.params, batch, jax.random.PRNGKey(1), sc=sc)
    c, _ = step(enc.params, batch, jax.random.PRNGKey(2), sc=sc)
    off, _ = step(enc.params, batch, jax.random.PRNGKey(1), sc=step_config(enc, **SCANNED))
    assert float(a) == float(b) and float(a) != float(c) and float(a) != float(off)


@pytest.mark.slow
def test_bf16_compute_keeps_float32_gradients(setup):
    enc, batch = setup
    loss, grads = step(enc.params, batch, jax.random.PRNGKey(0), sc=step_config(enc, dtype="bfloat16", **SCANNED))
    ref, ref_grads = step(enc.params, batch, jax.random.PRNGKey(0), sc=step_config(enc, **SCANNED))
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(grads))
    assert abs(float(loss) - float(ref)) < 0.05 * abs(float(ref))
    # the gradient (float32 ones are tested against torch above) points the same way: cosine per parameter
    # matrix >= 0.999 for every projection (0.9998 measured), and for the whole gradient
    cos = lambda a, b: float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    for name in MATMUL_WEIGHTS:
        a, b = np.asarray(getattr(grads.layers, name)), np.asarray(getattr(ref_grads.layers, name))
        assert cos(a.ravel(), b.ravel()) >= 0.999, name
    flat = lambda t: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(t)])  # noqa: E731
    assert cos(flat(grads), flat(ref_grads)) >= 0.999
