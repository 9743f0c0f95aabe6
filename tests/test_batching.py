"""Batch planning (batching.py): buckets, padded and packed plans, window packing, planned shapes."""

from __future__ import annotations

import numpy as np
import pytest

from e5lite.batching import (pack_windows, plan_packed, plan_padded, planned_shapes, seq_bucket, single_batch,
                             windows_for)


def fake_ids(lengths):
    return [np.arange(1, n + 1, dtype=np.int32) for n in lengths]


def test_bucket_lengths():
    assert seq_bucket(17, 128) == 32 and seq_bucket(120, 128) == 128 and seq_bucket(300, 300) == 300
    assert seq_bucket(3, 512) == 16 and seq_bucket(385, 512) == 512


@pytest.mark.parametrize("devices", [1, 4])
def test_single_batch_is_the_plan_of_one_text(devices):
    """The one-query shortcut (engine.small_batches) builds exactly the batch plan_padded plans for one text."""
    for n in (1, 5, 16, 17, 100, 128):
        seq = np.arange(7, 7 + n, dtype=np.int32)
        (want,) = plan_padded([seq], max_length=128, token_budget=1024, multiple=devices, pad_id=3)
        got = single_batch(seq, 128, devices, pad_id=3)
        assert got.shape == want.shape and got.real_tokens == want.real_tokens == n and not got.packed
        for f in ("input_ids", "attention_mask", "index", "slot"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f))
            assert getattr(got, f).dtype == getattr(want, f).dtype


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


def test_pack_windows_without_windows_respects_capacity_and_segments():
    lengths = np.random.default_rng(1).integers(2, 200, size=3000)
    rows, row_windows = pack_windows(lengths, 256, 8)
    assert sorted(i for r in rows for i, _ in r) == list(range(3000)) and set(row_windows) == {256}
    assert all(sum(lengths[i] for i, _ in r) <= 256 and len(r) <= 8 for r in rows)
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
    whole = lengths.sum() / (len(pack_windows(lengths, capacity, max_segments)[0]) * capacity)
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
