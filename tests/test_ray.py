"""Ray Data: ``e5lite.ray.Embedder`` in ``map_batches``, and ``e5lite embed --engine ray`` (two actors equal the
local run; a failed block, then a rerun, leaves every id once). One local Ray (2 CPUs) for the module."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

import e5lite
from e5lite.cli import main
from e5lite.errors import InputError
from test_distributed_corpus import paragraphs, records, write_corpus

ray = pytest.importorskip("ray")
from e5lite.ray import Embedder  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def texts():
    return paragraphs()[:400]


def test_embedder_any_batch_sizes_and_formats(tiny_dir, texts):
    """Called as Ray calls it, with batches of any size as dicts, DataFrames and Tables: the ids come back
    unchanged, the embeddings equal encode(), and the compiled shapes stay bounded."""
    import pandas as pd
    import pyarrow as pa
    emb = Embedder(tiny_dir, prompt_name="passage", field="text", id_field="_id", keep_columns=["n"])
    want = e5lite.load(tiny_dir).encode(texts, prompt_name="passage")
    sizes, out, start = [1, 7, 64, 150, 2, 129, 33, 14], [], 0
    for i, size in enumerate(sizes):
        rows = {"_id": np.array([f"d{j}" for j in range(start, start + size)], dtype=object),
                "text": np.array(texts[start:start + size], dtype=object), "n": np.arange(start, start + size)}
        batch = [rows, pd.DataFrame(rows), pa.table(rows)][i % 3]
        res = emb(batch)
        if i % 3 == 2:  # a Table in, a Table out
            res = {c: res.column(c).to_pylist() for c in res.column_names}
        assert list(res["_id"]) == [f"d{j}" for j in range(start, start + size)]
        assert list(res["n"]) == list(range(start, start + size))
        out.append(np.stack(list(res["embedding"])))
        start += size
    np.testing.assert_allclose(np.concatenate(out), want, atol=1e-6, rtol=0)
    assert len(emb.compiled_shapes) <= 16, emb.compiled_shapes
    with pytest.raises(InputError, match=r"row 1 of the batch \(_id 'x'\): 'text' is NoneType, expected a string"):
        emb({"_id": np.array(["w", "x"], dtype=object), "text": np.array(["ok", None], dtype=object),
             "n": np.arange(2)})
    with pytest.raises(e5lite.E5LiteError, match="the batch has no column 'text'; columns: _id, body, n"):
        emb({"_id": np.array(["w"]), "body": np.array(["b"]), "n": np.arange(1)})


def test_embedder_long_inputs_and_compact_vectors(tiny_dir, texts):
    """Embedder(long_inputs="chunk", truncate_dim=, precision=, ranges=) in batches equals encode() with the same
    options; int8 without ranges is refused (each batch would pick its own buckets)."""
    import pyarrow as pa
    long_texts = sorted(texts, key=len)[-40:]
    enc = e5lite.load(tiny_dir, max_length=64)
    opts = dict(prompt_name="passage", long_inputs="chunk", chunk_overlap=4, truncate_dim=16)
    floats = enc.encode(long_texts, **opts)
    ranges = np.vstack((floats.min(0), floats.max(0)))
    want = enc.encode(long_texts, **opts, precision="int8", ranges=ranges)
    emb = Embedder(tiny_dir, max_length=64, field="text", precision="int8", ranges=ranges, **opts)
    out = [emb(pa.table({"text": long_texts[:15]})), emb({"text": np.array(long_texts[15:], dtype=object)})]
    assert out[0].schema.field("embedding").type.value_type == pa.int8()
    got = np.concatenate([np.stack(out[0].column("embedding").to_pylist()), np.stack(list(out[1]["embedding"]))])
    diff = np.abs(got.astype(np.int16) - want)  # other batch-mates: a value on a bucket edge may move one step
    assert diff.max() <= 1 and (diff > 0).sum() <= 2, diff.sum()
    with pytest.raises(ValueError, match="precision='uint8' needs ranges"):
        Embedder(tiny_dir, precision="uint8")


@pytest.mark.slow
def test_embedder_in_map_batches(local_ray, tiny_dir, texts):
    ds = ray.data.from_items([{"_id": f"d{i}", "text": t} for i, t in enumerate(texts)])
    ds = ds.map_batches(Embedder, fn_constructor_kwargs={"model": str(tiny_dir), "prompt_name": "passage",
                                                         "field": "text", "id_field": "_id"},
                        concurrency=2, batch_size=64, num_cpus=1)
    rows = ds.take_all()
    assert sorted(r["_id"] for r in rows) == sorted(f"d{i}" for i in range(len(texts)))
    got = {r["_id"]: r["embedding"] for r in rows}
    want = e5lite.load(tiny_dir).encode(texts, prompt_name="passage")
    np.testing.assert_allclose(np.stack([got[f"d{i}"] for i in range(len(texts))]), want, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, tiny_dir):
    """A corpus folder (.jsonl and Parquet) and the one-process run over it: (folder, embeddings, ids)."""
    folder = tmp_path_factory.mktemp("ray-corpus") / "in"
    write_corpus(folder)
    out = folder.parent / "one"
    assert main(args(tiny_dir, folder, out)) == 0
    return (folder, *e5lite.read_embeddings(out, with_ids=True))


def args(model, folder, out, *extra):
    return ["embed", "--model", str(model), "--input", str(folder), "--output", str(out), "--id-field", "_id",
            "--prompt-name", "passage", "--shard-size", "24K", *extra]


@pytest.mark.slow
def test_two_actors_failure_then_rerun(local_ray, tiny_dir, small_corpus, tmp_path, capsys):
    """A block fails (its shard's file name is taken by a folder, so committing it fails), the job stops; the
    rerun embeds only what is missing, and the result equals the local run with every id once."""
    folder, want, want_ids = small_corpus
    out = tmp_path / "emb"
    out.mkdir()
    blocker = out / "shard-00010.parquet"
    blocker.mkdir()
    assert main(args(tiny_dir, folder, out, "--engine", "ray", "--num-actors", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert re.fullmatch(r"e5lite: error: 1 of (\d+) shards failed in the Ray job, the first: shard-00010 \(b.jsonl "
                        r"bytes \d+-\d+\): IsADirectoryError: .*shard-00010\.parquet'; the others are committed: "
                        r"fix the cause and run the same command again", err), err
    with pytest.raises(e5lite.E5LiteError, match=r"1 of \d+ shards are missing \(shard-00010\)"):
        e5lite.read_embeddings(out)
    before = records(out)
    blocker.rmdir()
    assert main(args(tiny_dir, folder, out, "--engine", "ray", "--num-actors", "2")) == 0
    assert f"; {len(before)} shards were done already); all " in capsys.readouterr().err
    assert {k: records(out)[k] for k in before} == before  # nothing done twice
    assert all(r["writer"].startswith("ray actor ") for r in records(out).values())
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == want_ids  # every id once, in input order
    np.testing.assert_allclose(emb, want, atol=1e-6, rtol=0)
    import pyarrow.parquet as pq
    meta = json.loads(pq.read_schema(out / "shard-00000.parquet").metadata[b"e5lite"])
    assert meta["prompt"] == "passage: " and meta["pooling"] == "mean" and meta["normalize"] is True
    assert meta["model"] == str(tiny_dir) and meta["dim"] == 32


@pytest.mark.slow
def test_bad_input_is_one_line(local_ray, tiny_dir, tmp_path, capsys):
    rows = [json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(paragraphs()[:80])]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text("\n".join(rows[:70] + ['{"_id": 70}'] + rows[70:]) + "\n")
    assert main(args(tiny_dir, tmp_path / "in", tmp_path / "out", "--shard-size", "4K", "--engine", "ray")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"e5lite: error: 1 of \d+ shards failed in the Ray job, the first: shard-\d+ \(x.jsonl bytes "
                        r"\d+-\d+\): \S*/x.jsonl line 71 \(byte \d+\): no field 'text' \(set --field\); .*", err), err


@pytest.mark.slow
def test_int8_on_ray(local_ray, tiny_dir, small_corpus, tmp_path):
    """--engine ray --precision int8: a Ray task computes the ranges from the first --calibration texts before
    any actor starts, the manifest records them, and the actors quantise every shard with them."""
    from test_distributed_corpus import quantized_like
    folder, want, want_ids = small_corpus
    out = tmp_path / "emb"
    assert main(args(tiny_dir, folder, out, "--engine", "ray", "--precision", "int8", "--calibration", "100")) == 0
    run = json.loads((out / "manifest.json").read_text())["run"]
    np.testing.assert_allclose(run["ranges"], np.vstack((want[:100].min(0), want[:100].max(0))), atol=1e-6, rtol=0)
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    assert ids == want_ids and emb.dtype == np.int8
    quantized_like(emb, want, run["ranges"])
    import pyarrow.parquet as pq
    meta = json.loads(pq.read_schema(out / "shard-00000.parquet").metadata[b"e5lite"])
    assert meta["precision"] == "int8" and meta["ranges"] == run["ranges"]


@pytest.mark.slow
def test_ray_run_int8_equals_encode(local_ray, tiny_dir, small_corpus, tmp_path):
    """--weights int8 on Ray equals the per-host run (which test_int8 checks against load(weights="int8"))."""
    folder = small_corpus[0]
    out, one = tmp_path / "ray", tmp_path / "one"
    assert main(args(tiny_dir, folder, one, "--weights", "int8")) == 0
    assert main(args(tiny_dir, folder, out, "--engine", "ray", "--weights", "int8")) == 0
    emb, ids = e5lite.read_embeddings(out, with_ids=True)
    want, want_ids = e5lite.read_embeddings(one, with_ids=True)
    assert ids == want_ids
    np.testing.assert_allclose(emb, want, atol=1e-6, rtol=0)
