"""weights="int8" (e5lite/int8.py): the int8 layer against integer references computed here, the whole forward
against float32, the engine's layouts, the refusals, and ``--weights int8`` in ``embed`` and ``serve`` equal to
``load(..., weights="int8").encode`` (a Ray run's: test_ray.py, on that module's Ray)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEXTS

import e5lite
from e5lite.cli import main
from e5lite.int8 import QMAX, dequantize, project_int8, quantize_rows, quantize_weight
from e5lite.model import forward
from e5lite.params import QuantizedWeight


@pytest.fixture(scope="module")
def tiny_int8(tiny_dir):
    return e5lite.load(tiny_dir, weights="int8")


def _np_quantize_rows(x):
    """Per token: [min, max] with 0 in it cut into 255 steps, x ~= scale * (q - zero), q in [-128, 127]."""
    lo, hi = np.minimum(x.min(-1, keepdims=True), 0), np.maximum(x.max(-1, keepdims=True), 0)
    scale = (hi - lo) * np.float32(1 / 255)
    inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale > 0)
    zero = np.round(-lo * inv) - 128
    return np.clip(np.round(x * inv) + zero, -128, 127).astype(np.int8), scale, zero.astype(np.int64)


def test_quantize_weight_per_output_channel():
    """Each output channel's largest |w| is exactly 127 steps, the error at most half a step, an all-zero
    channel stays zero, stacked layers are quantised one by one, and quantising the dequantised weight gives
    the same ints and scales back."""
    rng = np.random.default_rng(0)
    w_LDCK = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
    w_LDCK[1, :, 2, 5] = 0
    qw = quantize_weight(w_LDCK, in_axes=1, lead=1)
    assert qw.q.dtype == np.int8 and qw.q.shape == w_LDCK.shape and qw.scale.shape == (2, 3, 8)
    np.testing.assert_array_equal(qw.qsum, qw.q.astype(np.int64).sum(1))
    np.testing.assert_array_equal(np.abs(qw.q).max(1)[qw.scale > 0], QMAX)
    assert not qw.q[1, :, 2, 5].any() and qw.scale[1, 2, 5] == 0
    err = np.abs(dequantize(qw, 1, lead=1) - w_LDCK)
    assert (err <= qw.scale[:, None] / 2 * (1 + 1e-6)).all()
    again = quantize_weight(dequantize(qw, 1, lead=1), in_axes=1, lead=1)
    np.testing.assert_array_equal(again.q, qw.q)
    np.testing.assert_allclose(again.scale, qw.scale, rtol=1e-7)
    one = quantize_weight(w_LDCK[0], in_axes=1)
    np.testing.assert_array_equal(one.q, qw.q[0])
    np.testing.assert_array_equal(one.scale, qw.scale[0])


def test_quantize_rows_matches_numpy():
    """Against numpy, and within half a step of the input (an all-zero row, and a GELU-like one-sided row)."""
    x = np.random.default_rng(1).standard_normal((3, 5, 24)).astype(np.float32) * 4
    x[1, 2] = 0
    x[2, 3] = np.abs(x[2, 3]) - 0.17
    q, s, z = jax.jit(quantize_rows)(x)
    want_q, want_s, want_z = _np_quantize_rows(x)
    np.testing.assert_array_equal(np.asarray(q), want_q)
    np.testing.assert_array_equal(np.asarray(z), want_z)
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-7)
    back = np.asarray(s) * (np.asarray(q).astype(np.float32) - np.asarray(z))
    assert (np.abs(back - x) <= np.asarray(s) * 0.5001).all() and not back[1, 2].any()


@pytest.mark.parametrize(
    "spec, x_shape, w_shape, in_axes",
    [("BSD,DCNK->BSCNK", (2, 5, 16), (16, 3, 2, 4), 1), ("BSX,XD->BSD", (2, 5, 12), (12, 16), 1)],
)
def test_project_int8_equals_integer_reference(spec, x_shape, w_shape, in_axes):
    """The int32 product of the quantised operands, exact, then rescaled: against numpy's int64 product of the
    same ints (float64 rescale; float32 rounding allowed)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[in_axes:]).astype(np.float32)
    qw = quantize_weight(w, in_axes)
    got = np.asarray(jax.jit(project_int8, static_argnums=0)(spec, x, qw, b))
    xq, xs, xz = _np_quantize_rows(x)
    per_token = xs.shape + (1,) * (len(w_shape) - in_axes - 1)
    acc = np.einsum(spec, xq.astype(np.int64) - xz, qw.q.astype(np.int64))  # sum (q_x - z_x) q_w
    want = acc * xs.reshape(per_token).astype(np.float64) * qw.scale.astype(np.float64) + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # the int8 products are what they stand for: within a few steps of float32's
    exact = np.einsum(spec, x, w) + b
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()


def test_minilm_int8_close_to_float32(minilm, minilm_dir):
    """The real all-MiniLM-L6-v2: int8 embeddings against float32's, cosine >= 0.98 each, 0.995 on average
    (tools/quality.py measures what this costs in retrieval)."""
    texts = TEXTS + ["query: how do I open a file and close it afterwards", "x"]
    q = e5lite.load(minilm_dir, weights="int8", unroll=False)  # one layer to compile
    cos = np.sum(q.encode(texts) * minilm.encode(texts), axis=1)
    assert cos.min() >= 0.98 and cos.mean() >= 0.995, cos
    assert q.weights == "int8"


def test_layouts_and_params(tiny_dir, tiny_int8):
    """Scanned (stacked int8 leaves) and unrolled layers agree; ``params`` are the dequantised weights, and
    running them again (``set_params``) quantises them back to the same embeddings."""
    layers = tiny_int8.engine._run_params.layers
    first = layers[0] if isinstance(layers, tuple) else layers
    assert isinstance(first.qkv_DCNK, QuantizedWeight) and first.qkv_DCNK.q.dtype == jnp.int8
    assert isinstance(first.o_NKD, QuantizedWeight) and first.ffn_out_FD.scale.dtype == jnp.float32
    want = tiny_int8.encode(TEXTS)
    scanned = e5lite.load(tiny_dir, weights="int8", unroll=False)
    np.testing.assert_allclose(scanned.encode(TEXTS), want, atol=1e-6, rtol=0)
    params = tiny_int8.params
    assert params.layers.q_DNK.dtype == jnp.float32
    scanned.set_params(params)
    np.testing.assert_allclose(scanned.encode(TEXTS), want, atol=1e-6, rtol=0)


def test_refusals(tiny_dir, tiny_int8, tmp_path):
    with pytest.raises(ValueError, match=r"weights must be one of float32, bfloat16, int8 .* got 'int4'"):
        e5lite.load(tiny_dir, weights="int4")
    with pytest.raises(ValueError, match=r"weights='int8' needs dtype='float32'"):
        e5lite.load(tiny_dir, weights="int8", dtype="bfloat16")
    run = tiny_int8.engine._run_params
    ids = jnp.ones((1, 4), jnp.int32)

    def loss(embeddings):  # any gradient through an int8 projection
        return forward(run._replace(embeddings=embeddings), tiny_int8.config, ids, ids).sum()

    with pytest.raises(ValueError, match="cannot be trained"):
        jax.grad(loss)(run.embeddings)
    from e5lite.train import fit

    pairs = tmp_path / "train.jsonl"
    pairs.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"weights='int8' encoder cannot be trained"):
        fit(tiny_int8, pairs, tmp_path / "out")


def test_cli_embed_int8_equals_encode(tiny_dir, tiny, tiny_int8, tmp_path):
    (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.npy"
    argv = ["embed", "--model", str(tiny_dir), "--weights", "int8", "--input", str(tmp_path / "in.txt")]
    assert main([*argv, "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), tiny_int8.encode(TEXTS), atol=1e-6, rtol=0)
    assert np.abs(np.load(out) - tiny.encode(TEXTS)).max() > 1e-5  # int8 products, not float32 ones


@pytest.mark.slow
def test_serve_int8_equals_encode(tiny_dir, tiny_int8, monkeypatch):
    """``e5lite serve --weights int8`` as far as the server: the command line parsed and its encoder loaded as
    ``serve`` would, then the app that ``serve`` builds, driven in this process (Starlette's TestClient; the
    server's own process and sockets are test_serve.py's)."""
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    import e5lite.serve
    from e5lite.serve import build_app
    from test_serve import free_port

    served = {}
    monkeypatch.setattr(e5lite.serve, "serve", lambda enc, **kw: served.update(enc=enc, **kw))
    assert main(["serve", "--model", str(tiny_dir), "--weights", "int8", "--port", str(free_port())]) == 0
    options = {k: v for k, v in served.items() if k not in ("enc", "host", "port")}  # build_app's (serve's docs)
    texts = [t for t in TEXTS if t]  # the server refuses empty inputs
    with TestClient(build_app(served["enc"], **options)) as client:
        r = client.post("/embed", json={"inputs": texts})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json(), np.float32), tiny_int8.encode(texts), atol=1e-6, rtol=0)
        assert '"weights": "int8"' in json.dumps(client.get("/info").json())
