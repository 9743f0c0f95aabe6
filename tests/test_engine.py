"""The engine (engine.py): chunks, streams, packing end to end, layouts, bf16, multi-device and multi-process runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tqdm.auto import tqdm

import e5lite
from conftest import TEXTS
from e5lite import engine as engine_mod
from e5lite.settings import BACKEND_DEFAULTS

CORPUS = TEXTS + [f"passage: item {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 23)
                  for i in range(60)]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return e5lite.load(minilm_dir, packing=False)


@pytest.fixture(scope="module")
def reference(minilm):
    """Each text embedded alone (batch of one, no packing): what every plan must reproduce."""
    return minilm.encode(CORPUS, batch_size=1)


@pytest.fixture
def small_chunks(monkeypatch):
    """Tokenise and plan a few texts at a time, so that CORPUS spans many chunks."""
    return dict(first_chunk_texts=5, chunk_texts=16)


@pytest.mark.slow
def test_many_chunks_keep_input_order(minilm_dir, reference, small_chunks):
    enc = e5lite.load(minilm_dir, token_budget=512, **small_chunks)
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("streams", [1, 3])
def test_streams_give_the_same_result_in_order(minilm_dir, reference, small_chunks, streams):
    enc = e5lite.load(minilm_dir, token_budget=256, streams=streams, **small_chunks)
    assert enc.settings.streams == streams
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)
    assert enc.engine.stats["texts"] == len(CORPUS)


def test_default_streams_by_backend(minilm):
    backend = "cpu" if minilm.devices[0].platform == "cpu" else "accelerator"
    assert minilm.settings.streams == BACKEND_DEFAULTS[backend]["streams"]
    with pytest.raises(ValueError, match="streams must be a positive int"):
        e5lite.load(minilm.model_dir, streams=0)


def test_a_failing_batch_on_a_stream_raises(minilm_dir, monkeypatch):
    enc = e5lite.load(minilm_dir, token_budget=128, streams=2)
    real, calls = enc.engine.dispatch, []

    def flaky(batch, normalize):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("batch 3 failed")
        return real(batch, normalize)

    bars = []
    monkeypatch.setattr(enc.engine, "dispatch", flaky)
    monkeypatch.setattr(engine_mod, "tqdm", lambda *a, **k: bars.append(tqdm(*a, **k)) or bars[-1])
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        enc.encode(CORPUS, show_progress_bar=True)
    assert len(bars) == 1 and bars[0].disable  # the progress bar was closed on the way out
    monkeypatch.setattr(enc.engine, "dispatch", real)  # the encoder still works afterwards
    assert enc.encode(CORPUS[:3]).shape == (3, enc.dim)


@pytest.mark.parametrize("packing, budget, batch_size", [(True, 4096, None), (True, 1024, 3), ("auto", 2048, None),
                                                         (False, 1024, None)])
def test_engine_matches_one_by_one(minilm_dir, reference, packing, budget, batch_size):
    enc = e5lite.load(minilm_dir, packing=packing, token_budget=budget)
    got = enc.encode(CORPUS, batch_size=batch_size)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert len(enc.engine.compiled_shapes) <= 16
    if packing is True:  # only texts longer than the packed rows go in padded batches
        packed = [s[1] for s in enc.engine.compiled_shapes if len(s) == 4]
        assert packed and all(s[1] > min(packed) for s in enc.engine.compiled_shapes if len(s) == 2)


@pytest.mark.parametrize("pooling", ["cls", "mean_sqrt_len"])
def test_packed_pooling_modes(tiny_copy, pooling):
    (tiny_copy / "1_Pooling").mkdir()
    (tiny_copy / "1_Pooling" / "config.json").write_text(f'{{"pooling_mode": "{pooling}"}}')
    packed = e5lite.load(tiny_copy, packing=True).encode(CORPUS, normalize=False)
    padded = e5lite.load(tiny_copy, packing=False).encode(CORPUS, normalize=False)
    np.testing.assert_allclose(packed, padded, atol=1e-5, rtol=0)


def test_max_pooling_never_packs(tiny_copy):
    (tiny_copy / "1_Pooling").mkdir()
    (tiny_copy / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    enc = e5lite.load(tiny_copy)  # auto: falls back to padded batches
    enc.encode(CORPUS)
    assert all(len(s) == 2 for s in enc.engine.compiled_shapes)
    with pytest.raises(ValueError, match="packing needs pooling"):
        e5lite.load(tiny_copy, packing=True)


@pytest.mark.parametrize("min_window", [0, 16, 64])
def test_attention_windows_give_the_same_embeddings(minilm_dir, reference, min_window):
    enc = e5lite.load(minilm_dir, packing=True, min_window=min_window, token_budget=1024)
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)
    packed = [s for s in enc.engine.compiled_shapes if len(s) == 4]
    if min_window:  # some batches ran attention on windows shorter than their rows, none below min_window
        assert any(w < length for _, length, _, w in packed) and all(w >= min_window for *_, w in packed)
    else:
        assert all(w == length for _, length, _, w in packed)


def test_windows_are_weighed_against_whole_rows(tiny_dir):
    """Few segments per row make windows pack worse: "auto" then keeps whole rows."""
    lengths = np.random.default_rng(5).integers(5, 40, size=3000)
    enc = e5lite.load(tiny_dir, packing=True, min_window=32, max_segments=64)
    layouts = enc.engine.layouts()
    assert layouts[:2] == [(layouts[0][0], 0), (layouts[0][0], 32)]
    assert enc.engine.choose_layout(lengths)[1] == 32
    enc.configure(max_segments=3)
    assert enc.engine.choose_layout(lengths)[1] == 0


def test_bf16_accuracy(minilm_dir, reference):
    bf16 = e5lite.load(minilm_dir, dtype="bfloat16").encode(CORPUS)
    cos = (bf16 * reference).sum(1)
    assert bf16.dtype == np.float32 and cos.min() >= 0.999, cos.min()


def _run_py(script: str, env_extra: dict, timeout=300):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_four_host_devices_match_one(minilm_dir, reference, tmp_path):
    np.save(tmp_path / "corpus.npy", np.array(CORPUS, dtype=object), allow_pickle=True)
    out = _run_py(f"""
        import jax, numpy as np, e5lite
        assert len(jax.local_devices()) == 4, jax.local_devices()
        corpus = list(np.load({str(tmp_path / 'corpus.npy')!r}, allow_pickle=True))
        for packing in (True, False):
            enc = e5lite.load({str(minilm_dir)!r}, packing=packing, token_budget=2048)
            assert len(enc.devices) == 4
            np.save({str(tmp_path)!r} + f"/out_{{packing}}.npy", enc.encode(corpus))
            assert all(s[0] % 4 == 0 for s in enc.engine.compiled_shapes), enc.engine.compiled_shapes
    """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    for packing in (True, False):
        np.testing.assert_allclose(np.load(tmp_path / f"out_{packing}.npy"), reference, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_merge_in_order(minilm_dir, reference, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    np.save(tmp_path / "corpus.npy", np.array(CORPUS, dtype=object), allow_pickle=True)
    script = f"""
        import sys, numpy as np, e5lite
        rank = int(sys.argv[1])
        e5lite.initialize_distributed("127.0.0.1:{port}", num_processes=2, process_id=rank)
        corpus = list(np.load({str(tmp_path / 'corpus.npy')!r}, allow_pickle=True))
        enc = e5lite.load({str(minilm_dir)!r})
        out = enc.encode(corpus)
        np.save({str(tmp_path)!r} + f"/rank{{rank}}.npy", out)
        print("RESULT", enc.engine.stats["texts"])
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    # each process embedded its own half, and both returned the whole corpus in order
    counts = [int(line.split()[1]) for so, _ in outs for line in so.splitlines() if line.startswith("RESULT")]
    assert sorted(counts) == [len(CORPUS) // 2, len(CORPUS) - len(CORPUS) // 2]
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp_path / f"rank{r}.npy"), reference, atol=1e-5, rtol=0)


def test_persistent_compilation_cache(tiny_dir, tmp_path):
    script = f"""
        import e5lite
        e5lite.load({str(tiny_dir)!r}).encode(["warm start"])
    """
    out = _run_py(script, {"E5LITE_COMPILATION_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert any((tmp_path / "cache").iterdir())


QUERIES = ["query: how do I read a file line by line", "query: what does functools.partial do",
           "query: sort a dict by value", "query: difference between list and tuple in python " * 3]


def test_small_inputs_equal_the_bulk_path_without_threads(minilm_dir, monkeypatch):
    """A few texts run on the caller's thread (no thread started, no pool), equal to the bulk path."""
    import threading
    small = e5lite.load(minilm_dir)
    bulk = e5lite.load(minilm_dir, small_inputs=0)
    want = bulk.encode(QUERIES)
    small.encode(QUERIES)  # compile outside the check

    def no_threads(self):
        raise AssertionError("the small-input path started a thread")

    monkeypatch.setattr(threading.Thread, "start", no_threads)
    got = small.encode(QUERIES)
    one = small.encode(QUERIES[0])
    monkeypatch.undo()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(one, want[0], atol=1e-6, rtol=0)
    assert not small.engine._pools  # no pool was ever made for it
    big = small.encode(CORPUS[:40])  # past small_inputs: the bulk path and its pools, kept between calls
    pools = dict(small.engine._pools)
    small.encode(CORPUS[:40])
    assert pools and small.engine._pools == pools
    np.testing.assert_allclose(big, bulk.encode(CORPUS[:40]), atol=1e-6, rtol=0)
    small.close()
    assert not small.engine._pools
    np.testing.assert_allclose(small.encode(CORPUS[:40]), big, atol=1e-6, rtol=0)  # pools come back


def test_warmup_compiles_what_a_query_needs(minilm_dir):
    from e5lite.engine import embed_batch
    enc = e5lite.load(minilm_dir)
    shapes = enc.warmup(max_length=64)
    assert {(1, 16), (4, 16), (16, 16), (1, 64), (16, 64)} <= set(shapes)
    before = embed_batch._cache_size()
    for k in (1, 2, 3, 4):
        enc.encode_queries(QUERIES[:k])
    assert embed_batch._cache_size() == before  # nothing compiled after the warm-up


@pytest.mark.slow
def test_bfloat16_weights_stay_within_cosine_0999_of_float32(minilm_dir, minilm):
    """``weights="bfloat16"``: the layers' matmul weights stored in bf16 (bf16 operands, float32 accumulation and
    activations) against float32 on real text, on the small-input path (one query) and the packed bulk path."""
    from pydoc_beir import QUERIES, documents
    b = e5lite.load(minilm_dir, weights="bfloat16")
    layers = b.engine.params.layers
    assert b.weights == "bfloat16" and layers.q_DNK.dtype == jnp.bfloat16 and layers.ffn_out_FD.dtype == jnp.bfloat16
    assert layers.q_bias_NK.dtype == jnp.float32 and b.engine.params.embeddings.word_VD.dtype == jnp.float32
    texts = [q for _, q, _, _ in QUERIES] + [d["title"] + " " + d["text"] for d in documents()[:120]]
    cos = np.sum(minilm.encode(texts, prompt_name=None) * b.encode(texts, prompt_name=None), axis=1)
    assert cos.min() >= 0.999, cos.min()
    one = b.encode(texts[0])  # a query alone: the small-input path
    assert float(one @ minilm.encode(texts[0])) >= 0.999
    with pytest.raises(ValueError, match=r"weights must be one of float32, bfloat16, int8 \(or None: as dtype\), "
                                         r"got 'int4'"):
        e5lite.load(minilm_dir, weights="int4")
    with pytest.raises(ValueError, match=r"weights='bfloat16' needs dtype='float32'"):
        e5lite.load(minilm_dir, weights="bfloat16", dtype="float16")


@pytest.mark.slow
@pytest.mark.parametrize("weights", [None, "bfloat16"])
def test_unrolled_and_scanned_layouts_agree(minilm_dir, reference, weights):
    """``unroll`` (the CPU default: per-layer weights, QKV fused once at load) and the scanned stack give the
    same embeddings on both paths; ``params`` gives back the loaded weights exactly in either layout, and
    ``configure(unroll=...)`` switches layouts in place."""
    from e5lite.model import FusedLayerParams
    from e5lite.weights import load_params
    enc = e5lite.load(minilm_dir, packing=False, weights=weights)
    assert enc.settings.unroll is True and isinstance(enc.engine._run_params.layers, tuple)
    loaded = load_params(minilm_dir, enc.config, jnp.float32)
    unrolled = [enc.encode(CORPUS), enc.encode(CORPUS[:2])]
    for layout in ("unrolled", "scanned"):
        for f, a, b in zip(loaded.layers._fields, enc.params.layers, loaded.layers):
            narrow = weights is not None and f in e5lite.model.MATMUL_WEIGHTS
            assert a.shape == b.shape and a.dtype == (jnp.bfloat16 if narrow else jnp.float32), (layout, f)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(a.dtype), err_msg=f"{layout} {f}")
        enc.configure(unroll=False)
    assert isinstance(enc.engine._run_params.layers, FusedLayerParams)
    scanned = [enc.encode(CORPUS), enc.encode(CORPUS[:2])]
    for u, s in zip(unrolled, scanned):
        np.testing.assert_allclose(u, s, atol=1e-6, rtol=0)
    if weights is None:
        np.testing.assert_allclose(unrolled[0], reference, atol=1e-5, rtol=0)
