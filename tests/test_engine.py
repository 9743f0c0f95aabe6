"""The throughput engine: batch planning, packing, bf16, multi-device and multi-process runs."""

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
from e5lite import encoder as encoder_mod
from e5lite.batching import pack_rows, pack_windows, plan_packed, plan_padded, planned_shapes, windows_for
from e5lite.encoder import CPU_STREAMS

CORPUS = TEXTS + [f"passage: item {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 23)
                  for i in range(60)]


def fake_ids(lengths):
    return [np.arange(1, n + 1, dtype=np.int32) for n in lengths]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return e5lite.load(minilm_dir, packing=False)


@pytest.fixture(scope="module")
def reference(minilm):
    """Each text embedded alone (batch of one, no packing): what every plan must reproduce."""
    return minilm.encode(CORPUS, batch_size=1)


@pytest.mark.parametrize("budget, devices", [(4096, 1), (65536, 1), (4096, 4)])
def test_plans_cover_every_text_once_with_few_shapes(budget, devices):
    lengths = np.random.default_rng(0).integers(2, 513, size=20_000)
    lengths[:50] = 512
    ids = fake_ids(lengths)
    for plan in (plan_padded(ids, max_length=512, token_budget=budget, multiple=devices),
                 plan_packed(ids, pack_length=512, max_length=512, token_budget=budget, max_segments=64,
                             multiple=devices),
                 plan_packed(ids, pack_length=512, max_length=512, token_budget=budget, max_segments=64,
                             multiple=devices, min_window=64)):
        batches = list(plan)
        index = np.concatenate([b.index for b in batches])
        assert sorted(index.tolist()) == list(range(len(ids)))
        assert len({b.shape for b in batches}) <= 16
        for b in batches:
            rows, length = b.input_ids.shape
            assert rows % devices == 0 and (rows * length <= max(budget, devices * length))
            assert b.real_tokens == int(b.attention_mask.sum()) == sum(lengths[i] for i in b.index)


@pytest.mark.parametrize("pack_length, min_window", [(0, None), (128, None), (512, None), (512, 64)])
def test_planned_shapes_match_the_plans(pack_length, min_window):
    """"auto" packing weighs layouts by planned_shapes: they must be the shapes the plans really build."""
    lengths = np.random.default_rng(2).integers(2, 513, size=3000)
    kw = dict(max_length=512, token_budget=8192, multiple=2)
    ids = fake_ids(lengths)
    plan = (plan_padded(ids, **kw) if pack_length == 0
            else plan_packed(ids, pack_length=pack_length, max_segments=16, min_window=min_window, **kw))
    want = [b.input_ids.shape + (b.window or b.input_ids.shape[1],) for b in plan]
    assert planned_shapes(lengths, pack_length=pack_length, max_segments=16, min_window=min_window, **kw) == want
    if min_window:
        assert len({w for _, _, w in want}) > 1  # some batches run attention on windows of the rows


@pytest.fixture
def small_chunks(monkeypatch):
    """Tokenise and plan a few texts at a time, so that CORPUS spans many chunks."""
    monkeypatch.setattr(encoder_mod, "FIRST_CHUNK_TEXTS", 5)
    monkeypatch.setattr(encoder_mod, "CHUNK_TEXTS", 16)


def test_many_chunks_keep_input_order(minilm_dir, reference, small_chunks):
    enc = e5lite.load(minilm_dir, token_budget=512)
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("streams", [1, 3])
def test_streams_give_the_same_result_in_order(minilm_dir, reference, small_chunks, streams):
    enc = e5lite.load(minilm_dir, token_budget=256, streams=streams)
    assert enc.streams == streams
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)
    assert enc.stats["texts"] == len(CORPUS)


def test_default_streams_by_backend(minilm):
    assert minilm.streams == (CPU_STREAMS if minilm.devices[0].platform == "cpu" else 1)
    with pytest.raises(ValueError, match="streams must be a positive int"):
        e5lite.load(minilm.model_dir, streams=0)


def test_a_failing_batch_on_a_stream_raises(minilm_dir, monkeypatch):
    enc = e5lite.load(minilm_dir, token_budget=128, streams=2)
    real, calls = enc._dispatch, []

    def flaky(batch, normalize):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("batch 3 failed")
        return real(batch, normalize)

    bars = []
    monkeypatch.setattr(enc, "_dispatch", flaky)
    monkeypatch.setattr(encoder_mod, "tqdm", lambda *a, **k: bars.append(tqdm(*a, **k)) or bars[-1])
    with pytest.raises(RuntimeError, match="batch 3 failed"):
        enc.encode(CORPUS, show_progress_bar=True)
    assert len(bars) == 1 and bars[0].disable  # the progress bar was closed on the way out
    monkeypatch.setattr(enc, "_dispatch", real)  # the encoder still works afterwards
    assert enc.encode(CORPUS[:3]).shape == (3, enc.dim)


def test_pack_rows_respects_capacity_and_segments():
    lengths = np.random.default_rng(1).integers(2, 200, size=3000)
    rows = pack_rows(lengths, 256, 8)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert all(sum(lengths[i] for i in r) <= 256 and len(r) <= 8 for r in rows)
    fill = lengths.sum() / (len(rows) * 256)
    assert fill > 0.97, fill  # best-fit decreasing leaves little room


def test_windows_for():
    assert windows_for(256, 64) == [64, 128, 256] and windows_for(256, None) == [256] == windows_for(256, 0)
    assert windows_for(384, 64) == [96, 192, 384] and windows_for(200, 64) == [100, 200]


@pytest.mark.parametrize("capacity, min_window, max_segments", [(256, 32, 64), (512, 64, 16), (128, 16, 4)])
def test_pack_windows_keeps_every_text_inside_its_window(capacity, min_window, max_segments):
    lengths = np.random.default_rng(3).integers(1, capacity + 1, size=3000) // np.random.default_rng(4).choice(
        [1, 4, 16], size=3000) + 1
    lengths = np.minimum(lengths, capacity)
    windows = windows_for(capacity, min_window)
    rows, row_windows = pack_windows(lengths, capacity, max_segments, windows)
    assert sorted(i for r in rows for i, _ in r) == list(range(len(lengths)))
    assert row_windows == sorted(row_windows) and set(row_windows) <= set(windows)
    for row, w in zip(rows, row_windows):
        assert len(row) <= max_segments
        ends = [0]
        for i, offset in row:  # in order, no overlaps, inside the row, never across a multiple of w
            assert offset >= ends[-1] and offset + lengths[i] <= capacity
            assert offset // w == (offset + lengths[i] - 1) // w, (offset, lengths[i], w)
            ends.append(offset + lengths[i])
    fill = lengths.sum() / (len(rows) * capacity)
    whole = lengths.sum() / (len(pack_rows(lengths, capacity, max_segments)) * capacity)
    assert fill > whole - 0.03, (fill, whole)  # windows cost little packing density
    # every window in use, but for those too small to hold their share of max_segments (16 in 128 x 4 segments)
    assert set(row_windows) == {w for w in windows if w * max_segments >= capacity}


def test_packed_batch_layout():
    ids = fake_ids([5, 3, 4])
    (b,) = plan_packed(ids, pack_length=16, max_length=16, token_budget=16, max_segments=4)
    assert b.input_ids.shape == (1, 16) and b.num_segments == 4
    assert b.segment_ids[0].tolist() == [1] * 5 + [2] * 4 + [3] * 3 + [0] * 4
    assert b.position_ids[0, :12].tolist() == list(range(5)) + list(range(4)) + list(range(3))
    assert b.index.tolist() == [0, 2, 1] and b.slot.tolist() == [0, 1, 2]  # longest first


@pytest.mark.parametrize("packing, budget, batch_size", [(True, 4096, None), (True, 1024, 3), ("auto", 2048, None),
                                                         (False, 1024, None)])
def test_engine_matches_one_by_one(minilm_dir, reference, packing, budget, batch_size):
    enc = e5lite.load(minilm_dir, packing=packing, token_budget=budget)
    got = enc.encode(CORPUS, batch_size=batch_size)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert len(enc.compiled_shapes) <= 16
    if packing is True:  # only texts longer than the packed rows go in padded batches
        packed = [s[1] for s in enc.compiled_shapes if len(s) == 4]
        assert packed and all(s[1] > min(packed) for s in enc.compiled_shapes if len(s) == 2)


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
    assert all(len(s) == 2 for s in enc.compiled_shapes)
    with pytest.raises(ValueError, match="packing needs pooling"):
        e5lite.load(tiny_copy, packing=True)


def test_packed_forward_equals_separate_forwards(tiny):
    """Hidden states of packed sequences equal each sequence run on its own."""
    ids = tiny.tokenizer(["query: a short one", "passage: " + "words " * 30, "x"])
    (b,) = plan_packed(ids, pack_length=128, max_length=128, token_budget=128, max_segments=4)
    h = e5lite.forward(tiny.params, tiny.config, b.input_ids, b.attention_mask, segment_ids=b.segment_ids,
                       position_ids=b.position_ids)
    for g, i in enumerate(b.index):
        alone = e5lite.forward(tiny.params, tiny.config, ids[i][None], np.ones((1, len(ids[i])), np.int32))
        np.testing.assert_allclose(np.asarray(h)[0][b.segment_ids[0] == g + 1], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.parametrize("min_window", [0, 16, 64])
def test_attention_windows_give_the_same_embeddings(minilm_dir, reference, min_window):
    enc = e5lite.load(minilm_dir, packing=True, min_window=min_window, token_budget=1024)
    np.testing.assert_allclose(enc.encode(CORPUS), reference, atol=1e-5, rtol=0)
    packed = [s for s in enc.compiled_shapes if len(s) == 4]
    if min_window:  # some batches ran attention on windows shorter than their rows, none below min_window
        assert any(w < length for _, length, _, w in packed) and all(w >= min_window for *_, w in packed)
    else:
        assert all(w == length for _, length, _, w in packed)


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
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="min_window must be an int >= 0"):
            e5lite.load(tiny.model_dir, min_window=bad)


def test_windows_are_weighed_against_whole_rows(tiny_dir):
    """Few segments per row make windows pack worse: "auto" then keeps whole rows."""
    lengths = np.random.default_rng(5).integers(5, 40, size=3000)
    enc = e5lite.load(tiny_dir, packing=True, min_window=32, max_segments=64)
    assert enc.layouts()[:2] == [(enc.layouts()[0][0], 0), (enc.layouts()[0][0], 32)]
    assert enc.choose_layout(lengths)[1] == 32
    enc.max_segments = 3
    assert enc.choose_layout(lengths)[1] == 0


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return e5lite.load(tiny_dir)


def test_forward_is_differentiable(tiny):
    ids = np.asarray(tiny.tokenizer(["a differentiable forward"])[0])[None]

    def loss(params):
        h = e5lite.forward(params, tiny.config, ids, np.ones_like(ids))
        return jnp.sum(e5lite.mean_pool(h, np.ones_like(ids)) ** 2)

    grads = jax.grad(loss)(tiny.params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) >= len(norms) - 1  # token-type row 1 unused


def test_bf16_accuracy(minilm_dir, reference):
    bf16 = e5lite.load(minilm_dir, dtype="bfloat16").encode(CORPUS)
    cos = (bf16 * reference).sum(1)
    assert bf16.dtype == np.float32 and cos.min() >= 0.999, cos.min()


def _run_py(script: str, env_extra: dict, timeout=300):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)


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
            assert all(s[0] % 4 == 0 for s in enc.compiled_shapes), enc.compiled_shapes
    """, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    for packing in (True, False):
        np.testing.assert_allclose(np.load(tmp_path / f"out_{packing}.npy"), reference, atol=1e-5, rtol=0)


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
        print("RESULT", enc.stats["texts"])
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
